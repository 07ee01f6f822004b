"""The data index: every usable record of a built dataset (where it lives, its length in tokens) and every
skipped one counted by reason. `build_index` makes it in this process; `cached_index` builds it once, with the
tokenizer alone (no model load), in parallel processes over shard files, caches it next to the training output and
hands it to the workers as a path.

`cached_index(...)` returns the index of a built dataset and the path of its cache file
`<cache_dir>/<key>.json`. The key is a hash of what decides the index: the dataset's `manifest.json` (its sha256:
every shard's name, size and hash), the tokenizer (its serialized content and special ids), the sequence format
(template pieces, image slot counts), the token budget, the data format and the modes. A second build with the same
key reads the cache; any change rebuilds. Images are never decoded: Janus' image token counts are fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.conversation import ConversationError, conversation_from_json, validate_conversation
from schemas.modes import MODES_BY_NAME
from trainer.records import SequenceFormat, encode_conversation
from trainer.shards import WDS_BLOCK_ROWS, Entry, mode_files, parse_parquet_conversation, tar_blocks

INDEX_VERSION = 2  # bump when the index or the segment layout (record lengths) changes
MANIFEST_NAME = "manifest.json"


# ----------------------------------------------------------------------------------------------------------------
# The index of a built dataset: every usable record's place and length


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
        for block, start, end, samples in tar_blocks(path):
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


# ----------------------------------------------------------------------------------------------------------------
# The sequence format from the tokenizer alone


class _Tokenize:
    """`text -> ids` without special tokens, through the fast tokenizer's backend (picklable)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    def __call__(self, text: str) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def janus_sequence_format(path: str) -> SequenceFormat:
    """Janus / Janus-Pro's SequenceFormat from its tokenizer and config.json only (no weights loaded): the same
    values as `JanusAdapter.sequence_format()`, plus the pad id used by text condition dropout."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    ids = tok.convert_tokens_to_ids
    return SequenceFormat(
        tokenize=_Tokenize(tok),
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        boi_id=ids(tok.boi_token),
        eoi_id=ids(tok.eoi_token),
        vit_id=config.image_token_id,
        gen_id=tok.pad_token_id if tok.pad_token_id is not None else config.image_token_id,
        num_vit_tokens=config.vision_config.num_image_tokens,
        num_gen_tokens=config.vq_config.num_patches**2,
        pad_id=tok.pad_token_id,
    )


def tokenizer_format(adapter: str, path: str) -> SequenceFormat:
    """The SequenceFormat of an adapter's model at `path` (a local folder or a Hub id), from its tokenizer alone."""
    if adapter == "janus":
        return janus_sequence_format(path)
    raise ValueError(f"unknown adapter {adapter!r}")


@dataclass(frozen=True)
class FormatSource:
    """Where a worker process gets the SequenceFormat: (adapter, model path). Picklable; loads once per process."""

    adapter: str
    path: str

    def load(self) -> SequenceFormat:
        key = (self.adapter, self.path)
        if key not in _FORMATS:
            _FORMATS[key] = tokenizer_format(self.adapter, self.path)
        return _FORMATS[key]


_FORMATS: dict[tuple[str, str], SequenceFormat] = {}


def format_fingerprint(fmt: SequenceFormat) -> str:
    """sha256 of what makes record lengths: the tokenizer's content, special ids, template, slot counts."""
    tokenizer = getattr(fmt.tokenize, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
        added = sorted((k, v) for k, v in tokenizer.get_added_vocab().items())
    else:  # any other tokenize function: its token ids for a fixed probe text
        content = json.dumps(fmt.tokenize("IRGL index probe: <think> 0123456789 ### Final Comprehensive </think>"))
        added = []
    facts = {k: v for k, v in fmt.__dict__.items() if k != "tokenize"}
    payload = json.dumps({"tokenizer": content, "added": added, "format": facts}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def manifest_sha256(data_dir: Path | str) -> str:
    """sha256 of the dataset's manifest.json; without one (an incomplete copy), of the shard listing (names, sizes
    and modification times), so a changed file still changes the key."""
    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST_NAME
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    listing = [
        (p.relative_to(data_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for top in ("data", "wds")
        for p in sorted((data_dir / top).rglob("*"))
        if p.is_file()
    ]
    return "listing-" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def index_key(data_dir: Path | str, modes: list[str], fmt: SequenceFormat, token_budget: int, data_format: str) -> str:
    facts = {
        "version": INDEX_VERSION,
        "manifest": manifest_sha256(data_dir),
        "format": format_fingerprint(fmt),
        "token_budget": token_budget,
        "data_format": data_format,
        "wds_block_rows": WDS_BLOCK_ROWS,
        "modes": sorted(modes),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# Building (serial or parallel), saving, loading


def _index_task(task: tuple[str, str, str, FormatSource | SequenceFormat, int]) -> tuple[list[Entry], list, float]:
    """One file's (entries, skips, wall-clock time when its work started)."""
    path, mode, data_format, source, token_budget = task
    fmt = source if isinstance(source, SequenceFormat) else source.load()
    started = time.time()
    entries, skips = index_file(path, mode, data_format, fmt, token_budget)
    return entries, skips, started


def _start_process(source: FormatSource) -> None:
    """Start-up of an index process: the imports and the tokenizer, once, before its first file."""
    import pyarrow.parquet  # noqa: F401

    source.load()


@dataclass
class IndexResult:
    """An index with where it is cached and how it was obtained."""

    index: DataIndex
    path: Path
    key: str
    cached: bool  # True: read from the cache
    seconds: float  # wall time of building or reading it
    jobs: int  # processes that built it (0 when read from the cache)
    startup_s: float = 0.0  # of `seconds`: starting the processes (spawn, imports, tokenizer) up to the first file


def cached_index(
    data_dir: Path | str,
    modes: list[str],
    source: FormatSource,
    token_budget: int,
    data_format: str,
    cache_dir: Path | str,
    *,
    jobs: int | None = None,
    fmt: SequenceFormat | None = None,
) -> IndexResult:
    """The index of `modes` of a built dataset: read from `<cache_dir>/<key>.json` when present, else built with
    `jobs` processes (None: one per CPU, at most one per file, at most 16; 1: in this process) and cached.

    `fmt` (the format `source` loads) saves this process one tokenizer load when the caller already has it.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    fmt = fmt or source.load()
    key = index_key(data_dir, modes, fmt, token_budget, data_format)
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        index, stored_dir = _read(path)
        if stored_dir != str(data_dir):  # the same dataset (same manifest) moved: point the cache at it
            index = _rebase(index, stored_dir, str(data_dir))
            save_index(index, path, data_dir, key)
        return IndexResult(index, path, key, True, time.perf_counter() - t0, 0)
    tasks = [
        (str(f), mode, data_format, source, token_budget)
        for mode in modes
        for f in _checked_files(data_dir, mode, data_format)
    ]
    jobs = min(jobs or os.cpu_count() or 1, len(tasks), 16)
    t_start = time.time()
    if jobs <= 1:
        results = [_index_task((p, m, d, fmt, b)) for p, m, d, _, b in tasks]
    else:
        import multiprocessing

        # spawn: the driver may hold Ray's threads; a fresh interpreter per process is the safe start.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_process, initargs=(source,)) as pool:
            results = list(pool.map(_index_task, tasks, chunksize=1))
    index = DataIndex(entries={m: [] for m in modes})
    for (_, mode, _, _, _), (entries, skips, _) in zip(tasks, results, strict=True):
        merge_file_index(index, mode, entries, skips)
    save_index(index, path, data_dir, key)
    startup = max(0.0, min(r[2] for r in results) - t_start)
    return IndexResult(index, path, key, False, time.perf_counter() - t0, jobs, startup)


def save_index(index: DataIndex, path: Path | str, data_dir: Path | str, key: str = "") -> None:
    """Write the index as compact JSON (columns per mode, file names relative to data_dir), atomically."""
    data_dir = str(Path(data_dir).resolve())
    files: dict[str, int] = {}
    modes: dict[str, dict[str, list[Any]]] = {}
    for mode, entries in index.entries.items():
        cols: dict[str, list[Any]] = {"id": [], "file": [], "locator": [], "length": []}
        for e in entries:
            rel = os.path.relpath(e.file, data_dir)
            cols["id"].append(e.id)
            cols["file"].append(files.setdefault(rel, len(files)))
            cols["locator"].append(list(e.locator))
            cols["length"].append(e.length)
        modes[mode] = cols
    payload = {
        "version": INDEX_VERSION,
        "key": key,
        "data_dir": data_dir,
        "files": list(files),
        "modes": modes,
        "skipped": dict(index.skipped),
        "skipped_ids": index.skipped_ids,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    os.replace(tmp, path)


def _read(path: Path | str) -> tuple[DataIndex, str]:
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if payload.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {payload.get('version')}, expected {INDEX_VERSION}")
    data_dir = payload["data_dir"]
    files = [os.path.join(data_dir, f) for f in payload["files"]]
    entries = {
        mode: [
            Entry(mode, rid, files[f], tuple(loc), length)
            for rid, f, loc, length in zip(cols["id"], cols["file"], cols["locator"], cols["length"], strict=True)
        ]
        for mode, cols in payload["modes"].items()
    }
    return DataIndex(entries, Counter(payload["skipped"]), payload["skipped_ids"]), data_dir


def _rebase(index: DataIndex, old: str, new: str) -> DataIndex:
    entries = {
        m: [Entry(e.mode, e.id, os.path.join(new, os.path.relpath(e.file, old)), e.locator, e.length) for e in es]
        for m, es in index.entries.items()
    }
    return DataIndex(entries, index.skipped, index.skipped_ids)


def load_index(path: Path | str) -> DataIndex:
    """A cached index (as `cached_index` wrote it)."""
    return _read(path)[0]
