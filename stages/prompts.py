"""Prompt sources: txt, jsonl, json, Parquet, a Hugging Face dataset, and a seeded compositional generator.

Every source yields `Prompt`s with a location (`file:line`) for error messages. Prompts are normalised (Unicode
NFC, control characters removed, whitespace collapsed) and exactly deduplicated; every line that is not kept is
counted with its reason in a `PromptReport`, and malformed lines are reported as `file:line: reason`.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import PromptSourceConfig


class PromptSourceError(ValueError):
    """The prompt source itself is unusable (missing file, unreadable, wrong column). Names the path/field."""


@dataclass(frozen=True)
class Prompt:
    text: str  # normalised
    source: str  # identity of the source (part of the trajectory id), e.g. "jsonl:geneval_metadata.jsonl"
    where: str  # location for messages, e.g. "prompts.jsonl:12"


@dataclass
class PromptReport:
    """What happened to every input line: kept, or dropped with a counted reason."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[str] = field(default_factory=list)  # "file:line: reason" for malformed/dropped lines

    def drop(self, reason: str, where: str, detail: str | None = None) -> None:
        self.dropped[reason] += 1
        self.problems.append(f"{where}: {detail or reason}")

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


_CONTROL = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b\ufeff]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, control and zero-width characters removed, runs of whitespace collapsed to one space, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    return _SPACE.sub(" ", text).strip()


# The built-in compositional generator: objects x colours x counts x positions (GenEval-like categories).
OBJECTS = [
    "apple", "bench", "bicycle", "bird", "book", "bowl", "car", "cat", "chair", "clock", "cup", "dog", "giraffe",
    "horse", "kite", "laptop", "teddy bear", "train", "umbrella", "vase",
]  # fmt: skip
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITIONS = ["to the left of", "to the right of", "above", "below"]


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else (noun + "es" if noun.endswith(("ch", "sh")) else noun + "s")


def generate_prompts(count: int, seed: int) -> list[str]:
    """Deterministic compositional prompts; templates cycle so every kind appears in a small sample."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.sample(OBJECTS, 2)
        ca, cb = rng.sample(COLOURS, 2)
        n = rng.randint(1, 4)
        kind = i % 4
        if kind == 0:
            out.append(f"a photo of {COUNT_WORDS[n]} {_plural(a, n)}")
        elif kind == 1:
            out.append(f"a photo of a {ca} {a}")
        elif kind == 2:
            out.append(f"a photo of a {ca} {a} and a {cb} {b}")
        else:
            out.append(f"a photo of a {a} {rng.choice(POSITIONS)} a {b}")
    return out


def _detect_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    kinds = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
    if suffix not in kinds:
        raise PromptSourceError(f"{path}: cannot tell the prompt file kind from '{suffix}'; set prompts.kind")
    return kinds[suffix]


def _raw_file(path: Path, kind: str, field_name: str, report: PromptReport) -> Iterator[tuple[str, str]]:
    """Yield (raw text, where) for a file source; malformed lines are reported and skipped."""
    name = path.name
    if kind in ("txt", "jsonl"):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    report.read += 1
                    report.drop("invalid_utf8", where, f"invalid UTF-8 ({exc.reason} at byte {exc.start})")
                    continue
                report.read += 1
                if kind == "txt":
                    yield line, where
                    continue
                if not line.strip():
                    report.drop("empty", where, "empty line")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    report.drop("malformed_json", where, f"malformed JSON ({exc.msg})")
                    continue
                if not isinstance(obj, dict) or field_name not in obj:
                    report.drop("missing_field", where, f"no field '{field_name}'")
                    continue
                if not isinstance(obj[field_name], str):
                    report.drop("not_a_string", where, f"field '{field_name}' is not a string")
                    continue
                yield obj[field_name], where
    elif kind == "json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PromptSourceError(f"{path}: not a valid UTF-8 JSON file ({exc})") from exc
        if not isinstance(items, list):
            raise PromptSourceError(f"{path}: expected a JSON list of prompts or objects")
        for i, item in enumerate(items):
            where = f"{name}[{i}]"
            report.read += 1
            if isinstance(item, dict):
                item = item.get(field_name)
            if not isinstance(item, str):
                report.drop("missing_field", where, f"item is not a string or has no string field '{field_name}'")
                continue
            yield item, where
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise PromptSourceError(f"{path}: not a readable Parquet file ({exc})") from exc
        if field_name not in pf.schema_arrow.names:
            raise PromptSourceError(f"{path}: no column '{field_name}' (has {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=[field_name]):
            for value in batch.column(0).to_pylist():
                row += 1
                report.read += 1
                if not isinstance(value, str):
                    report.drop("not_a_string", f"{name}:row {row}", "value is null or not a string")
                    continue
                yield value, f"{name}:row {row}"


def _raw_hf(cfg: PromptSourceConfig, report: PromptReport) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.split)
    except Exception as exc:  # datasets raises many kinds (not found, offline, bad config)
        raise PromptSourceError(f"prompts.path={cfg.path!r}: cannot load the Hugging Face dataset ({exc})") from exc
    if cfg.field not in ds.column_names:
        raise PromptSourceError(f"prompts.field={cfg.field!r}: not a column of {cfg.path} (has {ds.column_names})")
    for i, value in enumerate(ds[cfg.field]):
        report.read += 1
        if not isinstance(value, str):
            report.drop("not_a_string", f"{cfg.path}[{i}]", "value is null or not a string")
            continue
        yield value, f"{cfg.path}[{i}]"


def effective_sources(sources: list[PromptSourceConfig], path: str | None = None) -> list[PromptSourceConfig]:
    """The sources a build reads: the config's, or - `path`, the `--prompts` option of build and plan - one file of
    the kind its extension says, read with the first source's field."""
    if path is None:
        return list(sources)
    return [PromptSourceConfig(kind="auto", path=path, field=sources[0].field if sources else "prompt")]


def load_sources(
    sources: list[PromptSourceConfig], path: str | None = None, limit: int | None = None
) -> tuple[list[Prompt], PromptReport]:
    """Read several sources in order into one deduplicated list. `path` (the --prompts option) replaces them all
    (effective_sources)."""
    sources = effective_sources(sources, path)
    report = PromptReport()
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for cfg in sources:
        load_prompts(cfg, None, limit, report=report, seen=seen, into=prompts)
    return prompts, report


def load_prompts(
    cfg: PromptSourceConfig,
    path: str | None = None,
    limit: int | None = None,
    *,
    report: PromptReport | None = None,
    seen: set[str] | None = None,
    into: list[Prompt] | None = None,
) -> tuple[list[Prompt], PromptReport]:
    """Read, normalise, filter and deduplicate the prompts of a source (in source order). `report`, `seen` and
    `into` let several sources share one report and one dedup set."""
    report = report if report is not None else PromptReport()
    path = path or cfg.path
    kind = cfg.kind
    if kind == "generator" and path is None:
        raw: Iterator[tuple[str, str]] = (
            (text, f"generator:{i}") for i, text in enumerate(generate_prompts(cfg.generator_count, cfg.generator_seed))
        )
        report_read = True
        source = f"generator:{cfg.generator_seed}"
    elif kind == "hf":
        if not path:
            raise PromptSourceError("prompts.path: a Hugging Face dataset name is required for kind 'hf'")
        cfg = cfg.model_copy(update={"path": path})
        raw = _raw_hf(cfg, report)
        report_read = False
        source = f"hf:{path}:{cfg.split}"
    else:
        if path is None:
            raise PromptSourceError(f"prompts.path: a file is required for kind '{kind}'")
        p = Path(path)
        if not p.exists():
            raise PromptSourceError(f"{path}: prompt file not found")
        if not p.is_file():
            raise PromptSourceError(f"{path}: not a file")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise PromptSourceError(f"{path}: cannot be read ({exc.strerror})") from exc
        if kind in ("auto", "generator"):
            kind = _detect_kind(p)
        raw = _raw_file(p, kind, cfg.field, report)
        report_read = False
        source = f"{kind}:{p.name}"

    seen = seen if seen is not None else set()
    prompts = into if into is not None else []
    for text, where in raw:
        if report_read:
            report.read += 1
        if limit is not None and len(prompts) >= limit:
            report.dropped["over_limit"] += 1  # counted, not listed: not a problem of the line
            continue
        norm = normalize(text)
        if not norm:
            report.drop("empty", where, "empty or whitespace-only prompt")
            continue
        if len(norm) > cfg.max_chars:
            report.drop("too_long", where, f"prompt has {len(norm)} characters > prompts.max_chars={cfg.max_chars}")
            continue
        if norm in seen:
            report.drop("duplicate", where, "duplicate of an earlier prompt")
            continue
        seen.add(norm)
        prompts.append(Prompt(text=norm, source=source, where=where))
    report.kept = len(prompts)
    return prompts, report
