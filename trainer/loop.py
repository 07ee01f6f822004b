"""The per-worker training loop that Ray Train runs (one process per worker): one IRGL stage.

Everything a worker needs arrives in `train_loop_config` (plain data); the loop loads the model through its
adapter, wraps it for DDP or FSDP, regenerates the deterministic pack stream from its step, and trains.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.modes import MODES

STATE_FILE = "irgl_state.json"
FINAL_MARKER = "irgl_train.json"
_MODE_NAMES = {m.index: m.name for m in MODES}


def _lr_lambda(stage: dict[str, Any]) -> Any:
    warmup, steps, schedule, floor = stage["warmup_steps"], stage["steps"], stage["schedule"], stage["min_lr_ratio"]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _checkpoint_step(path: str | None) -> int:
    if not path:
        return -1
    state = Path(path) / STATE_FILE
    return json.loads(state.read_text())["step"] if state.is_file() else -1


class _Logger:
    """metrics.jsonl (rank 0), records/rank-NN.jsonl (every rank) and TensorBoard when it is installed."""

    def __init__(self, stage_dir: Path, rank: int, cfg: dict[str, Any]) -> None:
        self.rank = rank
        self.records = None
        self.metrics = None
        self.tb = None
        if cfg["log_records"]:
            (stage_dir / "records").mkdir(parents=True, exist_ok=True)
            self.records = open(stage_dir / "records" / f"rank-{rank:02d}.jsonl", "a", encoding="utf-8")
        if rank == 0:
            self.metrics = open(stage_dir / "metrics.jsonl", "a", encoding="utf-8")
            if cfg["tensorboard"]:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(stage_dir / "tensorboard"))
                except ImportError:  # tensorboard is optional
                    self.tb = None

    def event(self, **data: Any) -> None:
        for fh in (self.records, self.metrics):
            if fh is not None:
                fh.write(json.dumps(data) + "\n")
                fh.flush()

    def step_records(self, step: int, packs: list[dict[str, Any]]) -> None:
        if self.records is not None:
            self.records.write(json.dumps({"step": step, "packs": packs}) + "\n")

    def scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        for fh in (self.records, self.metrics):
            if fh is not None:
                fh.close()
        if self.tb is not None:
            self.tb.close()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One stage on one worker. `cfg` is `TrainConfig.model_dump()` plus the stage's run facts (see train.py)."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from trainer.data import ConditionDropout, PackDataset, PackLoader, steps_packs
    from trainer.model import load_adapter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stage_name, stage = cfg["stage_name"], cfg["stage"]
    stage_dir = Path(cfg["stage_dir"])
    torch.set_num_threads(cfg["ray"]["threads_per_worker"])
    torch.manual_seed(cfg["seed"])
    device = get_device()
    use_bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")

    adapter = load_adapter(cfg["adapter"], cfg["init_path"])
    adapter.freeze(vision=cfg["freeze_vision"])
    if cfg["gradient_checkpointing"]:
        adapter.module.janus.model.language_model.gradient_checkpointing_enable()
    from trainer.index import tokenizer_format

    fmt = tokenizer_format(cfg["adapter"], cfg["init_path"])  # the adapter's format plus the pad id (CFG dropout)

    strategy = cfg["ray"]["strategy"]
    if strategy == "fsdp":
        from functools import partial

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_cls = {type(layer) for layer in adapter.module.janus.model.language_model.layers}
        kwargs = {"auto_wrap_policy": partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)}
        kwargs["use_orig_params"] = True  # frozen (VQ-VAE) and trainable parameters live side by side
        model = prepare_model(adapter.module, parallel_strategy="fsdp", parallel_strategy_kwargs=kwargs)
    else:
        # Unused parameters per pack are normal here (no understanding image, no image target, ...).
        model = prepare_model(
            adapter.module, parallel_strategy="ddp", parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage))
    unwrapped = model.module if hasattr(model, "module") else model
    ema: dict[str, torch.Tensor] | None = None
    if cfg["ema"]["enabled"]:
        ema = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # Resume: the newer of Ray's latest registered checkpoint (a restart inside this run) and the one the driver
    # found on disk (a new run after a crash, which Ray may not have registered before dying).
    start_step = 0
    candidates = [cfg.get("resume_dir")]
    ray_ckpt = ray.train.get_checkpoint()
    ray_dir_ctx = ray_ckpt.as_directory() if ray_ckpt is not None else None
    if ray_dir_ctx is not None:
        candidates.append(ray_dir_ctx.__enter__())
    best = max(candidates, key=_checkpoint_step)
    if _checkpoint_step(best) >= 0:
        ckpt_dir = Path(best)  # type: ignore[arg-type]
        state = json.loads((ckpt_dir / STATE_FILE).read_text())
        model_sd = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
        optim_sd = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and (ckpt_dir / "ema.pt").is_file():
            ema = {k: v.to(device) for k, v in torch.load(ckpt_dir / "ema.pt", weights_only=True).items()}
        start_step = state["step"]
    if ray_dir_ctx is not None:
        ray_dir_ctx.__exit__(None, None, None)

    log = _Logger(stage_dir, rank, cfg)
    log.event(event="start", stage=stage_name, step=start_step, rank=rank, world_size=world)
    weights = {m: w for m, w in stage["modes"].items() if w > 0}
    # The streaming reader: loader processes read whole blocks of this worker's streams, parse, tokenize, drop
    # conditions, collate and preprocess images ahead of the loop; packs arrive in plan order (checked per step).
    dropout = cfg["condition_dropout"]
    loader = PackLoader(
        PackDataset(
            cfg["index"],  # the cached index's path: each loader process reads it
            fmt,
            weights,
            cfg["token_budget"],
            cfg["seed"],
            stage_name,
            rank=rank,
            world_size=world,
            grad_accum=cfg["grad_accum"],
            start_step=start_step,
            streams=cfg["data_streams"],
            shuffle_blocks=cfg["shuffle_blocks"],
            dropout=ConditionDropout(
                text=dropout["text"],
                gen_image=dropout["generation_image"],
                vit_image=dropout["understanding_image"],
            ),
            prepare=adapter.batch_tensors,
        ),
        workers=cfg["loader_workers"],
        prefetch=cfg["prefetch_packs"],
    )
    packs = iter(loader)
    # Per mode number: text loss sum, text tokens, image loss sum, image tokens (summed over ranks at log time).
    stats = torch.zeros((7, 4), dtype=torch.float64)
    tokens_seen = 0
    t0 = time.perf_counter()
    accum = cfg["grad_accum"]
    model.train()
    for step in range(start_step, stage["steps"]):
        step_items = steps_packs(packs, accum, step)
        step_packs = [item.pack for item in step_items]
        for k, item in enumerate(step_items):
            batch = item.batch
            tensors = {name: t.to(device) for name, t in item.tensors.items()}
            sync = k == accum - 1 or strategy == "fsdp"
            ctx_sync = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _nullcontext()
            with ctx_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**tensors)
                text = out["text_loss"].sum() / max(1, out["text_loss"].numel())
                image = out["image_loss"].sum() / max(1, out["image_loss"].numel())
                loss = (cfg["text_loss_weight"] * text + cfg["image_loss_weight"] * image) / accum
            loss.backward()
            with torch.no_grad():
                for kind, col in (("text", 0), ("image", 2)):
                    losses, modes = out[f"{kind}_loss"].detach().double().cpu(), out[f"{kind}_mode"].cpu()
                    stats[:, col].index_add_(0, modes, losses)
                    stats[:, col + 1].index_add_(0, modes, torch.ones_like(losses))
            tokens_seen += batch.num_tokens
        if cfg["max_grad_norm"]:
            if hasattr(model, "clip_grad_norm_"):
                model.clip_grad_norm_(cfg["max_grad_norm"])
            else:
                torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in unwrapped.named_parameters():
                    if n in ema:
                        ema[n].lerp_(p.detach(), 1 - cfg["ema"]["decay"])
        done = step + 1
        log.step_records(
            done, [{"pack": p.index, "ids": [e.id for e in p.entries], "tokens": p.tokens} for p in step_packs]
        )
        last = done == stage["steps"]
        if done % cfg["log_every"] == 0 or last:
            reduced = stats.clone()
            counts = torch.tensor([tokens_seen], dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(reduced)
                dist.all_reduce(counts)
            elapsed = time.perf_counter() - t0
            metrics = _metrics(reduced, scheduler.get_last_lr()[0], counts.item() / max(elapsed, 1e-9))
            log.scalars(done, metrics)
            stats.zero_()
            tokens_seen, t0 = 0, time.perf_counter()
        if done % cfg["checkpoint_every"] == 0 or last:
            model_sd = get_model_state_dict(model, options=full)
            optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
            with tempfile.TemporaryDirectory(prefix="irgl-ckpt-") as tmp:
                checkpoint = None
                if rank == 0:
                    torch.save(model_sd, Path(tmp) / "model.pt")
                    torch.save(optim_sd, Path(tmp) / "optimizer.pt")
                    if ema is not None:
                        torch.save({k: v.cpu() for k, v in ema.items()}, Path(tmp) / "ema.pt")
                    state = {"step": done, "stage": stage_name, "scheduler": scheduler.state_dict()}
                    (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(
                    {"step": done, "stage": stage_name},
                    checkpoint=checkpoint,
                    checkpoint_dir_name=f"step-{done:08d}",
                )
            if cfg.get("fail_after_step") == done:
                log.close()
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a hard kill, no clean-up
            if last:
                _export(adapter, model_sd, ema, stage_dir, rank, cfg, done)
    loader.close()
    log.close()
    if dist.is_initialized():
        dist.barrier()


def _export(
    adapter: Any,
    model_sd: dict[str, Any],
    ema: dict[str, Any] | None,
    stage_dir: Path,
    rank: int,
    cfg: dict[str, Any],
    step: int,
) -> None:
    """Rank 0 writes `final/` (and `final_ema/`) with save_pretrained; the marker goes last (export complete)."""
    if rank != 0:
        return
    exports = {"final": model_sd}
    if ema is not None:
        exports["final_ema"] = {**model_sd, **{k: v.cpu() for k, v in ema.items()}}
    for name, sd in exports.items():
        target = stage_dir / name
        adapter.save_pretrained(target, state_dict=sd)
        marker = {"stage": cfg["stage_name"], "steps": step, "init": cfg["init_path"], "model": cfg["model"]}
        (target / FINAL_MARKER).write_text(json.dumps(marker, sort_keys=True))


def _metrics(stats: Any, lr: float, tokens_per_s: float) -> dict[str, Any]:
    """Per-mode and overall text/image cross-entropy from the summed stats."""
    out: dict[str, Any] = {"lr": lr, "tokens_per_s": tokens_per_s}
    total = stats.sum(0)
    if total[1] > 0:
        out["text_loss"] = float(total[0] / total[1])
    if total[3] > 0:
        out["image_loss"] = float(total[2] / total[3])
    for number, name in _MODE_NAMES.items():
        row = stats[number]
        if row[1] > 0:
            out[f"text_loss/{name}"] = float(row[0] / row[1])
        if row[3] > 0:
            out[f"image_loss/{name}"] = float(row[2] / row[3])
        out[f"tokens/{name}"] = int(row[1] + row[3])
    return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
