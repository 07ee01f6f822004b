"""Collation: the records of one pack flattened into one packed sequence of tensors (PackedBatch)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

from schemas.modes import MODES_BY_NAME
from trainer.records import GEN, TEXT, VIT, EncodedRecord


@dataclass
class PackedBatch:
    """One packed sequence as tensors, plus what the model needs to fill its image slots and score its targets.

    Positions follow the segments in order; a position's label is the token that position holds (a target of the
    prediction made at the previous position). Each record restarts its position ids at 0 (its positional encoding
    is the same as alone) and `record_index` numbers the record of every position: the model attends causally
    within a record only (a block-diagonal mask built from it, see `trainer.model.record_attention_mask`), so no
    record sees another.
    """

    input_ids: Any  # LongTensor [1, L]
    position_ids: Any  # LongTensor [1, L]
    text_labels: Any  # LongTensor [1, L], -100 where no text loss
    image_target: Any  # BoolTensor [1, L], True at generation slots that are targets
    mode_ids: Any  # LongTensor [1, L], mode number (1..6) of the record each position belongs to
    record_index: Any  # LongTensor [1, L], 0..n-1: which record of the pack each position belongs to
    vit_positions: Any  # LongTensor [n_vit_images, num_vit_tokens]
    vit_images: list[bytes]
    gen_positions: Any  # LongTensor [n_gen_images, num_gen_tokens]
    gen_images: list[bytes]
    record_ids: list[str]
    modes: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def collate(records: list[EncodedRecord]) -> PackedBatch:
    """Flatten the segments of the records of one pack into a PackedBatch (tensors on CPU)."""
    import numpy as np
    import torch

    segs = [seg for rec in records for seg in rec.segments]
    lengths = np.fromiter((len(seg.ids) for seg in segs), dtype=np.int64, count=len(segs))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(seg.ids for seg in segs), dtype=np.int64, count=total)
    text_loss = np.fromiter((seg.kind == TEXT and seg.loss for seg in segs), dtype=bool, count=len(segs))
    image_target = np.fromiter((seg.kind == GEN and seg.loss for seg in segs), dtype=bool, count=len(segs))
    labels = np.where(np.repeat(text_loss, lengths), ids, -100)
    record_lengths = np.array([sum(len(seg.ids) for seg in rec.segments) for rec in records], dtype=np.int64)
    record_starts = np.cumsum(record_lengths) - record_lengths
    positions_ids = np.arange(total, dtype=np.int64) - np.repeat(record_starts, record_lengths)
    numbers = np.array([MODES_BY_NAME[rec.mode].index for rec in records], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    slots: dict[str, list[int]] = {VIT: [], GEN: []}
    images: dict[str, list[bytes]] = {VIT: [], GEN: []}
    k = 0
    for rec in records:
        for seg in rec.segments:
            if seg.kind != TEXT:
                data = rec.images[seg.image]  # type: ignore[index]
                if not isinstance(data, bytes):
                    raise ValueError(f"record {rec.id}: image {seg.image} was not resolved to bytes")
                slots[seg.kind].append(k)
                images[seg.kind].append(data)
            k += 1

    def positions(kind: str, per_image: int) -> Any:
        if not slots[kind]:
            return torch.zeros((0, 0), dtype=torch.long)
        first = starts[np.array(slots[kind], dtype=np.int64)]
        return torch.from_numpy(first[:, None] + np.arange(per_image, dtype=np.int64)[None, :])

    def row(values: Any) -> Any:
        return torch.from_numpy(np.ascontiguousarray(values)).view(1, -1)

    per_vit = int(lengths[slots[VIT][0]]) if slots[VIT] else 0
    per_gen = int(lengths[slots[GEN][0]]) if slots[GEN] else 0
    return PackedBatch(
        input_ids=row(ids),
        position_ids=row(positions_ids),
        text_labels=row(labels),
        image_target=row(np.repeat(image_target, lengths)),
        mode_ids=row(np.repeat(numbers, record_lengths)),
        record_index=row(np.repeat(np.arange(len(records), dtype=np.int64), record_lengths)),
        vit_positions=positions(VIT, per_vit),
        vit_images=images[VIT],
        gen_positions=positions(GEN, per_gen),
        gen_images=images[GEN],
        record_ids=[r.id for r in records],
        modes=[r.mode for r in records],
    )
