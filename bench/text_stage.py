"""Benchmark: the text engine's continuous batching vs the synchronous batch path it replaced, and vs bare vLLM.

    python bench/text_stage.py [--requests 256] [--batch-size 8] [--concurrent-batches 4 16] [--rounds 2]

One vLLM engine on the tiny VLM (`tiny:vlm`, CPU), one set of requests with a long-tail length mix: most are
short (a T1-style `<think>` block of at most 40 characters), one in ten is held by its regex to exactly
`--long-chars` characters, near `max_tokens`. Every request has its own seed. Paths, each over all requests:

- sync: the previous path: the requests cut into batches of `--batch-size`, one blocking `LLM.chat` per batch,
  one batch at a time (what a Ray Data actor did per batch): every batch waits for its longest output.
- new (k): `VLLMTextEngine.agenerate` with k batches in flight at once (what `_ConcurrentStageActor` does with
  `resources.concurrent_batches: k`): vLLM admits new requests at every step.
- bare: `LLM.chat` on all requests in one call (vLLM's own offline batching: the upper bound).

Accounting: engine start-up is printed apart; a warm-up pass over all requests comes first (structured-output
grammars compiled, prefix cache warm for every path); then `--rounds` rounds run every path once, in a rotated
order; each path's throughput is total requests / total seconds over the rounds. The texts of every path are
asserted identical (same seeds, same text).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as the tiny preset: engine core in-process

# Run as `python bench/text_stage.py`, this folder comes first on sys.path: take it off so packages import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def make_requests(n: int, long_chars: int, seed: int = 0) -> list:
    from schemas.reflection import think_regex
    from stages.engines.text import TextRequest

    rng = random.Random(seed)
    short = think_regex(40)
    long = rf"<think>\n[a-z]{{{long_chars}}}\n</think>"  # the grammar holds it to exactly this length
    out = []
    for i in range(n):
        regex = long if rng.random() < 0.1 else short
        out.append(TextRequest(f"Request {i}: plan an image of item {rng.randrange(1000)}.", regex=regex, seed=i))
    return out


def run_sync(engine, requests: list, batch_size: int) -> list[str]:  # noqa: ANN001
    from stages.engines.text import _messages

    texts = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        outputs = engine._llm.chat(
            [_messages(r, "image_pil") for r in batch],
            sampling_params=[engine._sampling_params(r) for r in batch],
            use_tqdm=False,
        )
        texts += [o.outputs[0].text for o in outputs]
    return texts


def run_new(engine, requests: list, batch_size: int, concurrent: int) -> list[str]:  # noqa: ANN001
    async def main() -> list[list[str]]:
        slots = asyncio.Semaphore(concurrent)

        async def one(batch: list) -> list[str]:
            async with slots:
                return await engine.agenerate(batch)

        batches = [requests[s : s + batch_size] for s in range(0, len(requests), batch_size)]
        return await asyncio.gather(*(one(b) for b in batches))

    return [t for part in asyncio.run(main()) for t in part]


def run_bare(engine, requests: list) -> list[str]:  # noqa: ANN001
    return run_sync(engine, requests, len(requests))  # one LLM.chat over all requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concurrent-batches", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--long-chars", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from schemas.config import TextModelConfig
    from stages.engines.text import VLLMTextEngine
    from stages.tiny import resolve_text

    cfg = TextModelConfig(
        model="tiny:vlm", max_tokens=4 * (args.long_chars + 20), temperature=0.8, max_model_len=4096,
        enforce_eager=True, dtype="float32",
    )  # fmt: skip
    t0 = time.perf_counter()
    engine = VLLMTextEngine(resolve_text(cfg))
    engine.setup()
    print(f"engine start-up: {time.perf_counter() - t0:.1f} s (not counted below)")
    requests = make_requests(args.requests, args.long_chars)
    n_long = sum("a-z" in r.regex for r in requests)
    print(f"{len(requests)} requests, {n_long} long ({args.long_chars} chars), batch size {args.batch_size}")

    reference = run_bare(engine, requests)  # warm-up: grammars compiled, prefix cache warm for all paths
    paths = {"sync": lambda: run_sync(engine, requests, args.batch_size)}
    for k in args.concurrent_batches:
        paths[f"new ({k} batches in flight)"] = lambda k=k: run_new(engine, requests, args.batch_size, k)
    paths["bare LLM.chat (all at once)"] = lambda: run_bare(engine, requests)
    seconds = dict.fromkeys(paths, 0.0)
    names = list(paths)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            texts = paths[name]()
            seconds[name] += time.perf_counter() - start
            assert texts == reference, f"{name}: texts differ from bare vLLM's for the same seeds"
    engine.close()

    total = args.requests * args.rounds
    rate = {name: total / s for name, s in seconds.items()}
    print(f"\n{'path':34s} {'requests/s':>10s}")
    for name in names:
        print(f"{name:34s} {rate[name]:10.1f}")
    sync, bare = rate["sync"], rate["bare LLM.chat (all at once)"]
    print("\nall paths gave identical texts for the same seeds")
    for k in args.concurrent_batches:
        new = rate[f"new ({k} batches in flight)"]
        print(f"new ({k}) / sync: {new / sync:.2f}x (goal >= 1.5x)   new ({k}) / bare: {new / bare:.2f}x "
              "(goal >= 0.95x)")  # fmt: skip


if __name__ == "__main__":
    main()
