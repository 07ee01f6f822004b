"""Text / vision-language generation behind one small interface, so that stages do not depend on an engine.

`VLLMTextEngine` is the production path (vLLM, batched, per-request seeds, regex-constrained structured outputs) and
runs unchanged on CUDA and on vLLM's CPU backend. `TransformersTextEngine` is the fallback for environments
without vLLM; it does not enforce the regex (see its docstring), so stages must still validate outputs.

Heavy libraries (vllm, torch, transformers, PIL) are imported inside methods: importing this module is cheap and
an actor only pays for the engine it actually uses. Never import ray here.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from schemas.config import TextModelConfig
from schemas.local import decode_rgb
from stages.engines.errors import EngineDead, is_engine_dead

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


def _messages(request: TextRequest, pil_key: str) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for a request: images first, then the text, as the VLM templates expect.

    `pil_key` names the image content part: vLLM takes `{"type": "image_pil", "image_pil": img}`, transformers'
    processors `{"type": "image", "image": img}`.
    """
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    if request.images:
        content: list[dict[str, Any]] = [{"type": pil_key, pil_key: decode_rgb(b)} for b in request.images]
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

    async def agenerate(self, requests: list[TextRequest]) -> list[str | Exception]:
        """Generate without blocking the caller's event loop: one result per request, in order, a row's exception
        in place of its text. This default runs `generate` row by row in a worker thread, one call at a time
        (engines without their own scheduler gain nothing from concurrent calls)."""
        import asyncio

        if not hasattr(self, "_alock"):
            self._alock = asyncio.Lock()
        async with self._alock:
            return await asyncio.to_thread(self._generate_rows, requests)

    def _generate_rows(self, requests: list[TextRequest]) -> list[str | Exception]:
        results: list[str | Exception] = []
        for request in requests:
            try:
                results.append(self.generate([request])[0])
            except Exception as exc:
                if is_engine_dead(exc):
                    raise
                results.append(exc)
        return results

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
    """vLLM engine with continuous batching: one engine loop, any number of callers.

    A background thread (the engine loop) owns vLLM's `LLMEngine`: it adds the requests that callers submit and
    steps the engine while anything is in flight. vLLM's scheduler admits new requests at every step, so a batch
    that arrives while another is still decoding joins the running batch instead of waiting for its longest output
    (what one blocking `LLM.chat` per batch did). `generate` (blocking) and `agenerate` (asyncio) both submit to the
    loop; the Ray Data actor keeps several batches in flight with `agenerate`.

    Why our own loop rather than vLLM's `AsyncLLM`: the scheduler and model runner are the same (continuous batching
    happens in the engine core either way), but `AsyncLLM` always runs the engine core in a separate process, while
    `LLMEngine` runs it in-process or in its own process per `VLLM_ENABLE_V1_MULTIPROCESSING` (production keeps
    vLLM's default: its own process). On CPU test machines the in-process core saves ~35 s per engine start.

    Errors: a request that vLLM refuses when it is added (too long, bad image) fails only its row; an exception
    while stepping, or a dead engine core (`EngineDeadError`), kills the loop: every pending and later call raises
    `EngineDead` at once, and the caller (the Ray actor) must replace the process. Nothing waits on a dead engine.

    The same code serves CUDA (tensor parallelism, memory share, CUDA graphs unless `enforce_eager`) and vLLM's
    CPU backend, which ignores the GPU-only settings and sizes its KV cache from `VLLM_CPU_KVCACHE_SPACE`.
    """

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__(cfg)
        self._llm: Any = None
        self._structured: dict[str, Any] = {}
        self._loop: _EngineLoop | None = None

    def setup(self) -> None:
        """Start the vLLM engine and its loop thread once; a second call is a no-op."""
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
        if self.cfg.tensor_parallel_size > 1:
            # The tensor-parallel workers are child processes of the engine core ("mp"), so they inherit the GPUs
            # that Ray gave this actor (CUDA_VISIBLE_DEVICES = its `num_gpus`). vLLM's "ray" backend would ask
            # Ray for a second set of GPUs from inside an actor that already holds them. See docs/ENGINES.md.
            kwargs["distributed_executor_backend"] = "mp"
        if not _cuda_available():
            # vLLM's CPU backend crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # split by chunked prefill (a batch of prompts over max_num_batched_tokens). Whole-prompt scheduling
            # avoids it; on GPUs vLLM's default stays.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.cfg.max_model_len, 8192)
        # Ignored for text-only models. Video off: it would otherwise be budgeted (memory profiling) at its default.
        kwargs["limit_mm_per_prompt"] = {"image": self.cfg.max_images, "video": 0}
        import psutil

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._llm = LLM(**kwargs)
        self._loop = _EngineLoop(self._llm, self._add, self._text, _engine_processes(before), self.cfg.stall_seconds)
        self._loop.start()

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

    def _add(self, request: TextRequest) -> str:
        """Render one request with the model's chat template and add it to the engine (loop thread only). Returns
        the id its outputs carry: vLLM returns its internal id, `<our id>-<8 random characters>`."""
        (internal_id,) = self._llm.enqueue_chat(
            [_messages(request, "image_pil")], sampling_params=[self._sampling_params(request)], use_tqdm=False
        )
        return internal_id.rsplit("-", 1)[0]

    def _text(self, request: TextRequest, output: Any) -> str:
        completion = output.outputs[0]
        if request.regex is not None and completion.finish_reason == "length":
            # The constraint was cut off: the text cannot match the template. Stages reject it by parsing; the log
            # says which knob to turn.
            logger.warning(
                "regex-constrained output hit max_tokens=%d before completing; raise max_tokens or lower "
                "max_section_chars",
                self.cfg.max_tokens,
            )
        return completion.text

    def _submit(self, requests: list[TextRequest]) -> Future:
        if self._loop is None:
            raise RuntimeError("VLLMTextEngine.setup() was not called")
        self._check_images(requests)
        return self._loop.submit(requests)

    def generate(self, requests: list[TextRequest]) -> list[str]:
        """Generate one text per request, in order; blocks until all are done. Raises the first row's error."""
        if not requests:
            return []
        results = self._submit(requests).result()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def agenerate(self, requests: list[TextRequest]) -> list[str | Exception]:
        """Generate one text per request, in order, without blocking the event loop; other calls may run
        meanwhile and share the engine's batches. A row that vLLM refused holds its exception; a dead engine
        raises `EngineDead` for the whole call."""
        import asyncio

        if not requests:
            return []
        return await asyncio.wrap_future(self._submit(requests))

    def close(self) -> None:
        """Stop the loop thread, shut the vLLM engine core down (its processes, or its in-process executor)."""
        if self._llm is None:
            return
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        engine_core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self._llm = None
        gc.collect()


class _EngineLoop:
    """The thread that owns a vLLM `LLM`: adds submitted requests between steps, steps while any is in flight and
    resolves each submission's future when its last request finishes. Only this thread touches the engine.

    A watchdog thread declares the engine dead when one of its processes (`VLLM::EngineCore`, tensor-parallel
    workers) is gone, or when no step has finished for `stall_seconds` while requests are in flight. It must not
    rely on the engine to notice: when vLLM 0.32's engine-core monitor sees the core die, it shuts the output thread
    down without telling `step()`, which then waits forever on an empty queue.
    """

    def __init__(self, llm: Any, add: Any, text: Any, watch: list[Any], stall_seconds: float) -> None:
        self._llm = llm
        self._add = add  # (TextRequest) -> request id
        self._text = text  # (TextRequest, RequestOutput) -> str
        self._watch = watch  # psutil.Process of each engine process (empty: the engine runs in this process)
        self._stall_seconds = stall_seconds
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, tuple[_Submission, int]] = {}  # request id -> (submission, position)
        self._lock = threading.Lock()  # guards _waiting, _dead and the inbox against the watchdog's _die
        self._dead: BaseException | None = None
        self._progress = time.monotonic()  # when the last step returned (or the loop went idle)
        self._stopped = threading.Event()
        self.peak_in_flight = 0  # most requests in the engine at once (shows that callers share its batches)
        self._thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self._watchdog = threading.Thread(target=self._watch_engine, name="vllm-engine-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def submit(self, requests: list[TextRequest]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(EngineDead(f"the vLLM engine is dead: {self._dead}"))
            else:
                self._inbox.put(_Submission(requests, future))
        return future

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while True:
                # Block for work only when nothing is in flight; otherwise take what has arrived and step.
                block = not self._waiting
                while True:
                    try:
                        item = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    if item is None:
                        return
                    with self._lock:
                        if self._dead is not None:
                            return
                        self._admit(item)
                    block = False
                if self._waiting:
                    self._progress = time.monotonic()
                    outputs = self._llm.llm_engine.step()
                    self._progress = time.monotonic()
                    with self._lock:
                        if self._dead is not None:
                            return
                        for output in outputs:
                            if output.finished:
                                self._finish(output)
        except BaseException as exc:  # noqa: BLE001 - any failure while stepping leaves the engine unusable
            self._die(exc)

    def _watch_engine(self) -> None:
        while not self._stopped.wait(1.0) and self._dead is None:
            gone = [p for p in self._watch if not _process_alive(p)]
            if gone:
                self._die(EngineDead(f"engine process {gone[0].pid} ({_process_title(gone[0])}) is gone"))
                return
            stalled = time.monotonic() - self._progress
            if self._waiting and stalled > self._stall_seconds:
                self._die(EngineDead(f"no engine step finished in {stalled:.0f} s with requests in flight"))
                return

    def _admit(self, sub: _Submission) -> None:
        for position, request in enumerate(sub.requests):
            try:
                request_id = self._add(request)
            except Exception as exc:
                if is_engine_dead(exc):
                    raise
                sub.set(position, exc)  # vLLM refused this row (too long, bad image, ...): only it fails
                continue
            self._waiting[request_id] = (sub, position)
        self.peak_in_flight = max(self.peak_in_flight, len(self._waiting))

    def _finish(self, output: Any) -> None:
        sub, position = self._waiting.pop(output.request_id)
        try:
            sub.set(position, self._text(sub.requests[position], output))
        except Exception as exc:  # noqa: BLE001 - a bad output fails its row only
            sub.set(position, exc)

    def _die(self, exc: BaseException) -> None:
        """Mark the engine dead and fail every waiting and queued submission at once (from either thread)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = exc
            subs = {id(sub): sub for sub, _ in self._waiting.values()}
            self._waiting.clear()
            while True:  # also fail what was submitted but not yet admitted
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    subs[id(item)] = item
        logger.error("vLLM engine loop stopped: %s: %s", type(exc).__name__, exc)
        dead = EngineDead(f"the vLLM engine is dead: {type(exc).__name__}: {exc}")
        for sub in subs.values():
            if not sub.future.done():
                sub.future.set_exception(dead)


def _engine_processes(before: set[int]) -> list[Any]:
    """The processes vLLM started for an engine (titles `VLLM::...`: engine core, tensor-parallel workers) among the
    children of this process that were not there before it started."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in before and _process_title(child).startswith("VLLM::"):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _process_title(proc: Any) -> str:
    try:
        return " ".join(proc.cmdline()).strip()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return "?"


def _process_alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Submission:
    """One caller's requests and the future that resolves, in order, once every one has a result."""

    def __init__(self, requests: list[TextRequest], future: Future) -> None:
        self.requests = requests
        self.future = future
        self.results: list[Any] = [None] * len(requests)
        self.left = len(requests)
        if not requests:
            future.set_result([])

    def set(self, position: int, result: Any) -> None:
        self.results[position] = result
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.results)


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

    def inputs(self, request: TextRequest) -> Any:
        """The model inputs of one request, as `generate` passes them to the model: token ids and, for a VLM
        request with images, the processed images (`pixel_values`, `image_grid_thw`)."""
        if request.images and not self._is_vlm:
            raise ValueError(f"{self.cfg.model} is a text-only model; it cannot take images")
        return self._processor.apply_chat_template(
            _messages(request, "image"),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self._device)

    def next_token_logits(self, request: TextRequest) -> Any:
        """The model's logits for the first generated token of `request` (a float32 CPU tensor of vocabulary size)."""
        import torch

        with torch.inference_mode():
            return self._model(**self.inputs(request)).logits[0, -1].float().cpu()

    def _generate_one(self, request: TextRequest) -> str:
        import torch

        inputs = self.inputs(request)
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
