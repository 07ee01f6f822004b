"""Assembly: a finished work row becomes a `Trajectory`, checked against each of its six modes' rules.

A row that cannot yield valid records (e.g. an image that does not decode, a broken template) is filtered here
with the reason, so the shard writers only ever see trajectories that fit the contract. The check does not
encode the records (base64 images, JSON): the shard writers do that once, when the unit is written.
"""

from __future__ import annotations

import json
from typing import Any

from schemas.modes import ModeOptions, RecordError, check_trajectory
from schemas.trajectory import Trajectory, TrajectoryError
from schemas.work import FILTERED, Batch
from stages.base import Stage, StageError


def row_to_trajectory(row: dict[str, Any]) -> Trajectory:
    """Build the Trajectory of a finished work row (all stages ok)."""
    seed = int(row["seed"])
    return Trajectory(
        id=row["id"],
        prompt=row["prompt"],
        source=row["source"],
        strategy=row["strategy"],
        t1=row["t1"] or "",
        i1=row["i1"] or b"",
        t2=row["t2"] or "",
        i2=row["i2"] or b"",
        scores=row_scores(row),
        verdict=row["verdict"] or "",
        verdict_reason=row["verdict_reason"] or "",
        models=json.loads(row["models"] or "{}"),
        seeds={"trajectory": seed},
        timings=json.loads(row["timings"] or "{}"),
        judge=json.loads(row["judge"]) if row.get("judge") else {},
        i2_embedding=row.get("i2_embedding") or b"",
    )


#: The work columns that are scores of a trajectory (None until their stage ran; the safety scores only with the
#: safety stage on).
SCORE_COLUMNS: tuple[str, ...] = ("clip_i1", "clip_i2", "clip_i1_i2", "safety_i1", "safety_i2")


def row_scores(row: dict[str, Any]) -> dict[str, float]:
    """The scores a work row has so far (rejects/ records them too, for the rows filtered on the way)."""
    return {k: row[k] for k in SCORE_COLUMNS if row.get(k) is not None}


class AssembleStage(Stage):
    name = "assemble"

    def __init__(self, options: ModeOptions = ModeOptions(), fault_rate: float = 0.0) -> None:
        super().__init__(fault_rate)
        self.options = options

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        results = []
        for i in rows:
            row = {k: batch[k][i] for k in batch}
            try:
                check_trajectory(row_to_trajectory(row), self.options)
                results.append(None)
            except (TrajectoryError, RecordError) as exc:
                results.append(StageError(f"does not fit the record contract: {exc}", status=FILTERED))
        return results

    def store(self, batch: Batch, i: int, result: Any) -> None:
        """Nothing to add: the row already holds the trajectory."""
