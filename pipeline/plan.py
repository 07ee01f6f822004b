"""`irgl plan CONFIG`: what a build will do and cost, before any GPU is rented.

Validates the config exactly as `irgl build` does, then prints the stage graph in the strategy's order with each
stage's model and resources, the expected trajectories and records per mode, GPU-hours, wall time, disk and upload
size, and warnings for requests a cluster cannot meet. Nothing here loads a model or reads a prompt from the
network: local prompt files and the built-in generator are read (they are the exact count), Hugging Face sources
are counted from an absolute split slice (`train[:200000]`) or from `--expected-count`.

The estimates are arithmetic on per-replica throughput figures: `resources.items_per_second` when the config sets
it (your measurement), otherwise the built-in H100 figures below - some measured, most assumed, each printed with
its source so that nobody mistakes an assumption for a measurement.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import BuildConfig, ImageModelConfig, PromptSourceConfig, ResourceConfig, TextModelConfig


class PlanError(ValueError):
    """A plan input (cluster file, --expected-count) is unusable. The message names the file or option."""


# ---------------------------------------------------------------------------------------------------------------
# Built-in throughput figures (one NVIDIA H100 80GB, bf16, batch as configured). Override any of them per stage
# with `resources.items_per_second` once you have measured your own.

#: Diffusion transformers: seconds per denoising step at 1024x1024 (time scales with pixels and steps run).
#: (substring of the lower-cased model id, seconds per step, where the figure comes from)
IMAGE_SECONDS_PER_STEP: list[tuple[str, float, str]] = [
    ("flux", 5.1 / 28, "measured: FLUX.1 12B transformer 5.1 s/image at 28 steps, 1024^2, eager (3.7 s compiled)"),
    ("sana", 0.5 / 20, "measured: SANA-1.6B ~0.5 s/image at 20 steps, 1024^2"),
    ("stable-diffusion-3.5-large", 0.12, "assumed: SD3.5-large (8B) with CFG, 0.12 s/step at 1024^2"),
    ("stable-diffusion-3.5-medium", 0.06, "assumed: SD3.5-medium (2.5B) with CFG, 0.06 s/step at 1024^2"),
    ("stable-diffusion-xl", 0.05, "assumed: SDXL with CFG, 0.05 s/step at 1024^2"),
]
DEFAULT_IMAGE_SECONDS_PER_STEP = (0.1, "assumed: unknown diffusion model, 0.1 s/step at 1024^2")

#: open_clip image encoders: images per second on one GPU. A trajectory is scored on two images (I1, I2).
CLIP_IMAGES_PER_SECOND: list[tuple[str, float, str]] = [
    ("vit-l-14", 2600.0, "measured: CLIP ViT-L/14 ~2,600 images/s"),
    ("vit-b-32", 10000.0, "assumed: ViT-B/32 ~10,000 images/s"),
    ("vit-b-16", 6000.0, "assumed: ViT-B/16 ~6,000 images/s"),
    ("vit-h-14", 1000.0, "assumed: ViT-H/14 ~1,000 images/s"),
    ("vit-bigg-14", 400.0, "assumed: ViT-bigG/14 ~400 images/s"),
]
DEFAULT_CLIP_IMAGES_PER_SECOND = (1000.0, "assumed: unknown open_clip model, 1,000 images/s")

#: vLLM batched decoding is memory-bound: output tokens/s per GPU ~ this / parameters in billions. Calibrated to an
#: ASSUMED 2,000 output tokens/s for a 72B model at tensor_parallel_size=4 (500 per GPU); prefill (including the
#: ~1,400 tokens of a 1024^2 image for Qwen2.5-VL) is not modelled.
VLLM_TOKENS_PER_GPU_SECOND_X_BILLIONS = 36_000.0
#: Parameters assumed when the model id names no size ("7B", "72B", ...).
DEFAULT_PARAMS_BILLIONS = 7.0
#: ASSUMED: structured outputs fill about half of what the regex allows, at ~4 characters per token (English).
MEAN_FILL = 0.5
CHARS_PER_TOKEN = 4.0

#: ASSUMED encoded size of one 1024x1024 image (scaled by pixel count): PNG of a generated photo ~1.6 MB, JPEG at
#: quality 95 ~0.5 MB.
IMAGE_BYTES_1024 = {"png": 1.6e6, "jpeg": 0.5e6}
#: Images per trajectory in the six mode records (modes 1, 3, 5: one; 4, 6: two; 2: none).
IMAGES_PER_TRAJECTORY_IN_MODES = 7

#: The official IRG trainer accepts images whose long side is <= 1024 and short side >= 512 (docs/IRGL_FORMAT.md).
TRAINER_MAX_LONG_SIDE = 1024
TRAINER_MIN_SHORT_SIDE = 512


# ---------------------------------------------------------------------------------------------------------------
# Cluster description


@dataclass(frozen=True)
class NodeType:
    """One node type of a Ray cluster-launcher config: resources per node and how many nodes at most."""

    name: str
    cpus: float
    gpus: float
    max_count: int
    head: bool
    gpus_declared: bool


@dataclass(frozen=True)
class ClusterSpec:
    """The largest cluster a cluster-launcher YAML allows (head + workers up to their max_workers limits)."""

    path: str
    node_types: list[NodeType]
    max_workers: int

    def nodes(self) -> list[tuple[str, float, float]]:
        """Every node the cluster can have at most, as (type, cpus, gpus): the head, then workers (most GPUs first)
        up to each type's max_workers and the global max_workers."""
        out = [(t.name, t.cpus, t.gpus) for t in self.node_types if t.head]
        left = self.max_workers
        for t in sorted((t for t in self.node_types if not t.head), key=lambda t: (-t.gpus, -t.cpus, t.name)):
            n = min(t.max_count, left)
            out += [(t.name, t.cpus, t.gpus)] * n
            left -= n
        return out

    @property
    def max_gpus(self) -> float:
        return sum(g for _, _, g in self.nodes())

    @property
    def max_gpus_per_node(self) -> float:
        return max((t.gpus for t in self.node_types), default=0.0)


def load_cluster(path: Path) -> ClusterSpec:
    """Read the node types of a Ray cluster-launcher YAML (`available_node_types`, `head_node_type`,
    `max_workers`). Raises PlanError naming the file and field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{path}: cluster file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise PlanError(f"{path}: field 'available_node_types': a mapping of node types is required")
    head = data.get("head_node_type")
    if head not in data["available_node_types"]:
        raise PlanError(f"{path}: field 'head_node_type': must name one of available_node_types")
    max_workers = data.get("max_workers", 2)  # Ray's default
    if not isinstance(max_workers, int) or max_workers < 0:
        raise PlanError(f"{path}: field 'max_workers': must be a non-negative integer")
    types = []
    for name, spec in data["available_node_types"].items():
        if not isinstance(spec, dict):
            raise PlanError(f"{path}: field 'available_node_types.{name}': must be a mapping")
        resources = spec.get("resources") or {}
        for key in ("CPU", "GPU"):
            value = resources.get(key, 0)
            if not isinstance(value, (int, float)) or value < 0:
                raise PlanError(f"{path}: field 'available_node_types.{name}.resources.{key}': must be a number >= 0")
        count = 1 if name == head else spec.get("max_workers", max_workers)
        if not isinstance(count, int) or count < 0:
            raise PlanError(f"{path}: field 'available_node_types.{name}.max_workers': must be an integer >= 0")
        types.append(
            NodeType(
                name=name,
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                max_count=count,
                head=name == head,
                gpus_declared="GPU" in resources,
            )
        )
    return ClusterSpec(path=str(path), node_types=types, max_workers=max_workers)


def pack_actors(actors: list[tuple[str, float, float]], nodes: list[tuple[str, float, float]]) -> list[str]:
    """First-fit decreasing placement of actors (stage, cpus, gpus) on nodes (type, cpus, gpus), as Ray must place
    every actor of the fixed-size pools at once. Returns the stage name of every actor that does not fit."""
    free = [[c, g] for _, c, g in nodes]
    unplaced = []
    eps = 1e-9
    for stage, cpus, gpus in sorted(actors, key=lambda a: (-a[2], -a[1], a[0])):
        for slot in free:
            if slot[0] + eps >= cpus and slot[1] + eps >= gpus:
                slot[0] -= cpus
                slot[1] -= gpus
                break
        else:
            unplaced.append(stage)
    return unplaced


# ---------------------------------------------------------------------------------------------------------------
# Prompt counts


@dataclass(frozen=True)
class SourceCount:
    """Prompts expected from one source: exact (read locally) or an upper bound (a Hugging Face slice), or None."""

    label: str
    count: int | None
    how: str


_SLICE = re.compile(r"^\s*([\w.-]+)\s*\[\s*(\d*)\s*:\s*(\d*)\s*\]\s*$")


def split_slice_count(split: str) -> int | None:
    """Rows selected by a `datasets` split with absolute slices ('train[:1000]', 'train[10:20]+test[:5]'); None
    when any part has no absolute end (a whole split, percentages): its size is not knowable offline."""
    total = 0
    for part in split.split("+"):
        m = _SLICE.match(part)
        if not m or not m.group(3):
            return None
        start, end = int(m.group(2) or 0), int(m.group(3))
        total += max(end - start, 0)
    return total


def parse_expected_counts(items: list[str]) -> dict[str, int]:
    """`--expected-count PATH=N` options -> {PATH: N}. PATH is a Hugging Face dataset name or 'name:split'."""
    out = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.isdigit():
            raise PlanError(f"--expected-count {item!r}: expected PATH=N with N a whole number")
        out[key] = int(value)
    return out


def count_prompts(sources: list[PromptSourceConfig], expected: dict[str, int] | None = None) -> list[SourceCount]:
    """Per source: local files and the generator are read with the build's own reader (normalised, filtered, and
    deduplicated across these sources: the exact count); Hugging Face sources are never contacted."""
    from stages.prompts import PromptReport, PromptSourceError, load_prompts

    expected = expected or {}
    seen: set[str] = set()
    counts = []
    for src in sources:
        if src.kind == "hf":
            label = f"hf:{src.path}:{src.split}"
            n = expected.get(f"{src.path}:{src.split}", expected.get(src.path or ""))
            if n is not None:
                counts.append(SourceCount(label, n, "--expected-count (rows before dedup and filters)"))
                continue
            n = split_slice_count(src.split)
            how = "split slice (rows before dedup and filters)" if n is not None else "unknown: not read offline"
            counts.append(SourceCount(label, n, how))
            continue
        label = f"generator:{src.generator_seed}" if src.kind == "generator" and src.path is None else str(src.path)
        try:
            prompts, report = load_prompts(src, report=PromptReport(), seen=seen, into=[])
        except PromptSourceError as exc:
            raise PlanError(str(exc)) from exc
        dropped = sum(report.dropped.values())
        counts.append(SourceCount(label, len(prompts), f"read locally: {report.read} read, {dropped} dropped"))
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Stage estimates


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


def params_billions(model_id: str) -> float | None:
    """Model size from its id ('Qwen2.5-VL-72B-Instruct' -> 72.0); None when the id names none."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_id)
    return float(m.group(1)) if m else None


def _lookup(model_id: str, table: list[tuple[str, float, str]], default: tuple[float, str]) -> tuple[float, str]:
    key = model_id.lower()
    for needle, value, source in table:
        if needle in key:
            return value, source
    return default


def regex_max_chars(model: TextModelConfig, role: str) -> int:
    """The longest text the structured-output regex of T1 (`role` think) or T2 (reflect) allows, in characters."""
    from schemas.reflection import reflection_regex_max_chars, think_regex_max_chars

    if role == "think":
        return think_regex_max_chars(model.max_section_chars)
    return reflection_regex_max_chars(model.max_section_chars)


def text_rate(model: TextModelConfig, res: ResourceConfig, role: str) -> tuple[float | None, str]:
    """Trajectories/s of one vLLM engine for T1 (`role` think) or T2 (reflect), from the assumptions above."""
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    if model.engine != "vllm":
        return None, "transformers engine: no built-in figure (set resources.items_per_second)"
    size = params_billions(model.model)
    size_note = f"{size:g}B" if size else f"size unknown, {DEFAULT_PARAMS_BILLIONS:g}B assumed"
    size = size or DEFAULT_PARAMS_BILLIONS
    gpus = min(float(model.tensor_parallel_size), res.num_gpus)  # a fraction of a GPU gets that share
    tokens_per_s = VLLM_TOKENS_PER_GPU_SECOND_X_BILLIONS / size * gpus
    if model.structured:
        tokens = min(model.max_tokens, MEAN_FILL * regex_max_chars(model, role) / CHARS_PER_TOKEN)
    else:
        tokens = MEAN_FILL * model.max_tokens
    rate = tokens_per_s / tokens
    return rate, (
        f"assumed: vLLM {size_note} on {gpus:g} GPU(s) ~{tokens_per_s:,.0f} output tok/s, ~{tokens:,.0f} tok/item"
    )


def image_rate(model: ImageModelConfig, res: ResourceConfig, refine_from_i1: bool) -> tuple[float | None, str]:
    """Trajectories/s of one diffusers replica: seconds/step x steps run x pixels / 1024^2."""
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    per_step, source = _lookup(model.model, IMAGE_SECONDS_PER_STEP, DEFAULT_IMAGE_SECONDS_PER_STEP)
    steps = math.floor(model.steps * model.strength) if refine_from_i1 and model.img2img else model.steps
    seconds = per_step * max(steps, 1) * (model.height * model.width) / (1024 * 1024)
    share = min(res.num_gpus, 1.0)  # a fractional GPU shares the device with other actors
    img2img = f" (img2img: {steps} of {model.steps} steps)" if refine_from_i1 and model.img2img else ""
    return share / seconds, f"{source}; {seconds:.2f} s/image here{img2img}"


def clip_rate(model_name: str, res: ResourceConfig) -> tuple[float | None, str]:
    """Trajectories/s of one open_clip replica: two images per trajectory."""
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    per_s, source = _lookup(model_name, CLIP_IMAGES_PER_SECOND, DEFAULT_CLIP_IMAGES_PER_SECOND)
    return per_s * min(res.num_gpus, 1.0) / 2, source


def _stage_rate(cfg: BuildConfig, name: str, res: ResourceConfig) -> tuple[float | None, str]:
    if res.items_per_second is not None:
        return res.items_per_second, "config: resources.items_per_second"
    if name in ("think", "reflect"):
        return text_rate(getattr(cfg, name).model, res, name)
    if name in ("draw_initial", "draw_refined"):
        forward_refine = name == "draw_refined" and cfg.strategy == "forward"
        return image_rate(getattr(cfg, name).model, res, forward_refine)
    return clip_rate(cfg.score.model.model, res)


def _stage_model(cfg: BuildConfig, name: str) -> str:
    if name == "score":
        return f"{cfg.score.model.model} / {cfg.score.model.pretrained}"
    if name == "assemble":
        return "(records check, CPU)"
    return getattr(cfg, name).model.model


# ---------------------------------------------------------------------------------------------------------------
# The plan


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
    warnings: list[str] = field(default_factory=list)


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
    from pipeline.build import stage_graph

    warnings: list[str] = []
    prompt_sources = cfg.prompts
    if prompts_path is not None:  # as stages.prompts.load_sources does for --prompts
        field_name = cfg.prompts[0].field if cfg.prompts else "prompt"
        prompt_sources = [PromptSourceConfig(kind="auto", path=prompts_path, field=field_name)]
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

    stages = []
    for spec in stage_graph(cfg):
        res = spec.resources
        if res is None:
            stages.append(StagePlan(spec.name, _stage_model(cfg, spec.name), None, None, "cheap CPU step"))
            continue
        rate, source = _stage_rate(cfg, spec.name, res)
        sp = StagePlan(spec.name, _stage_model(cfg, spec.name), res, rate, source)
        if rate and n is not None:
            sp.busy_seconds = n / rate
            sp.wall_seconds = sp.busy_seconds / res.replicas
        stages.append(sp)

    model_stages = [s for s in stages if s.resources is not None]
    known = all(s.wall_seconds is not None for s in model_stages) and n is not None
    wall = max(s.wall_seconds or 0.0 for s in model_stages) if known else None
    bottleneck = max(model_stages, key=lambda s: s.wall_seconds or 0.0).name if known else None
    total_gpus = sum(s.gpus_held for s in stages)
    busy = sum((s.busy_seconds or 0.0) * s.resources.num_gpus for s in model_stages) / 3600 if known else None
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

    warnings += _config_warnings(cfg)
    if cluster is not None:
        warnings += _cluster_warnings(stages, cluster)
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
        warnings=warnings,
    )


def _config_warnings(cfg: BuildConfig) -> list[str]:
    """Requests that fail or waste GPUs whatever the cluster: vLLM parallelism vs GPUs per actor, token budgets
    the structured-output regex can exceed, image sizes the official trainer rejects, models left on CPU."""
    out = []
    for name in ("think", "reflect"):
        stage = getattr(cfg, name)
        m, r = stage.model, stage.resources
        tp = m.tensor_parallel_size
        if m.engine == "vllm" and r.num_gpus > 0 and r.num_gpus < tp:
            out.append(
                f"{name}: tensor_parallel_size={tp} needs {tp} GPUs per actor but resources.num_gpus={r.num_gpus:g}"
                " (vLLM fails: world size larger than the visible GPUs)"
            )
        elif m.engine == "vllm" and r.num_gpus > tp:
            out.append(f"{name}: resources.num_gpus={r.num_gpus:g} > tensor_parallel_size={tp}: GPUs left idle")
        if m.structured:
            limit = regex_max_chars(m, name)
            if m.max_tokens < limit:
                out.append(
                    f"{name}: max_tokens={m.max_tokens} < {limit} characters the regex allows: long outputs are cut "
                    f"off and fail (safe by construction: {4 * limit})"
                )
        if m.max_model_len < m.max_tokens + 256:
            out.append(f"{name}: max_model_len={m.max_model_len} leaves no room for the prompt next to max_tokens")
    for name in ("draw_initial", "draw_refined"):
        m = getattr(cfg, name).model
        long_side, short_side = max(m.height, m.width), min(m.height, m.width)
        if long_side > TRAINER_MAX_LONG_SIDE or short_side < TRAINER_MIN_SHORT_SIDE:
            out.append(
                f"{name}: {m.width}x{m.height} images are outside what the official IRG trainer accepts "
                f"(long side <= {TRAINER_MAX_LONG_SIDE}, short side >= {TRAINER_MIN_SHORT_SIDE})"
            )
    for name in ("think", "draw_initial", "reflect", "draw_refined", "score"):
        model = _stage_model(cfg, name)
        if getattr(cfg, name).resources.num_gpus == 0 and not model.startswith("tiny:"):
            out.append(f"{name}: {model} has resources.num_gpus=0 and will run on CPU")
    return out


def _cluster_warnings(stages: list[StagePlan], cluster: ClusterSpec) -> list[str]:
    """Can Ray place every actor of every pool at once (the pools run concurrently for the whole job)?"""
    out = []
    for t in cluster.node_types:
        if not t.head and not t.gpus_declared:
            out.append(f"cluster {cluster.path}: node type {t.name} declares no GPU resource; GPU checks count it as 0")
    per_node = cluster.max_gpus_per_node
    for s in stages:
        r = s.resources
        if r is None or r.num_gpus == 0:
            continue
        if r.num_gpus > per_node:
            out.append(
                f"{s.name}: an actor needs {r.num_gpus:g} GPUs on one node but the largest node type of "
                f"{cluster.path} has {per_node:g}: no actor of this stage can start"
            )
        elif s.gpus_held > cluster.max_gpus:
            out.append(
                f"{s.name}: {r.replicas} replicas x {r.num_gpus:g} GPUs = {s.gpus_held:g} GPUs > {cluster.max_gpus:g}"
                f" GPUs the cluster {cluster.path} can have"
            )
    total = sum(s.gpus_held for s in stages)
    if total > cluster.max_gpus:
        out.append(
            f"the stage pools hold {total:g} GPUs at once but {cluster.path} can have at most {cluster.max_gpus:g}: "
            "Ray Data cannot start every actor and the build stalls; lower replicas"
        )
    actors = [
        (s.name, s.resources.num_cpus, s.resources.num_gpus)
        for s in stages
        if s.resources is not None
        for _ in range(s.resources.replicas)
    ]
    unplaced = pack_actors(actors, cluster.nodes())
    if unplaced and total <= cluster.max_gpus:
        names = ", ".join(sorted(set(unplaced)))
        out.append(
            f"{len(unplaced)} actor(s) of {names} do not fit on the nodes of {cluster.path} (CPUs or GPUs per node)"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text output


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


def format_plan(plan: Plan) -> str:
    """The plan as plain text (stable layout: tests and users grep it)."""
    from schemas.modes import MODES

    lines = [f"plan for {plan.config or plan.name} (name: {plan.name}, strategy: {plan.strategy})", ""]
    lines.append("stage graph: " + " -> ".join(["prompts", *(s.name for s in plan.stages)]))
    lines.append("")
    w = max(len(s.model) for s in plan.stages)
    header = f"{'stage':13s} {'model':{w}s} {'replicas':>8s} {'gpus':>5s} {'cpus':>5s} {'batch':>5s} {'items/s':>8s} "
    lines.append(header + f"{'wall':>9s}  rate source")
    for s in plan.stages:
        r = s.resources
        if r is None:
            lines.append(f"{s.name:13s} {s.model:{w}s} {'1':>8s} {'0':>5s} {'0.1':>5s} {'unit':>5s} {'':>8s} {'':>9s}")
            continue
        rate = f"{s.items_per_second:.3g}" if s.items_per_second else "n/a"
        lines.append(
            f"{s.name:13s} {s.model:{w}s} {r.replicas:8d} {r.num_gpus:5g} {r.num_cpus:5g} {r.batch_size:5d} "
            f"{rate:>8s} {_duration(s.wall_seconds):>9s}  {s.rate_source}"
        )
    lines.append("")
    lines.append("prompts:")
    for src in plan.sources:
        count = f"{src.count:,}" if src.count is not None else "unknown"
        lines.append(f"  {src.label:55s} {count:>10s}  ({src.how})")
    traj = f"{plan.trajectories:,}" if plan.trajectories is not None else "unknown"
    bound = "at most " if any("slice" in s.how or "expected" in s.how for s in plan.sources) else ""
    lines.append(f"expected trajectories: {bound}{traj} (one per prompt kept; Hub sources before dedup)")
    recs = f"{plan.records_per_mode:,}" if plan.records_per_mode is not None else "unknown"
    lines.append(f"records per mode: {bound}{recs} (keep rate {plan.keep_rate:g}; each kept trajectory -> 1 per mode)")
    for m in MODES:
        lines.append(f"  {m.index} {m.name:45s} {recs:>10s}")
    lines.append("")
    lines.append(f"GPUs held by the stage pools: {plan.total_gpus:g}")
    lines.append(f"wall time (streaming; slowest stage: {plan.bottleneck or 'n/a'}): {_duration(plan.wall_seconds)}")
    busy = f"{plan.gpu_hours_busy:,.0f}" if plan.gpu_hours_busy is not None else "n/a"
    reserved = f"{plan.gpu_hours_reserved:,.0f}" if plan.gpu_hours_reserved is not None else "n/a"
    lines.append(f"GPU-hours: {busy} busy, {reserved} reserved (GPUs held x wall time); engine start-up not included")
    if plan.wall_seconds:
        util = ", ".join(
            f"{s.name} {100 * (s.wall_seconds or 0) / plan.wall_seconds:.0f}%"
            for s in plan.stages
            if s.resources is not None
        )
        lines.append(f"stage utilisation: {util}")
    lines.append(f"disk for OUT: ~{_size(plan.disk_bytes)}; Hub upload (Parquet): ~{_size(plan.upload_bytes)}")
    if plan.cluster is not None:
        c = plan.cluster
        kinds = ", ".join(f"{t.name}: {t.gpus:g} GPUs x {t.max_count}" for t in c.node_types)
        lines.append(f"cluster {c.path}: at most {c.max_gpus:g} GPUs ({kinds}; max_workers {c.max_workers})")
    else:
        lines.append("cluster: not given (pass --cluster ray_cluster.yaml to check that every actor can be placed)")
    lines.append("")
    if plan.warnings:
        for w in plan.warnings:
            lines.append(f"warning: {w}")
    else:
        lines.append("no warnings")
    return "\n".join(lines)


def plan_from_file(
    config: Path,
    *,
    cluster: Path | None = None,
    expected_counts: list[str] | None = None,
    keep_rate: float = 1.0,
    prompts_path: str | None = None,
    limit: int | None = None,
) -> Plan:
    """Load and validate CONFIG like `irgl build` (ConfigError on a bad field), read the cluster file, and plan."""
    from schemas.config import load_build_config

    cfg = load_build_config(str(config))
    spec = load_cluster(cluster) if cluster is not None else None
    counts = parse_expected_counts(expected_counts or [])
    return make_plan(
        cfg,
        config_path=str(config),
        cluster=spec,
        expected_counts=counts,
        keep_rate=keep_rate,
        prompts_path=prompts_path,
        limit=limit,
    )
