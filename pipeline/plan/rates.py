"""The throughput model of `irgl plan`: trajectories per second of one replica of each stage, from the figures in
pipeline/plan/figures.py, each with the text that says how it was reached (measured or assumed). What they count
per trajectory:
- text stages (vLLM): decoding the expected output, prefilling the prompt (instruction, user prompt, T1 for a
  forward reflection) and the image tokens of the images shown (~1,369 for a 1024x1024 image in Qwen2.5-VL), and
  the vision encoder;
- image stages (diffusers): the denoising steps (eager, or compiled with `compile: true`), the text encoders, the
  VAE decode (and encode of I1 for image-to-image), and encoding the image on the actor's CPU;
- the scorer: two images through open_clip on the GPU while they are decoded and preprocessed on the actor's CPU
  threads, the slower of the two;
- image safety: two images decoded, preprocessed and classified by Open-NSFW on the actor's CPUs.
A stage with `resources.items_per_second` in its config is planned at that rate instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.plan.figures import (
    CHARS_PER_TOKEN,
    CLIP_IMAGES_PER_SECOND,
    CLIP_PREPROCESS_CPU_SECONDS,
    COMPILE_SPEEDUP,
    CPU_FIGURES_SOURCE,
    DEFAULT_CLIP_IMAGES_PER_SECOND,
    DEFAULT_IMAGE_PIPELINE_SECONDS,
    DEFAULT_IMAGE_SECONDS_PER_STEP,
    DEFAULT_PARAMS_BILLIONS,
    IMAGE_COMPILED_SECONDS_PER_STEP,
    IMAGE_DECODE_CPU_SECONDS,
    IMAGE_ENCODE_CPU_SECONDS,
    IMAGE_PIPELINE_SECONDS,
    IMAGE_SECONDS_PER_STEP,
    INSTRUCTION_TOKENS,
    MAX_PREPROCESS_THREADS,
    MEAN_FILL,
    MEAN_PROMPT_CHARS,
    OPEN_NSFW_CPU_SECONDS,
    OPEN_NSFW_PREPROCESS_CPU_SECONDS,
    OPEN_NSFW_SOURCE,
    PREFILL_FLOPS_PER_GPU,
    VAE_ENCODE_OF_DECODE,
    VISION_ENCODER_BILLIONS,
    VLLM_TOKENS_PER_GPU_SECOND_X_BILLIONS,
    VLM_IMAGES,
    VLM_MAX_PIXELS,
    VLM_PIXELS_PER_TOKEN_SIDE,
)
from schemas.config import BuildConfig, ImageModelConfig, PromptSourceConfig, ResourceConfig, TextModelConfig
from schemas.stages import model_label, stage_config, stage_info


def params_billions(model_id: str) -> float | None:
    """Model size from its id ('Qwen2.5-VL-72B-Instruct' -> 72.0); None when the id names none."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_id)
    return float(m.group(1)) if m else None


def lookup_figure(model_id: str, table: list[tuple[str, float, str]], default: tuple[float, str]) -> tuple[float, str]:
    key = model_id.lower()
    for needle, value, source in table:
        if needle in key:
            return value, source
    return default


def regex_max_chars(model: TextModelConfig, role: str) -> int:
    """The longest text the structured-output regex of T1 (`role` think), T2 (reflect) or the judge's answer (judge)
    allows, in characters."""
    from schemas.judge import judge_regex_max_chars
    from schemas.reflection import reflection_regex_max_chars, think_regex_max_chars

    if role == "think":
        return think_regex_max_chars(model.max_section_chars)
    if role == "judge":
        return judge_regex_max_chars(model.max_reason_chars)
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


def image_step(model: ImageModelConfig) -> tuple[float, str]:
    """Seconds per denoising step at 1024^2 of `model` as configured (eager, or compiled with `compile: true`)."""
    eager, source = lookup_figure(model.model, IMAGE_SECONDS_PER_STEP, DEFAULT_IMAGE_SECONDS_PER_STEP)
    if not model.compile:
        return eager, source
    compiled = lookup_figure(model.model, IMAGE_COMPILED_SECONDS_PER_STEP, (None, ""))
    if compiled[0] is not None:
        return compiled
    return eager * COMPILE_SPEEDUP[0], f"{source}; compiled: {COMPILE_SPEEDUP[1]}"


def image_seconds(model: ImageModelConfig, refine_from_i1: bool, fmt: str) -> tuple[float, float, str]:
    """(GPU seconds, CPU seconds, source) of one image: denoising steps, text encoders, VAE decode (and encode of I1
    for image-to-image), then decoding I1 and encoding the result on the actor's CPU."""
    per_step, step_source = image_step(model)
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
    per_s, source = lookup_figure(cfg.score.model.model, CLIP_IMAGES_PER_SECOND, DEFAULT_CLIP_IMAGES_PER_SECOND)
    gpu_s = 2 / (per_s * min(res.num_gpus, 1.0))
    threads = threads or preprocess_threads(cfg, res)
    cpu_s = score_cpu_seconds(cfg) / threads
    bound = "CPU-bound" if cpu_s > gpu_s else "GPU-bound"
    per_image = IMAGE_DECODE_CPU_SECONDS[cfg.images.format] + CLIP_PREPROCESS_CPU_SECONDS
    return 1 / max(gpu_s, cpu_s), (
        f"{source}; {cfg.images.format} decode + preprocessing {1000 * per_image:.0f} ms/image at 1024^2 on "
        f"{threads} thread(s) ({CPU_FIGURES_SOURCE}): {bound}"
    )


def safety_rate(cfg: BuildConfig, res: ResourceConfig) -> tuple[float | None, str]:
    """Trajectories/s of one image safety replica: Open-NSFW on ONNX Runtime on the actor's CPUs, I1 and I2 each
    decoded, preprocessed (resized to 256 px, JPEG round trip) and classified."""
    if cfg.safety.model.engine != "open_nsfw":
        return None, "CLIP safety head: no built-in figure (set resources.items_per_second)"
    pixels = sum(m.height * m.width for m in (cfg.draw_initial.model, cfg.draw_refined.model)) / (1024 * 1024)
    decode = IMAGE_DECODE_CPU_SECONDS[cfg.images.format] * pixels
    cpu_s = decode + 2 * (OPEN_NSFW_PREPROCESS_CPU_SECONDS + OPEN_NSFW_CPU_SECONDS)
    return res.num_cpus / cpu_s, (
        f"Open-NSFW {1000 * OPEN_NSFW_CPU_SECONDS:.0f} ms/image + preprocessing, on {res.num_cpus:g} CPU(s) "
        f"({OPEN_NSFW_SOURCE})"
    )


def score_cpu_seconds(cfg: BuildConfig) -> float:
    """CPU seconds (one core) to decode and preprocess one trajectory's I1 and I2 for the scorer."""
    pixels = sum(m.height * m.width for m in (cfg.draw_initial.model, cfg.draw_refined.model)) / (1024 * 1024)
    return (IMAGE_DECODE_CPU_SECONDS[cfg.images.format] + CLIP_PREPROCESS_CPU_SECONDS) * pixels


def max_prompt_chars(sources: list[PromptSourceConfig]) -> int:
    """The longest prompt the sources let through (prompts longer than a source's max_chars are filtered)."""
    return max((s.max_chars for s in sources), default=PromptSourceConfig().max_chars)


def stage_rate(cfg: BuildConfig, name: str, res: ResourceConfig, max_prompt_chars: int) -> tuple[float | None, str]:
    if res.items_per_second is not None:
        return res.items_per_second, "config: resources.items_per_second"
    kind = stage_info(name).kind
    if kind == "text":
        return text_rate(cfg, name, res, max_prompt_chars)
    if kind == "image":
        forward_refine = name == "draw_refined" and cfg.strategy == "forward"
        return image_rate(stage_config(cfg, name).model, res, forward_refine, cfg.images.format)
    if kind == "safety":
        return safety_rate(cfg, res)
    return clip_rate(cfg, res)


def stage_model(cfg: BuildConfig, name: str) -> str:
    return model_label(cfg, name) or "(records check, CPU)"
