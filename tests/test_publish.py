"""`irgl publish` up to the network: refusal, the file and commit plan, the staged folder (card, `datasets`
loading offline, `irgl verify`), and a token that never shows. The upload itself is not exercised: nothing here
contacts the Hub, and HfApi is neither faked nor mocked."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli_hub import publish_command
from pipeline.publish import PublishError, plan_publish, stage
from pipeline.shards import write_dataset
from pipeline.synthetic import synthetic_trajectories
from pipeline.verify import verify
from schemas.config import ShardConfig
from schemas.modes import MODES

N = 10
REPO = "irgl-test/tiny-irgl"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak1234567890abcdef"


@pytest.fixture(scope="module")
def trajectories():
    return synthetic_trajectories(N, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory, trajectories) -> Path:
    """A real small dataset (six modes, Parquet + WebDataset, card, manifest) plus the internal files of a build."""
    out = tmp_path_factory.mktemp("pub") / "out"
    write_dataset(
        out, trajectories, ShardConfig(rows_per_group=4, max_rows_per_shard=6), build_config={"k": 1},
        card_info={"title": "ignored", "license": "other", "strategy": "forward", "models": {}},
    )  # fmt: skip
    (out / "state").mkdir()
    (out / "state" / "build.json").write_text(json.dumps({"config": {"name": "tiny-irgl", "license": "cc-by-4.0"}}))
    (out / "trajectories").mkdir()
    (out / "trajectories" / "unit-00000.parquet").write_bytes(b"PAR1")
    return out


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("publish")(publish_command)
    app.command("noop")(lambda: None)
    return app


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails the test: the dry run must contact nothing."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access during a dry run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _manifest_paths(out: Path, fmt: str) -> set[str]:
    return {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"] if f["format"] == fmt}


def test_file_plan(built: Path) -> None:
    plan = plan_publish(built, REPO)
    paths = [f.path for f in plan.files]
    assert set(paths) == _manifest_paths(built, "parquet") | {"README.md", "manifest.json"}
    assert len(_manifest_paths(built, "parquet")) == 12  # 6 modes x 2 shards (rotation at 6 rows)
    for f in plan.files:
        if f.source is not None:
            assert f.bytes == (built / f.path).stat().st_size
    assert plan.total_bytes == sum(f.bytes for f in plan.files)
    assert plan.info["name"] == "tiny-irgl" and plan.info["license"] == "cc-by-4.0"  # from state/build.json
    assert plan.info["strategy"] == "forward" and plan.info["models"]["draw"] == "pil"  # from the records

    with_wds = {f.path for f in plan_publish(built, REPO, include_wds=True).files}
    assert with_wds - set(paths) == _manifest_paths(built, "webdataset") and len(with_wds) == 26
    internal = {f.path for f in plan_publish(built, REPO, include_internal=True).files} - set(paths)
    assert internal == {"state/build.json", "trajectories/unit-00000.parquet"}
    with pytest.raises(PublishError, match="ORG/NAME"):
        plan_publish(built, "no-slash")


def test_dry_run_stages_a_loadable_verified_dataset(
    built: Path, trajectories, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    staged = tmp_path / "stage"
    result = CliRunner().invoke(
        _app(), ["publish", str(built), "--repo-id", REPO, "--dry-run", "--stage-dir", str(staged), "--private"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: nothing was uploaded and nothing was contacted" in out
    assert "creates a private dataset repo" in out and "README.md and manifest.json last" in out
    for path in _manifest_paths(built, "parquet"):
        assert f"{(built / path).stat().st_size:>15,d}  {path}" in out
    assert "wds/" not in out and "trajectories/" not in out

    # Exactly the planned files, the big ones as hard links to OUT (no copies).
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert files == _manifest_paths(built, "parquet") | {"README.md", "manifest.json"}
    some = sorted(_manifest_paths(built, "parquet"))[0]
    assert (staged / some).stat().st_ino == (built / some).stat().st_ino

    # A downloaded copy verifies as it is (the manifest covers what is uploaded, with the Hub card).
    assert verify(staged) == []

    # The card: valid metadata for the Hub's card tools, six configs, the counts and the loading instructions.
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(staged / "README.md")
    assert isinstance(card.data, DatasetCardData)
    meta = card.data.to_dict()
    assert [c["config_name"] for c in meta["configs"]] == [m.name for m in MODES]
    assert all(c["data_files"][0]["path"] == f"data/{c['config_name']}/*.parquet" for c in meta["configs"])
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["improving_full_learning"]
    assert meta["license"] == "cc-by-4.0" and meta["pretty_name"] == "tiny-irgl" and meta["size_categories"] == ["n<1K"]
    assert f'load_dataset("{REPO}", "initial_full_learning", split="train")' in card.text
    assert "data_dir: irgl-data/data/<mode>/" in card.text and "strategy: forward" in card.text
    for m in MODES:
        assert f"| {m.index} | `{m.name}` |" in card.text and card.text.count(f"`{m.name}` |") == 1

    # `datasets` loads every config of the staged folder offline, with the records of that mode (own cache: the
    # default cache could hold another folder of the same name).
    import datasets

    cache = str(tmp_path / "datasets-cache")
    for m in MODES:
        ds = datasets.load_dataset(str(staged), m.name, split="train", cache_dir=cache)
        assert ds["id"] == [f"{t.id}_m{m.index}" for t in trajectories]
        assert set(ds["mode"]) == {m.name}
    default = datasets.load_dataset(str(staged), split="train", cache_dir=cache)
    assert set(default["mode"]) == {"improving_full_learning"}


def test_token_never_printed_or_written(built: Path, tmp_path: Path, no_network: None) -> None:
    hf_home = tmp_path / "hf_home"
    staged = tmp_path / "stage"
    env = {"HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(hf_home)}
    before = {p: p.read_bytes() for p in built.rglob("*") if p.is_file()}
    result = CliRunner().invoke(
        _app(),
        ["publish", str(built), "--repo-id", REPO, "--dry-run", "--stage-dir", str(staged), "--include-wds"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "from the HF_TOKEN environment variable (not shown)" in result.output
    assert FAKE_TOKEN not in result.output and FAKE_TOKEN[3:] not in result.output
    written = [p for root in (built, staged, hf_home) if root.exists() for p in root.rglob("*") if p.is_file()]
    assert len(written) > 30
    for p in written:
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p
    assert {p: p.read_bytes() for p in built.rglob("*") if p.is_file()} == before  # OUT untouched


def test_refuses_a_corrupt_dataset(built: Path, tmp_path: Path, no_network: None) -> None:
    out = tmp_path / "out"
    shutil.copytree(built, out)
    shard = out / sorted(_manifest_paths(out, "parquet"))[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    staged = tmp_path / "stage"
    result = CliRunner().invoke(
        _app(), ["publish", str(out), "--repo-id", REPO, "--dry-run", "--stage-dir", str(staged)]
    )
    assert result.exit_code == 1
    rel = shard.relative_to(out).as_posix()
    assert f"{rel}: sha256 differs from the manifest" in result.output
    assert "refusing to publish a dataset that does not verify" in result.output
    assert not staged.exists()


def test_stage_needs_an_empty_folder(built: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "left-over").write_text("x")
    with pytest.raises(PublishError, match="must not exist or be empty"):
        stage(plan_publish(built, REPO), busy)
    result = CliRunner().invoke(_app(), ["publish", str(built), "--repo-id", "a/b/c", "--dry-run"])
    assert result.exit_code == 2 and "expected ORG/NAME" in result.output
