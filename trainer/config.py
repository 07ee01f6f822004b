"""Trainer configuration: pydantic models (unknown fields are errors, every field described), loaded from YAML.

One file describes both IRGL stages: which modes each stage mixes and with what weight, the optimiser schedule of
each stage, the model, packing, checkpointing and how Ray Train runs the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from schemas.config import StrictModel, load_yaml_model, tiny_model_name
from schemas.local import TINY_TRAINER_KINDS
from schemas.modes import FULL_MODES, MODES_BY_NAME
from trainer.order import DEFAULT_SHUFFLE_BLOCKS, DEFAULT_STREAMS

#: The model name of a trainer config.
TrainerModelName = Annotated[str, tiny_model_name(TINY_TRAINER_KINDS)]


class StageConfig(StrictModel):
    """One IRGL training stage: its mode mixture and its optimiser schedule."""

    modes: dict[str, float] = Field(
        ...,
        description="Mode name -> sampling weight. The next record comes from mode m with probability "
        "w_m / sum(w); a mode with weight 0 or left out is not trained on.",
    )
    steps: int = Field(..., ge=1, description="Optimiser steps of this stage.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to `lr` over this many steps.")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate after warm-up: constant, or cosine decay to `min_lr_ratio * lr`."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Floor of the cosine schedule as a fraction of `lr`.")

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if name not in MODES_BY_NAME:
                raise ValueError(f"unknown mode {name!r}; modes are: {', '.join(MODES_BY_NAME)}")
            if weight < 0:
                raise ValueError(f"weight of {name} must be >= 0, got {weight}")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one mode needs a weight > 0")
        return value

    def active_modes(self) -> dict[str, float]:
        """Modes with a positive weight, in the order of the format (mode 1 .. 6). (The loop mixes them in the
        config's order, `trainer.order.DataOrder.weights`.)"""
        return {name: self.modes[name] for name in MODES_BY_NAME if self.modes.get(name, 0) > 0}


class EmaConfig(StrictModel):
    """Exponential moving average of the weights (exported next to the raw weights as `final_ema/`).

    Kept in float32 whatever the compute precision (a bf16 EMA freezes: its steps round to zero); under FSDP it is
    sharded like the weights it follows.
    """

    enabled: bool = Field(False, description="Keep an EMA of the trainable weights.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimiser step (IRG's recipe: 0.995).")
    stage2_from_ema: bool = Field(
        True,
        description="Stage 2 starts from stage 1's EMA export (final_ema/) when stage 1 kept one, as the official "
        "IRG scripts do (--finetune_from_ema); False: from its raw weights (final/).",
    )


class ConditionDropoutConfig(StrictModel):
    """Condition dropout for classifier-free guidance, drawn per (seed, stage, record id, step), so a resumed run
    drops exactly what the uninterrupted run dropped. Targets are never dropped."""

    text: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Probability that a record with an image target (modes 3 and 6) loses its text condition: every "
        "text token between BOS and the target image's BOI becomes the pad token, without loss (Janus' "
        "unconditional branch for CFG: its sampler replaces the prompt by pad tokens); image conditions stay. 0.1 "
        "is the official IRG trainer's default text_cond_dropout_prob (its stage scripts pass 0).",
    )
    generation_image: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Probability of removing an image condition seen through the generation encoder (need_vae: I1 "
        "in modes 5 and 6), per image: the official recipe's clean-VAE condition dropout (vae_cond_dropout_prob "
        "0.3).",
    )
    understanding_image: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability of removing an image condition seen through the understanding encoder (need_vit), "
        "per image; the official stage scripts pass vit_cond_dropout_prob 0.",
    )


class RayTrainConfig(StrictModel):
    """How Ray Train runs the workers. Resources come from here, never from the driver's hardware."""

    address: str | None = Field(None, description="Ray address ('auto' for a cluster); None starts local Ray.")
    num_workers: int = Field(2, ge=1, description="Training workers (one process, one model replica each).")
    use_gpu: bool = Field(False, description="One GPU per worker (and bf16 autocast when precision is auto).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker; fractions allowed.")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker (CPU training).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl with GPUs, gloo without."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="DDP (replicated weights) or FSDP (FSDP2 `fully_shard` per LM layer: float32 weights, "
        "gradients and AdamW state sharded across workers, for models whose training state does not fit one GPU).",
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts Ray Train attempts (from the latest checkpoint) before failing."
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train persists checkpoints (a shared path or a URI on clusters); "
        "default: <output_dir>/ray.",
    )


class TrainConfig(StrictModel):
    """The whole trainer config (configs/train_*.yaml)."""

    model: TrainerModelName = Field(
        ...,
        description="Model to start from: a Hub id (deepseek-community/Janus-Pro-1B), a local folder or tiny:janus.",
    )
    adapter: Literal["janus"] = Field("janus", description="Model adapter: how records become model inputs.")
    output_dir: str = Field("out/train", description="Logs, exports and (by default) checkpoints go here.")
    seed: int = Field(0, description="Seed of the weights' random parts, the data order and the mixing draws.")
    data_format: Literal["parquet", "webdataset"] = Field(
        "parquet", description="Read data/<mode>/*.parquet or wds/<mode>/*.tar of the built dataset."
    )
    token_budget: int = Field(
        4096, ge=16, description="Tokens per packed sequence (one micro-batch); longer records are skipped, counted."
    )
    grad_accum: int = Field(1, ge=1, description="Packed sequences per worker accumulated into one optimiser step.")
    # Data loading (trainer/index.py, trainer/order.py, trainer/loader.py)
    data_streams: int = Field(
        DEFAULT_STREAMS,
        ge=1,
        description="Block streams per worker. The data order is a pure function of (seed, stage, step) for a given "
        "world size and number of streams; each stream reads whole row groups (Parquet) or 64-sample blocks "
        "(WebDataset) once per window. A multiple of loader_workers; changing it changes the order.",
    )
    loader_workers: int = Field(
        2,
        ge=0,
        description="DataLoader processes per worker that read blocks, parse and tokenize records, apply condition "
        "dropout, collate and preprocess images ahead of the step loop (0: in the training process). Must divide "
        "data_streams; does not change the order.",
    )
    prefetch_packs: int = Field(2, ge=1, description="Packed sequences each loader process prepares ahead.")
    shuffle_blocks: int = Field(
        DEFAULT_SHUFFLE_BLOCKS,
        ge=1,
        description="Blocks whose records a stream shuffles together (the shuffle buffer; block order is shuffled "
        "per epoch anyway). Memory per loader process: about modes x shuffle_blocks x one row group's bytes x "
        "data_streams / loader_workers.",
    )
    index_jobs: int | None = Field(
        None,
        ge=1,
        description="Processes that build the data index (None: one per CPU, at most 16). The index is cached under "
        "<output_dir>/index/, keyed by the dataset's manifest, the tokenizer, the token budget and the modes.",
    )
    condition_dropout: ConditionDropoutConfig = Field(
        ConditionDropoutConfig(), description="Condition dropout for classifier-free guidance."
    )

    @field_validator("loader_workers")
    @classmethod
    def _loader_divides_streams(cls, value: int, info: object) -> int:
        streams = getattr(info, "data", {}).get("data_streams")
        if value and streams and streams % value:
            raise ValueError(f"must divide data_streams ({streams}), got {value}")
        return value

    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (IRG's recipe: 1e-15).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (None: no clip).")
    text_loss_weight: float = Field(1.0, ge=0, description="Weight of the text cross-entropy in the total loss.")
    image_loss_weight: float = Field(1.0, ge=0, description="Weight of the image-token cross-entropy.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Compute precision: bf16 runs the forward/backward in bfloat16 (autocast; FSDP: bf16 "
        "all-gathered params, fp32 gradient reduction) while weights, AdamW state and EMA stay float32; auto = "
        "bf16 on GPU, fp32 on CPU.",
    )
    freeze_vision: bool = Field(
        False, description="Freeze the understanding encoder (the VQ-VAE generation encoder is always frozen)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute LM activations in backward (saves memory).")
    ema: EmaConfig = Field(EmaConfig(), description="Exponential moving average of the weights.")
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray Train keeps per stage (the latest ones).")
    log_every: int = Field(10, ge=1, description="Write per-mode losses to metrics.jsonl every N steps.")
    log_records: bool = Field(
        True, description="Write the ids of the records each worker consumes per step (records/rank-NN.jsonl)."
    )
    tensorboard: bool = Field(True, description="Also write TensorBoard scalars when tensorboard is installed.")
    stage1: StageConfig = Field(..., description="Stage 1: all six modes (full modes 1.0, thinking modes 0.5).")
    stage2: StageConfig = Field(..., description="Stage 2: the two full modes only, starting from stage 1's export.")
    ray: RayTrainConfig = Field(RayTrainConfig(), description="Ray Train workers and resources.")
    fail_after_step: int | None = Field(
        None,
        ge=1,
        description="Fault injection for crash/resume tests: every worker process is killed (SIGKILL) right "
        "after this step's checkpoint. Never set it in real runs.",
    )
    fail_during_export: bool = Field(
        False,
        description="Fault injection for crash/resume tests: every worker is killed (SIGKILL) in the middle of the "
        "final export (weights of final/ written, its completion marker not). Never set it in real runs.",
    )

    @field_validator("stage2")
    @classmethod
    def _stage2_full_only(cls, value: StageConfig) -> StageConfig:
        extra = [m for m in value.active_modes() if m not in FULL_MODES]
        if extra:
            raise ValueError(f"stage 2 trains the full modes only ({', '.join(FULL_MODES)}); remove {extra}")
        return value

    def stage(self, name: str) -> StageConfig:
        """The config of stage "1" or "2"."""
        return {"1": self.stage1, "2": self.stage2}[name]


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Load and validate a trainer config YAML; ConfigError names the file and each bad field."""
    return load_yaml_model(path, TrainConfig, overrides)
