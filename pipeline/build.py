"""`irgl build`: prompts -> trajectories on Ray Data -> six-mode shards, manifest, card.

The job, in order:
1. Load and validate the config, read the prompts (bad lines counted with `file:line` reasons) - all before any
   model loads.
2. Give each prompt a deterministic id and seed, and a work unit (`unit_size` prompts in source order).
3. Skip units that a previous run finished (a valid marker under `OUT/state/units/`).
4. Stream the remaining rows through the stages (Ray Data actor pools for model stages, or a plain loop).
5. As each unit completes, write its trajectories (`OUT/trajectories/`), its rejects (`OUT/rejects/`), then its
   marker - each through temp name + fsync + rename.
6. Derive the six-mode shards, card and manifest from all units' trajectories (pure function: same
   trajectories, same bytes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fsio import fsync_rename, sha256_file, write_atomic
from pipeline.logs import redirect_worker_output
from pipeline.secrets import redact_env, redact_obj, secret_values
from pipeline.shards import config_hash, finish_dataset
from schemas.config import BuildConfig
from schemas.modes import ModeOptions
from schemas.stages import STAGE_NAMES, model_id, model_label, model_stages, stage_config, stage_order
from schemas.trajectory import TRAJECTORY_SCHEMA, Trajectory, trajectory_id
from schemas.work import FAILED, FILTERED, OK, WORK_COLUMNS, WORK_SCHEMA, Batch, new_row
from stages.assemble import AssembleStage, row_to_trajectory
from stages.base import Stage
from stages.draw import DrawStage
from stages.engines.errors import EngineDead
from stages.prompts import Prompt, PromptReport, load_sources
from stages.reflect import ReflectStage
from stages.score import ScoreStage
from stages.think import ThinkStage

log = logging.getLogger("irgl.build")

STATE_DIR = "state"
BUILD_STATE = "build.json"


class BuildError(RuntimeError):
    """The build cannot start or continue; the message names the file, field or directory."""


# ---------------------------------------------------------------------------------------------------------------
# Stage graph


@dataclass(frozen=True)
class StageSpec:
    """One step of the graph: how to construct the stage, and its Ray resources."""

    name: str
    cls: type[Stage]
    kwargs: dict[str, Any]
    resources: Any = None  # schemas.config.ResourceConfig for model stages; None: one light CPU actor
    log_dir: str | None = None  # where the stage's actors write their output (pipeline/logs.py); None: the console

    def make(self) -> Stage:
        return self.cls(**self.kwargs)


def _stage_classes(cfg: BuildConfig) -> dict[str, tuple[type[Stage], dict[str, Any]]]:
    """Stage name -> its class and the constructor arguments besides model and fault rate. The registry
    (schemas/stages.py) owns the names, order and config sections; schemas cannot import stage classes, so this
    mapping lives here."""
    s = cfg.strategy
    return {
        "think": (ThinkStage, {"strategy": s}),
        "draw_initial": (DrawStage, {"role": "initial", "strategy": s, "encoding": cfg.images}),
        "reflect": (ReflectStage, {"strategy": s}),
        "draw_refined": (DrawStage, {"role": "refined", "strategy": s, "encoding": cfg.images}),
        "score": (ScoreStage, {}),
        "assemble": (AssembleStage, {"options": ModeOptions(cfg.shards.t1_loss_improving)}),
    }


def stage_graph(cfg: BuildConfig) -> list[StageSpec]:
    """The stages in execution order for the configured strategy (with the config's fault injection, if any)."""
    classes = _stage_classes(cfg)
    if set(classes) != set(STAGE_NAMES):  # a stage added to the registry but not here, or the reverse
        raise RuntimeError(f"pipeline/build.py maps stages {sorted(classes)} but the registry has {STAGE_NAMES}")
    specs = []
    for info in stage_order(cfg.strategy):
        cls, kwargs = classes[info.name]
        kwargs = {"fault_rate": cfg.fault_injection.get(info.name, 0.0), **kwargs}
        section = stage_config(cfg, info.name)
        if section is None:  # no model: one light CPU actor
            specs.append(StageSpec(info.name, cls, kwargs))
        else:
            specs.append(StageSpec(info.name, cls, {"model": section.model, **kwargs}, section.resources))
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Rows and units


def make_rows(cfg: BuildConfig, prompts: list[Prompt], first: int = 0) -> list[dict[str, Any]]:
    """One work row per prompt: deterministic id (prompt, source, global seed, generation hash) and seed. `first`:
    the index of `prompts[0]` among all prompts (its unit follows from it)."""
    gen = cfg.generation_hash()
    rows = []
    for index, p in enumerate(prompts, start=first):
        tid = trajectory_id(p.text, p.source, cfg.seed, gen)
        rows.append(
            new_row(
                id=tid,
                prompt=p.text,
                source=p.source,
                where=p.where,
                unit=index // cfg.unit_size,
                seed=int(tid[:8], 16),
                strategy=cfg.strategy,
            )  # fmt: skip
        )
    return rows


def rows_to_batch(rows: list[dict[str, Any]]) -> Batch:
    return {name: [r[name] for r in rows] for name in WORK_COLUMNS}


def batch_to_rows(batch: Batch) -> list[dict[str, Any]]:
    n = len(batch["id"])
    return [{name: batch[name][i] for name in WORK_COLUMNS} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Executors: a plain loop (tests, benchmark baseline) and Ray Data (the product)


def run_sequential(
    specs: list[StageSpec], rows: list[dict[str, Any]], stages: list[Stage] | None = None
) -> Iterator[pa.Table]:
    """All stages in this process, one after the other. Yields each unit's finished rows as a table, in order.

    Batches are formed as on Ray Data: each unit on its own, cut into chunks of each stage's `batch_size`, so both
    executors hand every engine the same batches (batch composition can change float results in the last bit).
    `stages` may pass already set-up stage objects (e.g. sharing engines); by default they are built from specs.
    """
    if stages is None:
        stages = [spec.make() for spec in specs]
        for stage in stages:
            stage.setup()
    units: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        units[r["unit"]].append(r)
    for unit in sorted(units):
        unit_rows = units[unit]
        for spec, stage in zip(specs, stages, strict=True):
            size = spec.resources.batch_size if spec.resources is not None else len(unit_rows)
            out_rows: list[dict[str, Any]] = []
            for start in range(0, len(unit_rows), size):
                chunk = unit_rows[start : start + size]
                batch = stage(rows_to_batch(chunk))
                if len(batch["id"]) != len(chunk):
                    raise RuntimeError(f"stage {stage.name} changed the batch length")
                out_rows.extend(batch_to_rows(batch))
            unit_rows = out_rows
        yield pa.Table.from_pylist(unit_rows, schema=WORK_SCHEMA)


class _StageActor:
    """Ray Data adapter: builds the stage once per actor and maps Arrow batches through it (1:1 checked).

    A fatal engine error (`EngineDead`: vLLM's engine core died, a CUDA error) ends the actor's process: Ray
    restarts the actor (`ray.max_actor_restarts`) and retries its in-flight batches (`ray.max_task_retries`) on
    the new one. Raising instead would hand Ray Data an ordinary task error; marking the rows failed would leave a
    dead actor that answers every later batch with failures in no time, and so gets sent ever more of them.
    """

    def __init__(self, spec: StageSpec) -> None:
        redirect_worker_output(spec.log_dir, spec.name)  # before the engine loads: its logs go to the file
        self.stage = spec.make()
        self.stage.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        try:
            batch = self.stage(table.to_pydict())
        except EngineDead as exc:
            _end_process(self.stage.name, exc)
        return _checked(self.stage.name, batch, table.num_rows)


class _ConcurrentStageActor(_StageActor):
    """For stages that keep several batches in flight on one engine (`Stage.concurrent`: text stages on vLLM).

    Ray Data runs an async `__call__` on one event loop per actor and, with `max_concurrent_calls_per_actor`, hands
    the actor several batches at once; the semaphore holds the number in flight to `resources.concurrent_batches`,
    so at most `concurrent_batches x batch_size` requests wait in the engine.
    """

    def __init__(self, spec: StageSpec) -> None:
        super().__init__(spec)
        self.limit = spec.resources.concurrent_batches
        self.slots: Any = None  # an asyncio.Semaphore, made on the event loop that will use it

    async def __call__(self, table: pa.Table) -> pa.Table:  # type: ignore[override]
        import asyncio

        if self.slots is None:
            self.slots = asyncio.Semaphore(self.limit)
        async with self.slots:
            try:
                batch = await self.stage.acall(table.to_pydict())
            except EngineDead as exc:
                _end_process(self.stage.name, exc)
        return _checked(self.stage.name, batch, table.num_rows)


def _open_tasks(cfg: BuildConfig, res: Any) -> int:
    """Ray Data tasks a text actor runs at once so that `concurrent_batches` batches can be open.

    A task is one unit (one block); Ray Data runs up to a fixed number of an async UDF's batches of one task at a
    time (4 in Ray 2.60), so a unit of many batches fills several slots by itself. Fewer tasks means fewer units'
    rows (and images) held by the actor at once.
    """
    try:
        from ray.data._internal.planner.plan_udf_map_op import DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY as per_task
    except ImportError:  # a Ray version that moved it: the value 2.60 uses
        per_task = 4
    batches_per_unit = -(-cfg.unit_size // res.batch_size)
    return -(-res.concurrent_batches // min(per_task, batches_per_unit))


def _checked(stage: str, batch: Batch, n: int) -> pa.Table:
    if len(batch["id"]) != n:
        raise RuntimeError(f"stage {stage} returned {len(batch['id'])} rows for {n}")
    return pa.Table.from_pydict(batch, schema=WORK_SCHEMA)


def _end_process(stage: str, exc: BaseException) -> NoReturn:
    """End this actor's process after a fatal engine error, taking the engine's child processes with it (a vLLM
    engine core or its tensor-parallel workers must not outlive the actor and hold its GPUs)."""
    import sys

    import psutil

    print(f"irgl: stage {stage}: fatal engine error, ending this actor so that Ray restarts it: {exc}",
          file=sys.stderr, flush=True)  # fmt: skip
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(EXIT_ENGINE_DEAD)


#: Exit status of an actor process that ended itself because its engine died.
EXIT_ENGINE_DEAD = 75


#: Environment variables handed to Ray workers when set on the driver (offline mode, vLLM CPU settings).
_WORKER_ENV = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", "IRGL_TINY_DIR", "TOKENIZERS_PARALLELISM",
    "HF_TOKEN",  # gated models (e.g. FLUX.1-dev) on cluster workers; held in memory by Ray, never written by irgl
)  # fmt: skip


def running_ray_address() -> str | None:
    """The Ray instance that `ray.init()` without an address would join: $RAY_ADDRESS, else the instance that
    `ray start` recorded on this machine (`ray_current_cluster` in Ray's temp dir). None: it would start one."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # Ray's own lookup, so we agree with it
    except ImportError:
        return os.environ.get("RAY_ADDRESS") or None
    try:
        return canonicalize_bootstrap_address(None)
    except Exception:  # e.g. RAY_ADDRESS=auto with nothing running: ray.init will say so
        return os.environ.get("RAY_ADDRESS") or None


def worker_env(cfg: BuildConfig) -> dict[str, str]:
    """The environment of the stage workers: `ray.env_vars`, overridden by the driver's own values of `_WORKER_ENV`."""
    return {**cfg.ray.env_vars, **{k: os.environ[k] for k in _WORKER_ENV if k in os.environ}}


def init_ray(cfg: BuildConfig, address: str | None = None) -> None:
    """Connect to Ray; reuse a session this process already holds.

    - `--address` / `ray.address` given: join that cluster ("auto": the one running on this machine).
    - `--address local`: start a private local instance with `ray.num_cpus`, even if another one runs here.
    - neither: do what `ray.init()` does - join the instance `ray start` (or $RAY_ADDRESS) points at, so that two
      Ray instances never both hand out this machine's GPUs; start a private one if there is none.

    Joining, the instance's own resources apply: Ray refuses num_cpus/num_gpus then, so they are not passed.
    """
    import ray

    if ray.is_initialized():
        return
    env = worker_env(cfg)
    requested = address or cfg.ray.address
    found = None if requested else running_ray_address()
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "runtime_env": {"env_vars": env} if env else None,
        "log_to_driver": True,
    }
    if requested == "local" or (requested is None and found is None):
        where = "a private local Ray instance"
        kwargs.update(address="local", num_cpus=cfg.ray.num_cpus)
    elif requested:
        where = f"the Ray cluster at {requested}"
        kwargs.update(address=requested)
    else:
        where = f"the Ray instance running on this machine at {found}"
        # address=None, not `found`: Ray then also picks up that instance's auth token, as `ray.init()` would.
        kwargs.update(address=None)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "; `ray stop` it if it is stale" if found else ""
        raise BuildError(
            f"cannot connect to {where}: {first}{hint}; or pass --address local to start a private instance"
        ) from exc
    if found:
        log.warning(
            "joined %s (its resources apply; ray.num_cpus=%s is not used); --address local starts a private one",
            where, cfg.ray.num_cpus,
        )  # fmt: skip
    else:
        log.info("Ray: %s, %s", where, ray.cluster_resources())


def run_ray(cfg: BuildConfig, specs: list[StageSpec], rows: list[dict[str, Any]]) -> Iterator[pa.Table]:
    """Stream rows through the stages on Ray Data. Model stages are fixed-size actor pools (engines start once per
    actor); cheap stages run in one light actor. Yields batches of finished rows as they arrive (rows of any
    units, in any order)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.enable_progress_bars = True
    env = worker_env(cfg)
    tables = [
        pa.Table.from_pylist(rows[i : i + cfg.unit_size], schema=WORK_SCHEMA)
        for i in range(0, len(rows), cfg.unit_size)
    ]
    ds = ray.data.from_arrow(tables)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries yet (its default is to retry forever),
        # so they go through **ray_remote_args, which it flags as deprecated on every call.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = _stage_pipeline(cfg, specs, ds, env)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _stage_pipeline(cfg: BuildConfig, specs: list[StageSpec], ds: Any, env: dict[str, str]) -> Any:
    """The stages as a chain of Ray Data `map_batches` (lazy: nothing runs until the dataset is iterated)."""
    import ray.data

    for spec in specs:
        # One subclass per stage so that Ray's process titles and dashboard name the stage (ray::..StageActor_think).
        concurrent = spec.cls.concurrent and spec.resources is not None
        actor = type(f"StageActor_{spec.name}", (_ConcurrentStageActor if concurrent else _StageActor,), {})
        res = spec.resources
        open_tasks = _open_tasks(cfg, res) if concurrent else None
        if res is None:
            ds = ds.map_batches(
                actor, fn_constructor_args=(spec,), batch_format="pyarrow", zero_copy_batch=False,
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=cfg.unit_size,
            )  # fmt: skip
            continue
        ds = ds.map_batches(
            actor,
            fn_constructor_args=(spec,),
            batch_format="pyarrow",
            zero_copy_batch=False,
            batch_size=res.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=res.replicas,
                # Text stages: several batches per actor at once (continuous batching); others one at a time.
                max_tasks_in_flight_per_actor=open_tasks,
                max_concurrent_calls_per_actor=open_tasks,
            ),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            # A killed actor (or one that ended itself on a dead engine) is restarted and its in-flight batches
            # are retried on it; bounded, so that a row that kills the engine every time stops the build.
            max_restarts=cfg.ray.max_actor_restarts,
            max_task_retries=cfg.ray.max_task_retries,
            # Also when this process joined a Ray that was started without them (another job, a test session).
            runtime_env={"env_vars": env} if env else None,
        )
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Unit outputs


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}"


def reject_record(row: dict[str, Any]) -> dict[str, Any]:
    """The rejects/ line of a filtered or failed work row."""
    return {
        "id": row["id"], "status": row["status"], "stage": row["stage"], "reason": row["error"],
        "prompt": row["prompt"], "where": row["where"],
        "scores": {k: row[k] for k in ("clip_i1", "clip_i2", "clip_i1_i2")},
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
    _write_marker(out, marker)
    return marker


def _write_marker(out: Path, marker: dict[str, Any]) -> None:
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


def shards_current(out: Path, marker: dict[str, Any], shard_hash: str) -> bool:
    """Whether the marker's unit has its shards, written with this shard config and unchanged since."""
    shards = marker.get("shards")
    if not shards or shards.get("config") != shard_hash:
        return False
    mtimes = shards.get("mtimes", {})
    return all(_file_ok(out / f["path"], f["bytes"], f["sha256"], mtimes.get(f["path"])) for f in shards["files"])


def _write_shards(root: Path, unit: int, marker: dict[str, Any], shard_config: dict[str, Any]) -> dict[str, Any]:
    """Write a unit's six modes' shards from its trajectory file; record them in its marker (returned)."""
    from pipeline.shards import write_unit_shards
    from schemas.config import ShardConfig

    cpu = time.process_time()
    shards = write_unit_shards(root, unit, iter_unit_trajectories(root, unit), ShardConfig(**shard_config))
    shards["mtimes"] = {f["path"]: (root / f["path"]).stat().st_mtime_ns for f in shards["files"]}
    shards["cpu_seconds"] = round(time.process_time() - cpu, 3)  # for bench/scale.py's accounting
    marker = {**marker, "shards": shards}
    _write_marker(root, marker)
    return marker


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
    return {"marker": _write_shards(root, unit, marker, shard_config), "stage_seconds": dict(seconds)}


def reshard_unit(out: str, unit: int, shard_config: dict[str, Any]) -> dict[str, Any]:
    """A finished unit's shards written again from its trajectories (missing, changed, another shard config)."""
    root = Path(out)
    marker = json.loads((root / STATE_DIR / "units" / f"{unit_name(unit)}.json").read_text())
    return {"marker": _write_shards(root, unit, marker, shard_config), "stage_seconds": {}}


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


# ---------------------------------------------------------------------------------------------------------------
# The build


@dataclass
class BuildResult:
    out: Path
    prompts: PromptReport
    stage_counts: dict[str, dict[str, int]]
    mode_counts: dict[str, int]
    trajectories: int
    units_run: int
    units_skipped: int
    wall_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def check_out_dir(out: Path, cfg: BuildConfig, force: bool) -> None:
    """Refuse an OUT that holds a different build (other generation hash) unless forced; with --force, drop the
    earlier build's units so that none of its trajectories or rejects can mix with the new ones."""
    state = out / STATE_DIR / BUILD_STATE
    foreign = False
    if state.is_file():
        try:
            previous = json.loads(state.read_text()).get("generation_hash")
        except json.JSONDecodeError:
            previous = None
        foreign = previous != cfg.generation_hash()
        if foreign and not force:
            raise BuildError(
                f"{out}: holds a build with a different generation config (hash {previous} != "
                f"{cfg.generation_hash()}); use a new --out directory or --force to rebuild it"
            )
    elif (out / "manifest.json").exists() or (out / "data").exists():
        foreign = True
        if not force:
            raise BuildError(f"{out}: holds a dataset that irgl build did not start; use a new --out or --force")
    if foreign:
        import shutil

        for sub in ("trajectories", "rejects", f"{STATE_DIR}/units"):
            shutil.rmtree(out / sub, ignore_errors=True)


def stage_counts(markers: Iterable[dict[str, Any]], order: list[str]) -> dict[str, dict[str, int]]:
    """Per stage, over the given unit markers: rows in, ok, filtered, failed (in = ok + filtered + failed), and
    capped: the failed rows whose text reached a section's cap (`schemas.reflection.cap_reason`)."""
    total = 0
    rejected: Counter = Counter()  # "stage:status" -> rows
    capped: Counter = Counter()  # stage -> failed rows with a section at its cap
    for marker in markers:
        total += len(marker["ids"])
        rejected.update(marker["rejected_at"])
        capped.update(marker.get("capped_at", {}))  # absent in markers written before the count existed
    counts = {}
    entering = total
    for name in order:
        filtered, failed = rejected[f"{name}:{FILTERED}"], rejected[f"{name}:{FAILED}"]
        counts[name] = {
            "in": entering, "ok": entering - filtered - failed, "filtered": filtered, "failed": failed,
            "capped": capped[name],
        }  # fmt: skip
        entering -= filtered + failed
    return counts


def build(
    cfg: BuildConfig,
    out: Path,
    *,
    prompts_path: str | None = None,
    limit: int | None = None,
    executor: str = "ray",
    address: str | None = None,
    force: bool = False,
    progress: Any = None,
    stages: list[Stage] | None = None,
    log_dir: Path | str | None = None,
    graph: list[StageSpec] | None = None,
) -> BuildResult:
    """Run the whole build. `executor` is "ray" (the product) or "local" (plain loop, same stage objects).

    `progress(unit, marker)` is called as each unit is finished (its shards written); if it has a
    `start(units_to_run)` method, that is called once before the stages start (pipeline.logs.UnitProgress prints
    k/N, elapsed and ETA). `log_dir`: the stage actors write their stdout/stderr (engine logs) there instead of to
    Ray's console stream (pipeline/logs.py).

    `stages` (local executor only) passes set-up stage objects in graph order, e.g. to reuse loaded engines
    across builds in one process. `graph` replaces the configured stage graph (same names and order), e.g. by
    engine-free stages for a benchmark of everything around the engines (bench/scale.py).

    OUT is held for the whole build (pipeline/lock.py): a second build or publish on it fails at once.
    """
    from pipeline.lock import OutLocked, hold_out

    started = time.perf_counter()
    out = Path(out)
    prompts, report = load_sources(cfg.prompts, prompts_path, limit)
    try:
        with hold_out(out, "irgl build"):
            return _build(cfg, out, prompts, report, executor, address, force, progress, stages, log_dir, graph,
                          started)  # fmt: skip
    except OutLocked as exc:
        raise BuildError(str(exc)) from None


def _build(
    cfg: BuildConfig,
    out: Path,
    prompts: list[Prompt],
    report: PromptReport,
    executor: str,
    address: str | None,
    force: bool,
    progress: Any,
    stages: list[Stage] | None,
    log_dir: Path | str | None,
    graph: list[StageSpec] | None,
    started: float,
) -> BuildResult:
    check_out_dir(out, cfg, force)
    gen_hash = cfg.generation_hash()
    out.mkdir(parents=True, exist_ok=True)
    secrets = secret_values(cfg.ray.env_vars)
    dump = cfg.model_dump(mode="json")
    dump["ray"]["env_vars"] = redact_env(cfg.ray.env_vars)
    state = {"generation_hash": gen_hash, "config": redact_obj(dump, secrets)}
    write_atomic(out / STATE_DIR / BUILD_STATE, json.dumps(state, indent=1, sort_keys=True).encode())
    write_atomic(out / STATE_DIR / "prompts.json", json.dumps({**report.as_dict(), "problems": report.problems[:1000]},
                                                               indent=1, ensure_ascii=False).encode())  # fmt: skip
    # Rows are made unit by unit; only the ids of each unit stay (the marker check and the files' order need them).
    unit_ids: dict[int, list[str]] = {}
    markers: dict[int, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    expected: dict[int, int] = {}  # rows of each unit sent through the stages in this run
    for unit, start in enumerate(range(0, len(prompts), cfg.unit_size)):
        unit_rows = make_rows(cfg, prompts[start : start + cfg.unit_size], first=start)
        unit_ids[unit] = [r["id"] for r in unit_rows]
        marker = read_marker(out, unit, gen_hash, unit_ids[unit])
        if marker is None:
            todo.extend(unit_rows)  # new, or interrupted before its marker: redo the whole unit
            expected[unit] = len(unit_rows)
            continue
        markers[unit] = marker
        retry = set(marker.get("failed_ids", []))  # failed rows are retried; filtered rows are final
        if retry:
            todo.extend(r for r in unit_rows if r["id"] in retry)
            expected[unit] = len(retry)
    skipped = len(markers) - sum(1 for u in expected if u in markers)
    log.info(
        "%d prompts in %d units: %d units done, %d to run, %d failed rows to retry",
        sum(map(len, unit_ids.values())), len(unit_ids), skipped, len(expected),
        sum(len(m.get("failed_ids", [])) for m in markers.values()),
    )  # fmt: skip

    specs = stage_graph(cfg)
    if graph is not None:
        if [s.name for s in graph] != [s.name for s in specs]:
            raise BuildError(f"graph= must have the stages {[s.name for s in specs]}, in order")
        specs = graph
    if log_dir is not None:
        specs = [dataclasses.replace(spec, log_dir=str(log_dir)) for spec in specs]
    if stages is not None:
        if executor != "local" or [s.name for s in stages] != [s.name for s in specs]:
            raise BuildError("stages= needs executor='local' and one stage object per graph step, in order")
        for stage, spec in zip(stages, specs, strict=True):
            stage.fault_rate = spec.kwargs.get("fault_rate", 0.0)  # the config decides, as for built stages
    if todo and stages is None and graph is None:
        prebuild_tiny_models(cfg)
    for key, value in cfg.ray.env_vars.items():  # the local executor runs the stages in this process
        os.environ.setdefault(key, value)
    if progress is not None and hasattr(progress, "start"):
        progress.start(len(expected))

    shard_hash = config_hash(cfg.shards.model_dump())
    shard_config = cfg.shards.model_dump()
    writers = UnitWriters(cfg.shard_writers)
    stage_seconds: Counter = Counter()  # stage -> seconds, over the rows finished in this run

    def landed(wait: bool = False) -> None:
        """Take in the units the writers finished; report those that ran in this run."""
        for unit, result in writers.done(wait):
            markers[unit] = result["marker"]
            stage_seconds.update(result["stage_seconds"])
            if progress and unit in expected:
                progress(unit, markers[unit])

    try:
        # Finished units without current shards (killed while writing them, another shard config): no GPU work.
        rewrite = [u for u in sorted(markers) if u not in expected and not shards_current(out, markers[u], shard_hash)]
        if rewrite:
            log.warning(
                "%d finished units get their shards written again from their trajectories (files missing or changed, "
                "or another `shards:` config); no stage runs for them", len(rewrite),
            )  # fmt: skip
        for unit in rewrite:
            writers.submit(reshard_unit, unit, str(out), unit, shard_config)
        if todo and executor == "ray":
            init_ray(cfg, address)
        if todo:
            stream = run_ray(cfg, specs, todo) if executor == "ray" else run_sequential(specs, todo, stages)
            spool = Spool(out / STATE_DIR / "spool")
            for table in stream:
                for unit in spool.add(table, expected):
                    writers.submit(land_unit, unit, str(out), unit, unit_ids[unit], gen_hash, secrets,
                                   unit in markers, shard_config)  # fmt: skip
                del table
                landed()
            if spool.open_units:
                raise BuildError(f"the stage stream ended with {spool.open_units} unfinished units: rows were lost")
        landed(wait=True)
    finally:
        writers.close()

    # The tail: the manifest and the card over every unit (earlier runs included), from the markers.
    counts = stage_counts(markers.values(), [s.name for s in specs])
    result = finish_dataset(
        out,
        [markers[u]["shards"] for u in sorted(markers)],
        cfg.shards,
        build_config={"generation_hash": gen_hash, "shards": cfg.shards.model_dump()},
        card_info={
            "name": cfg.name,
            "license": cfg.license,
            "strategy": cfg.strategy,
            "models": _model_names(cfg),
        },
        extra={
            "prompts": report.as_dict(),
            "stages": [{"stage": name, **c} for name, c in counts.items()],  # a list: keeps the graph's order
            "units": len(markers),
        },
    )
    from pipeline.report import write_report

    write_report(out)
    return BuildResult(
        out=out,
        prompts=report,
        stage_counts=counts,
        mode_counts=result.counts,
        trajectories=result.trajectories,
        units_run=len(expected),
        units_skipped=skipped,
        wall_seconds=time.perf_counter() - started,
        stage_seconds=dict(stage_seconds),
    )


def prebuild_tiny_models(cfg: BuildConfig) -> None:
    """Build the `tiny:` models a config names once, on the driver, before actors start loading them."""
    from stages.tiny import PREFIX, tiny_path

    names = {model_id(cfg, s.name) for s in model_stages()}
    for name in sorted(n for n in names if n and n.startswith(PREFIX)):
        tiny_path(name)


def _model_names(cfg: BuildConfig) -> dict[str, str]:
    """Model names for the card: Hub ids as given; local paths reduced to their last component."""
    names = {s.name: model_label(cfg, s.name) or "" for s in model_stages()}
    return {k: (Path(v).name if v.startswith("/") else v) for k, v in names.items()}
