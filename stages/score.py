"""Scores and verdict: CLIP prompt-image similarity of I1 and I2, image-image similarity of I1/I2, and the rule
that keeps a trajectory only when I2 is good and really improves on I1 (thresholds in `ScoreConfig`).
"""

from __future__ import annotations

import math
from typing import Any

from schemas.config import ScoreConfig
from schemas.work import FILTERED, Batch
from stages.base import ModelStage, StageError
from stages.engines import open_scorer


def verdict(clip_i1: float, clip_i2: float, clip_i1_i2: float, cfg: ScoreConfig) -> tuple[bool, str]:
    """(accepted, reason). The reason always says which rule decided, with the numbers."""
    if not all(math.isfinite(x) for x in (clip_i1, clip_i2, clip_i1_i2)):
        return False, "non-finite score"
    if clip_i2 < cfg.min_clip_i2:
        return False, f"clip(I2)={clip_i2:.4f} < min_clip_i2={cfg.min_clip_i2}"
    gain = clip_i2 - clip_i1
    if gain < cfg.min_improvement:
        return False, f"clip(I2)-clip(I1)={gain:.4f} < min_improvement={cfg.min_improvement}"
    if clip_i1_i2 > cfg.max_i1_i2_similarity:
        return False, f"sim(I1,I2)={clip_i1_i2:.4f} > max_i1_i2_similarity={cfg.max_i1_i2_similarity}"
    return True, f"clip(I2)={clip_i2:.4f}, gain={gain:+.4f}, sim(I1,I2)={clip_i1_i2:.4f}"


class ScoreStage(ModelStage):
    name = "score"

    def make_engine(self) -> Any:
        return open_scorer(self.cfg)

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        # One engine call per batch: I1 and I2 decoded, preprocessed and embedded once each, the prompt once; an
        # image that does not decode comes back as that row's error and the other rows are still scored.
        prompts = [batch["prompt"][i] for i in rows]
        i1 = [batch["i1"][i] for i in rows]
        i2 = [batch["i2"][i] for i in rows]
        results = self.engine.score_pairs(prompts, i1, i2, names=("I1", "I2"), with_embedding=True)
        return [StageError(str(r)) if isinstance(r, Exception) else r for r in results]

    def store(self, batch: Batch, i: int, result: Any) -> None:
        c1, c2, c12 = (float(x) for x in result[:3])
        batch["clip_i1"][i], batch["clip_i2"][i], batch["clip_i1_i2"][i] = c1, c2, c12
        batch["i2_embedding"][i] = result[3]  # kept with the trajectory: the near-duplicate pass over I2s reads it
        accepted, reason = verdict(c1, c2, c12, self.cfg)
        batch["verdict"][i] = "accept" if accepted else "reject"
        batch["verdict_reason"][i] = reason
        if not accepted:
            raise StageError(f"verifier: {reason}", status=FILTERED)
