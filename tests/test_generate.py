"""`irgl generate` on the tiny Janus: the IRG loop's token layout is the trainer's, seeds reproduce, I1 conditions
turn 2, every guidance branch moves the image logits, resume by prompt id, the gallery renders in Chromium, and
build (synth) -> train -> generate -> eval end to end."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from trainer.generate import (
    I1_PART,
    T2_PART,
    IRGGenerator,
    PromptJob,
    SamplingConfig,
    guide,
    i1_prefixes,
    i2_prefixes,
    t1_prefix,
    t2_prefix,
    turn1_conversation,
    turn2_conversation,
)

DATA = Path(__file__).parent / "data"
GENEVAL = DATA / "geneval_metadata.jsonl"
FAST = SamplingConfig(max_think_tokens=4)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


@pytest.fixture(scope="module")
def janus_path() -> str:
    from trainer.tiny_janus import resolve_model

    return resolve_model("tiny:janus")


@pytest.fixture(scope="module")
def irg(janus_path: str) -> IRGGenerator:
    return IRGGenerator(janus_path, device="cpu")


@pytest.fixture(scope="module")
def trajectory():
    from pipeline.synthetic import synthetic_trajectory

    return synthetic_trajectory(0, size=32)


def _cli() -> typer.Typer:
    from pipeline.cli_generate import eval_command, generate_command

    app = typer.Typer()
    app.command("generate")(generate_command)
    app.command("eval")(eval_command)
    return app


def _ids(rec) -> list[int]:
    return [i for seg in rec.segments for i in seg.ids]


# --- the token layout is the trainer's --------------------------------------------------------------------------


def test_prefixes_are_prefixes_of_the_trainers_records(irg: IRGGenerator, trajectory) -> None:
    """What the model sees before T1, I1, T2 and I2 is exactly the start of the mode-3 / mode-6 training record the
    builder writes for the same trajectory (schemas.modes.mode_records), encoded by the trainer."""
    from schemas.conversation import conversation_from_json, validate_conversation
    from schemas.modes import MODES_BY_NAME, mode_records
    from trainer.records import encode_conversation

    fmt, traj = irg.fmt, trajectory
    records = {r.mode: r for r in mode_records(traj)}

    def trained(mode: str):
        turns = conversation_from_json(records[mode].conversation)
        return encode_conversation(turns, fmt, mode=mode, resolve=base64.b64decode)

    m3, m6 = trained("initial_full_learning"), trained("improving_full_learning")
    shape3, shape6 = (MODES_BY_NAME[m].signature() for m in (m3.mode, m6.mode))
    assert validate_conversation(turn1_conversation("p", "t"), image_refs=True) == shape3
    assert validate_conversation(turn2_conversation("p", "t", "u"), image_refs=True) == shape6
    for prefix, full in [
        (t1_prefix(traj.prompt, fmt), m3),
        (i1_prefixes(traj.prompt, traj.t1, fmt)[0], m3),
        (t2_prefix(traj.prompt, traj.t1, traj.i1, fmt), m6),
        (i2_prefixes(traj.prompt, traj.t1, traj.i1, traj.t2, fmt, without_t2=True, without_i1=True)[0], m6),
    ]:
        ids = _ids(prefix)
        assert ids == _ids(full)[: len(ids)]
        kinds = [(s.kind, s.origin, s.image) for s in prefix.segments]
        assert kinds == [(s.kind, s.origin, s.image) for s in full.segments[: len(kinds)]]
    # The image target's BOI ends the image prefixes; I1 is fed back through both encoders, vit block first.
    t2 = t2_prefix(traj.prompt, traj.t1, traj.i1, fmt)
    assert [s.kind for s in t2.segments if s.origin == I1_PART] == ["vit", "gen"]
    assert t2.images[0] == traj.i1
    i1 = i1_prefixes(traj.prompt, traj.t1, fmt)
    assert _ids(i1[0])[-1] == fmt.boi_id and len(_ids(i1[1])) == len(_ids(i1[0]))
    i2 = i2_prefixes(traj.prompt, traj.t1, traj.i1, traj.t2, fmt, without_t2=True, without_i1=True)
    assert all(_ids(r)[-1] == fmt.boi_id for r in i2) and [s.origin for s in i2[0].segments][-2:] == [
        f"{T2_PART} eos",
        "turn 2 part 3 boi",
    ]
    # The unconditional turn-1 branch is the trainer's text dropout: BOS, pads, then the target's BOI.
    assert set(_ids(i1[1])[1:-1]) == {fmt.pad_id} and _ids(i1[1])[0] == fmt.bos_id


# --- seeds, conditioning, guidance --------------------------------------------------------------------------------


def test_seeds_give_identical_outputs_whatever_the_batch(irg: IRGGenerator) -> None:
    jobs = [PromptJob("a", "a photo of a red circle", 1), PromptJob("b", "two blue squares side by side", 2)]
    first = irg.run(jobs, FAST)
    again = irg.run(jobs, FAST)
    alone = irg.run(jobs[1:], FAST)  # another batch (size and neighbours)
    fields = ("t1", "i1", "t2", "i2", "seeds")
    for a, b in zip(first, again, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert [getattr(first[1], f) for f in fields] == [getattr(alone[0], f) for f in fields]
    assert first[0].i1[:8] == b"\x89PNG\r\n\x1a\n" and first[0].i2 and first[0].tokens["i2"] == irg.num_image_tokens
    other = irg.run([PromptJob("a", "a photo of a red circle", 99)], SamplingConfig(turns=1, max_think_tokens=6))[0]
    assert other.seeds != first[0].seeds and (other.t1, other.i1) != (first[0].t1, first[0].i1)


def test_i1_conditions_turn_two(irg: IRGGenerator, trajectory) -> None:
    """Changing I1 (and nothing else) changes the logits of T2's first token."""
    from pipeline.synthetic import synthetic_trajectory

    other = synthetic_trajectory(1, size=32).i1
    assert other != trajectory.i1
    fmt, p, t1 = irg.fmt, trajectory.prompt, trajectory.t1
    logits = irg.text_logits([t2_prefix(p, t1, trajectory.i1, fmt), t2_prefix(p, t1, other, fmt)])
    assert (logits[0] - logits[1]).abs().max().item() > 1e-4
    same = irg.text_logits([t2_prefix(p, t1, trajectory.i1, fmt)] * 2)
    assert (same[0] - same[1]).abs().max().item() < 1e-5


def test_each_guidance_branch_changes_the_image_logits(irg: IRGGenerator, trajectory) -> None:
    import torch

    fmt, traj = irg.fmt, trajectory
    full, no_t2, no_i1 = i2_prefixes(traj.prompt, traj.t1, traj.i1, traj.t2, fmt, without_t2=True, without_i1=True)
    assert not any(s.origin.startswith(T2_PART) for s in no_t2.segments)
    assert not any(s.origin.startswith(I1_PART) for s in no_i1.segments)
    assert any(s.origin.startswith(I1_PART) for s in no_t2.segments)  # the branch drops T2 only
    base = irg.image_logits([full], [])
    with_t2_branch = irg.image_logits([full, no_t2], [4.0])
    with_i1_branch = irg.image_logits([full, no_i1], [2.0])
    both = irg.image_logits([full, no_t2, no_i1], [4.0, 2.0])
    for guided in (with_t2_branch, with_i1_branch, both):
        assert (guided - base).abs().max().item() > 1e-3
    assert (both - with_t2_branch).abs().max().item() > 1e-3
    # Turn 1's text guidance too; and a scale of 1 is the full context exactly.
    c, u = i1_prefixes(traj.prompt, traj.t1, fmt)
    assert (irg.image_logits([c, u], [4.0]) - irg.image_logits([c], [])).abs().max().item() > 1e-3
    # The sampler really uses the guided logits: the same seed with another turn-1 scale draws another I1.
    job = [PromptJob("a", traj.prompt, 3)]
    weak, strong = (irg.run(job, SamplingConfig(turns=1, max_think_tokens=2, cfg_turn1=s))[0] for s in (1.0, 500.0))
    assert weak.t1 == strong.t1 and weak.i1 != strong.i1
    k = torch.randn(3, 2, 5)
    assert torch.allclose(guide(k, [1.0, 1.0]), k[0])
    assert torch.allclose(guide(k, [3.0]), k[1] + 3.0 * (k[0] - k[1]))


# --- the command: resume, refusal, gallery --------------------------------------------------------------------------


def _generate(out: Path, *extra: str) -> object:
    args = ["generate", "--model", "tiny:janus", "--prompts", str(GENEVAL), "--out", str(out), "--executor", "local",
            "--max-think-tokens", "6", "-b", "2", *extra]  # fmt: skip
    return CliRunner().invoke(_cli(), args)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "out"
    result = _generate(out, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "generate 2/2 prompts" in result.output and "ETA" in result.output
    return out


def test_generate_resumes_by_prompt_id_and_refuses_other_settings(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    before = pq.read_table(out / "generations.parquet").to_pylist()
    result = _generate(out, "--limit", "3")
    assert result.exit_code == 0, result.output
    assert "3 prompts: 2 already done, 1 to run" in result.output
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[:2] == before  # untouched
    assert len(list((out / "parts").glob("part-*.parquet"))) == 2
    refused = _generate(out, "--limit", "3", "--seed", "5")
    assert refused.exit_code == 2 and "other settings" in refused.output
    forced = _generate(out, "--limit", "1", "--seed", "5", "--force")
    assert forced.exit_code == 0, forced.output
    assert pq.read_table(out / "generations.parquet").column("seed").to_pylist() != [before[0]["seed"]]


def test_generate_bad_input_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_cli(), ["generate", "--model", "tiny:janus", "--prompts", str(tmp_path / "none.jsonl"),
                                    "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "error: --prompts" in result.output
    result = runner.invoke(_cli(), ["generate", "--model", str(tmp_path), "--prompts", str(GENEVAL),
                                    "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "no config.json" in result.output
    result = runner.invoke(_cli(), ["generate", "--model", "tiny:janus", "--prompts", str(GENEVAL),
                                    "--out", str(tmp_path / "o"), "--turns", "3"])  # fmt: skip
    assert result.exit_code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n\n{not json\n', encoding="utf-8")
    result = runner.invoke(_cli(), ["generate", "--model", "tiny:janus", "--prompts", str(bad),
                                    "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and f"error: {bad}:3: not a JSON object" in result.output


def test_gallery_renders_in_chromium(generated: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian chromium is needed (make test installs it: apt-get install chromium)"
    rows = pq.read_table(generated / "generations.parquet").to_pylist()
    page = generated / "gallery.html"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert '<b id="count">2</b>' in dom
    assert '<b id="loaded">4</b>/<b id="images">4</b>' in dom  # I1 and I2 of both prompts really load
    for row in rows:
        assert f'id="p{row["index"]:05d}"' in dom and row["prompt"] in dom
        meta = json.loads(row["metadata"])
        assert row["tag"] == meta["tag"] == "single_object"
        assert json.loads(row["seeds"]).keys() == {"t1", "i1", "t2", "i2"}
        assert set(json.loads(row["timings"])) == {"t1", "i1", "t2", "i2"}
        assert (generated / "images" / f"{row['index']:05d}-i2.png").read_bytes() == row["i2"]


# --- end to end -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_e2e_build_train_generate_eval(ray_session: object, tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    """synth (the build's writers) -> train (stage 1, 2 steps) -> generate on Ray (the export) ->
    eval (tiny CLIP): the four commands of the README on the tiny preset."""
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories
    from trainer.config import load_train_config
    from trainer.train import train

    data = tmp_path / "data"
    write_dataset(data, synthetic_trajectories(4, size=32))
    base = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml"
    # Stage 1 only, 2 steps: one Ray Train run keeps the test short (`make e2e` runs both stages through the CLI).
    cfg = load_train_config(base, {"output_dir": str(tmp_path / "train"), "stage1.steps": 2,
                                   "checkpoint_every": 10, "log_every": 1})  # fmt: skip
    export = train(cfg, data, stage="1")["1"].final_dir
    out = tmp_path / "gen"
    result = CliRunner().invoke(_cli(), ["generate", "--model", str(export), "--prompts", str(GENEVAL), "--out",
                                         str(out), "--limit", "3", "-b", "2", "--max-think-tokens", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "generations.parquet").to_pylist()
    assert [r["index"] for r in rows] == [0, 1, 2] and all(r["i1"] and r["i2"] for r in rows)
    result = CliRunner().invoke(_cli(), ["eval", str(out), "--clip", tiny_clip["model"], "--pretrained", ""])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["overall"]["n"] == 3 and set(report["per_tag"]) == {"single_object"}
    assert "all" in result.output and "I2 > I1" in result.output
    for turn in ("turn1", "turn2"):
        assert (out / "eval" / "geneval" / turn / "00002" / "samples" / "0000.png").is_file()
