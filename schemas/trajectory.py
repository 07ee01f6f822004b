"""One trajectory: prompt -> T1 -> I1 -> T2 -> I2, with scores, verdict and provenance.

Trajectories are the source of truth of a build (`OUT/trajectories/`); the six mode records are derived from them
by the pure function `schemas.modes.mode_records`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.reflection import ReflectionError, parse_reflection, strip_think

STRATEGIES: tuple[str, str] = ("forward", "hindsight")
IMAGE_FORMATS: tuple[str, str] = ("png", "jpeg")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class TrajectoryError(ValueError):
    """A trajectory cannot become records. `field` names the offending field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def trajectory_id(normalized_prompt: str, source: str, seed: int, generation_hash: str) -> str:
    """Deterministic id: sha256 of (prompt, source, seed, generation config hash), 20 hex characters."""
    payload = json.dumps([normalized_prompt, source, seed, generation_hash], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def image_info(data: bytes) -> dict[str, Any]:
    """Format and size of encoded image bytes, read from the header (no full decode)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = {"PNG": "png", "JPEG": "jpeg"}.get(img.format or "")
        if fmt is None:
            raise ValueError(f"image is {img.format}, expected PNG or JPEG")
        return {"format": fmt, "width": img.width, "height": img.height}


@dataclass
class Trajectory:
    """A complete trajectory. Images are encoded PNG or JPEG bytes (see docs/IRGL_FORMAT.md, Images)."""

    id: str
    prompt: str
    source: str
    strategy: str
    t1: str
    i1: bytes
    t2: str
    i2: bytes
    scores: dict[str, float] = field(default_factory=dict)
    verdict: str = "accept"
    verdict_reason: str = ""
    models: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: The VLM judge's answer (schemas/judge.py); empty without a judge. The rule it was applied with, and the
    #: combined verdict, are in `verdict_reason`.
    judge: dict[str, Any] = field(default_factory=dict)
    #: The scorer's L2-normalised CLIP embedding of I2, float32 little-endian bytes (the near-duplicate pass over
    #: I2s reads it; no GPU needed to run that pass again). Empty when unknown.
    i2_embedding: bytes = b""

    def validate(self) -> None:
        """Raise TrajectoryError naming the field when this trajectory cannot yield valid records."""
        if not _ID_RE.match(self.id or ""):
            raise TrajectoryError(f"id {self.id!r} must be letters, digits, '_' or '-' only", "id")
        if not self.prompt or not self.prompt.strip():
            raise TrajectoryError("prompt is empty", "prompt")
        if self.strategy not in STRATEGIES:
            raise TrajectoryError(f"strategy {self.strategy!r} is not one of {STRATEGIES}", "strategy")
        for name in ("t1", "t2"):
            text = getattr(self, name)
            if not isinstance(text, str) or not text.strip():
                raise TrajectoryError(f"{name} is empty", name)
        try:
            strip_think(self.t1)
        except ReflectionError as exc:
            raise TrajectoryError(f"t1: {exc}", "t1") from exc
        try:
            parse_reflection(self.t2)
        except ReflectionError as exc:
            raise TrajectoryError(f"t2: {exc}", "t2") from exc
        for name in ("i1", "i2"):
            data = getattr(self, name)
            if not data:
                raise TrajectoryError(f"{name} holds no image bytes", name)
            try:
                image_info(data)
            except Exception as exc:  # PIL raises several types for bad bytes
                raise TrajectoryError(f"{name} is not a PNG/JPEG image ({exc})", name) from exc

    def to_row(self) -> dict[str, Any]:
        """The row of TRAJECTORY_SCHEMA. Dicts are stored as sorted-key JSON so rows are byte-stable."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "source": self.source,
            "strategy": self.strategy,
            "t1": self.t1,
            "i1": self.i1,
            "t2": self.t2,
            "i2": self.i2,
            "scores": json.dumps(self.scores, sort_keys=True),
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "models": json.dumps(self.models, sort_keys=True),
            "seeds": json.dumps(self.seeds, sort_keys=True),
            "timings": json.dumps(self.timings, sort_keys=True),
            "judge": json.dumps(self.judge, sort_keys=True),
            "i2_embedding": self.i2_embedding,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Trajectory:
        """Inverse of to_row."""
        return cls(
            id=row["id"],
            prompt=row["prompt"],
            source=row["source"],
            strategy=row["strategy"],
            t1=row["t1"],
            i1=row["i1"],
            t2=row["t2"],
            i2=row["i2"],
            scores=json.loads(row["scores"]),
            verdict=row["verdict"],
            verdict_reason=row["verdict_reason"],
            models=json.loads(row["models"]),
            seeds={k: int(v) for k, v in json.loads(row["seeds"]).items()},
            timings=json.loads(row["timings"]),
            judge=json.loads(row.get("judge") or "{}"),  # absent in trajectory files written before the judge
            i2_embedding=row.get("i2_embedding") or b"",
        )


#: Explicit schema of `OUT/trajectories/*.parquet` (never inferred from the first row).
TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("t1", pa.string(), nullable=False),
        pa.field("i1", pa.binary(), nullable=False),
        pa.field("t2", pa.string(), nullable=False),
        pa.field("i2", pa.binary(), nullable=False),
        pa.field("scores", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("verdict_reason", pa.string(), nullable=False),
        pa.field("models", pa.string(), nullable=False),
        pa.field("seeds", pa.string(), nullable=False),
        pa.field("timings", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("i2_embedding", pa.binary(), nullable=False),
    ]
)
