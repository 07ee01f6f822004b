"""T1, the initial thinking: a `<think>` block that plans the image from the prompt.

forward: an LLM/VLM writes T1 from the prompt alone (text-only request).
hindsight: a VLM looks at I2 (the strong image) and writes the T1 that plans it, so T1 and I2 agree.
With structured outputs the `<think>` wrapper holds by construction; the output is still checked.
"""

from __future__ import annotations

from typing import Any

from schemas.reflection import ReflectionError, strip_think, think_regex
from schemas.work import Batch, stage_seed
from stages.base import StageError, TextStage


def think_instruction(prompt: str) -> str:
    return (
        f"Request: {prompt}\n"
        "Before drawing, plan the image inside <think></think>: the objects and how many, their colours, "
        "attributes and positions, the lighting, textures and style."
    )


def think_instruction_hindsight(prompt: str) -> str:
    return (
        f"Request: {prompt}\n"
        "The image shown answers this request well. Write, inside <think></think>, the plan that leads from the "
        "request to exactly this image: the objects and how many, their colours, attributes and positions, the "
        "lighting, textures and style. Write it as a plan made before drawing, not as a description of an image."
    )


class ThinkStage(TextStage):
    name = "think"

    def requests(self, batch: Batch, rows: list[int]) -> list[Any]:
        from stages.engines.text import TextRequest

        regex = think_regex(self.cfg.max_section_chars) if self.cfg.structured else None
        requests = []
        for i in rows:
            prompt = batch["prompt"][i]
            if self.strategy == "hindsight":
                requests.append(
                    TextRequest(
                        prompt=think_instruction_hindsight(prompt),
                        images=[batch["i2"][i]],
                        regex=regex,
                        seed=stage_seed(batch["seed"][i], self.name),
                    )
                )
            else:
                requests.append(
                    TextRequest(
                        prompt=think_instruction(prompt), regex=regex, seed=stage_seed(batch["seed"][i], self.name)
                    )
                )
        return requests

    def store(self, batch: Batch, i: int, result: Any) -> None:
        text = (result or "").strip()
        if not text:
            raise StageError("empty generation for T1")
        try:
            strip_think(text)
        except ReflectionError as exc:
            raise StageError(f"T1 is not a <think> block: {exc}") from exc
        batch["t1"][i] = text
