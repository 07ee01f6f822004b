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
