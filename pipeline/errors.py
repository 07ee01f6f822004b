"""The one error a build reports to its user: `BuildError`, raised by every part of `irgl build` (pipeline/build.py,
executors.py, units.py, landing.py) when it cannot start or continue. `irgl build` prints its message as one line and
exits 2; nothing else about the failure is hidden (the cause stays chained)."""


class BuildError(RuntimeError):
    """The build cannot start or continue; the message names the file, field or directory."""
