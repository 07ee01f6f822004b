"""Model engines behind small interfaces: text/VLM generation (vLLM, transformers), image generation (diffusers),
image-text scoring (open_clip), image safety (ONNX Runtime, open_clip), sentence embeddings
(transformers). Stages depend on these interfaces, not on a model or engine. No ray imports here.
"""

from typing import Any


def open_text_engine(cfg: Any) -> Any:
    """A set-up text engine for a TextModelConfig (`tiny:` names resolved to their local folders)."""
    from stages.engines.text import make_text_engine
    from stages.tiny import resolve_text

    engine = make_text_engine(resolve_text(cfg))
    engine.setup()
    return engine


def open_image_engine(cfg: Any) -> Any:
    """A set-up diffusers engine for an ImageModelConfig."""
    from stages.engines.image import DiffusersImageEngine
    from stages.tiny import resolve_image

    engine = DiffusersImageEngine(resolve_image(cfg))
    engine.setup()
    return engine


def open_scorer(cfg: Any) -> Any:
    """A set-up open_clip scorer for a ScoreConfig."""
    from stages.engines.clip import ClipScorer
    from stages.tiny import resolve_score

    scorer = ClipScorer(resolve_score(cfg))
    scorer.setup()
    return scorer


def open_image_safety(cfg: Any) -> Any:
    """A set-up image safety engine (Open-NSFW on ONNX Runtime, or CLIP zero-shot) for an ImageSafetyConfig."""
    from stages.engines.safety import open_image_safety as open_safety

    return open_safety(cfg)


def open_sentence_embedder(cfg: Any) -> Any:
    """A set-up sentence embedder (the prompt filters') for an EmbedderConfig."""
    from stages.engines.embed import open_embedder

    return open_embedder(cfg)
