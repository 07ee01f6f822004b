"""Where a build's output goes: the console shows progress, warnings and the summary; engine logs go to files.

- **Stage actors** (`redirect_worker_output`): file descriptors 1 and 2 of the actor's process are pointed at a pipe
  before its engine loads, so Python logging, prints, C/C++ output and the processes the engine starts (vLLM's
  engine core, tensor-parallel workers, which inherit the descriptors) all land in one file,
  `OUT/state/logs/<stage>-<pid>.log`. A small separate process reads the pipe, masks every known secret value and
  writes the file; it outlives an actor that dies abruptly (`os._exit`, SIGKILL) long enough to write the last
  lines, which is why it is a process and not a thread. Error lines, tracebacks and irgl's own `irgl:` lines are
  also passed on to the actor's original stderr, so Ray still shows them on the driver's console.
- **The driver** (`build_logging`): its own INFO lines and Ray's go to `OUT/state/logs/driver.log`; the console
  keeps WARNING and above. Engines that run in the driver (the local executor, the tiny-model builder) log to the
  same file: their loggers get the file handler, and vLLM is told not to install its console handler again
  (`VLLM_CONFIGURE_LOGGING=0` while the build runs: vLLM 0.32 re-applies its logging config when an engine starts).
- **Progress** (`UnitProgress`): one line per finished unit with `k/N units`, elapsed time and an ETA.

`--verbose` (log_dir None) leaves everything on the console as before. Nothing heavy is imported here: this module
runs at the top of every stage actor and, as `python -m pipeline.logs FILE`, as the log writer process.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from pipeline.secrets import MASK, RedactingFilter, secret_values

#: Under OUT/state/.
LOG_DIR = "logs"
DRIVER_LOG = "driver.log"

#: Loggers of the engines and model libraries that may run in the driver process.
ENGINE_LOGGERS = ("vllm", "diffusers", "transformers", "open_clip", "torch", "huggingface_hub", "PIL")

#: Lines of a worker log that also go to the console: errors (vLLM's `(EngineCore pid=1) ERROR ...`, Python's
#: `ERROR:name:`), tracebacks, fatal errors, and irgl's own worker messages (`irgl: stage think: ...`).
_CONSOLE_LINE = re.compile(
    rb"^(?:\([^)]*\) )?(?:ERROR|CRITICAL)\b|^(?:ERROR|CRITICAL):|^Traceback \(most recent call last\)"
    rb"|^Fatal Python error|^irgl: "
)
_CHUNK = 1 << 16


# ---------------------------------------------------------------------------------------------------------------
# Stage actors


def redirect_worker_output(log_dir: str | None, name: str) -> Path | None:
    """Send this process's stdout and stderr (fds 1 and 2) to `log_dir/<name>-<pid>.log` through a redacting
    writer process. Call it before the engine loads. No-op when `log_dir` is None (`--verbose`).

    Returns the log file's path (None when nothing was redirected).
    """
    if not log_dir:
        return None
    path = Path(log_dir) / f"{name}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        # Its stdout/stderr stay this process's original ones (Ray's worker files, streamed to the driver): that is
        # where the error lines it passes on must go.
        subprocess.Popen([sys.executable, "-m", "pipeline.logs", str(path)], stdin=read_end, close_fds=True)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    os.close(read_end)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    return path


def copy_redacted(src: BinaryIO, dst: BinaryIO, console: BinaryIO | None, secrets: list[str], label: str) -> None:
    """Copy `src` to `dst` until EOF with every secret value masked; lines that match `_CONSOLE_LINE` also go to
    `console`, tagged with `label`. Text is written line by line (a progress bar's `\\r` counts as a line end) so
    the file is current; a secret is never split across two writes."""
    values = [s.encode() for s in secrets]
    keep = max((len(v) for v in values), default=1) - 1  # a tail this long may hold the start of a secret
    mask = MASK.encode()
    pending = b""

    def write(data: bytes) -> None:
        for value in values:
            data = data.replace(value, mask)
        dst.write(data)
        dst.flush()
        if console is not None:
            forward = [line for line in data.splitlines() if _CONSOLE_LINE.search(line)]
            if forward:
                console.write(b"".join(line + f"  [{label}]\n".encode() for line in forward))
                console.flush()

    while True:
        chunk = src.read1(_CHUNK) if hasattr(src, "read1") else src.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
        cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
        if not cut and len(pending) > _CHUNK:
            cut = len(pending) - keep  # a very long line: write all but the tail that may start a secret
        if cut:
            write(pending[:cut])
            pending = pending[cut:]
    if pending:
        write(pending)


def _writer_main(path: str) -> None:
    """The log writer process: stdin (the actor's fds 1 and 2) -> the file, redacted."""
    import signal

    # Ctrl-C reaches the whole foreground process group: keep writing until the actor's side closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(path, "ab", buffering=0) as dst:
        copy_redacted(sys.stdin.buffer, dst, sys.stderr.buffer, secret_values(), Path(path).name)


# ---------------------------------------------------------------------------------------------------------------
# The driver


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates the file (and its directory) at the first record, so that a build refused
    before it logs anything (bad --out) leaves no file behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self) -> TextIO:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def build_logging(log_dir: Path | None, *, ray: bool = True) -> Iterator[None]:
    """The driver's logging for one build: console at WARNING (INFO when `log_dir` is None, i.e. --verbose),
    INFO and engine logs to `log_dir/driver.log`. `ray`: the stages run on Ray (quiet Ray's and Ray Data's console
    INFO lines; imports ray); otherwise they run in this process (the local executor). Restored on exit."""
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    console.setLevel(logging.INFO if log_dir is None else logging.WARNING)
    console.addFilter(RedactingFilter())
    root.setLevel(logging.INFO)
    root.handlers = [console]
    if log_dir is None:
        try:
            yield
        finally:
            root.setLevel(saved_root[0])
            root.handlers = saved_root[1]
        return

    file = _LazyFileHandler(Path(log_dir) / DRIVER_LOG)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file.setLevel(logging.INFO)
    file.addFilter(RedactingFilter())
    root.addHandler(file)
    restore: list[Any] = []
    if ray:
        import ray.data  # noqa: F401  (configures the 'ray' and 'ray.data' loggers; later imports would undo ours)

        forward = _Forward(file)
        for name in ("ray", "ray.data"):
            lg = logging.getLogger(name)
            # They do not propagate: their console handlers get WARNING, and the file gets their INFO lines.
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    restore.append((h.setLevel, h.level))
                    h.setLevel(max(h.level, logging.WARNING))
            lg.addHandler(forward)
            restore.append((lg.removeHandler, forward))
        # Ray Data's issue detector warns every 30 s that actors use memory they did not request (a dozen lines
        # each time, on every build): into the file only.
        detector = logging.getLogger("ray.data._internal.issue_detection")
        restore.append((_set_logger, detector, list(detector.handlers), detector.propagate, detector.level))
        _set_logger(detector, [forward], False, logging.INFO)
    for name in ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        restore.append((_set_logger, lg, list(lg.handlers), lg.propagate, lg.level))
        _set_logger(lg, [file], False, lg.level if lg.level != logging.NOTSET else logging.INFO)
    vllm_env = os.environ.get("VLLM_CONFIGURE_LOGGING")
    if not ray:
        # vLLM (re)applies its logging config when an engine starts, which would put its console handler back on
        # the 'vllm' logger; with this off it leaves the logger (and our file handler) alone. Not with Ray: a local
        # Ray started now inherits this environment, and vLLM in the actors must keep its handler (their fds go to
        # the log files).
        os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    try:
        yield
    finally:
        if vllm_env is None:
            os.environ.pop("VLLM_CONFIGURE_LOGGING", None)
        else:
            os.environ["VLLM_CONFIGURE_LOGGING"] = vllm_env
        for fn, *args in reversed(restore):
            fn(*args)
        root.setLevel(saved_root[0])
        root.handlers = saved_root[1]
        file.close()


class _Forward(logging.Handler):
    """Hands records to another handler. Ray's `ray.init` sets its own formatter on every handler of the 'ray'
    logger; it lands on this one, and the file keeps one format."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _set_logger(lg: logging.Logger, handlers: list[logging.Handler], propagate: bool, level: int) -> None:
    lg.handlers = handlers
    lg.propagate = propagate
    lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------------------
# Progress


def clock(seconds: float) -> str:
    """`h:mm:ss`, the elapsed and ETA format of every progress line."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The `k/N <noun> | elapsed h:mm:ss | ETA h:mm:ss` part of every progress line of a long command.

    `advance(n)` counts n more finished items and returns that text. The ETA uses the pace since the first item(s)
    finished (the first also paid for start-up: engines, models), so it is `?` until something finishes after
    them, and 0 when nothing is left.
    """

    def __init__(self, total: int = 0, noun: str = "units", clock: Any = time.monotonic) -> None:
        self.noun = noun
        self.clock = clock
        self.start(total)

    def start(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = self.clock()
        self.first: tuple[float, int] | None = None  # (time, items done) when the first items finished

    def eta(self, now: float) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if self.first is None or self.done <= self.first[1]:
            return None
        return (now - self.first[0]) / (self.done - self.first[1]) * left

    def advance(self, n: int = 1) -> str:
        now = self.clock()
        self.done += n
        if self.first is None:
            self.first = (now, self.done)
        eta = self.eta(now)
        total = max(self.total, self.done)
        return (
            f"{self.done}/{total} {self.noun} | elapsed {clock(now - self.started)} | "
            f"ETA {'?' if eta is None else clock(eta)}"
        )


class UnitProgress(Progress):
    """The `progress` callback of build, verify and publish: one line per finished unit, `unit N done: ok=.. |
    k/N units | elapsed h:mm:ss | ETA h:mm:ss` (`verb` says what finished: the build's units are "done", verify's
    "verified").

    `build()` and `verify()` call `start(units)` before the work starts, then `self(unit, marker)` as each unit
    lands (`marker["counts"]`: what the line shows).
    """

    def __init__(self, echo: Any = print, clock: Any = time.monotonic, verb: str = "done") -> None:
        super().__init__(0, "units", clock)
        self.echo = echo
        self.verb = verb

    def __call__(self, unit: int | str, marker: dict[str, Any]) -> None:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(marker.get("counts", {}).items()))
        self.echo(f"unit {unit!s:>5} {self.verb}: {counts} | {self.advance()}")


if __name__ == "__main__":
    _writer_main(sys.argv[1])
