"""Benchmark: tokens/s of the irgl trainer on Ray Train vs a plain single-process PyTorch loop.

Same tiny Janus, same synthetic dataset, same packed sequences (condition dropout off; with one worker the two
sides train exactly the same tokens), same optimiser, on this machine's CPUs. Both sides
are measured the same way: total tokens of all steps / total time of all steps (every step counted, the first
ones too). Fixed costs are reported apart: start-up (plain: model load, index, optimiser; irgl: from the train()
call to the first step, i.e. Ray Train's worker group, model load and index on both driver and workers) and, for
irgl, the final checkpoint and the export, which a run pays once whatever its length. Target: ratio >= 0.9x.

    python bench/trainer.py [--trajectories 16] [--steps 60] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml"


def plain_loop(data: Path, model_path: str, steps: int, budget: int, threads: int) -> dict[str, float]:
    """The baseline: one process, no Ray, no DDP; the same data order, packing and optimiser step."""
    import torch

    from trainer.batch import collate
    from trainer.config import load_train_config
    from trainer.index import build_index
    from trainer.model import load_adapter
    from trainer.order import DataOrder, worker_packs
    from trainer.shards import RecordReader

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapter = load_adapter("janus", model_path)
    adapter.freeze(vision=False)
    fmt = adapter.sequence_format()
    # The stage-1 mixture of the tiny preset, in the config's order, as the training loop takes it.
    weights = {m: w for m, w in load_train_config(TINY).stage1.modes.items() if w > 0}
    index = build_index(data, list(weights), fmt, budget)
    reader = RecordReader(fmt)
    model = adapter.module
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    packs = worker_packs(index, DataOrder(weights, budget, seed=0, stage="1"), rank=0)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        _, (pack,) = next(packs)
        batch = collate([reader.read(e) for e in pack.entries])
        out = model(**adapter.batch_tensors(batch))
        loss = out["text_loss"].mean() + (out["image_loss"].mean() if out["image_loss"].numel() else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    end = time.perf_counter()
    return {"startup_s": t0 - t_start, "train_s": end - t0, "tokens": tokens}


def ray_trainer(
    data: Path, out: Path, steps: int, budget: int, workers: int, threads: int, loader_workers: int | None
) -> dict[str, float]:
    """The irgl trainer (stage 1) on Ray Train; tokens and step time from the end event of its metrics log."""
    import ray

    from schemas.local import driver_env
    from trainer.config import load_train_config
    from trainer.train import train

    cfg = load_train_config(
        TINY,
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
            # The plain loop applies no condition dropout: off here too, so both sides train the same packs.
            "condition_dropout.text": 0.0,
            "condition_dropout.generation_image": 0.0,
            "condition_dropout.understanding_image": 0.0,
            **({} if loader_workers is None else {"loader_workers": loader_workers}),
        },
    )
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": driver_env()})
    t_call = time.time()
    train(cfg, data, stage="1")
    wall = time.time() - t_call
    rows = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    end = next(r for r in rows if r.get("event") == "end")
    return {
        "startup_s": start["t"] - t_call,
        "train_s": end["train_s"],
        "tokens": end["tokens"],
        "checkpoint_s": end["checkpoint_s"],
        "export_s": end["export_s"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (each gets --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--loader-workers", type=int, default=None, help="irgl's loader processes per worker (default: the config's)"
    )
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
        ours = ray_trainer(
            data, Path(tmp) / "train", args.steps, args.budget, args.workers, args.threads, args.loader_workers
        )
    if args.workers == 1 and plain["tokens"] != ours["tokens"]:
        print(f"warning: the two sides trained different tokens ({plain['tokens']} vs {ours['tokens']})")
    plain_rate = plain["tokens"] / plain["train_s"]
    ours_rate = ours["tokens"] / ours["train_s"]
    print(
        f"plain PyTorch loop (1 process, {args.threads * args.workers} threads): {plain_rate:10.0f} tokens/s "
        f"({plain['tokens']} tokens in {plain['train_s']:.1f} s; start-up {plain['startup_s']:.1f} s)"
    )
    print(
        f"irgl trainer on Ray Train ({args.workers} worker(s) x {args.threads} thread(s)): {ours_rate:10.0f} tokens/s "
        f"({ours['tokens']} tokens in {ours['train_s']:.1f} s; start-up {ours['startup_s']:.1f} s, final checkpoint "
        f"{ours['checkpoint_s']:.1f} s, export {ours['export_s']:.1f} s, train() wall {ours['wall_s']:.1f} s)"
    )
    print(f"ratio irgl / plain: {ours_rate / plain_rate:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
