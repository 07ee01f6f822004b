"""Benchmark: `irgl build` on Ray Data vs the same stage objects called sequentially in one process.

    python bench/pipeline.py [--prompts 64] [--skip-vllm]

1. Pipeline: the tiny preset on N generated prompts through `pipeline.build.build(executor="ray")` (fresh OUT),
   then through `executor="local"` (plain loop: the same stage classes, one after the other, in this process).
   Each run is a child process in its own session, its output written to a file as it comes (so any number of
   prompts works). Prints wall times and their ratio ray/sequential (goal <= 0.8x: pipelining must beat its
   overhead), and each run's peak memory: PSS summed over every process of its session (the build, local Ray, all
   workers), sampled every 0.2 s (goal <= 8 GB).
2. vLLM stage vs bare vLLM: ThinkStage on one VLLMTextEngine over the same N prompts vs `LLM.chat` called
   directly on that engine's `vllm.LLM` with the same sampling parameters (goal >= 0.95x).
Engine start-up is part of both pipeline runs (both start the same engines).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/pipeline.py`, this file's folder comes first on sys.path and `import pipeline` would find
# this script instead of the package: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def session_pss(sid: int) -> int:
    """Proportional set size (PSS) summed over every process in session `sid`: the build, its local Ray and all
    Ray workers. PSS splits shared pages (torch libraries mapped by every worker) between their users, so the sum
    is the memory the session really holds; a sum of RSS would count those pages once per process."""
    import psutil

    total = 0
    for q in psutil.process_iter():
        try:
            if os.getsid(q.pid) == sid:
                total += q.memory_full_info().pss
        except (psutil.Error, ProcessLookupError):
            pass
    return total


def run_one(executor: str, n: int, out: str) -> None:
    """Child process: one build with `executor`; prints its wall time and trajectory count."""
    import yaml

    from pipeline.build import build
    from schemas.config import BuildConfig

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["prompts"] = {"kind": "generator", "generator_count": n, "generator_seed": 1}
    cfg = BuildConfig.model_validate(data)
    t0 = time.perf_counter()
    result = build(cfg, Path(out), executor=executor)
    print(f"RESULT {time.perf_counter() - t0:.2f} {result.stage_counts['assemble']['ok']}", flush=True)


def bench_pipeline(n: int) -> None:
    """Each executor in its own process session; peak PSS summed over the session, sampled every 0.2 s."""
    import subprocess

    times, peaks = {}, {}
    for executor in ("ray", "local"):
        work = Path(tempfile.mkdtemp(prefix=f"irgl-bench-{executor}-"))
        out, log = work / "out", work / "child.log"
        cmd = [sys.executable, __file__, "--run-one", executor, "--prompts", str(n), "--out", str(out)]
        # The child's output goes straight to a file: the OS drains it however much the build logs (a pipe read
        # only after the child exits fills up at a few hundred prompts, and then both processes wait forever).
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, session_pss(proc.pid))
                time.sleep(0.2)
        text = log.read_text(errors="replace")
        line = [x for x in text.splitlines() if x.startswith("RESULT")]
        assert proc.returncode == 0 and line, f"{executor} build failed (exit {proc.returncode}):\n{text[-3000:]}"
        wall, ok = line[0].split()[1:]
        times[executor], peaks[executor] = float(wall), peak
        print(f"{executor:6s} {float(wall):8.1f} s  {ok} trajectories  peak PSS {peak / 2**30:.2f} GiB")
        shutil.rmtree(work)
    print(f"pipeline ray/sequential wall time: {times['ray'] / times['local']:.2f}x (goal <= 0.8x)")
    print(f"peak PSS: ray {peaks['ray'] / 2**30:.2f} GiB, sequential {peaks['local'] / 2**30:.2f} GiB (goal <= 8)")


def bench_vllm_stage(n: int) -> None:
    import yaml

    from schemas.config import BuildConfig
    from schemas.reflection import think_regex
    from stages.engines.text import VLLMTextEngine
    from stages.prompts import generate_prompts
    from stages.think import ThinkStage, think_instruction
    from stages.tiny import resolve_text

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg = BuildConfig.model_validate(data).think.model
    engine = VLLMTextEngine(resolve_text(cfg))
    engine.setup()
    prompts = generate_prompts(n, seed=1)
    batch = {
        "id": [f"p{i}" for i in range(n)], "prompt": prompts, "seed": list(range(n)), "status": ["ok"] * n,
        "stage": [None] * n, "error": [None] * n, "t1": [None] * n, "timings": ["{}"] * n, "models": ["{}"] * n,
    }  # fmt: skip
    stage = ThinkStage(cfg, engine=engine)
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from schemas.work import stage_seed

    regex = think_regex(cfg.max_section_chars)
    messages = [[{"role": "user", "content": think_instruction(p, cfg.max_section_chars)}] for p in prompts]
    structured = StructuredOutputsParams(regex=regex)
    params = [
        SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                       seed=stage_seed(s, "think"), structured_outputs=structured)
        for s in range(n)
    ]  # fmt: skip
    engine._llm.chat(messages[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up (grammar compile)
    best_stage = best_bare = float("inf")
    for rep in range(6):
        # Alternate which side runs first: the second run of a pair finds the prompts in vLLM's prefix cache.
        for side in ("stage", "bare") if rep % 2 == 0 else ("bare", "stage"):
            t0 = time.perf_counter()
            if side == "stage":
                b = {k: list(v) for k, v in batch.items()}
                stage(b)
                best_stage = min(best_stage, time.perf_counter() - t0)
            else:
                outs = engine._llm.chat(messages, sampling_params=params, use_tqdm=False)
                best_bare = min(best_bare, time.perf_counter() - t0)
    assert b["t1"] == [o.outputs[0].text.strip() for o in outs], "stage and bare vLLM must produce the same text"
    print(f"vLLM think stage {best_stage:.2f} s vs bare LLM.chat {best_bare:.2f} s on {n} prompts "
          f"(best of 6, alternating): throughput ratio {best_bare / best_stage:.2f}x (goal >= 0.95x)")  # fmt: skip
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--run-one", choices=["ray", "local"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        run_one(args.run_one, args.prompts, args.out)
        return
    if not args.skip_vllm:
        bench_vllm_stage(args.prompts)
    if not args.skip_pipeline:
        bench_pipeline(args.prompts)


if __name__ == "__main__":
    main()
