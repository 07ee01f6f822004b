"""`irgl verify OUT`: re-read every shard and check it against the manifest and the format rules.

Every problem is collected (never stop at the first) with the file and, where there is one, the record id.

The work is split by unit (the manifest lists each shard with its unit): one unit's Parquet and WebDataset files
are checked together in one job (sizes, sha256, every record, Parquet/WebDataset agreement), `jobs` jobs at a time
in processes of this machine; what spans units (duplicate ids, counts per mode, files the manifest does not list)
is checked once over the jobs' results. The findings do not depend on `jobs`.

A unit that verified without a problem is recorded in `OUT/state/verified.json` with its files' sha256. With
`reuse=True` (what `irgl publish` does) such a unit is re-checked by size and sha256 only and its record ids are
read from the `id` column, instead of decoding every record again: identical bytes verified already.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.card import MANIFEST_NAME
from pipeline.fsio import sha256_file, write_atomic
from schemas.conversation import conversation_to_json
from schemas.modes import MODE_RECORD_SCHEMA, MODES, ModeOptions, RecordError, check_record, refs_to_base64

#: Where clean units are recorded, and the version of the checks they passed (bump it when a check is added).
RECORD_PATH = "state/verified.json"
CHECKS_VERSION = 1


@dataclass(frozen=True)
class Problem:
    path: str
    record: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path} [{self.record}]" if self.record else self.path
        return f"{where}: {self.message}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class _GroupResult:
    """What one unit's job found: its problems, and its record ids by mode (with the file each came from)."""

    problems: list[Problem] = field(default_factory=list)
    parquet_ids: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    wds_ids: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 as read (the record of a clean unit)
    reused: bool = False


class _Group:
    """The checks of one group of files (one unit's, or all files of a manifest without units)."""

    def __init__(self, out: Path, options: ModeOptions, rows_per_group: int, decode_images: bool) -> None:
        self.out = out
        self.options = options
        self.rows_per_group = rows_per_group
        self.decode_images = decode_images
        self.result = _GroupResult()
        self.digests: dict[str, dict[str, str]] = defaultdict(dict)  # mode -> id -> sha256 of the conversation
        self.seen_wds: dict[str, set[str]] = defaultdict(set)

    def problem(self, path: str, message: str, record: str | None = None) -> None:
        self.result.problems.append(Problem(path, record, message))

    def _file(self, entry: dict[str, Any]) -> bool:
        """Size and sha256 against the manifest; False when the file is missing."""
        rel = entry["path"]
        path = self.out / rel
        if not path.is_file():
            self.problem(rel, "listed in the manifest but missing")
            return False
        size = path.stat().st_size
        if size != entry["bytes"]:
            self.problem(rel, f"size {size} bytes, manifest says {entry['bytes']}")
        else:
            digest = sha256_file(path)
            self.result.files[rel] = digest
            if digest != entry["sha256"]:
                self.problem(rel, "sha256 differs from the manifest (corrupted or modified)")
        return True

    def run(self, entries: list[dict[str, Any]]) -> _GroupResult:
        # Parquet first: WebDataset samples are compared with the Parquet record of the same id.
        for entry in sorted(entries, key=lambda f: f["format"] != "parquet"):
            if not self._file(entry):
                continue
            if entry["format"] == "parquet":
                self._parquet(entry["path"], entry)
            elif entry["format"] == "webdataset":
                self._webdataset(entry["path"], entry)
        if any(f["format"] == "webdataset" for f in entries):
            for mode in MODES:
                pids, wids = set(self.digests[mode.name]), self.seen_wds[mode.name]
                for rid in sorted(pids - wids):
                    self.problem(f"wds/{mode.name}", "record in Parquet but not in WebDataset", rid)
                for rid in sorted(wids - pids):
                    self.problem(f"wds/{mode.name}", "record in WebDataset but not in Parquet", rid)
        return self.result

    def rerun(self, entries: list[dict[str, Any]]) -> _GroupResult:
        """A unit that verified before: sizes and sha256, and the ids of its Parquet records (its WebDataset
        samples were found equal to them then)."""
        self.result.reused = True
        for entry in entries:
            if self._file(entry) and entry["format"] == "parquet":
                ids = pq.read_table(self.out / entry["path"], columns=["id"]).column("id").to_pylist()
                self.result.parquet_ids[entry["mode"]].extend((rid, entry["path"]) for rid in ids)
                if any(f["format"] == "webdataset" and f["mode"] == entry["mode"] for f in entries):
                    self.result.wds_ids[entry["mode"]].extend((rid, entry["path"]) for rid in ids)
        return self.result

    def _parquet(self, rel: str, entry: dict[str, Any]) -> None:
        mode = entry["mode"]
        try:
            pf = pq.ParquetFile(self.out / rel)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for damaged files
            self.problem(rel, f"not a readable Parquet file ({exc})")
            return
        if not pf.schema_arrow.equals(MODE_RECORD_SCHEMA):
            self.problem(rel, f"schema differs from the mode record schema: {pf.schema_arrow}")
            return
        rows = 0
        for g in range(pf.num_row_groups):
            if pf.metadata.row_group(g).num_rows > self.rows_per_group:
                self.problem(rel, f"row group {g} has {pf.metadata.row_group(g).num_rows} rows > {self.rows_per_group}")
            try:
                batch = pf.read_row_group(g).to_pylist()
            except Exception as exc:
                self.problem(rel, f"row group {g} does not decode ({exc})")
                continue
            for row in batch:
                rows += 1
                rid = row["id"]
                if row["mode"] != mode:
                    self.problem(rel, f"mode column {row['mode']!r} in the shard of {mode}", rid)
                try:
                    check_record(row, self.options, decode_images=self.decode_images)
                except RecordError as exc:
                    self.problem(rel, str(exc), rid)
                self.result.parquet_ids[mode].append((rid, rel))
                self.digests[mode][rid] = _digest(row["conversation"])
        if rows != entry["rows"]:
            self.problem(rel, f"{rows} rows, manifest says {entry['rows']}")

    def _webdataset(self, rel: str, entry: dict[str, Any]) -> None:
        mode = entry["mode"]
        samples: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        try:
            with tarfile.open(self.out / rel, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        self.problem(rel, f"member {member.name!r} is not a regular file")
                        continue
                    key, _, suffix = member.name.partition(".")
                    fh = tar.extractfile(member)
                    data = fh.read() if fh else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name!r} is truncated")
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][suffix] = data
                # tarfile stops quietly at a header cut short; a whole archive ends with two zero blocks.
                end = tar.offset
            with open(self.out / rel, "rb") as fh:
                fh.seek(end)
                if fh.read(1024) != bytes(1024):
                    raise tarfile.ReadError(f"no end-of-archive marker after offset {end} (truncated)")
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.problem(rel, f"not a readable tar file ({exc})")
            return
        for key in order:
            self._sample(rel, mode, key, samples[key])
        if len(order) != entry["rows"]:
            self.problem(rel, f"{len(order)} samples, manifest says {entry['rows']}")

    def _sample(self, rel: str, mode: str, key: str, members: dict[str, bytes]) -> None:
        if "json" not in members:
            self.problem(rel, "sample has no .json member", key)
            return
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            turns = meta["conversation"]
            images = {k: v for k, v in members.items() if k != "json"}
            row = {**meta, "conversation": conversation_to_json(refs_to_base64(turns, images))}
            check_record(row, self.options, decode_images=self.decode_images)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            self.problem(rel, f"sample metadata is not valid ({exc})", key)
            return
        except RecordError as exc:
            self.problem(rel, str(exc), key)
            return
        if meta.get("id") != key:
            self.problem(rel, f"sample key differs from its id {meta.get('id')!r}", key)
        if meta.get("mode") != mode:
            self.problem(rel, f"mode {meta.get('mode')!r} in the shard of {mode}", key)
        self.result.wds_ids[mode].append((key, rel))
        self.seen_wds[mode].add(key)
        want = self.digests[mode].get(key)
        if want is not None and want != _digest(row["conversation"]):
            self.problem(rel, "conversation differs from the Parquet record of the same id", key)


def _check_group(
    out: str, entries: list[dict[str, Any]], t1_loss: bool, rows_per_group: int, decode_images: bool, reuse: bool
) -> _GroupResult:
    """One job (module level: it runs in a worker process)."""
    group = _Group(Path(out), ModeOptions(t1_loss_improving=t1_loss), rows_per_group, decode_images)
    return group.rerun(entries) if reuse else group.run(entries)


def _group_key(entry: dict[str, Any]) -> str:
    unit = entry.get("unit")
    return "all" if unit is None else f"{int(unit):05d}"


def _load_record(out: Path) -> dict[str, Any]:
    try:
        record = json.loads((out / RECORD_PATH).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record.get("groups", {}) if record.get("checks_version") == CHECKS_VERSION else {}


def _verified_before(record: dict[str, Any], entries: list[dict[str, Any]], decode_images: bool) -> bool:
    """The group was recorded clean with these exact files (by the manifest's sha256), at least as thoroughly."""
    seen = record.get("files")
    return (
        seen == {f["path"]: f["sha256"] for f in entries}
        and (record.get("decode_images", False) or not decode_images)
    )  # fmt: skip


def verify(
    out: Path, *, decode_images: bool = True, jobs: int = 1, reuse: bool = False, progress: Any = None
) -> list[Problem]:
    """Every problem of the built dataset at `out`; an empty list means it verifies.

    `jobs`: processes checking units in parallel (1: this process). `reuse`: re-check units recorded clean by an
    earlier verify by size and sha256 only. In a build directory (OUT/state/build.json) clean units are recorded,
    holding OUT's lock while doing so. `progress` (pipeline.logs.UnitProgress, optional): `start(units)`, then
    `progress(unit, {"counts": {"problems": n}})` as each unit's check finishes, in the order they finish.
    """
    out = Path(out)
    problems: list[Problem] = []
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        return [Problem(MANIFEST_NAME, None, "missing: not a finished irgl build (the manifest is written last)")]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        counts = manifest["counts"]
        shards = manifest.get("shards", {})
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        return [Problem(MANIFEST_NAME, None, f"unreadable manifest ({exc})")]

    listed = {f["path"] for f in files}
    for sub in ("data", "wds"):
        for path in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in listed:
                problems.append(Problem(rel, None, "file is not listed in the manifest (stale or foreign shard)"))

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in files:
        if entry["format"] in ("parquet", "webdataset"):
            groups[_group_key(entry)].append(entry)
    loose = [f for f in files if f["format"] not in ("parquet", "webdataset")]  # the card: size and sha256
    record = _load_record(out) if reuse else {}
    reused = {key: _verified_before(record.get(key, {}), entries, decode_images) for key, entries in groups.items()}
    args = {
        key: (str(out), entries, bool(shards.get("t1_loss_improving", False)), int(shards.get("rows_per_group", 64)),
              decode_images, reused[key])
        for key, entries in groups.items()
    }  # fmt: skip
    results = _run_jobs(args, jobs, progress)

    card = _Group(out, ModeOptions(), 0, False)
    for entry in loose:
        card._file(entry)
    problems.extend(card.result.problems)
    seen_parquet: dict[str, set[str]] = defaultdict(set)
    seen_wds: dict[str, set[str]] = defaultdict(set)
    for key in sorted(results):
        res = results[key]
        problems.extend(res.problems)
        for mode, ids in res.parquet_ids.items():
            for rid, rel in ids:
                if rid in seen_parquet[mode]:
                    problems.append(Problem(rel, rid, "duplicate record id"))
                seen_parquet[mode].add(rid)
        for mode, ids in res.wds_ids.items():
            for rid, rel in ids:
                if rid in seen_wds[mode]:
                    problems.append(Problem(rel, rid, "duplicate sample key"))
                seen_wds[mode].add(rid)
    for mode in MODES:
        n = len(seen_parquet[mode.name])
        if n != counts.get(mode.name):
            problems.append(Problem(f"data/{mode.name}", None, f"{n} records, manifest counts {counts.get(mode.name)}"))

    if (out / "state" / "build.json").is_file():
        clean = {
            key: {"files": res.files, "decode_images": decode_images or record.get(key, {}).get("decode_images", False)}
            for key, res in results.items()
            if not res.problems and res.files == {f["path"]: f["sha256"] for f in groups[key]}
        }
        _save_record(out, clean)
    return problems


def _run_jobs(args: dict[str, tuple[Any, ...]], jobs: int, progress: Any = None) -> dict[str, _GroupResult]:
    def landed(key: str, result: _GroupResult) -> None:
        if progress is not None:
            progress(key, {"counts": {"problems": len(result.problems)}})

    if progress is not None:
        progress.start(len(args))
    if jobs <= 1 or len(args) <= 1:
        results = {}
        for key, a in args.items():
            results[key] = _check_group(*a)
            landed(key, results[key])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # Largest groups first, so that no process is left with a big one at the end.
    order = sorted(args, key=lambda k: -sum(f["bytes"] for f in args[k][1]))
    with ProcessPoolExecutor(min(jobs, len(args)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_check_group, *args[key]): key for key in order}
        done = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            landed(futures[future], done[futures[future]])
        return {key: done[key] for key in args}


def _save_record(out: Path, clean: dict[str, Any]) -> None:
    """Record the clean units (replacing what was recorded: a unit that no longer verifies loses its entry)."""
    from pipeline.lock import OutLocked, hold_out

    try:
        with hold_out(out, "irgl verify"):
            body = {"checks_version": CHECKS_VERSION, "groups": dict(sorted(clean.items()))}
            write_atomic(out / RECORD_PATH, (json.dumps(body, indent=1) + "\n").encode("utf-8"))
    except OutLocked:
        pass  # a build or publish holds OUT: the findings stand, they are just not recorded this time


def default_jobs() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
