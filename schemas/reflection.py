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


# Never in a thinking text: ASCII control characters other than tab and newline (they corrupt training text), and
# UTF-16 surrogates, which are not characters at all; without them in the class, xgrammar lets a model emit them as
# three bytes that are not valid UTF-8 and come back as U+FFFD, breaking the regex after decoding.
_NEVER = r"\x00-\x08\x0b-\x1f\x7f\ud800-\udfff"
#: Whitespace that `str.strip` removes: a body must start with none of it, or a body of only whitespace would match
#: the regex and still be empty once `parse_reflection` strips it (schemas/judge.py uses it too).
STRIPPED_WHITESPACE = r" \t\n\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Reflection sections may hold neither `#` nor `<`, so that no heading or tag can be forged inside them; T1 only
# excludes `<` (no `<think>` tag can be forged), markdown there is harmless.
_SECTION_EXCLUDED = "#<" + _NEVER
_THINK_EXCLUDED = "<" + _NEVER

#: The characters that are regex syntax. Only these are escaped when a literal enters a regex: `re.escape` also
#: escapes `#`, space and `-`, which xgrammar (vLLM's default structured-output backend) warns about.
_REGEX_SYNTAX = frozenset("\\.^$|?*+()[]{}")


def regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it, escaping only true regex syntax (portable across backends)."""
    return "".join("\\" + c if c in _REGEX_SYNTAX else c for c in text)


def section_cap(max_section_chars: int) -> int:
    """The most characters the regexes allow in one section body for a given `max_section_chars`.

    A body is one non-space character then up to `max_section_chars` more, so the cap is `max_section_chars + 1`.
    A body of exactly this length was stopped by the grammar, not by the model (see `capped_section`).
    """
    return max_section_chars + 1


def _body(max_chars: int, excluded: str) -> str:
    """A body of 1 to `section_cap(max_chars)` characters outside `excluded` whose first character is not
    whitespace."""
    return rf"[^{STRIPPED_WHITESPACE}{excluded}][^{excluded}]{{0,{section_cap(max_chars) - 1}}}"


def reflection_regex(max_section_chars: int = 600) -> str:
    """A regular expression that only a well-formed reflection matches (for constrained decoding).

    Used by the generation stages with vLLM structured outputs so that the template holds by construction for
    any model. Section bodies exclude `#`, `<` and control characters and start with a non-space. The length of a match
    is bounded by `reflection_regex_max_chars`: `max_tokens` must cover it or outputs get cut before `</think>`.
    """
    body = _body(max_section_chars, _SECTION_EXCLUDED)
    return (
        regex_literal(THINK_OPEN)
        + r"\n"
        + body
        + r"\n"
        + r"\n".join(regex_literal(h) + r"\n" + body for h in HEADINGS)
        + r"\n"
        + regex_literal(THINK_CLOSE)
    )


def think_regex(max_chars: int = 1200) -> str:
    """A regular expression for a single non-empty `<think>` block (T1), for constrained decoding.

    The length of a match is bounded by `think_regex_max_chars`.
    """
    return regex_literal(THINK_OPEN) + r"\n" + _body(max_chars, _THINK_EXCLUDED) + r"\n" + regex_literal(THINK_CLOSE)


def reflection_regex_max_chars(max_section_chars: int = 600) -> int:
    """The longest text `reflection_regex(max_section_chars)` matches, in characters.

    A token is at least one byte and a character at most four UTF-8 bytes, so `4 *` this many tokens always
    suffice; English text needs far fewer (real tokenizers average about four characters per token).
    """
    fixed = len(THINK_OPEN) + len(THINK_CLOSE) + sum(len(h) for h in HEADINGS)
    newlines = 2 + 2 * len(HEADINGS)
    return fixed + newlines + (1 + len(HEADINGS)) * section_cap(max_section_chars)


def think_regex_max_chars(max_chars: int = 1200) -> int:
    """The longest text `think_regex(max_chars)` matches, in characters (see `reflection_regex_max_chars`)."""
    return len(THINK_OPEN) + len(THINK_CLOSE) + 2 + section_cap(max_chars)


#: The name of T1's single body in `capped_section` and in rejects' reasons.
THINK_SECTION = "think"
#: T2's four bodies in template order, as `capped_section` and the rejects name them.
REFLECTION_SECTIONS: tuple[str, str, str, str] = ("opening", "improvements", "guidance", "final_prompt")


def _raw_bodies(text: str, delimiters: tuple[str, ...]) -> list[str]:
    """The bodies between consecutive `delimiters`, exactly as the regex lays them out (delimiter, newline, body,
    newline, delimiter).

    Only the single newline the regex puts after and before each delimiter is removed, so a body keeps any
    whitespace the model wrote inside it (that counts against the cap too). Stops at the first delimiter that is
    missing: a text that breaks the template is `parse_reflection`'s business, not this function's.
    """
    bodies: list[str] = []
    start = text.find(delimiters[0])
    if start < 0:
        return bodies
    start += len(delimiters[0])
    for delimiter in delimiters[1:]:
        end = text.find(delimiter, start)
        if end < 0:
            break
        body = text[start:end]
        body = body[1:] if body.startswith("\n") else body
        body = body[:-1] if body.endswith("\n") else body
        bodies.append(body)
        start = end + len(delimiter)
    return bodies


def capped_section(text: str, max_section_chars: int, template: str = "reflection") -> str | None:
    """The name of the first section of `text` whose body reached its cap, or None when every body ended early.

    A body as long as the regex allows (`section_cap(max_section_chars)` characters, or longer when the text was
    generated without the regex) was stopped by the grammar, not by the model: it most likely ends mid-sentence,
    so the generation stages fail such a row instead of keeping a cut-off thought as training data.
    `template` is `"think"` (T1: one body, named `think`) or `"reflection"` (T2: `opening`, `improvements`,
    `guidance`, `final_prompt`).
    """
    if template == "think":
        names: tuple[str, ...] = (THINK_SECTION,)
        delimiters: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE)
    elif template == "reflection":
        names, delimiters = REFLECTION_SECTIONS, (THINK_OPEN, *HEADINGS, THINK_CLOSE)
    else:
        raise ValueError(f"unknown template {template!r}; expected 'think' or 'reflection'")
    cap = section_cap(max_section_chars)
    for name, body in zip(names, _raw_bodies(text, delimiters), strict=False):
        if len(body) >= cap:
            return name
    return None


def cap_reason(section: str, max_section_chars: int) -> str:
    """The reject reason of a row whose `section` reached its cap (the exact wording tests and reports rely on)."""
    return f"section '{section}' reached its {section_cap(max_section_chars)}-character cap"


_CAP_REASON = re.compile(r"section '[a-z_]+' reached its [0-9]+-character cap")


def is_cap_reason(reason: str | None) -> bool:
    """Whether a reject's reason is `cap_reason`'s: the build counts these rows per stage (`capped`)."""
    return bool(reason) and _CAP_REASON.fullmatch(reason) is not None
