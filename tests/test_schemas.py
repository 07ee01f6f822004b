"""The record contract: the six shapes field by field, the reflection template, and every refusal."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.synthetic import synthetic_trajectory
from schemas import (
    MODES,
    SYSTEM_PROMPT,
    ModeOptions,
    RecordError,
    ReflectionError,
    TrajectoryError,
    check_record,
    mode_records,
    parse_reflection,
    understanding_query_improving,
    understanding_query_initial,
)
from schemas.config import ConfigError, load_build_config
from schemas.local import TINY_BUILDER_KINDS, TINY_PREFIX
from schemas.modes import _image
from schemas.reflection import HEADINGS, reflection_regex, think_regex
from schemas.trajectory import TRAJECTORY_SCHEMA, Trajectory


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _img(data: bytes, loss: bool, vae: bool, vit: bool) -> dict:
    return {"type": "image", "content": _b64(data), "need_loss": loss, "need_vae": vae, "need_vit": vit}


def _user(text: str) -> dict:
    return {"role": "user", "content": text, "need_loss": False}


def _text(text: str, loss: bool) -> dict:
    return {"type": "text", "content": text, "need_loss": loss}


def expected_turns(t: Trajectory, t1_loss: bool = False) -> dict[str, list]:
    """The six shapes of docs/IRGL_FORMAT.md, written out independently of schemas.modes."""
    head = [_user(SYSTEM_PROMPT), _user(t.prompt)]
    return {
        "initial_thinking_understanding_learning": [
            {"role": "assistant", "content": [_img(t.i2, False, False, True)]},
            _user(understanding_query_initial(t.prompt)),
            {"role": "assistant", "content": [_text(t.t1, True)]},
        ],
        "initial_thinking_generation_learning": [*head, {"role": "assistant", "content": [_text(t.t1, True)]}],
        "initial_full_learning": [
            *head,
            {"role": "assistant", "content": [_text(t.t1, True), _img(t.i2, True, False, False)]},
        ],
        "improving_thinking_understanding_learning": [
            {"role": "assistant", "content": [_img(t.i1, False, False, True), _img(t.i2, False, False, True)]},
            _user(understanding_query_improving(t.prompt)),
            {"role": "assistant", "content": [_text(t.t2, True)]},
        ],
        "improving_thinking_generation_learning": [
            *head,
            {
                "role": "assistant",
                "content": [_text(t.t1, t1_loss), _img(t.i1, False, True, True), _text(t.t2, True)],
            },
        ],
        "improving_full_learning": [
            *head,
            {
                "role": "assistant",
                "content": [
                    _text(t.t1, t1_loss),
                    _img(t.i1, False, True, True),
                    _text(t.t2, True),
                    _img(t.i2, True, False, False),
                ],
            },
        ],
    }


@pytest.mark.parametrize("t1_loss", [False, True])
def test_six_shapes_field_by_field(t1_loss: bool) -> None:
    traj = synthetic_trajectory(3)
    records = mode_records(traj, ModeOptions(t1_loss_improving=t1_loss))
    assert [r.mode for r in records] == [m.name for m in MODES]
    assert [r.id for r in records] == [f"{traj.id}_m{i}" for i in range(1, 7)]
    want = expected_turns(traj, t1_loss)
    for record in records:
        turns = json.loads(record.conversation)
        assert turns == want[record.mode], record.mode
        assert record.trajectory_id == traj.id and record.prompt == traj.prompt
        images = json.loads(record.images)
        assert all(i["format"] == "png" and i["width"] == 64 and i["height"] == 64 for i in images)
        # The conversation string is the canonical compact encoding.
        assert record.conversation == json.dumps(turns, ensure_ascii=False, separators=(",", ":"))
    by_mode = {r.mode: r for r in records}
    assert list(by_mode["improving_thinking_understanding_learning"].image_bytes) == ["i1.png", "i2.png"]
    assert list(by_mode["initial_full_learning"].image_bytes) == ["i2.png"]
    assert list(by_mode["improving_thinking_generation_learning"].image_bytes) == ["i1.png"]
    assert by_mode["initial_thinking_generation_learning"].image_bytes == {}


def test_mode_records_is_deterministic_and_pure() -> None:
    traj = synthetic_trajectory(5)
    before = dataclasses.asdict(traj)
    assert mode_records(traj) == mode_records(synthetic_trajectory(5))
    assert dataclasses.asdict(traj) == before


def test_jpeg_images_are_recorded_as_jpg_members() -> None:
    records = mode_records(synthetic_trajectory(1, fmt="jpeg"))
    six = records[5]
    assert list(six.image_bytes) == ["i1.jpg", "i2.jpg"]
    assert [i["format"] for i in json.loads(six.images)] == ["jpeg", "jpeg"]


def test_image_part_without_flag_is_refused() -> None:
    with pytest.raises(RecordError, match="no flag set"):
        _image("i1.png", False, False, False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("t1", "", "t1 is empty"),
        ("t2", "   ", "t2 is empty"),
        ("t1", "no think tags here", "does not start with <think>"),
        ("prompt", " ", "prompt is empty"),
        ("id", "has.a.dot", "letters, digits"),
        ("strategy", "sideways", "strategy"),
        ("i1", b"not an image", "not a PNG/JPEG"),
        ("i2", b"", "no image bytes"),
    ],
)
def test_bad_trajectory_is_refused_naming_the_field(field: str, value: object, match: str) -> None:
    traj = dataclasses.replace(synthetic_trajectory(0), **{field: value})
    with pytest.raises(TrajectoryError, match=match) as info:
        mode_records(traj)
    assert info.value.field == field


def _reflection(skip: str | None = None, final: str = "A red cube on a table.") -> str:
    parts = ["<think>", "The cube is blue, not red."]
    for heading, body in zip(HEADINGS, ["Make it red.", "1. Recolour the cube.", final], strict=False):
        if heading != skip:
            parts += [heading, body]
    return "\n".join(parts + ["</think>"])


def test_reflection_parser_extracts_the_four_parts() -> None:
    r = parse_reflection(_reflection())
    assert r.opening == "The cube is blue, not red."
    assert r.improvements == "Make it red."
    assert r.guidance == "1. Recolour the cube."
    assert r.final_prompt == "A red cube on a table."


@pytest.mark.parametrize(
    ("heading", "section"), [(HEADINGS[0], "improvements"), (HEADINGS[1], "guidance"), (HEADINGS[2], "final_prompt")]
)
def test_reflection_parser_names_the_missing_section(heading: str, section: str) -> None:
    with pytest.raises(ReflectionError) as info:
        parse_reflection(_reflection(skip=heading))
    assert info.value.section == section


def test_reflection_parser_refuses_empty_final_prompt_order_and_opening() -> None:
    with pytest.raises(ReflectionError) as info:
        parse_reflection(_reflection(final="  "))
    assert info.value.section == "final_prompt"
    swapped = _reflection().replace(HEADINGS[0], "@@").replace(HEADINGS[1], HEADINGS[0]).replace("@@", HEADINGS[1])
    with pytest.raises(ReflectionError) as info:
        parse_reflection(swapped)
    assert info.value.section == "order"
    no_opening = _reflection().replace("The cube is blue, not red.\n", "")
    with pytest.raises(ReflectionError) as info:
        parse_reflection(no_opening)
    assert info.value.section == "opening"
    with pytest.raises(ReflectionError) as info:
        parse_reflection("The cube is blue." + _reflection())
    assert info.value.section == "think"


def test_structured_output_regexes_accept_exactly_the_template() -> None:
    import re

    assert re.fullmatch(reflection_regex(), _reflection())
    assert not re.fullmatch(reflection_regex(), _reflection(skip=HEADINGS[1]))
    assert re.fullmatch(think_regex(), "<think>\nplan the image\n</think>")
    assert not re.fullmatch(think_regex(), "<think>\n\n</think>")


def _row(mode_index: int, options: ModeOptions = ModeOptions()) -> dict:
    return mode_records(synthetic_trajectory(2), options)[mode_index - 1].to_row()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t[-1]["content"][0].update(need_loss=False), "does not fit mode"),
        (lambda t: t[-1]["content"][1].update(need_vae=True), "does not fit mode"),
        (lambda t: t[-1]["content"][1].pop("need_vit"), "lacks the flag need_vit"),
        (lambda t: t[-1]["content"][1].update(need_loss=False), "no flag set"),
        (lambda t: t[-1]["content"][1].update(content="!!notbase64"), "not valid base64"),
        (lambda t: t[-1]["content"][1].update(content=_b64(b"GIF89a....")), "do not decode"),
        (lambda t: t[-1]["content"][0].update(content=""), "text part is empty"),
        (lambda t: t[0].update(content=[{"type": "text", "content": "x"}]), "user turn carries text only"),
        (lambda t: t[0].update(role="system"), "role must be"),
        (lambda t: t[1].update(content="another prompt"), "system prompt/query"),
        (lambda t: t.pop(), "does not fit mode"),
    ],
)
def test_check_record_refuses_a_broken_initial_full_record(mutate, match: str) -> None:
    row = _row(3)
    check_record(row)
    turns = json.loads(row["conversation"])
    mutate(turns)
    row["conversation"] = json.dumps(turns)
    with pytest.raises(RecordError, match=match) as info:
        check_record(row)
    assert row["id"] in str(info.value)


def test_check_record_follows_the_t1_loss_switch() -> None:
    on = ModeOptions(t1_loss_improving=True)
    row = _row(6, on)
    check_record(row, on)
    with pytest.raises(RecordError, match="does not fit mode"):
        check_record(row)  # the default (off) expects T1 without loss


def test_check_record_refuses_wrong_mode_and_id() -> None:
    row = _row(2)
    with pytest.raises(RecordError, match="unknown mode"):
        check_record({**row, "mode": "mode_seven"})
    with pytest.raises(RecordError, match="id does not match"):
        check_record({**row, "id": row["id"].replace("_m2", "_m3")})
    with pytest.raises(RecordError, match="does not fit mode"):
        check_record({**row, "mode": MODES[2].name, "id": row["id"].replace("_m2", "_m3")})


def test_trajectory_row_round_trip_fits_schema() -> None:
    import pyarrow as pa

    traj = synthetic_trajectory(4)
    table = pa.Table.from_pylist([traj.to_row()], schema=TRAJECTORY_SCHEMA)
    back = Trajectory.from_row(table.to_pylist()[0])
    assert back == traj


# --- config rules that used to surface only when a stage loaded its model ----------------------------------------

TINY_PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _config_error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as err:
        load_build_config(TINY_PRESET, overrides)
    return str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"draw_refined.model.steps": 1},
        {"draw_refined.model.strength": 0.4},
        {"draw_initial.model.img2img": True, "draw_initial.model.steps": 1},
    ],
)
def test_img2img_without_a_denoising_step_is_a_config_error(overrides: dict) -> None:
    # diffusers runs floor(steps x strength) img2img steps: 2 x 0.6, 1 x 0.6, 2 x 0.4, 1 x 0.6 (the default).
    stage = next(iter(overrides)).split(".")[0]
    message = _config_error(overrides)
    assert message.startswith(f"{TINY_PRESET}: field '{stage}.model.strength': ")
    assert "runs no denoising step; raise steps or strength" in message
    # The preset itself (2 steps x 0.6 = 1 step) and img2img off with any steps are fine.
    load_build_config(TINY_PRESET)
    load_build_config(TINY_PRESET, {"draw_refined.model.steps": 1, "draw_refined.model.img2img": False})


@pytest.mark.parametrize(
    ("field", "name", "reason"),
    [
        ("think.model.model", "tiny:llama", "unknown tiny model 'tiny:llama'; known here: tiny:llm, tiny:vlm"),
        ("draw_initial.model.model", "tiny:", "unknown tiny model 'tiny:'; known here: tiny:sd"),
        ("score.model.model", "tiny:sd", "tiny model 'tiny:sd' cannot serve here; use tiny:clip"),
        ("reflect.model.model", "tiny:clip", "tiny model 'tiny:clip' cannot serve here; use tiny:llm, tiny:vlm"),
    ],
)
def test_unknown_or_misplaced_tiny_model_is_a_config_error(field: str, name: str, reason: str) -> None:
    assert _config_error({field: name}) == f"{TINY_PRESET}: field '{field}': Value error, {reason}"


def test_every_tiny_builder_kind_serves_some_stage() -> None:
    roles = {"think": "llm", "reflect": "vlm", "draw_initial": "sd", "draw_refined": "sd", "score": "clip"}
    assert set(roles.values()) == set(TINY_BUILDER_KINDS)
    cfg = load_build_config(TINY_PRESET, {f"{stage}.model.model": f"{TINY_PREFIX}{k}" for stage, k in roles.items()})
    assert cfg.think.model.model == "tiny:llm" and cfg.score.model.model == "tiny:clip"
    # Names that are not tiny names are left to the loaders (Hub ids, paths, open_clip names).
    load_build_config(TINY_PRESET, {"think.model.model": "Qwen/Qwen2.5-7B-Instruct", "score.model.model": "ViT-B-32"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"curation.prompt_safety.engine": "classifier"},
            "field 'curation.prompt_safety': Value error, engine classifier needs `classifier`",
        ),
        (
            {"safety.model.model": "tiny:clip"},
            "field 'safety.model': Value error, model 'tiny:clip': engine open_nsfw "
            "takes 'bundled:open-nsfw' or a path to an .onnx file",
        ),
        (
            {"safety.model.engine": "clip"},
            "field 'safety.model': Value error, model 'bundled:open-nsfw': engine clip takes an open_clip model name",
        ),
        ({"safety.model": {"engine": "clip", "model": "tiny:sd"}}, "tiny model 'tiny:sd' cannot serve here"),
        (
            {"judge": {"model": {"model": "tiny:vlm", "max_images": 1}}},
            "field 'judge.model.max_images': Value error, max_images=1: the judge is shown I1 and I2 in one request",
        ),
        ({"curation.prompt_dedup.threshold": 1.5}, "field 'curation.prompt_dedup.threshold'"),
    ],
)
def test_curation_config_mistakes_fail_at_load(overrides: dict, message: str) -> None:
    """A curation model that cannot serve its engine, a classifier engine without a classifier, a judge that cannot
    see both images: config errors naming the field, before anything loads."""
    with pytest.raises(ConfigError) as err:
        load_build_config(TINY_PRESET, overrides)
    assert message in str(err.value), str(err.value)
