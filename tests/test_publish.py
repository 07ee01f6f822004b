"""`irgl publish` up to the network: refusal, the size line and --max-size, the Hub's limits, the lock on OUT, the
file and commit plan, the staged folder (the card from pipeline.card, `datasets` loading offline, `irgl verify`),
and a token that never shows. The upload itself is not exercised: nothing here contacts the Hub, and HfApi is
neither faked nor mocked."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from test_plan import no_network  # noqa: F401 (the fixture: any socket connection fails the test)
from typer.testing import CliRunner

from pipeline.card import card_text, dataset_info
from pipeline.cli_hub import publish_command
from pipeline.humanize import parse_size
from pipeline.lock import LOCK_PATH, hold_out
from pipeline.publish import PublishError
from pipeline.publish.files import HUB_ENTRIES_PER_FOLDER, PlannedFile, PublishPlan, UploadSpec
from pipeline.publish.files import plan_publish as _plan_publish
from pipeline.publish.staging import stage
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


def plan_publish(out: Path, repo_id: str, **options: object) -> PublishPlan:
    return _plan_publish(out, UploadSpec(repo_id, **options))


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("publish")(publish_command)
    app.command("noop")(lambda: None)
    return app


def _manifest_paths(out: Path, fmt: str) -> set[str]:
    return {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"] if f["format"] == fmt}


def test_file_plan(built: Path) -> None:
    plan = plan_publish(built, REPO)
    paths = [f.path for f in plan.files]
    assert set(paths) == _manifest_paths(built, "parquet") | {"README.md", "manifest.json"}
    assert {p.split("/")[1] for p in _manifest_paths(built, "parquet")} == {m.name for m in MODES}
    for f in plan.files:
        if f.source is not None:
            assert f.bytes == (built / f.path).stat().st_size
    assert plan.total_bytes == sum(f.bytes for f in plan.files)
    assert plan.info["name"] == "tiny-irgl" and plan.info["license"] == "cc-by-4.0"  # from state/build.json
    assert plan.info["strategy"] == "forward" and plan.info["models"]["draw"] == "pil"  # from the records

    with_wds = {f.path for f in plan_publish(built, REPO, include_wds=True).files}
    assert with_wds - set(paths) == _manifest_paths(built, "webdataset") and _manifest_paths(built, "webdataset")
    with hold_out(built, "test"):  # the lock file exists while a command holds OUT: never uploaded
        assert (built / LOCK_PATH).is_file()
        internal = {f.path for f in plan_publish(built, REPO, include_internal=True).files} - set(paths)
    assert internal == {"state/build.json", "trajectories/unit-00000.parquet"}
    with pytest.raises(PublishError, match="ORG/NAME"):
        plan_publish(built, "no-slash")


@pytest.mark.usefixtures("no_network")
def test_dry_run_stages_a_loadable_verified_dataset(
    built: Path, trajectories, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    staged = tmp_path / "stage"
    result = CliRunner().invoke(
        _app(), ["publish", str(built), "--repo-id", REPO, "--dry-run", "--stage-dir", str(staged), "--private"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    plan = plan_publish(built, REPO, private=True)
    assert out.splitlines()[0] == f"upload: {len(plan.files)} files, {plan.total_bytes / 1e3:.1f} kB"
    assert "warning" not in out  # far below --max-size and every Hub limit
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

    # One writer: the staged card is pipeline.card's card_text for this repo (OUT's card: test_card.py).
    manifest = json.loads((built / "manifest.json").read_text())
    info = dataset_info(built, manifest)
    assert (staged / "README.md").read_text() == card_text(info, REPO) != card_text(info)

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


@pytest.mark.usefixtures("no_network")
def test_token_never_printed_or_written(built: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf_home"
    staged = tmp_path / "stage"
    env = {"HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(hf_home)}

    def dataset_files() -> dict[Path, bytes]:
        """OUT but irgl's own bookkeeping in state/ (the lock, verify's records), which publish may write."""
        return {
            p: p.read_bytes()
            for p in built.rglob("*")
            if p.is_file() and (p.parent != built / "state" or p.name == "build.json")
        }

    before = dataset_files()
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
    assert dataset_files() == before  # OUT untouched
    assert (built / LOCK_PATH).read_bytes() == b""  # released


@pytest.mark.usefixtures("no_network")
def test_refuses_a_corrupt_dataset(built: Path, tmp_path: Path) -> None:
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


def test_parse_size() -> None:
    assert parse_size("300GB") == 300 * 10**9 == parse_size("300 gb") == parse_size("300G")
    assert parse_size("1.5TB") == 1_500_000_000_000 and parse_size("2KiB") == 2048 and parse_size("1,000") == 1000
    assert parse_size("12345") == 12345 and parse_size(".5 MB") == 500_000
    for bad in ("", "GB", "1.5 XB", "-3GB", "3 GB GB"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)


def test_format_size_is_the_one_formatter() -> None:
    """pipeline.humanize.format_size, for plan and publish alike: decimal units, one decimal, thousands separated."""
    from pipeline.humanize import format_size

    cases = {None: "n/a", 0: "0 B", 999: "999 B", 1000: "1.0 kB", 812.4e9: "812.4 GB", 1.5e12: "1.5 TB",
             2_345.67e12: "2,345.7 TB", 4.2e6: "4.2 MB"}  # fmt: skip
    assert {n: format_size(n) for n in cases} == cases
    assert parse_size(format_size(812.4e9).replace(" ", "")) == 812.4e9


def test_one_token_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload, the redaction and the dry run's `token:` line read the token from the same places in the same
    order: the environment variables first, then the login file of `hf auth login`."""
    from huggingface_hub import constants

    from pipeline.secrets import SECRET_NAMES, find_hf_token, hf_token, hf_token_source, secret_values

    for name in SECRET_NAMES:
        monkeypatch.delenv(name, raising=False)
    login = tmp_path / "token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(login))
    assert find_hf_token() == (None, None) and hf_token_source() is None
    login.write_text(f"{FAKE_TOKEN}\n")
    assert hf_token() == FAKE_TOKEN and FAKE_TOKEN in secret_values()
    assert hf_token_source() == f"from the login file {login} (not shown)"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_FAKEfromTheOlderVariable99")
    assert find_hf_token() == ("hf_FAKEfromTheOlderVariable99", "the HUGGING_FACE_HUB_TOKEN environment variable")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN + "x")
    assert hf_token() == FAKE_TOKEN + "x" and hf_token_source() == "from the HF_TOKEN environment variable (not shown)"


@pytest.mark.usefixtures("no_network")
def test_refuses_above_max_size_unless_yes(built: Path, tmp_path: Path) -> None:
    plan = plan_publish(built, REPO, include_wds=True)
    limit = plan.total_bytes - 1
    staged = tmp_path / "stage"
    args = ["publish", str(built), "--repo-id", REPO, "--include-wds", "--max-size", str(limit)]

    # A real upload above the limit: refused before verifying, staging or contacting anything.
    result = CliRunner().invoke(_app(), [*args, "--stage-dir", str(staged)])
    assert result.exit_code == 2, result.output
    first, *_ = result.output.splitlines()
    assert first == f"upload: {len(plan.files)} files, {plan.total_bytes / 1e3:.1f} kB"
    size, wds = f"{plan.total_bytes / 1e3:.1f} kB", f"{plan.bytes_of('webdataset') / 1e3:.1f} kB"
    assert (
        f"error: the upload is {size} ({len(plan.files)} files), above --max-size {limit / 1e3:.1f} kB" in result.output
    )
    assert "pass --yes to upload it anyway, or raise --max-size, or leave out --include-wds" in result.output
    assert f"(the WebDataset tars are {wds})" in result.output and "verifies" not in result.output
    assert "https://huggingface.co/docs/hub/storage-limits" in result.output
    assert not staged.exists()

    # Exactly at the limit: not refused (the dry run goes through without a warning).
    at = CliRunner().invoke(_app(), [*args[:-1], str(plan.total_bytes), "--dry-run"])
    assert at.exit_code == 0 and "warning" not in at.output, at.output

    # A dry run above the limit warns and goes on; with --yes there is nothing to warn about.
    dry = CliRunner().invoke(_app(), [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"warning: the upload is {size}" in dry.output and "(a dry run goes on)" in dry.output
    yes = CliRunner().invoke(_app(), [*args, "--dry-run", "--yes", "--stage-dir", str(staged)])
    assert yes.exit_code == 0, yes.output
    assert "above --max-size" not in yes.output and "dry run: nothing was uploaded" in yes.output
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert files == {f.path for f in plan.files}

    # The default limit (300 GB) lets a small dataset through; a size that does not parse is bad input.
    assert CliRunner().invoke(_app(), ["publish", str(built), "--repo-id", REPO, "--dry-run"]).exit_code == 0
    bad = CliRunner().invoke(_app(), ["publish", str(built), "--repo-id", REPO, "--max-size", "lots"])
    assert bad.exit_code == 2 and "--max-size 'lots': expected a size" in bad.output


def test_hub_limit_warnings(tmp_path: Path) -> None:
    """The plan's checks against the Hub's per-file, per-folder and per-repository limits, on a plan of sizes only
    (nothing of that size is written)."""

    def plan(files: list[PlannedFile], private: bool = False) -> PublishPlan:
        return PublishPlan(tmp_path, REPO, private, None, files, "", b"")

    small = [PlannedFile(f"data/m/train-{i:05d}.parquet", 1000, "parquet", None) for i in range(3)]
    assert plan(small).hub_warnings() == []
    big = plan([*small, PlannedFile("data/m/big.parquet", 250 * 10**9, "parquet", None)]).hub_warnings()
    assert big == ["data/m/big.parquet is 250.0 GB: the Hub recommends files under 200.0 GB"]
    huge = plan([PlannedFile("wds/m/huge.tar", 501 * 10**9, "webdataset", None)]).hub_warnings()
    assert len(huge) == 1 and "above the Hub's hard limit of 500.0 GB per file" in huge[0]

    n = HUB_ENTRIES_PER_FOLDER
    at_limit = [PlannedFile(f"data/m/{i}.parquet", 1, "parquet", None) for i in range(n)]
    assert plan(at_limit).hub_warnings() == []
    over = plan([*at_limit, PlannedFile("data/m/x.parquet", 1, "parquet", None)]).hub_warnings()
    assert over == [f"data/m/ would hold {n + 1:,} entries: the Hub allows at most {n:,} per folder (write fewer, "
                    "larger shards)"]  # fmt: skip
    folders = [PlannedFile(f"data/{i}/a.parquet", 1, "parquet", None) for i in range(n + 1)]  # entries, not files
    assert plan(folders).hub_warnings() == [
        f"data/ would hold {n + 1:,} entries: the Hub allows at most {n:,} per folder (write fewer, larger shards)"
    ]
    private = plan([PlannedFile("data/m/a.parquet", 101 * 10**9, "parquet", None)], private=True).hub_warnings()
    assert len(private) == 1 and "a free account holds 100.0 GB of private storage" in private[0]


@pytest.mark.usefixtures("no_network")
def test_publish_holds_out(built: Path, tmp_path: Path) -> None:
    """A publish on an OUT that another process holds (a build, say) fails at once, naming the holder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pipeline.lock import hold_out\n"
         f"with hold_out({str(built)!r}, 'irgl build'):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        staged = tmp_path / "stage"
        result = CliRunner().invoke(
            _app(), ["publish", str(built), "--repo-id", REPO, "--dry-run", "--stage-dir", str(staged)]
        )
        assert result.exit_code == 2, result.output
        assert f"error: {built}: in use by irgl build (pid {holder.pid} on host {socket.gethostname()}" in result.output
        assert "upload:" not in result.output and not staged.exists()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert CliRunner().invoke(_app(), ["publish", str(built), "--repo-id", REPO, "--dry-run"]).exit_code == 0
    missing = CliRunner().invoke(_app(), ["publish", str(tmp_path / "nowhere"), "--repo-id", REPO, "--dry-run"])
    assert missing.exit_code == 2 and "no such dataset directory" in missing.output
    assert not (tmp_path / "nowhere").exists()  # the lock did not create it
