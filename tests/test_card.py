"""The dataset card has one writer (pipeline.card): the facts come from a manifest dict and OUT, never from the card
itself while the build's state is there; OUT's card and the Hub card are the same function of them; the configs use
a glob per mode, never file names. Real datasets from pipeline.synthetic; nothing is mocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.card import DEFAULT_MODE, LOCAL_PATH, card_text, dataset_info, write_card
from pipeline.shards import write_dataset
from pipeline.synthetic import synthetic_trajectories
from schemas.config import ShardConfig
from schemas.modes import MODES

REPO = "irgl-test/card"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "tiny-card"
    write_dataset(out, synthetic_trajectories(5, seed=7, fmt="jpeg"), ShardConfig(rows_per_group=2))
    (out / "state").mkdir()
    (out / "state" / "build.json").write_text(json.dumps({"config": {"name": "Tiny Card", "license": "mit"}}))
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_facts_from_manifest_and_out(built: Path, tmp_path: Path) -> None:
    manifest = _manifest(built)
    info = dataset_info(built, manifest)
    assert info["counts"] == manifest["counts"] and info["trajectories"] == 5
    assert info["config_hash"] == manifest["config_hash"] and info["package_versions"]["irgl"]
    assert (info["name"], info["license"]) == ("Tiny Card", "mit")  # state/build.json
    assert {i["format"] for i in info["images"]} == {"jpeg"} and info["strategy"]  # from the first record

    # The build calls it before the card exists and before the card is among the manifest's files.
    copy = tmp_path / "tiny-card"
    shutil.copytree(built, copy)
    (copy / "README.md").unlink()
    no_card = {**manifest, "files": [f for f in manifest["files"] if f["format"] != "card"]}
    assert dataset_info(copy, no_card) == info

    # state/build.json wins over a card; without it (a downloaded copy) the card's license and name are used; with
    # neither, the folder's name and "other".
    write_card(copy, {**info, "name": "From The Card", "license": "apache-2.0"})
    assert (dataset_info(copy, manifest)["name"], dataset_info(copy, manifest)["license"]) == ("Tiny Card", "mit")
    shutil.rmtree(copy / "state")
    assert (dataset_info(copy, manifest)["name"], dataset_info(copy, manifest)["license"]) == (
        "From The Card",
        "apache-2.0",
    )
    (copy / "README.md").unlink()
    assert (dataset_info(copy, manifest)["name"], dataset_info(copy, manifest)["license"]) == ("tiny-card", "other")


def test_one_deterministic_writer(built: Path, tmp_path: Path) -> None:
    info = dataset_info(built, _manifest(built))
    local, hub = card_text(info), card_text(info, REPO)
    assert card_text(json.loads(json.dumps(info))) == local and card_text(dict(info), REPO) == hub  # deterministic

    path = write_card(tmp_path, info, include_wds=False)
    assert path == tmp_path / "README.md" and path.read_text() == local
    write_card(tmp_path, info, include_wds=True)
    assert path.read_text() == card_text(info, None, include_wds=True) != local
    assert not [p for p in tmp_path.iterdir() if p.name != "README.md"]  # atomic: no temporary left over

    # OUT's card loads a local path; the Hub card its repo and tells how to download it; otherwise the same card.
    assert f'load_dataset("{LOCAL_PATH}", "initial_full_learning", split="train")' in local
    assert f"data_dir: {LOCAL_PATH}/data/<mode>/" in local and "hf download" not in local
    assert f'load_dataset("{REPO}", "initial_full_learning", split="train")' in hub
    assert f"hf download {REPO} --repo-type dataset" in hub and LOCAL_PATH not in hub
    assert _meta(local) == _meta(hub)
    assert local.split("## Load with")[0] == hub.split("## Load with")[0]

    # The WebDataset sentence only with include_wds.
    assert "wds/<mode>/" not in hub and "wds/<mode>/" in card_text(info, REPO, include_wds=True)


def test_configs_are_globs_not_file_lists(built: Path) -> None:
    manifest = _manifest(built)
    text = card_text(dataset_info(built, manifest), REPO, include_wds=True)
    meta = _meta(text)
    assert [c["config_name"] for c in meta["configs"]] == [m.name for m in MODES]
    assert [c["data_files"] for c in meta["configs"]] == [
        [{"split": "train", "path": f"data/{m.name}/*.parquet"}] for m in MODES
    ]
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == [DEFAULT_MODE]
    assert meta["license"] == "mit" and meta["pretty_name"] == "Tiny Card" and meta["size_categories"] == ["n<1K"]
    for f in manifest["files"]:
        if f["format"] in ("parquet", "webdataset"):
            assert Path(f["path"]).name not in text  # no shard file name: any number of files, any naming
    for m in MODES:
        assert f"| {m.index} | `{m.name}` |" in text and f"| {manifest['counts'][m.name]:,} |" in text
    assert f"config hash `{manifest['config_hash']}`" in text


def test_datasets_loads_out_with_its_card(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT with the card written by write_card loads with `datasets` (every config, and the default) offline."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    shutil.copytree(built, out)
    write_card(out, dataset_info(out, _manifest(out)), include_wds=True)
    cache = str(tmp_path / "cache")
    for m in MODES:
        ds = datasets.load_dataset(str(out), m.name, split="train", cache_dir=cache)
        assert len(ds) == 5 and set(ds["mode"]) == {m.name}
    assert set(datasets.load_dataset(str(out), split="train", cache_dir=cache)["mode"]) == {DEFAULT_MODE}
