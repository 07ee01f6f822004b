"""The errors of `irgl publish` (pipeline.lock.OutLocked apart: another command holds OUT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PublishError(RuntimeError):
    """Publishing cannot start: bad repo id or size, unusable staging folder, no token. The message says which."""


class PublishTooLarge(PublishError):
    """The upload is larger than `--max-size` and `--yes` was not given."""


class PublishRefused(PublishError):
    """OUT does not verify; `problems` holds what `irgl verify` found."""

    def __init__(self, out: Path, problems: list[Any]) -> None:
        super().__init__(f"{out}: refusing to publish a dataset that does not verify ({len(problems)} problem(s))")
        self.problems = problems
