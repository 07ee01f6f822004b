"""Benchmark: tokens/s of the irgl trainer on Ray Train vs a plain single-process PyTorch loop.

Same tiny Janus, same synthetic dataset, same packed sequences, same optimiser, on this machine's CPUs. The Ray
Train side is measured by the trainer itself (tokens_per_s of the steady-state log windows, so the worker start-up
and model loading are excluded, as they are from the plain loop's timing). Target: ratio >= 0.9x.

    python bench/trainer.py [--trajectories 16] [--steps 60] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(data: Path, model_path: str, steps: int, budget: int, threads: int) -> float:
    """The baseline: one process, no Ray, no DDP; the same data order, packing and optimiser step."""
    import torch

    from schemas.modes import MODES
    from trainer.data import RecordReader, build_index, collate, worker_packs
    from trainer.model import load_adapter

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapter = load_adapter("janus", model_path)
    adapter.freeze(vision=False)
    fmt = adapter.sequence_format()
    weights = {m.name: (1.0 if m.full else 0.5) for m in MODES}
    index = build_index(data, list(weights), fmt, budget)
    reader = RecordReader(fmt)
    model = adapter.module
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    packs = worker_packs(index, weights, budget, 0, "1", rank=0, world_size=1, grad_accum=1)
    warmup, tokens = 5, 0
    for step in range(steps):
        if step == warmup:
            t0, tokens = time.perf_counter(), 0
        _, (pack,) = next(packs)
        batch = collate([reader.read(e) for e in pack.entries])
        out = model(**adapter.batch_tensors(batch))
        loss = out["text_loss"].mean() + (out["image_loss"].mean() if out["image_loss"].numel() else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    return tokens / (time.perf_counter() - t0)


def ray_trainer(data: Path, out: Path, steps: int, budget: int, workers: int, threads: int) -> float:
    """The irgl trainer (stage 1) on Ray Train; steady-state tokens/s from its metrics log (first window dropped)."""
    import ray

    from trainer.config import load_train_config
    from trainer.train import train

    base = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml"
    cfg = load_train_config(
        base,
        {
            "output_dir": str(out),
            "token_budget": budget,
            "stage1.steps": steps,
            "stage1.lr": 1e-3,
            "stage1.warmup_steps": 0,
            "checkpoint_every": steps,
            "log_every": 5,
            "log_records": False,
            "ray.num_workers": workers,
            "ray.cpus_per_worker": 1.0 if workers == 1 else 0.5,
            "ray.threads_per_worker": threads,
        },
    )
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": _env()})
    train(cfg, data, stage="1")
    rows = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:-1]  # drop warm-up and checkpoint windows
    return statistics.mean(rates)


def _env() -> dict[str, str]:
    keys = ("HF_HUB_OFFLINE", "IRGL_TINY_DIR", "TOKENIZERS_PARALLELISM")
    return {k: os.environ[k] for k in keys if k in os.environ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (each gets --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `python bench/trainer.py` puts bench/ first on sys.path, where bench/pipeline.py would shadow the package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories
    from trainer.tiny_janus import resolve_model

    model_path = resolve_model("tiny:janus")
    with tempfile.TemporaryDirectory(prefix="irgl-bench-trainer-") as tmp:
        data = Path(tmp) / "ds"
        write_dataset(data, synthetic_trajectories(args.trajectories))
        plain = plain_loop(data, model_path, args.steps, args.budget, args.threads * args.workers)
        ours = ray_trainer(data, Path(tmp) / "train", args.steps, args.budget, args.workers, args.threads)
    print(f"plain PyTorch loop (1 process, {args.threads * args.workers} threads): {plain:10.0f} tokens/s")
    print(f"irgl trainer on Ray Train ({args.workers} worker(s) x {args.threads} thread(s)): {ours:10.0f} tokens/s")
    print(f"ratio irgl / plain: {ours / plain:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
