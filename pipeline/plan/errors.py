"""The one error of `irgl plan`'s own inputs (the config's errors are schemas.config.ConfigError)."""

from __future__ import annotations


class PlanError(ValueError):
    """A plan input (cluster file, --expected-count, a prompt file) is unusable. The message names the file or
    option."""
