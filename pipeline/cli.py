"""The `irgl` command line (typer). Thin: parses arguments and calls into pipeline/. Heavy imports stay inside
the commands so that `irgl --help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="irgl",
    help="Build, check, publish and train on IRGL (Interleaving Reasoning Generation) datasets.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def verify(
    out: Path = typer.Argument(..., help="A built dataset directory (holds manifest.json)."),
    decode_images: bool = typer.Option(True, help="Fully decode every image (slower, catches damaged images)."),
    max_problems: int = typer.Option(200, help="Print at most this many problems (all are counted)."),
) -> None:
    """Re-read every shard of OUT; check sizes, sha256, records, shapes and Parquet/WebDataset agreement."""
    from pipeline.verify import verify as run_verify

    problems = run_verify(out, decode_images=decode_images)
    if not problems:
        typer.echo(f"OK: {out} verifies")
        return
    for problem in problems[:max_problems]:
        typer.echo(str(problem), err=True)
    if len(problems) > max_problems:
        typer.echo(f"... and {len(problems) - max_problems} more", err=True)
    typer.echo(f"FAILED: {len(problems)} problem(s) in {out}", err=True)
    raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output directory for the dataset."),
    n: int = typer.Option(32, min=1, help="Number of synthetic trajectories."),
    seed: int = typer.Option(0, help="Seed of the synthetic generator."),
    size: int = typer.Option(64, min=16, help="Image side in pixels."),
) -> None:
    """Write a six-mode dataset from synthetic PIL-drawn trajectories (no models): exercises the writers."""
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    result = write_dataset(out, synthetic_trajectories(n, seed=seed, size=size), build_config={"synthetic": seed})
    for mode, count in result.counts.items():
        typer.echo(f"{mode:45s} {count:6d}")
    typer.echo(f"wrote {result.trajectories} trajectories to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
