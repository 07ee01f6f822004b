"""Engines die loudly: a dead vLLM engine core ends its Ray actor, Ray restarts it, its batches are retried.

The build test runs the text engines as production does, with the engine core in its own process
(VLLM_ENABLE_V1_MULTIPROCESSING=1), kills the reflect stage's EngineCore while it is generating, and checks that
the build still keeps exactly the rows an undisturbed build keeps, with nothing failed.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from test_build import TINY

from pipeline.build import build
from schemas.config import BuildConfig
from stages.base import Stage, StageError
from stages.engines.errors import EngineDead, is_engine_dead

pytestmark = pytest.mark.slow


def test_fatal_errors_are_told_from_row_errors() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    assert is_engine_dead(EngineDeadError())
    assert is_engine_dead(EngineDead("loop stopped"))
    assert is_engine_dead(RuntimeError("CUDA error: an illegal memory access was encountered"))
    try:  # wrapped: the cause decides
        try:
            raise EngineDeadError()
        except EngineDeadError as inner:
            raise ValueError("while generating") from inner
    except ValueError as outer:
        assert is_engine_dead(outer)
    assert not is_engine_dead(EngineGenerateError())
    assert not is_engine_dead(ValueError("prompt is longer than max_model_len"))
    assert not is_engine_dead(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


class _Echo(Stage):
    """A stage whose engine call raises what `error` holds (a real exception class from vLLM)."""

    name = "echo"

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def process(self, batch, rows):  # noqa: ANN001, ANN201
        raise self.error

    def store(self, batch, i, result):  # noqa: ANN001, ANN201
        batch["t1"][i] = result


def _batch(n: int) -> dict:
    from pipeline.graph import rows_to_batch
    from schemas.work import new_row

    return rows_to_batch([new_row(id=f"r{i}", prompt="p", source="s", where="w", unit=0, seed=i, strategy="forward")
                          for i in range(n)])  # fmt: skip


def test_dead_engine_raises_instead_of_failing_every_row() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    with pytest.raises(EngineDead, match="stage echo: EngineDeadError"):
        _Echo(EngineDeadError())(_batch(3))
    # An ordinary error is still pinned on rows (here every row raises it, one by one).
    batch = _Echo(ValueError("bad input"))(_batch(3))
    assert batch["status"] == ["failed"] * 3
    assert batch["error"] == ["ValueError: bad input"] * 3
    assert isinstance(StageError("x"), Exception)


def test_killed_engine_core_fails_every_call_at_once(ray_session, tiny_vlm_config) -> None:
    """The engine core in its own process, killed while requests are in flight: the waiting call and every later one
    raise EngineDead within seconds (vLLM 0.32 alone would leave `step()` waiting forever), none returns text.

    It runs in a Ray actor, a fresh process: vLLM caches its environment once an engine has started in a process
    (this session's in-process engine), so VLLM_ENABLE_V1_MULTIPROCESSING=1 must be set before any engine starts."""

    def _kill_core_with_requests_in_flight(cfg) -> dict:  # noqa: ANN001 (a TextModelConfig; defined here: a test module is not importable on a Ray worker)
        """In a fresh process: start the engine with its core in its own process, put 8 long requests in flight, SIGKILL
        the core, and report what the waiting call and a later call did."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from schemas.reflection import think_regex
        from stages.engines.text import TextRequest, VLLMTextEngine

        engine = VLLMTextEngine(cfg)
        engine.setup()
        core = next(p for p in engine._loop._watch if "EngineCore" in " ".join(p.cmdline()))
        long = [TextRequest(f"Plan {i}.", regex=r"<think>\n[a-z]{600}\n</think>", seed=i) for i in range(8)]
        future = engine._submit(long)
        deadline = time.monotonic() + 300
        while engine._loop.peak_in_flight < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        report = {"in_flight_at_kill": engine._loop.peak_in_flight, "done_before_kill": future.done()}
        core.send_signal(signal.SIGKILL)
        try:
            future.result(timeout=60)
            report["waiting_call"] = "returned text"
        except FutureTimeout:
            report["waiting_call"] = "still waiting after 60 s"
        except EngineDead as exc:
            report["waiting_call"] = f"EngineDead: {exc}"
        try:
            engine.generate([TextRequest("Plan again.", regex=think_regex(16), seed=1)])
            report["later_call"] = "returned text"
        except EngineDead:
            report["later_call"] = "EngineDead"
        return report

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    run = ray_session.remote(num_cpus=0.5, runtime_env={"env_vars": env})(_kill_core_with_requests_in_flight)
    report = ray_session.get(run.remote(tiny_vlm_config), timeout=900)
    assert report["in_flight_at_kill"] == 8 and not report["done_before_kill"], report  # landed mid-generation
    assert report["waiting_call"].startswith("EngineDead: "), report
    assert "is gone" in report["waiting_call"] or "EngineDeadError" in report["waiting_call"], report
    assert report["later_call"] == "EngineDead", report


def _engine_cores(stage: str) -> list[psutil.Process]:
    """The EngineCore processes whose parent is the given stage's Ray actor, once that actor is past __init__."""
    found = []
    for q in psutil.process_iter(["cmdline"]):
        if "VLLM::EngineCore" not in " ".join(q.info["cmdline"] or []):
            continue
        try:
            parent = " ".join(q.parent().cmdline())
        except (psutil.Error, AttributeError):
            continue
        if f"StageActor_{stage})" in parent and "__init__" not in parent:
            found.append(q)
    return found


def _busy(core: psutil.Process, interval: float = 0.5) -> bool:
    """Whether the engine is generating: its process tree burns CPU (an idle engine core blocks on its queue)."""
    procs = [core, *core.children(recursive=True)]
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(interval)
    after = sum(sum(p.cpu_times()[:2]) for p in procs)
    return after - before > 0.2 * interval


def test_killed_engine_core_mid_build_is_replaced_and_nothing_fails(
    tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 12, "generator_seed": 5}
    data["unit_size"] = 4
    data["reflect"]["resources"].update(batch_size=2, concurrent_batches=2)
    cfg = BuildConfig.model_validate(data)

    # The undisturbed build, in this process on the local executor (engine core in-process).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    reference = build(cfg, tmp_path / "reference", executor="local")

    # The same build on Ray with each engine core in its own process, as in production; the driver's value of
    # VLLM_ENABLE_V1_MULTIPROCESSING reaches the actors through their runtime_env.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    out = tmp_path / "out"
    units = out / "state" / "units"
    killed: dict = {}
    cores_seen: set[int] = set()
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            cores = _engine_cores("reflect")
            cores_seen.update(c.pid for c in cores)
            if not killed:
                for core in cores:
                    try:
                        if _busy(core):
                            killed["units_done"] = len(list(units.glob("*.json"))) if units.is_dir() else 0
                            killed["pid"] = core.pid
                            core.send_signal(signal.SIGKILL)
                            break
                    except psutil.Error:
                        pass
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = build(cfg, out, executor="ray")
    finally:
        stop.set()
        thread.join(timeout=10)

    # The fault landed where claimed: on the reflect engine while it generated, before the build had finished.
    assert killed, "the reflect engine core was never seen generating"
    assert killed["units_done"] < 3
    # Ray replaced the actor: a second reflect engine core came up after the kill.
    assert len(cores_seen - {killed["pid"]}) >= 1, cores_seen
    # Nothing failed, and exactly the rows of the undisturbed build were kept.
    assert all(c["failed"] == reference.stage_counts[s]["failed"] for s, c in result.stage_counts.items())
    assert "dead" not in "".join(p.read_text() for p in (out / "rejects").glob("*.jsonl")).lower()
    assert result.stage_counts == reference.stage_counts
    columns = ["id", "t1", "t2"]
    ours = pq.read_table(out / "trajectories", columns=columns).to_pylist()
    theirs = pq.read_table(tmp_path / "reference" / "trajectories", columns=columns).to_pylist()
    assert sorted(ours, key=lambda r: r["id"]) == sorted(theirs, key=lambda r: r["id"])
    assert len(ours) == result.trajectories > 0
