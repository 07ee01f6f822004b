"""Pseudo-random draws that are pure functions of their parts (seed, stage, record id, step, ...): the data order
and condition dropout are reproducible in any process, on any resume.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from itertools import count


def uniforms(*parts: object) -> Iterator[float]:
    """Endless uniform draws in [0, 1), a pure function of the parts: 8 per BLAKE2b digest (far cheaper than seeding
    a Random per record)."""
    key = ":".join(str(p) for p in parts).encode()
    for block in count():
        digest = hashlib.blake2b(key + b"#%d" % block, digest_size=64).digest()
        for i in range(0, 64, 8):
            yield int.from_bytes(digest[i : i + 8], "big") / 2**64


def seeded(*parts: object) -> random.Random:
    """A Random seeded from a stable hash of the parts (Python's hash() of str is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
