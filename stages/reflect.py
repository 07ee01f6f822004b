"""T2, the reflection: a VLM looks at I1 (forward) or at I1 and I2 (hindsight) and writes the four-part template.

The final prompt section drives the refined image in the forward strategy. A reflection that misses a section is
a failed row with the section named (structured outputs make this rare; the check stays).

The instruction states each part's budget (`max_section_chars`). A part whose body reaches the regex's cap
(`schemas.reflection.section_cap`) was stopped by the grammar, most likely mid-sentence: the row is `failed` with
the reason `section '<name>' reached its N-character cap` (`opening`, `improvements`, `guidance` or
`final_prompt`, the first that reached it) and never becomes training data. Like every failed row it is retried on
the next run, with the same seed: seeded sampling repeats the same text, so it fails the same way until the
generation config changes (a larger `max_section_chars` or a model that keeps to the budget, which is a new
generation hash: a new OUT or `--force`). The count of such rows per stage is in the manifest
(`build.stages[].capped`) and the report.
"""

from __future__ import annotations

from typing import Any

from schemas.reflection import HEADINGS, ReflectionError, parse_reflection, strip_think
from schemas.work import Batch
from stages.base import Instruction, StageError, TextStage


def _budget(max_chars: int) -> str:
    # The model is told the budget the regex enforces on every part: a part that runs into the cap is cut
    # mid-sentence and fails the row (see the module docstring), so each has to finish well inside it.
    return (
        f" Keep each of the four parts to at most {max_chars} characters and finish its last sentence well before that."
    )


def reflect_instruction(prompt: str, t1: str, max_chars: int) -> str:
    """The T2 request (forward strategy: the VLM sees I1), stating each part's budget of `max_chars` characters."""
    return (
        f"Request: {prompt}\n"
        f"Plan used for the image shown:\n{strip_think(t1)}\n"
        "Look at the image and write an improving thought inside <think></think>, in four parts: first a "
        "paragraph naming where the image falls short of the request, then "
        f"'{HEADINGS[0]}', then '{HEADINGS[1]}' (composition, lighting, colour, texture, position, style), then "
        f"'{HEADINGS[2]}' followed by one self-contained prompt for the improved image. Do not describe the "
        "improved image as if it already existed." + _budget(max_chars)
    )


def reflect_instruction_hindsight(prompt: str, max_chars: int) -> str:
    """The T2 request (hindsight strategy: the VLM sees I1 and I2), stating each part's budget of `max_chars`
    characters."""
    return (
        f"Request: {prompt}\n"
        "The first image is an initial attempt, the second a better answer to the request. Write the improving "
        "thought, inside <think></think>, that would turn the first image into the second, in four parts: the "
        f"shortcomings of the first image, then '{HEADINGS[0]}', then '{HEADINGS[1]}' (composition, lighting, "
        f"colour, texture, position, style), then '{HEADINGS[2]}' followed by one self-contained prompt. Write it "
        "before the improved image exists: never describe the second image as already made." + _budget(max_chars)
    )


class ReflectStage(TextStage):
    name = "reflect"
    text_name = "T2"
    template = "reflection"
    instructions = {
        "forward": Instruction(reflect_instruction, texts=("t1",), images=("i1",)),
        "hindsight": Instruction(reflect_instruction_hindsight, images=("i1", "i2")),
    }

    def store(self, batch: Batch, i: int, result: Any) -> None:
        text = self.generated_text(result)
        try:
            reflection = parse_reflection(text)
        except ReflectionError as exc:
            raise StageError(f"T2 breaks the template ({exc.section}): {exc}") from exc
        self.check_cap(text)
        batch["t2"][i] = text
        batch["final_prompt"][i] = reflection.final_prompt
