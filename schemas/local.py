"""Small helpers every layer shares (stages, pipeline and trainer may all import schemas, nothing else is common):
where the tiny models live and how one is built once, how encoded images are decoded, and which environment
variables a Ray worker inherits from the driver. Each exists exactly once, here.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: The prefix of a tiny model name in a config (`tiny:llm`, `tiny:janus`).
TINY_PREFIX = "tiny:"

#: The tiny models of the builder (stages/tiny.py) and of the trainer (trainer/tiny_janus.py).
TINY_BUILDER_KINDS = ("llm", "vlm", "sd", "clip")
TINY_TRAINER_KINDS = ("janus",)

#: Written last into a tiny model folder (its content: the recipe it was built from); without it a folder is
#: never trusted.
DONE_MARKER = ".irgl-complete"


def tiny_root(directory: Path | str | None = None) -> Path:
    """Where tiny models are built and cached: `directory`, else $IRGL_TINY_DIR, else ~/.cache/irgl/tiny."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get("IRGL_TINY_DIR", Path.home() / ".cache" / "irgl" / "tiny"))


def build_once(target: Path, recipe: str, build: Callable[[Path], Any]) -> Path:
    """Make `target` by `build(tmp_dir)` unless it already holds a complete build of `recipe`; return `target`.

    The build runs in a sibling temporary folder that is renamed into place after DONE_MARKER (holding `recipe`)
    is written, so a reader sees no folder or a complete one. A folder with another recipe or no marker is
    replaced. Concurrent builders (test workers, Ray actors) each build their own copy; the first rename wins and
    the others drop theirs (the recipes are deterministic, so the copies are the same). Files are made readable by
    other users, since mkdtemp and safetensors create private ones and workers may run as another user.
    """
    target = Path(target)
    recipe = recipe.strip()
    marker = target / DONE_MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (tmp / DONE_MARKER).write_text(f"{recipe}\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not marker.is_file() or marker.read_text(encoding="utf-8").strip() != recipe:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def decode_rgb(data: bytes) -> Any:
    """Encoded PNG/JPEG bytes -> a fully loaded RGB PIL image (the buffer may go away afterwards)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


#: Environment variables a Ray worker takes over from the driver when the driver has them set: offline Hub mode
#: and caches, the tiny-model cache, vLLM's CPU settings, tokenizer threads, and HF_TOKEN for gated models on
#: cluster workers (held in memory by Ray, never written by irgl).
WORKER_ENV = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "IRGL_TINY_DIR",
    "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING",
    "HF_TOKEN",
)  # fmt: skip


def driver_env(names: Iterable[str] = WORKER_ENV) -> dict[str, str]:
    """The driver's values of `names` (those that are set), for a Ray `runtime_env={"env_vars": ...}`."""
    return {name: os.environ[name] for name in names if name in os.environ}
