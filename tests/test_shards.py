"""Writers -> verify, with real pyarrow, webdataset and datasets. No mocks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.shards import write_dataset
from pipeline.synthetic import synthetic_trajectories
from pipeline.verify import verify
from schemas import MODES, ModeOptions, mode_records
from schemas.config import ShardConfig
from schemas.conversation import conversation_to_json
from schemas.modes import refs_to_base64

N = 12


@pytest.fixture(scope="module")
def trajectories():
    return synthetic_trajectories(N, seed=7)


def _write_reference(out: Path, trajectories) -> None:
    """12 trajectories in units of 6, parts of at most 5 records, row groups of 4."""
    write_dataset(
        out,
        trajectories,
        ShardConfig(rows_per_group=4, max_rows_per_shard=5),
        unit_size=6,
        build_config={"k": 1},
        card_info={"name": "tiny"},  # the card's title; by default the folder's name
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, trajectories) -> Path:
    out = tmp_path_factory.mktemp("built")
    _write_reference(out, trajectories)
    return out


def test_layout_counts_and_verify(built: Path, trajectories) -> None:
    assert verify(built) == []
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["trajectories"] == N
    assert manifest["counts"] == {m.name: N for m in MODES}
    for m in MODES:
        names = sorted(p.name for p in (built / "data" / m.name).iterdir())
        # 12 rows in units of 6, rotation every 5 rows -> two parts per unit, named by unit and part
        assert names == ["train-00000-000.parquet", "train-00000-001.parquet", "train-00001-000.parquet",
                         "train-00001-001.parquet"]  # fmt: skip
        assert sorted(p.name for p in (built / "wds" / m.name).iterdir()) == [
            f"{m.name}-0000{u}-00{i}.tar" for u in range(2) for i in range(2)
        ]
        for name in names:
            meta = pq.ParquetFile(built / "data" / m.name / name).metadata
            assert all(meta.row_group(g).num_rows <= 4 for g in range(meta.num_row_groups))
    ids = pq.read_table(built / "data" / MODES[0].name, columns=["id"]).column("id").to_pylist()
    assert ids == [f"{t.id}_m1" for t in trajectories]
    for f in manifest["files"]:
        data = (built / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        if f["format"] != "card":
            assert f["unit"] == int(f["path"].split("-")[-2])
    assert [f["rows"] for f in manifest["files"] if f["path"].startswith("data/initial_full")] == [5, 1, 5, 1]
    assert not list(built.rglob(".tmp-*"))


def test_parquet_records_equal_mode_records(built: Path, trajectories) -> None:
    want = {r.id: r.to_row() for t in trajectories for r in mode_records(t, ModeOptions())}
    rows = []
    for m in MODES:
        rows += pq.read_table(built / "data" / m.name).to_pylist()
    assert len(rows) == 6 * N
    assert {r["id"]: r for r in rows} == want


def test_datasets_loads_every_config_offline(built: Path, trajectories, monkeypatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for m in MODES:
        ds = datasets.load_dataset(str(built), name=m.name, split="train", cache_dir=str(built.parent / "hf-cache"))
        assert ds.num_rows == N
        assert ds["id"] == [f"{t.id}_m{m.index}" for t in trajectories]
        assert set(ds["mode"]) == {m.name}
    default = datasets.load_dataset(str(built), split="train", cache_dir=str(built.parent / "hf-cache"))
    assert set(default["mode"]) == {"improving_full_learning"}


def test_webdataset_sample_converts_back_to_the_parquet_conversation(built: Path) -> None:
    import webdataset as wds

    for m in MODES:
        parquet = {r["id"]: r["conversation"] for r in pq.read_table(built / "data" / m.name).to_pylist()}
        tars = sorted(str(p) for p in (built / "wds" / m.name).glob("*.tar"))
        seen = 0
        for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            images = {k: v for k, v in sample.items() if k.endswith((".png", ".jpg"))}
            rebuilt = conversation_to_json(refs_to_base64(meta["conversation"], images))
            assert rebuilt == parquet[sample["__key__"]]
            assert meta["id"] == sample["__key__"] and "." not in sample["__key__"]
            seen += 1
        assert seen == N


def test_two_writes_are_byte_identical(tmp_path: Path, trajectories, built: Path) -> None:
    out = tmp_path / "again"
    _write_reference(out, trajectories)
    a = {p.relative_to(built).as_posix(): p.read_bytes() for p in built.rglob("*") if p.is_file()}
    b = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert a.keys() == b.keys() and len(a) == 6 * 4 * 2 + 2
    assert [k for k in a if a[k] != b[k]] == []


def test_rewrite_with_fewer_shards_leaves_no_stale_files(tmp_path: Path, trajectories) -> None:
    out = tmp_path / "o"
    write_dataset(out, trajectories, ShardConfig(max_rows_per_shard=2), unit_size=4)
    write_dataset(out, trajectories[:3], ShardConfig(max_rows_per_shard=2), unit_size=4)
    # 12 trajectories: 3 units of 2 parts; then 3 trajectories: unit 0 only, parts 000 (2 rows) and 001 (1 row)
    assert sorted(p.name for p in (out / "data" / MODES[0].name).iterdir()) == [
        "train-00000-000.parquet",
        "train-00000-001.parquet",
    ]
    assert not list(out.rglob(".tmp-*"))
    assert verify(out) == []


def test_rotation_by_bytes(tmp_path: Path, trajectories) -> None:
    out = tmp_path / "b"
    write_dataset(out, trajectories, ShardConfig(rows_per_group=1, max_bytes_per_shard=4096))
    manifest = json.loads((out / "manifest.json").read_text())
    full = [f for f in manifest["files"] if f["mode"] == "improving_full_learning"]
    # every record of this mode carries two images of >1 KB, so a 4 KB budget holds one or two records per shard
    assert all(f["rows"] <= 2 for f in full) and sum(f["rows"] for f in full if f["format"] == "parquet") == N
    assert verify(out) == []


def test_corrupt_byte_in_parquet_is_named(tmp_path: Path, trajectories) -> None:
    out = tmp_path / "c"
    write_dataset(out, trajectories, ShardConfig(), unit_size=6)
    victim = out / "data" / "initial_full_learning" / "train-00001-000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify(out)
    assert problems, "a flipped byte must be detected"
    assert {p.path for p in problems} >= {"data/initial_full_learning/train-00001-000.parquet"}
    assert any("sha256" in p.message for p in problems)
    assert all("improving" not in p.path for p in problems)


def test_truncated_tar_is_named_and_cli_exits_nonzero(tmp_path: Path, trajectories) -> None:
    out = tmp_path / "t"
    write_dataset(out, trajectories, ShardConfig())
    victim = out / "wds" / "improving_full_learning" / "improving_full_learning-00000-000.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    problems = verify(out)
    paths = {p.path for p in problems}
    assert "wds/improving_full_learning/improving_full_learning-00000-000.tar" in paths
    assert any("size" in p.message for p in problems)
    assert any("not a readable tar" in p.message or "truncated" in p.message for p in problems)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert "improving_full_learning-00000-000.tar" in proc.stderr and "FAILED" in proc.stderr


def test_verify_names_a_record_that_breaks_the_format(tmp_path: Path, trajectories) -> None:
    """A shard rewritten with a record whose image lost its flags (and a fixed manifest) is caught per record."""
    import pyarrow as pa

    out = tmp_path / "r"
    write_dataset(out, trajectories[:3], ShardConfig())
    path = out / "data" / "initial_full_learning" / "train-00000-000.parquet"
    rows = pq.read_table(path).to_pylist()
    turns = json.loads(rows[1]["conversation"])
    turns[-1]["content"][1]["need_loss"] = False
    rows[1]["conversation"] = json.dumps(turns)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"].endswith("initial_full_learning/train-00000-000.parquet"):
            f["bytes"] = path.stat().st_size
            f["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out)
    assert [(p.record, "no flag set" in p.message) for p in problems if p.path.startswith("data/")] == [
        (rows[1]["id"], True)
    ]
    # the WebDataset copy still holds the original record, so the two formats disagree on it
    assert any(p.record == rows[1]["id"] and "differs from the Parquet" in p.message for p in problems)


def test_verify_without_manifest_and_with_foreign_file(tmp_path: Path, trajectories) -> None:
    assert [p.path for p in verify(tmp_path / "nothing")] == ["manifest.json"]
    out = tmp_path / "f"
    write_dataset(out, trajectories[:2], ShardConfig())
    (out / "data" / "initial_full_learning" / "train-00009-000.parquet").write_bytes(b"x")
    problems = verify(out)
    assert [p.path for p in problems] == ["data/initial_full_learning/train-00009-000.parquet"]
    assert "not listed in the manifest" in problems[0].message
