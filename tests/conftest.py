"""Session-wide test set-up: offline Hugging Face, small vLLM KV cache, and the shared fixtures.

Tiny models are built once per test session (deterministic, from configs) and engines are started once per
session: see fixtures_text.py and fixtures_image.py.
"""

from __future__ import annotations

import os
import tempfile

# Before any library reads them: nothing may reach the Hub, and vLLM on CPU gets a 1 GiB KV cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: ~35 s less per engine on CPU
# The tiny models (`tiny:` names) are built once per machine here and reused by later runs (builds are idempotent).
os.environ.setdefault("IRGL_TINY_DIR", os.path.join(tempfile.gettempdir(), "irgl-test-tiny-models"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs as on the CI machine); builds reuse it."""
    import ray

    from schemas.local import driver_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": driver_env()})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from fixtures_image import *  # noqa: E402,F401,F403
from fixtures_text import *  # noqa: E402,F401,F403
