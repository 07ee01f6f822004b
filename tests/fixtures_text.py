"""Session fixtures for the text side: the tiny Qwen2-VL / Qwen2 models (built once) and ONE vLLM engine.

Starting vLLM costs most of the text tests' time, so a single engine on the tiny VLM serves every test that needs
one (T1 and T2 alike, as in the tiny preset). Star-imported by conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.config import TextModelConfig
from schemas.local import tiny_root
from schemas.reflection import reflection_regex_max_chars
from stages.engines.text import VLLMTextEngine
from stages.tiny_text import build_tiny_llm, build_tiny_vlm

__all__ = [
    "TEST_MAX_TOKENS",
    "TEST_SECTION_CHARS",
    "TEST_SMALL_SECTION_CHARS",
    "tiny_llm_path",
    "tiny_models_root",
    "tiny_vlm_path",
    "tiny_vlm_config",
    "vlm_engine",
]

#: Section bound of the regexes in tests. The tiny models are trained to write one short sentence (about 20 to 50
#: characters) per section and then close it (stages/tiny_text.py), so with this bound practically every section
#: ends by itself, well before its cap, and rows are kept (a section at its cap fails the row).
TEST_SECTION_CHARS = 96
#: A bound that the tiny models' sentences practically always reach: rows fail with `section ... reached its cap`.
TEST_SMALL_SECTION_CHARS = 16
#: A token is at least one byte and a character at most four, so this many tokens always complete the longest
#: reflection the regex allows: structured outputs never get cut off by max_tokens in tests.
TEST_MAX_TOKENS = 4 * reflection_regex_max_chars(TEST_SECTION_CHARS)


@pytest.fixture(scope="session")
def tiny_models_root() -> Path:
    """Where the tiny models (text and image) of this session live: `$IRGL_TINY_DIR` (conftest.py points it at a
    per-machine folder), shared with the builds' `tiny:` names. Builds are idempotent and a cached model is reused
    only if it was made by the same recipe (`schemas.local.build_once`; stages/tiny_text.py `_recipe_id`), so the
    tiny text models' brief training runs once per machine."""
    return tiny_root()


@pytest.fixture(scope="session")
def tiny_vlm_path(tiny_models_root: Path) -> Path:
    """The tiny Qwen2-VL checkpoint directory."""
    return build_tiny_vlm(tiny_models_root)


@pytest.fixture(scope="session")
def tiny_llm_path(tiny_models_root: Path) -> Path:
    """The tiny Qwen2 causal-LM checkpoint directory."""
    return build_tiny_llm(tiny_models_root)


@pytest.fixture(scope="session")
def tiny_vlm_config(tiny_vlm_path: Path) -> TextModelConfig:
    """The config of the session's VLM engine: sampling on (seeds matter), eager mode, a context for TEST_MAX_TOKENS."""
    return TextModelConfig(
        engine="vllm",
        model=str(tiny_vlm_path),
        max_tokens=TEST_MAX_TOKENS,
        temperature=0.8,  # as the tiny preset: the trained tiny models keep to their template at this temperature
        top_p=0.95,
        max_model_len=4096,  # the prompt plus TEST_MAX_TOKENS
        enforce_eager=True,
        dtype="float32",
        max_section_chars=TEST_SECTION_CHARS,
        max_images=2,
    )


@pytest.fixture(scope="session")
def vlm_engine(tiny_vlm_config: TextModelConfig) -> Iterator[VLLMTextEngine]:
    """One vLLM engine on the tiny VLM for the whole session, already set up.

    The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): on the CPU backend that saves two spawned
    processes, each of which re-imports vLLM and torch (~35 s on 2 cores). Production keeps vLLM's default.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMTextEngine(tiny_vlm_config)
    engine.setup()
    yield engine
    engine.close()
