"""`irgl build`: prompts -> trajectories on Ray Data -> six-mode shards, manifest, card.

The job, in order (`build`):
1. Load and validate the config, read the prompts (bad lines counted with `file:line` reasons) - all before any
   model loads. Hold OUT (pipeline/lock.py) and refuse one that holds another build (`check_out_dir`). Drop unsafe
   and near-duplicate prompts (pipeline/curation.py; counted with their scores, decisions kept for reruns).
2. Give each prompt a deterministic id and seed, and a work unit (`unit_size` prompts in source order).
3. Skip units that a previous run finished (a valid marker under `OUT/state/units/`); retry their failed rows.
4. Stream the remaining rows through the stages (pipeline/executors.py: Ray Data actor pools, or a plain loop).
5. As each unit completes, a writer process lands it (pipeline/landing.py): its trajectories, rejects, marker and
   shards (pipeline/units.py), each through temp name + fsync + rename.
6. Leave the near-duplicate I2s out of the shards (pipeline/curation.py: the units holding one get their shards
   written again).
7. Write the card and manifest over all units' shards (pipeline/shards.py; same trajectories, same bytes) and the
   report.

Where the parts live: the stage graph and work rows in pipeline/graph.py, the executors in pipeline/executors.py,
a unit's files and marker in pipeline/units.py, spool and unit writers in pipeline/landing.py, `BuildError` in
pipeline/errors.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.curation import curate_prompt_list, curation_facts, image_duplicates
from pipeline.errors import BuildError
from pipeline.executors import (
    init_ray,
    run_ray,
    run_sequential,
)
from pipeline.fsio import write_atomic
from pipeline.graph import (
    StageSpec,
    make_rows,
    model_names,
    prebuild_tiny_models,
    stage_graph,
)
from pipeline.landing import Spool, UnitWriters, land_unit, reshard_unit
from pipeline.secrets import redact_env, redact_obj, secret_values
from pipeline.shards import config_hash, finish_dataset
from pipeline.units import STATE_DIR, read_marker, shards_current, shards_excluded
from schemas.config import BuildConfig
from schemas.work import FAILED, FILTERED
from stages.base import Stage
from stages.prompts import Prompt, PromptReport, load_sources

log = logging.getLogger("irgl.build")

#: The build's generation hash and (redacted) config, under OUT/state/.
BUILD_STATE = "build.json"


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
    curation: dict[str, Any] = field(default_factory=dict)  # pipeline.curation.curation_facts


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
    k/N, elapsed and ETA); its `echo(text)`, if any, gets the curation passes' lines (prompts embedded k/N, what
    the prompt filters and the I2 near-duplicate pass removed).

    `log_dir`: the stage actors write their stdout/stderr (engine logs) there instead of to Ray's console stream
    (pipeline/logs.py).

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
    # Prompt safety and near-duplicates: on this machine, before any unit exists (no GPU works on a dropped prompt).
    prompts = curate_prompt_list(prompts, cfg.curation, report, out, echo=getattr(progress, "echo", None))
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
            writers.submit(reshard_unit, unit, str(out), unit, shard_config, shards_excluded(markers[unit]))
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
        images = _leave_out_image_duplicates(cfg, out, markers, writers, shard_config, getattr(progress, "echo", None))
    finally:
        writers.close()

    # The tail: the manifest and the card over every unit (earlier runs included), from the markers.
    counts = stage_counts(markers.values(), [s.name for s in specs])
    curation = curation_facts(cfg, report, counts, images)
    result = finish_dataset(
        out,
        [markers[u]["shards"] for u in sorted(markers)],
        cfg.shards,
        build_config={"generation_hash": gen_hash, "shards": cfg.shards.model_dump()},
        card_info={
            "name": cfg.name,
            "license": cfg.license,
            "strategy": cfg.strategy,
            "models": model_names(cfg),
        },
        extra={
            "prompts": report.as_dict(),
            "stages": [{"stage": name, **c} for name, c in counts.items()],  # a list: keeps the graph's order
            "curation": curation,
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
        curation=curation,
    )


def _leave_out_image_duplicates(
    cfg: BuildConfig,
    out: Path,
    markers: dict[int, dict[str, Any]],
    writers: UnitWriters,
    shard_config: dict[str, Any],
    echo: Any = None,
) -> dict[str, Any] | None:
    """The near-duplicate pass over I2 (pipeline/curation.py), after every unit has landed: the units whose shards
    hold a trajectory to leave out, or leave out one that is no longer a duplicate, get them written again (in the
    writer processes); the others are not touched. Returns the pass's record (None when it is off)."""
    images = None
    removed: dict[str, Any] = {}
    if cfg.curation.image_dedup.enabled and markers:
        images = image_duplicates(out, sorted(markers), cfg.curation.image_dedup)
        removed = images["removed"]
        log.info("I2 near-duplicates: %d of %d trajectories leave the shards", len(removed), images["checked"])
        if echo is not None:
            echo(f"I2 near-duplicates: {len(removed)} of {images['checked']} trajectories leave the shards")
    stale = 0
    for unit in sorted(markers):
        exclude = [i for i in markers[unit]["ids"] if i in removed]
        if shards_excluded(markers[unit]) != sorted(exclude):
            writers.submit(reshard_unit, unit, str(out), unit, shard_config, exclude)
            stale += 1
    for unit, result in writers.done(wait=True):
        markers[unit] = result["marker"]
    if stale:
        log.info("%d units got their shards written again without their I2 near-duplicates", stale)
    return images
