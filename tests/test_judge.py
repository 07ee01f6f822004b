"""The VLM judge: its answer's regex and parser agree, the keep rule follows its documented table, and the stage
on the real tiny VLM (the session's vLLM engine; the transformers fallback) stores every answer and filters by the
rule, failing only the rows it cannot judge.

The tiny VLM's answers are meaningless; what is checked is that structured outputs always give a judgement, that
the stored judgement is the one the rule was applied to, and that each row's outcome is what the documented rule
gives for it (recomputed here from the stored answer, never read from the stage).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re

import pytest

from pipeline.synthetic import draw
from schemas.config import JudgeModelConfig, TextModelConfig
from schemas.judge import (
    Judgement,
    JudgementError,
    judge_instruction,
    judge_regex,
    judge_regex_max_chars,
    judge_verdict,
    parse_judgement,
)
from schemas.work import FAILED, FILTERED, OK, new_row
from stages.judge import JudgeStage

REASON_CHARS = 48

# ---------------------------------------------------------------------------------------------------------------
# The documented table (schemas/judge.py `judge_verdict`, config `JudgeModelConfig.rule`), written out here:
# keep the trajectory when ...
KEEP = {
    "i2_satisfies": lambda i1, i2, better: i2,
    "i2_not_worse": lambda i1, i2, better: i2 and better != "1",
    "i2_better": lambda i1, i2, better: i2 and better == "2",
}
ANSWERS = list(itertools.product((True, False), (True, False), ("1", "2", "same")))


def _text(i1: bool, i2: bool, better: str, reason: str) -> str:
    """An answer written by hand in the layout the instruction shows (not with the code under test)."""
    t = {True: "true", False: "false"}
    return f'{{"i1_satisfies": {t[i1]}, "i2_satisfies": {t[i2]}, "better": "{better}", "reason": "{reason}"}}'


REASONS = [
    "x",
    "Image 2 shows two red cats; Image 1 shows three.",
    "Zwei Kätzchen — Bild 2 passt {besser} [ja].",
    "It's 'same': both miss the cube/ball, 50% each!",
    "r" * REASON_CHARS,
]


# ---------------------------------------------------------------------------------------------------------------
# The regex and the parser (no model)


def test_every_answer_matches_the_regex_and_parses_back() -> None:
    regex = re.compile(judge_regex(REASON_CHARS))
    for (i1, i2, better), reason in itertools.product(ANSWERS, REASONS):
        text = _text(i1, i2, better, reason)
        assert regex.fullmatch(text), text
        j = parse_judgement(text)
        assert (j.i1_satisfies, j.i2_satisfies, j.better, j.reason) == (i1, i2, better, reason)
        assert j.to_json() == text  # the stored form is the regex's layout
        assert parse_judgement(j.to_json()) == j


def test_the_longest_match_is_judge_regex_max_chars() -> None:
    regex = re.compile(judge_regex(REASON_CHARS))
    longest = _text(False, False, "same", "r" * REASON_CHARS)
    assert regex.fullmatch(longest)
    assert len(longest) == judge_regex_max_chars(REASON_CHARS)
    assert not regex.fullmatch(_text(False, False, "same", "r" * (REASON_CHARS + 1)))  # the reason's cap


BROKEN = [
    "",
    "yes",
    _text(True, True, "2", "fine")[:-1],  # cut before the closing brace
    _text(True, True, "2", "fine") + " and more",
    _text(True, True, "2", "fine").replace('"fine"', '"fi"ne"'),  # an unescaped quote
    _text(True, True, "2", "fine").replace("true", "True", 1),
    _text(True, True, "2", "fine").replace('"2"', "2"),  # better as a number
    _text(True, True, "2", "fine").replace('"2"', '"3"'),
    _text(True, True, "2", "fine").replace('"fine"', '""'),  # no reason
    _text(True, True, "2", "fine").replace('"fine"', '"   "'),  # only whitespace
    _text(True, True, "2", "fine").replace('"fine"', "null"),
    _text(True, True, "2", "fine").replace('"i2_satisfies"', '"i3_satisfies"'),
    _text(True, True, "2", "fine").replace('"reason": "fine"', '"reason": "fine", "extra": 1'),
    '{"i1_satisfies": true, "i2_satisfies": true, "better": "2"}',
    '[true, true, "2", "fine"]',
    _text(True, True, "2", "line one\nline two"),  # a raw newline inside a JSON string
]


@pytest.mark.parametrize("text", BROKEN)
def test_broken_answers_are_refused_by_regex_and_parser(text: str) -> None:
    assert not re.fullmatch(judge_regex(REASON_CHARS), text)
    with pytest.raises(JudgementError):
        parse_judgement(text)


# Valid JSON in another layout: what a model writes without structured outputs. The parser reads it (documented);
# the regex, which only has to produce parseable text, does not.
OTHER_LAYOUTS = [
    json.dumps({"reason": "fine", "better": "2", "i2_satisfies": True, "i1_satisfies": False}),
    json.dumps({"i1_satisfies": False, "i2_satisfies": True, "better": "2", "reason": "fine"}, indent=2),
    "```json\n" + _text(False, True, "2", "fine") + "\n```",
    _text(False, True, "2", 'fine \\"quoted\\"'),  # escapes: valid JSON, never in the regex's reason
]


@pytest.mark.parametrize("text", OTHER_LAYOUTS)
def test_other_json_layouts_parse_without_the_regex(text: str) -> None:
    j = parse_judgement(text)
    assert (j.i1_satisfies, j.i2_satisfies, j.better) == (False, True, "2")
    assert j.reason.startswith("fine")
    assert not re.fullmatch(judge_regex(REASON_CHARS), text)


def test_what_the_regex_matches_always_parses() -> None:
    """Reasons of random characters (quotes, backslashes, controls, surrogates, non-ASCII): whenever the regex
    matches the answer, the parser reads it with that reason; the regex refuses every answer the parser cannot
    read."""
    rng = random.Random(0)
    pool = [chr(c) for c in (*range(0, 0x80), 0x85, 0xA0, 0xE9, 0x2028, 0x3000, 0xD800, 0xDFFF, 0x1F600)]
    regex = re.compile(judge_regex(16))
    matched = 0
    for _ in range(4000):
        reason = "".join(rng.choice(pool) for _ in range(rng.randint(0, 18)))
        text = _text(rng.random() < 0.5, rng.random() < 0.5, rng.choice(("1", "2", "same")), reason)
        try:
            parsed = parse_judgement(text)
        except JudgementError:
            parsed = None
        if regex.fullmatch(text):
            matched += 1
            assert parsed is not None and parsed.reason == reason, repr(text)
    assert matched > 100  # the property is not vacuous


@pytest.mark.parametrize(
    "text, said",
    [
        ("no json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"i1_satisfies": true}', "missing ['i2_satisfies', 'better', 'reason']"),
        (_text(True, True, "2", "ok").replace("true", '"yes"', 1), "i1_satisfies is 'yes'"),
        (_text(True, True, "2", "ok").replace('"2"', '"both"'), "better is 'both'"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(JudgementError, match=re.escape(said)):
        parse_judgement(text)


# ---------------------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("rule", sorted(KEEP))
def test_verdict_follows_the_documented_table(rule: str) -> None:
    for i1, i2, better in ANSWERS:
        j = Judgement(i1, i2, better, "because.")
        keep, reason = judge_verdict(j, rule)
        assert keep is KEEP[rule](i1, i2, better), (rule, i1, i2, better)
        # The reason names the rule, its outcome and the whole answer.
        assert reason.startswith(f"rule {rule} {'holds' if keep else 'fails'}: "), reason
        answer = f"i1_satisfies={str(i1).lower()}, i2_satisfies={str(i2).lower()}, better={better}"
        assert answer in reason and '"because."' in reason, reason


def test_documented_table_is_the_tested_one() -> None:
    doc = judge_verdict.__doc__ or ""
    for rule, line in (
        ("i2_satisfies", "i2_satisfies"),
        ("i2_not_worse", 'i2_satisfies and better != "1"'),
        ("i2_better", 'i2_satisfies and better == "2"'),
    ):
        assert re.search(rf"^\s+{rule}\s+{re.escape(line)}$", doc, re.M), rule
    assert set(KEEP) == set(JudgeModelConfig.model_fields["rule"].annotation.__args__)


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown judge rule 'i2_best'"):
        judge_verdict(Judgement(True, True, "2", "x"), "i2_best")


def test_instruction_names_the_images_the_prompt_and_the_budget() -> None:
    text = judge_instruction("two red cats left of a blue cube", 77)
    assert '"two red cats left of a blue cube"' in text
    for needle in ("Image 1", "Image 2", "counts", "colours", "positions", '"same"', "at most 77 characters"):
        assert needle in text, needle
    # The layout the instruction shows is the regex's, key for key.
    assert text.index('"i1_satisfies"') < text.index('"i2_satisfies"') < text.index('"better"') < text.index('"reason"')


def test_stage_needs_a_judge_config(tiny_vlm_config: TextModelConfig) -> None:
    with pytest.raises(TypeError, match="JudgeModelConfig"):
        JudgeStage(tiny_vlm_config, engine=object())


# ---------------------------------------------------------------------------------------------------------------
# The stage on the real tiny VLM

N = 10
PROMPTS = [
    "two red circles",
    "three blue squares on a grey background",
    "one red circle left of a blue square",
    "a blue circle",
]


def _batch() -> dict:
    rows = [
        new_row(
            id=f"row{k}",
            prompt=PROMPTS[k % len(PROMPTS)],
            source="test",
            where=f"t:{k}",
            unit=0,
            seed=k,
            strategy="forward",
        )  # fmt: skip
        for k in range(N)
    ]
    batch = {name: [r[name] for r in rows] for name in rows[0]}
    colours = ("red", "blue")
    batch["i1"] = [draw(colours[k % 2], "circle", 1 + k % 3, 64, k) for k in range(N)]
    batch["i2"] = [draw(colours[(k + 1) % 2], "square", 1 + (k + 1) % 3, 64, k) for k in range(N)]
    # As the CLIP verdict leaves the rows it keeps (stages/score.py), the ones the judge sees.
    batch["verdict"] = ["accept"] * N
    batch["verdict_reason"] = [f"clip(I2)=0.{k}, test" for k in range(N)]
    return batch


def _judge_config(base: TextModelConfig, **update) -> JudgeModelConfig:
    return JudgeModelConfig(**{**base.model_dump(), "max_reason_chars": REASON_CHARS, **update})


def _check_judged(batch: dict, rows: list[int], stage: JudgeStage) -> list[bool]:
    """Each row's stored answer parses and its outcome is the documented rule's; returns the keep decisions."""
    rule, keeps = stage.cfg.rule, []
    for i in rows:
        stored = batch["judge"][i]
        assert stored is not None, (i, batch["status"][i], batch["error"][i])
        j = parse_judgement(stored)
        assert re.fullmatch(judge_regex(REASON_CHARS), stored), stored  # structured output: the regex's layout
        keep = KEEP[rule](j.i1_satisfies, j.i2_satisfies, j.better)
        keeps.append(keep)
        assert batch["status"][i] == (OK if keep else FILTERED), (i, rule, stored, batch["error"][i])
        said = json.dumps(j.reason, ensure_ascii=False)
        # The verdict is CLIP's and the judge's together: CLIP's reason, then the judge's naming the rule.
        assert batch["verdict"][i] == ("accept" if keep else "reject"), i
        prefix = f"clip(I2)=0.{i}, test; judge: rule {rule} {'holds' if keep else 'fails'}: "
        assert batch["verdict_reason"][i].startswith(prefix) and batch["verdict_reason"][i].endswith(said), i
        if keep:
            assert batch["error"][i] is None and batch["stage"][i] is None
        else:
            assert batch["stage"][i] == "judge"
            assert batch["error"][i].startswith(f"judge: rule {rule} fails: "), batch["error"][i]
            assert batch["error"][i].endswith(said)
        assert "judge" in json.loads(batch["timings"][i])
        assert json.loads(batch["models"][i])["judge"] == stage.cfg.model
    return keeps


@pytest.mark.slow
def test_structured_judge_stores_every_answer_and_filters_by_rule(vlm_engine, tiny_vlm_config) -> None:
    answers = None
    every_keep: list[bool] = []
    for rule in sorted(KEEP):
        stage = JudgeStage(_judge_config(tiny_vlm_config, rule=rule), engine=vlm_engine)
        batch = stage(_batch())
        every_keep += _check_judged(batch, list(range(N)), stage)
        # Seeded requests: the same answers under every rule, so the rules really differ only in the filter.
        answers = answers or batch["judge"]
        assert batch["judge"] == answers
    assert any(every_keep) and not all(every_keep), answers  # the filter both keeps and rejects here
    # A reason the grammar stopped at its cap is kept: the answer before it was complete (the documented choice).
    capped = [k for k, a in enumerate(answers) if len(parse_judgement(a).reason) == REASON_CHARS]
    assert capped, answers  # the tiny model's reasons do run into the cap, and those rows were judged above


@pytest.mark.slow
def test_unshowable_images_fail_their_row_alone(vlm_engine, tiny_vlm_config) -> None:
    rule = "i2_satisfies"
    stage = JudgeStage(_judge_config(tiny_vlm_config, rule=rule), engine=vlm_engine)
    reference = stage(_batch())
    for run in ("call", "acall"):
        batch = _batch()
        batch["i1"][1] = None  # missing
        batch["i2"][4] = b"these bytes are no image"
        batch["i1"][7] = batch["i1"][7][:80]  # a PNG header with its data cut off: only the engine finds out
        batch = stage(batch) if run == "call" else asyncio.run(stage.acall(batch))
        assert batch["error"][1] == "judge: I1 missing", run
        assert batch["error"][4].startswith("judge: I2 not an image: "), (run, batch["error"][4])
        assert batch["error"][7] and "judge" not in batch["error"][7], (run, batch["error"][7])
        for i in (1, 4, 7):
            assert (batch["status"][i], batch["stage"][i], batch["judge"][i]) == (FAILED, "judge", None), (run, i)
        rest = [i for i in range(N) if i not in (1, 4, 7)]
        _check_judged(batch, rest, stage)
        # The other rows got the answers they get in a clean batch (seeded per row, whatever else is in it).
        assert [batch["judge"][i] for i in rest] == [reference["judge"][i] for i in rest], run


@pytest.mark.slow
def test_free_text_answers_that_do_not_parse_fail_the_row(vlm_engine, tiny_vlm_config) -> None:
    rule = "i2_not_worse"
    stage = JudgeStage(_judge_config(tiny_vlm_config, rule=rule, structured=False), engine=vlm_engine)
    batch = _batch()
    requests = stage.requests(batch, list(range(N)))
    assert all(r.regex is None and len(r.images) == 2 for r in requests)
    raw = vlm_engine.generate(requests)  # the same seeded requests the stage sends
    batch = stage(batch)
    failed = 0
    for i, text in enumerate(raw):
        try:
            j = parse_judgement(text)
        except JudgementError:
            failed += 1
            assert batch["status"][i] == FAILED and batch["judge"][i] is None, (i, text)
            assert batch["error"][i].startswith("judge: answer is not a judgement ("), batch["error"][i]
            assert batch["error"][i].endswith(repr(text.strip()[:120])), (batch["error"][i], text)
        else:
            assert batch["status"][i] == (OK if KEEP[rule](j.i1_satisfies, j.i2_satisfies, j.better) else FILTERED)
    assert failed, raw  # the tiny model does not write the JSON on its own


@pytest.mark.slow
def test_transformers_fallback_in_a_plain_loop(tiny_vlm_path) -> None:
    """The fallback engine, built by the stage's own setup(): answers are free text (no regex there); each row is
    judged by the rule when its text parses and fails naming the text otherwise."""
    rule = "i2_better"
    cfg = JudgeModelConfig(engine="transformers", model=str(tiny_vlm_path), max_tokens=24, dtype="float32",
                           max_reason_chars=REASON_CHARS, rule=rule)  # fmt: skip
    stage = JudgeStage(cfg)
    stage.setup()
    try:
        rows = _batch()
        rows = {k: v[:3] for k, v in rows.items()}
        raw = stage.engine.generate(stage.requests(rows, [0, 1, 2]))
        batch = stage(rows)
        for i, text in enumerate(raw):
            try:
                j = parse_judgement(text)
            except JudgementError:
                assert batch["status"][i] == FAILED and "answer is not a judgement" in batch["error"][i]
            else:
                assert batch["status"][i] == (OK if KEEP[rule](j.i1_satisfies, j.i2_satisfies, j.better) else FILTERED)
    finally:
        stage.engine.close()


@pytest.mark.slow
def test_injected_faults_fail_the_documented_rows(vlm_engine, tiny_vlm_config) -> None:
    """fault_injection.judge: a row fails exactly when random.Random(f"{row_id}:judge").random() < rate (the
    documented rule, recomputed here); the other rows are judged as usual."""
    rate, rule = 0.5, "i2_satisfies"
    stage = JudgeStage(_judge_config(tiny_vlm_config, rule=rule), fault_rate=rate, engine=vlm_engine)
    batch = stage(_batch())
    hit = [i for i in range(N) if random.Random(f"row{i}:judge").random() < rate]
    assert 0 < len(hit) < N
    for i in hit:
        assert (batch["status"][i], batch["stage"][i]) == (FAILED, "judge")
        assert batch["error"][i] == f"injected fault (fault_rate={rate})"
    _check_judged(batch, [i for i in range(N) if i not in hit], stage)
