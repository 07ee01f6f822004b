"""Image generation with diffusers behind a small interface (text-to-image, optionally image-to-image).

Any diffusers text-to-image pipeline works (SD 1.x/2.x, SDXL, SD3, FLUX, SANA, ...): the pipeline class comes from
the model's model_index.json via `DiffusionPipeline.from_pretrained`, and call arguments are filtered by the
pipeline's `__call__` signature instead of being hard-coded per class. Image-to-image reuses the loaded components
through `AutoPipelineForImage2Image.from_pipe` (no second copy of the weights), so it is available for the families
diffusers maps there (SD, SDXL, SD3, FLUX, Kandinsky, Qwen-Image, ...).

torch and diffusers are imported in `setup()` only, so importing this module (e.g. in a Ray driver) is cheap.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

from schemas.config import ImageModelConfig
from schemas.local import decode_rgb

if TYPE_CHECKING:
    from PIL import Image


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DiffusersImageEngine:
    """A diffusers pipeline that turns prompts (and, for refinement, initial images) into RGB PIL images.

    Every prompt gets its own `torch.Generator` seeded with its own seed, created on the CPU: diffusers then draws
    each sample's initial noise from its own generator, so an image depends on its prompt and seed and not on the
    other rows of the batch (up to floating-point differences of batched kernels), and the initial noise is the
    same on CPU and GPU.
    """

    def __init__(self, cfg: ImageModelConfig, device: str = "auto") -> None:
        self.cfg = cfg
        self._device_request = device
        self.device: str | None = None
        self.dtype: Any = None
        self._t2i: Any = None
        self._i2i: Any = None
        self._t2i_params: frozenset[str] = frozenset()
        self._i2i_params: frozenset[str] = frozenset()
        self.compiled: str | None = None  # which denoiser torch.compile wraps (cfg.compile), once set up
        # (img2img needs at least one denoising step: ImageModelConfig refuses steps x strength < 1.)

    @property
    def model_name(self) -> str:
        """The model id or path as configured (goes into records and the dataset card)."""
        return self.cfg.model

    def setup(self) -> None:
        """Load the pipeline once (and wrap it for image-to-image when cfg.img2img); later calls do nothing."""
        if self._t2i is not None:
            return
        import torch
        from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

        self.device = resolve_device(self._device_request)
        # Half precision on CPU is slow or unsupported for many ops; the config's dtype is meant for GPUs.
        self.dtype = torch.float32 if self.device == "cpu" else getattr(torch, self.cfg.dtype)
        with warnings.catch_warnings():
            # diffusers >= 0.42 renames torch_dtype to dtype (FutureWarning); older releases ignore `dtype` silently,
            # so torch_dtype is the spelling that works across the supported range.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(self.cfg.model, torch_dtype=self.dtype)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.cfg.compile:
            # Before from_pipe below, so that the image-to-image variant shares the compiled denoiser.
            self.compiled = compile_denoiser(pipe)
        self._t2i = pipe
        self._t2i_params = _call_params(pipe)
        if self.cfg.img2img:
            try:
                i2i = AutoPipelineForImage2Image.from_pipe(pipe)
            except ValueError as exc:
                raise ValueError(
                    f"{self.cfg.model}: diffusers has no image-to-image variant of {type(pipe).__name__}; "
                    "set img2img: false for this stage"
                ) from exc
            i2i.set_progress_bar_config(disable=True)
            self._i2i = i2i
            self._i2i_params = _call_params(i2i)

    def generate(
        self, prompts: list[str], seeds: list[int], init_images: list[bytes] | None = None
    ) -> list[Image.Image]:
        """Generate one RGB image of cfg.height x cfg.width per prompt, in one batched pipeline call.

        With `init_images` (encoded PNG/JPEG, one per prompt) the image-to-image pipeline refines them with
        cfg.strength; this needs cfg.img2img. Init images are resized to the configured size first, so the output
        size does not depend on the input size (SD-style img2img has no height/width arguments).
        """
        if self._t2i is None:
            raise RuntimeError("DiffusersImageEngine.setup() was not called")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if init_images is not None and len(init_images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(init_images)} init images")
        if not prompts:
            return []
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": self.cfg.steps,
            "guidance_scale": self.cfg.guidance_scale,
            "generator": generators,
            "num_images_per_prompt": 1,
            "height": self.cfg.height,
            "width": self.cfg.width,
            "output_type": "pil",
        }
        if init_images is None:
            pipe, params = self._t2i, self._t2i_params
        else:
            if self._i2i is None:
                raise RuntimeError(f"{self.cfg.model}: init_images given but img2img is disabled in the config")
            from PIL import Image

            size = (self.cfg.width, self.cfg.height)
            images = []
            for data in init_images:
                img = decode_rgb(data)
                images.append(img if img.size == size else img.resize(size, Image.Resampling.BICUBIC))
            kwargs["image"] = images
            kwargs["strength"] = self.cfg.strength
            pipe, params = self._i2i, self._i2i_params
        # Pass only what this pipeline names (SD img2img has no height/width, some have no negative prompt...).
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        with torch.inference_mode():
            out = pipe(**kwargs)
        result = [img.convert("RGB") for img in out.images]
        if len(result) != len(prompts):
            raise RuntimeError(f"{type(pipe).__name__} returned {len(result)} images for {len(prompts)} prompts")
        return result


def compile_denoiser(pipe: Any) -> str:
    """torch.compile the pipeline's denoiser in place (`nn.Module.compile`) and return its attribute name.

    The denoiser (a diffusion transformer, or a UNet in SD-style pipelines) runs once per step and is nearly all of
    an image's GPU time; the text encoders and the VAE run once per image and stay eager. Compiling in place keeps
    the module's class and attributes (`config`, `dtype`) that pipelines read, and every pipeline built from the
    same components shares it. Compilation happens lazily on the first call (minutes for a 12B transformer), and
    again if a batch of a new size comes. It changes kernels, not the model (pixels may differ in the last bits,
    as between two GPU types), so it is no part of the generation hash.
    """
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "compile"):
            module.compile()
            return name
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet to compile; set compile: false")


def _call_params(pipe: Any) -> frozenset[str]:
    """Names of the arguments a pipeline's __call__ declares; a catch-all **kwargs is ignored on purpose.

    Several pipelines take **kwargs only for deprecated callbacks and silently drop the rest, so relying on it
    would hide a misconfiguration instead of passing the argument on.
    """
    sig = inspect.signature(pipe.__call__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in sig.parameters.items() if p.kind in kinds)
