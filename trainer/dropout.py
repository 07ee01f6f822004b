"""Condition dropout for classifier-free guidance, drawn per (seed, stage, record id, step): a pure function."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.draws import uniforms
from trainer.records import GEN, TEXT, VIT, EncodedRecord, SequenceFormat


@dataclass(frozen=True)
class ConditionDropout:
    """Probabilities of dropping each kind of condition of a record (see `apply_dropout`)."""

    text: float = 0.0  # all text before a target image -> pad tokens (records with an image target only)
    gen_image: float = 0.0  # a generation-encoder (VQ / "clean VAE") image condition block is removed
    vit_image: float = 0.0  # an understanding-encoder image condition block is removed

    @property
    def active(self) -> bool:
        return bool(self.text or self.gen_image or self.vit_image)


def apply_dropout(
    rec: EncodedRecord, fmt: SequenceFormat, dropout: ConditionDropout, *, seed: int, stage: str, step: int
) -> EncodedRecord:
    """Drop conditions of one record, deterministically per (seed, stage, record id, step).

    Draws, in this order: one for the text condition, then one per image condition block in sequence order.
    - Text (only in records with an image target): every text token between BOS and the BOI of the first target
      image becomes the pad token, without loss: Janus' unconditional branch for classifier-free guidance (its
      sampler replaces the prompt by pad tokens, keeping BOS and BOI). Image conditions stay. The length does not
      change.
    - Image conditions: the block (BOI, slots, EOI) is removed, as the official trainer removes a dropped VAE or
      ViT condition; the record gets shorter, so its pack still fits the budget.
    Targets are never dropped.
    """
    if not dropout.active:
        return rec
    draws = uniforms(seed, stage, "dropout", rec.id, step)
    segs = rec.segments
    dropped: list[str] = []
    drop_text = next(draws) < dropout.text
    first_target = next((i for i, s in enumerate(segs) if s.kind == GEN and s.loss), None) if drop_text else None
    if first_target is not None:
        segs = list(segs)
        if fmt.pad_id is None:
            raise ValueError("text condition dropout needs the model's pad token id (SequenceFormat.pad_id)")
        for i in range(1, first_target - 1):  # after BOS, up to the target's BOI (excluded)
            s = segs[i]
            if s.kind == TEXT and not s.origin.endswith((" boi", " eoi")):
                segs[i] = replace(s, ids=(fmt.pad_id,) * len(s.ids), loss=False)
        dropped.append("text")
    removed: set[int] = set()
    for i, s in enumerate(segs):
        if s.kind == TEXT or s.loss:
            continue
        p = dropout.vit_image if s.kind == VIT else dropout.gen_image
        if next(draws) < p:
            removed.update((i - 1, i, i + 1))  # BOI, slots, EOI
            dropped.append(f"{s.kind} {s.origin}")
    if not dropped:
        return rec
    kept = [s for i, s in enumerate(segs) if i not in removed]
    return EncodedRecord(rec.id, rec.mode, kept, rec.images, dropped)
