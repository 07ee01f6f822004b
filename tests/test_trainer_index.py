"""The data index: built with the tokenizer alone, in parallel processes equal to serial, cached next to the
output by the dataset's manifest, the tokenizer and the options (a hit reads the cache, a change rebuilds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.modes import MODES

ALL = [m.name for m in MODES]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    out = tmp_path_factory.mktemp("trainer-index") / "ds"
    write_dataset(out, synthetic_trajectories(6, size=32), unit_size=3)  # 2 files per mode
    return out


@pytest.fixture(scope="module")
def source() -> object:
    from trainer.index import FormatSource
    from trainer.tiny_janus import resolve_model

    return FormatSource("janus", resolve_model("tiny:janus"))


def _flat(index: object) -> tuple:
    entries = {m: [(e.id, Path(e.file).name, e.locator, e.length) for e in es] for m, es in index.entries.items()}
    return entries, dict(index.skipped), index.skipped_ids


def test_parallel_index_equals_serial_and_is_cached_by_manifest(dataset: Path, source: object, tmp_path: Path) -> None:
    from trainer.index import build_index, cached_index

    fmt = source.load()
    lengths = sorted(e.length for es in build_index(dataset, ALL, fmt, 100_000).entries.values() for e in es)
    budget = lengths[len(lengths) // 2]  # about half the records too long: skips must match too
    serial = cached_index(dataset, ALL, source, budget, "parquet", tmp_path / "a", jobs=1, fmt=fmt)
    parallel = cached_index(dataset, ALL, source, budget, "parquet", tmp_path / "b", jobs=2)
    assert not serial.cached and not parallel.cached and parallel.jobs == 2
    assert _flat(parallel.index) == _flat(serial.index) == _flat(build_index(dataset, ALL, fmt, budget))
    assert serial.index.skipped and sum(serial.index.counts().values()) > 0
    assert parallel.path.parent == tmp_path / "b" and parallel.path.name == f"{parallel.key}.json"

    # A second build reads the cache: tamper with the cached file and the tampered value comes back.
    payload = json.loads(parallel.path.read_text())
    payload["modes"][ALL[2]]["length"][0] = 12345
    parallel.path.write_text(json.dumps(payload))
    hit = cached_index(dataset, ALL, source, budget, "parquet", tmp_path / "b", jobs=2)
    assert hit.cached and hit.jobs == 0 and hit.key == parallel.key
    assert hit.index.entries[ALL[2]][0].length == 12345

    # Any part of the key changes the file: the budget, the modes, the format, and the dataset's manifest.
    keys = {parallel.key}
    for args in ((ALL, budget + 1, "parquet"), (ALL[:2], budget, "parquet"), (ALL, budget, "webdataset")):
        other = cached_index(dataset, args[0], source, args[1], args[2], tmp_path / "b", jobs=1, fmt=fmt)
        assert not other.cached
        keys.add(other.key)
    manifest = dataset / "manifest.json"
    original = manifest.read_bytes()
    try:
        manifest.write_bytes(original.replace(b'"trajectories": 6', b'"trajectories": 7'))
        rebuilt = cached_index(dataset, ALL, source, budget, "parquet", tmp_path / "b", jobs=1, fmt=fmt)
    finally:
        manifest.write_bytes(original)
    assert not rebuilt.cached and rebuilt.key not in keys
    assert _flat(rebuilt.index) == _flat(serial.index)  # rebuilt from the shards, not the tampered cache
    assert len(keys) == 4


def test_workers_load_the_index_from_its_path_and_a_moved_dataset_is_rebased(
    dataset: Path, source: object, tmp_path: Path
) -> None:
    import shutil

    from trainer.index import cached_index, load_index

    fmt = source.load()
    built = cached_index(dataset, ALL, source, 4096, "parquet", tmp_path / "idx", jobs=1, fmt=fmt)
    assert _flat(load_index(built.path)) == _flat(built.index)
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    hit = cached_index(moved, ALL, source, 4096, "parquet", tmp_path / "idx", jobs=1, fmt=fmt)
    assert hit.cached and hit.key == built.key
    files = {e.file for es in load_index(hit.path).entries.values() for e in es}
    assert files and all(f.startswith(str(moved.resolve())) for f in files)
