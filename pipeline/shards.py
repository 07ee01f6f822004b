"""Shard writers: Parquet and WebDataset per mode, written to temp names and renamed into place atomically.

`write_dataset` is the one entry point: trajectories in, `OUT/data/`, `OUT/wds/`, `OUT/README.md` and
`OUT/manifest.json` (last) out. The same trajectories and config give byte-identical files: no timestamps, fixed
tar headers, explicit schemas, sorted JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.card import write_card
from pipeline.fsio import fsync_rename, sha256_file, write_atomic
from schemas.config import ShardConfig
from schemas.modes import MODE_RECORD_SCHEMA, MODES, ModeOptions, ModeRecord, mode_records
from schemas.trajectory import Trajectory

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


@dataclass
class ShardFile:
    """One finished shard file, relative to OUT."""

    path: str
    rows: int


class _RotatingWriter:
    """Common rotation logic: temp shard files numbered from 0, renamed to final names on close.

    Final names need the total number of shards (`train-00000-of-00003`), known only at the end, hence the temp
    names while writing. Stale final-named files of an earlier write in the same directory are removed on close.
    """

    def __init__(self, directory: Path, config: ShardConfig) -> None:
        self.directory = directory
        self.config = config
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):  # left by an interrupted earlier write
            stale.unlink()
        self._temps: list[tuple[Path, int]] = []
        self._rows_in_shard = 0

    def _temp_path(self, index: int) -> Path:
        return self.directory / f".tmp-{index:05d}{self.suffix}"

    suffix = ""

    def _final_name(self, index: int, total: int) -> str:
        raise NotImplementedError

    def _should_rotate(self, bytes_in_shard: int) -> bool:
        return (
            self._rows_in_shard >= self.config.max_rows_per_shard or bytes_in_shard >= self.config.max_bytes_per_shard
        )

    def _finish(self) -> list[ShardFile]:
        total = len(self._temps)
        finals = [self.directory / self._final_name(i, total) for i in range(total)]
        keep = {p.name for p in finals}
        for old in self.directory.iterdir():
            if old.name not in keep and not old.name.startswith(".tmp-"):
                old.unlink()
        files = []
        for (tmp, rows), final in zip(self._temps, finals, strict=False):
            fsync_rename(tmp, final)
            files.append(ShardFile(path=final.name, rows=rows))
        return files


class ParquetShardWriter(_RotatingWriter):
    """Parquet shards of one mode with small row groups and an explicit schema."""

    suffix = ".parquet"

    def __init__(self, directory: Path, config: ShardConfig, schema: pa.Schema = MODE_RECORD_SCHEMA) -> None:
        super().__init__(directory, config)
        self.schema = schema
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._buffer: list[dict[str, Any]] = []

    def _final_name(self, index: int, total: int) -> str:
        return f"train-{index:05d}-of-{total:05d}.parquet"

    def _open(self) -> None:
        path = self._temp_path(len(self._temps))
        self._sink = pa.OSFile(str(path), "wb")
        compression = None if self.config.parquet_compression == "none" else self.config.parquet_compression
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=compression)
        self._temps.append((path, 0))
        self._rows_in_shard = 0

    def _flush_group(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._open()
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        assert self._writer is not None and self._sink is not None
        self._writer.write_table(table, row_group_size=self.config.rows_per_group)
        self._rows_in_shard += len(self._buffer)
        path, _ = self._temps[-1]
        self._temps[-1] = (path, self._rows_in_shard)
        self._buffer = []
        if self._should_rotate(self._sink.tell()):
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._sink is not None
            self._sink.close()
        self._writer = None
        self._sink = None

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        group = min(self.config.rows_per_group, self.config.max_rows_per_shard - self._rows_in_shard)
        if len(self._buffer) >= max(group, 1):
            self._flush_group()

    def close(self) -> list[ShardFile]:
        self._flush_group()
        self._close_file()
        return self._finish()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed header fields: the same sample gives the same bytes on any machine, at any time.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def wds_sample_json(record: ModeRecord) -> bytes:
    """The `<key>.json` member: the record's metadata and its conversation with image refs instead of base64."""
    turns = json.loads(record.conversation)
    names = iter(json.loads(record.images))
    for turn in turns:
        if turn["role"] == "assistant":
            for part in turn["content"]:
                if part["type"] == "image":
                    part["content"] = next(names)["name"]
    meta = record.to_row()
    meta["conversation"] = turns
    meta["images"] = json.loads(record.images)
    # No sort_keys: the conversation keeps its key order, so converting back gives the identical string.
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


class WebDatasetShardWriter(_RotatingWriter):
    """WebDataset tar shards of one mode: `<key>.json` plus `<key>.i1.png` / `<key>.i2.png` per sample."""

    suffix = ".tar"

    def __init__(self, directory: Path, mode: str, config: ShardConfig) -> None:
        super().__init__(directory, config)
        self.mode = mode
        self._tar: tarfile.TarFile | None = None
        self._fh: Any = None

    def _final_name(self, index: int, total: int) -> str:
        return f"{self.mode}-{index:06d}.tar"

    def write(self, record: ModeRecord) -> None:
        if self._tar is None:
            path = self._temp_path(len(self._temps))
            self._fh = open(path, "wb")
            self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
            self._temps.append((path, 0))
            self._rows_in_shard = 0
        _tar_member(self._tar, f"{record.id}.json", wds_sample_json(record))
        for name, data in record.image_bytes.items():
            _tar_member(self._tar, f"{record.id}.{name}", data)
        self._rows_in_shard += 1
        path, _ = self._temps[-1]
        self._temps[-1] = (path, self._rows_in_shard)
        if self._should_rotate(self._fh.tell()):
            self._close_file()

    def _close_file(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._fh.close()
        self._tar = None
        self._fh = None

    def close(self) -> list[ShardFile]:
        self._close_file()
        return self._finish()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine the shard bytes (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("irgl", "pyarrow", "pillow", "webdataset", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class WriteResult:
    counts: dict[str, int]
    files: list[dict[str, Any]]
    trajectories: int


def write_dataset(
    out: Path,
    trajectories: Iterable[Trajectory],
    shard_config: ShardConfig = ShardConfig(),
    *,
    build_config: dict[str, Any] | None = None,
    card_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> WriteResult:
    """Write the six mode shards, the dataset card and the manifest (last) for `trajectories`, in their order.

    `build_config` is hashed into the manifest; `card_info` (models, strategy, license) goes into the card;
    `extra` (deterministic build facts: prompt and stage counts) is stored in the manifest under "build".
    Trajectories that cannot yield valid records raise: they must have been filtered before this point.
    """
    out = Path(out)
    options = ModeOptions(t1_loss_improving=shard_config.t1_loss_improving)
    parquet = {m.name: ParquetShardWriter(out / "data" / m.name, shard_config) for m in MODES}
    wds = (
        {m.name: WebDatasetShardWriter(out / "wds" / m.name, m.name, shard_config) for m in MODES}
        if shard_config.webdataset
        else {}
    )
    counts = {m.name: 0 for m in MODES}
    n_traj = 0
    for traj in trajectories:
        n_traj += 1
        for record in mode_records(traj, options):
            parquet[record.mode].write(record.to_row())
            if wds:
                wds[record.mode].write(record)
            counts[record.mode] += 1

    files: list[dict[str, Any]] = []
    for m in MODES:
        for shard in parquet[m.name].close():
            files.append(
                {"path": f"data/{m.name}/{shard.path}", "mode": m.name, "format": "parquet", "rows": shard.rows}
            )
        if wds:
            for shard in wds[m.name].close():
                files.append(
                    {"path": f"wds/{m.name}/{shard.path}", "mode": m.name, "format": "webdataset", "rows": shard.rows}
                )
    card_path = write_card(out, counts, n_traj, shard_config, card_info or {})
    files.append({"path": card_path.name, "mode": None, "format": "card", "rows": None})
    for f in files:
        path = out / f["path"]
        f["bytes"] = path.stat().st_size
        f["sha256"] = sha256_file(path)

    manifest = {
        "format_version": FORMAT_VERSION,
        "trajectories": n_traj,
        "counts": counts,
        "files": files,
        "config_hash": config_hash(build_config or {}),
        "shards": shard_config.model_dump(),
        "package_versions": package_versions(),
        "build": extra or {},
    }
    write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return WriteResult(counts=counts, files=files, trajectories=n_traj)
