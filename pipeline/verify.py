"""`irgl verify OUT`: re-read every shard and check it against the manifest and the format rules.

Every problem is collected (never stop at the first) with the file and, where there is one, the record id.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.fsio import sha256_file
from pipeline.shards import MANIFEST_NAME
from schemas.conversation import conversation_to_json
from schemas.modes import MODE_RECORD_SCHEMA, MODES, ModeOptions, RecordError, check_record, refs_to_base64


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


class _Verifier:
    def __init__(self, out: Path, decode_images: bool) -> None:
        self.out = out
        self.decode_images = decode_images
        self.problems: list[Problem] = []
        # mode -> id -> sha256 of the Parquet conversation string (digests, not strings: they hold images)
        self.parquet_ids: dict[str, dict[str, str]] = defaultdict(dict)
        self.wds_ids: dict[str, set[str]] = defaultdict(set)

    def problem(self, path: str, message: str, record: str | None = None) -> None:
        self.problems.append(Problem(path, record, message))

    def run(self) -> list[Problem]:
        manifest_path = self.out / MANIFEST_NAME
        if not manifest_path.is_file():
            self.problem(MANIFEST_NAME, "missing: not a finished irgl build (the manifest is written last)")
            return self.problems
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = manifest["files"]
            counts = manifest["counts"]
            shards = manifest.get("shards", {})
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            self.problem(MANIFEST_NAME, f"unreadable manifest ({exc})")
            return self.problems
        self.options = ModeOptions(t1_loss_improving=bool(shards.get("t1_loss_improving", False)))
        self.rows_per_group = int(shards.get("rows_per_group", 64))

        listed = {f["path"] for f in files}
        for sub in ("data", "wds"):
            for path in sorted((self.out / sub).rglob("*")) if (self.out / sub).is_dir() else []:
                rel = path.relative_to(self.out).as_posix()
                if path.is_file() and rel not in listed:
                    self.problem(rel, "file is not listed in the manifest (stale or foreign shard)")

        # Parquet first: WebDataset samples are compared with the Parquet record of the same id.
        for entry in sorted(files, key=lambda f: f["format"] != "parquet"):
            rel = entry["path"]
            path = self.out / rel
            if not path.is_file():
                self.problem(rel, "listed in the manifest but missing")
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                self.problem(rel, f"size {size} bytes, manifest says {entry['bytes']}")
            elif sha256_file(path) != entry["sha256"]:
                self.problem(rel, "sha256 differs from the manifest (corrupted or modified)")
            if entry["format"] == "parquet":
                self._parquet(rel, entry)
            elif entry["format"] == "webdataset":
                self._webdataset(rel, entry)

        for mode in MODES:
            n = len(self.parquet_ids[mode.name])
            if n != counts.get(mode.name):
                self.problem(f"data/{mode.name}", f"{n} records, manifest counts {counts.get(mode.name)}")
        if any(f["format"] == "webdataset" for f in files):
            for mode in MODES:
                pids, wids = set(self.parquet_ids[mode.name]), self.wds_ids[mode.name]
                for rid in sorted(pids - wids):
                    self.problem(f"wds/{mode.name}", "record in Parquet but not in WebDataset", rid)
                for rid in sorted(wids - pids):
                    self.problem(f"wds/{mode.name}", "record in WebDataset but not in Parquet", rid)
        return self.problems

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
                if rid in self.parquet_ids[mode]:
                    self.problem(rel, "duplicate record id", rid)
                self.parquet_ids[mode][rid] = _digest(row["conversation"])
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
        if key in self.wds_ids[mode]:
            self.problem(rel, "duplicate sample key", key)
        self.wds_ids[mode].add(key)
        want = self.parquet_ids[mode].get(key)
        if want is not None and want != _digest(row["conversation"]):
            self.problem(rel, "conversation differs from the Parquet record of the same id", key)


def verify(out: Path, *, decode_images: bool = True) -> list[Problem]:
    """Every problem of the built dataset at `out`; an empty list means it verifies."""
    return _Verifier(Path(out), decode_images).run()
