"""The verifier's rules in the score stage: `min_improvement` (I2 must beat I1 on prompt similarity) and
`max_i1_i2_similarity` (I1 and I2 must not be near-duplicates), with thresholds at their extremes and in between.

Real tiny open_clip (`clip_scorer`) on images drawn with PIL. The expected verdicts are computed here from the
scorer's own numbers (`score_pairs`, called directly) and the rule as the config documents it, not by the stage.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from schemas.config import ScoreConfig
from schemas.work import FILTERED, OK, WORK_COLUMNS, Batch, new_row
from stages.engines.clip import ClipScorer
from stages.score import ScoreStage


def picture(background: str, colour: str, shape: str, count: int) -> bytes:
    img = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(img)
    for k in range(count):
        box = (4 + 14 * k, 20, 16 + 14 * k, 32 + 4 * k)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


ONE_RED = picture("white", "red", "circle", 1)
THREE_RED = picture("white", "red", "circle", 3)
BLUE = picture("black", "blue", "square", 2)
GREEN = picture("grey", "green", "square", 4)
PURPLE = picture("yellow", "purple", "circle", 2)

#: (prompt, I1, I2): I2 better or worse than I1 by various margins, and one pair of identical images.
ROWS = [
    ("three red circles", ONE_RED, THREE_RED),
    ("two blue squares", GREEN, BLUE),
    ("four green squares", BLUE, GREEN),
    ("purple circles", PURPLE, PURPLE),
    ("three red circles", THREE_RED, ONE_RED),
]
IDENTICAL = 3


def make_batch() -> Batch:
    rows = []
    for k, (prompt, i1, i2) in enumerate(ROWS):
        row = new_row(id=f"v{k}", prompt=prompt, source="test", where=f"t:{k}", unit=0, seed=k, strategy="forward")
        row["i1"], row["i2"] = i1, i2
        rows.append(row)
    return {name: [r[name] for r in rows] for name in WORK_COLUMNS}


@pytest.fixture(scope="module")
def scores(clip_scorer: ClipScorer) -> list[tuple[float, float, float]]:
    """(clip(prompt, I1), clip(prompt, I2), sim(I1, I2)) per row, straight from the engine."""
    out = clip_scorer.score_pairs([p for p, _, _ in ROWS], [a for _, a, _ in ROWS], [b for _, _, b in ROWS])
    # The rows span both signs of the gain, and the identical pair is the only near-duplicate.
    gains = [c2 - c1 for c1, c2, _ in out]
    assert min(gains) < -0.005 and max(gains) > 0.005 and gains[IDENTICAL] == 0.0
    assert out[IDENTICAL][2] == pytest.approx(1.0, abs=1e-6)
    assert max(s for k, (_, _, s) in enumerate(out) if k != IDENTICAL) < 0.9995
    return out


def run(clip_scorer: ClipScorer, **rules: float) -> Batch:
    cfg = ScoreConfig(model=clip_scorer.cfg.model, pretrained=clip_scorer.cfg.pretrained, min_clip_i2=-1.0, **rules)
    return ScoreStage(cfg, engine=clip_scorer)(make_batch())


def check_rows(out: Batch, scores: list[tuple], accepted: list[bool], reason_of_rejected) -> None:
    """Verdicts and reasons as expected; the scores are stored on every row, kept or not."""
    for k, (keep, (c1, c2, c12)) in enumerate(zip(accepted, scores, strict=True)):
        assert (out["clip_i1"][k], out["clip_i2"][k], out["clip_i1_i2"][k]) == pytest.approx((c1, c2, c12), abs=1e-6)
        if keep:
            assert (out["status"][k], out["verdict"][k], out["error"][k]) == (OK, "accept", None), k
            want = f"clip(I2)={c2:.4f}, gain={c2 - c1:+.4f}, sim(I1,I2)={c12:.4f}"
            assert out["verdict_reason"][k] == want
        else:
            reason = reason_of_rejected(c1, c2, c12)
            assert (out["status"][k], out["stage"][k], out["verdict"][k]) == (FILTERED, "score", "reject"), k
            assert out["verdict_reason"][k] == reason
            assert out["error"][k] == f"verifier: {reason}"


@pytest.mark.parametrize("threshold", [-2.0, 0.0, 0.005, 2.0])
def test_min_improvement(clip_scorer: ClipScorer, scores: list[tuple], threshold: float) -> None:
    # -2: every gain passes (cosines lie in [-1, 1]); 2: none does; 0 and 0.005: exactly the rows whose I2 gains
    # at least that much on I1 (the identical pair gains 0: kept at 0, dropped at 0.005).
    out = run(clip_scorer, min_improvement=threshold, max_i1_i2_similarity=1.0)
    accepted = [c2 - c1 >= threshold for c1, c2, _ in scores]
    if threshold == -2.0:
        assert all(accepted)
    if threshold == 2.0:
        assert not any(accepted)
    if threshold in (0.0, 0.005):
        assert any(accepted) and not all(accepted)
    check_rows(
        out, scores, accepted, lambda c1, c2, _: f"clip(I2)-clip(I1)={c2 - c1:.4f} < min_improvement={threshold}"
    )


@pytest.mark.parametrize("threshold", [-1.0, 0.9995, 1.0])
def test_max_i1_i2_similarity(clip_scorer: ClipScorer, scores: list[tuple], threshold: float) -> None:
    # -1: every pair is "too similar"; 0.9995: only the identical pair; 1.0 (the default): none of these.
    out = run(clip_scorer, min_improvement=-2.0, max_i1_i2_similarity=threshold)
    accepted = [c12 <= threshold for _, _, c12 in scores]
    want = {-1.0: [False] * len(ROWS), 0.9995: [k != IDENTICAL for k in range(len(ROWS))], 1.0: [True] * len(ROWS)}
    assert accepted == want[threshold]
    check_rows(out, scores, accepted, lambda _, __, c12: f"sim(I1,I2)={c12:.4f} > max_i1_i2_similarity={threshold}")


def test_the_first_rule_that_fails_names_the_reason(clip_scorer: ClipScorer, scores: list[tuple]) -> None:
    # Both rules fail every row: the improvement rule is checked first and is the one recorded.
    out = run(clip_scorer, min_improvement=2.0, max_i1_i2_similarity=-1.0)
    assert all(r.startswith("clip(I2)-clip(I1)=") and "min_improvement=2.0" in r for r in out["verdict_reason"])
    assert out["status"] == [FILTERED] * len(ROWS)
