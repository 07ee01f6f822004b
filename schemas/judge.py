"""The VLM judge's question, its answer's JSON (regex for structured outputs, parser) and the rule that applies it.

The judge sees the prompt, I1 ("Image 1") and I2 ("Image 2") and answers with one JSON object whose keys come in a
fixed order, so that vLLM's regex-guided decoding can only produce text that parses:

    {"i1_satisfies": true, "i2_satisfies": false, "better": "1", "reason": "Image 2 shows three cats, not two."}

`better` is "1", "2" or "same". The decision comes before the reason: a reason that runs into its cap
(`max_reason_chars`, enforced by the regex) is cut, but the answer it follows is complete, so a capped reason is
kept as it is (it is commentary, never training data). `judge_verdict` applies the configured rule
(`JudgeModelConfig.rule`) to an answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

# Shared with the T1/T2 templates: the whitespace `str.strip` removes (a reason may not start with it) and the
# escaping of literals that every structured-output backend reads the same way.
from schemas.reflection import STRIPPED_WHITESPACE, regex_literal

#: The answer's keys, in the only order the regex allows.
KEYS: tuple[str, str, str, str] = ("i1_satisfies", "i2_satisfies", "better", "reason")
#: The values of `better`: Image 1, Image 2, or neither.
BETTER: tuple[str, str, str] = ("1", "2", "same")
#: The rules of `JudgeModelConfig.rule` (see `judge_verdict`).
RULES: tuple[str, str, str] = ("i2_satisfies", "i2_not_worse", "i2_better")

# Never in a reason: `"` and `\` (the reason is a JSON string that needs no escape), ASCII control characters
# including tab and newline (raw, they are invalid in a JSON string), DEL, and UTF-16 surrogates (not characters;
# see schemas/reflection.py `_NEVER`).
_REASON_EXCLUDED = r'"\\\x00-\x1f\x7f\ud800-\udfff'


class JudgementError(ValueError):
    """A judge's text that is not a judgement; the message says what is wrong."""


@dataclass(frozen=True)
class Judgement:
    """One answer of the judge: does I1 / I2 satisfy the prompt, which is better ("1", "2", "same"), and why."""

    i1_satisfies: bool
    i2_satisfies: bool
    better: Literal["1", "2", "same"]
    reason: str

    def to_json(self) -> str:
        """The answer as the judge writes it under the regex: the keys in `KEYS` order, `json.dumps` layout.
        `parse_judgement` reads it back to an equal Judgement."""
        values = (self.i1_satisfies, self.i2_satisfies, self.better, self.reason)
        return json.dumps(dict(zip(KEYS, values, strict=True)), ensure_ascii=False)


def judge_instruction(prompt: str, max_reason_chars: int) -> str:
    """The judge's request for `prompt`; Image 1 (I1) and Image 2 (I2) are shown before it, in that order."""
    return (
        f'Request: "{prompt}"\n'
        "Image 1 and Image 2 were made for this request. For each image, decide whether it satisfies the request: "
        "every object named, their counts, colours, attributes and positions. Then say which image satisfies it "
        'better: "1", "2" or "same". Answer with one JSON object and nothing else, in this form: '
        '{"i1_satisfies": true or false, "i2_satisfies": true or false, "better": "1" or "2" or "same", '
        f'"reason": "one sentence of at most {max_reason_chars} characters on what decided it"}}'
    )


def judge_regex(max_reason_chars: int = 200) -> str:
    """The regular expression of a judge's answer (vLLM structured outputs): the `Judgement.to_json` layout, a
    reason of 1 to `max_reason_chars` characters that starts with a non-space and holds no `"`, backslash or
    control character. Every match parses with `parse_judgement`; `judge_regex_max_chars` bounds its length."""
    reason = rf"[^{STRIPPED_WHITESPACE}{_REASON_EXCLUDED}][^{_REASON_EXCLUDED}]{{0,{max_reason_chars - 1}}}"
    boolean = "(true|false)"
    better = "(" + "|".join(BETTER) + ")"
    return (
        regex_literal('{"i1_satisfies": ')
        + boolean
        + regex_literal(', "i2_satisfies": ')
        + boolean
        + regex_literal(', "better": "')
        + better
        + regex_literal('", "reason": "')
        + reason
        + regex_literal('"}')
    )


def judge_regex_max_chars(max_reason_chars: int = 200) -> int:
    """The longest text `judge_regex(max_reason_chars)` matches, in characters: `max_tokens` must cover it (a
    token is at least one byte, a character at most four; English averages about four characters per token)."""
    longest = Judgement(False, False, "same", "").to_json()
    return len(longest) + max_reason_chars


_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def parse_judgement(text: str) -> Judgement:
    """Read a judge's answer, or raise JudgementError saying what is wrong.

    Accepts every text `judge_regex` matches and, since a model without structured outputs writes JSON its own
    way, the same object in any JSON layout (whitespace, key order) or inside one ```json fence. The object must
    have exactly the keys of `KEYS`: the two `*_satisfies` as JSON booleans, `better` one of "1", "2", "same" (a
    string) and a reason that is a string with more than whitespace (kept as written, not stripped).
    """
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise JudgementError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JudgementError(f"not a JSON object but {type(data).__name__}")
    if set(data) != set(KEYS):
        missing = [k for k in KEYS if k not in data]
        extra = sorted(k for k in data if k not in KEYS)
        raise JudgementError(f"keys wrong: missing {missing}, unexpected {extra}")
    for key in KEYS[:2]:
        if not isinstance(data[key], bool):
            raise JudgementError(f"{key} is {data[key]!r}, not true or false")
    if not isinstance(data["better"], str) or data["better"] not in BETTER:
        raise JudgementError(f"better is {data['better']!r}, not one of {', '.join(repr(b) for b in BETTER)}")
    if not isinstance(data["reason"], str) or not data["reason"].strip():
        raise JudgementError(f"reason is {data['reason']!r}, not a non-empty string")
    return Judgement(data["i1_satisfies"], data["i2_satisfies"], data["better"], data["reason"])


def judge_verdict(j: Judgement, rule: str) -> tuple[bool, str]:
    """(keep, reason): whether the trajectory is kept under `rule`, and why.

    The rules (`JudgeModelConfig.rule`); `i1_satisfies` enters none of them, it is recorded with the answer:

        rule           keep the trajectory when
        i2_satisfies   i2_satisfies
        i2_not_worse   i2_satisfies and better != "1"
        i2_better      i2_satisfies and better == "2"

    The reason names the rule, whether it holds, what failed, the answer's three fields and the judge's reason,
    e.g. `rule i2_not_worse fails: Image 1 is better (i1_satisfies=true, i2_satisfies=true, better=1): "..."`.
    """
    if rule not in RULES:
        raise ValueError(f"unknown judge rule {rule!r}; rules are {', '.join(RULES)}")
    if not j.i2_satisfies:
        keep, why = False, "Image 2 does not satisfy the prompt"
    elif rule == "i2_not_worse" and j.better == "1":
        keep, why = False, "Image 1 is better"
    elif rule == "i2_better" and j.better != "2":
        keep, why = False, "Image 2 is not better" + (" (same)" if j.better == "same" else " (Image 1 is)")
    else:
        keep, why = (
            True,
            "Image 2 satisfies the prompt"
            + {
                "i2_satisfies": "",
                "i2_not_worse": " and Image 1 is not better",
                "i2_better": " and is better",
            }[rule],
        )
    answer = f"i1_satisfies={json.dumps(j.i1_satisfies)}, i2_satisfies={json.dumps(j.i2_satisfies)}, better={j.better}"
    said = json.dumps(j.reason, ensure_ascii=False)
    return keep, f"rule {rule} {'holds' if keep else 'fails'}: {why} ({answer}): {said}"
