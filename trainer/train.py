"""The driver: `train(config, data_dir, stage, resume)` runs IRGL stage 1 then stage 2 on Ray Train.

Stage 2 starts from stage 1's export. Each stage is its own Ray Train run (`<output_dir>/ray/stage<N>/`, checkpoints
`step-NNNNNNNN/`); its logs and export live in `<output_dir>/stage<N>/`. A finished stage (its `final/` export
holds the completion marker) is never trained again; an interrupted one continues from its latest checkpoint
with `resume=True`, at the same data position.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, load_train_config
from trainer.loop import FINAL_MARKER, STATE_FILE

# Environment the workers need (offline Hub, tiny model cache), passed on when the driver starts Ray itself.
_WORKER_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "IRGL_TINY_DIR",
               "TOKENIZERS_PARALLELISM")  # fmt: skip


class TrainError(RuntimeError):
    """The run cannot start or continue as asked (message says why and what to do)."""


@dataclass
class StageResult:
    """What one stage produced."""

    stage: str
    final_dir: Path
    steps: int
    metrics_path: Path
    usable: dict[str, int]
    skipped: dict[str, int]
    skipped_ids: dict[str, str] = field(default_factory=dict)
    skipped_run: bool = False  # True when the stage was already complete and not trained again


def stage_dir(cfg: TrainConfig, stage: str) -> Path:
    return Path(cfg.output_dir).resolve() / f"stage{stage}"


def _storage(cfg: TrainConfig) -> str:
    return cfg.ray.storage_path or str(Path(cfg.output_dir).resolve() / "ray")


def latest_checkpoint(cfg: TrainConfig, stage: str) -> Path | None:
    """The complete checkpoint with the highest step of a stage's Ray run (complete = holds the state file)."""
    run = Path(_storage(cfg)) / f"stage{stage}"
    best, best_step = None, -1
    for ckpt in run.glob("step-*"):
        state = ckpt / STATE_FILE
        if state.is_file() and (ckpt / "model.pt").is_file():
            step = json.loads(state.read_text())["step"]
            if step > best_step:
                best, best_step = ckpt, step
    return best


def _is_done(path: Path) -> bool:
    return (path / FINAL_MARKER).is_file()


def _ensure_ray(cfg: TrainConfig, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    ray.init(address=address or cfg.ray.address, include_dashboard=False, runtime_env={"env_vars": env})


def train(
    config: TrainConfig | str | Path,
    data_dir: str | Path,
    stage: str = "all",
    resume: bool = False,
    *,
    address: str | None = None,
) -> dict[str, StageResult]:
    """Run stage "1", "2" or "all" (1 then 2) on the built dataset `data_dir`; return each stage's result.

    Without `resume`, a stage that already has checkpoints is refused (nothing is overwritten silently); with it,
    each unfinished stage continues from its latest checkpoint and finished stages are kept as they are.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.index import FormatSource, cached_index
    from trainer.tiny_janus import resolve_model

    cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
    if stage not in ("1", "2", "all"):
        raise TrainError(f"stage must be 1, 2 or all, got {stage!r}")
    data_dir = Path(data_dir).resolve()
    if not (data_dir / ("data" if cfg.data_format == "parquet" else "wds")).is_dir():
        raise TrainError(f"{data_dir}: not a built IRGL dataset (no {cfg.data_format} shards)")
    stages = ["1", "2"] if stage == "all" else [stage]
    model_path = resolve_model(cfg.model)
    _ensure_ray(cfg, address)
    results: dict[str, StageResult] = {}
    for name in stages:
        sdir = stage_dir(cfg, name)
        final = sdir / "final"
        if name == "2":
            stage1_final = stage_dir(cfg, "1") / "final"
            if not _is_done(stage1_final):
                raise TrainError(f"stage 2 starts from stage 1's export, but {stage1_final} is not complete")
            init = str(stage1_final)
        else:
            init = model_path
        if _is_done(final):
            if not resume:
                raise TrainError(f"{final} already holds a finished stage {name}; use resume or another output_dir")
            results[name] = _result(name, sdir, {}, {}, {}, skipped_run=True)
            continue
        resume_dir = latest_checkpoint(cfg, name)
        if resume_dir is not None and not resume:
            raise TrainError(f"stage {name} has checkpoints under {resume_dir.parent}; pass resume to continue")
        if not resume:
            # A fresh run: clear what an earlier, checkpoint-less attempt may have left (logs, Ray's run state).
            shutil.rmtree(sdir, ignore_errors=True)
            shutil.rmtree(Path(_storage(cfg)) / f"stage{name}", ignore_errors=True)
        sdir.mkdir(parents=True, exist_ok=True)
        stage_cfg = cfg.stage(name)
        modes = list(stage_cfg.active_modes())
        # The index of both stages' modes, from the tokenizer alone, built once in parallel and cached (stage 2 and
        # every resume read it); the workers get its path.
        indexed = cached_index(
            data_dir,
            [m for m in cfg.stage1.active_modes() | cfg.stage2.active_modes()],
            FormatSource(cfg.adapter, init),
            cfg.token_budget,
            cfg.data_format,
            Path(cfg.output_dir).resolve() / "index",
            jobs=cfg.index_jobs,
        )
        index = indexed.index.subset(modes)
        how = "read from cache" if indexed.cached else f"built with {indexed.jobs} process(es)"
        print(f"stage {name}: index of {sum(index.counts().values())} records {how} in {indexed.seconds:.1f} s "
              f"({indexed.path})", flush=True)  # fmt: skip
        data_stats = {"usable": index.counts(), "skipped": dict(index.skipped), "skipped_ids": index.skipped_ids}
        (sdir / "data_stats.json").write_text(json.dumps(data_stats, indent=2, sort_keys=True))
        loop_cfg: dict[str, Any] = cfg.model_dump()
        loop_cfg.update(
            stage_name=name,
            stage=stage_cfg.model_dump(),
            stage_dir=str(sdir),
            init_path=init,
            resume_dir=str(resume_dir) if (resume and resume_dir) else None,
            index=str(indexed.path),
        )
        backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if cfg.ray.use_gpu else "gloo")
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config=loop_cfg,
            torch_config=TorchConfig(backend=backend),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=f"stage{name}",
                storage_path=_storage(cfg),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        trainer.fit()
        if not _is_done(final):
            raise TrainError(f"stage {name} ended without its export {final}")
        results[name] = _result(name, sdir, index.counts(), dict(index.skipped), index.skipped_ids)
    return results


def _worker_entry(cfg: dict[str, Any]) -> None:
    from trainer.loop import train_loop_per_worker

    train_loop_per_worker(cfg)


def _result(
    name: str,
    sdir: Path,
    usable: dict[str, int],
    skipped: dict[str, int],
    skipped_ids: dict[str, str],
    skipped_run: bool = False,
) -> StageResult:
    marker = sdir / "final" / FINAL_MARKER
    steps = json.loads(marker.read_text())["steps"] if marker.is_file() else 0
    return StageResult(
        stage=name,
        final_dir=sdir / "final",
        steps=steps,
        metrics_path=sdir / "metrics.jsonl",
        usable=usable,
        skipped=skipped,
        skipped_ids=skipped_ids,
        skipped_run=skipped_run,
    )
