"""Benchmark: the trainer's data path, side by side in one run (total work / total time, start-up apart).

    python bench/train_data.py [--trajectories 2000] [--size 256] [--rounds 2] [--steps 60]

1. Reader: records/s of the training reader (`PackLoader`: block-shuffled streams, mixing, packing, collation;
   in this process and with 1 and 2 loader processes) vs a raw sequential pyarrow scan of the same Parquet shards
   with the same decoding per record (JSON with image contents split out, base64 -> bytes, tokenize into
   segments), and vs the same scan that also packs records in file order and collates them (the reader's output
   without its shuffle, mixing and dropout). All run `--rounds` times in rotated order; start-up (loader processes
   forked, first pack) is timed apart. Goal: reader / raw >= 0.8x.
2. Data wait: the share of step time a CPU training loop (tiny Janus, 1 thread, AdamW) spends waiting for the
   loader, which prepares images in its processes (goal < 5%).
3. Index: build time per 10,000 records with 1 and 2 processes: the per-file work of `cached_index` in this process
   and in a pool of 2 whose processes have all started before the clock starts (start-up apart: loading the
   tokenizer; spawning the pool), alternating; then one end-to-end `cached_index` build with 2 processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/train_data.py`, this folder comes first on sys.path, where bench/pipeline.py would shadow
# the package: take the folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

STAGE1 = None  # filled in main (needs schemas)


def raw_scan(data: Path, fmt: object, modes: list[str], budget: int | None = None) -> int:
    """Sequential pyarrow scan of every shard of `modes`, decoding each record as the reader does; with `budget`,
    also packing the records greedily in file order and collating each pack, as the reader does."""
    import pyarrow.parquet as pq

    from trainer.batch import collate
    from trainer.records import encode_conversation
    from trainer.shards import mode_files, parse_parquet_conversation

    n = 0
    pack: list = []
    used = 0
    for mode in modes:
        for path in mode_files(data, mode, "parquet"):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["id", "conversation"]):
                for rid, conversation in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    turns, resolve = parse_parquet_conversation(conversation, check=False)
                    rec = encode_conversation(turns, fmt, record_id=rid, mode=mode, resolve=resolve)
                    n += 1
                    if budget is not None:
                        if pack and used + rec.length > budget:
                            collate(pack)
                            pack, used = [], 0
                        pack.append(rec)
                        used += rec.length
    if pack:
        collate(pack)
    return n


def reader_run(index: object, fmt: object, records: int, workers: int, budget: int) -> tuple[float, float, int]:
    """(start-up s, steady s, records) of PackLoader reading at least `records` records after its first pack."""
    from trainer.dropout import ConditionDropout
    from trainer.loader import PackDataset, PackLoader
    from trainer.order import DataOrder

    order = DataOrder(STAGE1, budget, seed=0, stage="1", streams=2)
    ds = PackDataset(index, fmt, order, rank=0, dropout=ConditionDropout(text=0.1, gen_image=0.3))
    t0 = time.perf_counter()
    with PackLoader(ds, workers=workers, prefetch=4) as loader:
        it = iter(loader)
        next(it)
        t1 = time.perf_counter()
        n = 0
        while n < records:
            n += len(next(it).pack.entries)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, n


def data_wait(index: object, model_path: str, steps: int, workers: int, budget: int) -> dict[str, float]:
    """A CPU training loop on the loader: seconds waiting for packs vs total step seconds (after 5 warm-up steps)."""
    import torch

    from trainer.dropout import ConditionDropout
    from trainer.index import janus_sequence_format
    from trainer.loader import PackDataset, PackLoader, steps_packs
    from trainer.model import load_adapter
    from trainer.order import DataOrder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    adapter = load_adapter("janus", model_path)
    adapter.freeze(vision=False)
    fmt = janus_sequence_format(model_path)
    model = adapter.module
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    order = DataOrder(STAGE1, budget, seed=0, stage="1", streams=2)
    ds = PackDataset(
        index, fmt, order, rank=0, dropout=ConditionDropout(text=0.1, gen_image=0.3), prepare=adapter.batch_tensors
    )
    warmup = 5
    wait = total = 0.0
    tokens = 0
    t_start = time.perf_counter()
    with PackLoader(ds, workers=workers, prefetch=2) as loader:
        packs = iter(loader)
        startup = 0.0
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            (item,) = steps_packs(packs, 1, step)
            t1 = time.perf_counter()
            if step == 0:
                startup = t1 - t_start
            out = model(**item.tensors)
            loss = out["text_loss"].mean() + (out["image_loss"].mean() if out["image_loss"].numel() else 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if step >= warmup:
                wait += t1 - t0
                total += t2 - t0
                tokens += item.batch.num_tokens
    return {"wait_s": wait, "step_s": total, "share": wait / total, "tokens_per_s": tokens / total, "startup": startup}


def _ready(source: object, barrier: object) -> None:
    from trainer.index import _start_process

    _start_process(source)
    barrier.wait(timeout=300)  # every process is up (imports, tokenizer) before any file is indexed


def _noop() -> None:
    return None


def index_runs(
    data: Path, modes: list[str], model_path: str, budget: int, tmp: Path, rounds: int
) -> list[dict[str, float]]:
    """The index's per-file work (`_index_task`, what cached_index runs) with 1 process (here) and 2 (a spawned pool
    whose processes all finished starting before the clock starts), alternating, `rounds` times each (totals).
    Start-up apart: loading the tokenizer here; spawning the pool (imports, tokenizer). Then one end-to-end
    `cached_index` build with 2 processes, start-up included."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from trainer.index import FormatSource, _index_task, cached_index, janus_sequence_format
    from trainer.shards import mode_files

    source = FormatSource("janus", model_path)
    tasks = [(str(f), m, "parquet", source, budget) for m in modes for f in mode_files(data, m, "parquet")]
    rows = {jobs: {"jobs": jobs, "records": 0, "work_s": 0.0, "startup_s": 0.0} for jobs in (1, 2)}
    for r in range(rounds):
        for jobs in (1, 2) if r % 2 == 0 else (2, 1):
            t0 = time.perf_counter()
            if jobs == 1:
                fmt = janus_sequence_format(model_path)
                t1 = time.perf_counter()
                results = [_index_task((p, m, d, fmt, b)) for p, m, d, _, b in tasks]
            else:
                ctx = multiprocessing.get_context("spawn")
                barrier = ctx.Barrier(jobs)
                with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_ready, initargs=(source, barrier)) as pool:
                    for f in [pool.submit(_noop) for _ in range(jobs)]:  # one per process (spawned on demand)
                        f.result(timeout=300)
                    t1 = time.perf_counter()
                    results = list(pool.map(_index_task, tasks, chunksize=1))
            t2 = time.perf_counter()
            row = rows[jobs]
            row["records"] += sum(len(e) + len(s) for e, s, _ in results)
            row["startup_s"] += t1 - t0
            row["work_s"] += t2 - t1
    end_to_end = cached_index(data, modes, source, budget, "parquet", tmp / "index-e2e", jobs=2)
    out = list(rows.values())
    out.append({"jobs": 2, "end_to_end_s": end_to_end.seconds, "startup_s": end_to_end.startup_s})
    return out


def records_total(data: Path, modes: list[str]) -> int:
    import pyarrow.parquet as pq

    from trainer.shards import mode_files

    return sum(pq.ParquetFile(f).metadata.num_rows for m in modes for f in mode_files(data, m, "parquet"))


def main() -> None:
    global STAGE1
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (PNG)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="training steps of the data-wait run")
    parser.add_argument("--budget", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories
    from schemas.modes import MODES
    from trainer.index import build_index, janus_sequence_format
    from trainer.tiny_janus import resolve_model

    STAGE1 = {m.name: (1.0 if m.full else 0.5) for m in MODES}
    modes = list(STAGE1)
    model_path = resolve_model("tiny:janus")
    fmt = janus_sequence_format(model_path)
    with tempfile.TemporaryDirectory(prefix="irgl-bench-train-data-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "ds"
        t0 = time.perf_counter()
        write_dataset(data, synthetic_trajectories(args.trajectories, size=args.size), unit_size=500)
        size_mb = sum(p.stat().st_size for p in (data / "data").rglob("*.parquet")) / 1e6
        print(f"dataset: {args.trajectories} trajectories, {size_mb:.0f} MB of Parquet, "
              f"written in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

        # 3. Index (first: the shards are as fresh in the page cache for both).
        *runs, e2e = index_runs(data, modes, model_path, args.budget, tmp, args.rounds)
        for row in runs:
            print(f"index, {row['jobs']} process(es): {row['records']} records in {row['work_s']:.1f} s "
                  f"= {row['work_s'] / row['records'] * 10_000:.1f} s per 10,000 records "
                  f"(start-up apart: {row['startup_s'] / args.rounds:.1f} s per build)", flush=True)  # fmt: skip
        n_all = records_total(data, modes)
        print(f"index end to end (cached_index, 2 processes, {n_all} records): {e2e['end_to_end_s']:.1f} s, "
              f"{e2e['startup_s']:.1f} s of it until the first file", flush=True)  # fmt: skip
        index = build_index(data, modes, fmt, args.budget)
        records = sum(index.counts().values())

        # 1. Reader vs raw scan, rotated order, totals over rounds.
        totals: dict[str, list[float]] = {}
        paths = ["raw", "raw+collate", "reader 0", "reader 1", "reader 2"]
        for r in range(args.rounds):
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            for path in order:
                if path.startswith("raw"):
                    t = time.perf_counter()
                    n = raw_scan(data, fmt, modes, args.budget if path == "raw+collate" else None)
                    start, steady = 0.0, time.perf_counter() - t
                else:
                    start, steady, n = reader_run(index, fmt, records, int(path.split()[1]), args.budget)
                acc = totals.setdefault(path, [0.0, 0.0, 0])
                acc[0] += start
                acc[1] += steady
                acc[2] += n
        raw_rate = totals["raw"][2] / totals["raw"][1]
        collate_rate = totals["raw+collate"][2] / totals["raw+collate"][1]
        print(f"reader ({records} records per pass, {args.rounds} rounds, rotated order):")
        for path in paths:
            start, steady, n = totals[path]
            rate = n / steady
            label = {"raw": "raw sequential pyarrow scan, same decoding",
                     "raw+collate": "the same, packed in file order and collated",
                     "reader 0": "PackLoader in this process", "reader 1": "PackLoader, 1 loader process",
                     "reader 2": "PackLoader, 2 loader processes"}[path]  # fmt: skip
            extra = f", start-up {start / args.rounds:.2f} s per run" if not path.startswith("raw") else ""
            vs = f" ({rate / collate_rate:4.2f}x of raw+collate)" if path.startswith("reader") else ""
            print(f"  {label:45s} {rate:8.0f} records/s  {rate / raw_rate:5.2f}x{vs}{extra}", flush=True)

        # 2. Data wait in a CPU training loop.
        for workers in (1, 2):
            w = data_wait(index, model_path, args.steps, workers, args.budget)
            print(f"data wait, {workers} loader process(es): {w['wait_s']:.2f} s of {w['step_s']:.1f} s "
                  f"= {100 * w['share']:.1f}% of step time ({w['tokens_per_s']:.0f} tokens/s, "
                  f"start-up to the first pack {w['startup']:.1f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
