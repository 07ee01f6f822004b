"""Session fixtures for the image side: tiny diffusion and CLIP models (built once) and engines (set up once).

Star-imported by conftest.py. The models come from `stages.tiny_image` (fixed configs and seeds, saved in the
libraries' own formats), live in `tiny_models_root` (fixtures_text.py) with the text models, and load through the
production loaders, so nothing is mocked and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import ImageModelConfig, ScoreConfig
from stages.engines.clip import ClipScorer
from stages.engines.image import DiffusersImageEngine
from stages.tiny_image import build_tiny_clip, build_tiny_diffusion, tiny_clip_score_fields, tiny_diffusion_config

__all__ = [
    "tiny_diffusion_path",
    "tiny_image_model_config",
    "tiny_clip",
    "image_engine",
    "clip_scorer",
]


@pytest.fixture(scope="session")
def tiny_diffusion_path(tiny_models_root: Path) -> Path:
    """Folder of the tiny SD pipeline: use str(path) as ImageModelConfig.model."""
    return build_tiny_diffusion(tiny_models_root)


@pytest.fixture(scope="session")
def tiny_image_model_config(tiny_diffusion_path: Path) -> ImageModelConfig:
    """An ImageModelConfig for the tiny pipeline: 64x64, 4 steps, img2img on (strength 0.5 -> 2 refine steps)."""
    return tiny_diffusion_config(tiny_diffusion_path, steps=4, dtype="float32")


@pytest.fixture(scope="session")
def tiny_clip(tiny_models_root: Path) -> dict[str, str]:
    """ScoreConfig fields for the tiny open_clip model: ScoreConfig(**tiny_clip, min_clip_i2=...)."""
    return tiny_clip_score_fields(build_tiny_clip(tiny_models_root))


@pytest.fixture(scope="session")
def image_engine(tiny_image_model_config: ImageModelConfig) -> DiffusersImageEngine:
    """The tiny pipeline behind DiffusersImageEngine (CPU, img2img enabled), set up."""
    engine = DiffusersImageEngine(tiny_image_model_config, device="cpu")
    engine.setup()
    return engine


@pytest.fixture(scope="session")
def clip_scorer(tiny_clip: dict[str, str]) -> ClipScorer:
    """The tiny open_clip model behind ClipScorer (CPU), set up."""
    scorer = ClipScorer(ScoreConfig(**tiny_clip), device="cpu")
    scorer.setup()
    return scorer
