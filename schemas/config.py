"""Configuration models (pydantic) shared by the builder and the writers. Every field has a description."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base of every config model: unknown or mistyped fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardConfig(StrictModel):
    """How the six mode shards are written (Parquet and WebDataset)."""

    rows_per_group: int = Field(
        64, ge=1, description="Rows per Parquet row group; the official trainer shards work by row group."
    )
    max_rows_per_shard: int = Field(10_000, ge=1, description="Rotate to a new shard file after this many records.")
    max_bytes_per_shard: int = Field(
        512 * 1024 * 1024, ge=1024, description="Rotate to a new shard file once it reaches this many bytes."
    )
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        "zstd", description="Parquet column compression codec."
    )
    webdataset: bool = Field(True, description="Also write WebDataset tar shards under OUT/wds/<mode>/.")
    t1_loss_improving: bool = Field(
        False, description="T1 carries loss in modes 5 and 6 (the paper: false; T1 there is a condition)."
    )
