"""Command functions of `irgl plan` and `irgl publish` (registered in pipeline/cli.py).

Thin, like the rest of the CLI: parse options, call pipeline.plan / pipeline.publish, map errors to exit codes
(2: bad input found before anything runs, as `irgl build` does - for publish also an upload above --max-size
without --yes and an OUT another command holds; 1: a dataset that does not verify, or warnings under `--strict`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli_common import DEFAULT_CONFIG, echo_problems, fail


def plan_command(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Build config YAML (default: the tiny preset)."),
    cluster: Path | None = typer.Option(
        None, "--cluster", help="Ray cluster-launcher YAML (e.g. ray_cluster.yaml): check every actor can be placed."
    ),
    prompts: str | None = typer.Option(None, "--prompts", help="Prompt file replacing the config's sources."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Plan for at most this many prompts."),
    expected_count: list[str] | None = typer.Option(
        None, "--expected-count", help="PATH=N: rows of a Hugging Face prompt source the config cannot count."
    ),
    keep_rate: float = typer.Option(
        1.0, "--keep-rate", min=0.0, max=1.0, help="Share of trajectories the verdict keeps (from a pilot build)."
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the plan has warnings (options do not count)."),
) -> None:
    """Validate the config and print the stage graph, resources, expected records, GPU-hours, wall time, options that
    would speed stages up (torch.compile, scorer CPUs) and warnings (budgets that make rows fail, GPUs the cluster
    cannot give or would not start). Loads no model and contacts nothing."""
    from pipeline.plan import PlanError, plan_from_file
    from pipeline.plan.render import format_plan
    from schemas.config import ConfigError

    try:
        plan = plan_from_file(
            config, cluster=cluster, expected_counts=expected_count, keep_rate=keep_rate, prompts_path=prompts,
            limit=limit,
        )  # fmt: skip
    except (ConfigError, PlanError) as exc:
        fail(str(exc))
    typer.echo(format_plan(plan))
    if strict and plan.warnings:
        raise typer.Exit(1)


def publish_command(
    out: Path = typer.Argument(..., metavar="OUT", help="A built dataset directory (holds manifest.json)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub dataset repository, ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private (if it does not exist)."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to upload to (made from main if missing)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the size, file list and commit plan; contact nothing (over --max-size: warns)."
    ),
    include_wds: bool = typer.Option(False, "--include-wds", help="Also upload the WebDataset tars (wds/)."),
    include_internal: bool = typer.Option(
        False, "--include-internal", help="Also upload trajectories/, rejects/ and state/."
    ),
    license_name: str | None = typer.Option(None, "--license", help="License of the card (default: the build's)."),
    stage_dir: Path | None = typer.Option(
        None, "--stage-dir", help="Stage the upload in this empty folder and keep it (inspect it after --dry-run)."
    ),
    decode_images: bool = typer.Option(True, help="Verify by fully decoding every image (slower, thorough)."),
    max_size: str = typer.Option(
        "300GB",
        "--max-size",
        help="Refuse a larger upload unless --yes (300GB, 1.5TB, bytes; default: the public repository size the "
        "Hub's dataset upload guide hosts without asking).",
    ),
    yes: bool = typer.Option(False, "--yes", help="Upload even when larger than --max-size."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Processes verifying units in parallel (0: all cores)."),
    max_problems: int = typer.Option(
        200, "--max-problems", min=0, help="Print at most this many problems of a dataset that does not verify."
    ),
) -> None:
    """Verify OUT, then upload its mode Parquet shards and a Hub dataset card (resumable: rerun to continue).
    Prints the file count and total size first and refuses above --max-size unless --yes. The token comes from
    HF_TOKEN or `hf auth login` and is never printed."""
    from pipeline.humanize import parse_size
    from pipeline.lock import OutLocked
    from pipeline.publish import PublishError, PublishRefused, UploadSpec, publish
    from pipeline.verify import default_jobs

    try:
        max_bytes = parse_size(max_size)
    except ValueError as exc:
        fail(f"--max-size {exc}")
    try:
        spec = UploadSpec(repo_id, private, revision, include_wds, include_internal, license_name)
        publish(
            out, spec, dry_run=dry_run, stage_dir=stage_dir, decode_images=decode_images, max_size=max_bytes, yes=yes,
            jobs=jobs or default_jobs(), echo=typer.echo,
        )  # fmt: skip
    except PublishRefused as exc:
        echo_problems(exc.problems, max_problems)
        fail(str(exc), code=1)
    except (PublishError, OutLocked) as exc:
        fail(str(exc))
