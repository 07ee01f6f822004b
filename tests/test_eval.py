"""`irgl eval`: CLIP alignment of I1 and I2 (the builder's scorer, tiny CLIP), gain and I2 > I1 share overall and
per tag, GenEval's folder layout, built datasets graded the same way, and the command's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from pipeline.evaluate import evaluate, format_table
from pipeline.generate import GENERATION_SCHEMA, RESULTS_NAME
from pipeline.synthetic import synthetic_trajectories

TAGS = ["single_object", "single_object", "counting", "colors"]


@pytest.fixture(scope="module")
def trajectories() -> list:
    return synthetic_trajectories(4, size=32)


@pytest.fixture(scope="module")
def generate_dir(tmp_path_factory: pytest.TempPathFactory, trajectories: list) -> Path:
    """A generate output written by hand: the synthetic trajectories' prompts and images, GenEval-style tags."""
    out = tmp_path_factory.mktemp("eval") / "gen"
    out.mkdir()
    rows = []
    for k, (traj, tag) in enumerate(zip(trajectories, TAGS, strict=True)):
        meta = {"tag": tag, "include": [{"class": "cup", "count": 1}], "prompt": traj.prompt}
        rows.append({"index": 10 + k, "id": f"{10 + k:05d}-x", "prompt": traj.prompt, "tag": tag,
                     "metadata": json.dumps(meta), "seed": k, "t1": traj.t1, "i1": traj.i1, "t2": traj.t2,
                     "i2": traj.i2, "seeds": "{}", "timings": "{}", "tokens": "{}", "batch_size": 4})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATION_SCHEMA), out / RESULTS_NAME)
    return out


def test_eval_scores_per_tag_and_writes_geneval_layout(generate_dir: Path, clip_scorer, trajectories) -> None:
    report = evaluate(generate_dir, clip="tiny:clip", scorer=clip_scorer, echo=lambda _: None)
    prompts = [t.prompt for t in trajectories]
    c1 = clip_scorer.text_image(prompts, [t.i1 for t in trajectories])  # the scorer, one image at a time
    c2 = clip_scorer.text_image(prompts, [t.i2 for t in trajectories])
    overall = report["overall"]
    assert overall["n"] == 4
    assert overall["clip_i1"] == pytest.approx(sum(c1) / 4, abs=1e-5)
    assert overall["gain"] == pytest.approx(sum(b - a for a, b in zip(c1, c2, strict=True)) / 4, abs=1e-5)
    assert overall["i2_beats_i1"] == sum(b > a for a, b in zip(c1, c2, strict=True)) / 4
    assert report["per_tag"]["single_object"]["n"] == 2 and report["per_tag"]["counting"]["n"] == 1
    assert report["per_tag"]["counting"]["gain"] == pytest.approx(c2[2] - c1[2], abs=1e-5)
    saved = json.loads((generate_dir / "eval" / "eval.json").read_text())
    assert saved["overall"] == overall and saved["turns"] == 2
    lines = (generate_dir / "eval" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [10, 11, 12, 13]
    table = format_table(report)
    assert table.splitlines()[2].startswith("all") and "counting" in table
    # GenEval's layout: <digits>/metadata.jsonl (one JSON object with tag/include/prompt), samples/0000.png.
    for turn, key in (("turn1", "i1"), ("turn2", "i2")):
        root = generate_dir / "eval" / "geneval" / turn
        assert sorted(p.name for p in root.iterdir()) == ["00010", "00011", "00012", "00013"]
        meta = json.loads((root / "00012" / "metadata.jsonl").read_text())
        assert meta == {"tag": "counting", "include": [{"class": "cup", "count": 1}], "prompt": prompts[2]}
        assert (root / "00012" / "samples" / "0000.png").read_bytes() == getattr(trajectories[2], key)


def test_eval_grades_a_built_dataset(tmp_path: Path, clip_scorer, trajectories) -> None:
    """A dataset without trajectories/ (published, or synth): the mode-6 records give prompt, I1 and I2."""
    from pipeline.shards import write_dataset

    data = tmp_path / "ds"
    write_dataset(data, trajectories)
    report = evaluate(data, tmp_path / "ev", scorer=clip_scorer, echo=lambda _: None)
    assert report["kind"] == "dataset" and report["overall"]["n"] == 4 and report["per_tag"] == {}
    c1 = clip_scorer.text_image([t.prompt for t in trajectories], [t.i1 for t in trajectories])
    assert report["overall"]["clip_i1"] == pytest.approx(sum(c1) / 4, abs=1e-5)
    assert (tmp_path / "ev" / "geneval" / "turn2" / "00003" / "samples" / "0000.png").is_file()


def test_eval_command_refusals(generate_dir: Path, tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    from pipeline.cli_generate import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()
    result = runner.invoke(app, [str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and "neither" in result.output
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    result = runner.invoke(app, [str(generate_dir), "-o", str(out), "--clip", tiny_clip["model"], "--pretrained", ""])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(
        app, [str(generate_dir), "-o", str(out), "--clip", tiny_clip["model"], "--pretrained", "", "--force"]
    )
    assert result.exit_code == 0, result.output
    assert "I2 > I1" in result.output and json.loads((out / "eval.json").read_text())["overall"]["n"] == 4


@pytest.mark.slow
def test_eval_vlm_judge_compares_i1_and_i2(
    generate_dir: Path, tmp_path: Path, clip_scorer, vlm_engine, trajectories: list
) -> None:
    """The optional judge is the build's (schemas/judge.py; the session's tiny VLM on vLLM): I1 and I2 in one
    request, the JSON answer its regex forces. Each row's vlm_* fields are the answer to that request, made again
    here; the shares are those of the answers."""
    from schemas.judge import judge_instruction, judge_regex, parse_judgement
    from stages.engines.text import TextRequest

    report = evaluate(generate_dir, tmp_path / "ev", scorer=clip_scorer, judge_engine=vlm_engine, echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()]
    requests = [
        TextRequest(prompt=judge_instruction(t.prompt, 120), images=[t.i1, t.i2], regex=judge_regex(120))
        for t in trajectories
    ]
    for row, text in zip(rows, vlm_engine.generate(requests), strict=True):
        j = parse_judgement(text)
        assert (row["vlm_i1"], row["vlm_i2"], row["vlm_better"], row["vlm_reason"]) == (
            j.i1_satisfies, j.i2_satisfies, j.better, j.reason
        )  # fmt: skip
    assert report["overall"]["vlm_i1_yes"] == sum(r["vlm_i1"] for r in rows) / 4
    assert report["overall"]["vlm_i2_better"] == sum(r["vlm_better"] == "2" for r in rows) / 4
    assert report["per_tag"]["counting"]["vlm_i2_yes"] == float(rows[2]["vlm_i2"])
    assert "VLM I2 better" in format_table(report)
