"""No thought cut off: a section that reaches the regex's cap fails its row with the section named.

The regexes let a section body grow to `section_cap(max_section_chars)` characters; at that length the grammar can
only close the section, so the text stops mid-sentence. `capped_section` finds such a body, the text stages fail
the row with `section '<name>' reached its <N>-character cap`, and the unit markers, the manifest and the report
count these rows per stage. Checked on hand-written texts, then with the session's real vLLM engine on the tiny
VLM (trained to write one short sentence per section, so a small cap is hit and a larger one is not).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from fixtures_text import TEST_SECTION_CHARS, TEST_SMALL_SECTION_CHARS
from test_build import TINY

from pipeline.build import build
from pipeline.graph import make_rows, rows_to_batch
from pipeline.report import collect
from pipeline.synthetic import draw
from schemas.config import BuildConfig, PromptSourceConfig, TextModelConfig
from schemas.reflection import (
    HEADINGS,
    REFLECTION_SECTIONS,
    THINK_CLOSE,
    THINK_OPEN,
    cap_reason,
    capped_section,
    is_cap_reason,
    parse_reflection,
    reflection_regex,
    section_cap,
    strip_think,
    think_regex,
)
from schemas.work import FAILED, OK
from stages.assemble import AssembleStage
from stages.draw import DrawStage
from stages.engines.safety import open_image_safety
from stages.prompts import load_sources
from stages.reflect import ReflectStage, reflect_instruction, reflect_instruction_hindsight
from stages.safety import SafetyStage
from stages.score import ScoreStage
from stages.think import ThinkStage, think_instruction, think_instruction_hindsight

# ---------------------------------------------------------------------------------------------------------------
# Detection on hand-written texts


def _think(body: str) -> str:
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}"


def _reflection(opening: str, improvements: str, guidance: str, final: str) -> str:
    parts = (THINK_OPEN, opening, HEADINGS[0], improvements, HEADINGS[1], guidance, HEADINGS[2], final, THINK_CLOSE)
    return "\n".join(parts)


def test_cap_is_the_longest_body_the_regex_allows() -> None:
    for m in (16, 60, 600):
        cap = section_cap(m)
        assert cap == m + 1
        assert re.fullmatch(think_regex(m), _think("a" * cap))
        assert not re.fullmatch(think_regex(m), _think("a" * (cap + 1)))
        ok = "b" * 5
        assert re.fullmatch(reflection_regex(m), _reflection(ok, ok, "c" * cap, ok))
        assert not re.fullmatch(reflection_regex(m), _reflection(ok, ok, "c" * (cap + 1), ok))


def test_capped_think_body_is_named() -> None:
    m = 16  # cap 17
    assert capped_section(_think("A red cube, soft."), m, template="think") == "think"  # 17 characters: at the cap
    assert capped_section(_think("A red cube, soft"), m, template="think") is None  # 16: ended by the model
    assert capped_section(_think("A red cube, soft light."), m, template="think") == "think"  # longer (no regex)
    # Whitespace the model wrote inside the body counts: "A red cube, soft" + newline is 17 characters.
    text = _think("A red cube, soft\n")
    assert re.fullmatch(think_regex(m), text)
    assert capped_section(text, m, template="think") == "think"
    assert capped_section(_think("ok"), m, template="think") is None


def test_capped_reflection_section_is_the_first_at_its_cap() -> None:
    m = 20  # cap 21
    short, full = "Short enough.", "x" * 21
    assert capped_section(_reflection(short, short, short, short), m) is None
    for i, name in enumerate(REFLECTION_SECTIONS):
        parts = [short] * 4
        parts[i] = full
        text = _reflection(*parts)
        assert re.fullmatch(reflection_regex(m), text)
        assert capped_section(text, m) == name
        assert capped_section(text, m + 1) is None  # one more character allowed: no longer at the cap
    # Several sections at the cap: the first one in template order is named.
    assert capped_section(_reflection(short, full, short, full), m) == "improvements"
    assert capped_section(_reflection(full, full, full, full), m) == "opening"
    # The reflection template's names are never confused with T1's.
    assert capped_section(_reflection(full, short, short, short), m, template="think") == "think"
    with pytest.raises(ValueError, match="unknown template"):
        capped_section("", m, template="t3")


def test_text_that_breaks_the_template_is_left_to_the_parser() -> None:
    assert capped_section("no tags at all " * 10, 16, template="think") is None
    assert capped_section(f"{THINK_OPEN}\n{'y' * 40}", 16, template="think") is None  # never closed
    # A missing heading: the sections before it are still measured, the rest is not.
    text = f"{THINK_OPEN}\nShort.\n{HEADINGS[0]}\n{'z' * 30}"
    assert capped_section(text, 16) is None
    assert capped_section(f"{THINK_OPEN}\n{'z' * 30}\n{HEADINGS[0]}\nok", 16) == "opening"


def test_cap_reason_wording() -> None:
    assert cap_reason("guidance", 600) == "section 'guidance' reached its 601-character cap"
    assert cap_reason("think", 16) == "section 'think' reached its 17-character cap"
    assert is_cap_reason(cap_reason("final_prompt", 60))
    for other in (None, "", "injected fault (fault_rate=0.5)", "T2 breaks the template (opening): ...",
                  "section 'think' reached its 17-character cap; and more"):  # fmt: skip
        assert not is_cap_reason(other)


def test_instructions_state_the_budget() -> None:
    t1 = _think("A red cube on a table.")
    for text in (think_instruction("a red cube", 77), think_instruction_hindsight("a red cube", 77)):
        assert "at most 77 characters" in text
    for text in (reflect_instruction("a red cube", t1, 77), reflect_instruction_hindsight("a red cube", 77)):
        assert "each of the four parts to at most 77 characters" in text


# ---------------------------------------------------------------------------------------------------------------
# The stages on the session's real vLLM engine (tiny VLM)

N = 8


def _batch(config: BuildConfig) -> dict:
    prompts, _ = load_sources([PromptSourceConfig(kind="generator", generator_count=N, generator_seed=21)])
    batch = rows_to_batch(make_rows(config, prompts))
    batch["i1"] = [draw(["red", "blue"][i % 2], "circle", 1 + i % 3, 64, i) for i in range(N)]
    return batch


def _small(cfg: TextModelConfig) -> TextModelConfig:
    return cfg.model_copy(update={"max_section_chars": TEST_SMALL_SECTION_CHARS})


def _expected(texts: list[str], m: int, template: str) -> list[tuple[str, str | None]]:
    """(status, reason) per row as the cap rule gives them, computed from the raw generations."""
    out = []
    for text in texts:
        name = capped_section(text, m, template=template)
        out.append((OK, None) if name is None else (FAILED, cap_reason(name, m)))
    return out


def test_text_stages_fail_capped_rows_and_keep_the_rest(vlm_engine, tiny_vlm_config) -> None:
    config = BuildConfig.model_validate(yaml.safe_load(TINY.read_text()))
    large, small = tiny_vlm_config, _small(tiny_vlm_config)
    cap_small, cap_large = section_cap(TEST_SMALL_SECTION_CHARS), section_cap(TEST_SECTION_CHARS)

    # T1 with the small cap: the tiny model's plans are longer than 17 characters, so rows hit it.
    think = ThinkStage(small, engine=vlm_engine)
    batch = _batch(config)
    raw = vlm_engine.generate(think.requests(batch, list(range(N))))  # the same seeded requests the stage sends
    batch = think(batch)
    expected = _expected(raw, TEST_SMALL_SECTION_CHARS, "think")
    assert list(zip(batch["status"], batch["error"], strict=True)) == expected
    capped = [i for i in range(N) if batch["status"][i] == FAILED]
    assert len(capped) >= N // 2, raw  # the cap is really reached, not an accident of one row
    for i in capped:
        assert batch["error"][i] == f"section 'think' reached its {cap_small}-character cap"
        assert batch["stage"][i] == "think" and batch["t1"][i] is None  # nothing of the cut text is kept
        assert len(strip_think(raw[i])) >= cap_small - 1  # the body really ran to the cap (strip drops a newline)

    # T1 with the larger cap: every row closes its plan by itself, well before the cap.
    think = ThinkStage(large, engine=vlm_engine)
    batch = _batch(config)
    raw = vlm_engine.generate(think.requests(batch, list(range(N))))
    batch = think(batch)
    assert batch["status"] == [OK] * N, (batch["error"], raw)
    for t1 in batch["t1"]:
        assert capped_section(t1, TEST_SECTION_CHARS, template="think") is None
        assert 0 < len(strip_think(t1)) < cap_large

    # T2 (forward: sees I1 and the kept T1) with the small cap: rows fail naming the first capped section.
    reflect = ReflectStage(small, engine=vlm_engine)
    small_batch = {k: list(v) for k, v in batch.items()}
    raw = vlm_engine.generate(reflect.requests(small_batch, list(range(N))))
    small_batch = reflect(small_batch)
    expected = _expected(raw, TEST_SMALL_SECTION_CHARS, "reflection")
    assert list(zip(small_batch["status"], small_batch["error"], strict=True)) == expected
    failed = [small_batch["error"][i] for i in range(N) if small_batch["status"][i] == FAILED]
    assert len(failed) >= N // 2, raw
    names = {re.fullmatch(rf"section '(\w+)' reached its {cap_small}-character cap", e).group(1) for e in failed}
    assert names <= set(REFLECTION_SECTIONS)

    # T2 with the larger cap: kept, and no kept section is at its cap.
    reflect = ReflectStage(large, engine=vlm_engine)
    raw = vlm_engine.generate(reflect.requests(batch, list(range(N))))
    batch = reflect(batch)
    assert batch["status"] == [OK] * N, (batch["error"], raw)
    for t2, final in zip(batch["t2"], batch["final_prompt"], strict=True):
        assert capped_section(t2, TEST_SECTION_CHARS) is None
        r = parse_reflection(t2)
        assert all(0 < len(part) < cap_large for part in (r.opening, r.improvements, r.guidance, r.final_prompt))
        assert r.final_prompt == final


def test_hindsight_stages_fail_capped_rows(vlm_engine, tiny_vlm_config) -> None:
    """Hindsight: T1 looks at I2, T2 at I1 and I2; the cap rule is the same."""
    config = BuildConfig.model_validate(yaml.safe_load(TINY.read_text()) | {"strategy": "hindsight"})
    small = _small(tiny_vlm_config)
    batch = _batch(config)
    batch["i2"] = [draw("green", "square", 1 + i % 4, 64, 10 + i) for i in range(N)]
    think = ThinkStage(small, "hindsight", engine=vlm_engine)
    raw_t1 = vlm_engine.generate(think.requests(batch, list(range(N))))
    reflect = ReflectStage(small, "hindsight", engine=vlm_engine)
    raw_t2 = vlm_engine.generate(reflect.requests(batch, list(range(N))))
    t1 = think({k: list(v) for k, v in batch.items()})
    t2 = reflect({k: list(v) for k, v in batch.items()})
    assert list(zip(t1["status"], t1["error"], strict=True)) == _expected(raw_t1, TEST_SMALL_SECTION_CHARS, "think")
    assert list(zip(t2["status"], t2["error"], strict=True)) == _expected(
        raw_t2, TEST_SMALL_SECTION_CHARS, "reflection"
    )
    assert t1["status"].count(FAILED) >= N // 2 and t2["status"].count(FAILED) >= N // 2


# ---------------------------------------------------------------------------------------------------------------
# Counted in the unit markers, the manifest and the report; retried (same seed, same outcome) on a rerun


MID = 40


def test_capped_rows_are_counted_in_markers_manifest_and_report(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 6, "generator_seed": 4}
    data["unit_size"] = 3
    data["think"]["model"]["max_section_chars"] = TEST_SECTION_CHARS
    # A cap inside the range of the tiny model's sentence lengths: some reflections reach it, some do not.
    data["reflect"]["model"]["max_section_chars"] = MID  # part of the generation hash
    cfg = BuildConfig.model_validate(data)

    def stages() -> list:
        return [
            ThinkStage(tiny_vlm_config, engine=vlm_engine),
            DrawStage(cfg.draw_initial.model, "initial", engine=image_engine),
            ReflectStage(tiny_vlm_config.model_copy(update={"max_section_chars": MID}), engine=vlm_engine),
            DrawStage(cfg.draw_refined.model, "refined", engine=image_engine),
            SafetyStage(cfg.safety.model, engine=open_image_safety(cfg.safety.model)),
            ScoreStage(cfg.score.model, engine=clip_scorer),
            AssembleStage(),
        ]

    out = tmp_path / "out"
    result = build(cfg, out, executor="local", stages=stages())
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    capped = [r for r in rejects if is_cap_reason(r["reason"])]
    assert 0 < len(capped) < 6, rejects  # a mixture: both outcomes are counted
    assert len(capped) == len(rejects)  # nothing else failed or was filtered
    assert all(r["stage"] == "reflect" and r["status"] == FAILED for r in capped)
    assert all(r["reason"].endswith(f"reached its {section_cap(MID)}-character cap") for r in capped)

    markers = [json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("*.json"))]
    assert sum(m["capped_at"].get("reflect", 0) for m in markers) == len(capped)
    assert all(set(m["capped_at"]) <= {"reflect"} for m in markers)

    counts = result.stage_counts
    assert counts["reflect"]["capped"] == counts["reflect"]["failed"] == len(capped)
    assert counts["think"]["capped"] == counts["think"]["failed"] == 0
    assert all(c["in"] == c["ok"] + c["filtered"] + c["failed"] for c in counts.values())
    assert counts["assemble"]["ok"] == 6 - len(capped)
    manifest = json.loads((out / "manifest.json").read_text())
    by_stage = {c["stage"]: c for c in manifest["build"]["stages"]}
    assert by_stage["reflect"]["capped"] == len(capped) and by_stage["think"]["capped"] == 0

    kept = pq.read_table(out / "trajectories").to_pylist()
    assert len(kept) == 6 - len(capped) and {t["id"] for t in kept}.isdisjoint(r["id"] for r in capped)
    assert all(capped_section(t["t2"], MID) is None for t in kept)  # nothing cut off became training data

    assert collect(out)["stages"]["reflect"]["capped"] == len(capped)
    page = (out / "report.html").read_text()
    row = re.search(r"<tr><td>reflect</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(\d+)</td>", row) == ["6", str(6 - len(capped)), "0", str(len(capped)), str(len(capped))]
    assert "of which capped" in page

    # Rerun: failed rows are retried with the same seeds, so the same rows reach the same caps again.
    again = build(cfg, out, executor="local", stages=stages())
    assert again.stage_counts == counts
    rejects_again = [
        json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()
    ]
    assert [(r["id"], r["reason"]) for r in rejects_again] == [(r["id"], r["reason"]) for r in rejects]
