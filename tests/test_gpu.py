"""CUDA checks of the image and scoring engines (bf16 diffusion; scoring in the scorer's default half
precision). Skipped without a GPU; on a GPU node they run with the rest of the suite. `bench/gpu_check.py` is the
standalone version with timings."""

from __future__ import annotations

import io
import math

import pytest

from schemas.config import ImageModelConfig, ScoreConfig
from stages.engines.clip import ClipScorer
from stages.engines.image import DiffusersImageEngine

pytestmark = pytest.mark.gpu


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _max_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_image_engine_on_cuda_bf16(tiny_image_model_config: ImageModelConfig) -> None:
    cfg = tiny_image_model_config.model_copy(update={"dtype": "bfloat16"})
    engine = DiffusersImageEngine(cfg, device="cuda")
    engine.setup()
    prompts = ["a red apple", "a blue chair", "a red apple"]
    images = engine.generate(prompts, [1, 2, 1])
    assert [im.size for im in images] == [(cfg.width, cfg.height)] * 3
    assert all(im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    # Same prompt and seed: the same image, up to bf16 rounding that differs between batch sizes.
    assert images[0].tobytes() == images[2].tobytes() or _max_diff(images[0], images[2]) <= 8
    again = engine.generate(prompts[:1], [1])
    assert _max_diff(again[0], images[0]) <= 8
    refined = engine.generate(prompts[:2], [1, 2], init_images=[_png(im) for im in images[:2]])
    assert [im.size for im in refined] == [(cfg.width, cfg.height)] * 2


def test_clip_scorer_on_cuda(tiny_clip: dict[str, str], image_engine: DiffusersImageEngine) -> None:
    scorer = ClipScorer(ScoreConfig(**tiny_clip), device="cuda")
    scorer.setup()
    images = [_png(im) for im in image_engine.generate(["a red apple", "a blue chair"], [1, 2])]
    scores = scorer.text_image(["a red apple", "a blue chair"], images)
    assert len(scores) == 2 and all(math.isfinite(s) and -1.0 <= s <= 1.0 for s in scores)
    same = scorer.image_image(images, images)
    assert all(abs(s - 1.0) < 1e-3 for s in same)
