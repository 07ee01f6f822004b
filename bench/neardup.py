"""Benchmark: near-duplicate prompt search (stages/neardup.py) at 100,000 prompts, and against a brute-force all-pairs
baseline on a 10,000 subset.

    python bench/neardup.py [--rows 100000] [--subset 10000] [--threshold 0.95] [--nprobe 16] [--repeats 2]
                            [--synthetic] [--cache /tmp/irgl-neardup-emb.npy] [--embed-rows 2000] [--skip-exact]

Prompts: GenEval-like compositional prompts (stages.prompts' objects, colours, counts and positions) in eight styles
and ten scenes, drawn with a fixed seed, all distinct, and about 5% of rows that paraphrase an
earlier row (one word or phrase substituted: photo -> photograph, next to -> beside, ...). They are embedded with the
bundled all-MiniLM-L6-v2 on this machine (the embeddings are cached in --cache, keyed by the prompts' hash, so a
rerun measures the search only). --synthetic uses random unit vectors with planted near-duplicates instead (no model;
easier for the search: real prompt embeddings crowd together).

Printed:
- embedding speed (prompts/s, --embed-rows prompts, after a warm-up batch), apart from the search;
- on all rows: ivf (faiss IVF range search, the `search: auto` choice from 20,000 rows on) and exact (blocked
  all-pairs, exact; --skip-exact to leave it out): wall time, peak memory above the start, pairs found, the rows
  keep_first drops; ivf's recall of the exact pairs;
- on the subset: brute force (the full n x n similarity matrix, the naive baseline), exact (blocked) and ivf, side
  by side: wall time, peak memory, pairs, recall of the brute-force pairs (goal >= 0.99).

- on all rows, also: the pairs and dropped rows left after the compositional guard (stages/compositions.py, which
  curate_prompts applies after the search), and the guard's time.

Each search runs in a fresh Python process (the rows loaded from a temporary .npy): its best wall time of --repeats
runs, and the first run's peak memory = the largest resident set size (RSS, sampled every 5 ms by a thread) above
the RSS after loading the rows, which sees numpy's and faiss' allocations alike and no heap left over from an
earlier step.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from schemas.config import PromptDedupConfig  # noqa: E402
from stages.neardup import exact_arrays, ivf_arrays, ivf_nlist, keep_first  # noqa: E402
from stages.prompts import COLOURS, COUNT_WORDS, OBJECTS, POSITIONS, _plural  # noqa: E402

STYLES = [
    "a photo of", "a painting of", "a watercolor of", "a sketch of", "a 3D render of", "a close-up photo of",
    "an illustration of", "a cartoon of",
]  # fmt: skip
SCENES = [
    "", " on a beach", " in a kitchen", " in a forest", " on a city street", " in the snow", " at night",
    " in a desert", " on a wooden table", " under a bright sky",
]  # fmt: skip
PARAPHRASES = [
    ("a photo of", "a photograph of"), ("a painting of", "a painted picture of"), ("a sketch of", "a pencil sketch of"),
    ("a cartoon of", "a cartoon drawing of"), ("a 3D render of", "a 3D rendering of"), ("next to", "beside"),
    ("to the left of", "on the left of"), ("to the right of", "on the right of"), ("on a beach", "on the beach"),
    ("in a kitchen", "inside a kitchen"), ("at night", "at nighttime"), ("in the snow", "in snow"),
    ("on a wooden table", "on a wood table"), ("an illustration of", "an illustrated picture of"),
]  # fmt: skip


def make_prompts(rows: int, seed: int = 0, paraphrase_rate: float = 0.05) -> tuple[list[str], int]:
    """`rows` prompts, all distinct; about `paraphrase_rate` of them paraphrase an earlier one. Returns the prompts
    and the number of planted paraphrases."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    planted = 0
    while len(out) < rows:
        if out and rng.random() < paraphrase_rate:
            src = out[rng.randrange(len(out))]
            subs = [(a, b) for a, b in PARAPHRASES if a in src]
            if subs:
                a, b = rng.choice(subs)
                text = src.replace(a, b, 1)
                if text not in seen:
                    seen.add(text)
                    out.append(text)
                    planted += 1
                continue
        a, b = rng.sample(OBJECTS, 2)
        ca, cb = rng.sample(COLOURS, 2)
        n = rng.randint(1, 4)
        kind = rng.randrange(4)
        if kind == 0:
            content = f"{COUNT_WORDS[n]} {_plural(a, n)}"
        elif kind == 1:
            content = f"a {ca} {a}"
        elif kind == 2:
            content = f"a {ca} {a} and a {cb} {b}"
        else:
            content = f"a {ca} {a} {rng.choice(POSITIONS + ['next to'])} a {cb} {b}"
        text = f"{rng.choice(STYLES)} {content}{rng.choice(SCENES)}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out, planted


def synthetic(rows: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    """Random unit vectors; 5% of the rows replaced by a noisy copy of an earlier row (cosine ~0.85-0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for j in rng.choice(np.arange(1, rows), size=rows // 20, replace=False):
        v = x[rng.integers(0, j)] + rng.uniform(0.1, 0.6) * rng.standard_normal(dim, dtype=np.float32) / np.sqrt(dim)
        x[j] = v / np.linalg.norm(v)
    return x


class PeakRss:
    """Largest RSS above the start, sampled by a thread (every `interval` s) while the block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self) -> PeakRss:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, peak MiB above the start)."""
    import gc

    gc.collect()
    with PeakRss() as mem:
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
    return result, wall, mem.delta_mib


def brute_force(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The naive baseline: the full n x n similarity matrix, then every (i < j) at or above the threshold."""
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return i, j


def pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(i, dtype=np.int64) * n + np.asarray(j, dtype=np.int64)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return 1.0 if len(truth) == 0 else float(np.isin(truth, found).sum()) / len(truth)


def embed_all(prompts: list[str], cache: Path | None, chunk: int = 10_000) -> np.ndarray:
    """Embeddings of `prompts` with the bundled all-MiniLM-L6-v2, by chunks of `chunk` prompts, each cached in
    `cache`'s folder under the hash of its prompts (an interrupted run resumes; a longer run reuses a shorter one's)."""
    from schemas.config import EmbedderConfig
    from stages.engines.embed import open_embedder

    embedder = None
    parts = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), chunk):
        texts = prompts[s : s + chunk]
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        path = cache.with_name(f"{cache.stem}-{key}.npy") if cache else None
        if path is not None and path.is_file():
            parts.append(np.load(path))
            continue
        if embedder is None:
            embedder = open_embedder(EmbedderConfig(model="bundled:all-MiniLM-L6-v2", device="cpu"))
        parts.append(embedder.embed(texts))
        if path is not None:
            np.save(path, parts[-1])
        print(f"  embedded {s + len(texts):,}/{len(prompts):,} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return np.concatenate(parts)


def embed_speed(prompts: list[str]) -> None:
    import torch

    from schemas.config import EmbedderConfig
    from stages.engines.embed import open_embedder

    embedder = open_embedder(EmbedderConfig(model="bundled:all-MiniLM-L6-v2", device="cpu"))
    embedder.embed(prompts[:256])  # warm-up
    t0 = time.perf_counter()
    embedder.embed(prompts)
    wall = time.perf_counter() - t0
    print(
        f"embedding speed (all-MiniLM-L6-v2, CPU, {torch.get_num_threads()} torch threads, batch 256): "
        f"{len(prompts) / wall:,.0f} prompts/s ({len(prompts):,} prompts in {wall:.1f} s)"
    )


def row(name: str, wall: float, mib: float, pairs: int, dropped: int | str, rec: str) -> str:
    return f"  {name:<34} {wall:>9.2f} s {mib:>10.0f} MiB {pairs:>11,} {dropped!s:>9} {rec:>8}"


STEPS = {
    "ivf": lambda x, t, nprobe: ivf_arrays(x, t, nprobe=nprobe),
    "exact": lambda x, t, nprobe: exact_arrays(x, t),
    "brute": lambda x, t, nprobe: (*brute_force(x, t), None),
}


def child(step: str, data: Path, rows: int, threshold: float, nprobe: int, out: Path, repeats: int) -> None:
    """One measured step in this fresh process: load the rows, then time the search and sample its peak RSS above
    the RSS after loading (a fresh process: no heap left over from earlier steps hides the step's memory)."""
    import json

    x = np.ascontiguousarray(np.load(data)[:rows])
    import faiss  # noqa: F401  (imported before the baseline, as numpy is)

    (i, j, _), wall, mib = measure(lambda: STEPS[step](x, threshold, nprobe))
    for _ in range(repeats - 1):  # the best wall time of `repeats` (the first run also pays first-touch page faults)
        _, again, _ = measure(lambda: STEPS[step](x, threshold, nprobe))
        wall = min(wall, again)
    np.save(out, pair_keys(i, j, rows))
    print(json.dumps({"wall": wall, "mib": mib}))


def in_child(step: str, data: Path, rows: int, args: argparse.Namespace, tmp: Path) -> tuple[np.ndarray, float, float]:
    """(pair keys i * rows + j, wall s, peak MiB) of `step` run by `child` in a new interpreter."""
    import json
    import subprocess

    out = tmp / f"{step}-{rows}.npy"
    cmd = [sys.executable, __file__, "--child", step, "--data", str(data), "--rows", str(rows)]
    cmd += ["--threshold", str(args.threshold), "--nprobe", str(args.nprobe), "--child-out", str(out)]
    cmd += ["--repeats", str(args.repeats)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    return np.load(out), stats["wall"], stats["mib"]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--threshold", type=float, default=PromptDedupConfig().threshold, help="default: the config's")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--synthetic", action="store_true", help="random vectors with planted near-duplicates")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/irgl-neardup-emb.npy"))
    parser.add_argument("--embed-rows", type=int, default=2000, help="prompts of the embedding-speed run (0: skip)")
    parser.add_argument("--skip-exact", action="store_true", help="no blocked exact search on all rows")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each search: best wall time, first's memory")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.rows, args.threshold, args.nprobe, args.child_out, args.repeats)
        return

    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; numpy {np.__version__}")
    prompts: list[str] = []
    if args.synthetic:
        x = synthetic(args.rows)
        print(f"{args.rows:,} synthetic unit vectors (d=384), 5% planted near-duplicates")
    else:
        prompts, planted = make_prompts(args.rows)
        print(f"{len(prompts):,} prompts ({planted:,} planted paraphrases), e.g. {prompts[:2]}")
        if args.embed_rows:
            embed_speed(prompts[: args.embed_rows])
        x = embed_all(prompts, args.cache)
    n = len(x)
    t = args.threshold
    header = f"  {'search':<34} {'wall':>11} {'peak mem':>14} {'pairs':>11} {'dropped':>9} {'recall':>8}"
    tmp = Path(tempfile.mkdtemp(prefix="irgl-bench-neardup-"))
    data = tmp / "x.npy"
    np.save(data, x)

    def dropped(keys: np.ndarray, rows: int) -> int:
        keep, _ = keep_first(rows, (keys // rows, keys % rows, np.ones(len(keys))))
        return rows - sum(keep)

    print(f"\nall {n:,} rows, threshold {t}, ivf nlist {ivf_nlist(n)} nprobe {args.nprobe}")
    print(header)
    ivf_keys, wall, mib = in_child("ivf", data, n, args, tmp)
    if args.skip_exact:
        print(row("ivf (faiss)", wall, mib, len(ivf_keys), dropped(ivf_keys, n), "-"))
    else:
        exact_keys, ewall, emib = in_child("exact", data, n, args, tmp)
        print(row("exact (blocked all-pairs)", ewall, emib, len(exact_keys), dropped(exact_keys, n), "1.00000"))
        rec = recall(ivf_keys, exact_keys)
        print(row("ivf (faiss)", wall, mib, len(ivf_keys), dropped(ivf_keys, n), f"{rec:.5f}"))
    t0 = time.perf_counter()
    dropped(ivf_keys, n)
    print(f"  keep_first on the ivf pairs: {time.perf_counter() - t0:.2f} s")
    again, _, _ = in_child("ivf", data, n, args, tmp)
    print(
        f"  ivf deterministic (a second run, another process, gives the same pairs): {np.array_equal(again, ivf_keys)}"
    )
    if prompts:
        from stages.curate_prompts import guard_pairs

        t0 = time.perf_counter()
        gi, gj, _ = guard_pairs(prompts, (ivf_keys // n, ivf_keys % n, np.ones(len(ivf_keys))))
        gwall = time.perf_counter() - t0
        print(
            f"  with the compositional guard: {len(gi):,} pairs, {dropped(gi * n + gj, n):,} rows dropped "
            f"(guard {gwall:.2f} s)"
        )

    m = min(args.subset, n)
    print(f"\nsubset: the first {m:,} rows, threshold {t}, ivf nlist {ivf_nlist(m)} nprobe {args.nprobe}")
    print(header)
    truth, bwall, bmib = in_child("brute", data, m, args, tmp)
    print(row("brute force (full n x n matrix)", bwall, bmib, len(truth), dropped(truth, m), "1.00000"))
    ekeys, ewall, emib = in_child("exact", data, m, args, tmp)
    print(row("exact (blocked all-pairs)", ewall, emib, len(ekeys), dropped(ekeys, m), f"{recall(ekeys, truth):.5f}"))
    skeys, swall, smib = in_child("ivf", data, m, args, tmp)
    rec = recall(skeys, truth)
    print(row("ivf (faiss)", swall, smib, len(skeys), dropped(skeys, m), f"{rec:.5f}"))
    print(
        f"  ivf vs brute force: {bwall / swall:.1f}x faster, {bmib / max(smib, 1):.1f}x less peak memory, "
        f"recall {rec:.5f} (goal >= 0.99: {'met' if rec >= 0.99 else 'NOT met'})"
    )
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
