"""Measure the CPU costs per image that `irgl plan` uses (pipeline/plan/figures.py: IMAGE_ENCODE_CPU_SECONDS,
IMAGE_DECODE_CPU_SECONDS, CLIP_PREPROCESS_CPU_SECONDS) and print them next to the figures in the plan.

    python bench/cpu_image_costs.py [--size 1024] [--repeats 9]

Per format (JPEG quality 95, PNG), on one thread: encoding a generated-looking image the way the draw stages do
(`stages.base.encode_image`), decoding it the way the scorer does (`schemas.local.decode_rgb`), and
open_clip's ViT-L-14 preprocessing (resize to 224, crop, normalise). CPU time of the thread (`time.thread_time`) is
measured, not wall time, so that other jobs on the machine skew it less; the median of the repeats is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cpu_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.thread_time()
        out = fn()
        times.append(time.thread_time() - start)
    return statistics.median(times), out


def _image(size: int) -> Any:
    """A smooth scene with mild texture: generated images compress like this, not like white noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] * (1024 / size)
    base = np.stack(
        [128 + 100 * np.sin(x / 97.0), 128 + 100 * np.cos(y / 61.0), 128 + 80 * np.sin((x + y) / 143.0)], -1
    )
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    import open_clip
    import torch

    from pipeline.plan import figures as plan
    from schemas.local import decode_rgb
    from stages.base import encode_image

    torch.set_num_threads(1)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None)
    img = _image(args.size)
    scale = (1024 * 1024) / (args.size * args.size)  # the plan's figures are per 1024x1024 image
    print(f"{args.size}x{args.size}, one thread, CPU time, median of {args.repeats}; per 1024^2 image:")
    print(f"{'':28s} {'measured':>9s} {'in plan':>9s}")
    rows = []
    for fmt in ("jpeg", "png"):
        enc, data = _cpu_seconds(lambda fmt=fmt: encode_image(img, fmt, 95), args.repeats)
        dec, decoded = _cpu_seconds(lambda data=data: decode_rgb(data), args.repeats)
        rows.append((f"{fmt} encode ({len(data) / 1e6:.2f} MB)", enc, plan.IMAGE_ENCODE_CPU_SECONDS[fmt]))
        rows.append((f"{fmt} decode", dec, plan.IMAGE_DECODE_CPU_SECONDS[fmt]))
    pre, _ = _cpu_seconds(lambda: preprocess(decoded), args.repeats)
    rows.append(("open_clip preprocessing", pre, plan.CLIP_PREPROCESS_CPU_SECONDS))
    for label, measured, planned in rows:
        print(f"{label:28s} {1e3 * measured * scale:7.1f}ms {1e3 * planned:7.1f}ms")


if __name__ == "__main__":
    main()
