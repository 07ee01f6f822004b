"""The stage registry: the one list of irgl's build stages, their order per strategy, their kind and where their
model lives in the build config.

Everything that names stages reads it: the config's `fault_injection` keys, the build's stage graph and model-name
helpers (pipeline/build.py maps each name to its stage class, which schemas cannot import), `irgl plan` and the
report. Adding or renaming a stage starts here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from schemas.config import BuildConfig

StageKind = Literal["text", "image", "score", "safety", "cpu"]


@dataclass(frozen=True)
class StageInfo:
    """One stage of the build.

    `name` is the stage's name everywhere (config keys, actor names, rejects' `stage`, summaries); `kind` says what
    engine it runs (text: vLLM/transformers, image: diffusers, score: open_clip, cpu: no model); `config_attr` is the
    BuildConfig attribute that holds its `model` and `resources` (None for a stage without a model). An `optional`
    stage runs only when its config section is set and `enabled` (`stage_enabled`).
    """

    name: str
    produces: str
    kind: StageKind
    config_attr: str | None
    description: str
    optional: bool = False

    @property
    def has_model(self) -> bool:
        return self.config_attr is not None


#: Every stage, in the forward strategy's order.
STAGES: tuple[StageInfo, ...] = (
    StageInfo("think", "T1", "text", "think", "the initial thinking (LLM in forward, VLM looking at I2 in hindsight)"),
    StageInfo("draw_initial", "I1", "image", "draw_initial", "the initial (hindsight: weak) image"),
    StageInfo("reflect", "T2", "text", "reflect", "the reflection, by a VLM looking at I1 (hindsight: I1 and I2)"),
    StageInfo("draw_refined", "I2", "image", "draw_refined", "the refined (hindsight: strong) image"),
    StageInfo("safety", "safety scores", "safety", "safety", "image safety classifier on I1 and I2", optional=True),
    StageInfo("score", "scores", "score", "score", "CLIP scores of I1 and I2 and the verdict"),
    StageInfo(
        "judge", "judgement", "text", "judge", "VLM judge: do I1/I2 satisfy the prompt, which is better", optional=True
    ),  # fmt: skip
    StageInfo("assemble", "trajectory", "cpu", None, "row -> Trajectory, checked against the record contract"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
#: A stage name as a type (pydantic validates config keys against it). Built from STAGE_NAMES: one spelling only.
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]

#: Execution order per strategy. forward: think, draw, reflect, redraw. hindsight: both images first (weak, strong),
#: then T1 written looking at I2 and T2 comparing I1 with I2. The image safety check runs once both images exist (one
#: pass over I1 and I2; unsafe images are rare, so checking I1 before the reflection would save little), in
#: hindsight before any text is written; the judge runs after the CLIP verdict, on the rows CLIP kept.
STRATEGY_ORDER: dict[str, tuple[str, ...]] = {
    "forward": ("think", "draw_initial", "reflect", "draw_refined", "safety", "score", "judge", "assemble"),
    "hindsight": ("draw_initial", "draw_refined", "safety", "think", "reflect", "score", "judge", "assemble"),
}

_BY_NAME = {s.name: s for s in STAGES}

for _strategy, _order in STRATEGY_ORDER.items():
    # A typo in an order would silently drop a stage from every build of that strategy: fail at import instead.
    if sorted(_order) != sorted(STAGE_NAMES):
        raise RuntimeError(f"STRATEGY_ORDER[{_strategy!r}] is not a permutation of {STAGE_NAMES}")


def stage_info(name: str) -> StageInfo:
    """The registry entry of stage `name`; ValueError naming the known stages otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}") from None


def stage_order(strategy: str) -> tuple[StageInfo, ...]:
    """The stages in execution order for `strategy` ('forward' or 'hindsight')."""
    try:
        names = STRATEGY_ORDER[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; strategies are {', '.join(STRATEGY_ORDER)}") from None
    return tuple(_BY_NAME[n] for n in names)


def stage_enabled(cfg: BuildConfig, name: str) -> bool:
    """Whether stage `name` runs in this build: always for a required stage; an optional one when its config
    section is set and `enabled`."""
    info = stage_info(name)
    if not info.optional:
        return True
    section = getattr(cfg, info.config_attr) if info.config_attr else None
    return section is not None and bool(getattr(section, "enabled", True))


def active_stages(cfg: BuildConfig) -> tuple[StageInfo, ...]:
    """The stages this build runs, in its strategy's order (stage_order without the disabled optional ones)."""
    return tuple(s for s in stage_order(cfg.strategy) if stage_enabled(cfg, s.name))


def model_stages() -> tuple[StageInfo, ...]:
    """The stages that load a model (and have `model` + `resources` in the config), in registry order."""
    return tuple(s for s in STAGES if s.has_model)


def stage_config(cfg: BuildConfig, name: str) -> Any | None:
    """The config section of stage `name` (a TextStageConfig, ImageStageConfig, ScoreStageConfig, SafetyStageConfig
    or JudgeStageConfig); None for a stage without a model or an optional stage that is not configured."""
    info = stage_info(name)
    return getattr(cfg, info.config_attr) if info.config_attr else None


def model_id(cfg: BuildConfig, name: str) -> str | None:
    """The model id or path that stage `name` loads (for the scorer: the open_clip model name); None without one."""
    section = stage_config(cfg, name)
    return None if section is None else section.model.model


def model_label(cfg: BuildConfig, name: str) -> str | None:
    """A model's name as records and cards show it: the id, and for the scorer `model/pretrained`."""
    section = stage_config(cfg, name)
    if section is None:
        return None
    if stage_info(name).kind == "score":
        return f"{section.model.model}/{section.model.pretrained}"
    return section.model.model
