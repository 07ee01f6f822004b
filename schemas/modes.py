"""The six IRGL learning modes: names, shapes, constants, and the pure trajectory -> records function.

Every shape below is the one of docs/IRGL_FORMAT.md, field by field. The shapes are data (`Mode.signature`), and
the same `check_record` that guards the writer is what `irgl verify` runs on every record it re-reads.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from schemas.conversation import (
    ConversationError,
    Signature,
    conversation_from_json,
    conversation_to_json,
    validate_conversation,
)
from schemas.reflection import HEADINGS
from schemas.trajectory import Trajectory, image_info

# The generation system prompt, sent as the first user turn (the official parser ignores a "system" role).
SYSTEM_PROMPT = (
    "You are a model that reasons before and between image generations. For the user's request, first think "
    "inside <think></think>: work out the objects, their counts, attributes, positions, the lighting, colours, "
    "textures and style the image needs, then generate the image. After each image, analyse it against the "
    "request and generate an improved image, writing each improving thought inside <think></think> in four "
    "parts: a first paragraph naming the shortcomings of the previous image, then "
    f"'{HEADINGS[0]}', then '{HEADINGS[1]}', then '{HEADINGS[2]}' followed by a self-contained prompt for the "
    "improved image."
)


def understanding_query_initial(prompt: str) -> str:
    """Q1(T_in): asks for the thinking that leads from the prompt to the shown image (mode 1)."""
    return (
        f'This image was generated for the request: "{prompt}". Write the thinking, inside <think></think>, '
        "that plans this image from the request: the objects, their counts, attributes, positions, lighting, "
        "colours, textures and style."
    )


def understanding_query_improving(prompt: str) -> str:
    """Q2(T_in): asks for the reflection that leads from the first image to the second (mode 4)."""
    return (
        f'Both images were generated for the request: "{prompt}". The first is an initial attempt, the second '
        "an improved one. Write the improving thought, inside <think></think>, that would turn the first image "
        "into the second, in the four-part template: the shortcomings of the first image, "
        f"'{HEADINGS[0]}', '{HEADINGS[1]}' and '{HEADINGS[2]}'."
    )


@dataclass(frozen=True)
class Mode:
    """One learning mode: its number, exact name (directory and HF config name) and expected signature."""

    index: int
    name: str
    full: bool  # full modes carry an image target and are the only ones of training stage 2

    def signature(self, t1_loss_improving: bool = False) -> Signature:
        """The conversation signature records of this mode must have (see schemas.conversation)."""
        u = ("user", "text")
        t1_cond = ("text", t1_loss_improving)
        i1_cond = ("image", False, True, True)
        i2_target = ("image", True, False, False)
        vit = ("image", False, False, True)
        return {
            1: (("assistant", (vit,)), u, ("assistant", (("text", True),))),
            2: (u, u, ("assistant", (("text", True),))),
            3: (u, u, ("assistant", (("text", True), i2_target))),
            4: (("assistant", (vit, vit)), u, ("assistant", (("text", True),))),
            5: (u, u, ("assistant", (t1_cond, i1_cond, ("text", True)))),
            6: (u, u, ("assistant", (t1_cond, i1_cond, ("text", True), i2_target))),
        }[self.index]


MODES: tuple[Mode, ...] = (
    Mode(1, "initial_thinking_understanding_learning", full=False),
    Mode(2, "initial_thinking_generation_learning", full=False),
    Mode(3, "initial_full_learning", full=True),
    Mode(4, "improving_thinking_understanding_learning", full=False),
    Mode(5, "improving_thinking_generation_learning", full=False),
    Mode(6, "improving_full_learning", full=True),
)
MODES_BY_NAME: dict[str, Mode] = {m.name: m for m in MODES}
FULL_MODES: tuple[str, ...] = tuple(m.name for m in MODES if m.full)


@dataclass(frozen=True)
class ModeOptions:
    """Switches of the record assembly. They are part of the build config hash."""

    t1_loss_improving: bool = False  # T1 carries loss in modes 5 and 6 (paper: false)


class RecordError(ValueError):
    """A record does not fit its mode. The message names the record id and the rule."""


@dataclass(frozen=True)
class ModeRecord:
    """One row of a mode shard. `images` maps member names (e.g. "i1.png") to their bytes, in order of use."""

    id: str
    mode: str
    trajectory_id: str
    prompt: str
    source: str
    strategy: str
    conversation: str
    scores: str
    models: str
    images: str  # JSON list of {"name", "format", "width", "height"}: the encoding and size of each image
    image_bytes: dict[str, bytes]

    def to_row(self) -> dict[str, Any]:
        """The Parquet row of MODE_RECORD_SCHEMA (image bytes live base64 inside `conversation`)."""
        return {
            "id": self.id,
            "mode": self.mode,
            "trajectory_id": self.trajectory_id,
            "prompt": self.prompt,
            "source": self.source,
            "strategy": self.strategy,
            "conversation": self.conversation,
            "scores": self.scores,
            "models": self.models,
            "images": self.images,
        }


#: Explicit schema of `OUT/data/<mode>/*.parquet`. `conversation` is what the official IRG trainer reads; the other
#: columns are provenance, ignored by it.
MODE_RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("trajectory_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("conversation", pa.string(), nullable=False),
        pa.field("scores", pa.string(), nullable=False),
        pa.field("models", pa.string(), nullable=False),
        pa.field("images", pa.string(), nullable=False),
    ]
)


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "need_loss": False}


def _text(text: str, loss: bool) -> dict[str, Any]:
    return {"type": "text", "content": text, "need_loss": loss}


def _image(ref: str, loss: bool, vae: bool, vit: bool) -> dict[str, Any]:
    if not (loss or vae or vit):
        # The official parser silently drops such an image; refuse to build one at all.
        raise RecordError(f"image part {ref!r} has no flag set")
    return {"type": "image", "content": ref, "need_loss": loss, "need_vae": vae, "need_vit": vit}


def _turns(mode: Mode, traj: Trajectory, refs: dict[str, str], options: ModeOptions) -> list[dict[str, Any]]:
    """The conversation of `mode` with image parts holding member names (refs), not bytes yet."""
    i1, i2 = refs["i1"], refs["i2"]
    head = [_user(SYSTEM_PROMPT), _user(traj.prompt)]
    t1_loss = options.t1_loss_improving
    if mode.index == 1:
        return [
            {"role": "assistant", "content": [_image(i2, False, False, True)]},
            _user(understanding_query_initial(traj.prompt)),
            {"role": "assistant", "content": [_text(traj.t1, True)]},
        ]
    if mode.index == 2:
        return [*head, {"role": "assistant", "content": [_text(traj.t1, True)]}]
    if mode.index == 3:
        return [*head, {"role": "assistant", "content": [_text(traj.t1, True), _image(i2, True, False, False)]}]
    if mode.index == 4:
        return [
            {"role": "assistant", "content": [_image(i1, False, False, True), _image(i2, False, False, True)]},
            _user(understanding_query_improving(traj.prompt)),
            {"role": "assistant", "content": [_text(traj.t2, True)]},
        ]
    improving = [_text(traj.t1, t1_loss), _image(i1, False, True, True), _text(traj.t2, True)]
    if mode.index == 5:
        return [*head, {"role": "assistant", "content": improving}]
    return [*head, {"role": "assistant", "content": [*improving, _image(i2, True, False, False)]}]


def _image_refs(turns: list[dict[str, Any]]) -> list[str]:
    """The image member names an assembled (not yet base64-encoded) conversation uses, in order."""
    return [
        part["content"]
        for turn in turns
        if turn["role"] == "assistant"
        for part in turn["content"]
        if part["type"] == "image"
    ]


def record_id(trajectory_id: str, mode: Mode) -> str:
    """Deterministic record id: the trajectory id and the mode number (WebDataset-safe: no dots)."""
    return f"{trajectory_id}_m{mode.index}"


def refs_to_base64(turns: list[dict[str, Any]], image_bytes: dict[str, bytes]) -> list[dict[str, Any]]:
    """Replace image member names by base64 of their bytes (WebDataset sample -> Parquet row), in place."""
    for turn in turns:
        if turn.get("role") == "assistant" and isinstance(turn.get("content"), list):
            for part in turn["content"]:
                if isinstance(part, dict) and part.get("type") == "image":
                    ref = part["content"]
                    if ref not in image_bytes:
                        raise RecordError(f"image reference {ref!r} has no member")
                    part["content"] = base64.b64encode(image_bytes[ref]).decode("ascii")
    return turns


def _assemble(traj: Trajectory, options: ModeOptions, encode: bool) -> list[ModeRecord]:
    """Check the trajectory and each mode's conversation; with `encode`, also build the records (base64 images,
    JSON), which is most of the cost. The checks run on the conversations before their images are encoded."""
    traj.validate()
    info = {"i1": image_info(traj.i1), "i2": image_info(traj.i2)}
    ext = {"png": "png", "jpeg": "jpg"}
    refs = {k: f"{k}.{ext[v['format']]}" for k, v in info.items()}
    data = {"i1": traj.i1, "i2": traj.i2}
    scores = json.dumps(traj.scores, sort_keys=True)
    models = json.dumps(traj.models, sort_keys=True)
    records = []
    for mode in MODES:
        turns = _turns(mode, traj, refs, options)
        used = [k for k in ("i1", "i2") if refs[k] in _image_refs(turns)]
        images = json.dumps([{"name": refs[k], **info[k]} for k in used], sort_keys=True)
        fields = {"id": record_id(traj.id, mode), "mode": mode.name, "trajectory_id": traj.id, "prompt": traj.prompt}
        check_record(fields, options, decode_images=False, turns=turns, image_refs=True)
        if not encode:
            continue
        image_bytes = {refs[k]: data[k] for k in used}
        records.append(
            ModeRecord(
                **fields,
                source=traj.source,
                strategy=traj.strategy,
                conversation=conversation_to_json(refs_to_base64(turns, image_bytes)),
                scores=scores,
                models=models,
                images=images,
                image_bytes=image_bytes,
            )
        )
    return records


def mode_records(traj: Trajectory, options: ModeOptions = ModeOptions()) -> list[ModeRecord]:
    """Turn one trajectory into its six mode records. Pure and deterministic; refuses what does not fit.

    Raises TrajectoryError (naming the field) for a trajectory that cannot yield records, RecordError for a
    record that would not fit its mode's shape.
    """
    return _assemble(traj, options, encode=True)


def check_trajectory(traj: Trajectory, options: ModeOptions = ModeOptions()) -> None:
    """Raise what `mode_records` would raise, without encoding the records (the assemble stage's check: the shard
    writers build the records once, later)."""
    _assemble(traj, options, encode=False)


def check_record(
    row: dict[str, Any],
    options: ModeOptions = ModeOptions(),
    *,
    decode_images: bool = True,
    turns: list[dict[str, Any]] | None = None,
    image_refs: bool = False,
) -> None:
    """Check one Parquet row (or a WebDataset sample's decoded turns) against every rule of its mode.

    Checks the conversation's format rules, the mode's exact shape, that the user turns are the system prompt,
    the prompt or the mode's query quoting it, and the id's form. Raises RecordError naming the record.
    """
    rid = row.get("id", "?")
    mode = MODES_BY_NAME.get(row.get("mode", ""))
    if mode is None:
        raise RecordError(f"record {rid}: unknown mode {row.get('mode')!r}")
    if rid != record_id(row.get("trajectory_id", ""), mode):
        raise RecordError(f"record {rid}: id does not match trajectory id and mode")
    try:
        if turns is None:
            turns = conversation_from_json(row["conversation"])
        signature = validate_conversation(turns, image_refs=image_refs, decode_images=decode_images)
    except ConversationError as exc:
        raise RecordError(f"record {rid}: {exc}") from exc
    expected = mode.signature(options.t1_loss_improving)
    if signature != expected:
        raise RecordError(f"record {rid}: shape {signature} does not fit mode {mode.name} (expected {expected})")
    prompt = row.get("prompt", "")
    users = [t["content"] for t in turns if t["role"] == "user"]
    want = {
        1: [understanding_query_initial(prompt)],
        4: [understanding_query_improving(prompt)],
    }.get(mode.index, [SYSTEM_PROMPT, prompt])
    if users != want:
        raise RecordError(f"record {rid}: user turns are not the system prompt/query of mode {mode.name}")
    if mode.index in (1, 4):
        return
    for part in turns[-1]["content"]:
        if part["type"] == "text" and not part["content"].strip().startswith("<think>"):
            raise RecordError(f"record {rid}: thinking text is not wrapped in <think></think>")
