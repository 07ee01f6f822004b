"""Landing finished rows: from the stage stream to finished units on disk, while the stages go on.

The driver takes the executor's stream of finished rows (rows of any units, in any order) and puts each batch into
the `Spool` (OUT/state/spool/, scratch): it holds one batch at a time, never a whole unit's images. When a unit's
last row has arrived, `UnitWriters` hands it to a writer process, which runs `land_unit`: read the unit back from
the spool, write its trajectories, rejects and marker (pipeline/units.py), then its six-mode shards, then the
marker again. `reshard_unit` writes a finished unit's shards again from its trajectories (files lost or changed,
another `shards:` config) without running any stage.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BuildError
from pipeline.secrets import redact_obj
from pipeline.units import STATE_DIR, read_unit, reject_record, unit_name, write_shards, write_unit
from schemas.work import OK, WORK_SCHEMA
from stages.assemble import row_to_trajectory


class Spool:
    """Finished rows on their way to a complete unit, on disk under OUT/state/spool/: the driver holds one batch
    of the stage stream at a time, never a whole unit's images, however many units are open (with
    `preserve_order: false` rows of many units arrive interleaved). The unit writer reads the unit back
    (`take_spool`). Scratch: emptied when a build starts; a killed build's open units are redone."""

    def __init__(self, root: Path) -> None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        self.root = root
        self.ids: dict[int, set[str]] = defaultdict(set)  # unit -> ids arrived
        self.parts: dict[int, int] = defaultdict(int)  # unit -> spool files written

    @property
    def open_units(self) -> int:
        return len(self.ids)

    def add(self, table: pa.Table, expected: dict[int, int]) -> list[int]:
        """Spool a batch; return the units it completed (forgotten here: their rows are the writer's now)."""
        import pyarrow.compute as pc

        done = []
        units = table.column("unit")
        present = sorted(set(units.to_pylist()))
        for unit in present:
            # Zero-copy when the batch is one unit (the usual case: the last stage takes whole units).
            part = table if len(present) == 1 else table.filter(pc.equal(units, unit))
            seen = self.ids[unit]
            for rid in part.column("id").to_pylist():
                if rid in seen:
                    raise BuildError(f"row {rid} came out of the stages twice")
                seen.add(rid)
            path = self.root / unit_name(unit) / f"{self.parts[unit]:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path, compression="none")  # scratch: no fsync, no compression
            self.parts[unit] += 1
            if len(seen) == expected[unit]:
                done.append(unit)
                del self.ids[unit], self.parts[unit]
        return done


def take_spool(root: Path, unit: int) -> dict[str, dict[str, Any]]:
    """A complete unit's spooled rows by id; its spool files are removed."""
    import shutil

    folder = root / STATE_DIR / "spool" / unit_name(unit)
    rows = {r["id"]: r for r in pq.read_table(folder, schema=WORK_SCHEMA).to_pylist()}
    shutil.rmtree(folder)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Unit writers


def land_unit(
    out: str, unit: int, ids: list[str], gen_hash: str, secrets: list[str], retry: bool, shard_config: dict[str, Any]
) -> dict[str, Any]:
    """A unit whose rows all came out of the stages (spooled): its trajectories, rejects and marker, then its
    shards and the marker again. Runs in a unit-writer process (or the driver with `shard_writers: 0`).

    With `retry` only the unit's failed rows ran again: they are merged into its earlier trajectories and rejects.
    Returns the final marker and the stage-seconds of the rows that ran.
    """
    cpu = time.process_time()
    root = Path(out)
    rows = take_spool(root, unit)
    kept, rejects = read_unit(root, unit) if retry else ({}, {})
    seconds: Counter = Counter()
    for rid, r in rows.items():
        rejects.pop(rid, None)  # a retried row replaces its earlier failure
        if r["status"] == OK:
            kept[rid] = row_to_trajectory(r)
        else:
            rejects[rid] = redact_obj(reject_record(r), secrets)  # error texts may quote a secret
        for stage, sec in json.loads(r["timings"] or "{}").items():
            seconds[stage] += sec
    del rows
    marker = write_unit(root, unit, ids, kept, rejects, gen_hash)  # source order: deterministic files
    del kept, rejects
    marker["cpu_seconds"] = round(time.process_time() - cpu, 3)  # the unit files' share (bench/scale.py)
    return {"marker": write_shards(root, unit, marker, shard_config), "stage_seconds": dict(seconds)}


def reshard_unit(out: str, unit: int, shard_config: dict[str, Any], exclude: list[str] | None = None) -> dict[str, Any]:
    """A finished unit's shards written again from its trajectories (missing, changed, another shard config, other
    I2 near-duplicates to leave out: `exclude`)."""
    root = Path(out)
    marker = json.loads((root / STATE_DIR / "units" / f"{unit_name(unit)}.json").read_text())
    return {"marker": write_shards(root, unit, marker, shard_config, exclude), "stage_seconds": {}}


class UnitWriters:
    """Lands finished units (`land_unit`) and rewrites stale shards (`reshard_unit`) in `jobs` processes of this
    machine while the stages go on (0: in this process, at once). `submit(fn, unit, *args)` queues a job;
    `done(wait)` yields (unit, result) as jobs finish. A job that fails raises here: a unit without a marker is
    redone by the next run, one with a marker but no shards gets them written."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: Any = None
        self.pending: dict[Any, int] = {}  # future -> unit
        self.ready: list[tuple[int, dict[str, Any]]] = []  # in-process results not yet handed out

    def submit(self, fn: Any, unit: int, *args: Any) -> None:
        if self.jobs == 0:
            self.ready.append((unit, fn(*args)))
            return
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the driver holds threads (Ray, vLLM in the local executor) that fork would copy half-way.
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        self.pending[self.pool.submit(fn, *args)] = unit

    def done(self, wait: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_for

        while self.ready:
            yield self.ready.pop(0)
        while self.pending:
            finished, _ = wait_for(list(self.pending), timeout=None if wait else 0, return_when=FIRST_COMPLETED)
            if not finished:
                return
            for future in sorted(finished, key=lambda f: self.pending[f]):
                unit = self.pending.pop(future)
                try:
                    yield unit, future.result()
                except Exception as exc:
                    raise BuildError(
                        f"writing unit {unit} failed: {type(exc).__name__}: {exc}; finished units are kept, rerun "
                        "the same command to finish it"
                    ) from exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
