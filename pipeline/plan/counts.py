"""Prompt counts for `irgl plan`, offline: local files and the built-in generator are read with the build's own
reader (the exact count after normalisation, filters and dedup); Hugging Face sources are never contacted - they
are counted from an absolute split slice (`train[:200000]`) or from `--expected-count PATH=N`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.plan.errors import PlanError
from schemas.config import PromptSourceConfig


@dataclass(frozen=True)
class SourceCount:
    """Prompts expected from one source: exact (read locally) or an upper bound (a Hugging Face slice), or None."""

    label: str
    count: int | None
    how: str


_SLICE = re.compile(r"^\s*([\w.-]+)\s*\[\s*(\d*)\s*:\s*(\d*)\s*\]\s*$")


def split_slice_count(split: str) -> int | None:
    """Rows selected by a `datasets` split with absolute slices ('train[:1000]', 'train[10:20]+test[:5]'); None
    when any part has no absolute end (a whole split, percentages): its size is not knowable offline."""
    total = 0
    for part in split.split("+"):
        m = _SLICE.match(part)
        if not m or not m.group(3):
            return None
        start, end = int(m.group(2) or 0), int(m.group(3))
        total += max(end - start, 0)
    return total


def parse_expected_counts(items: list[str]) -> dict[str, int]:
    """`--expected-count PATH=N` options -> {PATH: N}. PATH is a Hugging Face dataset name or 'name:split'."""
    out = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key or not value.isdigit():
            raise PlanError(f"--expected-count {item!r}: expected PATH=N with N a whole number")
        out[key] = int(value)
    return out


def count_prompts(sources: list[PromptSourceConfig], expected: dict[str, int] | None = None) -> list[SourceCount]:
    """Per source: local files and the generator are read with the build's own reader (normalised, filtered, and
    deduplicated across these sources: the exact count); Hugging Face sources are never contacted."""
    from stages.prompts import PromptReport, PromptSourceError, load_prompts

    expected = expected or {}
    seen: set[str] = set()
    counts = []
    for src in sources:
        if src.kind == "hf":
            label = f"hf:{src.path}:{src.split}"
            n = expected.get(f"{src.path}:{src.split}", expected.get(src.path or ""))
            if n is not None:
                counts.append(SourceCount(label, n, "--expected-count (rows before dedup and filters)"))
                continue
            n = split_slice_count(src.split)
            how = "split slice (rows before dedup and filters)" if n is not None else "unknown: not read offline"
            counts.append(SourceCount(label, n, how))
            continue
        label = f"generator:{src.generator_seed}" if src.kind == "generator" and src.path is None else str(src.path)
        try:
            prompts, report = load_prompts(src, report=PromptReport(), seen=seen, into=[])
        except PromptSourceError as exc:
            raise PlanError(str(exc)) from exc
        dropped = sum(report.dropped.values())
        counts.append(SourceCount(label, len(prompts), f"read locally: {report.read} read, {dropped} dropped"))
    return counts
