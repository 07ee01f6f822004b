"""The IRGL trainer: reads built shards, runs stage 1 (six modes) then stage 2 (full modes) on Ray Train.

Imports only `schemas` of irgl. Public API: `train`, `TrainConfig`, `load_train_config` (heavy libraries are
imported lazily, inside the functions that need them).
"""

from trainer.config import StageConfig, TrainConfig, load_train_config


def train(*args: object, **kwargs: object) -> object:
    """See trainer.train.train (imported lazily: it pulls in Ray and torch)."""
    from trainer.train import train as _train

    return _train(*args, **kwargs)  # type: ignore[arg-type]


__all__ = ["StageConfig", "TrainConfig", "load_train_config", "train"]
