"""The tiny models: real architectures with tiny deterministic weights, built offline, named `tiny:<kind>`.

A config may name `tiny:llm` (Qwen2 causal LM), `tiny:vlm` (Qwen2-VL), `tiny:sd` (Stable-Diffusion-style
pipeline) or `tiny:clip` (open_clip ViT). They are built on first use under `$IRGL_TINY_DIR` (default
`~/.cache/irgl/tiny`) and then loaded through the same loaders as production models (`from_pretrained`,
`vllm.LLM`, open_clip's `local-dir:` schema). Configs and provenance keep the `tiny:` name, so ids and shards do
not depend on where the cache lives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from schemas.config import ImageModelConfig, ScoreConfig, TextModelConfig
from schemas.local import TINY_BUILDER_KINDS, TINY_PREFIX, tiny_root


def _builders() -> dict[str, Callable[[Path], Path]]:
    from stages.tiny_image import build_tiny_clip, build_tiny_diffusion
    from stages.tiny_text import build_tiny_llm, build_tiny_vlm

    builders = {"llm": build_tiny_llm, "vlm": build_tiny_vlm, "sd": build_tiny_diffusion, "clip": build_tiny_clip}
    assert tuple(builders) == TINY_BUILDER_KINDS, "schemas.local.TINY_BUILDER_KINDS names these builders"
    return builders


def build_all(directory: Path | str | None = None) -> dict[str, Path]:
    """Build (once; later calls reuse them) every tiny model; return kind -> folder."""
    root = tiny_root(directory)
    return {kind: build(root) for kind, build in _builders().items()}


def tiny_path(name: str, directory: Path | str | None = None) -> Path:
    """The folder of `tiny:<kind>`, building it if needed. Configs never get here with an unknown kind (the config
    models refuse it, schemas/config.py); a direct call with one raises ValueError."""
    kind = name.removeprefix(TINY_PREFIX)
    builders = _builders()
    if not name.startswith(TINY_PREFIX) or kind not in builders:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_PREFIX + k for k in builders)}")
    return builders[kind](tiny_root(directory))


def resolve_text(cfg: TextModelConfig) -> TextModelConfig:
    """The config with a `tiny:` model name replaced by its local folder (other names unchanged)."""
    if cfg.model.startswith(TINY_PREFIX):
        return cfg.model_copy(update={"model": str(tiny_path(cfg.model))})
    return cfg


def resolve_image(cfg: ImageModelConfig) -> ImageModelConfig:
    if cfg.model.startswith(TINY_PREFIX):
        return cfg.model_copy(update={"model": str(tiny_path(cfg.model))})
    return cfg


def resolve_score(cfg: ScoreConfig) -> ScoreConfig:
    if cfg.model.startswith(TINY_PREFIX):
        return cfg.model_copy(update={"model": f"local-dir:{tiny_path(cfg.model).resolve()}", "pretrained": ""})
    return cfg
