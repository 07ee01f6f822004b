"""Executors: how the stage graph runs over work rows, on Ray Data (the product) or in a plain loop.

- `run_ray(cfg, specs, rows)`: each model stage is a fixed-size Ray Data actor pool (an engine starts once per
  actor, `_StageActor`; text stages keep several batches in flight on one engine, `_ConcurrentStageActor`); the
  cheap assemble stage is one light actor. A killed actor is restarted and its in-flight batches retried; an actor
  whose engine died ends its own process so that Ray does that (`EXIT_ENGINE_DEAD`). Yields finished rows as Arrow
  tables in any order.
- `run_sequential(specs, rows)`: the same stage objects one after the other in this process, unit by unit, with
  the same batches (tests, the benchmark's baseline, `--executor local`).
- `init_ray`: join or start Ray the way `ray.init()` would, and `worker_env`: the environment the stage workers
  get (the config's `ray.env_vars`, then the driver's values of `schemas.local.WORKER_ENV`).

Both executors only move rows through stages; what happens to finished rows is pipeline/landing.py's business.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NoReturn

import pyarrow as pa

from pipeline.errors import BuildError
from pipeline.graph import StageSpec, batch_to_rows, rows_to_batch
from pipeline.logs import redirect_worker_output
from schemas.config import BuildConfig
from schemas.local import driver_env
from schemas.work import WORK_SCHEMA, Batch
from stages.base import Stage
from stages.engines.errors import EngineDead

log = logging.getLogger("irgl.build")

# ---------------------------------------------------------------------------------------------------------------
# A plain loop


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


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


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
# Connecting to Ray


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
    """The environment of the stage workers: `ray.env_vars`, overridden by the driver's own values of
    `schemas.local.WORKER_ENV` (offline mode, caches, vLLM CPU settings, HF_TOKEN)."""
    return {**cfg.ray.env_vars, **driver_env()}


def connect_ray(address: str | None, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> None:
    """Connect this process to Ray (every command that runs on Ray: build, generate); reuse a session it holds.

    - `address` given: join that cluster ("auto": the one running on this machine).
    - `address` "local": start a private local instance with `num_cpus`, even if another one runs here.
    - None: do what `ray.init()` does - join the instance `ray start` (or $RAY_ADDRESS) points at, so that two
      Ray instances never both hand out this machine's GPUs; start a private one if there is none.

    Joining, the instance's own resources apply: Ray refuses num_cpus/num_gpus then, so they are not passed. `env`
    goes to every worker (`runtime_env`). Raises ConnectionError with what to do when Ray cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return
    found = None if address else running_ray_address()
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "runtime_env": {"env_vars": env} if env else None,
        "log_to_driver": True,
    }
    if address == "local" or (address is None and found is None):
        where = "a private local Ray instance"
        kwargs.update(address="local", num_cpus=num_cpus)
    elif address:
        where = f"the Ray cluster at {address}"
        kwargs.update(address=address)
    else:
        where = f"the Ray instance running on this machine at {found}"
        # address=None, not `found`: Ray then also picks up that instance's auth token, as `ray.init()` would.
        kwargs.update(address=None)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "; `ray stop` it if it is stale" if found else ""
        raise ConnectionError(
            f"cannot connect to {where}: {first}{hint}; or pass --address local to start a private instance"
        ) from exc
    if found:
        log.warning(
            "joined %s (its resources apply; num_cpus=%s is not used); --address local starts a private one",
            where, num_cpus,
        )  # fmt: skip
    else:
        log.info("Ray: %s, %s", where, ray.cluster_resources())


def init_ray(cfg: BuildConfig, address: str | None = None) -> None:
    """Connect a build to Ray (`connect_ray`): `--address`, else the config's `ray.address`; `ray.num_cpus` for a
    private instance; the stage workers' environment (`worker_env`)."""
    try:
        connect_ray(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env(cfg))
    except ConnectionError as exc:
        raise BuildError(str(exc)) from exc
