"""Prompt-image and image-image similarity with open_clip, for scoring I1/I2 and the verdict.

The model is whatever `open_clip.create_model_and_transforms` can load: a built-in name with a pretrained tag or a
checkpoint path (`model='ViT-L-14', pretrained='openai'`), `hf-hub:org/repo`, or `local-dir:/path` (a folder with
open_clip_config.json + weights, which is how the tiny test model is saved). torch and open_clip are imported in
`setup()` only, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any

from schemas.config import ScoreConfig
from stages.engines.image import decode_image, resolve_device

_SCHEMAS = ("local-dir:", "hf-hub:")


class ClipScorer:
    """Cosine similarities between open_clip embeddings, computed in batches of `batch_size`.

    Inference runs in float32 on every device so that scores, and therefore verdicts, do not depend on where a
    shard was built; CLIP is cheap next to diffusion, so this costs little.
    """

    def __init__(self, cfg: ScoreConfig, device: str = "auto", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.batch_size = batch_size
        self._device_request = device
        self.device: str | None = None
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None

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

        model_id = self.cfg.model
        if model_id.startswith(_SCHEMAS):
            pretrained = None  # open_clip ignores (and warns about) `pretrained` with a schema
        elif self.cfg.pretrained:
            pretrained = self.cfg.pretrained
        else:
            # Without weights a built-in name would be randomly initialised and every score meaningless.
            raise ValueError(f"score model '{model_id}' needs `pretrained` (a tag or checkpoint path)")
        self.device = resolve_device(self._device_request)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_id, pretrained=pretrained, device=self.device, precision="fp32"
        )
        model.eval()
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(model_id)

    def _check(self) -> None:
        if self._model is None:
            raise RuntimeError("ClipScorer.setup() was not called")

    def _encode_images(self, images: list[bytes]) -> Any:
        """L2-normalised image embeddings (float32, on the model's device), one row per image."""
        import torch

        rows = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self._preprocess(decode_image(b)) for b in chunk]).to(self.device)
            with torch.inference_mode():
                rows.append(self._model.encode_image(pixels, normalize=True).float())
        return torch.cat(rows)

    def _encode_texts(self, texts: list[str]) -> Any:
        """L2-normalised text embeddings (float32, on the model's device), one row per text."""
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                rows.append(self._model.encode_text(tokens, normalize=True).float())
        return torch.cat(rows)

    @staticmethod
    def _rowwise_cosine(a: Any, b: Any) -> list[float]:
        """Dot products of matching rows of two normalised matrices, clamped to [-1, 1] against rounding."""
        return (a * b).sum(dim=-1).clamp(-1.0, 1.0).cpu().tolist()

    def text_image(self, prompts: list[str], images: list[bytes]) -> list[float]:
        """Cosine similarity of prompts[i] and images[i] (encoded PNG/JPEG) for every i."""
        self._check()
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        if not prompts:
            return []
        return self._rowwise_cosine(self._encode_texts(list(prompts)), self._encode_images(list(images)))

    def image_image(self, a: list[bytes], b: list[bytes]) -> list[float]:
        """Cosine similarity of a[i] and b[i] (encoded PNG/JPEG) for every i, e.g. I1 vs I2."""
        self._check()
        if len(a) != len(b):
            raise ValueError(f"got {len(a)} and {len(b)} images")
        if not a:
            return []
        both = self._encode_images([*a, *b])
        return self._rowwise_cosine(both[: len(a)], both[len(a) :])
