"""The image engines on real (tiny) models: diffusers text-to-image and image-to-image, open_clip scoring.

No mocks: the tiny models are real SD / CLIP architectures built by `stages.tiny_image` and loaded through
`DiffusionPipeline.from_pretrained` and `open_clip.create_model_and_transforms`.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from schemas.config import ImageModelConfig, ScoreConfig
from schemas.local import DONE_MARKER
from stages.engines.clip import ClipScorer
from stages.engines.image import DiffusersImageEngine
from stages.tiny_image import build_tiny_clip, build_tiny_diffusion, tiny_clip_score_fields

PROMPTS = ["a red cube on a blue sphere", "two cats on a sofa", "a lighthouse at night"]
SEEDS = [11, 22, 33]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def t2i(image_engine: DiffusersImageEngine) -> list[Image.Image]:
    """One batched text-to-image call, shared by the tests below."""
    return image_engine.generate(PROMPTS, SEEDS)


# --- tiny models -------------------------------------------------------------------------------------------------


def test_tiny_models_build_deterministically_and_idempotently(
    tmp_path: Path, tiny_diffusion_path: Path, tiny_clip: dict[str, str]
) -> None:
    again_sd = build_tiny_diffusion(tmp_path)
    again_clip = build_tiny_clip(tmp_path)
    assert tree_digest(again_sd) == tree_digest(tiny_diffusion_path)
    assert tree_digest(again_clip) == tree_digest(Path(tiny_clip["model"].removeprefix("local-dir:")))
    # Idempotent: a second call finds the marker and leaves the folder untouched.
    mtime = (again_sd / DONE_MARKER).stat().st_mtime_ns
    assert build_tiny_diffusion(tmp_path) == again_sd
    assert (again_sd / DONE_MARKER).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-clip", "tiny-sd"]  # no temp dirs left behind


def test_tiny_diffusion_is_a_standard_sd_pipeline_folder(tiny_diffusion_path: Path) -> None:
    import json

    index = json.loads((tiny_diffusion_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_diffusion_path / part).is_dir()
    assert (tiny_diffusion_path / "tokenizer" / "vocab.json").is_file()
    assert (tiny_diffusion_path / "tokenizer" / "merges.txt").is_file()


def test_tiny_tokenizer_tokenizes_any_text_without_unknowns(image_engine: DiffusersImageEngine) -> None:
    tokenizer = image_engine._t2i.tokenizer
    ids = tokenizer("A photo of a red cube, zebra-striped! 42 ÄÖ").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.convert_ids_to_tokens(ids)[1:4] == ["a</w>", "photo</w>", "of</w>"]  # learned merges


# --- DiffusersImageEngine ----------------------------------------------------------------------------------------


def test_generate_returns_rgb_images_of_configured_size(
    image_engine: DiffusersImageEngine, t2i: list[Image.Image]
) -> None:
    assert image_engine.model_name == image_engine.cfg.model
    assert len(t2i) == len(PROMPTS)
    for img in t2i:
        assert img.mode == "RGB"
        assert img.size == (image_engine.cfg.width, image_engine.cfg.height)
        assert pixels(img).std() > 5  # a real picture, not a constant or NaN-black frame


def test_same_seed_same_pixels_different_seed_different_pixels(
    image_engine: DiffusersImageEngine, t2i: list[Image.Image]
) -> None:
    again = image_engine.generate(PROMPTS, SEEDS)
    for a, b in zip(t2i, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    other = image_engine.generate(PROMPTS, [s + 1000 for s in SEEDS])
    for a, b in zip(t2i, other, strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() > 5


def test_image_depends_on_prompt_and_seed_not_on_batch_neighbours(
    image_engine: DiffusersImageEngine, t2i: list[Image.Image]
) -> None:
    # Reordered batch: each row keeps its own generator, so the same prompt+seed gives the same picture. Batched
    # float32 kernels may round differently with another batch layout, so allow a 1-2 level difference in uint8.
    rev = image_engine.generate(PROMPTS[::-1], SEEDS[::-1])[::-1]
    alone = image_engine.generate(PROMPTS[:1], SEEDS[:1])
    for a, b in [*zip(t2i, rev, strict=True), (t2i[0], alone[0])]:
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    # The prompt reaches the image through cross-attention: same seed, other prompt -> other pixels.
    swapped = image_engine.generate(["a completely different prompt"], SEEDS[:1])
    assert not np.array_equal(pixels(swapped[0]), pixels(t2i[0]))


def test_img2img_refines_init_images(image_engine: DiffusersImageEngine, t2i: list[Image.Image]) -> None:
    init = [png(img) for img in t2i]
    refined = image_engine.generate(PROMPTS, SEEDS, init_images=init)
    assert len(refined) == len(PROMPTS)
    for before, after in zip(t2i, refined, strict=True):
        assert after.mode == "RGB" and after.size == before.size
        assert np.abs(pixels(after) - pixels(before)).mean() > 1  # it changed the image
    # Deterministic, and an init image of another size is resized to the configured one.
    assert np.array_equal(pixels(refined[0]), pixels(image_engine.generate(PROMPTS[:1], SEEDS[:1], init[:1])[0]))
    odd = png(t2i[0].resize((100, 72)))
    assert image_engine.generate(PROMPTS[:1], SEEDS[:1], [odd])[0].size == t2i[0].size


def test_generate_validates_its_inputs(image_engine: DiffusersImageEngine) -> None:
    assert image_engine.generate([], []) == []
    with pytest.raises(ValueError, match="seeds"):
        image_engine.generate(PROMPTS, SEEDS[:1])
    with pytest.raises(ValueError, match="init images"):
        image_engine.generate(PROMPTS, SEEDS, init_images=[b""])


def test_img2img_disabled_or_without_steps(tiny_image_model_config: ImageModelConfig, t2i: list[Image.Image]) -> None:
    # No denoising step (floor(steps x strength) = 0): the config refuses it before any engine exists.
    with pytest.raises(ValidationError, match="no denoising step"):
        ImageModelConfig(**{**tiny_image_model_config.model_dump(), "steps": 1, "strength": 0.5})
    # img2img off: a set-up engine draws from prompts, and refuses init images instead of ignoring them.
    engine = DiffusersImageEngine(tiny_image_model_config.model_copy(update={"img2img": False}), device="cpu")
    engine.setup()
    assert engine.generate(PROMPTS[:1], SEEDS[:1])[0].size == t2i[0].size
    with pytest.raises(RuntimeError, match="init_images given but img2img is disabled"):
        engine.generate(PROMPTS[:1], SEEDS[:1], init_images=[png(t2i[0])])


# --- ClipScorer --------------------------------------------------------------------------------------------------


def test_text_image_scores_are_a_batch_of_cosines(clip_scorer: ClipScorer, t2i: list[Image.Image]) -> None:
    images = [png(img) for img in t2i]
    scores = clip_scorer.text_image(PROMPTS, images)
    assert len(scores) == len(PROMPTS)
    assert all(isinstance(s, float) and math.isfinite(s) and -1.0 <= s <= 1.0 for s in scores)
    # Batched and one-by-one scoring agree, and JPEG input works too.
    one = [clip_scorer.text_image([p], [i])[0] for p, i in zip(PROMPTS, images, strict=True)]
    assert scores == pytest.approx(one, abs=1e-5)
    buf = io.BytesIO()
    t2i[0].save(buf, format="JPEG", quality=95)
    assert math.isfinite(clip_scorer.text_image(PROMPTS[:1], [buf.getvalue()])[0])
    assert clip_scorer.text_image([], []) == []


def test_image_image_is_one_for_identical_images(clip_scorer: ClipScorer, t2i: list[Image.Image]) -> None:
    images = [png(img) for img in t2i]
    same = clip_scorer.image_image(images, images)
    assert same == pytest.approx([1.0] * len(images), abs=1e-5)
    cross = clip_scorer.image_image(images, images[1:] + images[:1])
    assert all(math.isfinite(s) and -1.0 <= s < 1.0 - 1e-6 for s in cross)
    with pytest.raises(ValueError):
        clip_scorer.image_image(images, images[:1])


def test_scorer_model_name_and_config_checks(tiny_clip: dict[str, str]) -> None:
    assert ClipScorer(ScoreConfig(**tiny_clip)).model_name == tiny_clip["model"]
    assert ClipScorer(ScoreConfig()).model_name == "ViT-L-14/openai"
    with pytest.raises(ValueError, match="pretrained"):
        ClipScorer(ScoreConfig(model="ViT-B-32", pretrained="")).setup()
    assert tiny_clip_score_fields(Path("x"))["model"].startswith("local-dir:")
