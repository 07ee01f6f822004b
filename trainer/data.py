"""From built shards to packed training sequences: records -> segments with loss masks -> mixed, packed, sharded,
read by a streaming reader in DataLoader worker processes.

The flags of each part decide everything (docs/IRGL_FORMAT.md), never the mode name:

- a user turn is text without loss;
- a text part with `need_loss` is a text cross-entropy target, one without is context; every text part is
  followed by EOS, which is a target exactly when the text is (the official IRG trainer labels its end-of-text
  token after every supervised text, and never the image-start token);
- an image with `need_vit` is an understanding condition (vision encoder slots), one with `need_vae` a generation
  condition (VQ-token embeddings), one with `need_loss` an image target (VQ tokens predicted by the generation
  head); an image may be both a vit and a vae condition, which gives both blocks, vit first.

The order of the data is a pure function of (seed, stage, step) for a given world size and `streams`: each of
`world_size * streams` streams walks every mode's row groups ("blocks") in a per-epoch shuffled order (stream q
takes blocks q, q + R, q + 2R, ... of the endless sequence of epochs), shuffles the records of each window of
`shuffle_blocks` consecutive blocks, draws modes by weight and greedily packs records into sequences of at most
`token_budget` tokens. Pack k of stream v of worker r is the worker's pack p = k * streams + v and the global pack
g = p * world_size + r: global pack g goes to worker g mod W, and the data position of a run is just its step, so a
resumed run regenerates the same plan and continues at the same pack. A stream reads each block once per window,
sequentially, never one row group per record.

Condition dropout (for classifier-free guidance) is drawn per (seed, stage, record id, step): a pure function too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import random
import signal
import sys
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain, count
from pathlib import Path
from typing import Any

from schemas.conversation import ConversationError, conversation_from_json, validate_conversation
from schemas.modes import MODES_BY_NAME

# Segment kinds. A "vit" slot is filled by the understanding encoder, a "gen" slot by a VQ-token embedding.
TEXT, VIT, GEN = "text", "vit", "gen"

#: Samples per block of a WebDataset tar (a Parquet block is one row group).
WDS_BLOCK_ROWS = 64
#: Defaults of the order (trainer/config.py holds the same numbers as its field defaults).
DEFAULT_STREAMS = 2
DEFAULT_SHUFFLE_BLOCKS = 2


@dataclass(frozen=True)
class SequenceFormat:
    """What the data side needs from a model: its chat template pieces, special ids and image token counts.

    The adapter (or `trainer.index.tokenizer_format`, from the tokenizer alone) builds it; nothing here knows which
    model it is. `pad_id` replaces dropped text conditions (classifier-free guidance); None: text dropout refused.
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
    pad_id: int | None = None


@dataclass(frozen=True)
class Segment:
    """A run of positions of one kind with one loss flag, and where in the conversation it comes from.

    `origin` is "bos", "turn T" (a user turn, an assistant turn's template tokens or the EOS closing a turn that
    ends with an image), "turn T part P" (a part's content), "turn T part P eos" (the EOS after a text part) or
    "turn T part P boi|eoi" (the brackets of an image block).
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
    dropped: list[str] = field(default_factory=list)  # conditions dropped for CFG: "text", "vit ORIGIN", ...

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

    The template is Janus-Pro's: BOS, "<|User|>: text\\n\\n" per user turn, "<|Assistant|>: " then the parts per
    assistant turn. Every text part is followed by EOS, a text target exactly when the text is one (the model
    learns where each text ends, as the official IRG trainer labels its end-of-text token after every supervised
    text); an assistant turn that ends with an image is closed by an EOS without loss. BOI and EOI (the image
    brackets) and template tokens are never targets: a sampler switches to image generation by appending BOI.
    """
    segs: list[Segment] = [Segment(TEXT, (fmt.bos_id,), False, "bos")]
    images: list[bytes | str] = []
    for t, turn in enumerate(turns):
        if turn["role"] == "user":
            text = f"{fmt.user_prefix}{turn['content']}{fmt.user_suffix}"
            segs.append(Segment(TEXT, tuple(fmt.tokenize(text)), False, f"turn {t}"))
            continue
        segs.append(Segment(TEXT, tuple(fmt.tokenize(fmt.assistant_prefix)), False, f"turn {t}"))
        ends_with_text = False
        for p, part in enumerate(turn["content"]):
            where = f"turn {t} part {p}"
            if part["type"] == "text":
                loss = bool(part.get("need_loss", True))
                segs.append(Segment(TEXT, tuple(fmt.tokenize(part["content"])), loss, where))
                segs.append(Segment(TEXT, (fmt.eos_id,), loss, f"{where} eos"))
                ends_with_text = True
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
            ends_with_text = False
        if not ends_with_text:
            segs.append(Segment(TEXT, (fmt.eos_id,), False, f"turn {t}"))
    return EncodedRecord(id=record_id, mode=mode, segments=segs, images=images)


def _image_block(fmt: SequenceFormat, kind: str, index: int, target: bool, where: str) -> list[Segment]:
    """BOI, the image's slots, EOI. Only a target image's slots carry loss; BOI and EOI never do."""
    n, pid = (fmt.num_vit_tokens, fmt.vit_id) if kind == VIT else (fmt.num_gen_tokens, fmt.gen_id)
    return [
        Segment(TEXT, (fmt.boi_id,), False, f"{where} boi"),
        Segment(kind, (pid,) * n, target, where, image=index),
        Segment(TEXT, (fmt.eoi_id,), False, f"{where} eoi"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Condition dropout (classifier-free guidance)


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
    draws = _uniforms(seed, stage, "dropout", rec.id, step)
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


# ----------------------------------------------------------------------------------------------------------------
# Parsing rows without touching image bytes

_IMAGE_HEAD = '{"type":"image","content":"'


def split_images(conversation: str) -> tuple[str, list[str]]:
    """The canonical conversation JSON with each image part's base64 content replaced by "<n>.png", and the n
    contents (slices of the string, never JSON-decoded or base64-decoded).

    Inside a JSON string every quote is escaped, so the canonical image-part head (schemas.conversation: key order
    type, content; no spaces) can only be a real image part. A conversation in another JSON form has no such head
    and comes back unchanged with no contents: it is then parsed in full (correct, only slower).
    """
    out: list[str] = []
    images: list[str] = []
    pos = 0
    while True:
        i = conversation.find(_IMAGE_HEAD, pos)
        if i < 0:
            break
        start = i + len(_IMAGE_HEAD)
        end = conversation.find('"', start)
        if end < 0:
            break
        out.append(conversation[pos:start])
        out.append(f"{len(images)}.png")
        images.append(conversation[start:end])
        pos = end
    if not images:
        return conversation, []
    out.append(conversation[pos:])
    return "".join(out), images


def _check_split_images(turns: list[dict[str, Any]], images: list[str]) -> None:
    """The split contents look like base64 (non-empty, a multiple of 4 characters) and each is used once."""
    used = [p["content"] for t in turns if t.get("role") == "assistant" for p in t["content"] if p["type"] == "image"]
    if sorted(used) != sorted(f"{n}.png" for n in range(len(images))):
        raise ConversationError("image parts do not match the image contents found")
    for n, b64 in enumerate(images):
        if not b64 or len(b64) % 4:
            raise ConversationError(f"image {n}: content is not base64 (length {len(b64)})")


def parse_parquet_conversation(conversation: str, *, check: bool) -> tuple[list[dict[str, Any]], Callable]:
    """(turns, resolve) of a Parquet row's conversation; resolve(content) gives an image part's bytes.

    With `check`, the format rules are checked without decoding any image (ConversationError when broken).
    """
    stripped, images = split_images(conversation)
    turns = conversation_from_json(stripped)
    if images:
        if check:
            validate_conversation(turns, image_refs=True, decode_images=False)
            _check_split_images(turns, images)

        def resolve(ref: str) -> bytes:
            return base64.b64decode(images[int(ref.split(".", 1)[0])], validate=True)

        return turns, resolve
    if check:
        validate_conversation(turns, image_refs=False, decode_images=False)
    return turns, lambda content: base64.b64decode(content, validate=True)


# ----------------------------------------------------------------------------------------------------------------
# The index and reading blocks


@dataclass(frozen=True)
class Entry:
    """Where one usable record lives, and its length in tokens (computed once, at indexing).

    `locator`: Parquet (row_group, row); WebDataset (block, row, start, end), the block being WDS_BLOCK_ROWS
    consecutive samples stored in bytes [start, end) of the tar. The first item is always the block.
    """

    mode: str
    id: str
    file: str
    locator: tuple[Any, ...]
    length: int

    @property
    def block(self) -> tuple[str, int]:
        return self.file, self.locator[0]


@dataclass
class DataIndex:
    """The usable records of some modes of a built dataset, plus every skipped record counted by reason."""

    entries: dict[str, list[Entry]]
    skipped: Counter = field(default_factory=Counter)  # "mode: reason" -> count
    skipped_ids: dict[str, str] = field(default_factory=dict)  # record id -> reason

    def counts(self) -> dict[str, int]:
        return {m: len(v) for m, v in self.entries.items()}

    def subset(self, modes: list[str]) -> DataIndex:
        """The same index restricted to `modes` (skips kept for those modes only)."""
        missing = [m for m in modes if m not in self.entries]
        if missing:
            raise ValueError(f"modes not in the index: {missing}")
        prefixes = tuple(f"{m}: " for m in modes)
        skipped = Counter({k: v for k, v in self.skipped.items() if k.startswith(prefixes)})
        return DataIndex({m: self.entries[m] for m in modes}, skipped, dict(self.skipped_ids))


def mode_files(data_dir: Path, mode: str, data_format: str) -> list[Path]:
    """The shard files of one mode, sorted (the order is part of the deterministic data order)."""
    if data_format == "parquet":
        return sorted((Path(data_dir) / "data" / mode).glob("*.parquet"))
    return sorted((Path(data_dir) / "wds" / mode).glob("*.tar"))


def _tar_blocks(path: str | Path) -> Iterator[tuple[int, int, int, list[tuple[str, dict[str, tuple[int, int]]]]]]:
    """(block, start, end, [(key, {suffix: (offset, size)})]) per WDS_BLOCK_ROWS samples, in tar order.

    Keys never hold a dot (docs/IRGL_FORMAT.md); bytes [start, end) hold the block's members, headers included.
    """
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    block, start, end = 0, 0, 0
    current: str | None = None
    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if key != current:
                if current is not None:
                    samples.append((current, members))
                    if len(samples) == WDS_BLOCK_ROWS:
                        yield block, start, info.offset, samples
                        block, samples = block + 1, []
                if not samples:
                    start = info.offset
                current, members = key, {}
            members[suffix] = (info.offset_data, info.size)
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if current is not None:
        samples.append((current, members))
    if samples:
        yield block, start, end, samples


def index_file(
    path: str | Path, mode: str, data_format: str, fmt: SequenceFormat, token_budget: int
) -> tuple[list[Entry], list[tuple[str, str, str]]]:
    """One shard file: (usable entries, [(record id, reason, detail)] of the skipped ones), in file order.

    Reads each block once; checks the format rules without decoding images (their token counts are fixed) and
    measures each record's length with the tokenizer. Skips records that break the rules ("invalid") or are
    longer than the token budget ("too_long": a packed sequence can never hold them).
    """
    path = str(path)
    entries: list[Entry] = []
    skips: list[tuple[str, str, str]] = []

    def add(rid: str, locator: tuple[Any, ...], parse: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            turns = parse()
        except ConversationError as exc:
            skips.append((rid, "invalid", str(exc)))
            return
        length = encode_conversation(turns, fmt, record_id=rid, mode=mode).length
        if length > token_budget:
            skips.append((rid, "too_long", f"{length} tokens > budget {token_budget}"))
            return
        entries.append(Entry(mode=mode, id=rid, file=path, locator=locator, length=length))

    if data_format == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=["id", "conversation"])
            for r, (rid, conversation) in enumerate(
                zip(table.column("id").to_pylist(), table.column("conversation").to_pylist(), strict=True)
            ):
                add(rid, (g, r), lambda c=conversation: parse_parquet_conversation(c, check=True)[0])
        return entries, skips
    with open(path, "rb") as fh:
        for block, start, end, samples in _tar_blocks(path):
            for r, (key, members) in enumerate(samples):
                if "json" not in members:
                    skips.append((key, "invalid", "sample has no json member"))
                    continue
                fh.seek(members["json"][0])
                meta = json.loads(fh.read(members["json"][1]))

                def parse(meta: dict[str, Any] = meta) -> list[dict[str, Any]]:
                    turns = meta["conversation"]
                    turns = turns if isinstance(turns, list) else conversation_from_json(turns)
                    validate_conversation(turns, image_refs=True, decode_images=False)
                    return turns

                add(meta.get("id", key), (block, r, start, end), parse)
    return entries, skips


def build_index(
    data_dir: Path | str, modes: list[str], fmt: SequenceFormat, token_budget: int, data_format: str = "parquet"
) -> DataIndex:
    """Index every record of `modes`, one file after the other, in this process (no cache).

    `trainer.index.cached_index` does the same in parallel processes, with the tokenizer alone, and caches it.
    """
    index = DataIndex(entries={})
    for mode in modes:
        files = _checked_files(data_dir, mode, data_format)
        index.entries[mode] = []
        for path in files:
            entries, skips = index_file(path, mode, data_format, fmt, token_budget)
            merge_file_index(index, mode, entries, skips)
    return index


def _checked_files(data_dir: Path | str, mode: str, data_format: str) -> list[Path]:
    if mode not in MODES_BY_NAME:
        raise ValueError(f"unknown mode {mode!r}")
    files = mode_files(Path(data_dir), mode, data_format)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no {data_format} shards for mode {mode}")
    return files


def merge_file_index(index: DataIndex, mode: str, entries: list[Entry], skips: list[tuple[str, str, str]]) -> None:
    index.entries.setdefault(mode, []).extend(entries)
    for rid, reason, detail in skips:
        index.skipped[f"{mode}: {reason}"] += 1
        index.skipped_ids[rid] = f"{reason}: {detail}"


class BlockReader:
    """Reads whole blocks (a Parquet row group, a WDS byte range) and makes EncodedRecords of their rows.

    Blocks stay cached until released (`release`), so a stream reads each block once per window; Parquet files
    stay open (a few at a time).
    """

    def __init__(self, fmt: SequenceFormat, max_open_files: int = 16) -> None:
        self.fmt = fmt
        self.blocks: dict[tuple[str, int], Any] = {}
        self.block_reads = 0
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open_files

    def _parquet(self, path: str) -> Any:
        import pyarrow.parquet as pq

        if path in self._files:
            self._files.move_to_end(path)
            return self._files[path]
        pf = pq.ParquetFile(path)
        self._files[path] = pf
        if len(self._files) > self._max_open:
            self._files.popitem(last=False)
        return pf

    def _load(self, entry: Entry) -> Any:
        key = entry.block
        if key in self.blocks:
            return self.blocks[key]
        self.block_reads += 1
        if entry.file.endswith(".parquet"):
            table = self._parquet(entry.file).read_row_group(entry.locator[0], columns=["id", "conversation"])
            data: Any = (table.column("id").to_pylist(), table.column("conversation").combine_chunks())
        else:
            _, _, start, end = entry.locator
            with open(entry.file, "rb") as fh:
                fh.seek(start)
                raw = fh.read(end - start)
            samples: list[tuple[str, dict[str, bytes]]] = []
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key_, _, suffix = info.name.partition(".")
                    if not samples or samples[-1][0] != key_:
                        samples.append((key_, {}))
                    samples[-1][1][suffix] = raw[info.offset_data : info.offset_data + info.size]
            data = samples
        self.blocks[key] = data
        return data

    def release(self, entry: Entry) -> None:
        self.blocks.pop(entry.block, None)

    def read(self, entry: Entry) -> EncodedRecord:
        data = self._load(entry)
        row = entry.locator[1]
        if entry.file.endswith(".parquet"):
            rids, conversations = data
            if rids[row] != entry.id:
                raise RuntimeError(f"{entry.file}: row {entry.locator[:2]} is {rids[row]}, expected {entry.id}")
            turns, resolve = parse_parquet_conversation(conversations[row].as_py(), check=False)
        else:
            key, members = data[row]
            meta = json.loads(members["json"])
            if meta.get("id", key) != entry.id:
                raise RuntimeError(f"{entry.file}: sample {entry.locator[:2]} is {key}, expected {entry.id}")
            turns = meta["conversation"]
            turns = turns if isinstance(turns, list) else conversation_from_json(turns)

            def resolve(ref: str) -> bytes:
                return members[ref]

        return encode_conversation(turns, self.fmt, record_id=entry.id, mode=entry.mode, resolve=resolve)


class RecordReader(BlockReader):
    """Random access to single entries (tests, benchmarks): keeps the last `cache_blocks` blocks."""

    def __init__(self, fmt: SequenceFormat, cache_blocks: int = 8) -> None:
        super().__init__(fmt)
        self._order: list[tuple[str, int]] = []
        self._cache_blocks = cache_blocks

    def read(self, entry: Entry) -> EncodedRecord:
        if entry.block not in self.blocks:
            self._order.append(entry.block)
            if len(self._order) > self._cache_blocks:
                self.blocks.pop(self._order.pop(0), None)
        return super().read(entry)


# ----------------------------------------------------------------------------------------------------------------
# The order: block shuffle, mixing and packing per stream


def _uniforms(*parts: object) -> Iterator[float]:
    """Endless uniform draws in [0, 1), a pure function of the parts: 8 per BLAKE2b digest (far cheaper than seeding
    a Random per record)."""
    key = ":".join(str(p) for p in parts).encode()
    for block in count():
        digest = hashlib.blake2b(key + b"#%d" % block, digest_size=64).digest()
        for i in range(0, 64, 8):
            yield int.from_bytes(digest[i : i + 8], "big") / 2**64


def _seeded(*parts: object) -> random.Random:
    """A Random seeded from a stable hash of the parts (Python's hash() of str is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Pack:
    """One packed sequence: its global index in the stage's stream and its records, in order."""

    index: int
    entries: tuple[Entry, ...]
    releases: tuple[bool, ...] = ()  # per entry: the last use of its block in its window (the reader frees it)

    @property
    def tokens(self) -> int:
        return sum(e.length for e in self.entries)


def _blocks_of(entries: list[Entry]) -> list[list[int]]:
    """Entry positions grouped by block, blocks in index order."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(e.block, []).append(i)
    return list(groups.values())


def _mode_stream(
    entries: list[Entry], seed: int, stage: str, mode: str, stream: int, streams: int, shuffle_blocks: int
) -> Iterator[tuple[Entry, bool]]:
    """(entry, last use of its block in this window) of one mode for global stream `stream` of `streams`.

    The endless block sequence is epoch after epoch of the mode's blocks, each epoch in its own seeded order (the
    same for every stream); stream q takes blocks q, q + streams, ...; every window of `shuffle_blocks` blocks it
    takes is shuffled record by record.
    """
    blocks = _blocks_of(entries)
    nb = len(blocks)
    perm: list[int] = []
    perm_epoch = -1
    taken = 0
    window = 0
    while True:
        keys = []
        for _ in range(shuffle_blocks):
            epoch, pos = divmod(stream + streams * taken, nb)
            taken += 1
            if epoch != perm_epoch:
                perm = list(range(nb))
                _seeded(seed, stage, mode, "blocks", epoch).shuffle(perm)
                perm_epoch = epoch
            keys.append(perm[pos])
        items = [(b, i) for b in keys for i in blocks[b]]
        _seeded(seed, stage, mode, "window", stream, window).shuffle(items)
        last = {b: n for n, (b, _) in enumerate(items)}
        for n, (b, i) in enumerate(items):
            yield entries[i], last[b] == n
        window += 1


def stream_packs(
    index: DataIndex,
    weights: dict[str, float],
    token_budget: int,
    seed: int,
    stage: str,
    *,
    stream: int,
    streams: int,
    shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS,
) -> Iterator[tuple[tuple[Entry, ...], tuple[bool, ...]]]:
    """Endless packs (entries, releases) of global stream `stream`: modes drawn by weight (mode m with
    probability w_m / sum(w)), each mode's next record from its block stream, greedy packing within the budget.

    Every entry fits the budget alone (indexing skipped the others), so every pack holds at least one record.
    """
    modes = [m for m in weights if weights[m] > 0 and index.entries.get(m)]
    if not modes:
        raise ValueError("no usable records in any mode of this stage")
    total = sum(weights[m] for m in modes)
    cumulative = []
    acc = 0.0
    for m in modes:
        acc += weights[m] / total
        cumulative.append(acc)
    draw = _seeded(seed, stage, "mix", stream)
    per_mode = {m: _mode_stream(index.entries[m], seed, stage, m, stream, streams, shuffle_blocks) for m in modes}
    current: list[Entry] = []
    releases: list[bool] = []
    used = 0
    while True:
        u = draw.random()
        m = next((mode for mode, c in zip(modes, cumulative, strict=True) if u < c), modes[-1])
        entry, release = next(per_mode[m])
        if current and used + entry.length > token_budget:
            yield tuple(current), tuple(releases)
            current, releases, used = [], [], 0
        current.append(entry)
        releases.append(release)
        used += entry.length


def _worker_stream_packs(
    index: DataIndex,
    weights: dict[str, float],
    token_budget: int,
    seed: int,
    stage: str,
    *,
    rank: int,
    world_size: int,
    start_pack: int,
    streams: int,
    shuffle_blocks: int,
    residue: int = 0,
    modulus: int = 1,
) -> Iterator[tuple[int, Pack]]:
    """(worker pack p, Pack) of worker `rank` for p >= start_pack with p % modulus == residue, in order of p.

    Worker pack p = k * streams + v is pack k of the worker's stream v (global stream rank + world_size * v), and
    global pack p * world_size + rank. Packs before start_pack are planned but not read (planning reads nothing).
    """
    mine = [v for v in range(streams) if v % modulus == residue % modulus]
    gens = {
        v: stream_packs(
            index, weights, token_budget, seed, stage,
            stream=rank + world_size * v, streams=world_size * streams, shuffle_blocks=shuffle_blocks,
        )
        for v in mine
    }  # fmt: skip
    k = 0
    while True:
        for v in mine:
            p = k * streams + v
            entries, releases = next(gens[v])
            if p >= start_pack:
                yield p, Pack(p * world_size + rank, entries, releases)
        k += 1


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
    streams: int = DEFAULT_STREAMS,
    shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS,
) -> Iterator[tuple[int, list[Pack]]]:
    """(step, the grad_accum packs of this worker) from `start_step` on: the data position is the step alone.

    Step s of worker r holds global packs (s * grad_accum + k) * world_size + r for k < grad_accum. This is the
    plan `PackLoader` reads, whatever its number of loader processes.
    """
    packs = _worker_stream_packs(
        index, weights, token_budget, seed, stage, rank=rank, world_size=world_size,
        start_pack=start_step * grad_accum, streams=streams, shuffle_blocks=shuffle_blocks,
    )  # fmt: skip
    step, buffer = start_step, []
    for _, pack in packs:
        buffer.append(pack)
        if len(buffer) == grad_accum:
            yield step, buffer
            step, buffer = step + 1, []


# ----------------------------------------------------------------------------------------------------------------
# The streaming loader (DataLoader worker processes)


@dataclass
class LoadedPack:
    """One pack as the loop consumes it: the plan (step, pack), the collated batch and the prepared tensors."""

    step: int
    pack: Pack
    batch: PackedBatch
    tensors: Any  # prepare(batch) when a prepare function was given, else None
    dropped: dict[str, list[str]]  # record id -> conditions dropped in this pack
    block_reads: int = 0  # blocks the loader process that made this pack has read so far


class PackDataset:
    """The packs of one training worker, read in DataLoader worker processes (an IterableDataset).

    DataLoader worker j of n reads the streams v with v % n == (j + start_pack) % n, so that the DataLoader's
    round-robin over its workers (in order, always starting with worker 0) yields worker packs start_pack,
    start_pack + 1, ... `streams` must be a multiple of n. `index` may be a DataIndex or the path of a cached index
    (loaded in the worker process).
    """

    def __init__(
        self,
        index: DataIndex | str | Path,
        fmt: SequenceFormat | Callable[[], SequenceFormat],
        weights: dict[str, float],
        token_budget: int,
        seed: int,
        stage: str,
        *,
        rank: int,
        world_size: int,
        grad_accum: int,
        start_step: int = 0,
        streams: int = DEFAULT_STREAMS,
        shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS,
        dropout: ConditionDropout = ConditionDropout(),
        prepare: Callable[[PackedBatch], Any] | None = None,
    ) -> None:
        self.index, self.fmt, self.weights = index, fmt, weights
        self.token_budget, self.seed, self.stage = token_budget, seed, stage
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.start_pack = start_step * grad_accum
        self.streams, self.shuffle_blocks = streams, shuffle_blocks
        self.dropout, self.prepare = dropout, prepare

    def __iter__(self) -> Iterator[LoadedPack]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams % n:
            raise ValueError(f"streams ({self.streams}) must be a multiple of the loader workers ({n})")
        index = self.index
        if not isinstance(index, DataIndex):
            from trainer.index import load_index

            index = load_index(index)
        fmt = self.fmt if isinstance(self.fmt, SequenceFormat) else self.fmt()
        reader = BlockReader(fmt)
        plan = _worker_stream_packs(
            index, self.weights, self.token_budget, self.seed, self.stage, rank=self.rank,
            world_size=self.world_size, start_pack=self.start_pack, streams=self.streams,
            shuffle_blocks=self.shuffle_blocks, residue=(j + self.start_pack) % n, modulus=n,
        )  # fmt: skip
        for p, pack in plan:
            step = p // self.grad_accum
            records, dropped = [], {}
            for entry, release in zip(pack.entries, pack.releases, strict=True):
                rec = reader.read(entry)
                if release:
                    reader.release(entry)
                rec = apply_dropout(rec, fmt, self.dropout, seed=self.seed, stage=self.stage, step=step)
                if rec.dropped:
                    dropped[rec.id] = rec.dropped
                records.append(rec)
            batch = collate(records)
            tensors = self.prepare(batch) if self.prepare is not None else None
            item = LoadedPack(step, Pack(pack.index, pack.entries), batch, tensors, dropped, reader.block_reads)
            yield _to_wire(item) if info is not None else item


class PackLoader:
    """Iterates a worker's LoadedPacks in plan order through a torch DataLoader.

    `workers` loader processes (0: in this process) each prepare up to `prefetch` packs ahead. Use as a context
    manager (or call close) to stop the processes.
    """

    def __init__(self, dataset: PackDataset, *, workers: int, prefetch: int = 2) -> None:
        import torch.utils.data

        if workers and dataset.streams % workers:
            raise ValueError(f"streams ({dataset.streams}) must be a multiple of loader workers ({workers})")
        kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers, "collate_fn": _identity}
        if workers:
            # Forked, so the processes share the index and the prepare function without pickling them; and killed
            # with this process (see _die_with_parent).
            kwargs.update(
                prefetch_factor=prefetch,
                persistent_workers=False,
                multiprocessing_context="fork",
                worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        self.loader = torch.utils.data.DataLoader(_iterable_dataset(dataset), **kwargs)
        self._it: Any = None

    def __iter__(self) -> Iterator[LoadedPack]:
        if self.loader.num_workers == 0:  # in this process: the dataset itself, without the DataLoader's per-item cost
            return iter(self.loader.dataset)
        self._it = iter(self.loader)
        return (_from_wire(item) for item in self._it)

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()
        self._it = None

    def __enter__(self) -> PackLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(item: Any) -> Any:
    return item


def _die_with_parent(parent: int, worker_id: int) -> None:
    """In a loader process: die with the process (the thread) that forked it, even when that one is SIGKILLed.

    An orphaned loader process would keep the sockets it inherited open (a Ray worker's connection to its raylet),
    so Ray would never see the training worker die and the run would hang instead of failing over; and it would
    hang itself, writing packs into a pipe nobody reads.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


_BATCH_TENSORS = ("input_ids", "position_ids", "text_labels", "image_target", "mode_ids", "vit_positions",
                  "gen_positions")  # fmt: skip
_WIRE_MAX_BYTES = 1 << 20


def _to_wire(item: LoadedPack) -> LoadedPack:
    """In a loader process: small tensors as numpy arrays, which travel pickled through the pipe; torch would put
    each tensor in its own shared-memory segment, which costs more than the copy below ~1 MB."""
    import torch

    def wire(value: Any) -> Any:
        small = isinstance(value, torch.Tensor) and value.numel() * value.element_size() <= _WIRE_MAX_BYTES
        return value.numpy() if small else value

    batch = replace(item.batch, **{f: wire(getattr(item.batch, f)) for f in _BATCH_TENSORS})
    tensors = {k: wire(v) for k, v in item.tensors.items()} if isinstance(item.tensors, dict) else item.tensors
    return replace(item, batch=batch, tensors=tensors)


def _from_wire(item: LoadedPack) -> LoadedPack:
    import numpy as np
    import torch

    def back(value: Any) -> Any:
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    if not isinstance(item.batch.input_ids, np.ndarray):
        return item
    batch = replace(item.batch, **{f: back(getattr(item.batch, f)) for f in _BATCH_TENSORS})
    tensors = {k: back(v) for k, v in item.tensors.items()} if isinstance(item.tensors, dict) else item.tensors
    return replace(item, batch=batch, tensors=tensors)


def _iterable_dataset(dataset: PackDataset) -> Any:
    """`dataset` as a torch IterableDataset (defined on first use: this module does not import torch itself)."""
    import torch.utils.data

    class _Packs(torch.utils.data.IterableDataset):
        def __init__(self, inner: PackDataset) -> None:
            self.inner = inner

        def __iter__(self) -> Iterator[LoadedPack]:
            return iter(self.inner)

    return _Packs(dataset)


def steps_packs(packs: Iterator[LoadedPack], grad_accum: int, step: int) -> list[LoadedPack]:
    """The grad_accum LoadedPacks of `step`, checked against the plan (a wrong order fails loudly)."""
    items = [next(packs) for _ in range(grad_accum)]
    if any(item.step != step for item in items):
        raise RuntimeError(f"loader out of order: expected step {step}, got {[i.step for i in items]}")
    return items


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
        vit_positions=positions(VIT, per_vit),
        vit_images=images[VIT],
        gen_positions=positions(GEN, per_gen),
        gen_images=images[GEN],
        record_ids=[r.id for r in records],
        modes=[r.mode for r in records],
    )
