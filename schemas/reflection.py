"""The four-part reflection template (T2) and the `<think>` wrapper shared by T1 and T2.

A reflection is, in this order: an opening paragraph naming the shortcomings of the previous image, then three
headed sections. `parse_reflection` extracts the parts and says exactly which one is missing or out of order, so
a bad model output becomes a reject with a reason instead of a silently broken record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

HEADING_IMPROVEMENTS = "### Detailed Explanation of Required Improvements:"
HEADING_GUIDANCE = "### Step-by-Step Modification Guidance:"
HEADING_FINAL_PROMPT = "### Final Comprehensive Prompt for the Improved Image:"

#: The three headings, in the order the template requires them.
HEADINGS: tuple[str, str, str] = (HEADING_IMPROVEMENTS, HEADING_GUIDANCE, HEADING_FINAL_PROMPT)

_SECTION_NAMES = {
    HEADING_IMPROVEMENTS: "improvements",
    HEADING_GUIDANCE: "guidance",
    HEADING_FINAL_PROMPT: "final_prompt",
}


class ReflectionError(ValueError):
    """A thinking text does not follow its template. `section` names the part that is missing or wrong."""

    def __init__(self, message: str, section: str) -> None:
        super().__init__(message)
        self.section = section


@dataclass(frozen=True)
class Reflection:
    """The four parts of a parsed reflection, each stripped of surrounding whitespace."""

    opening: str
    improvements: str
    guidance: str
    final_prompt: str


def strip_think(text: str) -> str:
    """Return the body of a `<think> ... </think>` block; raise ReflectionError(section='think') otherwise.

    Exactly one block is allowed and nothing may stand outside it except whitespace: the official parser would
    train on any stray text, so we refuse it here.
    """
    stripped = text.strip()
    if not stripped.startswith(THINK_OPEN):
        raise ReflectionError(f"thinking text does not start with {THINK_OPEN}", section="think")
    if not stripped.endswith(THINK_CLOSE):
        raise ReflectionError(f"thinking text does not end with {THINK_CLOSE}", section="think")
    body = stripped[len(THINK_OPEN) : -len(THINK_CLOSE)]
    if THINK_OPEN in body or THINK_CLOSE in body:
        raise ReflectionError("thinking text holds more than one <think> block", section="think")
    if not body.strip():
        raise ReflectionError("thinking text is empty inside <think></think>", section="think")
    return body.strip()


def parse_reflection(text: str) -> Reflection:
    """Parse a T2 text (with its `<think>` wrapper) into its four parts, or raise ReflectionError.

    Each heading must appear exactly once, in template order, every part must be non-empty, and the final prompt
    must be non-empty since it drives the refined image.
    """
    body = strip_think(text)
    positions: list[int] = []
    for heading in HEADINGS:
        count = body.count(heading)
        name = _SECTION_NAMES[heading]
        if count == 0:
            raise ReflectionError(f"reflection lacks the section {heading!r}", section=name)
        if count > 1:
            raise ReflectionError(f"reflection repeats the section {heading!r}", section=name)
        positions.append(body.index(heading))
    if positions != sorted(positions):
        raise ReflectionError("reflection sections are out of template order", section="order")

    opening = body[: positions[0]].strip()
    parts = []
    for i, heading in enumerate(HEADINGS):
        start = positions[i] + len(heading)
        end = positions[i + 1] if i + 1 < len(HEADINGS) else len(body)
        parts.append(body[start:end].strip())
    if not opening:
        raise ReflectionError("reflection lacks the opening paragraph on the previous image", section="opening")
    for heading, part in zip(HEADINGS, parts, strict=False):
        if not part:
            raise ReflectionError(f"reflection section {heading!r} is empty", section=_SECTION_NAMES[heading])
    return Reflection(opening=opening, improvements=parts[0], guidance=parts[1], final_prompt=parts[2])


def reflection_regex(max_section_chars: int = 600) -> str:
    """A regular expression that only a well-formed reflection matches (for constrained decoding).

    Used by the generation stages with vLLM structured outputs so that the template holds by construction for
    any model. Section bodies exclude `#` and `<` so that no heading or tag can be forged inside them.
    """
    body = rf"[^#<\n][^#<]{{0,{max_section_chars}}}"
    return (
        re.escape(THINK_OPEN)
        + r"\n"
        + body
        + r"\n"
        + r"\n".join(re.escape(h) + r"\n" + body for h in HEADINGS)
        + r"\n"
        + re.escape(THINK_CLOSE)
    )


def think_regex(max_chars: int = 1200) -> str:
    """A regular expression for a single non-empty `<think>` block (T1), for constrained decoding."""
    return re.escape(THINK_OPEN) + rf"\n[^#<\n][^<]{{0,{max_chars}}}\n" + re.escape(THINK_CLOSE)
