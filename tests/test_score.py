"""The score stage and its open_clip scorer: the parallel, decode-once path against a plain open_clip reference,
per-row failure isolation, precision, and the config knobs' effect on the generation hash.

Real tiny CLIP (`tiny_clip` fixture, built offline), real PIL images; the reference is computed one image at a
time straight through open_clip, without any irgl code.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stages.engines.clip as clip_module
from schemas.config import BuildConfig, ConfigError, ScoreConfig, load_build_config
from schemas.local import decode_rgb
from schemas.work import FAILED, OK, WORK_COLUMNS, Batch, new_row
from stages.engines.clip import (
    ClipScorer,
    ImageDecodeError,
    default_threads,
    resolve_dtype,
    split_preprocess,
    to_array,
)
from stages.score import ScoreStage

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 11  # more than two model batches of 4 images, and not a multiple of them


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth random colour blobs plus fine noise: images whose CLIP embeddings differ from row to row."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert(mode)


def row_images(k: int) -> tuple[bytes, bytes]:
    """I1 and I2 of row k, in the formats and shapes a build meets: PNG and JPEG, square and not, grey, RGBA."""
    shapes = [(64, 64), (96, 64), (48, 80), (128, 128)]
    i1 = picture(k, shapes[k % 4], mode=["RGB", "L", "RGBA"][k % 3])
    i2 = picture(1000 + k, shapes[(k + 1) % 4])
    return encode(i1, "PNG"), encode(i2, "JPEG", quality=95)


def make_batch(n: int = N_ROWS) -> Batch:
    rows = []
    for k in range(n):
        row = new_row(
            id=f"row{k:02d}", prompt=f"{k + 1} red cubes on a blue table, photo {k}", source="test", where=f"t:{k}",
            unit=0, seed=k, strategy="forward",
        )  # fmt: skip
        row["i1"], row["i2"] = row_images(k)
        rows.append(row)
    return {name: [r[name] for r in rows] for name in WORK_COLUMNS}


def reference_scores(model_id: str, prompts: list[str], i1: list[bytes], i2: list[bytes]) -> list[tuple]:
    """CLIP(prompt, I1), CLIP(prompt, I2), CLIP(I1, I2) the plain way: open_clip's own model, transform and
    tokenizer, float32, one image and one prompt per call."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(model_id, device="cpu", precision="fp32")
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_id)

    def image(data: bytes) -> torch.Tensor:
        pixels = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        return model.encode_image(pixels, normalize=True)[0]

    out = []
    with torch.no_grad():
        for prompt, a, b in zip(prompts, i1, i2, strict=True):
            text = model.encode_text(tokenizer([prompt]), normalize=True)[0]
            ea, eb = image(a), image(b)
            out.append((float(text @ ea), float(text @ eb), float(ea @ eb)))
    return out


@pytest.fixture(scope="module")
def reference(tiny_clip: dict[str, str]) -> list[tuple]:
    batch = make_batch()
    return reference_scores(tiny_clip["model"], batch["prompt"], batch["i1"], batch["i2"])


@pytest.fixture(scope="module")
def scorer(tiny_clip: dict[str, str]) -> ClipScorer:
    """Small model batches (4 images) and 3 preprocessing threads, so that chunking and the pool are exercised."""
    engine = ClipScorer(ScoreConfig(**tiny_clip), device="cpu", batch_size=4, threads=3)
    engine.setup()
    yield engine
    engine.close()


def scores_of(batch: Batch) -> np.ndarray:
    return np.array([batch["clip_i1"], batch["clip_i2"], batch["clip_i1_i2"]], dtype=float).T


# --- the fast path gives the reference's numbers -----------------------------------------------------------------


def test_stage_scores_equal_plain_open_clip(
    scorer: ClipScorer, tiny_clip: dict[str, str], reference: list[tuple]
) -> None:
    cfg = ScoreConfig(**tiny_clip, min_clip_i2=-1.0, min_improvement=-2.0)
    batch = make_batch()
    out = ScoreStage(cfg, engine=scorer)(batch)
    assert out["id"] == [f"row{k:02d}" for k in range(N_ROWS)]  # same rows, same order
    assert out["status"] == [OK] * N_ROWS, out["error"]
    assert scorer.dtype == "float32"  # 'auto' on CPU
    got = scores_of(out)
    want = np.array(reference)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    # The rows really differ from one another, so a mix-up of rows could not pass the tolerance above.
    assert np.abs(want[1:] - want[:-1]).max(axis=1).min() > 1e-3
    assert all(v == "accept" for v in out["verdict"])


def test_engine_api_agrees_with_score_pairs(scorer: ClipScorer, reference: list[tuple]) -> None:
    batch = make_batch()
    want = np.array(reference)
    assert np.abs(np.array(scorer.score_pairs(batch["prompt"], batch["i1"], batch["i2"])) - want).max() <= 1e-5
    assert np.abs(np.array(scorer.text_image(batch["prompt"], batch["i2"])) - want[:, 1]).max() <= 1e-5
    assert np.abs(np.array(scorer.image_image(batch["i1"], batch["i2"])) - want[:, 2]).max() <= 1e-5
    assert scorer.score_pairs([], [], []) == []
    with pytest.raises(ValueError, match="prompts"):
        scorer.score_pairs(batch["prompt"], batch["i1"], batch["i2"][:-1])


def test_each_image_decoded_once_on_the_pool(scorer: ClipScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real decoder, wrapped to record which thread ran it and on what."""
    seen: list[tuple[bytes, str]] = []
    real = clip_module.decode_rgb

    def recording(data: bytes) -> Image.Image:
        seen.append((data, threading.current_thread().name))
        return real(data)

    monkeypatch.setattr(clip_module, "decode_rgb", recording)
    batch = make_batch()
    ScoreStage(ScoreConfig(model=scorer.cfg.model, pretrained=""), engine=scorer)(batch)
    decoded = sorted(data for data, _ in seen)
    assert decoded == sorted(batch["i1"] + batch["i2"])  # every image exactly once (the old path: twice)
    assert {name.rsplit("_", 1)[0] for _, name in seen} == {"clip-preprocess"}  # off the caller's thread


def test_pool_pixels_equal_open_clip_transform_bit_for_bit(scorer: ClipScorer) -> None:
    """The pool threads do ToTensor + Normalize in numpy (no torch threads per image): the same bits."""
    import open_clip
    import torch
    from torchvision import transforms

    images = [
        encode(picture(k, size), "JPEG", quality=95) for k, size in enumerate([(300, 200), (224, 224), (97, 131)])
    ]
    for preprocess in (scorer._preprocess, open_clip.image_transform(224, is_train=False)):  # tiny, ViT-L-14's
        split = split_preprocess(preprocess)
        assert split is not None
        for data in images:
            want = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
            got = torch.from_numpy(to_array(split[0](decode_rgb(data)), split[1], split[2]))
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    for data in images:
        assert torch.equal(torch.as_tensor(scorer._pixels(("x", data))), scorer._preprocess(decode_rgb(data)))
    # A transform of another shape is not split: the scorer then runs it whole on the pool threads.
    odd = transforms.Compose([*scorer._preprocess.transforms, transforms.Lambda(lambda t: t * 2)])
    assert split_preprocess(odd) is None
    assert split_preprocess(lambda img: img) is None


# --- failures stay on their row ------------------------------------------------------------------------------------


def test_corrupt_image_fails_only_its_row(
    scorer: ClipScorer, tiny_clip: dict[str, str], reference: list[tuple]
) -> None:
    cfg = ScoreConfig(**tiny_clip, min_clip_i2=-1.0, min_improvement=-2.0)
    batch = make_batch()
    batch["i2"][2] = b"not an image at all"
    batch["i1"][5] = batch["i1"][5][: len(batch["i1"][5]) // 2]  # a truncated PNG
    batch["i1"][7] = batch["i2"][7] = b""  # both bad: the row names the first
    batch["status"][9], batch["stage"][9], batch["error"][9] = FAILED, "reflect", "upstream"  # not ours to touch
    out = ScoreStage(cfg, engine=scorer)(batch)
    bad = {2: "I2", 5: "I1", 7: "I1"}
    for k in range(N_ROWS):
        if k in bad:
            assert out["status"][k] == FAILED and out["stage"][k] == "score"
            assert out["error"][k].startswith(f"{bad[k]}: cannot decode image of "), out["error"][k]
            assert " at 0x" not in out["error"][k]  # no memory address: the same reason on every run
            assert out["clip_i2"][k] is None
        elif k == 9:
            assert (out["status"][k], out["stage"][k], out["error"][k]) == (FAILED, "reflect", "upstream")
            assert out["clip_i2"][k] is None
        else:
            assert out["status"][k] == OK
            got = (out["clip_i1"][k], out["clip_i2"][k], out["clip_i1_i2"][k])
            assert got == pytest.approx(reference[k], abs=1e-5)
    # The engine itself isolates the bad rows in one call (the stage's one-row-at-a-time retry is not needed).
    direct = scorer.score_pairs(batch["prompt"], batch["i1"], batch["i2"])
    for k, result in enumerate(direct):
        if k in bad:
            assert isinstance(result, ImageDecodeError) and str(result).startswith(f"{bad[k]}: cannot decode")
        else:
            assert result == pytest.approx(reference[k], abs=1e-5)
    with pytest.raises(ImageDecodeError, match="image 1: cannot decode"):
        scorer.text_image(["a", "b"], [batch["i1"][0], b"junk"])


# --- precision ---------------------------------------------------------------------------------------------------


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize(("dtype", "tol"), [("float16", 3e-3), ("bfloat16", 2e-2)])
def test_half_precision_on_cpu_is_close_to_float32(
    tiny_clip: dict[str, str], reference: list[tuple], dtype: str, tol: float
) -> None:
    """The half-precision code path (weights cast, LayerNorm in float32, float32 normalisation) runs on CPU too."""
    engine = ClipScorer(ScoreConfig(**tiny_clip, dtype=dtype), device="cpu", batch_size=4, threads=2)
    engine.setup()
    batch = make_batch()
    got = np.array(engine.score_pairs(batch["prompt"], batch["i1"], batch["i2"]))
    engine.close()
    assert engine.dtype == dtype
    assert str(engine._model.visual.conv1.weight.dtype) == f"torch.{dtype}"
    diff = np.abs(got - np.array(reference)).max()
    assert 0 < diff <= tol, diff  # > 0: it really ran in half precision
    same = engine.image_image(batch["i1"][:3], batch["i1"][:3])
    assert same == pytest.approx([1.0] * 3, abs=1e-6)  # float32 normalisation: exactly unit vectors


# --- config --------------------------------------------------------------------------------------------------------


def tiny_config(**score: object) -> BuildConfig:
    return load_build_config(ROOT / "configs" / "tiny.yaml", {f"score.model.{k}": v for k, v in score.items()})


def test_threads_do_not_change_the_generation_hash_but_dtype_does() -> None:
    base = tiny_config()
    threaded = tiny_config(preprocess_threads=7)
    assert threaded.score.model.preprocess_threads == 7
    assert threaded.generation_hash() == base.generation_hash()
    assert "preprocess_threads" not in threaded.model_dump()["score"]["model"]
    assert tiny_config(dtype="float32").generation_hash() != base.generation_hash()
    assert ClipScorer(threaded.score.model).threads == 7
    assert ClipScorer(threaded.score.model, threads=2).threads == 2
    with pytest.raises(ConfigError, match="score.model.preprocess_threads"):
        tiny_config(preprocess_threads=0)
    with pytest.raises(ConfigError, match="score.model.dtype"):
        tiny_config(dtype="float64")


def test_default_threads_follow_the_actor_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # what Ray sets for an actor with num_cpus=6
    assert default_threads() == 6
    assert ClipScorer(ScoreConfig()).threads == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "500")
    assert default_threads() == 32
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_threads() <= 32


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [("auto", 3e-3), ("bfloat16", 2e-2)])
def test_half_precision_on_cuda_is_close_to_float32(
    tiny_clip: dict[str, str], reference: list[tuple], dtype: str, tol: float
) -> None:
    engine = ClipScorer(ScoreConfig(**tiny_clip, dtype=dtype), device="cuda", batch_size=4)
    engine.setup()
    assert engine.dtype == ("float16" if dtype == "auto" else dtype)
    batch = make_batch()
    batch["i2"][3] = b"junk"
    out = ScoreStage(ScoreConfig(**tiny_clip, min_clip_i2=-1.0, min_improvement=-2.0), engine=engine)(batch)
    assert out["status"] == [OK] * 3 + [FAILED] + [OK] * (N_ROWS - 4)
    keep = [k for k in range(N_ROWS) if k != 3]
    got = scores_of(out)[keep]
    diff = np.abs(got - np.array(reference)[keep]).max()
    assert math.isfinite(diff) and diff <= tol, diff
    same = engine.image_image(batch["i1"][:3], batch["i1"][:3])
    assert same == pytest.approx([1.0] * 3, abs=1e-5)
    engine.close()
