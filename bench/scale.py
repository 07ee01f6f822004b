"""Benchmark: the work around the engines at dataset scale - what is left after the last GPU stage.

    python bench/scale.py [--sizes 2000 10000] [--unit-size 256] [--writers 1] [--noise 8] [--keep DIR]

Engine-free stages (pipeline.synthetic.synthetic_graph: PIL-drawn 1024x1024 images with noise, JPEG q95, instant
texts) run through the real build driver (`pipeline.build.build`) on a private local Ray, with the shard writers,
the manifest and card, and the report. For each size, in a child process of its own (output drained to a log):

- the build, then a rerun with nothing to do (the same command again);
- tail: seconds from the last unit's final marker (its shards written) to the manifest, and to the end of the
  build (the report included); goal <= 30 s at every size, flat;
- rerun: seconds of the rerun's `build()`, and of the whole command (interpreter and imports included); goal
  <= 10 s at 10,000;
- driver peak memory (the build's own process; Ray's workers and the unit writers are other processes): RSS,
  USS and anonymous memory, sampled; goal: flat between the sizes (within 20%). RSS and USS include the pages of
  Ray's shared-memory object store that the driver has read blocks from; anonymous memory is the driver's own;
- post-processing CPU per trajectory: the unit writers' (trajectories, rejects and marker, then the six modes'
  Parquet + WebDataset), summed from the unit markers; and the driver process's CPU (Ray's threads included).

Then, on the smallest size: `irgl verify` (images decoded) with 1 and with 2 processes, each timed in full; the
process pool's start-up (spawning 2 interpreters that import the verifier) is measured apart. Goal >= 1.8x.

Last, an extrapolation to IRGL-300K on a 32-core head node with the production preset's unit size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/scale.py`, this folder comes first on sys.path, where bench/pipeline.py would shadow the
# package: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]


def _config(n: int, unit_size: int, writers: int) -> object:
    import yaml

    from schemas.config import BuildConfig

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(
        name="scale-bench",
        prompts={"kind": "txt", "path": str(_prompt_file(n))},
        unit_size=unit_size,
        shard_writers=writers,
        images={"format": "jpeg", "jpeg_quality": 95},
    )
    data["ray"] = {**data.get("ray", {}), "preserve_order": False}
    return BuildConfig.model_validate(data)


def _prompt_file(n: int) -> Path:
    """n distinct prompts (the built-in generator has only a few thousand distinct ones)."""
    from pipeline.synthetic import COLOURS, SHAPES

    path = Path(tempfile.gettempdir()) / f"irgl-scale-prompts-{n}.txt"
    lines = [f"{2 + i % 3} {COLOURS[i % 8]} {SHAPES[i // 8 % 3]}s in a row, scene {i}" for i in range(n)]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _anonymous_mb() -> float:
    """This process's anonymous memory (heap, arrays, Python objects): RSS less file-backed and shared-memory
    pages - Ray's object store is a shared-memory file whose pages count in the RSS of every process that reads a
    block, and even in USS while only one process maps them."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _MemorySampler:
    """Peak RSS, USS and anonymous memory of this process, sampled every 0.5 s in a thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.proc = psutil.Process()
        self.peak = {"sampled_rss_mb": 0.0, "peak_uss_mb": 0.0, "shared_at_peak_rss_mb": 0.0, "peak_anon_mb": 0.0}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            info = self.proc.memory_full_info()
            if info.rss / 2**20 > self.peak["sampled_rss_mb"]:
                self.peak["sampled_rss_mb"] = info.rss / 2**20
                self.peak["shared_at_peak_rss_mb"] = info.shared / 2**20
            self.peak["peak_uss_mb"] = max(self.peak["peak_uss_mb"], info.uss / 2**20)
            self.peak["peak_anon_mb"] = max(self.peak["peak_anon_mb"], _anonymous_mb())
            time.sleep(0.5)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        return self.peak


def child(args: argparse.Namespace) -> None:
    """One build (or rerun) in this process; prints one JSON line of measurements."""
    from pipeline.build import build
    from pipeline.synthetic import synthetic_graph

    cfg = _config(args.n, args.unit_size, args.writers)
    out = Path(args.out)
    memory = _MemorySampler()
    started = time.perf_counter()
    result = build(cfg, out, executor="ray", address="local", graph=synthetic_graph(cfg, noise=args.noise),
                   log_dir=out.parent / f"{out.name}-logs")  # fmt: skip
    ended = time.time()
    markers = [json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("unit-*.json"))]
    last_marker = max(p.stat().st_mtime for p in (out / "state" / "units").glob("unit-*.json"))
    print(json.dumps({
        "trajectories": result.trajectories,
        "units_run": result.units_run,
        "build_seconds": time.perf_counter() - started,
        "tail_to_manifest": (out / "manifest.json").stat().st_mtime - last_marker,
        "tail_to_end": ended - last_marker,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **memory.stop(),
        "driver_cpu": time.process_time(),  # all of this process (Ray's threads included)
        "unit_cpu": sum(m.get("cpu_seconds", 0.0) for m in markers),
        "writer_cpu": sum((m.get("shards") or {}).get("cpu_seconds", 0.0) for m in markers),
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "shard_bytes": sum(p.stat().st_size for d in ("data", "wds") for p in (out / d).rglob("*") if p.is_file()),
    }), flush=True)  # fmt: skip


def _run_child(n: int, out: Path, args: argparse.Namespace, log: Path) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--out", str(out), "--unit-size",
           str(args.unit_size), "--writers", str(args.writers), "--noise", str(args.noise)]  # fmt: skip
    started = time.perf_counter()
    with open(log, "ab") as sink:  # the child's output goes to a file: nothing to drain, nothing to block on
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sink, check=False, env={**os.environ})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"child build of {n} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), wall


def _pool_start(jobs: int) -> float:
    """Seconds to spawn `jobs` processes that import the verifier and answer once (verify's fixed cost)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_import_verifier, range(jobs)))
    return time.perf_counter() - started


def _import_verifier(_: int) -> bool:
    import pipeline.verify  # noqa: F401

    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--unit-size", type=int, default=256, help="the production preset's")
    parser.add_argument("--writers", type=int, default=1, help="shard-writer processes (this machine: 2 cores)")
    parser.add_argument("--noise", type=int, default=8, help="image noise amplitude (8: ~320 KB per JPEG)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the datasets here (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="irgl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    print(f"bench/scale.py: sizes {args.sizes}, unit size {args.unit_size}, {args.writers} shard writer(s), "
          f"{os.cpu_count()} CPUs; work dir {work}; children's output: {log}", flush=True)  # fmt: skip
    rows = []
    verify_at = min(args.sizes)
    verify_result = None
    for n in sorted(args.sizes):
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        first, first_wall = _run_child(n, out, args, log)
        rerun, rerun_wall = _run_child(n, out, args, log)
        assert rerun["units_run"] == 0 and rerun["trajectories"] == first["trajectories"] == n, (first, rerun)
        rows.append((n, first, first_wall, rerun, rerun_wall))
        print(f"  {n}: build {first_wall:.0f} s, rerun {rerun_wall:.1f} s", flush=True)
        if n == verify_at:
            verify_result = _verify_bench(out, n)
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)  # 10,000 trajectories of 1024 px JPEG take tens of GB
    _report(rows, verify_result, args)


def _verify_bench(out: Path, n: int) -> dict:
    from pipeline.verify import verify

    start1 = _pool_start(1)
    start2 = _pool_start(2)
    t = time.perf_counter()
    one = verify(out, jobs=1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    two = verify(out, jobs=2)
    t2 = time.perf_counter() - t
    assert one == two == [], (one[:3], two[:3])
    return {"n": n, "t1": t1, "t2": t2, "start1": start1, "start2": start2}


def _report(rows: list, v: dict | None, args: argparse.Namespace) -> None:
    print("\nsize    build s  tail->manifest s  tail->end s  rerun build() s  rerun cmd s  driver MB: RSS / USS / "
          "anonymous   unit writers' CPU ms/traj (unit files + shards)  MB/traj")  # fmt: skip
    for _, first, wall, rerun, rerun_wall in rows:
        n = first["trajectories"]
        per = (first["unit_cpu"] + first["writer_cpu"]) / n * 1000
        print(
            f"{n:<7d} {wall:7.0f}  {first['tail_to_manifest']:16.1f}  {first['tail_to_end']:11.1f}  "
            f"{rerun['build_seconds']:15.1f}  {rerun_wall:11.1f}  {first['peak_rss_mb']:9.0f} / "
            f"{first['peak_uss_mb']:4.0f} / {first['peak_anon_mb']:4.0f}      {per:8.1f} "
            f"({first['unit_cpu'] / n * 1000:.1f} + {first['writer_cpu'] / n * 1000:.1f}){'':26s}"
            f"{first['bytes'] / n / 1e6:6.2f}"
        )
    small, large = rows[0], rows[-1]
    rss_ratio = large[1]["peak_rss_mb"] / small[1]["peak_rss_mb"]
    anon_ratio = large[1]["peak_anon_mb"] / small[1]["peak_anon_mb"]
    tails = [r[1]["tail_to_end"] for r in rows]
    print(f"\ntail (last marker -> end of build): max {max(tails):.1f} s (goal <= 30 s, flat)")
    print(f"rerun with nothing to do at {large[0]}: {large[3]['build_seconds']:.1f} s in build(), "
          f"{large[4]:.1f} s for the whole command (goal <= 10 s)")  # fmt: skip
    print(f"driver peak memory {large[0]} / {small[0]}: anonymous {anon_ratio:.2f}x, RSS {rss_ratio:.2f}x (goal <= "
          "1.20x; RSS includes the pages of Ray's shared object store that the driver read blocks from)")  # fmt: skip
    if v:
        print(f"verify of {v['n']} (images decoded): 1 process {v['t1']:.1f} s, 2 processes {v['t2']:.1f} s -> "
              f"{v['t1'] / v['t2']:.2f}x (goal >= 1.8x); pool start-up {v['start1']:.1f} s (1) / "
              f"{v['start2']:.1f} s (2), part of both totals")  # fmt: skip

    # Extrapolation to 300K on a 32-core head node, unit size 256, 8 unit writers (the production preset).
    target, cores, unit, writers = 300_000, 32, 256, 8
    first = large[1]
    n = first["trajectories"]
    writer_cpu = (first["writer_cpu"] + first["unit_cpu"]) / n
    driver_cpu = first["driver_cpu"] / n
    units_small, units_large = -(-small[0] // args.unit_size), -(-large[0] // args.unit_size)
    slope = (large[1]["tail_to_end"] - small[1]["tail_to_end"]) / max(units_large - units_small, 1)
    tail_300k = large[1]["tail_to_end"] + max(slope, 0.0) * (-(-target // unit) - units_large)
    last_unit = unit * writer_cpu
    print(f"\nextrapolation to {target:,} trajectories ({first['bytes'] / n / 1e6:.1f} MB written per trajectory "
          f"here; unit size {unit}, {writers} unit writers, {cores}-core head node):")  # fmt: skip
    print(f"  during the build: the driver process spends {driver_cpu * 1000:.1f} ms (Ray's threads included) and "
          f"the unit writers {writer_cpu * 1000:.1f} ms of CPU per trajectory; {writers} writers keep up with "
          f"{writers / writer_cpu * 3600:,.0f} trajectories/hour (the production plan makes ~34,000/hour)")  # fmt: skip
    print(f"  after the last GPU stage: the last unit {last_unit:.0f} s + the tail {tail_300k:.0f} s "
          f"(measured tail + {max(slope, 0.0):.2f} s per extra unit)")  # fmt: skip
    total = last_unit + tail_300k
    if v:
        per_traj = v["t1"] / v["n"]
        eff = v["t1"] / v["t2"] / 2
        verify_300k = per_traj * target / (cores * eff)
        total += verify_300k
        print(f"  irgl verify --jobs {cores}: {per_traj * 1000:.0f} ms per trajectory in one process, "
              f"{eff:.0%} parallel efficiency at 2 -> {verify_300k / 60:.0f} min")  # fmt: skip
    print(f"  total after the last GPU stage (verify included): {total / 60:.0f} min (goal <= 60 min)")


if __name__ == "__main__":
    main()
