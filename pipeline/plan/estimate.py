"""The plan itself: `make_plan(cfg)` puts the stage graph, the prompt counts and each stage's rate together into
expected trajectories and records, wall time, GPU-hours, disk and upload size and the head node's CPU work, with
the warnings and options of pipeline/plan/advice.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.plan.advice import cluster_warnings, config_warnings, speed_options
from pipeline.plan.cluster import ClusterSpec
from pipeline.plan.counts import SourceCount, count_prompts
from pipeline.plan.figures import IMAGE_BYTES_1024, IMAGES_PER_TRAJECTORY_IN_MODES, WRITER_CPU_PER_TRAJECTORY
from pipeline.plan.rates import max_prompt_chars, stage_model, stage_rate
from schemas.config import BuildConfig, ResourceConfig
from schemas.stages import active_stages, stage_config


@dataclass
class StagePlan:
    """One stage of the graph with its resources and the time it needs for the expected trajectories."""

    name: str
    model: str
    resources: ResourceConfig | None
    items_per_second: float | None  # per replica
    rate_source: str
    busy_seconds: float | None = None  # replica-seconds for all trajectories
    wall_seconds: float | None = None  # busy / replicas

    @property
    def gpus_held(self) -> float:
        r = self.resources
        return r.replicas * r.num_gpus if r else 0.0


@dataclass
class Plan:
    """Everything `irgl plan` prints; `format_plan` renders it."""

    config: str
    name: str
    strategy: str
    stages: list[StagePlan]
    sources: list[SourceCount]
    trajectories: int | None  # expected prompts = trajectories attempted
    keep_rate: float
    records_per_mode: int | None
    wall_seconds: float | None
    gpu_hours_busy: float | None
    gpu_hours_reserved: float | None
    total_gpus: float
    bottleneck: str | None
    disk_bytes: float | None
    upload_bytes: float | None
    cluster: ClusterSpec | None
    shard_writers: int = 0
    writer_hours: float | None = None  # CPU-hours of the unit writers over the whole build
    warnings: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # settings that would make the build faster (not warnings)


def make_plan(
    cfg: BuildConfig,
    *,
    config_path: str = "",
    cluster: ClusterSpec | None = None,
    expected_counts: dict[str, int] | None = None,
    keep_rate: float = 1.0,
    prompts_path: str | None = None,
    limit: int | None = None,
) -> Plan:
    """Compute the plan of `cfg` (already validated). Reads local prompt sources; contacts nothing.

    `prompts_path` and `limit` mean what `irgl build --prompts/--limit` mean: one file replaces the sources, and
    at most `limit` prompts are used.
    """
    warnings: list[str] = []
    from stages.prompts import effective_sources

    prompt_sources = effective_sources(cfg.prompts, prompts_path)  # what `irgl build --prompts` reads
    sources = count_prompts(prompt_sources, expected_counts)
    unknown = [s for s in sources if s.count is None]
    for s in unknown:
        warnings.append(
            f"prompts {s.label}: count unknown offline; slice the split (e.g. 'train[:100000]') or pass "
            f"--expected-count {s.label.split(':')[1]}=N"
        )
    n = None if unknown else sum(s.count or 0 for s in sources)
    if n is not None and limit is not None:
        n = min(n, limit)
    if n == 0:
        warnings.append("the prompt sources yield no prompts")

    longest_prompt = max_prompt_chars(prompt_sources)
    stages = []
    for info in active_stages(cfg):  # the registry: the strategy's order (stages that run), each one's config
        section = stage_config(cfg, info.name)
        if section is None:
            stages.append(StagePlan(info.name, stage_model(cfg, info.name), None, None, "cheap CPU step"))
            continue
        res = section.resources
        rate, source = stage_rate(cfg, info.name, res, longest_prompt)
        sp = StagePlan(info.name, stage_model(cfg, info.name), res, rate, source)
        if rate and n is not None:
            sp.busy_seconds = n / rate
            sp.wall_seconds = sp.busy_seconds / res.replicas
        stages.append(sp)

    pools = [s for s in stages if s.resources is not None]
    known = all(s.wall_seconds is not None for s in pools) and n is not None
    wall = max(s.wall_seconds or 0.0 for s in pools) if known else None
    bottleneck = max(pools, key=lambda s: s.wall_seconds or 0.0).name if known else None
    total_gpus = sum(s.gpus_held for s in stages)
    busy = sum((s.busy_seconds or 0.0) * s.resources.num_gpus for s in pools) / 3600 if known else None
    reserved = total_gpus * wall / 3600 if wall is not None else None

    kept = None if n is None else int(round(n * keep_rate))
    disk = upload = None
    if n is not None:
        fmt = cfg.images.format
        sizes = [cfg.draw_initial.model, cfg.draw_refined.model]
        per_image = sum(IMAGE_BYTES_1024[fmt] * m.height * m.width / 1024**2 for m in sizes) / 2
        parquet = kept * IMAGES_PER_TRAJECTORY_IN_MODES * per_image  # base64 inflation ~ undone by zstd
        wds = parquet if cfg.shards.webdataset else 0.0
        disk = parquet + wds + kept * 2 * per_image  # + OUT/trajectories (I1, I2 once)
        upload = parquet

    writer_hours = None if n is None else n * WRITER_CPU_PER_TRAJECTORY / 3600
    writes_per_hour = max(cfg.shard_writers, 1) / WRITER_CPU_PER_TRAJECTORY * 3600  # 0: the driver, as one writer
    if wall and n and writes_per_hour < 1.5 * n / wall * 3600:
        warnings.append(
            f"shard_writers: {cfg.shard_writers} write ~{writes_per_hour:,.0f} trajectories/hour, too close to the "
            f"~{n / wall * 3600:,.0f}/hour the stages make: finished units would queue on the head node and the "
            "tail after the last GPU stage would grow; give it more"
        )
    warnings += config_warnings(cfg, longest_prompt)
    if cluster is not None:
        warnings += cluster_warnings(stages, cluster)
    return Plan(
        config=config_path,
        name=cfg.name,
        strategy=cfg.strategy,
        stages=stages,
        sources=sources,
        trajectories=n,
        keep_rate=keep_rate,
        records_per_mode=kept,
        wall_seconds=wall,
        gpu_hours_busy=busy,
        gpu_hours_reserved=reserved,
        total_gpus=total_gpus,
        bottleneck=bottleneck,
        disk_bytes=disk,
        upload_bytes=upload,
        cluster=cluster,
        shard_writers=cfg.shard_writers,
        writer_hours=writer_hours,
        warnings=warnings,
        options=speed_options(cfg, stages, n),
    )
