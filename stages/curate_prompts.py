"""Prompt curation after the exact dedup: the safety check, then semantic near-duplicates (`curation:` config).

One embedding pass serves both filters (the embedding safety engine and the near-duplicate search read the same
L2-normalised sentence embeddings). Order and rule:

1. Safety first: a prompt scoring at or above `prompt_safety.threshold` is dropped as `unsafe_prompt`. An unsafe
   prompt is thus never the kept member of a near-duplicate cluster.
2. Near-duplicates among the remaining prompts: pairs with cosine >= `prompt_dedup.threshold`
   (stages.neardup.near_duplicate_pairs) that pass the composition guard (below), then stages.neardup.keep_first:
   in source order, a prompt is dropped as `near_duplicate` when it is a near-duplicate of an EARLIER KEPT prompt.

The composition guard. Sentence embeddings hardly see word order or relation words: all-MiniLM-L6-v2 puts "a photo
of a horse above a kite" and "... below a kite" at cosine 0.988, "a bench to the right of a bowl" and "... to the
left of ..." at 0.995, "a cat to the left of a dog" and "a dog to the left of a cat" at 0.996, while real
paraphrases ("photo" / "photograph", "asleep" / "sleeping") lie at 0.94-0.99: no threshold tells them apart. So a
pair only counts when both prompts have the same `composition` (their count, colour and position words in order,
synonyms folded: over -> above, 2 -> two, grey -> gray, ...) and are not the same words in another order. The guard
only ever keeps more prompts than the threshold alone ("a red car and a blue bench" / "a blue bench and a red car"
are both kept).

Every drop is counted in the PromptReport with its score and threshold. With both filters off nothing is loaded.
"""

from __future__ import annotations

import re
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


COUNTS = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "single": "1", "pair": "2", "couple": "2",
    "dozen": "12",
}  # fmt: skip
COLOUR_WORDS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "silver",
    "gold", "beige", "cyan", "magenta", "violet", "turquoise", "teal", "navy",
)  # fmt: skip
POSITION_WORDS = {
    "left": "left", "right": "right", "above": "above", "over": "above", "atop": "above", "top": "above",
    "below": "below", "under": "below", "underneath": "below", "beneath": "below", "bottom": "below",
    "behind": "behind", "front": "front", "inside": "in", "outside": "out",
}  # fmt: skip
_WORD = re.compile(r"[a-z0-9]+")


def composition(text: str) -> tuple[str, ...]:
    """The count, colour and position words of a prompt, in order, synonyms folded ('a red cup over two bowls' ->
    ('red', 'above', '2')). Two prompts with different compositions are never near-duplicates."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word.isdigit():
            out.append(str(int(word)))
        elif word in COUNTS:
            out.append(COUNTS[word])
        elif word in COLOUR_WORDS:
            out.append(word)
        elif word == "grey":
            out.append("gray")
        elif word in POSITION_WORDS:
            out.append(POSITION_WORDS[word])
    return tuple(out)


def same_composition(texts: list[str], pairs: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """The pairs (arrays i, j, cosine) that may be near-duplicates by the composition guard: both texts have the
    same composition(), and they are not the same words in another order ('a kite to the right of a bird' / 'a bird
    to the right of a kite': a swap, not a paraphrase)."""
    import numpy as np

    comp: dict[tuple[str, ...], int] = {}
    bags: dict[tuple[str, ...], int] = {}
    seqs: dict[tuple[str, ...], int] = {}
    c_id, b_id, s_id = [], [], []
    for t in texts:
        words = tuple(_WORD.findall(t.lower()))
        c_id.append(comp.setdefault(composition(t), len(comp)))
        b_id.append(bags.setdefault(tuple(sorted(words)), len(bags)))
        s_id.append(seqs.setdefault(words, len(seqs)))
    c, b, q = (np.array(a, dtype=np.int64) for a in (c_id, b_id, s_id))
    i, j, sim = pairs
    ok = (c[i] == c[j]) & ~((b[i] == b[j]) & (q[i] != q[j]))
    return i[ok], j[ok], sim[ok]


def _needs_embedder(cfg: CurationConfig) -> bool:
    safety = cfg.prompt_safety
    return cfg.prompt_dedup.enabled or (safety.enabled and safety.engine == "embedding")


def curate_prompts(
    prompts: list[Prompt], cfg: CurationConfig, report: PromptReport, embedder: Any = None
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
            from stages.engines.embed import open_embedder

            embedder = open_embedder(cfg.embedder)
        emb = embedder.embed(texts)

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
        if getattr(dedup_cfg, "composition_guard", True):
            pairs = same_composition([texts[k] for k in rest], pairs)
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
