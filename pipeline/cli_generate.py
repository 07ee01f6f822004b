"""`irgl generate` and `irgl eval`: the command functions (registered in pipeline/cli.py). Thin: parse options, call
pipeline/generate.py and pipeline/evaluate.py. Heavy imports (torch, transformers, ray, open_clip) stay inside."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from pipeline.cli_common import Executor, fail


class Turns(str, Enum):
    """`irgl generate --turns`: 1 (T1 -> I1) or 2 (T1 -> I1 -> T2 -> I2, the IRG loop)."""

    one = "1"
    two = "2"


def generate_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="A Janus export (irgl train's stageN/final or final_ema folder), or tiny:janus."
    ),
    prompts: Path = typer.Option(
        ...,
        "--prompts",
        "-p",
        help="Prompt file: .txt (a prompt a line), .jsonl (objects with 'prompt', e.g. "
        "GenEval's metadata with 'tag') or .json (a list).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (generations.parquet, gallery.html)."),
    turns: Turns = typer.Option(Turns.two, "--turns", help="1: T1 -> I1; 2: the full IRG loop (-> T2 -> I2)."),
    seed: int = typer.Option(0, "--seed", help="Global seed; each prompt's seed derives from it and its id."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Prompts per batch (per model call)."),
    executor: Executor = typer.Option(
        Executor.ray, "--executor", help="ray: a Ray Data actor pool; local: a plain loop in this process."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray address ('auto', host:port; 'local': a private instance). Default: the Ray "
        "running on this machine, else a new local one.",
    ),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray actors, one model each."),
    gpus: float | None = typer.Option(
        None, "--gpus-per-replica", min=0, help="GPUs per actor (default: 1 if the Ray cluster has GPUs, else 0)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N prompts of the file."),
    think_temperature: float = typer.Option(0.3, "--think-temperature", min=0, help="T1/T2 sampling (0: greedy)."),
    max_think_tokens: int = typer.Option(1024, "--max-think-tokens", min=1, help="Cap on T1 and on T2 tokens."),
    image_temperature: float = typer.Option(1.0, "--image-temperature", min=0, help="Image token sampling."),
    cfg_turn1: float = typer.Option(4.0, "--cfg-turn1", help="I1: text guidance (full vs pad-token context)."),
    cfg_text: float = typer.Option(4.0, "--cfg-text", help="I2: guidance against the context without T2 (1: off)."),
    cfg_image: float = typer.Option(2.0, "--cfg-image", help="I2: guidance against the context without I1 (1: off)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] (Ray actors: cuda when given GPUs)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16."),
    force: bool = typer.Option(False, "--force", help="Replace a generate run with other settings in --out."),
) -> None:
    """Run a trained Janus export the IRG way on a prompt file: think (T1), draw (I1), reflect on I1 (T2), redraw
    (I2). Resumable: rerun the same command to finish an interrupted run."""
    from pipeline.generate import GenerateError, GenerateOptions
    from pipeline.generate import generate as run_generate

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"--dtype {dtype}: one of auto, float32, bfloat16, float16")
    opts = GenerateOptions(
        model=model, prompts=prompts, out=out, turns=int(turns.value), seed=seed, batch_size=batch_size,
        executor=executor.value, address=address, replicas=replicas, gpus_per_replica=gpus, device=device,
        dtype=dtype, limit=limit, force=force,
        sampling={
            "think_temperature": think_temperature, "max_think_tokens": max_think_tokens,
            "image_temperature": image_temperature, "cfg_turn1": cfg_turn1, "cfg_text": cfg_text,
            "cfg_image": cfg_image,
        },
    )  # fmt: skip
    from pipeline.generate import LOGS_DIR
    from pipeline.logs import build_logging

    # Ray's and Ray Data's INFO lines go to DIR/logs/driver.log; the console keeps the progress lines.
    with build_logging(out / LOGS_DIR, ray=executor is Executor.ray):
        try:
            result = run_generate(opts, echo=typer.echo)
        except GenerateError as exc:
            fail(str(exc))
    rate = f"; {result.image_tokens / result.generate_seconds:,.0f} image tokens/s" if result.generate_seconds else ""
    typer.echo(
        f"generated {result.ran} prompts ({result.skipped} already done) in {result.seconds:.1f} s{rate}; "
        f"{out / 'generations.parquet'}, gallery: {out / 'gallery.html'}"
    )


def eval_command(
    directory: Path = typer.Argument(..., help="An irgl generate output, or a built dataset (grades the data)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where eval.json and geneval/ go (default DIR/eval)."),
    clip: str = typer.Option("ViT-L-14", "--clip", help="open_clip model (the builder's scorer), or tiny:clip."),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag (ignored for tiny:)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    vlm: str | None = typer.Option(
        None,
        "--vlm",
        help="Also ask this VLM (vLLM; a Hub id, folder or tiny:vlm) the build's judge question: does I1 / I2 "
        "satisfy the prompt, which is better (a JSON answer forced by a regex; yes/no per image without I2).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing eval in --out."),
) -> None:
    """Score I1 and I2 against the prompt with CLIP (share of prompts where I2 beats I1, mean gain, per tag), and
    write GenEval's folder layout for turn 1 and turn 2. A table on the console and in eval.json."""
    from pipeline.evaluate import EvalError, evaluate, format_table

    try:
        report = evaluate(
            directory, out, clip=clip, pretrained=pretrained, device=device, vlm=vlm, force=force, echo=typer.echo
        )
    except EvalError as exc:
        fail(str(exc))
    typer.echo(format_table(report))
    typer.echo(f"eval written to {report['out']}/eval.json; GenEval folders: {report['geneval']}")
