"""Curation inside `irgl build` (tiny preset, real models: all-MiniLM-L6-v2, Open-NSFW, tiny VLM judge, tiny CLIP):
prompt filters before any stage, the image safety stage, the VLM judge, the I2 near-duplicate pass, and their counts
in the build result, the manifest, the card and `state/curation/`. Expected values are computed here from the stored
scores and embeddings with the documented rules, not taken from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from test_build import TINY, graph_stages

from pipeline.build import build
from pipeline.verify import verify
from schemas import MODES
from schemas.config import BuildConfig
from schemas.judge import judge_verdict, parse_judgement

#: Prompts with planted near-duplicates (paraphrases: the later one must go), compositional variants that must all
#: stay (counts, positions, a swap) and one unsafe prompt.
PROMPTS = [
    "a photo of two red apples on a wooden table",
    "a photo of three sinks",
    "a photograph of two red apples on a wooden table",  # paraphrase of line 1
    "a photo of four sinks",  # count differs from line 2: kept
    "a photo of a cat to the left of a dog",
    "a photo of a dog to the left of a cat",  # a swap of line 5: kept
    "graphic gore of a mutilated body",  # unsafe
    "a blue bicycle leaning against a brick wall",
    "a blue bike leaning against a brick wall",  # paraphrase of line 8
    "a bowl of green soup next to a yellow lamp",
]
DROPPED = {"prompts.txt:3": "near_duplicate", "prompts.txt:7": "unsafe_prompt", "prompts.txt:9": "near_duplicate"}


def _config(tmp_path: Path, image_threshold: float) -> BuildConfig:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "txt", "path": str(tmp_path / "prompts.txt")}
    data["unit_size"] = 3
    data["curation"]["image_dedup"] = {"threshold": image_threshold}
    data["curation"]["prompt_safety"] = {"threshold": 0.5}
    data["judge"] = {
        "model": {"model": "tiny:vlm", "rule": "i2_satisfies", "max_reason_chars": 48, "enforce_eager": True,
                  "dtype": "float32", "max_model_len": 4096},
        "resources": {"num_cpus": 0.25, "batch_size": 8},
    }  # fmt: skip
    return BuildConfig.model_validate(data)


def _stages(cfg: BuildConfig, tiny_vlm_config, vlm_engine, image_engine, clip_scorer) -> list:
    stages = graph_stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    for stage in stages:
        if stage.name == "judge":
            stage.engine = vlm_engine  # the session engine; the stage keeps its JudgeModelConfig (rule, regex)
    return stages


def _greedy(ids: list[str], emb: np.ndarray, threshold: float) -> dict[str, str]:
    """The documented keep rule, by brute force: in order, drop a row near (>= threshold) an earlier KEPT row."""
    kept: list[int] = []
    removed = {}
    for j in range(len(ids)):
        near = [i for i in kept if float(emb[i] @ emb[j]) >= threshold]
        if near:
            removed[ids[j]] = ids[near[0]]
        else:
            kept.append(j)
    return removed


def _shard_ids(out: Path) -> list[str]:
    return pq.read_table(out / "data" / "improving_full_learning", columns=["trajectory_id"]).column(0).to_pylist()


@pytest.fixture(scope="module")
def built(tmp_path_factory, vlm_engine, image_engine, clip_scorer, tiny_vlm_config) -> tuple[Path, object, object]:
    tmp = tmp_path_factory.mktemp("curation")
    cfg = _config(tmp, 0.9995)
    stages = _stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    out = tmp / "out"
    result = build(cfg, out, executor="local", stages=stages)
    return out, result, (tmp, stages)


def test_prompt_filters_drop_paraphrases_and_the_unsafe_prompt_before_any_stage(built) -> None:
    out, result, _ = built
    report = result.prompts
    assert report.read == len(PROMPTS) and report.kept == len(PROMPTS) - len(DROPPED)
    assert report.dropped == {"near_duplicate": 2, "unsafe_prompt": 1}
    lines = {p.split(": ", 1)[0]: p for p in report.problems}
    assert set(lines) == set(DROPPED)
    assert "near-duplicate of prompts.txt:1 (cosine" in lines["prompts.txt:3"]
    assert "near-duplicate of prompts.txt:8 (cosine" in lines["prompts.txt:9"]
    assert "unsafe prompt: score" in lines["prompts.txt:7"]
    # No stage saw a dropped prompt; every other prompt (the compositional variants too) went through.
    first = result.stage_counts["think"]["in"]
    assert first == len(PROMPTS) - len(DROPPED)
    seen = {
        json.loads(line)["prompt"] for p in (out / "rejects").glob("*.jsonl") for line in p.read_text().splitlines()
    }
    seen |= set(pq.read_table(out / "trajectories", columns=["prompt"]).column(0).to_pylist())
    assert seen == {p for k, p in enumerate(PROMPTS, start=1) if f"prompts.txt:{k}" not in DROPPED}
    # The decisions are kept for a rerun, each with its score and (near-duplicates) the prompt it duplicates.
    doc = json.loads((out / "state" / "curation" / "prompts.json").read_text())
    assert {d["where"]: d["reason"] for d in doc["dropped"]} == DROPPED
    assert {d["where"]: d["duplicate_of"] for d in doc["dropped"] if d["reason"] == "near_duplicate"} == {
        "prompts.txt:3": "prompts.txt:1", "prompts.txt:9": "prompts.txt:8"
    }  # fmt: skip


def test_safety_scores_and_judge_verdicts_are_stored_and_applied(built) -> None:
    out, result, _ = built
    counts = result.stage_counts
    assert list(counts) == ["think", "draw_initial", "reflect", "draw_refined", "safety", "score", "judge", "assemble"]
    kept = pq.read_table(out / "trajectories").to_pylist()
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    for t in kept:
        scores = json.loads(t["scores"])
        assert 0.0 <= scores["safety_i1"] < 0.8 and 0.0 <= scores["safety_i2"] < 0.8  # below the preset's threshold
        answer = parse_judgement(json.dumps(json.loads(t["judge"])))
        assert judge_verdict(answer, "i2_satisfies")[0] and answer.i2_satisfies
        assert "; judge: " in t["verdict_reason"]
    judged_out = [r for r in rejects if r["stage"] == "judge"]
    assert len(judged_out) == counts["judge"]["filtered"]
    for r in judged_out:
        assert r["status"] == "filtered" and not parse_judgement(json.dumps(r["judge"])).i2_satisfies
    assert counts["judge"]["in"] == counts["score"]["ok"]  # the judge sees what CLIP kept
    facts = result.curation
    assert facts["image_safety"]["checked"] == counts["safety"]["in"] and facts["image_safety"]["removed"] == 0
    assert facts["judge"] == {
        "enabled": True, "model": "tiny:vlm", "rule": "i2_satisfies", "checked": counts["judge"]["in"],
        "removed": counts["judge"]["filtered"], "license": "see the model's card",
    }  # fmt: skip


def test_image_near_duplicates_leave_the_shards_and_a_rerun_rewrites_only_what_changed(
    built, tiny_vlm_config, vlm_engine, image_engine, clip_scorer
) -> None:
    out, first, (tmp, stages) = built
    table = pq.read_table(out / "trajectories", columns=["id", "i2", "i2_embedding"]).to_pylist()
    ids = [t["id"] for t in table]
    emb = np.stack([np.frombuffer(t["i2_embedding"], dtype="<f4") for t in table])
    # The stored embedding is the scorer's own embedding of I2.
    direct, errors = clip_scorer.embed_images([("I2", table[0]["i2"])])
    assert errors == [None] and np.allclose(direct.cpu().numpy()[0], emb[0], atol=1e-6)
    assert len(_shard_ids(out)) == len(ids) - len(_greedy(ids, emb, 0.9995))

    # A threshold that makes some I2s near-duplicates of earlier ones: between the pairwise similarities.
    sims = sorted(float(emb[i] @ emb[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))
    threshold = round(sims[len(sims) // 2], 6)
    expected = _greedy(ids, emb, threshold)
    assert 0 < len(expected) < len(ids)
    markers = {p.name: json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("*.json"))}
    # The rerun takes the prompt filters' decisions from state/curation/prompts.json instead of embedding again:
    # a mark put into a stored reason comes back in the rerun's report.
    decisions = out / "state" / "curation" / "prompts.json"
    doc = json.loads(decisions.read_text())
    doc["dropped"][0]["detail"] += " [stored]"
    decisions.write_text(json.dumps(doc))
    again = build(_config(tmp, threshold), out, executor="local", stages=stages)
    assert again.units_run == 0  # no stage ran: the same trajectories, other shards
    assert again.prompts.dropped == first.prompts.dropped
    assert [p.endswith(" [stored]") for p in again.prompts.problems] == [True] + [False] * (len(DROPPED) - 1)
    doc = json.loads((out / "state" / "curation" / "images.json").read_text())
    assert {k: v[0] for k, v in doc["removed"].items()} == expected and doc["checked"] == len(ids)
    assert _shard_ids(out) == [i for i in ids if i not in expected]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trajectories"] == len(ids) - len(expected)
    assert manifest["counts"] == {m.name: len(ids) - len(expected) for m in MODES}
    assert (
        manifest["build"]["curation"]["image_dedup"]["removed"]
        == len(expected)
        == again.curation["image_dedup"]["removed"]
    )
    assert verify(out) == []
    # Only the units holding a removed trajectory got new shards; the others' files are untouched.
    for name, before in markers.items():
        after = json.loads((out / "state" / "units" / name).read_text())
        holds = any(i in expected for i in before["ids"])
        assert (after["shards"]["mtimes"] != before["shards"]["mtimes"]) == holds, name
        assert after["shards"]["excluded"] == sorted(i for i in before["ids"] if i in expected)
    # The card's Curation section states every filter with its model, license, threshold and counts.
    card = (out / "README.md").read_text()
    section = card.split("## Curation", 1)[1]
    row = (
        "| near-duplicate I2 images (cosine of CLIP embeddings) | `tiny:clip/tiny:clip (the scorer's I2 embeddings)` "
        f"| as the scorer's | {threshold} | {len(ids)} | {len(expected)} |"
    )
    assert row in section
    assert "| image safety (I1 and I2) | `bundled:open-nsfw` | BSD-2-Clause" in section
    assert (
        "| near-duplicate prompts (cosine of sentence embeddings) | `bundled:all-MiniLM-L6-v2` | Apache-2.0" in section
    )
    assert "| 0.95 | 9 | 2 |" in section  # 10 prompts, 1 unsafe: 9 reach the near-duplicate search
    assert "| 0.5 | 10 | 1 |" in section and "| prompt safety (before generation) |" in section


def test_unsafe_images_are_filtered_at_the_safety_stage_and_counted(
    tmp_path: Path, tiny_vlm_config, vlm_engine, image_engine, clip_scorer
) -> None:
    """Threshold 0: every image is at or above it, so every trajectory is filtered at the safety stage with its
    scores in the reason; the counts reach the build result, the manifest and the card."""
    cfg = _config(tmp_path, 0.9995)
    strict = cfg.model_copy(update={"safety": cfg.safety.model_copy(update={"model": cfg.safety.model.model_copy(
        update={"threshold": 0.0})})})  # fmt: skip
    out = tmp_path / "strict"
    result = build(strict, out, executor="local", stages=_stages(strict, tiny_vlm_config, vlm_engine, image_engine,
                                                                 clip_scorer))  # fmt: skip
    n = result.prompts.kept
    assert result.stage_counts["safety"] == {"in": n, "ok": 0, "filtered": n, "failed": 0, "capped": 0}
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert len(rejects) == n
    for r in rejects:
        s1, s2 = r["scores"]["safety_i1"], r["scores"]["safety_i2"]
        assert (r["stage"], r["status"]) == ("safety", "filtered")
        assert r["reason"] == (
            f"unsafe image: I1 P(unsafe)={s1:.4f}, I2 P(unsafe)={s2:.4f} >= safety threshold 0.0 (open_nsfw)"
        )
    facts = json.loads((out / "manifest.json").read_text())["build"]["curation"]["image_safety"]
    assert (facts["checked"], facts["removed"]) == (n, n) == (result.curation["image_safety"]["removed"], n)
    assert "| image safety (I1 and I2) | `bundled:open-nsfw` | BSD-2-Clause" in (out / "README.md").read_text()
    assert f"| 0.0 | {n} | {n} |" in (out / "README.md").read_text()
