"""`irgl plan CONFIG`: what a build will do and cost, before any GPU is rented.

Validates the config exactly as `irgl build` does, then prints the stage graph in the strategy's order with each
stage's model and resources, the expected trajectories and records per mode, GPU-hours, wall time, disk and upload
size, and warnings for requests a cluster cannot meet. Nothing here loads a model or reads a prompt from the
network: local prompt files and the built-in generator are read (they are the exact count), Hugging Face sources
are counted from an absolute split slice (`train[:200000]`) or from `--expected-count`.

The estimates are arithmetic on per-replica throughput figures: `resources.items_per_second` when the config sets
it (your measurement), otherwise the built-in H100 figures below - some measured, most assumed, each printed with
its source so that nobody mistakes an assumption for a measurement. What they count per trajectory:
- text stages (vLLM): decoding the expected output, prefilling the prompt (instruction, user prompt, T1 for a
  forward reflection) and the image tokens of the images shown (~1,369 for a 1024x1024 image in Qwen2.5-VL), and
  the vision encoder;
- image stages (diffusers): the denoising steps (eager, or compiled with `compile: true`), the text encoders, the
  VAE decode (and encode of I1 for image-to-image), and encoding the image on the actor's CPU;
- the scorer: two images through open_clip on the GPU while they are decoded and preprocessed on the actor's CPU
  threads, the slower of the two.
Settings that would speed a stage up (the image engine's `compile`, CPUs for a CPU-bound scorer) are printed as
options; config values that make rows fail (max_tokens, section caps, context length) and clusters that would not
start the planned GPUs are warnings. The stages, their order and config sections come from schemas/stages.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import BuildConfig, ImageModelConfig, PromptSourceConfig, ResourceConfig, TextModelConfig
from schemas.stages import model_label, model_stages, stage_config, stage_info, stage_order


class PlanError(ValueError):
    """A plan input (cluster file, --expected-count) is unusable. The message names the file or option."""


# ---------------------------------------------------------------------------------------------------------------
# Built-in throughput figures (one NVIDIA H100 80GB, bf16, batch as configured). Override any of them per stage
# with `resources.items_per_second` once you have measured your own. Each figure says where it comes from:
# "measured" (a measurement, with where), or "assumed" (an estimate nobody here has measured).

#: The GPU the built-in figures are for. A cluster whose GPU nodes are another model gets a warning.
ASSUMED_GPU = "H100"

#: Diffusion denoisers (the transformer or UNet, run once per step): seconds per denoising step at 1024x1024,
#: eager. Time scales with pixels and steps run. (substring of the lower-cased model id, s/step, source)
IMAGE_SECONDS_PER_STEP: list[tuple[str, float, str]] = [
    ("flux", 0.183, "measured: FLUX.1 12B transformer on an H100, 1024^2, eager: 0.183 s/step"),
    ("sana", 0.5 / 20, "measured: SANA-1.6B ~0.5 s/image at 20 steps, 1024^2"),
    ("stable-diffusion-3.5-large", 0.12, "assumed: SD3.5-large (8B) with CFG, 0.12 s/step at 1024^2"),
    ("stable-diffusion-3.5-medium", 0.06, "assumed: SD3.5-medium (2.5B) with CFG, 0.06 s/step at 1024^2"),
    ("stable-diffusion-xl", 0.05, "assumed: SDXL with CFG, 0.05 s/step at 1024^2"),
]
DEFAULT_IMAGE_SECONDS_PER_STEP = (0.1, "assumed: unknown diffusion model, 0.1 s/step at 1024^2")

#: The same with `compile: true` (torch.compile of the denoiser, stages/engines/image.py).
IMAGE_COMPILED_SECONDS_PER_STEP: list[tuple[str, float, str]] = [
    ("flux", 0.133, "measured: FLUX.1-dev transformer on an H100, 1024^2, torch.compile: 0.133 s/step (eager 0.183)"),
]
#: Models without a compiled figure: eager s/step x this.
COMPILE_SPEEDUP = (0.133 / 0.183, "assumed: torch.compile gains what it gains on FLUX.1-dev (0.133 / 0.183 s/step)")

#: The rest of an image's GPU time, outside the denoising steps: the text encoders (once per prompt) and the VAE
#: decode at 1024x1024 (VAE time scales with pixels). (substring, encoders s, VAE decode s, source)
IMAGE_PIPELINE_SECONDS: list[tuple[str, float, float, str]] = [
    ("flux", 0.015, 0.08, "assumed: T5-XXL + CLIP-L encoders ~0.015 s, VAE decode ~0.08 s at 1024^2"),
    ("sana", 0.01, 0.05, "assumed: Gemma-2-2B encoder ~0.01 s, DC-AE decode ~0.05 s at 1024^2"),
    ("stable-diffusion-3", 0.02, 0.08, "assumed: CLIP-L/G + T5-XXL encoders ~0.02 s, VAE decode ~0.08 s at 1024^2"),
    ("stable-diffusion-xl", 0.005, 0.08, "assumed: CLIP-L/G encoders ~0.005 s, VAE decode ~0.08 s at 1024^2"),
]
DEFAULT_IMAGE_PIPELINE_SECONDS = (0.02, 0.1, "assumed: unknown pipeline: encoders ~0.02 s, VAE decode ~0.1 s")
#: ASSUMED: a VAE encode (image-to-image: I1 into latents) costs half a decode (the encoder is the smaller half).
VAE_ENCODE_OF_DECODE = 0.5

#: CPU seconds (one core) per 1024x1024 image, scaled by pixels: encoding a generated image into the records'
#: format (the draw stages), decoding it (image-to-image, scoring) and open_clip's preprocessing to 224x224 (resize,
#: crop, normalise). Measured as CPU time of one thread with PIL/torch on the development machine's AMD EPYC
#: (`python bench/cpu_image_costs.py`); a cluster's CPUs may be faster.
IMAGE_ENCODE_CPU_SECONDS = {"jpeg": 0.0074, "png": 0.28}
IMAGE_DECODE_CPU_SECONDS = {"jpeg": 0.009, "png": 0.024}
CLIP_PREPROCESS_CPU_SECONDS = 0.011
CPU_FIGURES_SOURCE = "measured: one AMD EPYC core, bench/cpu_image_costs.py"
#: The score stage's preprocessing threads when `score.model.preprocess_threads` is unset: the actor's CPUs, at most
#: this (stages/engines/clip.py).
MAX_PREPROCESS_THREADS = 32

#: open_clip image encoders: images per second on one GPU. A trajectory is scored on two images (I1, I2).
CLIP_IMAGES_PER_SECOND: list[tuple[str, float, str]] = [
    ("vit-l-14", 2600.0, "measured: CLIP ViT-L/14 ~2,600 images/s"),
    ("vit-b-32", 10000.0, "assumed: ViT-B/32 ~10,000 images/s"),
    ("vit-b-16", 6000.0, "assumed: ViT-B/16 ~6,000 images/s"),
    ("vit-h-14", 1000.0, "assumed: ViT-H/14 ~1,000 images/s"),
    ("vit-bigg-14", 400.0, "assumed: ViT-bigG/14 ~400 images/s"),
]
DEFAULT_CLIP_IMAGES_PER_SECOND = (1000.0, "assumed: unknown open_clip model, 1,000 images/s")

#: vLLM decoding is memory-bound: output tokens/s per GPU ~ this / parameters in billions. Calibrated to an ASSUMED
#: 2,000 output tokens/s for a 72B model at tensor_parallel_size=4 (500 per GPU).
VLLM_TOKENS_PER_GPU_SECOND_X_BILLIONS = 36_000.0
#: Prefill (prompt and image tokens) is compute-bound: tokens/s per GPU ~ effective FLOP/s / (2 x parameters).
#: ASSUMED 400 TFLOP/s effective bf16 per H100 (~40% of its 989 TFLOP/s dense peak): ~2,800 prompt tokens/s per GPU
#: for a 72B model. Prefill and decode are ASSUMED not to overlap (their times add up: a pessimistic bound).
PREFILL_FLOPS_PER_GPU = 400e12
#: Parameters assumed when the model id names no size ("7B", "72B", ...).
DEFAULT_PARAMS_BILLIONS = 7.0
#: Image tokens of a VLM: Qwen2.5-VL cuts images into 14x14-pixel patches and merges 2x2 of them into one LLM token,
#: so one token per 28x28 pixels after each side is rounded to a multiple of 28, up to 12,845,056 pixels
#: (its image processor's patch_size, merge_size and max_pixels): 1024x1024 -> 1036x1036 -> 37 x 37 = 1,369 tokens.
#: ASSUMED the same for other VLMs.
VLM_PIXELS_PER_TOKEN_SIDE = 28
VLM_MAX_PIXELS = 12_845_056
#: ASSUMED: the vision encoder has ~0.67B parameters (Qwen2.5-VL's ViT) and runs on the 4 patches of each token.
VISION_ENCODER_BILLIONS = 0.67
#: ASSUMED prompt tokens besides the user's prompt: the instruction (~250-700 characters in stages/think.py and
#: stages/reflect.py) and the chat template.
INSTRUCTION_TOKENS = {"think": 120, "reflect": 220}
#: ASSUMED mean user prompt, in characters (the generator's are ~60, Hub prompt sets ~100-400).
MEAN_PROMPT_CHARS = 200
#: ASSUMED: structured outputs fill about half of what the regex allows, at ~4 characters per token (English).
MEAN_FILL = 0.5
CHARS_PER_TOKEN = 4.0
#: The images each text stage shows the VLM, per strategy, named by the stage that drew them (their size sets the
#: image tokens): stages/think.py and stages/reflect.py.
VLM_IMAGES: dict[tuple[str, str], tuple[str, ...]] = {
    ("think", "forward"): (),
    ("think", "hindsight"): ("draw_refined",),
    ("reflect", "forward"): ("draw_initial",),
    ("reflect", "hindsight"): ("draw_initial", "draw_refined"),
}
#: Section caps (`max_section_chars`) below which a real model is likely to run into the cap (the row then fails):
#: ASSUMED from what instruction-tuned VLMs such as Qwen2.5-VL-72B write when asked for these texts even with a
#: budget stated: a plan (T1) of ~500-1,000 characters, reflection parts of ~200-500 (the step-by-step guidance
#: runs longest). Not checked for `tiny:` models (random text).
MIN_SECTION_CHARS = {"think": 1000, "reflect": 500}

#: ASSUMED encoded size of one 1024x1024 image (scaled by pixel count): PNG of a generated photo ~1.6 MB, JPEG at
#: quality 95 ~0.5 MB.
IMAGE_BYTES_1024 = {"png": 1.6e6, "jpeg": 0.5e6}
#: Images per trajectory in the six mode records (modes 1, 3, 5: one; 4, 6: two; 2: none).
IMAGES_PER_TRAJECTORY_IN_MODES = 7
#: MEASURED (bench/scale.py, one core of the development machine's AMD EPYC, 1024 px JPEG q95 at ~320 KB): CPU
#: seconds per trajectory of a unit writer (trajectory, reject and marker files, then the six modes' Parquet and
#: WebDataset), and of `irgl verify` with images decoded. Larger images cost more, roughly with their bytes.
WRITER_CPU_PER_TRAJECTORY = 0.031
VERIFY_CPU_PER_TRAJECTORY = 0.113

#: The official IRG trainer accepts images whose long side is <= 1024 and short side >= 512 (docs/IRGL_FORMAT.md).
TRAINER_MAX_LONG_SIDE = 1024
TRAINER_MIN_SHORT_SIDE = 512

#: GPU model of well-known cloud instance types (the cluster file names instance types, not GPUs). A node type can
#: also say it with a custom resource `accelerator_type:<GPU>`, as Ray names the GPUs it detects.
GPU_BY_INSTANCE_TYPE = {
    "p5.48xlarge": "H100",
    "p5e.48xlarge": "H200",
    "p5en.48xlarge": "H200",
    "p4de.24xlarge": "A100",
    "p4d.24xlarge": "A100",
    "a3-highgpu-8g": "H100",
    "a3-megagpu-8g": "H100",
    "a2-ultragpu-8g": "A100",
    "a2-highgpu-8g": "A100",
    "Standard_ND96isr_H100_v5": "H100",
    "Standard_ND96amsr_A100_v4": "A100",
}


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
    accelerator: str | None = None  # GPU model (from an `accelerator_type:` resource or the instance type)


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

    @property
    def gpu_node_types(self) -> list[NodeType]:
        return [t for t in self.node_types if t.gpus > 0 and t.max_count > 0]


def node_accelerator(spec: dict) -> str | None:
    """The GPU model of a node type: its `accelerator_type:<GPU>` resource, else its instance type looked up in
    GPU_BY_INSTANCE_TYPE (AWS InstanceType, GCP machineType, Azure vmSize); None when unknown."""
    for key in spec.get("resources") or {}:
        if isinstance(key, str) and key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    node_config = spec.get("node_config") or {}
    azure = (node_config.get("azure_arm_parameters") or {}) if isinstance(node_config, dict) else {}
    for instance in (node_config.get("InstanceType"), node_config.get("machineType"), azure.get("vmSize")):
        if isinstance(instance, str) and instance in GPU_BY_INSTANCE_TYPE:
            return GPU_BY_INSTANCE_TYPE[instance]
    return None


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
                accelerator=node_accelerator(spec) if resources.get("GPU", 0) else None,
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


def vlm_image_tokens(width: int, height: int) -> int:
    """LLM tokens of one width x height image for a Qwen2.5-VL-style VLM (see VLM_PIXELS_PER_TOKEN_SIDE)."""
    side = VLM_PIXELS_PER_TOKEN_SIDE
    h, w = max(side, round(height / side) * side), max(side, round(width / side) * side)
    if h * w > VLM_MAX_PIXELS:  # the processor scales the image down to max_pixels, keeping its aspect
        beta = math.sqrt(height * width / VLM_MAX_PIXELS)
        h, w = max(side, math.floor(height / beta / side) * side), max(side, math.floor(width / beta / side) * side)
    return (h // side) * (w // side)


def _output_tokens(model: TextModelConfig, role: str) -> float:
    """Mean output tokens of one T1/T2 generation (ASSUMED fill of the regex, or of max_tokens without one)."""
    if model.structured:
        return min(model.max_tokens, MEAN_FILL * regex_max_chars(model, role) / CHARS_PER_TOKEN)
    return MEAN_FILL * model.max_tokens


@dataclass(frozen=True)
class TextLoad:
    """What one T1/T2 request costs an engine, in tokens (means, except `max_prompt_tokens`)."""

    prompt_tokens: float  # instruction + user prompt (+ T1 for a forward reflection)
    images: int
    tokens_per_image: int
    output_tokens: float
    max_prompt_tokens: float  # the longest text prompt the sources allow (their max_chars), for the context check

    @property
    def image_tokens(self) -> int:
        return self.images * self.tokens_per_image


def text_load(cfg: BuildConfig, name: str, max_prompt_chars: int) -> TextLoad:
    """The tokens one request of text stage `name` feeds and asks for: the instruction, the user prompt, a forward
    reflection's T1, the images shown (VLM_IMAGES) and the expected output."""
    model = stage_config(cfg, name).model
    images = [stage_config(cfg, s).model for s in VLM_IMAGES[(name, cfg.strategy)]]
    per_image = max((vlm_image_tokens(m.width, m.height) for m in images), default=0)
    prompt = INSTRUCTION_TOKENS[name] + MEAN_PROMPT_CHARS / CHARS_PER_TOKEN
    longest = INSTRUCTION_TOKENS[name] + max_prompt_chars / CHARS_PER_TOKEN
    if name == "reflect" and cfg.strategy == "forward":  # the forward T2 request quotes T1
        prompt += _output_tokens(cfg.think.model, "think")
        longest += (regex_max_chars(cfg.think.model, "think") if cfg.think.model.structured else 0) / CHARS_PER_TOKEN
    return TextLoad(prompt, len(images), per_image, _output_tokens(model, name), longest)


def text_rate(cfg: BuildConfig, name: str, res: ResourceConfig, max_prompt_chars: int) -> tuple[float | None, str]:
    """Trajectories/s of one vLLM engine for T1 (`name` think) or T2 (reflect): decode of the expected output plus
    prefill of the prompt and image tokens plus the vision encoder, from the assumptions above."""
    model = stage_config(cfg, name).model
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    if model.engine != "vllm":
        return None, "transformers engine: no built-in figure (set resources.items_per_second)"
    size = params_billions(model.model)
    size_note = f"{size:g}B" if size else f"size unknown, {DEFAULT_PARAMS_BILLIONS:g}B assumed"
    size = size or DEFAULT_PARAMS_BILLIONS
    gpus = min(float(model.tensor_parallel_size), res.num_gpus)  # a fraction of a GPU gets that share
    load = text_load(cfg, name, max_prompt_chars)
    decode_per_s = VLLM_TOKENS_PER_GPU_SECOND_X_BILLIONS / size * gpus
    prefill_per_s = PREFILL_FLOPS_PER_GPU * gpus / (2 * size * 1e9)
    prefill_tokens = load.prompt_tokens + load.image_tokens
    vision_flops = 2 * VISION_ENCODER_BILLIONS * 1e9 * 4 * load.image_tokens  # 4 patches per merged token
    seconds = (
        load.output_tokens / decode_per_s
        + prefill_tokens / prefill_per_s
        + vision_flops / (PREFILL_FLOPS_PER_GPU * gpus)
    )
    images = f", {load.images} image(s) x {load.tokens_per_image:,} tok" if load.images else ""
    return 1 / seconds, (
        f"assumed: vLLM {size_note} on {gpus:g} GPU(s): decode ~{decode_per_s:,.0f} output tok/s x "
        f"~{load.output_tokens:,.0f} tok + prefill ~{prefill_per_s:,.0f} tok/s x ~{prefill_tokens:,.0f} tok{images}"
    )


def _image_step(model: ImageModelConfig) -> tuple[float, str]:
    """Seconds per denoising step at 1024^2 of `model` as configured (eager, or compiled with `compile: true`)."""
    eager, source = _lookup(model.model, IMAGE_SECONDS_PER_STEP, DEFAULT_IMAGE_SECONDS_PER_STEP)
    if not model.compile:
        return eager, source
    compiled = _lookup(model.model, IMAGE_COMPILED_SECONDS_PER_STEP, (None, ""))
    if compiled[0] is not None:
        return compiled
    return eager * COMPILE_SPEEDUP[0], f"{source}; compiled: {COMPILE_SPEEDUP[1]}"


def image_seconds(model: ImageModelConfig, refine_from_i1: bool, fmt: str) -> tuple[float, float, str]:
    """(GPU seconds, CPU seconds, source) of one image: denoising steps, text encoders, VAE decode (and encode of I1
    for image-to-image), then decoding I1 and encoding the result on the actor's CPU."""
    per_step, step_source = _image_step(model)
    img2img = refine_from_i1 and model.img2img
    steps = max(math.floor(model.steps * model.strength), 1) if img2img else model.steps
    pixels = model.height * model.width / (1024 * 1024)
    key = model.model.lower()
    encoders, vae, extra_source = next(
        ((e, v, s) for needle, e, v, s in IMAGE_PIPELINE_SECONDS if needle in key), DEFAULT_IMAGE_PIPELINE_SECONDS
    )
    denoise = per_step * steps * pixels
    vae_s = vae * pixels * (1 + (VAE_ENCODE_OF_DECODE if img2img else 0.0))
    cpu = IMAGE_ENCODE_CPU_SECONDS[fmt] * pixels + (IMAGE_DECODE_CPU_SECONDS[fmt] * pixels if img2img else 0.0)
    note = f" (img2img: {steps} of {model.steps} steps)" if img2img else ""
    source = (
        f"{step_source}; {extra_source}; {fmt} encoding: {CPU_FIGURES_SOURCE}; {denoise + encoders + vae_s + cpu:.2f} "
        f"s/image here = {steps} steps {denoise:.2f} s + encoders/VAE {encoders + vae_s:.2f} s + CPU {cpu:.2f} s{note}"
    )
    return denoise + encoders + vae_s, cpu, source


def image_rate(
    model: ImageModelConfig, res: ResourceConfig, refine_from_i1: bool, fmt: str
) -> tuple[float | None, str]:
    """Trajectories/s of one diffusers replica (one image each)."""
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    gpu_s, cpu_s, source = image_seconds(model, refine_from_i1, fmt)
    share = min(res.num_gpus, 1.0)  # a fractional GPU shares the device with other actors
    return 1 / (gpu_s / share + cpu_s), source


def preprocess_threads(cfg: BuildConfig, res: ResourceConfig) -> int:
    """The score stage's preprocessing threads: the config's, else the actor's CPUs (what Ray gives it as
    OMP_NUM_THREADS), at most MAX_PREPROCESS_THREADS."""
    if cfg.score.model.preprocess_threads:
        return cfg.score.model.preprocess_threads
    return max(1, min(int(res.num_cpus), MAX_PREPROCESS_THREADS))


def clip_rate(cfg: BuildConfig, res: ResourceConfig, threads: int | None = None) -> tuple[float | None, str]:
    """Trajectories/s of one open_clip replica: two images per trajectory through the model on the GPU, and decoded
    and preprocessed on `threads` CPU threads meanwhile (stages/engines/clip.py overlaps the two): the slower side
    sets the rate."""
    if res.num_gpus <= 0:
        return None, "runs on CPU: no built-in figure (set resources.items_per_second)"
    per_s, source = _lookup(cfg.score.model.model, CLIP_IMAGES_PER_SECOND, DEFAULT_CLIP_IMAGES_PER_SECOND)
    gpu_s = 2 / (per_s * min(res.num_gpus, 1.0))
    threads = threads or preprocess_threads(cfg, res)
    cpu_s = score_cpu_seconds(cfg) / threads
    bound = "CPU-bound" if cpu_s > gpu_s else "GPU-bound"
    per_image = IMAGE_DECODE_CPU_SECONDS[cfg.images.format] + CLIP_PREPROCESS_CPU_SECONDS
    return 1 / max(gpu_s, cpu_s), (
        f"{source}; {cfg.images.format} decode + preprocessing {1000 * per_image:.0f} ms/image at 1024^2 on "
        f"{threads} thread(s) ({CPU_FIGURES_SOURCE}): {bound}"
    )


def score_cpu_seconds(cfg: BuildConfig) -> float:
    """CPU seconds (one core) to decode and preprocess one trajectory's I1 and I2 for the scorer."""
    pixels = sum(m.height * m.width for m in (cfg.draw_initial.model, cfg.draw_refined.model)) / (1024 * 1024)
    return (IMAGE_DECODE_CPU_SECONDS[cfg.images.format] + CLIP_PREPROCESS_CPU_SECONDS) * pixels


def _max_prompt_chars(sources: list[PromptSourceConfig]) -> int:
    """The longest prompt the sources let through (prompts longer than a source's max_chars are filtered)."""
    return max((s.max_chars for s in sources), default=PromptSourceConfig().max_chars)


def _stage_rate(cfg: BuildConfig, name: str, res: ResourceConfig, max_prompt_chars: int) -> tuple[float | None, str]:
    if res.items_per_second is not None:
        return res.items_per_second, "config: resources.items_per_second"
    kind = stage_info(name).kind
    if kind == "text":
        return text_rate(cfg, name, res, max_prompt_chars)
    if kind == "image":
        forward_refine = name == "draw_refined" and cfg.strategy == "forward"
        return image_rate(stage_config(cfg, name).model, res, forward_refine, cfg.images.format)
    return clip_rate(cfg, res)


def _stage_model(cfg: BuildConfig, name: str) -> str:
    return model_label(cfg, name) or "(records check, CPU)"


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

    longest_prompt = _max_prompt_chars(prompt_sources)
    stages = []
    for info in stage_order(cfg.strategy):  # the registry: the strategy's order, each stage's config section
        section = stage_config(cfg, info.name)
        if section is None:
            stages.append(StagePlan(info.name, _stage_model(cfg, info.name), None, None, "cheap CPU step"))
            continue
        res = section.resources
        rate, source = _stage_rate(cfg, info.name, res, longest_prompt)
        sp = StagePlan(info.name, _stage_model(cfg, info.name), res, rate, source)
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
    warnings += _config_warnings(cfg, longest_prompt)
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
        shard_writers=cfg.shard_writers,
        writer_hours=writer_hours,
        warnings=warnings,
        options=_options(cfg, stages, n),
    )


def _options(cfg: BuildConfig, stages: list[StagePlan], n: int | None) -> list[str]:
    """Settings that would speed a stage up, with what they would change: the image engine's `compile`, and more
    preprocessing CPUs for a CPU-bound scorer. Only for stages planned from the built-in figures."""
    out = []
    for s in stages:
        r = s.resources
        if r is None or r.items_per_second is not None or r.num_gpus <= 0:
            continue
        kind = stage_info(s.name).kind
        if kind == "image":
            model = stage_config(cfg, s.name).model
            if model.compile:
                continue
            refine = s.name == "draw_refined" and cfg.strategy == "forward"
            eager_step, _ = _image_step(model)
            fast = model.model_copy(update={"compile": True})
            compiled_step, _ = _image_step(fast)
            measured = _lookup(model.model, IMAGE_COMPILED_SECONDS_PER_STEP, (0.0, ""))[0] > 0
            basis = "measured" if measured else "assumed: FLUX.1-dev's speed-up"
            rate, _ = image_rate(fast, r, refine, cfg.images.format)
            wall = ""
            if n:
                wall = f"; this stage's wall time {_duration(s.wall_seconds)} -> {_duration(n / rate / r.replicas)}"
            out.append(
                f"{s.name}: `compile: true` (torch.compile of the denoiser; minutes of compilation per actor at start) "
                f"runs a step in ~{compiled_step:.3f} s instead of {eager_step:.3f} s ({basis}): "
                f"{s.items_per_second:.3g} -> "
                f"{rate:.3g} images/s per replica{wall}"
            )
        elif kind == "score" and cfg.score.model.preprocess_threads is None:
            per_s, _ = _lookup(cfg.score.model.model, CLIP_IMAGES_PER_SECOND, DEFAULT_CLIP_IMAGES_PER_SECOND)
            threads = preprocess_threads(cfg, r)
            rate, source = clip_rate(cfg, r)
            if "CPU-bound" not in source or threads >= MAX_PREPROCESS_THREADS:
                continue
            # Threads whose preprocessing keeps up with the GPU: CPU seconds per trajectory x GPU trajectories/s.
            gpu_rate = per_s * min(r.num_gpus, 1.0) / 2
            need = min(MAX_PREPROCESS_THREADS, math.ceil(score_cpu_seconds(cfg) * gpu_rate))
            faster, _ = clip_rate(cfg, r, need)
            out.append(
                f"{s.name}: CPU-bound ({threads} preprocessing thread(s) from resources.num_cpus={r.num_cpus:g}); "
                f"num_cpus: {need} would raise it from {rate:,.0f} to {faster:,.0f} trajectories/s per replica"
            )
    return out


def _config_warnings(cfg: BuildConfig, max_prompt_chars: int) -> list[str]:
    """Requests that fail or waste GPUs whatever the cluster: token budgets shorter than what the structured-output
    regex allows, section caps a real model runs into, contexts that cannot hold prompt + images + output, image
    sizes the official trainer rejects, compiling on CPU, models left on CPU."""
    out = []
    for info in (s for s in model_stages() if s.kind == "text"):
        name = info.name
        stage = stage_config(cfg, name)
        m = stage.model  # (GPUs per actor vs tensor_parallel_size: the config itself refuses a mismatch)
        if m.structured:
            # A token holds at least one character of this regex's text for any tokenizer that can spell the
            # characters it allows, except multi-byte ones (up to 4 bytes each): 4 x is safe by construction.
            limit = regex_max_chars(m, name)
            if m.max_tokens < limit:
                out.append(
                    f"{name}: max_tokens={m.max_tokens} < {limit} characters the regex allows: the engine stops at "
                    f"max_tokens, so long outputs are cut off and fail (safe by construction: {4 * limit})"
                )
            floor = MIN_SECTION_CHARS[name]
            if m.max_section_chars < floor and not m.model.startswith("tiny:"):
                part = "the plan" if name == "think" else "each reflection part"
                out.append(
                    f"{name}: max_section_chars={m.max_section_chars} caps {part} below the ~{floor} characters a "
                    f"real model writes there (assumed): rows whose text reaches the cap fail; raise it to >= {floor}"
                )
        load = text_load(cfg, name, max_prompt_chars)
        needed = math.ceil(load.max_prompt_tokens + load.image_tokens + m.max_tokens)
        if needed > m.max_model_len:
            images = f" + {load.images} image(s) x {load.tokens_per_image:,}" if load.images else ""
            out.append(
                f"{name}: max_model_len={m.max_model_len} < ~{needed:,} tokens = the longest prompt "
                f"~{load.max_prompt_tokens:,.0f}{images} + max_tokens {m.max_tokens:,}: outputs are cut at the context "
                "end and fail (a prompt longer than the context is refused); raise max_model_len or lower max_tokens"
            )
    for info in (s for s in model_stages() if s.kind == "image"):
        name = info.name
        stage = stage_config(cfg, name)
        m = stage.model
        long_side, short_side = max(m.height, m.width), min(m.height, m.width)
        if long_side > TRAINER_MAX_LONG_SIDE or short_side < TRAINER_MIN_SHORT_SIDE:
            out.append(
                f"{name}: {m.width}x{m.height} images are outside what the official IRG trainer accepts "
                f"(long side <= {TRAINER_MAX_LONG_SIDE}, short side >= {TRAINER_MIN_SHORT_SIDE})"
            )
        if m.compile and stage.resources.num_gpus == 0:
            out.append(
                f"{name}: compile: true on CPU (resources.num_gpus=0): torch.compile costs minutes at every actor "
                "start for no measured gain there; set compile: false"
            )
    for info in model_stages():
        model = _stage_model(cfg, info.name)
        if stage_config(cfg, info.name).resources.num_gpus == 0 and not model.startswith("tiny:"):
            out.append(f"{info.name}: {model} has resources.num_gpus=0 and will run on CPU")
    return out


def _cluster_warnings(stages: list[StagePlan], cluster: ClusterSpec) -> list[str]:
    """Does the cluster start the GPUs the plan assumes, and can Ray place every actor of every pool at once (the
    pools run concurrently for the whole job)?"""
    out = []
    for t in cluster.node_types:
        if not t.head and not t.gpus_declared:
            out.append(f"cluster {cluster.path}: node type {t.name} declares no GPU resource; GPU checks count it as 0")
    gpu_types = cluster.gpu_node_types
    if len(gpu_types) > 1:
        # Ray's autoscaler picks the node type with the best utilisation score for the pending actors (it preferred
        # 96-CPU A100 nodes over 192-CPU H100 nodes for irgl's actors), never by GPU model.
        names = ", ".join(f"{t.name} ({t.accelerator or 'GPU model unknown'})" for t in gpu_types)
        out.append(
            f"cluster {cluster.path}: {len(gpu_types)} GPU node types ({names}): Ray's autoscaler chooses among them "
            "by its own utilisation score, not by GPU model, so the plan cannot know which GPUs start; keep one GPU "
            "node type per cluster file (ray_cluster.yaml: H100, ray_cluster_a100.yaml: A100)"
        )
    builtin = [s.name for s in stages if s.resources is not None and s.resources.num_gpus > 0
               and s.resources.items_per_second is None]  # fmt: skip
    for t in gpu_types:
        if builtin and t.accelerator != ASSUMED_GPU:
            gpu = t.accelerator or "an unknown GPU model"
            out.append(
                f"cluster {cluster.path}: node type {t.name} has {gpu}, but the built-in figures of "
                f"{', '.join(builtin)} are {ASSUMED_GPU} figures: time and GPU-hours are off (an A100 is about half as "
                "fast, assumed); set resources.items_per_second from a pilot build on these nodes"
            )
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
    if plan.writer_hours is not None and plan.trajectories:
        where = f"{plan.shard_writers} unit-writer processes" if plan.shard_writers else "the driver process"
        verify = plan.trajectories * VERIFY_CPU_PER_TRAJECTORY / 3600
        lines.append(
            f"head node: {where} write each unit's shards while the stages run (~{plan.writer_hours:.1f} CPU-hours "
            f"in all); after the last unit only the manifest, card and report (seconds); irgl verify: "
            f"~{verify:.1f} CPU-hours, spread over the head node's cores (--jobs)"
        )
    if plan.cluster is not None:
        c = plan.cluster
        kinds = ", ".join(
            f"{t.name}: {t.gpus:g} GPUs{f' ({t.accelerator})' if t.accelerator else ''} x {t.max_count}"
            for t in c.node_types
        )
        lines.append(f"cluster {c.path}: at most {c.max_gpus:g} GPUs ({kinds}; max_workers {c.max_workers})")
    else:
        lines.append("cluster: not given (pass --cluster ray_cluster.yaml to check that every actor can be placed)")
    lines.append(f"built-in figures are for {ASSUMED_GPU} GPUs; each stage's rate source says measured or assumed")
    lines.append("")
    for option in plan.options:
        lines.append(f"option: {option}")
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
