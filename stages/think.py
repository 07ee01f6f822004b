"""T1, the initial thinking: a `<think>` block that plans the image from the prompt.

forward: an LLM/VLM writes T1 from the prompt alone (text-only request).
hindsight: a VLM looks at I2 (the strong image) and writes the T1 that plans it, so T1 and I2 agree.
With structured outputs the `<think>` wrapper holds by construction; the output is still checked.

The instruction states the plan's budget (`max_section_chars`). A plan whose body reaches the regex's cap
(`schemas.reflection.section_cap`) was stopped by the grammar, most likely mid-sentence: the row is `failed` with
the reason `section 'think' reached its N-character cap` and never becomes training data. Like every failed row
it is retried on the next run, with the same seed: seeded sampling repeats the same text, so it fails the same way
until the generation config changes (a larger `max_section_chars` or a model that keeps to the budget, which is a
new generation hash: a new OUT or `--force`). The count of such rows per stage is in the manifest
(`build.stages[].capped`) and the report.
"""

from __future__ import annotations

from typing import Any

from schemas.reflection import ReflectionError, strip_think
from schemas.work import Batch
from stages.base import Instruction, StageError, TextStage


def _budget(max_chars: int) -> str:
    # The model is told the budget the regex enforces: a plan that runs into the cap is cut mid-sentence and
    # fails (see the module docstring), so it has to finish well inside it.
    return f" Keep the plan to at most {max_chars} characters and finish its last sentence well before that."


def think_instruction(prompt: str, max_chars: int) -> str:
    """The T1 request (forward strategy) for `prompt`, stating the plan's budget of `max_chars` characters."""
    return (
        f"Request: {prompt}\n"
        "Before drawing, plan the image inside <think></think>: the objects and how many, their colours, "
        "attributes and positions, the lighting, textures and style." + _budget(max_chars)
    )


def think_instruction_hindsight(prompt: str, max_chars: int) -> str:
    """The T1 request (hindsight strategy: the VLM sees I2), stating the plan's budget of `max_chars` characters."""
    return (
        f"Request: {prompt}\n"
        "The image shown answers this request well. Write, inside <think></think>, the plan that leads from the "
        "request to exactly this image: the objects and how many, their colours, attributes and positions, the "
        "lighting, textures and style. Write it as a plan made before drawing, not as a description of an image."
        + _budget(max_chars)
    )


class ThinkStage(TextStage):
    name = "think"
    text_name = "T1"
    template = "think"
    instructions = {
        "forward": Instruction(think_instruction),
        "hindsight": Instruction(think_instruction_hindsight, images=("i2",)),
    }

    def store(self, batch: Batch, i: int, result: Any) -> None:
        text = self.generated_text(result)
        try:
            strip_think(text)
        except ReflectionError as exc:
            raise StageError(f"T1 is not a <think> block: {exc}") from exc
        self.check_cap(text)
        batch["t1"][i] = text
