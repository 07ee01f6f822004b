"""The driver: `train(config, data_dir, stage, resume)` runs IRGL stage 1 then stage 2 on Ray Train.

Stage 2 starts from stage 1's export (its EMA export when stage 1 kept one and `ema.stage2_from_ema`). Each stage
is its own Ray Train run (`<output_dir>/ray/stage<N>/`, DCP checkpoints `step-NNNNNNNN/`); its logs and export live
in `<output_dir>/stage<N>/`. A finished stage (its `final/` export holds the completion marker) is never trained
again; an interrupted one continues from its latest checkpoint with `resume=True`, at the same data position, and a
run that died while exporting finishes the export. A checkpoint records the world size, the gradient accumulation
and a fingerprint of the data; resuming with other values would change the data order, so it is refused unless
`force_resume=True`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.local import driver_env
from trainer.config import TrainConfig, load_train_config
from trainer.loop import FINAL_MARKER, read_state


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
    """The complete checkpoint with the highest step of a stage's Ray run (complete = its state file and every
    shard file the state file lists are there: a crash during the upload leaves an incomplete one)."""
    run = Path(_storage(cfg)) / f"stage{stage}"
    best, best_step = None, -1
    for ckpt in run.glob("step-*"):
        state = read_state(ckpt)
        if state is not None and state["step"] > best_step:
            best, best_step = ckpt, state["step"]
    return best


MANIFEST = "manifest.json"  # written last by the dataset build (pipeline/card.py's MANIFEST_NAME)


def data_fingerprint(cfg: TrainConfig, data_dir: Path, stage: str) -> str:
    """What fixes a stage's data order: the dataset (its manifest's sha256, or the shard files' names and sizes
    when it has no manifest), the format, the stage's modes and weights, the seed, the token budget, the model
    (whose tokenizer measures the records), the reader's streams and shuffle window, and the condition dropout."""
    manifest = data_dir / MANIFEST
    if manifest.is_file():
        dataset = hashlib.sha256(manifest.read_bytes()).hexdigest()
    else:
        root = data_dir / ("data" if cfg.data_format == "parquet" else "wds")
        files = sorted(f"{f.relative_to(root)}:{f.stat().st_size}" for f in root.rglob("*") if f.is_file())
        dataset = hashlib.sha256("\n".join(files).encode()).hexdigest()
    facts = {
        "dataset": dataset,
        "data_format": cfg.data_format,
        # In the config's order, as the loop mixes them (a list: sort_keys below would reorder a dict).
        "modes": [[m, w] for m, w in cfg.stage(stage).modes.items() if w > 0],
        "seed": cfg.seed,
        "token_budget": cfg.token_budget,
        "model": cfg.model,
        # The reader's streams and shuffle window, and the condition dropout, change which records a step sees.
        "data_streams": cfg.data_streams,
        "shuffle_blocks": cfg.shuffle_blocks,
        "condition_dropout": cfg.condition_dropout.model_dump(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def check_resume(cfg: TrainConfig, stage: str, checkpoint: Path, fingerprint: str) -> list[str]:
    """How this run differs from the one that wrote `checkpoint` in what fixes the data order (empty: none)."""
    state = read_state(checkpoint) or {}
    now = {"world_size": cfg.ray.num_workers, "grad_accum": cfg.grad_accum, "data_fingerprint": fingerprint}
    names = {"world_size": "ray.num_workers", "grad_accum": "grad_accum", "data_fingerprint": "data fingerprint"}
    diffs = []
    for key, value in now.items():
        if state.get(key) != value:
            was, is_ = state.get(key), value
            if key == "data_fingerprint":
                was, is_ = str(was)[:12], value[:12]
                detail = " (dataset, data_format, stage modes/weights, seed, token_budget or model changed)"
            else:
                detail = ""
            diffs.append(f"{names[key]} {was} -> {is_}{detail}")
    return diffs


def _is_done(path: Path) -> bool:
    return (path / FINAL_MARKER).is_file()


def _ensure_ray(cfg: TrainConfig, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # The workers take the driver's offline Hub settings, caches and tiny-model folder (schemas.local.WORKER_ENV).
    ray.init(address=address or cfg.ray.address, include_dashboard=False, runtime_env={"env_vars": driver_env()})


def train(
    config: TrainConfig | str | Path,
    data_dir: str | Path,
    stage: str = "all",
    resume: bool = False,
    *,
    address: str | None = None,
    force_resume: bool = False,
) -> dict[str, StageResult]:
    """Run stage "1", "2" or "all" (1 then 2) on the built dataset `data_dir`; return each stage's result.

    Without `resume`, a stage that already has checkpoints is refused (nothing is overwritten silently); with it,
    each unfinished stage continues from its latest checkpoint (or only finishes its export) and finished stages are
    kept as they are. A checkpoint written with another world size, gradient accumulation or data is refused unless
    `force_resume` (then the data order from there on differs from an uninterrupted run).
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
            stage1_ema = stage_dir(cfg, "1") / "final_ema"
            init = str(stage1_ema if cfg.ema.stage2_from_ema and _is_done(stage1_ema) else stage1_final)
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
        fingerprint = data_fingerprint(cfg, data_dir, name)
        if resume and resume_dir is not None:
            diffs = check_resume(cfg, name, resume_dir, fingerprint)
            if diffs and not force_resume:
                raise TrainError(
                    f"stage {name}: checkpoint {resume_dir} was written by a run with other settings: "
                    f"{'; '.join(diffs)}. Resuming would change the data order; resume with the checkpoint's "
                    "settings, or pass --force-resume to continue anyway (the data order after the checkpoint then "
                    "differs from an uninterrupted run)."
                )
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
            data_fingerprint=fingerprint,
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
        ema_note = f" (EMA: {sdir / 'final_ema'})" if _is_done(sdir / "final_ema") else ""
        print(f"stage {name} finished: export in {final}{ema_note}; metrics in {sdir / 'metrics.jsonl'}", flush=True)
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
