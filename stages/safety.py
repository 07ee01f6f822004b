"""Image safety: every I1 and I2 gets the classifier's P(unsafe) (`safety_i1`, `safety_i2`); a trajectory with an
image at or above `ImageSafetyConfig.threshold` is filtered, with the score(s), threshold and engine in the reason.
An image that does not decode fails its row (retried by the next run); the other rows are still scored.
"""

from __future__ import annotations

import math
from typing import Any

from schemas.work import FILTERED, Batch
from stages.base import ModelStage, StageError

_NAMES = ("I1", "I2")


class SafetyStage(ModelStage):
    name = "safety"

    def make_engine(self) -> Any:
        from stages.engines import open_image_safety

        return open_image_safety(self.cfg)

    @property
    def model_name(self) -> str | None:
        from stages.engines.safety import safety_model_name

        return safety_model_name(self.cfg)

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        # One engine call per batch, I1 and I2 of each row side by side: the engine decodes and preprocesses them on
        # its threads while it scores the ones that are ready.
        images = [batch[column][i] for i in rows for column in ("i1", "i2")]
        scores = self.engine.score(images, labels=[*_NAMES] * len(rows))
        results: list[Any] = []
        for k in range(len(rows)):
            pair = scores[2 * k : 2 * k + 2]
            bad = [str(s) for s in pair if isinstance(s, Exception)]
            results.append(StageError("; ".join(bad)) if bad else tuple(float(s) for s in pair))
        return results

    def store(self, batch: Batch, i: int, result: Any) -> None:
        batch["safety_i1"][i], batch["safety_i2"][i] = result
        if not all(math.isfinite(s) for s in result):
            raise StageError(f"non-finite safety score: I1 {result[0]}, I2 {result[1]} ({self.cfg.engine})")
        threshold = self.cfg.threshold
        unsafe = [f"{name} P(unsafe)={s:.4f}" for name, s in zip(_NAMES, result, strict=True) if s >= threshold]
        if unsafe:
            raise StageError(
                f"unsafe image: {', '.join(unsafe)} >= safety threshold {threshold} ({self.cfg.engine})",
                status=FILTERED,
            )
