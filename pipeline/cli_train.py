"""`irgl train`: the trainer's command (registered in pipeline/cli.py). Thin: parses options, calls trainer.train.

Heavy imports (torch, transformers, ray) happen inside the command, so `irgl --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Trainer config YAML (e.g. configs/train_tiny.yaml)."),
    data: Path = typer.Option(..., "--data", "-d", help="A built IRGL dataset (holds data/<mode>/ or wds/<mode>/)."),
    stage: str = typer.Option("all", "--stage", help="'1' (six modes), '2' (full modes, from stage 1) or 'all'."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue unfinished stages from their latest checkpoint (or finish their export)."
    ),
    force_resume: bool = typer.Option(
        False,
        "--force-resume",
        help="With --resume: continue even when the checkpoint was written with another number of workers, "
        "grad_accum or data (refused otherwise: the data order would differ from an uninterrupted run).",
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Overrides output_dir of the config."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address, e.g. 'auto'."),
) -> None:
    """Train a unified model on an IRGL dataset: stage 1 (six modes) then stage 2 (full modes), on Ray Train."""
    from schemas.config import ConfigError
    from trainer.config import load_train_config

    overrides = {"output_dir": str(output)} if output is not None else None
    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {'; '.join(str(exc).splitlines())}", err=True)
        raise typer.Exit(2) from None
    if stage not in ("1", "2", "all"):
        typer.echo(f"error: --stage must be 1, 2 or all, got {stage!r}", err=True)
        raise typer.Exit(2)
    if not Path(data).is_dir():
        typer.echo(f"error: --data {data}: no such directory", err=True)
        raise typer.Exit(2)

    from trainer.train import TrainError, train

    try:
        results = train(
            cfg, data, stage=stage, resume=resume or force_resume, address=address, force_resume=force_resume
        )
    except TrainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, result in results.items():
        note = " (already complete)" if result.skipped_run else ""
        skipped = sum(result.skipped.values())
        typer.echo(f"stage {name}: {result.steps} steps, skipped {skipped} records -> {result.final_dir}{note}")
