"""Scale features around the shards: `irgl verify` split by unit over processes (same findings as one process),
the record of clean units that lets publish skip decoding them, and the lock on OUT. Real files, real processes."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.lock import OutLocked, hold_out
from pipeline.shards import write_dataset
from pipeline.synthetic import synthetic_trajectories
from pipeline.verify import RECORD_PATH, verify
from schemas.config import ShardConfig

N, UNIT = 12, 3  # four units


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "clean"
    write_dataset(out, synthetic_trajectories(N, seed=11), ShardConfig(rows_per_group=2), unit_size=UNIT)
    (out / "state").mkdir()
    (out / "state" / "build.json").write_text(json.dumps({"config": {"name": "scale"}}))  # a build directory
    return out


def _copy(clean: Path, dest: Path) -> Path:
    shutil.copytree(clean, dest)
    return dest


def _refresh(out: Path, rel: str) -> None:
    """Make the manifest agree with a file changed on purpose (size and sha256), as a forger would."""
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"] == rel:
            f["bytes"] = (out / rel).stat().st_size
            f["sha256"] = hashlib.sha256((out / rel).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


def _broken_image_record(out: Path, rel: str, index: int) -> str:
    """Cut the image of one record short inside its base64 (only a full decode notices); return the record id."""
    rows = pq.read_table(out / rel).to_pylist()
    turns = json.loads(rows[index]["conversation"])
    part = next(p for p in turns[-1]["content"] if p["type"] == "image")
    data = base64.b64decode(part["content"])
    part["content"] = base64.b64encode(data[: len(data) * 2 // 3]).decode("ascii")
    rows[index]["conversation"] = json.dumps(turns)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(out / rel)), out / rel, row_group_size=2)
    _refresh(out, rel)
    return rows[index]["id"]


def test_parallel_verify_finds_exactly_what_one_process_finds(clean: Path, tmp_path: Path) -> None:
    assert verify(clean, jobs=1) == [] and verify(clean, jobs=2) == []
    out = _copy(clean, tmp_path / "bad")
    # unit 1: a flipped byte; unit 2: a truncated tar; unit 3: a record that only a full image decode rejects, and
    # unit 0's records copied in as duplicates; plus a file the manifest does not list.
    flip = out / "data/initial_full_learning/train-00001-000.parquet"
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flip.write_bytes(bytes(data))
    tar = out / "wds/improving_full_learning/improving_full_learning-00002-000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    broken = _broken_image_record(out, "data/improving_full_learning/train-00003-000.parquet", 1)
    dup = "data/initial_thinking_generation_learning/train-00003-000.parquet"
    shutil.copy(out / "data/initial_thinking_generation_learning/train-00000-000.parquet", out / dup)
    _refresh(out, dup)
    (out / "wds/initial_full_learning/stray.tar").write_bytes(b"x")

    one = verify(out, jobs=1)
    two = verify(out, jobs=2)
    assert one == two  # same problems, same order
    text = [str(p) for p in one]
    assert any(p.path == flip.relative_to(out).as_posix() and "sha256" in p.message for p in one), text
    assert any(p.path == tar.relative_to(out).as_posix() and "size" in p.message for p in one), text
    assert any(p.record == broken and "image" in p.message for p in one), text
    assert sum(p.path == dup and p.message == "duplicate record id" for p in one) == UNIT, text
    assert any(p.path == "wds/initial_full_learning/stray.tar" for p in one), text
    assert not (out / RECORD_PATH).is_file() or "00003" not in json.loads((out / RECORD_PATH).read_text())["groups"]


def test_publish_style_reuse_skips_decoding_only_what_verified_unchanged(clean: Path, tmp_path: Path) -> None:
    out = _copy(clean, tmp_path / "reuse")
    assert verify(out, jobs=2) == []
    record = json.loads((out / RECORD_PATH).read_text())
    assert sorted(record["groups"]) == ["00000", "00001", "00002", "00003"]
    assert all(g["decode_images"] for g in record["groups"].values())

    # A record only a full decode rejects, written together with a record that claims the unit was clean: with
    # reuse the claim is honoured (no decode: the problem is not seen), without it the problem is found. This is
    # what reuse saves - and why the record must name the exact bytes (sha256) it vouches for.
    rel = "data/improving_full_learning/train-00001-000.parquet"
    bad_id = _broken_image_record(out, rel, 0)
    new_sha = json.loads((out / "manifest.json").read_text())
    forged = {**record}
    forged["groups"]["00001"]["files"][rel] = next(f["sha256"] for f in new_sha["files"] if f["path"] == rel)
    (out / RECORD_PATH).write_text(json.dumps(forged))
    assert verify(out, reuse=True) == []
    found = verify(out, reuse=False)  # the decode fails; the WebDataset copy (intact) now differs from it too
    assert {p.record for p in found} == {bad_id} and any("image" in p.message for p in found), found

    # Bytes that changed after the record (the manifest not updated): reuse still re-hashes and says so.
    good = _copy(clean, tmp_path / "changed")
    assert verify(good) == []
    victim = good / "wds/initial_full_learning/initial_full_learning-00002-000.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01
    victim.write_bytes(bytes(data))
    found = verify(good, reuse=True)
    assert [(p.path, "sha256" in p.message) for p in found] == [(victim.relative_to(good).as_posix(), True)]
    assert "00002" not in json.loads((good / RECORD_PATH).read_text())["groups"]  # no longer vouched for


def _holder(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pipeline.lock import hold_out\n"
        f"with hold_out({str(out)!r}, 'irgl build'):\n    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_holder_at_once_and_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        started = time.monotonic()
        with pytest.raises(OutLocked, match=rf"irgl build \(pid {holder.pid} on host {socket.gethostname()}"):
            with hold_out(out, "irgl publish"):
                pass
        # The CLI: a build on that OUT fails with the holder named (before loading any model), exit code 2.
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "build", "--out", str(out), "--limit", "2"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr, proc.stderr
        assert holder.poll() is None and time.monotonic() - started < 300
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's file is still there, naming it: a stale lock. It does not hold anything.
    assert json.loads((out / "state" / "lock").read_text())["pid"] == holder.pid
    with hold_out(out, "irgl build") as path:
        assert json.loads(path.read_text())["pid"] != holder.pid
    assert (out / "state" / "lock").read_text() == ""  # released: nobody holds OUT
