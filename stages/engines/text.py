"""Text / vision-language generation behind one small interface, so that stages do not depend on an engine.

`VLLMTextEngine` is the production path (vLLM, batched, per-request seeds, regex-constrained structured outputs) and
runs unchanged on CUDA and on vLLM's CPU backend. `TransformersTextEngine` is the fallback for environments
without vLLM; it does not enforce the regex (see its docstring), so stages must still validate outputs.

Heavy libraries (vllm, torch, transformers, PIL) are imported inside methods: importing this module is cheap and
an actor only pays for the engine it actually uses. Never import ray here.
"""

from __future__ import annotations

import gc
import io
import logging
from dataclasses import dataclass, field
from typing import Any

from schemas.config import TextModelConfig

logger = logging.getLogger(__name__)


@dataclass
class TextRequest:
    """One generation request: a single user turn, optionally with images and a regex constraint."""

    prompt: str
    """The user text."""
    system: str | None = None
    """Optional system message."""
    images: list[bytes] = field(default_factory=list)
    """Encoded PNG/JPEG images shown to the VLM before the text (empty = text only)."""
    regex: str | None = None
    """Structured-output constraint (vLLM structured outputs); None = free text."""
    seed: int = 0
    """Per-request sampling seed: the same request and seed give the same output."""


def _decode_image(data: bytes) -> Any:
    """Decode encoded image bytes into an RGB PIL image (vision processors expect three channels)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _messages(request: TextRequest, pil_key: str) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for a request: images first, then the text, as the VLM templates expect.

    `pil_key` names the image content part: vLLM takes `{"type": "image_pil", "image_pil": img}`, transformers'
    processors `{"type": "image", "image": img}`.
    """
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    if request.images:
        content: list[dict[str, Any]] = [{"type": pil_key, pil_key: _decode_image(b)} for b in request.images]
        content.append({"type": "text", "text": request.prompt})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": request.prompt})
    return messages


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TextEngine:
    """Base of the text engines: construct cheaply, `setup()` once per process (Ray actor), then `generate`."""

    def __init__(self, cfg: TextModelConfig) -> None:
        self.cfg = cfg

    @property
    def model_name(self) -> str:
        """The model id or path, recorded in the dataset card and manifests."""
        return self.cfg.model

    def setup(self) -> None:
        """Load the model. Separate from `__init__` so that engines can be built and shipped before loading."""
        raise NotImplementedError

    def generate(self, requests: list[TextRequest]) -> list[str]:
        """Generate one text per request, in order, in one batched call."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (and engine processes) before the process ends; `setup()` may be called again."""

    def _check_images(self, requests: list[TextRequest]) -> None:
        """Refuse requests with more images than the engine was configured for, with a clear message."""
        for i, request in enumerate(requests):
            if len(request.images) > self.cfg.max_images:
                raise ValueError(
                    f"request {i} has {len(request.images)} images but max_images is {self.cfg.max_images}"
                )


class VLLMTextEngine(TextEngine):
    """vLLM engine: `LLM.chat` over the whole batch, one `SamplingParams` per request (seed, regex).

    The same code serves CUDA (tensor parallelism, memory share, CUDA graphs unless `enforce_eager`) and vLLM's
    CPU backend, which ignores the GPU-only settings and sizes its KV cache from `VLLM_CPU_KVCACHE_SPACE`.
    """

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__(cfg)
        self._llm: Any = None
        self._structured: dict[str, Any] = {}

    def setup(self) -> None:
        """Start the vLLM engine once; a second call is a no-op."""
        if self._llm is not None:
            return
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "tokenizer": self.cfg.model,
            "dtype": self.cfg.dtype,
            "max_model_len": self.cfg.max_model_len,
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "gpu_memory_utilization": self.cfg.gpu_memory_utilization,
            "enforce_eager": self.cfg.enforce_eager,
            # Seeds are per request; the engine seed only fixes anything left unseeded.
            "seed": 0,
        }
        if not _cuda_available():
            # vLLM's CPU backend crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # split by chunked prefill (a batch of prompts over max_num_batched_tokens). Whole-prompt scheduling
            # avoids it; on GPUs vLLM's default stays.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.cfg.max_model_len, 8192)
        # Ignored for text-only models. Video off: it would otherwise be budgeted (memory profiling) at its default.
        kwargs["limit_mm_per_prompt"] = {"image": self.cfg.max_images, "video": 0}
        self._llm = LLM(**kwargs)

    def _sampling_params(self, request: TextRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        if request.regex is not None and self.cfg.structured:
            # One params object per regex: every request of a batch shares the same compiled-grammar key.
            structured = self._structured.get(request.regex)
            if structured is None:
                structured = self._structured[request.regex] = StructuredOutputsParams(regex=request.regex)
        return SamplingParams(
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            seed=request.seed,
            structured_outputs=structured,
        )

    def generate(self, requests: list[TextRequest]) -> list[str]:
        """Generate one text per request with a single batched `LLM.chat` call (vLLM keeps the input order)."""
        if not requests:
            return []
        if self._llm is None:
            raise RuntimeError("VLLMTextEngine.setup() was not called")
        self._check_images(requests)
        outputs = self._llm.chat(
            [_messages(r, "image_pil") for r in requests],
            sampling_params=[self._sampling_params(r) for r in requests],
            use_tqdm=False,
        )
        texts = []
        for request, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0]
            if request.regex is not None and completion.finish_reason == "length":
                # The constraint was cut off: the text cannot match the template. Stages reject it by parsing;
                # the log says which knob to turn.
                logger.warning(
                    "regex-constrained output hit max_tokens=%d before completing; raise max_tokens or lower "
                    "max_section_chars",
                    self.cfg.max_tokens,
                )
            texts.append(completion.text)
        return texts

    def close(self) -> None:
        """Shut the vLLM engine core down (its processes, or its in-process executor) and drop the engine."""
        if self._llm is None:
            return
        engine_core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self._llm = None
        gc.collect()


class TransformersTextEngine(TextEngine):
    """Fallback on plain transformers: `AutoModelForImageTextToText` with its processor when the checkpoint is a
    VLM, else `AutoModelForCausalLM` with its tokenizer.

    The regex in a request is NOT enforced here (transformers has no regex-constrained decoding built in), so
    outputs may break the template; stages validate every output (`strip_think`, `parse_reflection`) and reject
    bad ones either way. Requests are generated one at a time, each under its own seed, which keeps outputs
    independent of batch composition at the cost of speed: this engine is for correctness, not throughput.
    """

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__(cfg)
        self._model: Any = None
        self._processor: Any = None
        self._is_vlm = False
        self._device = "cpu"

    def setup(self) -> None:
        """Load model and processor/tokenizer once; picks a VLM class when the config says it is one."""
        if self._model is not None:
            return
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype: Any = "auto" if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)
        if self._device == "cpu" and self.cfg.dtype in ("auto", "float16", "bfloat16"):
            dtype = torch.float32  # half precision on CPU is slow or unsupported for many kernels
        config = AutoConfig.from_pretrained(self.cfg.model)
        self._is_vlm = getattr(config, "vision_config", None) is not None
        if self._is_vlm:
            self._model = AutoModelForImageTextToText.from_pretrained(self.cfg.model, dtype=dtype)
            self._processor = AutoProcessor.from_pretrained(self.cfg.model)
        else:
            self._model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype)
            self._processor = AutoTokenizer.from_pretrained(self.cfg.model)
        self._model.to(self._device).eval()

    def _tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    def _generate_one(self, request: TextRequest) -> str:
        import torch

        if request.images and not self._is_vlm:
            raise ValueError(f"{self.cfg.model} is a text-only model; it cannot take images")
        inputs = self._processor.apply_chat_template(
            _messages(request, "image"),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self._device)
        torch.manual_seed(request.seed)
        sample = self.cfg.temperature > 0
        tok = self._tokenizer()
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                max_new_tokens=self.cfg.max_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=self.cfg.top_p if sample else None,
                top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return tok.decode(new_tokens, skip_special_tokens=True)

    def generate(self, requests: list[TextRequest]) -> list[str]:
        """Generate one text per request, in order (sequentially, see the class docstring)."""
        if self._model is None:
            raise RuntimeError("TransformersTextEngine.setup() was not called")
        self._check_images(requests)
        return [self._generate_one(r) for r in requests]

    def close(self) -> None:
        """Drop model and processor."""
        self._model = None
        self._processor = None
        gc.collect()


def make_text_engine(cfg: TextModelConfig) -> TextEngine:
    """The engine named by `cfg.engine` (not yet set up: call `setup()` in the process that will use it)."""
    if cfg.engine == "vllm":
        return VLLMTextEngine(cfg)
    if cfg.engine == "transformers":
        return TransformersTextEngine(cfg)
    raise ValueError(f"unknown text engine {cfg.engine!r}")
