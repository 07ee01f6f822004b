"""Shard writers: the six modes' Parquet and WebDataset files of one work unit, and the dataset's manifest.

A build writes a unit's shards as soon as the unit is finished (`write_unit_shards`, in a writer process of the
build driver's machine); the tail of the build only lists them in the manifest and writes the card
(`finish_dataset`). So the work after the last GPU stage does not grow with the dataset, and a rerun rewrites
only what changed.

Layout (docs/IRGL_FORMAT.md): `data/<mode>/train-<unit:05d>-<part:03d>.parquet` and
`wds/<mode>/<mode>-<unit:05d>-<part:03d>.tar`. A unit's records go to part 000 until it reaches
`max_rows_per_shard` records or `max_bytes_per_shard` bytes, then to 001, and so on. Names carry no total, so
units can be written in any order and a dataset can grow.

Every file is written under a temp name, fsynced and renamed; the manifest (last) lists every file with its unit,
rows, bytes and sha256. The same trajectories and config give byte-identical files: no timestamps, fixed tar
headers, explicit schemas, sorted JSON.
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

from pipeline.card import MANIFEST_NAME, dataset_info, write_card
from pipeline.fsio import fsync_rename, sha256_file, write_atomic
from schemas.config import ShardConfig
from schemas.modes import MODE_RECORD_SCHEMA, MODES, ModeOptions, ModeRecord, mode_records
from schemas.trajectory import Trajectory

FORMAT_VERSION = 2  # 2: one set of files per work unit, listed with their unit


@dataclass
class ShardFile:
    """One finished shard file, relative to its mode directory."""

    path: str
    rows: int


class _RotatingWriter:
    """Parts `<stem>-000<suffix>`, `<stem>-001<suffix>`, ... of one unit and mode in one directory.

    Each part is written under a temp name and renamed to its final name when it is full or the writer closes.
    On close, files of the same stem that this write did not produce (an earlier write of the unit that had more
    parts) are removed.
    """

    suffix = ""

    def __init__(self, directory: Path, stem: str, config: ShardConfig) -> None:
        self.directory = directory
        self.stem = stem
        self.config = config
        directory.mkdir(parents=True, exist_ok=True)
        self._done: list[ShardFile] = []
        self._rows_in_part = 0

    @property
    def _part(self) -> int:
        return len(self._done)

    def _name(self, part: int) -> str:
        return f"{self.stem}-{part:03d}{self.suffix}"

    def _temp(self, part: int) -> Path:
        return self.directory / f".tmp-{self._name(part)}"

    def _full(self, nbytes: int) -> bool:
        return self._rows_in_part >= self.config.max_rows_per_shard or nbytes >= self.config.max_bytes_per_shard

    def _publish_part(self) -> None:
        """Rename the part just closed to its final name."""
        name = self._name(self._part)
        fsync_rename(self._temp(self._part), self.directory / name)
        self._done.append(ShardFile(name, self._rows_in_part))
        self._rows_in_part = 0

    def _remove_stale(self) -> None:
        keep = {f.path for f in self._done}
        for old in self.directory.glob(f"{self.stem}-*{self.suffix}"):
            if old.name not in keep:
                old.unlink()


class ParquetShardWriter(_RotatingWriter):
    """Parquet parts of one unit and mode, with small row groups and an explicit schema."""

    suffix = ".parquet"

    def __init__(self, directory: Path, stem: str, config: ShardConfig, schema: pa.Schema = MODE_RECORD_SCHEMA):
        super().__init__(directory, stem, config)
        self.schema = schema
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._buffer: list[dict[str, Any]] = []

    def _flush_group(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._sink = pa.OSFile(str(self._temp(self._part)), "wb")
            compression = None if self.config.parquet_compression == "none" else self.config.parquet_compression
            self._writer = pq.ParquetWriter(self._sink, self.schema, compression=compression)
        assert self._sink is not None
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema),
                                 row_group_size=self.config.rows_per_group)  # fmt: skip
        self._rows_in_part += len(self._buffer)
        self._buffer = []
        if self._full(self._sink.tell()):
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._sink is not None
            self._sink.close()
            self._writer = self._sink = None
            self._publish_part()

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        group = min(self.config.rows_per_group, self.config.max_rows_per_shard - self._rows_in_part)
        if len(self._buffer) >= max(group, 1):
            self._flush_group()

    def close(self) -> list[ShardFile]:
        self._flush_group()
        self._close_part()
        self._remove_stale()
        return self._done


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
    """WebDataset tar parts of one unit and mode: `<key>.json` plus `<key>.i1.png` / `<key>.i2.png` per sample."""

    suffix = ".tar"

    def __init__(self, directory: Path, stem: str, config: ShardConfig) -> None:
        super().__init__(directory, stem, config)
        self._tar: tarfile.TarFile | None = None
        self._fh: Any = None

    def write(self, record: ModeRecord) -> None:
        if self._tar is None:
            self._fh = open(self._temp(self._part), "wb")
            self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        _tar_member(self._tar, f"{record.id}.json", wds_sample_json(record))
        for name, data in record.image_bytes.items():
            _tar_member(self._tar, f"{record.id}.{name}", data)
        self._rows_in_part += 1
        if self._full(self._fh.tell()):
            self._close_part()

    def _close_part(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._fh.close()
            self._tar = self._fh = None
            self._publish_part()

    def close(self) -> list[ShardFile]:
        self._close_part()
        self._remove_stale()
        return self._done


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


def shard_stems(unit: int, mode: str) -> dict[str, str]:
    """File-name stems of a unit's shards of one mode, by format."""
    return {"parquet": f"train-{unit:05d}", "webdataset": f"{mode}-{unit:05d}"}


def write_unit_shards(out: Path, unit: int, trajectories: Iterable[Trajectory], config: ShardConfig) -> dict[str, Any]:
    """Write the six modes' shards of one unit (its kept trajectories, in the unit's order).

    Returns what the unit's marker and the manifest record: the shard config's hash, trajectory and per-mode
    record counts, and every file with mode, format, unit, rows, bytes and sha256. Holds one row group per mode.
    """
    out = Path(out)
    options = ModeOptions(t1_loss_improving=config.t1_loss_improving)
    parquet = {m.name: ParquetShardWriter(out / "data" / m.name, shard_stems(unit, m.name)["parquet"], config)
               for m in MODES}  # fmt: skip
    wds = (
        {
            m.name: WebDatasetShardWriter(out / "wds" / m.name, shard_stems(unit, m.name)["webdataset"], config)
            for m in MODES
        }  # fmt: skip
        if config.webdataset
        else {}
    )
    counts = {m.name: 0 for m in MODES}
    n = 0
    for traj in trajectories:
        n += 1
        for record in mode_records(traj, options):
            parquet[record.mode].write(record.to_row())
            if wds:
                wds[record.mode].write(record)
            counts[record.mode] += 1
    files = []
    for m in MODES:
        for fmt, top, writer in (("parquet", "data", parquet[m.name]), ("webdataset", "wds", wds.get(m.name))):
            if writer is None:
                continue
            for shard in writer.close():
                path = out / top / m.name / shard.path
                files.append({
                    "path": f"{top}/{m.name}/{shard.path}", "mode": m.name, "format": fmt, "unit": unit,
                    "rows": shard.rows, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                })  # fmt: skip
    if not config.webdataset:  # a unit written earlier with WebDataset on: its tars are no longer part of it
        for m in MODES:
            for old in (out / "wds" / m.name).glob(f"{shard_stems(unit, m.name)['webdataset']}-*.tar"):
                old.unlink()
    return {
        "unit": unit,
        "config": config_hash(config.model_dump()),
        "trajectories": n,
        "counts": counts,
        "files": files,
    }


@dataclass
class WriteResult:
    counts: dict[str, int]
    files: list[dict[str, Any]]
    trajectories: int


def _remove_unlisted(out: Path, listed: set[str]) -> None:
    """Delete shard files under data/ and wds/ that the manifest will not list (units no longer part of the build,
    files of the earlier global layout, temp files of killed writers). A directory listing, no reads."""
    for top in ("data", "wds"):
        root = out / top
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.is_file() and path.relative_to(out).as_posix() not in listed:
                path.unlink()


def finish_dataset(
    out: Path,
    units: list[dict[str, Any]],
    shard_config: ShardConfig,
    *,
    build_config: dict[str, Any] | None = None,
    card_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> WriteResult:
    """The tail: the card and the manifest (last) over units whose shards are written (`write_unit_shards`
    results, any order). Reads no shard: its cost grows with the number of files, not with their bytes.

    `build_config` is hashed into the manifest; `card_info` overrides facts of the card (keys of
    `pipeline.card.dataset_info`: name, license, models, strategy); `extra` (deterministic build facts: prompt and
    stage counts) is stored in the manifest under "build".
    """
    out = Path(out)
    units = sorted(units, key=lambda u: u["unit"])
    order = {(m.name, fmt): i for i, (m, fmt) in enumerate((m, f) for m in MODES for f in ("parquet", "webdataset"))}
    files = sorted(
        (f for u in units for f in u["files"]), key=lambda f: (order[f["mode"], f["format"]], f["unit"], f["path"])
    )
    _remove_unlisted(out, {f["path"] for f in files})
    counts = {m.name: sum(u["counts"].get(m.name, 0) for u in units) for m in MODES}
    manifest = {
        "format_version": FORMAT_VERSION,
        "trajectories": sum(u["trajectories"] for u in units),
        "counts": counts,
        "files": files,
        "config_hash": config_hash(build_config or {}),
        "shards": shard_config.model_dump(),
        "package_versions": package_versions(),
        "build": extra or {},
    }
    info = {**dataset_info(out, manifest), **(card_info or {})}
    card_path = write_card(out, info, include_wds=shard_config.webdataset)
    files.append({"path": card_path.name, "mode": None, "format": "card", "unit": None, "rows": None,
                  "bytes": card_path.stat().st_size, "sha256": sha256_file(card_path)})  # fmt: skip
    write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return WriteResult(counts=counts, files=files, trajectories=manifest["trajectories"])


def write_dataset(
    out: Path,
    trajectories: Iterable[Trajectory],
    shard_config: ShardConfig = ShardConfig(),
    *,
    unit_size: int | None = None,
    build_config: dict[str, Any] | None = None,
    card_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> WriteResult:
    """Trajectories in (in their order), a whole dataset out: units of `unit_size` trajectories (None: one unit),
    their shards, the card and the manifest. For synthetic data, tests and benchmarks; `irgl build` writes units
    as they finish instead."""
    out = Path(out)
    units: list[dict[str, Any]] = []
    chunk: list[Trajectory] = []
    for traj in trajectories:
        chunk.append(traj)
        if unit_size is not None and len(chunk) == unit_size:
            units.append(write_unit_shards(out, len(units), chunk, shard_config))
            chunk = []
    if chunk or not units:
        units.append(write_unit_shards(out, len(units), chunk, shard_config))
    return finish_dataset(out, units, shard_config, build_config=build_config, card_info=card_info, extra=extra)
