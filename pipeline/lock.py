"""One writer per OUT: `irgl build`, `irgl verify` and `irgl publish` hold `OUT/state/lock` while they run.

The lock is an exclusive `flock` on that file, so the kernel releases it when the holder's process ends, however it
ends: a build killed with SIGKILL leaves the file behind (a stale lock) but not the lock, and the next run takes it
without any clean-up. The file holds the holder's pid, host, command and start time, so that a second command is
refused at once with a message that says who holds OUT.

Network file systems: Linux NFS (v4, or v3 with lockd) supports `flock` across hosts. Where a file system refuses
it (ENOLCK, EOPNOTSUPP), the lock falls back to the file's contents: a holder on this host whose pid no longer runs
is stale; a holder on another host is taken to be alive (the message says to delete the file if it is not).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_PATH = "state/lock"

_held: dict[str, str] = {}  # OUT (resolved) -> command, for the locks this process holds (re-entrant holding)


class OutLocked(RuntimeError):
    """Another irgl command holds OUT. The message names it (pid, host, command, since when)."""


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"{holder.get('command', 'an irgl command')} (pid {holder.get('pid', '?')} on host " \
        f"{holder.get('host', '?')}, since {when})"  # fmt: skip


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive_here(holder: dict) -> bool:
    """True when the holder recorded in the file runs on this host (pid alive), or on another host (unknowable)."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # a process we may not signal is alive
    return True


@contextlib.contextmanager
def hold_out(out: Path, command: str) -> Iterator[Path]:
    """Hold OUT for the duration of the block; raise OutLocked at once if another command holds it."""
    path = Path(out) / LOCK_PATH
    key = str(Path(out).resolve())
    if key in _held:  # e.g. the build verifies its own output: already ours
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: children do not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise OutLocked(
                f"{out}: in use by {_describe(holder)}; wait for it to finish or stop it "
                "(a killed command releases OUT by itself)"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = _read_holder(fd)  # no flock here: trust the recorded holder while it runs
            if holder and holder.get("pid") != os.getpid() and _alive_here(holder):
                raise OutLocked(
                    f"{out}: in use by {_describe(holder)} (this file system has no flock; if that command is no "
                    f"longer running, delete {path})"
                ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time(),
              "argv": sys.argv[:8]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me, indent=1).encode("utf-8"))
        os.fsync(fd)
        _held[key] = command
        try:
            yield path
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an empty file: nobody holds OUT
    finally:
        os.close(fd)  # releases the flock
