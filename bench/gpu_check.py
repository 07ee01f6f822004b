"""Device smoke check of the image engines: tiny diffusion (bf16) and tiny CLIP scoring on CUDA, with timings.

    python bench/gpu_check.py [--device cuda] [--batch 8] [--steps 4] [--big 512]

Builds the tiny models of `stages.tiny_image` into a temp dir (nothing is downloaded), runs DiffusersImageEngine
(text-to-image and image-to-image) and ClipScorer on the device, checks the outputs as tests/test_image_engines.py
does on CPU, and writes results and timings to $OUT/gpu_check.json (OUT defaults to ./out). Exit status 1 when a
check fails. Needs torch, diffusers, open_clip_torch, transformers, pydantic and pyarrow (schemas/ imports it);
it imports nothing else from irgl than the engines, the tiny models and the config schema.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from schemas.config import ScoreConfig  # noqa: E402
from stages.engines.clip import ClipScorer  # noqa: E402
from stages.engines.image import DiffusersImageEngine  # noqa: E402
from stages.tiny_image import (  # noqa: E402
    build_tiny_clip,
    build_tiny_diffusion,
    tiny_clip_score_fields,
    tiny_diffusion_config,
)

PROMPTS = [
    "a red cube on a blue sphere",
    "two cats on a sofa",
    "a lighthouse at night",
    "a bowl of soup with a spoon",
    "an astronaut riding a horse",
    "three birds over the ocean",
    "a watercolor of mountains and a lake",
    "a portrait of an old man with a hat",
]


def png(img: Any) -> bytes:
    """Encode a PIL image as PNG bytes (the form the stages pass images around in)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def max_abs_diff(a: Any, b: Any) -> int:
    """Largest per-channel pixel difference of two equally sized PIL images."""
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def mean_abs_diff(a: Any, b: Any) -> float:
    """Mean per-channel pixel difference of two equally sized PIL images."""
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def timed(fn: Any, *args: Any, repeats: int = 3) -> tuple[Any, float]:
    """Run fn(*args) `repeats` times; return the last result and the best wall time (the call syncs via PIL)."""
    best = math.inf
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def run(device: str, batch: int, steps: int, big: int, root: Path) -> dict[str, Any]:
    """Build, run and check; returns the JSON report (checks, timings, measurements, environment)."""
    import torch

    report: dict[str, Any] = {"checks": {}, "timings_s": {}, "measurements": {}}
    checks, timings, meas = report["checks"], report["timings_s"], report["measurements"]
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    for mod in ("diffusers", "open_clip", "transformers"):
        env[mod] = getattr(__import__(mod), "__version__", "?")
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    report["environment"] = env
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    seeds = list(range(100, 100 + batch))

    start = time.perf_counter()
    sd_path = build_tiny_diffusion(root)
    timings["build_tiny_diffusion"] = time.perf_counter() - start
    start = time.perf_counter()
    clip_path = build_tiny_clip(root)
    timings["build_tiny_clip"] = time.perf_counter() - start

    cfg = tiny_diffusion_config(sd_path, steps=steps, dtype="bfloat16")
    engine = DiffusersImageEngine(cfg, device=device)
    start = time.perf_counter()
    engine.setup()
    timings["image_setup"] = time.perf_counter() - start
    env["image_dtype"] = str(engine.dtype)

    start = time.perf_counter()
    engine.generate(prompts[:1], seeds[:1])
    timings["image_first_call"] = time.perf_counter() - start
    one, timings["t2i_batch1"] = timed(engine.generate, prompts[:1], seeds[:1])
    images, timings[f"t2i_batch{batch}"] = timed(engine.generate, prompts, seeds)
    timings["t2i_per_image"] = timings[f"t2i_batch{batch}"] / batch
    checks["t2i_count"] = len(images) == batch
    checks["t2i_rgb_size"] = all(im.mode == "RGB" and im.size == (cfg.width, cfg.height) for im in images)
    again = engine.generate(prompts, seeds)
    checks["t2i_same_seed_identical"] = all(max_abs_diff(a, b) == 0 for a, b in zip(images, again, strict=True))
    other = engine.generate(prompts, [s + 1000 for s in seeds])
    checks["t2i_other_seed_differs"] = all(mean_abs_diff(a, b) > 5 for a, b in zip(images, other, strict=True))
    # Batch composition: the same prompt+seed alone vs inside the batch vs in reversed order.
    rev = engine.generate(prompts[::-1], seeds[::-1])[::-1]
    meas["batch_vs_single_max_abs_diff"] = max_abs_diff(images[0], one[0])
    meas["batch_vs_reversed_max_abs_diff"] = max(max_abs_diff(a, b) for a, b in zip(images, rev, strict=True))
    checks["t2i_batch_composition_close"] = (
        max(meas["batch_vs_single_max_abs_diff"], meas["batch_vs_reversed_max_abs_diff"]) <= 8
    )

    init = [png(im) for im in images]
    refined, timings[f"i2i_batch{batch}"] = timed(engine.generate, prompts, seeds, init)
    timings["i2i_per_image"] = timings[f"i2i_batch{batch}"] / batch
    checks["i2i_rgb_size"] = len(refined) == batch and all(
        im.mode == "RGB" and im.size == (cfg.width, cfg.height) for im in refined
    )
    meas["i2i_vs_t2i_mean_abs_diff"] = min(mean_abs_diff(a, b) for a, b in zip(images, refined, strict=True))
    checks["i2i_differs_from_t2i"] = meas["i2i_vs_t2i_mean_abs_diff"] > 1

    if big:
        # A larger canvas on the same tiny model, for the per-pixel cost of the pipeline machinery.
        update = {"height": big, "width": big, "img2img": False}
        large = DiffusersImageEngine(cfg.model_copy(update=update), device=device)
        large.setup()
        large.generate(prompts[:1], seeds[:1])
        large_images, timings[f"t2i_{big}px_batch{batch}"] = timed(large.generate, prompts, seeds, repeats=2)
        checks[f"t2i_{big}px_size"] = all(im.size == (big, big) for im in large_images)

    scorer = ClipScorer(ScoreConfig(**tiny_clip_score_fields(clip_path)), device=device)
    start = time.perf_counter()
    scorer.setup()
    timings["clip_setup"] = time.perf_counter() - start
    scorer.text_image(prompts[:1], init[:1])
    ti, timings[f"clip_text_image_batch{batch}"] = timed(scorer.text_image, prompts, init)
    refined_png = [png(im) for im in refined]
    ii, timings[f"clip_image_image_batch{batch}"] = timed(scorer.image_image, init, refined_png)
    same = scorer.image_image(init, init)
    checks["clip_text_image_finite_in_range"] = len(ti) == batch and all(math.isfinite(s) and -1 <= s <= 1 for s in ti)
    checks["clip_image_image_finite_in_range"] = all(math.isfinite(s) and -1 <= s <= 1 for s in ii)
    checks["clip_self_similarity_one"] = all(abs(s - 1.0) < 1e-4 for s in same)
    meas["clip_text_image"] = ti
    meas["clip_i1_i2"] = ii
    if device.startswith("cuda"):
        meas["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def main() -> int:
    """Parse arguments, run the check, write $OUT/gpu_check.json; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (cuda; 'cpu' for a dry run)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--big", type=int, default=None, help="also time this square size (default 512 on cuda, 0=off)")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="irgl-gpu-check-") as tmp:
            big = args.big if args.big is not None else (512 if args.device.startswith("cuda") else 0)
            report = run(args.device, args.batch, args.steps, big, Path(tmp))
        report["ok"] = all(report["checks"].values())
    except Exception as exc:  # the JSON must come back even when the check crashes
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    report["total_s"] = time.perf_counter() - started
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps({k: report.get(k) for k in ("ok", "checks", "timings_s", "error")}, indent=2))
    print(f"wrote {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
