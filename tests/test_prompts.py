"""Prompt sources: every kind, normalisation, dedup, and hostile lines reported as file:line with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.config import PromptSourceConfig
from stages.prompts import PromptSourceError, effective_sources, generate_prompts, load_prompts, load_sources, normalize

GENEVAL = Path(__file__).resolve().parent / "data" / "geneval_metadata.jsonl"  # the GenEval prompt set, 553 lines


def test_txt_with_empty_lines_and_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n   \na red cube\n  a   red\tcube  \na blue ball\n", encoding="utf-8")
    prompts, report = load_prompts(PromptSourceConfig(kind="auto", path=str(f)))
    assert [p.text for p in prompts] == ["a red cube", "a blue ball"]
    assert [p.where for p in prompts] == ["p.txt:1", "p.txt:6"]
    assert {p.source for p in prompts} == {"txt:p.txt"}
    assert report.read == 6 and report.kept == 2
    assert report.dropped == {"empty": 2, "duplicate": 2}
    assert "p.txt:4: duplicate of an earlier prompt" in report.problems


def test_jsonl_hostile_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "a cat"}).encode(),
        b"{not json",
        json.dumps({"caption": "no prompt field"}).encode(),
        b"\xff\xfe bad utf8",
        json.dumps({"prompt": "   "}).encode(),
        json.dumps({"prompt": "\u05d7\u05ea\u05d5\u05dc \U0001f431 on a mat\u0007"}, ensure_ascii=False).encode(),
        json.dumps({"prompt": "x" * 20000}).encode(),
        json.dumps({"prompt": 42}).encode(),
        json.dumps({"prompt": "a cat"}).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    prompts, report = load_prompts(PromptSourceConfig(kind="jsonl", path=str(f)))
    assert [p.text for p in prompts] == ["a cat", "\u05d7\u05ea\u05d5\u05dc \U0001f431 on a mat"]
    assert report.read == 9 and report.kept == 2
    assert report.dropped == {
        "malformed_json": 1, "missing_field": 1, "invalid_utf8": 1, "empty": 1, "too_long": 1, "not_a_string": 1,
        "duplicate": 1,
    }  # fmt: skip
    assert sum(report.dropped.values()) + report.kept == report.read
    for line in (2, 3, 4, 7):
        assert any(p.startswith(f"p.jsonl:{line}: ") for p in report.problems), line


def test_geneval_jsonl_and_limit() -> None:
    prompts, report = load_prompts(PromptSourceConfig(kind="auto", path=str(GENEVAL)), limit=10)
    assert len(prompts) == 10 and prompts[0].text == "a photo of a bench"
    assert report.dropped["over_limit"] + report.dropped.get("duplicate", 0) + 10 == report.read


def test_json_list_parquet_and_generator(tmp_path: Path) -> None:
    j = tmp_path / "p.json"
    j.write_text(json.dumps(["one", {"prompt": "two"}, {"x": 1}, "one"]))
    prompts, report = load_prompts(PromptSourceConfig(kind="auto", path=str(j)))
    assert [p.text for p in prompts] == ["one", "two"] and report.dropped == {"missing_field": 1, "duplicate": 1}
    pf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["x y", None, "z"]}), pf)
    prompts, report = load_prompts(PromptSourceConfig(kind="auto", path=str(pf), field="caption"))
    assert [p.text for p in prompts] == ["x y", "z"] and report.dropped == {"not_a_string": 1}
    with pytest.raises(PromptSourceError, match="no column 'prompt'"):
        load_prompts(PromptSourceConfig(kind="parquet", path=str(pf)))
    gen = generate_prompts(8, seed=3)
    assert gen == generate_prompts(8, seed=3) and len(set(gen)) == 8
    prompts, _ = load_prompts(PromptSourceConfig(kind="generator", generator_count=8, generator_seed=3))
    assert [p.text for p in prompts] == gen


def test_hf_dataset_source(tmp_path: Path) -> None:
    # a local Hub-style dataset folder (Parquet), loaded by name through datasets.load_dataset
    (tmp_path / "hfds").mkdir()
    pq.write_table(pa.table({"text": ["a dog", "a dog", "a frog"]}), tmp_path / "hfds" / "train.parquet")
    prompts, report = load_prompts(PromptSourceConfig(kind="hf", path=str(tmp_path / "hfds"), field="text"))
    assert [p.text for p in prompts] == ["a dog", "a frog"] and report.dropped == {"duplicate": 1}
    assert prompts[0].source.startswith("hf:")
    with pytest.raises(PromptSourceError, match="prompts.field='prompt'"):
        load_prompts(PromptSourceConfig(kind="hf", path=str(tmp_path / "hfds")))


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match="prompt file not found"):
        load_prompts(PromptSourceConfig(kind="auto", path=str(tmp_path / "nope.txt")))
    (tmp_path / "p.csv").write_text("a")
    with pytest.raises(PromptSourceError, match="cannot tell the prompt file kind"):
        load_prompts(PromptSourceConfig(kind="auto", path=str(tmp_path / "p.csv")))


def test_normalize() -> None:
    assert normalize("  e\u0301te\u0301\u200b \n\t x ") == "\u00e9t\u00e9 x"


def test_prompts_option_replaces_the_sources_for_build_and_plan(tmp_path: Path) -> None:
    """`--prompts FILE` means the same to `irgl build` (load_sources) and `irgl plan` (the count): one file of the
    kind its extension says, read with the first configured source's field, in place of every configured source."""
    from pipeline.plan.estimate import make_plan
    from schemas.config import load_build_config

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t, "prompt": "ignored"}) + "\n" for t in ("a cat", "a dog", "a cat")))
    configured = [PromptSourceConfig(kind="generator", generator_count=50, field="text"), PromptSourceConfig()]
    assert effective_sources(configured) == configured
    assert effective_sources(configured, str(f)) == [PromptSourceConfig(kind="auto", path=str(f), field="text")]
    prompts, report = load_sources(configured, str(f))
    assert [p.text for p in prompts] == ["a cat", "a dog"] and report.read == 3

    cfg = load_build_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    cfg = cfg.model_copy(update={"prompts": [cfg.prompts[0].model_copy(update={"field": "text"})]})
    assert make_plan(cfg, prompts_path=str(f)).trajectories == 2
