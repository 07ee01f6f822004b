"""The model side of the trainer: what a unified text+image model must provide, and the Janus / Janus-Pro adapter.

The trainer talks to a model only through `ModelAdapter`: a `SequenceFormat` (tokenizer, special ids, image slot
counts) for the data side, image preprocessing, a trainable `torch.nn.Module` whose forward scores a
`PackedBatch`, and export with `save_pretrained`. Another unified model (Show-o, BAGEL, ...) plugs in by
implementing the same class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from schemas.local import decode_rgb
from trainer.batch import PackedBatch
from trainer.records import SequenceFormat


class ModelAdapter(ABC):
    """What a unified model must provide to the IRGL trainer."""

    #: The trainable module; its forward(batch: dict of tensors) returns per-token losses (see `LossParts`).
    module: Any

    @abstractmethod
    def sequence_format(self) -> SequenceFormat:
        """Tokenizer, chat template pieces, special ids and the number of slots per image, for the data side."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens."""

    @abstractmethod
    def preprocess_understanding(self, images: list[bytes]) -> Any:
        """Encoded image files -> pixel tensor [N, C, H, W] for the understanding encoder."""

    @abstractmethod
    def preprocess_generation(self, images: list[bytes]) -> Any:
        """Encoded image files -> pixel tensor [N, C, H, W] for the generation tokenizer (VQ-VAE)."""

    @abstractmethod
    def freeze(self, vision: bool) -> None:
        """Freeze what must not train (the generation tokenizer always; the understanding encoder optionally)."""

    def batch_tensors(self, batch: PackedBatch) -> dict[str, Any]:
        """The tensors of a PackedBatch the module's forward takes (images preprocessed here, on the worker)."""
        import torch

        empty = torch.zeros((0, 3, 1, 1))
        return {
            "input_ids": batch.input_ids,
            "position_ids": batch.position_ids,
            "text_labels": batch.text_labels,
            "image_target": batch.image_target,
            "mode_ids": batch.mode_ids,
            "record_index": batch.record_index,
            "vit_positions": batch.vit_positions,
            "vit_pixels": self.preprocess_understanding(batch.vit_images) if batch.vit_images else empty,
            "gen_positions": batch.gen_positions,
            "gen_pixels": self.preprocess_generation(batch.gen_images) if batch.gen_images else empty,
        }

    @abstractmethod
    def save_pretrained(self, path: Path | str, state_dict: dict[str, Any] | None = None) -> None:
        """Export (the weights of `state_dict` when given, keys as in `module.state_dict()`) loadable by
        `from_pretrained`, with the tokenizer/processor."""


def record_attention_mask(record_index: Any, attn_implementation: str, dtype: Any) -> Any:
    """The attention mask of a packed sequence: position q sees position k exactly when k <= q and both belong to the
    same record (`record_index` [1, L]), so packed records never attend to each other. [1, 1, L, L], in the form
    the attention implementation takes: bool (True = attend) for sdpa, additive (0 / dtype min) for eager.

    Passed to the language model as a ready 4D mask, it is used as is: isolation does not rest on transformers
    inferring record boundaries from the position ids.
    """
    import torch

    rec = record_index[0]
    pos = torch.arange(rec.shape[0], device=rec.device)
    allowed = (rec[:, None] == rec[None, :]) & (pos[:, None] >= pos[None, :])
    if attn_implementation == "sdpa":
        return allowed[None, None]
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=rec.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
    raise ValueError(f"packed training needs attn_implementation sdpa or eager, got {attn_implementation!r}")


def _janus_module_class() -> type:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _JanusIRGL(nn.Module):
        """Janus / Janus-Pro scoring a packed IRGL sequence.

        Input embeddings: text tokens through the LM's embedding table; understanding slots get the vision
        encoder's features through the aligner; generation slots (conditions and targets, teacher-forced) get the
        embeddings of the image's VQ tokens through the generation embeddings and aligner. Text targets are
        scored with the LM head, image targets with the generation head, each from the previous position's hidden
        state; logits are computed only where there is a target.
        """

        def __init__(self, janus: Any) -> None:
            super().__init__()
            self.janus = janus

        def encode_understanding(self, pixels: torch.Tensor) -> torch.Tensor:
            """[N, C, H, W] -> [N, num_vit_tokens, hidden]: vision encoder + aligner."""
            inner = self.janus.model
            return inner.aligner(inner.vision_model(pixels).last_hidden_state)

        @torch.no_grad()
        def image_to_generation_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
            """[N, C, H, W] -> [N, num_gen_tokens] VQ codes from the frozen VQ-VAE encoder."""
            vq = self.janus.model.vqmodel
            return vq.encode(pixels.to(next(vq.parameters()).dtype)).image_tokens.view(pixels.shape[0], -1)

        def generation_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
            """[N, T] VQ codes -> [N, T, hidden]: generation embeddings + generation aligner."""
            return self.janus.prepare_embeddings_for_image_generation(tokens)

        def forward(self, **b: torch.Tensor) -> dict[str, torch.Tensor]:
            inner = self.janus.model
            input_ids = b["input_ids"]
            embeds = inner.get_input_embeddings()(input_ids)[0]
            image_labels = torch.full_like(input_ids[0], -100)
            # A pack without understanding (or generation) images still runs that branch, on an empty batch: every
            # trainable weight then gets a gradient (zero) on every rank, which FSDP needs (it reduces the gradients
            # of a whole parameter group at once and the ranks' groups must match), for free.
            if b["vit_positions"].numel():
                pixels = b["vit_pixels"].to(embeds.dtype)
            else:
                size = self.janus.config.vision_config.image_size
                pixels = embeds.new_zeros((0, 3, size, size))
            # Under autocast the encoder's output is bf16 while the embedding lookup stays float32.
            feats = self.encode_understanding(pixels).to(embeds.dtype)
            if feats.shape[0]:
                embeds = embeds.index_put((b["vit_positions"].reshape(-1),), feats.reshape(-1, embeds.shape[-1]))
            else:
                embeds = embeds + feats.sum()  # adds 0 and connects the encoder to the loss
            if b["gen_positions"].numel():
                codes = self.image_to_generation_tokens(b["gen_pixels"])
                gen = self.generation_embeddings(codes).to(embeds.dtype)
                flat = b["gen_positions"].reshape(-1)
                embeds = embeds.index_put((flat,), gen.reshape(-1, embeds.shape[-1]))
                image_labels[flat] = codes.reshape(-1)
            else:
                embeds = embeds + self.generation_embeddings(input_ids.new_zeros((0, 1))).to(embeds.dtype).sum()
            image_labels = torch.where(b["image_target"][0], image_labels, torch.full_like(image_labels, -100))
            lm = inner.language_model
            mask = record_attention_mask(b["record_index"], lm.config._attn_implementation, embeds.dtype)
            hidden = lm(
                inputs_embeds=embeds.unsqueeze(0), attention_mask=mask, position_ids=b["position_ids"], use_cache=False
            ).last_hidden_state[0]
            text_labels = b["text_labels"][0]
            modes = b["mode_ids"][0]
            out: dict[str, torch.Tensor] = {}
            # Position t is predicted from hidden state t-1 (records never start with a target, so no leaks).
            t_idx = (text_labels[1:] != -100).nonzero().squeeze(-1) + 1
            logits = self.janus.lm_head(hidden[t_idx - 1]).float()
            out["text_loss"] = F.cross_entropy(logits, text_labels[t_idx], reduction="none")
            out["text_mode"] = modes[t_idx]
            i_idx = (image_labels[1:] != -100).nonzero().squeeze(-1) + 1
            logits = inner.generation_head(hidden[i_idx - 1]).float()
            out["image_loss"] = F.cross_entropy(logits, image_labels[i_idx], reduction="none")
            out["image_mode"] = modes[i_idx]
            return out

    return _JanusIRGL


class JanusAdapter(ModelAdapter):
    """Janus / Janus-Pro through `transformers.JanusForConditionalGeneration` and its `JanusProcessor`."""

    def __init__(self, path: str, *, dtype: Any = "float32", attn_implementation: str = "sdpa") -> None:
        from transformers import AutoProcessor, JanusForConditionalGeneration

        self.path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        # Always an explicit dtype: transformers 5 turns dtype=None into "auto", which would give the bfloat16 the
        # Janus-Pro checkpoints declare, i.e. bf16 master weights whose small updates round away. Training keeps
        # float32 weights and computes in bf16 through autocast / FSDP's mixed-precision policy.
        janus = JanusForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
        self.config = janus.config
        self.module = _janus_module_class()(janus)
        self._format: SequenceFormat | None = None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sequence_format(self) -> SequenceFormat:
        if self._format is None:
            tok = self.tokenizer
            ids = tok.convert_tokens_to_ids
            self._format = SequenceFormat(
                tokenize=self.tokenize,
                bos_id=tok.bos_token_id,
                eos_id=tok.eos_token_id,
                boi_id=ids(tok.boi_token),
                eoi_id=ids(tok.eoi_token),
                vit_id=self.config.image_token_id,
                gen_id=tok.pad_token_id if tok.pad_token_id is not None else self.config.image_token_id,
                num_vit_tokens=self.config.vision_config.num_image_tokens,
                num_gen_tokens=self.config.vq_config.num_patches**2,
            )
        return self._format

    def _pixels(self, images: list[bytes]) -> Any:
        return self.processor.image_processor([decode_rgb(b) for b in images], return_tensors="pt")["pixel_values"]

    def preprocess_understanding(self, images: list[bytes]) -> Any:
        return self._pixels(images)

    def preprocess_generation(self, images: list[bytes]) -> Any:
        # Janus-Pro's generation tokenizer takes the same 384 px, [-1, 1]-normalised input as its SigLIP encoder.
        return self._pixels(images)

    def freeze(self, vision: bool) -> None:
        inner = self.module.janus.model
        inner.vqmodel.requires_grad_(False)
        inner.vqmodel.eval()
        if vision:
            inner.vision_model.requires_grad_(False)

    def save_pretrained(self, path: Path | str, state_dict: dict[str, Any] | None = None) -> None:
        janus = self.module.janus
        if state_dict is not None:
            state_dict = {k.removeprefix("janus."): v for k, v in state_dict.items()}
        janus.save_pretrained(path, state_dict=state_dict)
        self.processor.save_pretrained(path)


def load_adapter(kind: str, path: str, *, dtype: Any = "float32") -> ModelAdapter:
    """The adapter named in the config, loading weights from `path` (a Hub id or a local folder) in `dtype`
    (float32 by default, whatever the checkpoint declares: the trainer's master weights)."""
    if kind == "janus":
        return JanusAdapter(path, dtype=dtype)
    raise ValueError(f"unknown adapter {kind!r}")
