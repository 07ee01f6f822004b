"""`irgl train`: the trainer's command (registered in pipeline/cli.py). Thin: parses options, calls trainer.train.

Heavy imports (torch, transformers, ray) happen inside the command, so `irgl --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli_common import Stage, fail


def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Trainer config YAML (e.g. configs/train_tiny.yaml)."),
    data: Path = typer.Option(..., "--data", "-d", help="A built IRGL dataset (holds data/<mode>/ or wds/<mode>/)."),
    stage: Stage = typer.Option(
        Stage.all, "--stage", help="1: the six modes; 2: the full modes, from stage 1's export; all: 1 then 2."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue unfinished stages from their latest checkpoint (or finish their export)."
    ),
    force_resume: bool = typer.Option(
        False,
        "--force-resume",
        help="With --resume: continue even when the checkpoint was written with another number of workers, "
        "grad_accum or data (refused otherwise: the data order would differ from an uninterrupted run).",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where checkpoints and exports go (overrides output_dir of the config)."
    ),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address, e.g. 'auto'."),
) -> None:
    """Train a unified model on an IRGL dataset: stage 1 (six modes) then stage 2 (full modes), on Ray Train."""
    from schemas.config import ConfigError
    from trainer.config import load_train_config

    overrides = {"output_dir": str(out)} if out is not None else None
    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        fail("; ".join(str(exc).splitlines()))
    if not Path(data).is_dir():
        fail(f"--data {data}: no such directory")

    from trainer.train import TrainError, train

    try:
        results = train(
            cfg, data, stage=stage.value, resume=resume or force_resume, address=address, force_resume=force_resume
        )
    except TrainError as exc:
        fail(str(exc), code=1)
    for name, result in results.items():
        note = " (already complete)" if result.skipped_run else ""
        skipped = sum(result.skipped.values())
        typer.echo(f"stage {name}: {result.steps} steps, skipped {skipped} records -> {result.final_dir}{note}")
