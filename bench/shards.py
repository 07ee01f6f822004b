"""Benchmark: irgl's shard writers vs the raw libraries on the same records, measured side by side in one run.

    python bench/shards.py [--trajectories 2000] [--size 256] [--repeats 3]

Ours: ParquetShardWriter (row groups of 64, rotation, temp name + fsync + rename) and WebDatasetShardWriter
(fixed tar headers). Raw: `pyarrow.parquet.write_table` (same compression and row-group size) and
`webdataset.ShardWriter`. Both get the same precomputed mode records; the best of `--repeats` runs is kept.
Prints records/s, MB/s and the ratio ours/raw (target >= 0.8x).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/shards.py`, this folder comes first on sys.path, where bench/pipeline.py would shadow the
# package: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import webdataset as wds  # noqa: E402

from pipeline.shards import ParquetShardWriter, WebDatasetShardWriter, wds_sample_json, write_dataset  # noqa: E402
from pipeline.synthetic import synthetic_trajectories  # noqa: E402
from schemas.config import ShardConfig  # noqa: E402
from schemas.modes import MODE_RECORD_SCHEMA, MODES, mode_records  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ours_parquet(records, out: Path, cfg: ShardConfig) -> None:
    for m in MODES:
        w = ParquetShardWriter(out / m.name, "train-00000", cfg)
        for r in records[m.name]:
            w.write(r.to_row())
        w.close()


def raw_parquet(records, out: Path, cfg: ShardConfig) -> None:
    for m in MODES:
        (out / m.name).mkdir(parents=True)
        table = pa.Table.from_pylist([r.to_row() for r in records[m.name]], schema=MODE_RECORD_SCHEMA)
        path = out / m.name / "train.parquet"
        pq.write_table(table, path, row_group_size=cfg.rows_per_group, compression=cfg.parquet_compression)


def ours_wds(records, out: Path, cfg: ShardConfig) -> None:
    for m in MODES:
        w = WebDatasetShardWriter(out / m.name, f"{m.name}-00000", cfg)
        for r in records[m.name]:
            w.write(r)
        w.close()


def raw_wds(records, out: Path, cfg: ShardConfig) -> None:
    for m in MODES:
        (out / m.name).mkdir(parents=True)
        pattern = str(out / m.name / f"{m.name}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=cfg.max_rows_per_shard, verbose=0) as sink:
            for r in records[m.name]:
                sample = {"__key__": r.id, "json": wds_sample_json(r)}
                sample.update(r.image_bytes)
                sink.write(sample)


def best_of(fn, records, cfg: ShardConfig, repeats: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="irgl-bench-"))
        t0 = time.perf_counter()
        fn(records, out, cfg)
        best = min(best, time.perf_counter() - t0)
        size = dir_bytes(out)
        shutil.rmtree(out)
    return best, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    trajs = synthetic_trajectories(args.trajectories, size=args.size)
    records = {m.name: [] for m in MODES}
    for t in trajs:
        for r in mode_records(t):
            records[r.mode].append(r)
    n = sum(len(v) for v in records.values())
    cfg = ShardConfig()
    print(f"{args.trajectories} trajectories -> {n} records, {args.size}px PNG images, best of {args.repeats}")
    print(f"{'writer':28s} {'records/s':>10s} {'MB/s':>8s} {'ours/raw':>9s}")
    for label, ours, raw in (("parquet", ours_parquet, raw_parquet), ("webdataset", ours_wds, raw_wds)):
        t_ours, b_ours = best_of(ours, records, cfg, args.repeats)
        t_raw, b_raw = best_of(raw, records, cfg, args.repeats)
        print(f"{'irgl ' + label:28s} {n / t_ours:10.0f} {b_ours / t_ours / 1e6:8.1f} {t_raw / t_ours:8.2f}x")
        print(f"{'raw ' + label:28s} {n / t_raw:10.0f} {b_raw / t_raw / 1e6:8.1f}")
    # End to end, for information: assembly of the six modes (base64, validation) + both writers + manifest.
    out = Path(tempfile.mkdtemp(prefix="irgl-bench-"))
    t0 = time.perf_counter()
    write_dataset(out, trajs, cfg)
    t = time.perf_counter() - t0
    print(f"{'write_dataset (end to end)':28s} {n / t:10.0f} {dir_bytes(out) / t / 1e6:8.1f}")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
