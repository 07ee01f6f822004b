"""The `conversation` column: canonical JSON encoding and the official parser's rules, checked strictly.

Rules (docs/IRGL_FORMAT.md): a JSON string holding a list of turns; a user turn is text only; an assistant turn
is a list of parts; text parts carry `need_loss`; image parts carry base64 image bytes and all three flags, at
least one of them set; empty text is never emitted. `validate_conversation` returns a compact *signature* of the
conversation that the mode shapes in `schemas.modes` are compared against.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

IMAGE_FLAGS: tuple[str, str, str] = ("need_loss", "need_vae", "need_vit")

# Turn signature items: ("user", "text") or ("assistant", (part signature, ...)); a part signature is
# ("text", need_loss) or ("image", need_loss, need_vae, need_vit).
Signature = tuple[tuple[Any, ...], ...]


class ConversationError(ValueError):
    """A conversation breaks the format rules. The message says which turn/part and what is wrong."""


def conversation_to_json(turns: list[dict[str, Any]]) -> str:
    """Encode turns as the canonical UTF-8 JSON string: key order as given, no spaces, non-ASCII kept.

    One encoder for every writer, so Parquet rows and WebDataset samples converted back give identical strings.
    """
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


def conversation_from_json(text: str) -> list[dict[str, Any]]:
    """Decode a conversation string; raise ConversationError when it is not a JSON list."""
    try:
        turns = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConversationError(f"conversation is not valid JSON: {exc}") from exc
    if not isinstance(turns, list) or not turns:
        raise ConversationError("conversation must be a non-empty JSON list of turns")
    return turns


def _check_image_bytes(b64: str, where: str, decode_images: bool) -> None:
    if not isinstance(b64, str) or not b64:
        raise ConversationError(f"{where}: image content must be a non-empty base64 string")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConversationError(f"{where}: image content is not valid base64 ({exc})") from exc
    if not decode_images:
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise ConversationError(f"{where}: image is {img.format}, expected PNG or JPEG")
            img.load()  # full decode: catches truncated data that verify() would miss
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConversationError(f"{where}: image bytes do not decode ({exc})") from exc


def validate_conversation(
    turns: list[dict[str, Any]], *, image_refs: bool = False, decode_images: bool = True
) -> Signature:
    """Check every rule of the format on decoded turns and return their signature.

    `image_refs=True` accepts member names (e.g. "i1.png") instead of base64 in image parts: that is how
    WebDataset samples store them. `decode_images=False` skips the (slow) full image decode.
    """
    signature: list[tuple[Any, ...]] = []
    for t, turn in enumerate(turns):
        where = f"turn {t}"
        if not isinstance(turn, dict):
            raise ConversationError(f"{where}: a turn must be a JSON object")
        role = turn.get("role")
        content = turn.get("content")
        if role == "user":
            if not isinstance(content, str):
                raise ConversationError(f"{where}: a user turn carries text only (content must be a string)")
            if not content.strip():
                raise ConversationError(f"{where}: user text is empty")
            if turn.get("need_loss", False) is not False:
                raise ConversationError(f"{where}: user text must have need_loss false")
            signature.append(("user", "text"))
        elif role == "assistant":
            if not isinstance(content, list) or not content:
                raise ConversationError(f"{where}: an assistant turn's content must be a non-empty list of parts")
            parts: list[tuple[Any, ...]] = []
            for p, part in enumerate(content):
                pwhere = f"{where} part {p}"
                if not isinstance(part, dict):
                    raise ConversationError(f"{pwhere}: a part must be a JSON object")
                kind = part.get("type")
                if kind == "text":
                    text = part.get("content")
                    if not isinstance(text, str) or not text.strip():
                        raise ConversationError(f"{pwhere}: text part is empty")
                    need_loss = part.get("need_loss", True)
                    if not isinstance(need_loss, bool):
                        raise ConversationError(f"{pwhere}: need_loss must be a boolean")
                    parts.append(("text", need_loss))
                elif kind == "image":
                    flags = []
                    for flag in IMAGE_FLAGS:
                        if flag not in part:
                            raise ConversationError(f"{pwhere}: image part lacks the flag {flag}")
                        if not isinstance(part[flag], bool):
                            raise ConversationError(f"{pwhere}: {flag} must be a boolean")
                        flags.append(part[flag])
                    if not any(flags):
                        raise ConversationError(
                            f"{pwhere}: image part has no flag set (the official parser would drop it)"
                        )
                    if image_refs:
                        ref = part.get("content")
                        if not isinstance(ref, str) or not ref.endswith((".png", ".jpg")):
                            raise ConversationError(f"{pwhere}: image reference must name a .png or .jpg member")
                    else:
                        _check_image_bytes(part.get("content"), pwhere, decode_images)
                    parts.append(("image", *flags))
                else:
                    raise ConversationError(f"{pwhere}: unknown part type {kind!r}")
            signature.append(("assistant", tuple(parts)))
        else:
            raise ConversationError(f"{where}: role must be 'user' or 'assistant', got {role!r}")
    return tuple(signature)
