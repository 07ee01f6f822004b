"""Prompt curation after the exact dedup: the safety check, then semantic near-duplicates (`curation:` config).

One embedding pass serves both filters (the embedding safety engine and the near-duplicate search read the same
L2-normalised sentence embeddings). Order and rule:

1. Safety first: a prompt scoring at or above `prompt_safety.threshold` is dropped as `unsafe_prompt`. An unsafe
   prompt is thus never the kept member of a near-duplicate cluster.
2. Near-duplicates among the remaining prompts: pairs with cosine >= `prompt_dedup.threshold`
   (stages.neardup.near_duplicate_pairs) that the compositional guard lets through (`protect_compositions`,
   stages/compositions.py: the same counts, colours and positions, and not the same words in another order), then
   stages.neardup.keep_first: in source order, a prompt is dropped as `near_duplicate` when it is a near-duplicate
   of an EARLIER KEPT prompt.

Every drop is counted in the PromptReport with its score and threshold. With both filters off nothing is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.config import CurationConfig
from stages.prompts import Prompt, PromptReport

UNSAFE = "unsafe_prompt"
NEAR_DUPLICATE = "near_duplicate"


@dataclass
class CurationResult:
    kept: list[Prompt]  # in source order
    #: one per dropped prompt, in source order: {where, prompt, reason, score, detail, duplicate_of}
    dropped: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {UNSAFE: 0, NEAR_DUPLICATE: 0})


def guard_pairs(texts: list[str], pairs: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """The pairs (arrays i, j, cosine) that the compositional guard (stages.compositions.same_composition) lets be
    near-duplicates."""
    import numpy as np

    from stages.compositions import same_composition

    i, j, sim = pairs
    ok = np.fromiter(
        (same_composition(texts[a], texts[b]) for a, b in zip(i.tolist(), j.tolist(), strict=True)), bool, len(i)
    )
    return i[ok], j[ok], sim[ok]


def _needs_embedder(cfg: CurationConfig) -> bool:
    safety = cfg.prompt_safety
    return cfg.prompt_dedup.enabled or (safety.enabled and safety.engine == "embedding")


def curate_prompts(
    prompts: list[Prompt],
    cfg: CurationConfig,
    report: PromptReport,
    embedder: Any = None,
    progress: Callable[[int], None] | None = None,
) -> CurationResult:
    """Apply the prompt filters of `cfg` to `prompts` (source order); drops go to `report` and `report.kept` becomes
    the number kept. `embedder`: a set-up SentenceEmbedder to reuse (else one is opened from `cfg.embedder` when a
    filter needs it)."""
    result = CurationResult(kept=list(prompts))
    safety_cfg, dedup_cfg = cfg.prompt_safety, cfg.prompt_dedup
    if not prompts or not (safety_cfg.enabled or dedup_cfg.enabled):
        return result
    texts = [p.text for p in prompts]
    emb = None
    if _needs_embedder(cfg):
        if embedder is None:
            from stages.engines import open_sentence_embedder

            embedder = open_sentence_embedder(cfg.embedder)
        emb = embedder.embed(texts, progress=progress)  # progress(n): n more prompts embedded

    drop: dict[int, dict[str, Any]] = {}
    if safety_cfg.enabled:
        from stages.prompt_safety import PromptSafety

        checker = PromptSafety(safety_cfg, embedder=embedder)
        checker.setup()
        for k, (score, label) in enumerate(checker.score(texts, embeddings=emb)):
            if score >= safety_cfg.threshold:
                detail = (
                    f"unsafe prompt: score {score:.2f} >= prompts safety threshold {safety_cfg.threshold:g} ({label})"
                )
                drop[k] = {"reason": UNSAFE, "score": round(score, 6), "detail": detail, "duplicate_of": None}

    if dedup_cfg.enabled:
        from stages.neardup import keep_first, near_duplicate_arrays

        rest = [k for k in range(len(prompts)) if k not in drop]
        pairs = near_duplicate_arrays(emb[rest], dedup_cfg.threshold, dedup_cfg.search, dedup_cfg.nprobe)
        if dedup_cfg.protect_compositions:
            pairs = guard_pairs([texts[k] for k in rest], pairs)
        _, duplicate_of = keep_first(len(rest), pairs)
        for j, (i, sim) in duplicate_of.items():
            first = prompts[rest[i]].where
            detail = f"near-duplicate of {first} (cosine {sim:.2f} >= {dedup_cfg.threshold:g})"
            drop[rest[j]] = {"reason": NEAR_DUPLICATE, "score": round(sim, 6), "detail": detail, "duplicate_of": first}

    kept = []
    for k, p in enumerate(prompts):
        d = drop.get(k)
        if d is None:
            kept.append(p)
            continue
        report.drop(d["reason"], p.where, d["detail"])
        result.counts[d["reason"]] += 1
        result.dropped.append({"where": p.where, "prompt": p.text, **d})
    result.kept = kept
    report.kept = len(kept)
    return result
