"""I1 and I2: images drawn with a diffusers pipeline, seeded per trajectory.

role `initial` draws I1 from the prompt. role `refined` draws I2: in the forward strategy from T2's final prompt
(optionally image-to-image from I1), in the hindsight strategy from the prompt with the stronger generator.
"""

from __future__ import annotations

from typing import Any

from schemas.config import ImageEncodingConfig, ImageModelConfig
from schemas.work import Batch, stage_seed
from stages.base import ModelStage, StageError, encode_image
from stages.engines import open_image_engine


class DrawStage(ModelStage):
    def __init__(
        self,
        model: ImageModelConfig,
        role: str,
        strategy: str = "forward",
        encoding: ImageEncodingConfig = ImageEncodingConfig(),
        fault_rate: float = 0.0,
        engine: Any = None,
    ) -> None:
        super().__init__(model, fault_rate, engine)
        if role not in ("initial", "refined"):
            raise ValueError(f"role must be 'initial' or 'refined', got {role!r}")
        self.role = role
        self.strategy = strategy
        self.encoding = encoding
        self.name = f"draw_{role}"
        self.column = "i1" if role == "initial" else "i2"

    def make_engine(self) -> Any:
        return open_image_engine(self.cfg)

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        forward_refine = self.role == "refined" and self.strategy == "forward"
        prompts = [batch["final_prompt"][i] if forward_refine else batch["prompt"][i] for i in rows]
        seeds = [stage_seed(batch["seed"][i], self.name) for i in rows]
        init = [batch["i1"][i] for i in rows] if forward_refine and self.cfg.img2img else None
        return self.engine.generate(prompts, seeds, init_images=init)

    def store(self, batch: Batch, i: int, result: Any) -> None:
        if result is None:
            raise StageError("the image generator returned no image")
        if result.size != (self.cfg.width, self.cfg.height):
            raise StageError(f"image is {result.size}, expected {(self.cfg.width, self.cfg.height)}")
        batch[self.column][i] = encode_image(result, self.encoding.format, self.encoding.jpeg_quality)
