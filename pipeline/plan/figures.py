"""The built-in throughput figures of `irgl plan` (one NVIDIA H100 80GB, bf16, batch as configured), and the CPU,
size and head-node figures the plan multiplies.

Override any throughput figure per stage with `resources.items_per_second` once you have measured your own. Each
figure says where it comes from: "measured" (a measurement, with where), or "assumed" (an estimate nobody here has
measured). pipeline/plan/rates.py turns them into items per second; nothing here computes.
"""

from __future__ import annotations

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
#: Open-NSFW (the image safety stage) on ONNX Runtime, one thread, batches of 16 at 224 px: 0.040 s per image, and
#: its preprocessing (1024 px -> 256 px, JPEG round trip, crop) ~0.006 s. Measured on the development machine's
#: AMD EPYC (a loaded 2-core VM: an upper bound).
OPEN_NSFW_CPU_SECONDS = 0.040
OPEN_NSFW_PREPROCESS_CPU_SECONDS = 0.006
OPEN_NSFW_SOURCE = "measured: one AMD EPYC core, ONNX Runtime 1.32"
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
INSTRUCTION_TOKENS = {"think": 120, "reflect": 220, "judge": 150}
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
    ("judge", "forward"): ("draw_initial", "draw_refined"),
    ("judge", "hindsight"): ("draw_initial", "draw_refined"),
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
