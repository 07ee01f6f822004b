"""The `irgl` command line as a user types it (pipeline/cli.py, in process through typer's CliRunner): synth, verify's
progress, report, models tiny, the choices typer lists, and the one spelling per concept (--config, --out)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.local import tiny_root
from schemas.modes import MODES

ROOT = Path(__file__).resolve().parents[1]


def irgl(*args: object):
    """`irgl ARGS` in this process; wide columns so that rich does not wrap the help and error boxes."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    return result


def _flat(text: str) -> str:
    """Help/error text without rich's box characters and line breaks."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


# ---------------------------------------------------------------------------------------------------------------
# synth


def test_synth_writes_a_dataset_that_verifies(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = irgl("synth", "--out", out, "--n", 3)
    assert result.exit_code == 0, result.output
    assert f"wrote 3 trajectories to {out}" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {m.name: 3 for m in MODES}
    verified = irgl("verify", out, "--jobs", 1)
    assert verified.exit_code == 0, verified.output
    assert f"OK: {out} verifies" in verified.output


def test_synth_refuses_a_non_empty_out_without_force(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert irgl("synth", "-o", out, "--n", 4).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    again = irgl("synth", "-o", out, "--n", 2)
    assert again.exit_code == 2
    assert f"error: {out} is not empty: pass --force" in again.output
    assert (out / "manifest.json").read_bytes() == before  # nothing was touched

    # What an earlier build left in OUT goes too: its state would make `irgl report` take the new data for it.
    stray = out / "state" / "build.json"
    stray.parent.mkdir()
    stray.write_text("{}")
    forced = irgl("synth", "-o", out, "--n", 2, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "manifest.json").read_text())["counts"] == {m.name: 2 for m in MODES}
    assert not stray.exists()
    assert irgl("verify", out, "-j", 1).exit_code == 0

    # --force replaces an irgl dataset, never a folder of something else.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = irgl("synth", "-o", other, "--force")
    assert refused.exit_code == 2 and "holds no irgl dataset" in refused.output
    assert (other / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# verify: progress while it runs, problems capped


def test_verify_prints_progress_per_unit(tmp_path: Path) -> None:
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    out = tmp_path / "units"
    write_dataset(out, synthetic_trajectories(5, seed=1), unit_size=2)  # units 0, 1, 2
    result = irgl("verify", out, "-j", 1)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if " verified: " in line]
    assert len(lines) == 3, result.output
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf"unit 0000\d verified: problems=0 \| {k}/3 units \| elapsed \d+:\d\d:\d\d \| ETA (\?|\d+:\d\d:\d\d)", line
        ), line
    assert lines[-1].endswith("ETA 0:00:00")
    assert result.output.rstrip().splitlines()[-1].startswith(f"OK: {out} verifies")
    # publish verifies first, with the same lines (units recorded clean are re-checked by size and sha256 only).
    published = irgl("publish", out, "--repo-id", "org/name", "--dry-run", "-j", 1)
    assert published.exit_code == 0, published.output
    assert [line.split(" | ")[1] for line in published.output.splitlines() if " verified: " in line] == [
        "1/3 units", "2/3 units", "3/3 units"
    ]  # fmt: skip


def test_verify_and_publish_cap_printed_problems(tmp_path: Path) -> None:
    """Both commands count every problem and print at most --max-problems of them."""
    out = tmp_path / "bad"
    assert irgl("synth", "-o", out, "--n", 3).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["format"] == "parquet":
            (out / f["path"]).write_bytes(b"not parquet")  # six broken files: several problems each
    verified = irgl("verify", out, "-j", 1, "--max-problems", 2)
    assert verified.exit_code == 1
    total = int(re.search(r"FAILED: (\d+) problem\(s\)", verified.output).group(1))
    assert total > 2 and f"... and {total - 2} more" in verified.output
    published = irgl("publish", out, "--repo-id", "org/name", "--dry-run", "-j", 1, "--max-problems", 1)
    assert published.exit_code == 1
    assert "refusing to publish a dataset that does not verify" in published.output
    assert re.search(r"\.\.\. and \d+ more", published.output)
    shown = [line for line in published.output.splitlines() if line.startswith("data/")]
    assert len(shown) == 1, published.output


# ---------------------------------------------------------------------------------------------------------------
# report


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`irgl build` of two prompts with the tiny preset in this process (the local executor: no Ray)."""
    out = tmp_path_factory.mktemp("cli") / "build"
    result = irgl("build", "--executor", "local", "--limit", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_report_command(small_build: Path, tmp_path: Path) -> None:
    page = small_build / "report.html"
    page.unlink()
    result = irgl("report", small_build, "--samples", 1)
    assert result.exit_code == 0, result.output
    assert f"report written to {page}" in result.output
    html = page.read_text()
    assert html.startswith("<!doctype html>") or html.lower().startswith("<!doctype html>")
    assert "improving_full_learning" in html

    # A dataset that no build wrote (synth has no state/build.json), and a missing directory: exit 2, one line.
    synth = tmp_path / "synth"
    assert irgl("synth", "-o", synth, "--n", 1).exit_code == 0
    for bad in (synth, tmp_path / "missing"):
        refused = irgl("report", bad)
        assert refused.exit_code == 2
        assert f"error: {bad}: not a directory written by irgl build" in refused.output
        assert not (bad / "report.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# models tiny


def test_models_tiny_reports_the_folders_and_reuses_them() -> None:
    """Builds (or finds) every tiny model under --dir and prints one `name path` line each; a second run reuses the
    folders: no file in them is written again."""
    root = tiny_root()
    first = irgl("models", "tiny", "--dir", root)
    assert first.exit_code == 0, first.output
    folders = dict(line.split(None, 1) for line in first.output.strip().splitlines())
    assert set(folders) == {"llm", "vlm", "sd", "clip", "janus"}
    for path in folders.values():
        assert Path(path).parent == root and Path(path).is_dir() and any(Path(path).iterdir()), path
    before = _written(folders.values())
    second = irgl("models", "tiny", "--dir", root)
    assert second.exit_code == 0 and second.output == first.output
    assert _written(folders.values()) == before


def _written(folders) -> dict[str, tuple[int, int]]:  # noqa: ANN001 (paths as str)
    """(inode, mtime in ns) of every file under the folders."""
    return {str(f): (f.stat().st_ino, f.stat().st_mtime_ns) for d in folders for f in Path(d).rglob("*") if f.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# choices, spellings, help


@pytest.mark.parametrize(
    ("args", "option", "choices"),
    [
        (["build", "--executor", "spark"], "--executor", ["ray", "local"]),
        (["train", "-c", "x.yaml", "-d", ".", "--stage", "3"], "--stage", ["1", "2", "all"]),
    ],
)
def test_bad_choice_exits_2_and_names_the_choices(args: list[str], option: str, choices: list[str]) -> None:
    result = irgl(*args)
    assert result.exit_code == 2
    text = _flat(result.output)
    assert f"Invalid value for '{option}'" in text
    assert "is not one of " + ", ".join(f"'{c}'" for c in choices) in text


@pytest.mark.parametrize(("command", "listed"), [("build", "ray|local"), ("train", "1|2|all")])
def test_help_lists_the_choices(command: str, listed: str) -> None:
    result = irgl(command, "--help")
    assert result.exit_code == 0
    assert listed in _flat(result.output)


def test_one_spelling_per_concept() -> None:
    """--config/-c is the config of build, plan and train; --out/-o the directory build, synth, train, generate and
    eval write; verify, report and publish take the dataset they read as OUT; the old spellings are gone."""
    for command in ("build", "plan", "train"):
        assert re.search(r"--config -c ", _flat(irgl(command, "--help").output)), command
    for command in ("build", "synth", "train", "generate", "eval"):
        assert re.search(r"--out -o ", _flat(irgl(command, "--help").output)), command
    for command in ("verify", "report", "publish"):
        assert re.search(r"Usage: irgl \w+ \[OPTIONS\] \{?OUT\b", _flat(irgl(command, "--help").output)), command
    assert "--output" not in _flat(irgl("train", "--help").output)
    assert irgl("train", "-c", "x.yaml", "-d", ".", "--output", "o").exit_code == 2
    assert irgl("plan", ROOT / "configs" / "tiny.yaml").exit_code == 2  # CONFIG is no longer positional


def test_plan_defaults_to_the_tiny_preset_like_build() -> None:
    default = irgl("plan")
    assert default.exit_code == 0, default.output
    assert default.output.startswith(f"plan for {ROOT / 'configs' / 'tiny.yaml'} (name: ")
    forward = irgl("plan", "-c", ROOT / "configs" / "irgl-300k.yaml", "--limit", 10)
    assert forward.exit_code == 0 and "(name: irgl-300k" in forward.output
