"""The prompt safety check: a score per prompt, run on the driver before any GPU work (`curation.prompt_safety`).

Two engines behind one interface, `score(texts) -> [(score, what decided)]`:

- embedding (zero-shot, default): the largest cosine similarity between the prompt's sentence embedding and the
  embeddings of the configured unsafe `concepts`. It reuses the embeddings the near-duplicate filter computes (one
  embedding pass for both filters).
- classifier: a transformers sequence-classification model (`classifier`, Hub id or folder); the score is the
  softmax probability mass of the labels named in `unsafe_labels` (matched to the model's id2label, any case).

In both, a prompt containing a `blocklist` word or phrase (whole words, any case) scores 1.0.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.config import PromptSafetyConfig
from stages.engines.embed import quiet_loading
from stages.engines.image import resolve_device

#: Prompts per forward pass of the classifier, and the tokens it reads.
CLASSIFIER_BATCH = 64
CLASSIFIER_MAX_LENGTH = 256


class PromptSafetyError(ValueError):
    """The safety check cannot run as configured; names the config field."""


def blocklist_pattern(words: tuple[str, ...] | list[str]) -> re.Pattern[str] | None:
    """One regex matching any blocklist entry as whole words, any case, any run of spaces inside a phrase."""
    parts = [r"\s+".join(re.escape(w) for w in entry.split()) for entry in words if entry.strip()]
    if not parts:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


class PromptSafety:
    """Scores prompts for unsafe content. `embedder` (a set-up SentenceEmbedder) is needed by the embedding engine."""

    def __init__(self, cfg: PromptSafetyConfig, embedder: Any = None) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self._blocklist = blocklist_pattern(cfg.blocklist)
        self._concepts: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._unsafe_ids: list[int] = []

    def setup(self) -> None:
        if self.cfg.engine == "embedding":
            if self.embedder is None:
                raise PromptSafetyError(
                    "curation.prompt_safety.engine 'embedding' needs the sentence embedder (curation.embedder)"
                )
            if not self.cfg.concepts:
                raise PromptSafetyError("curation.prompt_safety.concepts is empty (the embedding engine needs some)")
            self._concepts = self.embedder.embed(list(self.cfg.concepts))
        else:
            self._setup_classifier()

    def _setup_classifier(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        name = self.cfg.classifier
        if not name:
            raise PromptSafetyError("curation.prompt_safety.classifier must be set when engine is 'classifier'")
        with quiet_loading():
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(name)
                self._model = AutoModelForSequenceClassification.from_pretrained(name)
            except OSError as exc:
                raise PromptSafetyError(f"curation.prompt_safety.classifier: cannot load '{name}': {exc}") from exc
        id2label = {int(k): str(v) for k, v in self._model.config.id2label.items()}
        wanted = {label.lower() for label in self.cfg.unsafe_labels}
        self._unsafe_ids = sorted(i for i, label in id2label.items() if label.lower() in wanted)
        if not self._unsafe_ids:
            raise PromptSafetyError(
                f"curation.prompt_safety.unsafe_labels: none of {list(self.cfg.unsafe_labels)} is a label of the "
                f"classifier '{name}' (its labels: {[id2label[i] for i in sorted(id2label)]})"
            )
        self._id2label = id2label
        self._device = resolve_device("auto")
        self._model.to(self._device).eval()
        self._torch = torch

    def score(self, texts: list[str], embeddings: Any = None) -> list[tuple[float, str]]:
        """(score, what decided) per text: 'blocklist <word>', 'concept <concept>' or 'classifier <top label>'.
        `embeddings`: the texts' L2-normalised embeddings when already computed (embedding engine)."""
        if self.cfg.engine == "embedding":
            out = self._score_embedding(texts, embeddings)
        else:
            out = self._score_classifier(texts)
        if self._blocklist is not None:
            for k, text in enumerate(texts):
                hit = self._blocklist.search(text)
                if hit:
                    out[k] = (1.0, f"blocklist '{hit.group(0).lower()}'")
        return out

    def _score_embedding(self, texts: list[str], embeddings: Any) -> list[tuple[float, str]]:
        if self._concepts is None:
            raise RuntimeError("PromptSafety.setup() was not called")
        if not texts:
            return []
        emb = self.embedder.embed(texts) if embeddings is None else embeddings
        if len(emb) != len(texts):
            raise ValueError(f"{len(emb)} embeddings for {len(texts)} prompts")
        sims = emb @ self._concepts.T  # (n, concepts): cosines of unit rows
        best = sims.argmax(axis=1)
        return [(float(sims[k, c]), f"concept '{self.cfg.concepts[c]}'") for k, c in enumerate(best.tolist())]

    def _score_classifier(self, texts: list[str]) -> list[tuple[float, str]]:
        if self._model is None:
            raise RuntimeError("PromptSafety.setup() was not called")
        torch = self._torch
        out: list[tuple[float, str]] = []
        max_length = min(CLASSIFIER_MAX_LENGTH, int(getattr(self._tokenizer, "model_max_length", 10**6)))
        with torch.inference_mode():
            for s in range(0, len(texts), CLASSIFIER_BATCH):
                enc = self._tokenizer(
                    texts[s : s + CLASSIFIER_BATCH],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(self._device)
                probs = self._model(**enc).logits.float().softmax(dim=-1).cpu()
                unsafe = probs[:, self._unsafe_ids].sum(dim=1)
                top = probs.argmax(dim=1)
                for p, t in zip(unsafe.tolist(), top.tolist(), strict=True):
                    out.append((float(p), f"classifier '{self._id2label[t]}'"))
        return out
