"""Exactly-once resume, failure isolation, a killed engine actor, and hostile input, with the real stack.

The kill-anywhere test runs `irgl build` as a separate process (its own local Ray), kills its whole process
group with SIGKILL right after a unit of that run lands (its marker, or its shards, chosen at random; checked to
hit while other units are in flight), reruns the same command, and compares with an uninterrupted run: same
ids, none twice, byte-identical shards and manifest, finished units never redone. The killed-actor test
SIGKILLs the reflect actor mid-batch and checks from the actor's own records that the batch was retried on a
restarted actor.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from test_build import TINY, session_stages

from pipeline.build import build
from pipeline.verify import verify
from schemas import MODES
from schemas.config import BuildConfig
from schemas.trajectory import trajectory_id
from stages.prompts import load_sources

RTL_EMOJI = "\u05d7\u05ea\u05d5\u05dc \u0627\u0644\u0642\u0637 \U0001f63a\U0001f3a8"  # Hebrew, Arabic, emoji
KILL_SEED = int(os.environ.get("IRGL_KILL_SEED", "20261127"))


def _config(tmp: Path, **overrides) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.update(overrides)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(config: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--config", str(config), "--out", str(out)]
    # A new session: the build, its local Ray (GCS, raylet) and every worker share one process group.
    return subprocess.Popen(cmd, start_new_session=True, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for q in psutil.process_iter():  # nothing of that session may survive (it would hold the unit files)
        try:
            if os.getsid(q.pid) == proc.pid:
                q.kill()
        except (psutil.Error, ProcessLookupError):
            pass


def _files(out: Path) -> dict[str, bytes]:
    paths = [*(out / "data").rglob("*"), *(out / "wds").rglob("*"), out / "manifest.json", out / "README.md"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in paths if p.is_file()}


def _second_build_is_refused(config: Path, out: Path, first: subprocess.Popen) -> None:
    """While `first` builds OUT, a second build of it fails at once, naming the first one's pid and host."""
    import socket

    lock = out / "state" / "lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, "the build never took OUT's lock"
        time.sleep(0.2)
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--config", str(config), "--out", str(out)]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr and "irgl build" in second.stderr
    assert first.poll() is None  # refused while the first build still runs: at once, not after waiting for it


def _landed(out: Path) -> dict[str, dict]:
    """The unit markers in OUT by file name (a unit is landed once its marker exists; `shards` is null until its
    shards are written)."""
    units = out / "state" / "units"
    found = {}
    for path in sorted(units.glob("unit-*.json")) if units.is_dir() else []:
        try:
            found[path.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced right now: not landed yet for this purpose
            pass
    return found


def test_kill_anywhere_then_resume_is_exactly_once_and_byte_identical(tmp_path: Path) -> None:
    """Kill the whole build (SIGKILL to its process group) twice, each time at a moment observed on disk
    while other units are still in the stages: right after a unit of that run has written its marker (its shards
    are being written) or right after a unit of that run has its shards (the next one is on its way), chosen at
    random; then run it to the end. Each kill is checked to have hit with units in flight (some landed in that
    run, not all). The result must equal an uninterrupted build byte for byte, with every id once, and the units
    that had landed before a kill are not run again (their trajectory files are never rewritten)."""
    data = yaml.safe_load(TINY.read_text())
    for stage in ("think", "draw_initial", "reflect", "draw_refined", "score"):
        data[stage]["resources"]["batch_size"] = 2  # one unit per batch: units leave the stages one after another
    for stage in ("think", "reflect"):
        data[stage]["resources"]["concurrent_batches"] = 1
    units_total = 3  # six prompts; every build start pays for Ray and the engines, so two kills keep the suite short
    config = _config(tmp_path, prompts={"kind": "generator", "generator_count": 6, "generator_seed": 4}, unit_size=2,
                     **{k: data[k] for k in ("think", "draw_initial", "reflect", "draw_refined", "score")})  # fmt: skip
    log = tmp_path / "build.log"
    ref = tmp_path / "reference"
    proc = _start(config, ref, log)
    _second_build_is_refused(config, ref, proc)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert len(_landed(ref)) == units_total

    out = tmp_path / "interrupted"
    rng = random.Random(KILL_SEED)
    stale, kills = [], []
    traj_times: dict[str, int] = {}  # trajectory file -> mtime, for every unit landed at some kill
    for _ in range(2):
        before = _landed(out)
        when = rng.choice(["marker", "shards"])

        def hit(now: dict[str, dict], before: dict[str, dict] = before, when: str = when) -> bool:
            new = [m for name, m in now.items() if name not in before]  # units landed by this run
            return bool(new) if when == "marker" else any(m["shards"] for m in new)

        proc = _start(config, out, log)
        deadline = time.monotonic() + 900
        while not hit(_landed(out)):
            assert proc.poll() is None, f"the run ended before a unit landed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no unit landed in 900 s"
            time.sleep(0.01)
        _kill_group(proc)
        after = _landed(out)
        kills.append((when, len(before), len(after)))
        # Units were in flight when the kill hit: this run had landed some, not all.
        assert len(before) < len(after) < units_total, kills
        holder = json.loads((out / "state" / "lock").read_text() or "{}")
        assert holder.get("pid") == proc.pid, holder  # killed while it held OUT
        stale.append(proc.pid)
        for marker in after.values():
            path = out / next(f for f in marker["files"] if f.startswith("trajectories/"))
            traj_times.setdefault(path.name, path.stat().st_mtime_ns)
    print(f"kill seed {KILL_SEED}: (trigger, units landed before, after) per kill: {kills}")
    # Each kill left OUT's lock file naming a process that is gone (a stale lock); every next run took OUT anyway.
    assert all(not psutil.pid_exists(pid) for pid in stale), stale
    proc = _start(config, out, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]

    assert verify(out) == []
    ref_ids = pq.read_table(ref / "trajectories", columns=["id"]).column("id").to_pylist()
    ids = pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 and sorted(ids) == sorted(ref_ids)
    for m in MODES:
        rids = pq.read_table(out / "data" / m.name, columns=["id"]).column("id").to_pylist()
        assert len(rids) == len(set(rids)) == 6
    a, b = _files(ref), _files(out)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # Exactly once: a unit that had landed before a kill was skipped by the later runs, never run or written again.
    now = {p.name: p.stat().st_mtime_ns for p in (out / "trajectories").glob("*.parquet")}
    assert traj_times and {k: now[k] for k in traj_times} == traj_times


def _faulted(row_id: str, stage: str, rate: float) -> bool:
    """The documented fault-injection rule (stages/base.py), written here from its statement, not imported: a row
    fails in a stage when a `random.Random` seeded with the string "<row id>:<stage>" draws below the rate. So the
    same rows fail on every run with the same rate."""
    return random.Random(f"{row_id}:{stage}").random() < rate


def test_injected_faults_are_isolated_counted_and_retried(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 6, "generator_seed": 8}
    data["unit_size"] = 3
    data["fault_injection"] = {"reflect": 0.5}
    cfg = BuildConfig.model_validate(data)
    stages = session_stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    out = tmp_path / "out"
    result = build(cfg, out, executor="local", stages=stages)
    # The ids, computed here from the prompts as the README states them (not read back from what the build wrote).
    prompts, _ = load_sources(cfg.prompts)
    all_ids = [trajectory_id(p.text, p.source, cfg.seed, cfg.generation_hash()) for p in prompts]
    failed = {i for i in all_ids if _faulted(i, "reflect", 0.5)}
    assert 0 < len(failed) < 6, "seed the prompts so that some, not all, rows fail"
    c = result.stage_counts
    assert c["reflect"] == {"in": 6, "ok": 6 - len(failed), "filtered": 0, "failed": len(failed), "capped": 0}
    assert c["assemble"] == {"in": 6 - len(failed), "ok": 6 - len(failed), "filtered": 0, "failed": 0, "capped": 0}
    assert all(v["in"] == v["ok"] + v["filtered"] + v["failed"] for v in c.values())
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == sorted(failed)  # each failed row rejected once
    assert {(r["status"], r["stage"], r["reason"]) for r in rejects} == {
        ("failed", "reflect", "injected fault (fault_rate=0.5)")
    }
    kept = pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist()
    assert kept == [i for i in all_ids if i not in failed]  # the others kept, in source order
    markers = [json.loads(p.read_text()) for p in sorted((out / "state" / "units").glob("*.json"))]
    assert [i for m in markers for i in m["failed_ids"]] == [i for i in all_ids if i in failed]
    assert json.loads((out / "manifest.json").read_text())["counts"][MODES[0].name] == 6 - len(failed)

    # Rerun without faults (not part of the generation hash): only the failed rows run again.
    data["fault_injection"] = {}
    clean = BuildConfig.model_validate(data)
    assert clean.generation_hash() == cfg.generation_hash()
    stages = session_stages(clean, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    calls: list[int] = []
    original = stages[0].process
    stages[0].process = lambda batch, rows: (calls.append(len(rows)), original(batch, rows))[1]
    again = build(clean, out, executor="local", stages=stages)
    assert sum(calls) == len(failed)  # think ran for the retried rows only
    assert again.stage_counts["assemble"]["ok"] == 6 and again.stage_counts["reflect"]["failed"] == 0
    assert verify(out) == []
    ids = pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist()
    assert ids == all_ids  # source order, each once
    assert all(not p.read_text() for p in (out / "rejects").glob("*.jsonl"))


def _recording_reflect() -> type:
    """ReflectStage that records every batch it starts and finishes (file per batch: the row ids, the actor's pid)
    under `record`, and on the `kill_at`-th batch started by any actor SIGKILLs its own process while that batch is
    generating (once: `killed.json` says where it hit). Defined in a function: Ray gets the class by value."""
    from stages.reflect import ReflectStage

    class RecordingReflect(ReflectStage):
        def __init__(self, record: str, out: str, kill_at: int, **kwargs) -> None:  # noqa: ANN003
            super().__init__(**kwargs)
            self.record, self.out, self.kill_at, self.batches = Path(record), Path(out), kill_at, 0

        async def aprocess(self, batch, rows):  # noqa: ANN001, ANN201
            import asyncio

            ids = [batch["id"][i] for i in rows]
            started = len(list(self.record.glob("start-*.json")))  # batches started so far, by every actor
            name = f"{os.getpid()}-{self.batches}.json"
            self.batches += 1
            (self.record / f"start-{name}").write_text(json.dumps(ids))
            work = asyncio.ensure_future(super().aprocess(batch, rows))
            if started + 1 == self.kill_at and not (self.record / "killed.json").exists():
                await asyncio.sleep(0.3)  # the engine is generating this batch's rows now
                units = self.out / "state" / "units"
                landed = len(list(units.glob("*.json"))) if units.is_dir() else 0
                evidence = {"pid": os.getpid(), "ids": ids, "batch_done": work.done(), "units_landed": landed}
                (self.record / "killed.json").write_text(json.dumps(evidence))
                os.kill(os.getpid(), signal.SIGKILL)
            results = await work
            (self.record / f"done-{name}").write_text(json.dumps(ids))
            return results

    return RecordingReflect


def test_killed_stage_actor_is_restarted_and_its_rows_retried(tmp_path: Path, ray_session) -> None:
    """The reflect actor is SIGKILLed while its second batch is generating: Ray restarts it, the batch runs again on
    the new actor, and every id is still written exactly once with nothing failed."""
    import dataclasses

    from pipeline.graph import stage_graph

    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 6, "generator_seed": 11}
    data["unit_size"] = 2
    for stage in ("think", "draw_initial", "reflect", "draw_refined", "score"):
        data[stage]["resources"]["batch_size"] = 2
    cfg = BuildConfig.model_validate(data)
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    graph = [
        dataclasses.replace(spec, cls=_recording_reflect(), kwargs={**spec.kwargs, "record": str(record),
                                                                    "out": str(out), "kill_at": 2})
        if spec.name == "reflect" else spec
        for spec in stage_graph(cfg)
    ]  # fmt: skip
    result = build(cfg, out, executor="ray", graph=graph)

    def batches(kind: str) -> list[tuple[int, list[str]]]:
        return [(int(p.name.split("-")[1]), json.loads(p.read_text())) for p in record.glob(f"{kind}-*.json")]

    # The kill landed mid-batch, with units still to land: the batch had started on the actor and not finished.
    killed = json.loads((record / "killed.json").read_text())
    assert not killed["batch_done"] and killed["units_landed"] < 3, killed
    assert not psutil.pid_exists(killed["pid"])
    assert killed["ids"] in [ids for pid, ids in batches("start") if pid == killed["pid"]]
    assert killed["ids"] not in [ids for pid, ids in batches("done") if pid == killed["pid"]]
    # Ray restarted the actor and retried the batch on it: the same rows ran again, in another process, to the end.
    retried = [pid for pid, ids in batches("done") if ids == killed["ids"]]
    assert retried and killed["pid"] not in retried, (killed, batches("done"))
    # Every row was processed, none failed, and each id is written once.
    assert sorted(i for _, ids in batches("done") for i in ids) == sorted(set(i for _, ids in batches("start")
                                                                                for i in ids))  # fmt: skip
    assert result.stage_counts["assemble"]["ok"] == 6
    assert all(v["failed"] == 0 for v in result.stage_counts.values())
    assert verify(out) == []
    ids = pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6


def _irgl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False)


def test_hostile_prompt_file(tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config) -> None:
    lines = [
        json.dumps({"prompt": "a red apple on a table"}).encode(),
        b"\xc3\x28 invalid utf-8",
        b'{"prompt": "unterminated',
        json.dumps({"text": "missing field"}).encode(),
        json.dumps({"prompt": ""}).encode(),
        json.dumps({"prompt": " \t "}).encode(),
        json.dumps({"prompt": "a cat\x00\x1b[31m with control characters"}).encode(),
        json.dumps({"prompt": "word " * 4000}).encode(),
        json.dumps({"prompt": RTL_EMOJI}, ensure_ascii=False).encode(),
        json.dumps({"prompt": "a red apple on a table"}).encode(),
        b"   ",
    ]  # fmt: skip
    prompts = tmp_path / "hostile.jsonl"
    prompts.write_bytes(b"\n".join(lines))
    data = yaml.safe_load(TINY.read_text())
    cfg = BuildConfig.model_validate(data)
    stages = session_stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    out = tmp_path / "out"
    result = build(cfg, out, prompts_path=str(prompts), executor="local", stages=stages)
    r = result.prompts
    assert r.read == 11 and r.kept == 3
    assert r.dropped == {"invalid_utf8": 1, "malformed_json": 1, "missing_field": 1, "empty": 3, "too_long": 1,
                         "duplicate": 1}  # fmt: skip
    for n, reason in [(2, "invalid UTF-8"), (3, "malformed JSON"), (4, "no field 'prompt'"), (8, "characters > ")]:
        assert any(p.startswith(f"hostile.jsonl:{n}: ") and reason in p for p in r.problems), (n, r.problems)
    kept = [t["prompt"] for t in pq.read_table(out / "trajectories").to_pylist()]
    assert kept == ["a red apple on a table", "a cat[31m with control characters", RTL_EMOJI]
    assert verify(out) == []
    state = json.loads((out / "state" / "prompts.json").read_text())
    assert state["read"] == 11 and state["kept"] == 3 and "hostile.jsonl:2: invalid UTF-8" in state["problems"][0]


def test_bad_paths_and_foreign_out_fail_in_one_line(tmp_path: Path) -> None:
    proc = _irgl("build", "--prompts", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith("not a file") and proc.stderr.count("\n") == 1
    proc = _irgl("build", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml: config file not found" in proc.stderr
    # An OUT built with another generation config is refused before anything loads.
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    (out / "state" / "build.json").write_text(json.dumps({"generation_hash": "0123456789abcdef"}))
    (tmp_path / "p.txt").write_text("a cat\n")
    proc = _irgl("build", "--prompts", str(tmp_path / "p.txt"), "--out", str(out))
    assert proc.returncode == 2 and "different generation config" in proc.stderr and "--force" in proc.stderr
    assert proc.stderr.count("\n") == 1
    # A dataset directory that irgl build did not start.
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    proc = _irgl("build", "--prompts", str(tmp_path / "p.txt"), "--out", str(foreign))
    assert proc.returncode == 2 and "did not start" in proc.stderr


@pytest.mark.parametrize("rate", [1.5, -0.1])
def test_fault_rate_must_be_a_share(rate: float) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["fault_injection"] = {"think": rate}
    with pytest.raises(ValueError, match="fault_injection"):
        BuildConfig.model_validate(data)


def test_force_replaces_a_build_with_another_config(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    from pipeline.errors import BuildError

    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 2, "generator_seed": 1}
    first = BuildConfig.model_validate(data)
    second = BuildConfig.model_validate({**data, "seed": 1})
    out = tmp_path / "out"
    stages = session_stages(first, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    build(first, out, executor="local", stages=stages)
    old_ids = set(pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist())
    with pytest.raises(BuildError, match="different generation config"):
        build(second, out, executor="local", stages=stages)
    build(second, out, executor="local", stages=stages, force=True)
    new_ids = set(pq.read_table(out / "trajectories", columns=["id"]).column("id").to_pylist())
    assert len(new_ids) == 2 and not new_ids & old_ids
    assert verify(out) == []
    assert json.loads((out / "state" / "build.json").read_text())["generation_hash"] == second.generation_hash()


def test_rerun_rewrites_missing_or_reconfigured_shards_without_the_stages(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    """Shards are derived per unit from its trajectories: a lost shard file, or another shard config, is redone by a
    rerun from the unit's trajectory file, with no row sent through the stages again."""
    data = yaml.safe_load(TINY.read_text())
    data.update(prompts={"kind": "generator", "generator_count": 4, "generator_seed": 2}, unit_size=2, shard_writers=1)
    cfg = BuildConfig.model_validate(data)
    out = tmp_path / "out"
    stages = session_stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    first = build(cfg, out, executor="local", stages=stages)
    assert first.units_run == 2 and first.stage_seconds
    before = _files(out)
    traj_times = {p.name: p.stat().st_mtime_ns for p in (out / "trajectories").iterdir()}
    lost = out / "data" / "initial_full_learning" / "train-00001-000.parquet"
    lost.unlink()

    again = build(cfg, out, executor="local", stages=stages)
    assert (again.units_run, again.units_skipped, again.stage_seconds) == (0, 2, {})  # no row went through a stage
    assert _files(out) == before  # the lost file is back, byte for byte; nothing else changed

    regrouped = BuildConfig.model_validate({**data, "shards": {"rows_per_group": 1}})
    third = build(regrouped, out, executor="local", stages=stages)
    assert (third.units_run, third.stage_seconds) == (0, {})
    assert verify(out) == []
    for m in MODES:
        for path in (out / "data" / m.name).iterdir():
            meta = pq.ParquetFile(path).metadata
            assert meta.num_row_groups == meta.num_rows == 2  # each unit's 2 records, one per row group now
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trajectories").iterdir()} == traj_times
