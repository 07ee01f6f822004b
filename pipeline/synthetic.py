"""Synthetic trajectories with small PIL-drawn images: for the writer tests, the shard benchmark and the demo
that runs before any model is involved. Deterministic from a seed; no models.
"""

from __future__ import annotations

import io
import random

from schemas.reflection import HEADINGS
from schemas.trajectory import Trajectory, trajectory_id

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (250, 140, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


def draw(colour: str, shape: str, count: int, size: int, jitter: int, fmt: str = "png") -> bytes:
    """Draw `count` shapes of a colour on a grey canvas; encode as PNG or JPEG (quality 95)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    pen = ImageDraw.Draw(img)
    step = size // (count + 1)
    r = max(size // 10, 2)
    for k in range(count):
        cx, cy = step * (k + 1) + jitter, size // 2 + jitter
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            pen.ellipse(box, fill=RGB[colour])
        elif shape == "square":
            pen.rectangle(box, fill=RGB[colour])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=RGB[colour])
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synthetic_trajectory(index: int, seed: int = 0, size: int = 64, fmt: str = "png") -> Trajectory:
    """One well-formed trajectory whose I1 has the wrong count and I2 the right one."""
    rng = random.Random(seed * 1_000_003 + index)
    colour, shape, count = rng.choice(COLOURS), rng.choice(SHAPES), rng.randint(2, 4)
    prompt = f"{count} {colour} {shape}s in a row, photo #{index}"
    t1 = (
        f"<think>\nThe request asks for exactly {count} {colour} {shape}s side by side on a plain background, "
        "evenly spaced, soft studio lighting.\n</think>"
    )
    t2 = (
        f"<think>\nThe first image shows {count - 1} {shape}s instead of {count}, and they sit off-centre.\n"
        f"{HEADINGS[0]}\nAdd one {shape} so there are exactly {count}; centre the row.\n"
        f"{HEADINGS[1]}\n1. Keep the {colour} colour. 2. Space the {count} {shape}s evenly. 3. Keep the grey "
        "background and the lighting.\n"
        f"{HEADINGS[2]}\n{count} {colour} {shape}s evenly spaced in a centred row on a grey background.\n</think>"
    )
    source = "synthetic"
    tid = trajectory_id(prompt, source, seed + index, "synthetic")
    return Trajectory(
        id=tid,
        prompt=prompt,
        source=source,
        strategy="forward",
        t1=t1,
        i1=draw(colour, shape, count - 1, size, jitter=3, fmt=fmt),
        t2=t2,
        i2=draw(colour, shape, count, size, jitter=0, fmt=fmt),
        scores={"clip_i1": 0.21, "clip_i2": 0.27, "clip_i1_i2": 0.9},
        verdict="accept",
        verdict_reason="i2 improves on i1",
        models={"think": "synthetic", "draw": "pil", "reflect": "synthetic", "score": "none"},
        seeds={"i1": seed + index, "i2": seed + index},
        timings={},
    )


def synthetic_trajectories(n: int, seed: int = 0, size: int = 64, fmt: str = "png") -> list[Trajectory]:
    return [synthetic_trajectory(i, seed=seed, size=size, fmt=fmt) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Engine-free stages: the real build driver, Ray Data, writers and verify around instant "models"
# (bench/scale.py). Each writes what its real stage writes, deterministically from the row's seed.


def _noisy(data: bytes, seed: int, amplitude: int) -> bytes:
    """Add fixed-seed noise and re-encode as JPEG q95: flat drawings compress to ~30 KB at 1024 px, real images
    to a few hundred KB (amplitude 8 gives ~320 KB), and the byte count drives most post-processing costs."""
    import numpy as np
    from PIL import Image

    from schemas.local import decode_rgb

    img = np.asarray(decode_rgb(data), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _scene(seed: int) -> tuple[str, str, int]:
    rng = random.Random(seed)
    return rng.choice(COLOURS), rng.choice(SHAPES), rng.randint(2, 4)


def _synthetic_stage(stage_name: str) -> type:
    from stages.base import Stage

    class SyntheticStage(Stage):
        name = stage_name
        model_name = "synthetic"  # recorded in the rows' `models`, as a real stage records its model

        def __init__(self, size: int = 1024, noise: int = 8, fault_rate: float = 0.0) -> None:
            super().__init__(fault_rate)
            self.size, self.noise = size, noise

        def process(self, batch: dict, rows: list[int]) -> list:
            return [self.make(int(batch["seed"][i]), batch["prompt"][i]) for i in rows]

        def make(self, seed: int, prompt: str) -> object:
            colour, shape, count = _scene(seed)
            if self.name == "think":
                return f"<think>\nDraw {count} {colour} {shape}s for: {prompt}. Even spacing, soft light.\n</think>"
            if self.name == "reflect":
                return (
                    f"<think>\nThe image shows {count - 1} {shape}s, one too few.\n{HEADINGS[0]}\nAdd one {shape}.\n"
                    f"{HEADINGS[1]}\n1. Keep the {colour} colour. 2. Space them evenly.\n{HEADINGS[2]}\n"
                    f"{count} {colour} {shape}s evenly spaced on grey.\n</think>"
                )
            if self.name in ("draw_initial", "draw_refined"):
                n = count - 1 if self.name == "draw_initial" else count
                flat = draw(colour, shape, n, self.size, jitter=3 if n < count else 0, fmt="jpeg")
                return _noisy(flat, seed + len(self.name), self.noise) if self.noise else flat
            if self.name == "safety":
                return (0.01, 0.01)  # both images safe
            if self.name == "judge":
                return '{"i1_satisfies": false, "i2_satisfies": true, "better": "2", "reason": "synthetic"}'
            return (0.21, 0.27, 0.9)  # score: I2 better than I1

        def store(self, batch: dict, i: int, result: object) -> None:
            if self.name == "think":
                batch["t1"][i] = result
            elif self.name == "reflect":
                batch["t2"][i] = result
                batch["final_prompt"][i] = result.split(HEADINGS[2])[1].split("</think>")[0].strip()
            elif self.name == "draw_initial":
                batch["i1"][i] = result
            elif self.name == "draw_refined":
                batch["i2"][i] = result
            elif self.name == "safety":
                batch["safety_i1"][i], batch["safety_i2"][i] = result
            elif self.name == "judge":
                batch["judge"][i] = result
            else:
                batch["clip_i1"][i], batch["clip_i2"][i], batch["clip_i1_i2"][i] = result
                batch["verdict"][i], batch["verdict_reason"][i] = "accept", "synthetic"

    SyntheticStage.__name__ = SyntheticStage.__qualname__ = f"Synthetic_{stage_name}"
    return SyntheticStage


def synthetic_graph(cfg: object, size: int = 1024, noise: int = 8, draw_cpus: float = 0.5) -> list:
    """The forward stage graph of `cfg` with every model stage replaced by an instant synthetic one (the real
    assemble stage stays); for `pipeline.build.build(..., graph=...)`. The draw stages run as Ray actors with
    `draw_cpus` CPUs each (drawing and JPEG-encoding 1024 px images is the one real cost here)."""
    import dataclasses

    from pipeline.graph import stage_graph
    from schemas.config import ResourceConfig

    specs = []
    for spec in stage_graph(cfg):
        if spec.name == "assemble":
            specs.append(spec)
            continue
        drawing = spec.name.startswith("draw")
        resources = ResourceConfig(replicas=1, num_cpus=draw_cpus, batch_size=16) if drawing else None
        specs.append(dataclasses.replace(spec, cls=_SYNTHETIC[spec.name], kwargs={"size": size, "noise": noise},
                                         resources=resources))  # fmt: skip
    return specs


_SYNTHETIC = {
    name: _synthetic_stage(name)
    for name in ("think", "draw_initial", "reflect", "draw_refined", "safety", "score", "judge")
}
globals().update({cls.__name__: cls for cls in _SYNTHETIC.values()})  # importable by name in Ray workers
