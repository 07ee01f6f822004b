"""Benchmark: image tokens/s of `irgl generate`'s sampler vs a bare Janus sampling loop, same model and batch.

Both sides draw the turn-1 image (I1) of the same B prompts from the same prefix (system prompt, prompt, a fixed
T1, BOI) with text classifier-free guidance (scale 4, temperature 1): 2B rows, one KV cache, N image tokens per
prompt. irgl: `IRGGenerator.sample_image` (the prefix encoded by the trainer's record encoder, per-prompt
generators, serial guidance over branch rows). Bare: a minimal hand-written loop on the same
`JanusForConditionalGeneration` (pad-token unconditional rows, one `torch.multinomial` for the batch), and, when it
runs on this model, transformers' own `generate(generation_mode="image")` (static cache). Model loading is
start-up, reported apart; every side is timed from its prefix ids to the last image token, in alternating rounds
(median). Target: irgl / bare >= 0.9x. Also prints the whole IRG loop's image tokens/s (T1, I1, T2, I2).

    python bench/generate.py [--model tiny:janus|EXPORT] [--batch 8] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ROOT / "tests" / "data" / "geneval_metadata.jsonl"
T1 = "<think>\nOne object in the centre, plain background, soft studio lighting.\n</think>"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(janus, prefix_ids, pad_id: int, n: int, scale: float, seed: int, device: str):  # noqa: ANN001
    """The baseline: the smallest correct Janus CFG sampler (same prefix for every row, so no padding)."""
    import torch
    from transformers import DynamicCache

    ids = prefix_ids.to(device)
    uncond = ids.clone()
    uncond[:, 1:-1] = pad_id  # keep BOS and BOI, as Janus' sampler does
    rows = torch.cat([ids, uncond])
    b = ids.shape[0]
    lm = janus.model.language_model
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.zeros((b, n), dtype=torch.long, device=device)
    with torch.inference_mode():
        x = janus.model.get_input_embeddings()(rows)
        res = lm(inputs_embeds=x, past_key_values=DynamicCache(), use_cache=True)
        cache, hidden = res.past_key_values, res.last_hidden_state[:, -1]
        for i in range(n):
            logits = janus.model.generation_head(hidden).float()
            cond, unc = logits[:b], logits[b:]
            probs = torch.softmax(unc + scale * (cond - unc), dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            out[:, i] = tok
            if i == n - 1:
                break
            emb = janus.prepare_embeddings_for_image_generation(torch.cat([tok, tok])[:, None])
            res = lm(inputs_embeds=emb, past_key_values=cache, use_cache=True)
            cache, hidden = res.past_key_values, res.last_hidden_state[:, -1]
    return out


def stock_generate(janus, prefix_ids, fmt, scale: float, device: str):  # noqa: ANN001
    """transformers' JanusForConditionalGeneration.generate(generation_mode="image")."""
    import copy

    import torch

    config = copy.deepcopy(janus.generation_config)
    # What Janus-Pro's generation_config.json holds and a bare export lacks: the ids its image mode reads.
    config.generation_kwargs = {"boi_token_id": fmt.boi_id}
    config.pad_token_id, config.bos_token_id = fmt.pad_id, fmt.bos_id
    config.do_sample, config.guidance_scale = True, scale
    with torch.inference_mode():
        return janus.generate(
            prefix_ids.to(device),
            attention_mask=torch.ones_like(prefix_ids).to(device),
            generation_mode="image",
            generation_config=config,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:janus")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from trainer.generate import IRGGenerator, PromptJob, SamplingConfig, i1_prefixes, resolve_device
    from trainer.tiny_janus import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    irg = IRGGenerator(resolve_model(args.model), device=device, dtype="float32")
    startup = time.perf_counter() - t0
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[: args.batch]]
    fmt, n, scale = irg.fmt, irg.num_image_tokens, 4.0
    branches = [i1_prefixes(p, T1, fmt) for p in prompts]
    # Same prefix for every prompt on the bare side (it has no padding): the first prompt's, B times.
    ids = [i for seg in branches[0][0].segments for i in seg.ids]
    prefix = torch.tensor([ids] * args.batch)
    same = [[branches[0][0], branches[0][1]] for _ in prompts]

    def run_irgl() -> float:
        _sync(device)
        t = time.perf_counter()
        irg.sample_image(same, [scale], list(range(args.batch)), 1.0)
        _sync(device)
        return time.perf_counter() - t

    def run_bare() -> float:
        _sync(device)
        t = time.perf_counter()
        bare_loop(irg.janus, prefix, fmt.pad_id, n, scale, 0, device)
        _sync(device)
        return time.perf_counter() - t

    def run_stock() -> float:
        _sync(device)
        t = time.perf_counter()
        stock_generate(irg.janus, prefix, fmt, scale, device)
        _sync(device)
        return time.perf_counter() - t

    sides = {"irgl": run_irgl, "bare": run_bare, "stock": run_stock}
    try:
        run_stock()
    except Exception as exc:  # noqa: BLE001 - the stock path is optional: say why it is left out
        print(f"transformers generate(generation_mode='image') left out: {type(exc).__name__}: {exc}")
        del sides["stock"]
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(fn())
    tokens = args.batch * n
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"model {args.model} on {device}: batch {args.batch} prompts x {n} image tokens, CFG rows 2x, "
          f"{args.rounds} rounds (median); start-up (model load) {startup:.1f} s, apart")  # fmt: skip
    for name in sides:
        print(f"  {name:6s} {rate[name]:10,.0f} image tokens/s  ({statistics.median(times[name]):.3f} s per batch)")
    print(f"ratio irgl / bare loop: {rate['irgl'] / rate['bare']:.2f}x (target >= 0.9x)")
    if "stock" in rate:
        print(f"ratio irgl / transformers generate: {rate['irgl'] / rate['stock']:.2f}x")
    # The whole IRG loop (T1, I1, T2, I2; short thoughts) for reference.
    jobs = [PromptJob(str(i), p, i) for i, p in enumerate(prompts)]
    cfg = SamplingConfig(max_think_tokens=16)
    irg.run(jobs, cfg)
    t = time.perf_counter()
    res = irg.run(jobs, cfg)
    _sync(device)
    loop = time.perf_counter() - t
    image_tokens = sum(r.tokens["i1"] + r.tokens["i2"] for r in res)
    print(f"whole IRG loop (T1, I1, T2, I2; thoughts <= 16 tokens): {image_tokens / loop:,.0f} image tokens/s "
          f"({loop:.2f} s, phases {res[0].timings})")  # fmt: skip


if __name__ == "__main__":
    main()
