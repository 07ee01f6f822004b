"""A work unit's files under OUT and its marker: what a finished unit is, and how a rerun tells it is still valid.

A unit (`unit_size` prompts in source order) is finished when it has, each written through temp name + fsync +
rename, in this order:
- `trajectories/unit-NNNNN.parquet`: its kept trajectories in source order (the source of truth),
- `rejects/unit-NNNNN.jsonl`: one line per filtered or failed row (stage, reason, scores, timings),
- `state/units/unit-NNNNN.json`, the marker, last: ids, counts, failed ids, per-stage rejections, and the size,
  sha256 and time of both files. Its `shards` is null until the unit's six-mode shards are written
  (`write_shards`, pipeline/shards.py), then lists them.
A rerun trusts a marker only if its generation hash and ids match and its files are as recorded (`read_marker`);
a unit whose shards are missing or were written with another shard config gets them again (`shards_current`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BuildError
from pipeline.fsio import fsync_rename, sha256_file, write_atomic
from schemas.trajectory import TRAJECTORY_SCHEMA, Trajectory
from schemas.work import FAILED, OK
from stages.assemble import row_scores

#: OUT's folder of build state: the build's config (`build.json`), prompt report, unit markers, spool, logs, lock.
STATE_DIR = "state"


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}"


def reject_record(row: dict[str, Any]) -> dict[str, Any]:
    """The rejects/ line of a filtered or failed work row."""
    return {
        "id": row["id"], "status": row["status"], "stage": row["stage"], "reason": row["error"],
        "prompt": row["prompt"], "where": row["where"],
        "scores": row_scores(row),
        "judge": json.loads(row["judge"]) if row.get("judge") else None,
        "timings": json.loads(row["timings"] or "{}"),  # stage time spent on it counts in the report's cost
    }  # fmt: skip


#: Rows per row group of a unit's trajectory file: readers that want a few rows (the report's samples, the shard
#: writer) hold that many rows' images, not the unit's.
TRAJECTORY_ROWS_PER_GROUP = 16


def iter_unit_trajectories(out: Path, unit: int) -> Iterator[Trajectory]:
    """The kept trajectories of a finished unit, in its order, one row group at a time."""
    pf = pq.ParquetFile(out / "trajectories" / f"{unit_name(unit)}.parquet")
    for g in range(pf.num_row_groups):
        for row in pf.read_row_group(g).to_pylist():
            yield Trajectory.from_row(row)


def read_unit(out: Path, unit: int) -> tuple[dict[str, Trajectory], dict[str, dict[str, Any]]]:
    """The kept trajectories and the rejects of a finished unit, by id."""
    kept = {t.id: t for t in iter_unit_trajectories(out, unit)}
    lines = (out / "rejects" / f"{unit_name(unit)}.jsonl").read_text(encoding="utf-8").splitlines()
    rejects = {r["id"]: r for r in map(json.loads, lines)}
    return kept, rejects


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_ok(path: Path, bytes_: int, sha256: str, mtime_ns: int | None) -> bool:
    """Whether `path` still holds what a marker recorded. Same size and modification time: yes without reading it
    (a rerun stats files, it does not hash terabytes); other time (a copy that did not keep times): the sha256
    decides."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != bytes_:
        return False
    return st.st_mtime_ns == mtime_ns or sha256_file(path) == sha256


def write_unit(
    out: Path,
    unit: int,
    ids: list[str],
    kept: dict[str, Trajectory],
    rejects: dict[str, dict[str, Any]],
    gen_hash: str,
) -> dict[str, Any]:
    """Write one finished unit: trajectories and rejects in the unit's id order, then its marker (last).

    Each file goes through temp name + fsync + rename; the marker lists their size, sha256 and time, so a unit
    whose files changed after its marker (a crash between the two) is not trusted and is redone as a whole. The
    marker's `shards` is null until the unit's mode shards are written (`unit_shards_done`).
    """
    if set(kept) | set(rejects) != set(ids) or set(kept) & set(rejects):
        raise BuildError(f"unit {unit}: every id must be kept or rejected exactly once")
    name = unit_name(unit)
    traj_path = out / "trajectories" / f"{name}.parquet"
    rows = [kept[i].to_row() for i in ids if i in kept]
    traj_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = traj_path.with_name(f".tmp-{traj_path.name}")
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA), tmp, compression="zstd",
                   row_group_size=TRAJECTORY_ROWS_PER_GROUP)  # fmt: skip
    del rows
    fsync_rename(tmp, traj_path)
    reject_path = out / "rejects" / f"{name}.jsonl"
    lines = [json.dumps(rejects[i], ensure_ascii=False, sort_keys=True) for i in ids if i in rejects]
    write_atomic(reject_path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    statuses = [OK if i in kept else rejects[i]["status"] for i in ids]
    from schemas.reflection import is_cap_reason

    marker = {
        "unit": unit,
        "generation_hash": gen_hash,
        "ids": ids,
        "counts": dict(Counter(statuses)),
        "failed_ids": [i for i in ids if i in rejects and rejects[i]["status"] == FAILED],
        "rejected_at": dict(Counter(f"{r['stage']}:{r['status']}" for r in rejects.values())),
        # Failed rows whose text reached a section's cap (a subset of rejected_at's failures), per stage.
        "capped_at": dict(
            Counter(r["stage"] for r in rejects.values() if r["status"] == FAILED and is_cap_reason(r["reason"]))
        ),
        "files": {
            p.relative_to(out).as_posix(): {**_stat(p), "sha256": sha256_file(p)} for p in (traj_path, reject_path)
        },
        "shards": None,
    }
    write_marker(out, marker)
    return marker


def write_marker(out: Path, marker: dict[str, Any]) -> None:
    """Write (or replace) a unit's marker, atomically."""
    path = out / STATE_DIR / "units" / f"{unit_name(marker['unit'])}.json"
    write_atomic(path, json.dumps(marker, indent=1, sort_keys=True).encode())


def read_marker(out: Path, unit: int, gen_hash: str, ids: list[str]) -> dict[str, Any] | None:
    """A unit's marker if it is valid: same generation hash and ids, every listed file present as recorded."""
    path = out / STATE_DIR / "units" / f"{unit_name(unit)}.json"
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if marker.get("generation_hash") != gen_hash or marker.get("ids") != ids:
        return None
    for rel, meta in marker.get("files", {}).items():
        if not _file_ok(out / rel, meta["bytes"], meta["sha256"], meta.get("mtime_ns")):
            return None
    return marker


def shards_excluded(marker: dict[str, Any]) -> list[str]:
    """The ids a unit's current shards leave out (near-duplicate I2s); [] before any was."""
    return list((marker.get("shards") or {}).get("excluded") or [])


def shards_current(out: Path, marker: dict[str, Any], shard_hash: str) -> bool:
    """Whether the marker's unit has its shards, written with this shard config and unchanged since (which
    trajectories they leave out is the I2 near-duplicate pass's to check: `shards_excluded`)."""
    shards = marker.get("shards")
    if not shards or shards.get("config") != shard_hash:
        return False
    mtimes = shards.get("mtimes", {})
    return all(_file_ok(out / f["path"], f["bytes"], f["sha256"], mtimes.get(f["path"])) for f in shards["files"])


def write_shards(
    root: Path, unit: int, marker: dict[str, Any], shard_config: dict[str, Any], exclude: list[str] | None = None
) -> dict[str, Any]:
    """Write a unit's six modes' shards from its trajectory file, without the trajectories in `exclude` (the I2
    near-duplicates, pipeline/curation.py); record them and the exclusion in its marker (returned)."""
    from pipeline.shards import write_unit_shards
    from schemas.config import ShardConfig

    cpu = time.process_time()
    skip = set(exclude or ())
    trajectories = (t for t in iter_unit_trajectories(root, unit) if t.id not in skip)
    shards = write_unit_shards(root, unit, trajectories, ShardConfig(**shard_config))
    shards["excluded"] = sorted(skip)
    shards["mtimes"] = {f["path"]: (root / f["path"]).stat().st_mtime_ns for f in shards["files"]}
    shards["cpu_seconds"] = round(time.process_time() - cpu, 3)  # for bench/scale.py's accounting
    marker = {**marker, "shards": shards}
    write_marker(root, marker)
    return marker
