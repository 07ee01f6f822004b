"""Reading records from built shard files (Parquet row groups, WebDataset tars) in whole blocks, and parsing rows
without touching image bytes.

An Entry says where one record lives; a block is a Parquet row group or WDS_BLOCK_ROWS consecutive samples of a
tar. Readers load a block once and make EncodedRecords (trainer/records.py) of its rows.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.conversation import ConversationError, conversation_from_json, validate_conversation
from trainer.records import EncodedRecord, SequenceFormat, encode_conversation

#: Samples per block of a WebDataset tar (a Parquet block is one row group).
WDS_BLOCK_ROWS = 64


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


def mode_files(data_dir: Path, mode: str, data_format: str) -> list[Path]:
    """The shard files of one mode, sorted (the order is part of the deterministic data order)."""
    if data_format == "parquet":
        return sorted((Path(data_dir) / "data" / mode).glob("*.parquet"))
    return sorted((Path(data_dir) / "wds" / mode).glob("*.tar"))


def tar_blocks(path: str | Path) -> Iterator[tuple[int, int, int, list[tuple[str, dict[str, tuple[int, int]]]]]]:
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
