"""The stage graph of a build and the work rows that flow through it.

`stage_graph(cfg)` lists the steps in execution order for the configured strategy (forward or hindsight): for each,
the stage class, its constructor arguments and its Ray resources (`StageSpec`). The registry in schemas/stages.py
owns the stage names, their order and config sections; this module maps each name to its class (schemas cannot
import stage classes). `make_rows` turns prompts into work rows (deterministic id, seed and work unit) and
`rows_to_batch` / `batch_to_rows` convert between rows and the columnar batches stages take. Nothing here runs a
stage: pipeline/executors.py does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import BuildConfig
from schemas.modes import ModeOptions
from schemas.stages import STAGE_NAMES, active_stages, model_id, model_label, stage_config
from schemas.trajectory import trajectory_id
from schemas.work import WORK_COLUMNS, Batch, new_row
from stages.assemble import AssembleStage
from stages.base import Stage
from stages.draw import DrawStage
from stages.judge import JudgeStage
from stages.prompts import Prompt
from stages.reflect import ReflectStage
from stages.safety import SafetyStage
from stages.score import ScoreStage
from stages.think import ThinkStage


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
        "safety": (SafetyStage, {}),
        "score": (ScoreStage, {}),
        "judge": (JudgeStage, {"strategy": s}),
        "assemble": (AssembleStage, {"options": ModeOptions(cfg.shards.t1_loss_improving)}),
    }


def stage_graph(cfg: BuildConfig) -> list[StageSpec]:
    """The stages this build runs, in execution order for the configured strategy (optional stages - safety,
    judge - only when configured and enabled), with the config's fault injection, if any."""
    classes = _stage_classes(cfg)
    if set(classes) != set(STAGE_NAMES):  # a stage added to the registry but not here, or the reverse
        raise RuntimeError(f"pipeline/graph.py maps stages {sorted(classes)} but the registry has {STAGE_NAMES}")
    specs = []
    for info in active_stages(cfg):
        cls, kwargs = classes[info.name]
        kwargs = {"fault_rate": cfg.fault_injection.get(info.name, 0.0), **kwargs}
        section = stage_config(cfg, info.name)
        if section is None:  # no model: one light CPU actor
            specs.append(StageSpec(info.name, cls, kwargs))
        else:
            specs.append(StageSpec(info.name, cls, {"model": section.model, **kwargs}, section.resources))
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Work rows


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
# The models a graph names


def prebuild_tiny_models(cfg: BuildConfig) -> None:
    """Build the `tiny:` models a config names once, on the driver, before actors start loading them."""
    from schemas.local import TINY_PREFIX
    from stages.tiny import tiny_path

    names = {model_id(cfg, s.name) for s in active_stages(cfg) if s.has_model}
    for name in sorted(n for n in names if n and n.startswith(TINY_PREFIX)):
        tiny_path(name)


def model_names(cfg: BuildConfig) -> dict[str, str]:
    """Model names for the card: Hub ids as given; local paths reduced to their last component."""
    names = {s.name: model_label(cfg, s.name) or "" for s in active_stages(cfg) if s.has_model}
    return {k: (Path(v).name if v.startswith("/") else v) for k, v in names.items()}
