"""`irgl build` with a Ray instance already running on the machine (`ray start --head`), and its quiet console.

Without --address, irgl does what `ray.init()` does and joins the instance `ray start` recorded (so two Ray
instances never both hand out one machine's GPUs), without passing num_cpus (Ray refuses it then: this used to
end in a ValueError traceback); `--address local` starts a private instance instead.

The head runs in its own temp dir (RAY_TMPDIR) with free ports; the builds run as CLI subprocesses with that
environment, so the pytest process's own Ray (conftest's `ray_session`) is neither joined nor disturbed. The head
is stopped by killing its own processes by pid: `ray stop` would kill every Ray on the machine, this session's
included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from test_build import TINY

RAY = str(Path(sys.executable).with_name("ray"))
FAKE_HF = "hf_FAKErayRunningDoNotLeak77"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pgid: int) -> None:
    """Terminate the head's processes (its process group and their children: the workers), then kill survivors."""
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


class Head:
    def __init__(self, tmp: Path, env: dict[str, str], address: str, session: Path) -> None:
        self.tmp, self.env, self.address, self.session = tmp, env, address, session

    def driver_logs(self, pid: int) -> list[Path]:
        """Ray's log of a driver process that connected to this head (`python-core-driver-<job>_<pid>.log`)."""
        return list((self.session / "logs").glob(f"python-core-driver-*_{pid}.log"))


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    # Short path: Ray's socket paths under it must stay below the 107-byte limit of a Unix socket name.
    tmp = Path(tempfile.mkdtemp(prefix="irgl-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0")
    ports = {
        "--port": _free_port(), "--dashboard-port": _free_port(), "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
    }  # fmt: skip
    cmd = [RAY, "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "false",
           "--temp-dir", str(tmp / "ray"), *(str(x) for kv in ports.items() for x in kv)]  # fmt: skip
    # Its own session: the head's daemons get its process group, not pytest's, so they can be stopped alone.
    start = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        output, _ = start.communicate(timeout=300)
        assert start.returncode == 0, output
        address = (tmp / "ray" / "ray_current_cluster").read_text().strip()
        assert address.endswith(f":{ports['--port']}")
        session = (tmp / "ray" / "session_latest").resolve()
        yield Head(tmp, env, address, session)
    finally:
        _stop(start.pid)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _irgl(env: dict[str, str], *args: str, timeout: int = 1800) -> tuple[int, int, str]:
    """Run the irgl CLI; returns (pid, exit code, stdout + stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.pid, proc.returncode, output


def test_build_joins_a_running_ray_with_a_quiet_console(ray_head: Head, tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["unit_size"] = 2  # 4 prompts: two units, so the progress lines count 1/2 then 2/2
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    env = {**ray_head.env, "HF_TOKEN": FAKE_HF}
    pid, rc, console = _irgl(env, "build", "--config", str(config), "--out", str(out), "--limit", "4")

    # Item 4: no traceback; it joined the running head (Ray wrote this driver's log into the head's session).
    assert rc == 0, console[-4000:]
    assert "Traceback" not in console and "ValueError" not in console
    assert f"joined the Ray instance running on this machine at {ray_head.address}" in console
    assert ray_head.driver_logs(pid), "the build did not connect to the running head"

    # The dataset verifies and holds the trajectories the unit markers counted as kept.
    markers = [json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("unit-*.json"))]
    assert [len(m["ids"]) for m in markers] == [2, 2]
    kept = sum(m["counts"].get("ok", 0) for m in markers)
    rejected = sum(len(p.read_text().splitlines()) for p in (out / "rejects").glob("unit-*.jsonl"))
    assert kept + rejected == 4 and kept > 0
    assert json.loads((out / "manifest.json").read_text())["trajectories"] == kept
    _, vrc, verify_out = _irgl(env, "verify", str(out), timeout=600)
    assert vrc == 0 and f"OK: {out} verifies" in verify_out, verify_out

    # Item 5: per-unit progress lines with k/N, elapsed and ETA; no INFO line (vLLM's, Ray's or ours) on the console.
    assert re.search(r"unit +\d+ done: .*\| 1/2 units \| elapsed \d+:\d\d:\d\d \| ETA (\?|\d+:\d\d:\d\d)", console)
    assert re.search(r"unit +\d+ done: .*\| 2/2 units \| elapsed \d+:\d\d:\d\d \| ETA 0:00:00", console)
    info = [line for line in console.splitlines() if re.search(r"\bINFO\b", line)]
    assert info == [], info[:10]
    assert "Initializing a V1 LLM engine" not in console and "non-default args" not in console
    assert "records per mode" in console  # the summary is still printed

    # The engines' output is in OUT/state/logs/<stage>-<pid>.log, secrets masked.
    logs = out / "state" / "logs"
    by_stage: dict[str, list[Path]] = {}
    for path in logs.glob("*-*.log"):
        by_stage.setdefault(path.name.rsplit("-", 1)[0], []).append(path)
    assert {"think", "draw_initial", "reflect", "draw_refined", "score", "assemble"} <= set(by_stage)
    for stage in ("think", "reflect"):
        text = "".join(p.read_text(errors="replace") for p in by_stage[stage])
        assert "Initializing a V1 LLM engine" in text and re.search(r"\bINFO\b", text), stage
    driver_log = (logs / "driver.log").read_text()
    assert "irgl.build: 4 prompts in 2 units" in driver_log and "joined the Ray instance" in driver_log
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_HF.encode() not in path.read_bytes(), path


def test_address_local_starts_a_private_instance(ray_head: Head, tmp_path: Path) -> None:
    """`--address local` (ray.address: local) starts its own Ray with the config's CPUs, even with a head running."""
    script = (
        "import ray, yaml\n"
        "from pipeline.executors import init_ray\n"
        "from schemas.config import BuildConfig\n"
        f"data = yaml.safe_load(open({str(TINY)!r}))\n"
        "data['ray']['num_cpus'] = 1\n"
        "init_ray(BuildConfig.model_validate(data), 'local')\n"
        "print('GCS', ray.get_runtime_context().gcs_address, 'CPU', ray.cluster_resources()['CPU'])\n"
        "ray.shutdown()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=ray_head.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    match = re.search(r"^GCS (\S+) CPU ([\d.]+)$", output, re.M)
    assert match and match.group(1) != ray_head.address and float(match.group(2)) == 1.0, output
    assert not ray_head.driver_logs(proc.pid)
