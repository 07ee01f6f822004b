"""The `irgl` command line (typer). Thin: parses arguments and calls into pipeline/. Heavy imports stay inside
the commands so that `irgl --help` is instant.

One spelling per concept, in every command:
- `--config/-c CONFIG` is always the config file (build, plan: default the tiny preset; train: required);
- `--out/-o DIR` is always the directory a command writes (build, synth, train, generate, eval); a command that
  writes into a directory holding something else refuses unless `--force` (build: another config's build; synth:
  any content; generate: a run with other settings; eval: an earlier eval);
- `OUT`, positional, is the dataset a command inspects (verify, report, publish; eval's DIR: a dataset or a
  generate output);
- options with a fixed set of values are typer choices that `--help` lists (`--executor ray|local`,
  `--stage 1|2|all`, `--turns 1|2`); a bad value exits 2 with the choices named;
- `--max-problems N` caps the problems printed (verify, publish: all are counted);
- `--jobs/-j N` is processes on this machine (verify, publish);
- exit codes: 0 done, 1 the work found a problem (a dataset that does not verify, `--strict` warnings, a training
  error), 2 bad input found before anything runs (pipeline/cli_common.py: `fail`, the one error helper).
Long commands print progress: build, verify and publish one line per unit (k/N units, elapsed, ETA).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli_common import DEFAULT_CONFIG, Executor, echo_problems, fail
from pipeline.cli_generate import eval_command, generate_command  # light: their heavy imports are inside
from pipeline.cli_hub import plan_command, publish_command
from pipeline.cli_train import train_command

app = typer.Typer(
    name="irgl",
    help="Build, check, plan, publish and train on IRGL (Interleaving Reasoning Generation) datasets; generate "
    "with and evaluate the trained model.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def verify(
    out: Path = typer.Argument(..., metavar="OUT", help="A built dataset directory (holds manifest.json)."),
    decode_images: bool = typer.Option(True, help="Fully decode every image (slower, catches damaged images)."),
    max_problems: int = typer.Option(200, min=0, help="Print at most this many problems (all are counted)."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Processes checking units in parallel (0: all cores)."),
    reuse: bool = typer.Option(
        False, help="Re-check units an earlier verify found clean by size and sha256 only (as publish does)."
    ),
) -> None:
    """Re-read every shard of OUT; check sizes, sha256, records, shapes and Parquet/WebDataset agreement. Units
    are checked in parallel; clean ones are recorded in OUT/state/verified.json for `irgl publish`."""
    import time

    from pipeline.logs import UnitProgress
    from pipeline.verify import default_jobs
    from pipeline.verify import verify as run_verify

    started = time.perf_counter()
    progress = UnitProgress(typer.echo, verb="verified")
    problems = run_verify(out, decode_images=decode_images, jobs=jobs or default_jobs(), reuse=reuse, progress=progress)
    if not problems:
        typer.echo(f"OK: {out} verifies ({time.perf_counter() - started:.1f} s)")
        return
    echo_problems(problems, max_problems)
    typer.echo(f"FAILED: {len(problems)} problem(s) in {out}", err=True)
    raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Option(Path("out/synth"), "--out", "-o", help="Output directory for the dataset."),
    n: int = typer.Option(32, min=1, help="Number of synthetic trajectories."),
    seed: int = typer.Option(0, help="Seed of the synthetic generator."),
    size: int = typer.Option(64, min=16, help="Image side in pixels."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace OUT when it holds an irgl dataset (everything in OUT is deleted first); a non-empty folder "
        "without one is never touched.",
    ),
) -> None:
    """Write a six-mode dataset from synthetic PIL-drawn trajectories (no models): exercises the writers. Refuses
    a non-empty OUT unless --force, which replaces an irgl dataset (and only a folder holding one)."""
    import shutil

    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    if out.exists() and not out.is_dir():
        fail(f"{out}: not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            fail(f"{out} is not empty: pass --force to replace the dataset in it, or choose another --out")
        if not any((out / name).exists() for name in ("manifest.json", "data", "state")):
            fail(f"{out} is not empty and holds no irgl dataset: --force replaces only an irgl dataset")
        shutil.rmtree(out)
    result = write_dataset(out, synthetic_trajectories(n, seed=seed, size=size), build_config={"synthetic": seed})
    for mode, count in result.counts.items():
        typer.echo(f"{mode:45s} {count:6d}")
    typer.echo(f"wrote {result.trajectories} trajectories to {out}")


@app.command()
def build(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Build config YAML (default: the tiny preset)."),
    out: Path = typer.Option(Path("out/build"), "--out", "-o", help="Output directory."),
    prompts: str | None = typer.Option(None, "--prompts", help="Prompt file (overrides prompts.path)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use at most this many prompts."),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray cluster address, e.g. 'auto'; 'local' starts a private local Ray even if one runs here. Default: "
        "join the Ray instance running on this machine (ray start, $RAY_ADDRESS), else start a local one.",
    ),
    executor: Executor = typer.Option(
        Executor.ray, "--executor", help="ray: Ray Data; local: a plain loop in this process (debugging)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild an OUT that holds a build with another config."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Engine, Ray and INFO logs on the console instead of OUT/state/logs/."
    ),
) -> None:
    """Generate trajectories (think, draw, reflect, redraw, score) and write the six-mode dataset to OUT."""
    from pipeline.build import build as run_build
    from pipeline.errors import BuildError
    from pipeline.logs import LOG_DIR, UnitProgress, build_logging
    from pipeline.units import STATE_DIR
    from schemas.config import ConfigError, load_build_config
    from stages.engines.errors import EngineDead
    from stages.prompts import PromptSourceError

    try:
        cfg = load_build_config(str(config))
    except ConfigError as exc:
        fail(str(exc))

    log_dir = None if verbose else out / STATE_DIR / LOG_DIR
    with build_logging(log_dir, ray=executor is Executor.ray):
        if log_dir is not None:
            typer.echo(f"engine logs: {log_dir}/ (--verbose prints them here)")
        try:
            result = run_build(
                cfg, out, prompts_path=prompts, limit=limit, executor=executor.value, address=address, force=force,
                progress=UnitProgress(typer.echo), log_dir=log_dir,
            )  # fmt: skip
        except (BuildError, PromptSourceError) as exc:
            fail(str(exc))
        except EngineDead as exc:  # the local executor: the engine runs in this process, nothing restarts it
            fail(f"{exc}; finished units are kept: rerun the same command to resume")
        except Exception:
            if log_dir is not None:
                typer.echo(f"build failed; engine logs: {log_dir}/", err=True)
            raise
    _print_summary(result)
    typer.echo(f"dataset written to {out} (verify with: irgl verify {out}); report: {out / 'report.html'}")


def curation_table(facts: dict):  # noqa: ANN201 (a rich Table, imported lazily)
    """The build summary's curation table: one row per filter (pipeline.curation.curation_facts)."""
    from rich.table import Table

    table = Table(title="curation")
    for col in ("filter", "model", "threshold", "checked", "removed"):
        table.add_column(col, justify="right" if col in ("threshold", "checked", "removed") else "left")
    for name, f in facts.items():
        if not f.get("enabled"):
            table.add_row(name, "(off)", "", "", "")
            continue
        rule = f.get("threshold", f.get("rule"))
        table.add_row(name, str(f.get("model") or ""), str(rule), str(f.get("checked", "")), str(f["removed"]))
    return table


def _print_summary(result) -> None:  # noqa: ANN001 (BuildResult, imported lazily)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    p = result.prompts
    table = Table(title="stages")
    for col in ("stage", "in", "ok", "filtered", "failed", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    dropped = sum(p.dropped.values())
    table.add_row("prompts", str(p.read), str(p.kept), str(dropped), "0", "")
    for name, c in result.stage_counts.items():
        sec = result.stage_seconds.get(name)
        table.add_row(name, *(str(c[k]) for k in ("in", "ok", "filtered", "failed")), f"{sec:.1f}" if sec else "")
    console.print(table)
    if p.dropped:
        console.print("prompts dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(p.dropped.items())))
        for line in p.problems[:10]:
            console.print(f"  {line}")
    if result.curation:
        console.print(curation_table(result.curation))
    modes = Table(title="records per mode")
    modes.add_column("mode")
    modes.add_column("records", justify="right")
    for mode, n in result.mode_counts.items():
        modes.add_row(mode, str(n))
    console.print(modes)
    console.print(
        f"trajectories: {result.trajectories}; units run: {result.units_run}, skipped (already done): "
        f"{result.units_skipped}; wall time {result.wall_seconds:.1f} s"
    )


@app.command()
def report(
    out: Path = typer.Argument(..., metavar="OUT", help="A directory written by irgl build."),
    samples: int = typer.Option(8, min=0, help="Sample trajectories shown side by side."),
) -> None:
    """Write OUT/report.html: funnel, per-mode counts, CLIP histograms, samples, time and cost per trajectory."""
    from pipeline.report import write_report

    if not (out / "manifest.json").is_file() or not (out / "state" / "build.json").is_file():
        fail(f"{out}: not a directory written by irgl build (needs manifest.json and state/build.json)")
    typer.echo(f"report written to {write_report(out, samples)}")


app.command("plan")(plan_command)
app.command("publish")(publish_command)
app.command("train")(train_command)
app.command("generate")(generate_command)
app.command("eval")(eval_command)

models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("tiny")
def models_tiny(
    directory: Path | None = typer.Option(
        None, "--dir", help="Where to build (default: $IRGL_TINY_DIR or ~/.cache/irgl/tiny)."
    ),
) -> None:
    """Build the deterministic tiny models offline: Qwen2 LLM, Qwen2-VL VLM, SD-style pipeline, open_clip (the
    builder's) and Janus (the trainer's)."""
    from transformers.utils import logging as hf_logging

    from schemas.local import tiny_root
    from stages.tiny import build_all
    from trainer.tiny_janus import build_tiny_janus

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bars would interleave with the folder lines
    for name, path in build_all(directory).items():
        typer.echo(f"{name:12s} {path}")
    typer.echo(f"{'janus':12s} {build_tiny_janus(tiny_root(directory))}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
