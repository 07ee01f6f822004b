"""T2, the reflection: a VLM looks at I1 (forward) or at I1 and I2 (hindsight) and writes the four-part template.

The final prompt section drives the refined image in the forward strategy. A reflection that misses a section is
a failed row with the section named (structured outputs make this rare; the check stays).
"""

from __future__ import annotations

from typing import Any

from schemas.reflection import HEADINGS, ReflectionError, parse_reflection, reflection_regex, strip_think
from schemas.work import Batch, stage_seed
from stages.base import StageError, TextStage


def reflect_instruction(prompt: str, t1: str) -> str:
    return (
        f"Request: {prompt}\n"
        f"Plan used for the image shown:\n{strip_think(t1)}\n"
        "Look at the image and write an improving thought inside <think></think>, in four parts: first a "
        "paragraph naming where the image falls short of the request, then "
        f"'{HEADINGS[0]}', then '{HEADINGS[1]}' (composition, lighting, colour, texture, position, style), then "
        f"'{HEADINGS[2]}' followed by one self-contained prompt for the improved image. Do not describe the "
        "improved image as if it already existed."
    )


def reflect_instruction_hindsight(prompt: str) -> str:
    return (
        f"Request: {prompt}\n"
        "The first image is an initial attempt, the second a better answer to the request. Write the improving "
        "thought, inside <think></think>, that would turn the first image into the second, in four parts: the "
        f"shortcomings of the first image, then '{HEADINGS[0]}', then '{HEADINGS[1]}' (composition, lighting, "
        f"colour, texture, position, style), then '{HEADINGS[2]}' followed by one self-contained prompt. Write it "
        "before the improved image exists: never describe the second image as already made."
    )


class ReflectStage(TextStage):
    name = "reflect"

    def requests(self, batch: Batch, rows: list[int]) -> list[Any]:
        from stages.engines.text import TextRequest

        regex = reflection_regex(self.cfg.max_section_chars) if self.cfg.structured else None
        requests = []
        for i in rows:
            prompt, seed = batch["prompt"][i], stage_seed(batch["seed"][i], self.name)
            if self.strategy == "hindsight":
                text, images = reflect_instruction_hindsight(prompt), [batch["i1"][i], batch["i2"][i]]
            else:
                text, images = reflect_instruction(prompt, batch["t1"][i]), [batch["i1"][i]]
            requests.append(TextRequest(prompt=text, images=images, regex=regex, seed=seed))
        return requests

    def store(self, batch: Batch, i: int, result: Any) -> None:
        text = (result or "").strip()
        if not text:
            raise StageError("empty generation for T2")
        try:
            reflection = parse_reflection(text)
        except ReflectionError as exc:
            raise StageError(f"T2 breaks the template ({exc.section}): {exc}") from exc
        batch["t2"][i] = text
        batch["final_prompt"][i] = reflection.final_prompt
