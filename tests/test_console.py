"""The quiet console (pipeline/logs.py): worker output redirected to redacted files, progress lines, and the local
executor's engine logs in OUT/state/logs/. The Ray build's console is checked in test_ray_running.py."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from test_build import TINY

from pipeline.logs import UnitProgress, copy_redacted

FAKE_HF = "hf_FAKEconsoleTokenDoNotLeak42"


class _Trickle(io.RawIOBase):
    """A pipe that hands out a few bytes per read, so secrets arrive split across reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step = data, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk, self.data = self.data[: self.step], self.data[self.step :]
        return chunk


def test_copy_redacted_masks_split_secrets_and_forwards_errors() -> None:
    text = (
        f"INFO loading with {FAKE_HF}\n"
        "(EngineCore pid=7) ERROR 11-29 00:21:44 [core.py:1] EngineCore failed\n"
        f"progress 50%\rprogress 100% {FAKE_HF}\r\n"
        "Traceback (most recent call last):\n"
        "irgl: stage think: fatal engine error\n"
        f"no newline at the end {FAKE_HF}"
    ).encode()
    for step in (1, 5, 7, 64):
        dst, console = io.BytesIO(), io.BytesIO()
        copy_redacted(_Trickle(text, step), dst, console, [FAKE_HF], "think-1.log")
        out = dst.getvalue().decode()
        assert FAKE_HF not in out and out.count("***") == 3, step
        assert out == text.decode().replace(FAKE_HF, "***")
        forwarded = console.getvalue().decode().splitlines()
        assert forwarded == [
            "(EngineCore pid=7) ERROR 11-29 00:21:44 [core.py:1] EngineCore failed  [think-1.log]",
            "Traceback (most recent call last):  [think-1.log]",
            "irgl: stage think: fatal engine error  [think-1.log]",
        ]


def test_copy_redacted_long_line_without_newline() -> None:
    """A line longer than the read size is written in pieces, never cutting a secret in two."""
    text = ("x" * 70_000 + FAKE_HF + "y" * 70_000).encode()
    dst = io.BytesIO()
    copy_redacted(_Trickle(text, 30_000), dst, None, [FAKE_HF], "x")
    assert dst.getvalue() == ("x" * 70_000 + "***" + "y" * 70_000).encode()


def test_redirect_worker_output_catches_python_c_and_child_output(tmp_path: Path) -> None:
    """In a child process: after redirect_worker_output, prints, raw fd writes and a grandchild's output land in the
    file with the secret masked, error lines reach the original stderr, and lines written just before os._exit
    are not lost."""
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys
        from pipeline.logs import redirect_worker_output
        print("before redirect", flush=True)
        path = redirect_worker_output({str(tmp_path / "logs")!r}, "think")
        print("PATH", path, flush=True)
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("vllm").info("engine up with %s", os.environ["HF_TOKEN"])
        os.write(2, b"raw fd 2 write\\n")
        subprocess.run(["sh", "-c", "echo from a child process"], check=True)
        print("ERROR 11-29 boom", file=sys.stderr, flush=True)
        print("last words before os._exit", flush=True)
        os._exit(3)
    """)
    env = {**os.environ, "HF_TOKEN": FAKE_HF}
    # capture_output waits for EOF on stderr, which the log writer holds until it has written everything.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "before redirect\n"  # everything after the redirect went to the file
    files = list((tmp_path / "logs").glob("think-*.log"))
    assert len(files) == 1 and re.fullmatch(r"think-\d+\.log", files[0].name)
    log = files[0].read_text()
    assert FAKE_HF not in log and "engine up with ***" in log
    for line in ("raw fd 2 write", "from a child process", "ERROR 11-29 boom", "last words before os._exit"):
        assert line in log, line
    assert f"PATH {files[0]}" in log
    assert f"ERROR 11-29 boom  [{files[0].name}]" in proc.stderr
    assert FAKE_HF not in proc.stderr and "engine up" not in proc.stderr


def test_redirect_worker_output_verbose_is_a_no_op() -> None:
    from pipeline.logs import redirect_worker_output

    assert redirect_worker_output(None, "think") is None


def test_unit_progress_lines() -> None:
    lines: list[str] = []
    now = [100.0]
    progress = UnitProgress(lines.append, clock=lambda: now[0])
    progress.start(4)
    now[0] = 160.0  # the first unit also pays for engine start-up
    progress(0, {"counts": {"ok": 7, "failed": 1}})
    now[0] = 170.0
    progress(2, {"counts": {"ok": 8}})
    now[0] = 190.0
    progress(1, {"counts": {"ok": 8}})
    now[0] = 200.0
    progress(3, {"counts": {"ok": 8}})
    assert lines == [
        "unit     0 done: failed=1, ok=7 | 1/4 units | elapsed 0:01:00 | ETA ?",
        "unit     2 done: ok=8 | 2/4 units | elapsed 0:01:10 | ETA 0:00:20",
        "unit     1 done: ok=8 | 3/4 units | elapsed 0:01:30 | ETA 0:00:15",
        "unit     3 done: ok=8 | 4/4 units | elapsed 0:01:40 | ETA 0:00:00",
    ]


def test_running_ray_address_follows_rays_lookup(tmp_path: Path, monkeypatch) -> None:
    """No instance recorded: None (start one); `ray start`'s record or $RAY_ADDRESS: that address (join it)."""
    from pipeline.executors import running_ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert running_ray_address() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6391")
    assert running_ray_address().endswith(":6391")  # Ray resolves 127.0.0.1 to this node's IP
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6392")
    assert running_ray_address().endswith(":6392")


def test_local_executor_sends_engine_logs_to_the_file(tmp_path: Path) -> None:
    """`irgl build --executor local`: engines run in the driver; their INFO logs go to OUT/state/logs/driver.log,
    the console keeps the progress lines and the summary."""
    data = yaml.safe_load(TINY.read_text())
    data["unit_size"] = 1
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    env = {**os.environ, "HF_TOKEN": FAKE_HF}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "build", "--config", str(config), "--out", str(out), "--limit", "2",
         "--executor", "local"],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "Traceback" not in console
    assert re.search(r"unit +0 done: .*\| 1/2 units \| elapsed \d:\d\d:\d\d \| ETA ", console)
    assert re.search(r"unit +1 done: .*\| 2/2 units \| elapsed \d:\d\d:\d\d \| ETA 0:00:00", console)
    assert not re.search(r"\bINFO\b", console), [line for line in console.splitlines() if "INFO" in line][:5]
    driver_log = (out / "state" / "logs" / "driver.log").read_text()
    assert "Initializing a V1 LLM engine" in driver_log  # vLLM's INFO lines, from the engines in this process
    assert "irgl.build: 2 prompts in 2 units" in driver_log
    assert FAKE_HF not in driver_log
    markers = [json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("unit-*.json"))]
    assert len(markers) == 2
    kept = sum(m["counts"].get("ok", 0) for m in markers)
    assert json.loads((out / "manifest.json").read_text())["trajectories"] == kept


def test_build_logging_quiet_console_and_driver_log(tmp_path: Path, capsys, monkeypatch) -> None:
    """Quiet: INFO (ours, Ray's, an engine's) only in driver.log, warnings on both, secrets masked, all restored."""
    import logging

    from pipeline.logs import build_logging

    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(logging.getLogger("vllm").handlers))
    logs = tmp_path / "state" / "logs"
    with build_logging(logs, ray=False):
        assert not logs.exists()  # created at the first record only
        logging.getLogger("irgl.build").info("4 prompts with %s", FAKE_HF)
        logging.getLogger("vllm").info("Initializing a V1 LLM engine")
        logging.getLogger("irgl.build").warning("something to see")
        assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM must not put its console handler back
    assert "VLLM_CONFIGURE_LOGGING" not in os.environ
    assert (root.level, root.handlers, logging.getLogger("vllm").handlers) == before
    console = capsys.readouterr().err
    assert "something to see" in console and "prompts" not in console and "Initializing" not in console
    text = (logs / "driver.log").read_text()
    assert "INFO irgl.build: 4 prompts with ***" in text and "INFO vllm: Initializing a V1 LLM engine" in text
    assert "WARNING irgl.build: something to see" in text and FAKE_HF not in text

    with build_logging(logs, ray=True):
        logging.getLogger("ray").info("Started a local Ray instance.")
        logging.getLogger("ray.data").info("Starting execution of Dataset")
        assert "VLLM_CONFIGURE_LOGGING" not in os.environ  # with Ray the actors' vLLM keeps its handler
    assert capsys.readouterr().err == ""
    text = (logs / "driver.log").read_text()
    assert "INFO ray: Started a local Ray instance." in text and "INFO ray.data: Starting execution" in text

    with build_logging(None, ray=False):  # --verbose: INFO on the console
        logging.getLogger("irgl.build").info("verbose line")
    assert "verbose line" in capsys.readouterr().err
