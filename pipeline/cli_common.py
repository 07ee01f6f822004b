"""What every `irgl` command shares: the error exit, the choices typer lists in `--help`, the default config.

The one owner of the CLI's error helpers (pipeline/cli.py, cli_hub.py and cli_train.py import them):
- `fail(message)`: `error: message` on stderr, exit code 2 - bad input found before anything runs;
- `fail(message, code=1)`: the same for a run that went wrong (a dataset that does not verify, a training error).
Light on purpose: `irgl --help` imports this module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer

#: `irgl build` and `irgl plan` without `--config`: the tiny preset (CPU, tiny models, seconds).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

#: Exit code of bad input (a config field, an option, a directory): the same for every command.
EXIT_BAD_INPUT = 2


class Executor(str, Enum):
    """`irgl build --executor`: Ray Data, or a plain loop in this process (debugging)."""

    ray = "ray"
    local = "local"


class Stage(str, Enum):
    """`irgl train --stage`: stage 1 (six modes), stage 2 (full modes, from stage 1), or both in order."""

    one = "1"
    two = "2"
    all = "all"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """`error: <message>` on stderr (each line of a multi-line message kept), then exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def echo_problems(problems: list, max_problems: int) -> None:
    """At most `max_problems` problems on stderr, one a line, then how many were left out (all are counted)."""
    for problem in problems[:max_problems]:
        typer.echo(str(problem), err=True)
    if len(problems) > max_problems:
        typer.echo(f"... and {len(problems) - max_problems} more", err=True)
