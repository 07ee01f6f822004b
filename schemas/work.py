"""The work row: the columns every generation stage reads and writes while a trajectory is being built.

Stages exchange columnar batches (`dict[str, list]`) with exactly these columns; the pipeline converts them to
and from Arrow with this explicit schema (never inferred: a batch where every T2 is still null must not become a
column of type null).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

#: Per-row outcome. `failed` rows are retried by the next run; `filtered` rows are final.
OK, FILTERED, FAILED = "ok", "filtered", "failed"

WORK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("source", pa.string()),
        pa.field("where", pa.string()),  # file:line of the prompt, for messages
        pa.field("unit", pa.int64()),  # resumable work unit this row belongs to
        pa.field("seed", pa.int64()),
        pa.field("strategy", pa.string()),
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),  # the stage that filtered or failed the row
        pa.field("error", pa.string()),  # the reason
        pa.field("t1", pa.string()),
        pa.field("i1", pa.binary()),
        pa.field("t2", pa.string()),
        pa.field("final_prompt", pa.string()),
        pa.field("i2", pa.binary()),
        pa.field("clip_i1", pa.float64()),
        pa.field("clip_i2", pa.float64()),
        pa.field("clip_i1_i2", pa.float64()),
        pa.field("i2_embedding", pa.binary()),  # the scorer's normalised CLIP embedding of I2 (float32 bytes)
        pa.field("verdict", pa.string()),
        pa.field("verdict_reason", pa.string()),
        pa.field("safety_i1", pa.float64()),  # the image safety classifier's P(unsafe) of I1, I2
        pa.field("safety_i2", pa.float64()),
        pa.field("judge", pa.string()),  # JSON of the VLM judge's answer (schemas/judge.py), when a judge runs
        pa.field("models", pa.string()),  # JSON {stage: model}
        pa.field("timings", pa.string()),  # JSON {stage: seconds spent on this row}
    ]
)
WORK_COLUMNS: tuple[str, ...] = tuple(WORK_SCHEMA.names)

Batch = dict[str, list[Any]]


def new_row(*, id: str, prompt: str, source: str, where: str, unit: int, seed: int, strategy: str) -> dict[str, Any]:
    """A fresh work row: every column present, status ok."""
    row: dict[str, Any] = {name: None for name in WORK_COLUMNS}
    row.update(
        id=id, prompt=prompt, source=source, where=where, unit=unit, seed=seed, strategy=strategy, status=OK,
        models="{}", timings="{}",
    )  # fmt: skip
    return row


def stage_seed(seed: int, stage: str) -> int:
    """A per-stage seed derived from the trajectory seed (stable across runs and machines)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def json_update(text: str | None, key: str, value: Any) -> str:
    data = json.loads(text) if text else {}
    data[key] = value
    return json.dumps(data, sort_keys=True)
