"""Prompt-image and image-image similarity with open_clip, for scoring I1/I2 and the verdict.

The model is whatever `open_clip.create_model_and_transforms` can load: a built-in name with a pretrained tag or a
checkpoint path (`model='ViT-L-14', pretrained='openai'`), `hf-hub:org/repo`, or `local-dir:/path` (a folder with
open_clip_config.json + weights, which is how the tiny test model is saved). torch and open_clip are imported in
`setup()` only, so importing this module is cheap.

Throughput: decoding a 1024x1024 JPEG and resizing it costs ~10 ms of CPU, more than ViT-L/14 takes per image on
a GPU, so images are decoded and preprocessed once each on a thread pool (PIL and numpy release the GIL; the
tensor conversion is done in numpy so that pool threads never start torch's own threads) while the model encodes
the chunks that are already done, and the model runs in half precision on CUDA.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from schemas.config import ScoreConfig
from schemas.local import decode_rgb
from stages.engines.image import resolve_device

_SCHEMAS = ("local-dir:", "hf-hub:")
_MAX_DEFAULT_THREADS = 32
#: A Python object address in an exception text ("<PIL... at 0x7f...>"): stripped so that messages are stable.
OBJECT_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
# open_clip's precision names: "fp16"/"bf16" convert the matmul weights only and keep LayerNorm in float32, as
# OpenAI trained CLIP; fully half ("pure_fp16") rounds more for no measurable speed on the GPU.
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class ImageDecodeError(ValueError):
    """One image could not be decoded or preprocessed; names the image and the cause."""


def default_threads() -> int:
    """Preprocessing threads when the config leaves it open: the CPUs this actor was given (Ray sets
    OMP_NUM_THREADS to the actor's num_cpus), else the CPUs this process may run on; at most 32."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return min(int(env), _MAX_DEFAULT_THREADS)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DEFAULT_THREADS))


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> 'float16' on CUDA, 'float32' elsewhere; an explicit dtype is returned unchanged."""
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"


def split_preprocess(preprocess: Any) -> tuple[Callable[[Any], Any], Any, Any] | None:
    """(the PIL part, mean, std) of an open_clip eval transform shaped [PIL transforms..., ToTensor, Normalize]
    (every open_clip model's), else None.

    Why: torchvision's ToTensor and Normalize are torch ops, and torch parallelises even a 224x224 image over its
    intra-op threads; called from N pool threads that makes N x N threads fighting for the cores (measured here:
    ToTensor 67 ms instead of 1.3 ms per image). `to_array` does the same arithmetic in numpy on the pool thread,
    bit for bit: uint8 -> float32, / 255, - mean, / std, each rounded once in float32."""
    import numpy as np

    transforms = list(getattr(preprocess, "transforms", None) or [])
    if len(transforms) < 2:
        return None
    *head, to_tensor, normalize = transforms
    names = [type(t).__name__ for t in head]
    if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or type(normalize).__name__ != "Normalize":
        return None
    if any(n in ("ToTensor", "MaybeToTensor", "PILToTensor", "Normalize", "Lambda") for n in names):
        return None
    mean = np.asarray(normalize.mean, dtype=np.float32).reshape(-1)
    std = np.asarray(normalize.std, dtype=np.float32).reshape(-1)
    if mean.size not in (1, 3) or std.size not in (1, 3):
        return None

    def pil_part(img: Any) -> Any:
        for t in head:
            img = t(img)
        return img

    return pil_part, mean, std


def to_array(img: Any, mean: Any, std: Any) -> Any:
    """An RGB PIL image -> normalised float32 CHW array, exactly as torchvision's ToTensor + Normalize compute it."""
    import numpy as np

    pixels = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator:
    """`fn(item)` for every item on `pool`, yielded in input order, with at most `ahead` calls submitted and not yet
    consumed: the consumer (the model) works on early results while later ones are computed, and memory stays
    bounded however long the input is (Executor.map would submit everything at once)."""
    window: deque[Future] = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


class ClipScorer:
    """Cosine similarities between open_clip embeddings, computed in batches of `batch_size`.

    `score_pairs` is what the score stage calls: each image decoded and preprocessed once, on a thread pool, and
    embedded once; the prompt embedded once; a bad image fails only its own row. Embeddings are L2-normalised and
    compared in float32 whatever the model's precision (`ScoreConfig.dtype`; 'auto' = float16 on CUDA, float32 on
    CPU, where the scores equal a plain one-image-at-a-time open_clip computation up to float rounding).
    """

    def __init__(
        self, cfg: ScoreConfig, device: str = "auto", batch_size: int = 64, threads: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.threads = threads or cfg.preprocess_threads or default_threads()
        self._device_request = device
        self.device: str | None = None
        self.dtype: str | None = None  # resolved in setup(): float32, float16 or bfloat16
        self._torch_dtype: Any = None
        self._model: Any = None
        self._preprocess: Any = None
        self._split: tuple[Callable[[Any], Any], Any, Any] | None = None
        self._tokenizer: Any = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def model_name(self) -> str:
        """`model` for schema'd ids (local-dir:/hf-hub:), else `model/pretrained` (e.g. 'ViT-L-14/openai')."""
        if self.cfg.model.startswith(_SCHEMAS) or not self.cfg.pretrained:
            return self.cfg.model
        return f"{self.cfg.model}/{self.cfg.pretrained}"

    def setup(self) -> None:
        """Load model, eval transform and tokenizer once; later calls do nothing."""
        if self._model is not None:
            return
        import open_clip
        import torch

        model_id = self.cfg.model
        if model_id.startswith(_SCHEMAS):
            pretrained = None  # open_clip ignores (and warns about) `pretrained` with a schema
        elif self.cfg.pretrained:
            pretrained = self.cfg.pretrained
        else:
            # Without weights a built-in name would be randomly initialised and every score meaningless.
            raise ValueError(f"score model '{model_id}' needs `pretrained` (a tag or checkpoint path)")
        self.device = resolve_device(self._device_request)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_id, pretrained=pretrained, device=self.device, precision=_PRECISION[self.dtype]
        )
        model.eval()
        self._torch_dtype = getattr(torch, self.dtype)
        self._model = model
        self._preprocess = preprocess
        self._split = split_preprocess(preprocess)
        self._tokenizer = open_clip.get_tokenizer(model_id)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="clip-preprocess")

    def close(self) -> None:
        """Stop the preprocessing threads (the model stays loaded; a later call restarts them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _check(self) -> None:
        if self._model is None:
            raise RuntimeError("ClipScorer.setup() was not called")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="clip-preprocess")

    # --- preprocessing and encoding ------------------------------------------------------------------------------

    def _pixels(self, item: tuple[str, bytes]) -> Any:
        """Decode + preprocess one image (on a pool thread); an ImageDecodeError instead of raising, so one bad
        image cannot stop the others."""
        label, data = item
        try:
            img = decode_rgb(data)
            if self._split is None:
                return self._preprocess(img)
            pil_part, mean, std = self._split
            img = pil_part(img)
            if getattr(img, "mode", None) == "RGB":
                return to_array(img, mean, std)
            return self._preprocess.transforms[-1](self._preprocess.transforms[-2](img))  # not RGB: torchvision's way
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            # PIL names the buffer object with its memory address: dropped, so that reasons are the same every run.
            why = OBJECT_ADDRESS.sub("", str(exc))
            return ImageDecodeError(f"{label}: cannot decode image of {len(data)} bytes ({type(exc).__name__}: {why})")

    def _encode_pixels(self, images: list[Any]) -> Any:
        """L2-normalised float32 embeddings of preprocessed images (CHW arrays or tensors; one model call)."""
        import torch

        pixels = torch.stack([torch.as_tensor(x) for x in images]).to(self.device).to(self._torch_dtype)
        with torch.inference_mode():
            features = self._model.encode_image(pixels)
        # Normalised in float32: in half precision a unit vector's own dot product is 1 only to ~1e-3.
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def embed_images(self, items: Sequence[tuple[str, bytes]]) -> tuple[Any, list[ImageDecodeError | None]]:
        """Embeddings of every image that decodes (rows in input order, failures skipped) and, per input image,
        None or its ImageDecodeError. Preprocessing runs ahead of the model by a bounded window."""
        import torch

        assert self._pool is not None
        ahead = max(2 * self.batch_size, 2 * self.threads)
        errors: list[ImageDecodeError | None] = []
        chunk: list[Any] = []
        rows: list[Any] = []
        for result in ordered_map(self._pool, self._pixels, items, ahead):
            if isinstance(result, ImageDecodeError):
                errors.append(result)
                continue
            errors.append(None)
            chunk.append(result)
            if len(chunk) == self.batch_size:
                rows.append(self._encode_pixels(chunk))
                chunk = []
        if chunk:
            rows.append(self._encode_pixels(chunk))
        if not rows:
            return torch.empty(0), errors
        return torch.cat(rows), errors

    def encode_texts(self, texts: list[str]) -> Any:
        """L2-normalised float32 text embeddings, one row per text."""
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                features = self._model.encode_text(tokens)
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(rows)

    @staticmethod
    def _rowwise_cosine(a: Any, b: Any) -> list[float]:
        """Dot products of matching rows of two normalised matrices, clamped to [-1, 1] against rounding."""
        return (a * b).sum(dim=-1).clamp(-1.0, 1.0).cpu().tolist()

    def _images_or_raise(self, images: Sequence[bytes]) -> Any:
        embedded, errors = self.embed_images([(f"image {k}", b) for k, b in enumerate(images)])
        for err in errors:
            if err is not None:
                raise err
        return embedded

    # --- public API ----------------------------------------------------------------------------------------------

    def score_pairs(
        self,
        prompts: Sequence[str],
        first: Sequence[bytes],
        second: Sequence[bytes],
        names: tuple[str, str] = ("I1", "I2"),
        with_embedding: bool = False,
    ) -> list[tuple[Any, ...] | ImageDecodeError]:
        """Per row: (cos(prompt, first), cos(prompt, second), cos(first, second)), or the ImageDecodeError of the
        row's first bad image (named by `names`). Each image is decoded, preprocessed and embedded once.
        `with_embedding`: each tuple also holds the second image's normalised embedding as float32 bytes (what the
        build keeps for the near-duplicate pass over I2s)."""
        self._check()
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"got {len(prompts)} prompts, {len(first)} and {len(second)} images")
        n = len(prompts)
        if n == 0:
            return []
        import torch

        # Interleaved (row 0 first, row 0 second, row 1 first, ...) so that a row's two images finish together.
        items = [(names[j], (first, second)[j][k]) for k in range(n) for j in (0, 1)]
        embedded, errors = self.embed_images(items)
        row_error = [errors[2 * k] or errors[2 * k + 1] for k in range(n)]
        good = [k for k in range(n) if row_error[k] is None]
        scores: dict[int, tuple[Any, ...]] = {}
        if good:
            # `embedded` holds only the images that decoded: image j's row there is the count of good ones before it.
            slot, position = [], 0
            for err in errors:
                slot.append(position)
                position += err is None
            a = embedded[torch.tensor([slot[2 * k] for k in good], device=embedded.device)]
            b = embedded[torch.tensor([slot[2 * k + 1] for k in good], device=embedded.device)]
            text = self.encode_texts([prompts[k] for k in good])
            columns = [self._rowwise_cosine(text, a), self._rowwise_cosine(text, b), self._rowwise_cosine(a, b)]
            if with_embedding:
                columns.append([row.tobytes() for row in b.cpu().numpy().astype("<f4")])
            scores = dict(zip(good, zip(*columns, strict=True), strict=True))
        return [scores[k] if err is None else err for k, err in enumerate(row_error)]

    def text_image(self, prompts: list[str], images: list[bytes]) -> list[float]:
        """Cosine similarity of prompts[i] and images[i] (encoded PNG/JPEG) for every i. A bad image raises
        ImageDecodeError naming it (the score stage uses `score_pairs`, which fails only that row)."""
        self._check()
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        if not prompts:
            return []
        return self._rowwise_cosine(self.encode_texts(list(prompts)), self._images_or_raise(images))

    def image_image(self, a: list[bytes], b: list[bytes]) -> list[float]:
        """Cosine similarity of a[i] and b[i] (encoded PNG/JPEG) for every i, e.g. I1 vs I2."""
        self._check()
        if len(a) != len(b):
            raise ValueError(f"got {len(a)} and {len(b)} images")
        if not a:
            return []
        both = self._images_or_raise([*a, *b])
        return self._rowwise_cosine(both[: len(a)], both[len(a) :])
