"""From built shards to packed training sequences: records -> segments with loss masks -> mixed, packed, sharded.

The flags of each part decide everything (docs/IRGL_FORMAT.md), never the mode name:

- a user turn is text without loss;
- a text part with `need_loss` is a text cross-entropy target, one without is context;
- an image with `need_vit` is an understanding condition (vision encoder slots), one with `need_vae` a generation
  condition (VQ-token embeddings), one with `need_loss` an image target (VQ tokens predicted by the generation
  head); an image may be both a vit and a vae condition, which gives both blocks, vit first.

The order of the data is a pure function of the seed and the stage: an infinite stream of records drawn from the
stage's modes by weight (each mode cycles through its own per-epoch shuffle), greedily packed into sequences of at
most `token_budget` tokens. Global pack g goes to worker g mod W, so the data position of a run is just its step,
and a resumed run regenerates the stream and continues at the same pack.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.conversation import ConversationError, conversation_from_json, validate_conversation
from schemas.modes import MODES_BY_NAME

# Segment kinds. A "vit" slot is filled by the understanding encoder, a "gen" slot by a VQ-token embedding.
TEXT, VIT, GEN = "text", "vit", "gen"


@dataclass(frozen=True)
class SequenceFormat:
    """What the data side needs from a model: its chat template pieces, special ids and image token counts.

    The adapter builds it from its tokenizer; nothing here knows which model it is.
    """

    tokenize: Callable[[str], list[int]]
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    vit_id: int  # placeholder id written at understanding slots (replaced by encoder features)
    gen_id: int  # placeholder id written at generation slots (replaced by VQ-token embeddings)
    num_vit_tokens: int
    num_gen_tokens: int
    user_prefix: str = "<|User|>: "
    user_suffix: str = "\n\n"
    assistant_prefix: str = "<|Assistant|>: "


@dataclass(frozen=True)
class Segment:
    """A run of positions of one kind with one loss flag, and where in the conversation it comes from.

    `origin` is "bos", "turn T" (a user turn or an assistant turn's template tokens), "turn T part P" (a part's
    content) or "turn T part P boi|eoi" (the brackets of an image block).
    """

    kind: str  # TEXT, VIT or GEN
    ids: tuple[int, ...]  # token ids (placeholders for image slots)
    loss: bool  # TEXT: cross-entropy on these tokens; GEN: image targets; VIT: always False
    origin: str
    image: int | None = None  # index into EncodedRecord.images for VIT/GEN


@dataclass
class EncodedRecord:
    """One record as the model sees it: segments, flat arrays and the images it needs."""

    id: str
    mode: str
    segments: list[Segment]
    images: list[bytes | str]  # bytes once resolved; the raw content (base64 or a member name) before

    @property
    def length(self) -> int:
        return sum(len(s.ids) for s in self.segments)


def encode_conversation(
    turns: list[dict[str, Any]],
    fmt: SequenceFormat,
    *,
    record_id: str = "?",
    mode: str = "?",
    resolve: Callable[[str], bytes] | None = None,
) -> EncodedRecord:
    """Turn a parsed conversation into segments with loss flags taken from the parts' flags (see module doc).

    The template is Janus-Pro's: BOS, "<|User|>: text\\n\\n" per user turn, "<|Assistant|>: " parts EOS per
    assistant turn. The EOS of an assistant turn is a text target when the turn's last part carries loss (the
    model learns where to stop); the BOI opening a target image is a text target too (the model learns to start
    an image after its thinking); template tokens and EOI are never targets.
    """
    segs: list[Segment] = [Segment(TEXT, (fmt.bos_id,), False, "bos")]
    images: list[bytes | str] = []
    for t, turn in enumerate(turns):
        if turn["role"] == "user":
            text = f"{fmt.user_prefix}{turn['content']}{fmt.user_suffix}"
            segs.append(Segment(TEXT, tuple(fmt.tokenize(text)), False, f"turn {t}"))
            continue
        segs.append(Segment(TEXT, tuple(fmt.tokenize(fmt.assistant_prefix)), False, f"turn {t}"))
        last_loss = False
        for p, part in enumerate(turn["content"]):
            where = f"turn {t} part {p}"
            if part["type"] == "text":
                loss = bool(part.get("need_loss", True))
                segs.append(Segment(TEXT, tuple(fmt.tokenize(part["content"])), loss, where))
                last_loss = loss
                continue
            content = part["content"]
            index = len(images)
            images.append(resolve(content) if resolve is not None else content)
            if part["need_vit"]:
                segs += _image_block(fmt, VIT, index, False, where)
            if part["need_loss"]:
                segs += _image_block(fmt, GEN, index, True, where)
            elif part["need_vae"]:
                segs += _image_block(fmt, GEN, index, False, where)
            last_loss = bool(part["need_loss"])
        segs.append(Segment(TEXT, (fmt.eos_id,), last_loss, f"turn {t}"))
    return EncodedRecord(id=record_id, mode=mode, segments=segs, images=images)


def _image_block(fmt: SequenceFormat, kind: str, index: int, target: bool, where: str) -> list[Segment]:
    """BOI, the image's slots, EOI. For a target image, BOI and the slots carry loss; EOI never does."""
    n, pid = (fmt.num_vit_tokens, fmt.vit_id) if kind == VIT else (fmt.num_gen_tokens, fmt.gen_id)
    return [
        Segment(TEXT, (fmt.boi_id,), target, f"{where} boi"),
        Segment(kind, (pid,) * n, target, where, image=index),
        Segment(TEXT, (fmt.eoi_id,), False, f"{where} eoi"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Reading built shards


@dataclass(frozen=True)
class Entry:
    """Where one usable record lives, and its length in tokens (computed once, at indexing)."""

    mode: str
    id: str
    file: str
    locator: tuple[Any, ...]  # parquet: (row_group, row); webdataset: ((member, offset, size), ...)
    length: int


@dataclass
class DataIndex:
    """The usable records of some modes of a built dataset, plus every skipped record counted by reason."""

    entries: dict[str, list[Entry]]
    skipped: Counter = field(default_factory=Counter)  # "mode: reason" -> count
    skipped_ids: dict[str, str] = field(default_factory=dict)  # record id -> reason

    def counts(self) -> dict[str, int]:
        return {m: len(v) for m, v in self.entries.items()}


def _skip(index: DataIndex, mode: str, rid: str, reason: str, detail: str) -> None:
    index.skipped[f"{mode}: {reason}"] += 1
    index.skipped_ids[rid] = f"{reason}: {detail}"


def mode_files(data_dir: Path, mode: str, data_format: str) -> list[Path]:
    """The shard files of one mode, sorted (the order is part of the deterministic data order)."""
    if data_format == "parquet":
        return sorted((Path(data_dir) / "data" / mode).glob("*.parquet"))
    return sorted((Path(data_dir) / "wds" / mode).glob("*.tar"))


def _parquet_rows(path: Path) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=["id", "mode", "conversation"])
        for r, row in enumerate(table.to_pylist()):
            yield (g, r), row


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {member suffix: (offset, size)}) per WebDataset sample, in tar order. Keys never hold a dot."""
    import tarfile

    current: str | None = None
    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[suffix] = (info.offset_data, info.size)
    if current is not None:
        yield current, members


def _read_member(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def build_index(
    data_dir: Path | str, modes: list[str], fmt: SequenceFormat, token_budget: int, data_format: str = "parquet"
) -> DataIndex:
    """Read every record of `modes` once: validate it, measure its length; skip (and count) what cannot train.

    A record is skipped when its conversation breaks the format rules ("invalid") or when it is longer than the
    token budget ("too_long"): a packed sequence can never hold it.
    """
    data_dir = Path(data_dir)
    index = DataIndex(entries={})
    for mode in modes:
        if mode not in MODES_BY_NAME:
            raise ValueError(f"unknown mode {mode!r}")
        files = mode_files(data_dir, mode, data_format)
        if not files:
            raise FileNotFoundError(f"{data_dir}: no {data_format} shards for mode {mode}")
        entries: list[Entry] = []
        for path in files:
            if data_format == "parquet":
                items = ((row["id"], row["conversation"], loc) for loc, row in _parquet_rows(path))
                refs = False
            else:
                items = _wds_items(path)
                refs = True
            for rid, conversation, locator in items:
                try:
                    turns = conversation if isinstance(conversation, list) else conversation_from_json(conversation)
                    validate_conversation(turns, image_refs=refs, decode_images=False)
                except ConversationError as exc:
                    _skip(index, mode, rid, "invalid", str(exc))
                    continue
                length = encode_conversation(turns, fmt, record_id=rid, mode=mode).length
                if length > token_budget:
                    _skip(index, mode, rid, "too_long", f"{length} tokens > budget {token_budget}")
                    continue
                entries.append(Entry(mode=mode, id=rid, file=str(path), locator=locator, length=length))
        index.entries[mode] = entries
    return index


def _wds_items(path: Path) -> Iterator[tuple[str, Any, tuple[Any, ...]]]:
    for key, members in _tar_samples(path):
        if "json" not in members:
            continue
        meta = json.loads(_read_member(str(path), *members["json"]))
        locator = tuple((suffix, off, size) for suffix, (off, size) in sorted(members.items()))
        yield meta.get("id", key), meta["conversation"], locator


class RecordReader:
    """Materialises entries into EncodedRecords with image bytes; caches a few Parquet row groups."""

    def __init__(self, fmt: SequenceFormat, cache_groups: int = 8) -> None:
        self.fmt = fmt
        self._groups: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()
        self._cache_groups = cache_groups

    def _row_group(self, path: str, group: int) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        key = (path, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        rows = pq.ParquetFile(path).read_row_group(group, columns=["id", "conversation"]).to_pylist()
        self._groups[key] = rows
        if len(self._groups) > self._cache_groups:
            self._groups.popitem(last=False)
        return rows

    def read(self, entry: Entry) -> EncodedRecord:
        if entry.file.endswith(".parquet"):
            group, row = entry.locator
            data = self._row_group(entry.file, group)[row]
            if data["id"] != entry.id:
                raise RuntimeError(f"{entry.file}: row {group}/{row} is {data['id']}, expected {entry.id}")
            turns = conversation_from_json(data["conversation"])
            resolve: Callable[[str], bytes] = base64.b64decode
        else:
            members = {suffix: (off, size) for suffix, off, size in entry.locator}
            turns = json.loads(_read_member(entry.file, *members["json"]))["conversation"]

            def resolve(ref: str) -> bytes:
                return _read_member(entry.file, *members[ref])

        return encode_conversation(turns, self.fmt, record_id=entry.id, mode=entry.mode, resolve=resolve)


# ----------------------------------------------------------------------------------------------------------------
# Mixing and packing


def _seeded(*parts: object) -> random.Random:
    """A Random seeded from a stable hash of the parts (Python's hash() of str is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Pack:
    """One packed sequence: its global index in the stage's stream and its records, in order."""

    index: int
    entries: tuple[Entry, ...]

    @property
    def tokens(self) -> int:
        return sum(e.length for e in self.entries)


def record_stream(index: DataIndex, weights: dict[str, float], seed: int, stage: str) -> Iterator[Entry]:
    """Infinite, deterministic stream of entries: mode m drawn with probability w_m / sum(w), then the next record
    of m's per-epoch shuffle (every record of a mode is seen once before any is seen twice)."""
    modes = [m for m in weights if weights[m] > 0 and index.entries.get(m)]
    if not modes:
        raise ValueError("no usable records in any mode of this stage")
    total = sum(weights[m] for m in modes)
    cumulative = []
    acc = 0.0
    for m in modes:
        acc += weights[m] / total
        cumulative.append(acc)
    draw = _seeded(seed, stage, "mix")
    epoch = {m: 0 for m in modes}
    order: dict[str, list[int]] = {}
    cursor = {m: 0 for m in modes}

    def shuffled(m: str) -> list[int]:
        idx = list(range(len(index.entries[m])))
        _seeded(seed, stage, m, epoch[m]).shuffle(idx)
        return idx

    for m in modes:
        order[m] = shuffled(m)
    while True:
        u = draw.random()
        m = next((mode for mode, c in zip(modes, cumulative, strict=True) if u < c), modes[-1])
        if cursor[m] == len(order[m]):
            epoch[m] += 1
            order[m] = shuffled(m)
            cursor[m] = 0
        yield index.entries[m][order[m][cursor[m]]]
        cursor[m] += 1


def pack_stream(
    index: DataIndex, weights: dict[str, float], token_budget: int, seed: int, stage: str
) -> Iterator[Pack]:
    """Greedy packing of the record stream: records join the current pack while it stays within the budget.

    Every entry fits the budget alone (build_index skipped the others), so every pack holds at least one record.
    """
    current: list[Entry] = []
    used = 0
    n = 0
    for entry in record_stream(index, weights, seed, stage):
        if current and used + entry.length > token_budget:
            yield Pack(n, tuple(current))
            n += 1
            current, used = [], 0
        current.append(entry)
        used += entry.length


def worker_packs(
    index: DataIndex,
    weights: dict[str, float],
    token_budget: int,
    seed: int,
    stage: str,
    *,
    rank: int,
    world_size: int,
    grad_accum: int,
    start_step: int = 0,
) -> Iterator[tuple[int, list[Pack]]]:
    """(step, the grad_accum packs of this worker) from `start_step` on: the data position is the step alone.

    Step s of worker r holds global packs (s * grad_accum + k) * world_size + r for k < grad_accum.
    """
    per_step = grad_accum * world_size
    step, buffer = 0, []
    for pack in pack_stream(index, weights, token_budget, seed, stage):
        if step >= start_step and pack.index % world_size == rank:
            buffer.append(pack)
        if (pack.index + 1) % per_step == 0:
            if step >= start_step:
                yield step, buffer
            step, buffer = step + 1, []


# ----------------------------------------------------------------------------------------------------------------
# Collation


@dataclass
class PackedBatch:
    """One packed sequence as tensors, plus what the model needs to fill its image slots and score its targets.

    Positions follow the segments in order; a position's label is the token that position holds (a target of the
    prediction made at the previous position). Records restart position ids at 0, which makes attention
    block-diagonal (no record sees another).
    """

    input_ids: Any  # LongTensor [1, L]
    position_ids: Any  # LongTensor [1, L]
    text_labels: Any  # LongTensor [1, L], -100 where no text loss
    image_target: Any  # BoolTensor [1, L], True at generation slots that are targets
    mode_ids: Any  # LongTensor [1, L], mode number (1..6) of the record each position belongs to
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
    import torch

    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    target: list[bool] = []
    mode_ids: list[int] = []
    vit_pos: list[list[int]] = []
    vit_img: list[bytes] = []
    gen_pos: list[list[int]] = []
    gen_img: list[bytes] = []
    for rec in records:
        start = len(ids)
        number = MODES_BY_NAME[rec.mode].index
        for seg in rec.segments:
            here = list(range(len(ids), len(ids) + len(seg.ids)))
            ids += seg.ids
            if seg.kind == TEXT:
                labels += list(seg.ids) if seg.loss else [-100] * len(seg.ids)
                target += [False] * len(seg.ids)
            else:
                labels += [-100] * len(seg.ids)
                target += [seg.loss and seg.kind == GEN] * len(seg.ids)
                data = rec.images[seg.image]  # type: ignore[index]
                if not isinstance(data, bytes):
                    raise ValueError(f"record {rec.id}: image {seg.image} was not resolved to bytes")
                (vit_pos if seg.kind == VIT else gen_pos).append(here)
                (vit_img if seg.kind == VIT else gen_img).append(data)
        pos += list(range(len(ids) - start))
        mode_ids += [number] * (len(ids) - start)

    def positions(rows: list[list[int]]) -> Any:
        return torch.tensor(rows, dtype=torch.long) if rows else torch.zeros((0, 0), dtype=torch.long)

    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        text_labels=torch.tensor([labels], dtype=torch.long),
        image_target=torch.tensor([target], dtype=torch.bool),
        mode_ids=torch.tensor([mode_ids], dtype=torch.long),
        vit_positions=positions(vit_pos),
        vit_images=vit_img,
        gen_positions=positions(gen_pos),
        gen_images=gen_img,
        record_ids=[r.id for r in records],
        modes=[r.mode for r in records],
    )
