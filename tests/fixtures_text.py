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
from schemas.reflection import reflection_regex_max_chars
from stages.engines.text import VLLMTextEngine
from stages.tiny_text import build_tiny_llm, build_tiny_vlm

__all__ = [
    "TEST_MAX_TOKENS",
    "TEST_SECTION_CHARS",
    "tiny_llm_path",
    "tiny_text_root",
    "tiny_vlm_path",
    "tiny_vlm_config",
    "vlm_engine",
]

#: Section bound of the regexes in tests: the random-weight model almost never closes a section by itself, so every
#: section runs to this bound and a reflection is ~`reflection_regex_max_chars(32)` = 298 characters.
TEST_SECTION_CHARS = 32
#: A token is at least one byte and a character at most four, so this many tokens always complete the longest
#: reflection the regex allows: structured outputs never get cut off by max_tokens in tests.
TEST_MAX_TOKENS = 4 * reflection_regex_max_chars(TEST_SECTION_CHARS)


@pytest.fixture(scope="session")
def tiny_text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny text models of this session live."""
    return tmp_path_factory.mktemp("tiny_text")


@pytest.fixture(scope="session")
def tiny_vlm_path(tiny_text_root: Path) -> Path:
    """The tiny Qwen2-VL checkpoint directory."""
    return build_tiny_vlm(tiny_text_root)


@pytest.fixture(scope="session")
def tiny_llm_path(tiny_text_root: Path) -> Path:
    """The tiny Qwen2 causal-LM checkpoint directory."""
    return build_tiny_llm(tiny_text_root)


@pytest.fixture(scope="session")
def tiny_vlm_config(tiny_vlm_path: Path) -> TextModelConfig:
    """The config of the session's VLM engine: sampling on (seeds matter), eager mode, small context."""
    return TextModelConfig(
        engine="vllm",
        model=str(tiny_vlm_path),
        max_tokens=TEST_MAX_TOKENS,
        temperature=1.0,
        top_p=0.95,
        max_model_len=2048,
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
