"""The per-worker training loop that Ray Train runs (one process per worker): one IRGL stage.

Everything a worker needs arrives in `train_loop_config` (plain data); the loop loads the model through its
adapter in float32, wraps it for DDP or FSDP2 (bf16 compute, float32 master weights: see trainer/optim.py),
regenerates the deterministic pack stream from its step, and trains. Checkpoints are torch.distributed.checkpoint
(DCP) folders: each rank writes only its own shards (FSDP) or one copy of the replicated tensors is written
(DDP), and each rank reads back only what it holds. After the last step every rank takes part in the export
(rank 0 writes it), also when a run resumes from the final checkpoint because the export was interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.modes import MODES

STATE_FILE = "irgl_state.json"
FINAL_MARKER = "irgl_train.json"
CHECKPOINT_FORMAT = "dcp-1"
_MODE_NAMES = {m.index: m.name for m in MODES}


def read_state(path: str | Path | None) -> dict[str, Any] | None:
    """The state file of a checkpoint folder when the checkpoint is complete (state written, every shard file
    it lists present), else None. Folders of another checkpoint format count as incomplete."""
    if not path:
        return None
    folder = Path(path)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        return None
    if not all((folder / name).is_file() for name in [".metadata", *state["files"]]):
        return None
    return state


def _checkpoint_step(path: str | None) -> int:
    state = read_state(path)
    return state["step"] if state is not None else -1


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

    def event(self, records: bool = True, **data: Any) -> None:
        for fh in (self.records if records else None, self.metrics):
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
    from ray.train.torch import get_device
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from trainer.dropout import ConditionDropout
    from trainer.loader import PackDataset, PackLoader, steps_packs
    from trainer.model import load_adapter
    from trainer.optim import Ema, compute_dtype, make_optimizer
    from trainer.order import DataOrder

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stage_name, stage = cfg["stage_name"], cfg["stage"]
    stage_dir = Path(cfg["stage_dir"])
    torch.set_num_threads(cfg["ray"]["threads_per_worker"])
    torch.manual_seed(cfg["seed"])
    device = get_device()
    dtype = compute_dtype(cfg["precision"], device.type)

    adapter = load_adapter(cfg["adapter"], cfg["init_path"])
    adapter.freeze(vision=cfg["freeze_vision"])
    if cfg["gradient_checkpointing"]:
        adapter.module.janus.model.language_model.gradient_checkpointing_enable()
    from trainer.index import tokenizer_format

    fmt = tokenizer_format(cfg["adapter"], cfg["init_path"])  # the adapter's format plus the pad id (CFG dropout)

    strategy = cfg["ray"]["strategy"]
    model = _wrap(adapter.module, strategy, device, dtype, world)
    unwrapped = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, stage)
    ema = Ema(unwrapped.named_parameters(), cfg["ema"]["decay"]) if cfg["ema"]["enabled"] else None

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
        start_step, ema = _load_checkpoint(Path(best), model, optimizer, scheduler, ema, unwrapped)  # type: ignore[arg-type]
    if ray_dir_ctx is not None:
        ray_dir_ctx.__exit__(None, None, None)

    log = _Logger(stage_dir, rank, cfg)
    log.event(event="start", stage=stage_name, step=start_step, rank=rank, world_size=world, t=time.time())
    weights = {m: w for m, w in stage["modes"].items() if w > 0}
    # The streaming reader: loader processes read whole blocks of this worker's streams, parse, tokenize, drop
    # conditions, collate and preprocess images ahead of the loop; packs arrive in plan order (checked per step).
    dropout = cfg["condition_dropout"]
    loader = PackLoader(
        PackDataset(
            cfg["index"],  # the cached index's path: each loader process reads it
            fmt,
            DataOrder(
                weights,
                cfg["token_budget"],
                cfg["seed"],
                stage_name,
                world_size=world,
                grad_accum=cfg["grad_accum"],
                streams=cfg["data_streams"],
                shuffle_blocks=cfg["shuffle_blocks"],
            ),
            rank=rank,
            start_step=start_step,
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
    totals = {"tokens": 0, "train_s": 0.0, "checkpoint_s": 0.0}
    run_t0 = t0 = time.perf_counter()
    accum = cfg["grad_accum"]
    model.train()
    for step in range(start_step, stage["steps"]):
        step_t0 = time.perf_counter()
        step_items = steps_packs(packs, accum, step)
        step_packs = [item.pack for item in step_items]
        outs = accumulate_gradients(
            model, [item.tensors for item in step_items], cfg, device=device, dtype=dtype, strategy=strategy
        )
        for item, out in zip(step_items, outs, strict=True):
            for kind, col in (("text", 0), ("image", 2)):
                losses, modes = out[f"{kind}_loss"].double().cpu(), out[f"{kind}_mode"].cpu()
                stats[:, col].index_add_(0, modes, losses)
                stats[:, col + 1].index_add_(0, modes, torch.ones_like(losses))
            tokens_seen += item.batch.num_tokens
            totals["tokens"] += item.batch.num_tokens
        if cfg["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        lr = scheduler.get_last_lr()[0]  # the learning rate of this step (logged as "lr" with its step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrapped.named_parameters())
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
            now = time.perf_counter()
            metrics = _metrics(reduced, lr, counts.item() / max(now - t0, 1e-9))
            log.scalars(done, metrics)
            if rank == 0:
                eta = (now - run_t0) / (done - start_step) * (stage["steps"] - done)
                _console(progress_line(stage_name, done, stage["steps"], metrics, eta))
            stats.zero_()
            tokens_seen, t0 = 0, time.perf_counter()
        totals["train_s"] += time.perf_counter() - step_t0
        if done % cfg["checkpoint_every"] == 0 or last:
            ckpt_t0 = time.perf_counter()
            _save_checkpoint(model, optimizer, scheduler, ema, rank, world, cfg, done)
            totals["checkpoint_s"] += time.perf_counter() - ckpt_t0
            if cfg.get("fail_after_step") == done:
                log.close()
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a hard kill, no clean-up
    loader.close()  # the loader processes end here (their memory is free for the export)

    # The export: after the last step, or straight away when resuming from the final checkpoint (a run that died
    # while exporting). Every rank takes part in gathering the full weights; rank 0 writes them.
    export_t0 = time.perf_counter()
    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    keep = rank == 0
    ema_sd = {n: t for n, t in ema.full_state_dict(keep=keep)} if ema is not None else None
    final_dirs = _export(adapter, model_sd, ema_sd, stage_dir, rank, cfg, stage["steps"]) if keep else []
    total = torch.tensor([totals["tokens"]], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    log.event(
        records=False,
        event="end",
        stage=stage_name,
        steps=stage["steps"] - start_step,
        tokens=int(total.item()),
        train_s=totals["train_s"],
        checkpoint_s=totals["checkpoint_s"],
        export_s=time.perf_counter() - export_t0,
        t=time.time(),
    )
    if rank == 0:
        where = ", ".join(str(d) for d in final_dirs)
        _console(f"stage {stage_name}: {stage['steps']} steps done; exported to {where}")
    log.close()
    if dist.is_initialized():
        dist.barrier()


def pack_loss(out: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """The loss of one pack: text_loss_weight x its mean text cross-entropy + image_loss_weight x its mean image
    cross-entropy (a pack without text or image targets contributes 0 for that part)."""
    text = out["text_loss"].sum() / max(1, out["text_loss"].numel())
    image = out["image_loss"].sum() / max(1, out["image_loss"].numel())
    return cfg["text_loss_weight"] * text + cfg["image_loss_weight"] * image


def accumulate_gradients(
    model: Any, packs: list[dict[str, Any]], cfg: dict[str, Any], *, device: Any, dtype: Any, strategy: str
) -> list[dict[str, Any]]:
    """Forward and backward of one optimiser step's packs (the `grad_accum` tensors dicts of this worker).

    Each pack's loss (`pack_loss`) is divided by the number of packs, so the accumulated gradient is the mean of
    the packs' gradients: grad_accum k on one worker gives the gradient k DDP workers with one pack each give (DDP
    averages over ranks), and the step's global packs are the same (trainer/order.py). Gradients are synchronised
    across workers once, on the last pack. Returns each pack's outputs, detached (per-token losses and modes).
    """
    import torch

    from trainer.optim import autocast

    outs = []
    for k, tensors in enumerate(packs):
        sync = k == len(packs) - 1
        if strategy == "fsdp":
            model.set_requires_gradient_sync(sync)  # reduce-scatter once per optimiser step
        ctx_sync = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _nullcontext()
        with ctx_sync, autocast(device.type, dtype):
            out = model(**{name: t.to(device) for name, t in tensors.items()})
            loss = pack_loss(out, cfg) / len(packs)
        loss.backward()
        with torch.no_grad():
            outs.append({key: value.detach() for key, value in out.items()})
    return outs


def _wrap(module: Any, strategy: str, device: Any, dtype: Any, world: int) -> Any:
    """DDP (float32 weights, autocast does the bf16 compute) or FSDP2 (`fully_shard` per LM decoder layer and on
    the root: float32 sharded weights, bf16 all-gathered params when computing in bf16, float32 reductions)."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    module.to(device)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
        for layer in module.janus.model.language_model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)  # frozen (VQ-VAE) and trainable parameters side by side
        return module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        kwargs: dict[str, Any] = {"find_unused_parameters": True}  # no understanding image, no image target, ...
        if device.type == "cuda":
            kwargs.update(device_ids=[device], output_device=device)
        return DistributedDataParallel(module, **kwargs)
    return module


def _save_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, ema: Any, rank: int, world: int, cfg: dict[str, Any], step: int
) -> None:
    """A DCP checkpoint reported to Ray Train: every rank writes its part into its own temporary folder and Ray
    uploads them all into `step-NNNNNNNN/`; rank 0 adds the state file (step, schedule, run facts, shard list)."""
    import ray.train
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state_dict = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state_dict["ema"] = ema.shadow
    with tempfile.TemporaryDirectory(prefix="irgl-ckpt-") as tmp:
        dcp.save(state_dict, checkpoint_id=tmp)
        checkpoint = None
        if rank == 0:
            metadata = FileSystemReader(tmp).read_metadata()
            files = sorted({info.relative_path for info in metadata.storage_data.values()})
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "stage": cfg["stage_name"],
                "scheduler": scheduler.state_dict(),
                "ema": ema is not None,
                "files": files,
                **run_facts(cfg, world),
            }
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state, sort_keys=True))
        if any(Path(tmp).iterdir()):
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {"step": step, "stage": cfg["stage_name"]}, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}"
        )


def run_facts(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint to continue the same data order (the driver checks)."""
    return {"world_size": world, "grad_accum": cfg["grad_accum"], "data_fingerprint": cfg.get("data_fingerprint")}


def _load_checkpoint(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, ema: Any, unwrapped: Any
) -> tuple[int, Any]:
    """Load a DCP checkpoint in place (each rank reads what it holds; DCP reshards for another world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from trainer.optim import Ema

    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    state_dict = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ema is not None and state["ema"]:
        state_dict["ema"] = ema.shadow
    dcp.load(state_dict, checkpoint_id=str(ckpt_dir))
    set_model_state_dict(model, state_dict["model"])
    set_optimizer_state_dict(model, optimizer, state_dict["optim"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and not state["ema"]:  # EMA switched on for a run whose checkpoint has none: start it here
        ema = Ema(unwrapped.named_parameters(), ema.decay)
    return state["step"], ema


def _console(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver's console. Not print(): Ray Train patches
    it on workers to log through its logger as well, and the driver would show every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(stage: str, done: int, total: int, metrics: dict[str, Any], eta_s: float) -> str:
    """The console line rank 0 prints every `log_every` steps."""

    def loss(key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "-"

    eta = int(round(eta_s))
    return (
        f"stage {stage} step {done}/{total} | loss text {loss('text_loss')} image {loss('image_loss')} | "
        f"{metrics['tokens_per_s']:,.0f} tokens/s | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    )


def _export(
    adapter: Any,
    model_sd: dict[str, Any],
    ema_sd: dict[str, Any] | None,
    stage_dir: Path,
    rank: int,
    cfg: dict[str, Any],
    step: int,
) -> list[Path]:
    """Rank 0 writes `final_ema/` (when kept), then `final/`, with save_pretrained; each folder's completion marker
    goes last, and `final/`'s marker (what the driver checks) after everything. Returns the folders written."""
    exports: dict[str, dict[str, Any]] = {}
    if ema_sd is not None:
        exports["final_ema"] = {**model_sd, **ema_sd}
    exports["final"] = model_sd
    written = []
    for name, sd in exports.items():
        target = stage_dir / name
        shutil.rmtree(target, ignore_errors=True)  # what an interrupted export left
        adapter.save_pretrained(target, state_dict=sd)
        if name == "final" and cfg.get("fail_during_export"):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: weights written, marker not
        marker = {"stage": cfg["stage_name"], "steps": step, "init": cfg["init_path"], "model": cfg["model"]}
        (target / FINAL_MARKER).write_text(json.dumps(marker, sort_keys=True))
        written.append(target)
    return written[::-1]


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
