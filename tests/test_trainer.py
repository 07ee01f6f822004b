"""The IRGL trainer on CPU: real Ray Train (2 workers, gloo), the tiny Janus built offline, a synthetic dataset.

Ray Train runs are the expensive part (~30-50 s each on 2 shared cores), so one module-scoped uninterrupted run
("all": stage 1 then stage 2) serves the loss, stage-2-modes and resume-comparison tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from schemas.modes import FULL_MODES, MODES

STAGE1_STEPS = 40
STAGE2_STEPS = 20


def _config(output: Path, **overrides: object) -> object:
    from trainer.config import load_train_config

    base = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml"
    values = {
        "output_dir": str(output),
        "stage1.steps": STAGE1_STEPS,
        "stage2.steps": STAGE2_STEPS,
        "stage1.lr": 3e-3,
        "stage2.lr": 3e-3,
        "checkpoint_every": 10,
        "log_every": 5,
        **overrides,
    }
    return load_train_config(base, values)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    out = tmp_path_factory.mktemp("trainer-data") / "ds"
    write_dataset(out, synthetic_trajectories(4))
    return out


@pytest.fixture(scope="module")
def adapter() -> object:
    from trainer.model import load_adapter
    from trainer.tiny_janus import resolve_model

    return load_adapter("janus", resolve_model("tiny:janus"))


@pytest.fixture(scope="module")
def full_run(ray_session: object, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from trainer.train import train

    out = tmp_path_factory.mktemp("trainer-run")
    cfg = _config(out)
    results = train(cfg, tiny_dataset, stage="all")
    return {"out": out, "results": results, "cfg": cfg}


def _metrics(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r and "event" not in r]


def _records(stage_dir: Path) -> dict[int, list[str]]:
    """step -> ids consumed by all ranks, from the last run attempt of each rank (after its last 'start')."""
    steps: dict[int, list[str]] = {}
    for path in sorted((stage_dir / "records").glob("rank-*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        last_start = max(i for i, r in enumerate(lines) if r.get("event") == "start")
        for r in lines[last_start + 1 :]:
            steps.setdefault(r["step"], []).extend(i for p in r["packs"] for i in p["ids"])
    return steps


def _mode_of(record_id: str) -> str:
    return MODES[int(record_id.rsplit("_m", 1)[1]) - 1].name


def _console_until(capfd: pytest.CaptureFixture, needle: str, timeout: float = 20.0) -> str:
    """Everything printed so far (fd 1 and 2), waiting until `needle` shows up: Ray forwards worker output to the
    driver's console asynchronously, so the last worker lines may arrive just after train() returned."""
    seen = ""
    deadline = time.monotonic() + timeout
    while True:
        out, err = capfd.readouterr()
        seen += out + err
        if needle in seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_training_lowers_text_and_image_loss(full_run: dict) -> None:
    out = full_run["out"]
    first = _metrics(out / "stage1" / "metrics.jsonl")[0]
    last = _metrics(out / "stage2" / "metrics.jsonl")[-1]
    assert first["step"] == 5 and last["step"] == STAGE2_STEPS
    assert last["text_loss"] < 0.5 * first["text_loss"], (first["text_loss"], last["text_loss"])
    assert last["image_loss"] < 0.5 * first["image_loss"], (first["image_loss"], last["image_loss"])
    # Per-mode losses are logged: stage 1 saw every mode, the image loss only in the full modes.
    stage1 = _metrics(out / "stage1" / "metrics.jsonl")
    seen = {k.split("/", 1)[1] for r in stage1 for k in r if k.startswith("text_loss/")}
    assert seen == {m.name for m in MODES}
    images = {k.split("/", 1)[1] for r in stage1 for k in r if k.startswith("image_loss/")}
    assert images == set(FULL_MODES)
    # The export loads back through from_pretrained.
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(full_run["results"]["2"].final_dir)
    assert model.config.vq_config.num_embeddings == 64


def test_stage2_consumes_only_full_modes(full_run: dict) -> None:
    out = full_run["out"]
    stage1 = _records(out / "stage1")
    stage2 = _records(out / "stage2")
    assert sorted(stage1) == list(range(1, STAGE1_STEPS + 1))
    assert sorted(stage2) == list(range(1, STAGE2_STEPS + 1))
    modes2 = {_mode_of(i) for ids in stage2.values() for i in ids}
    modes1 = {_mode_of(i) for ids in stage1.values() for i in ids}
    assert modes2 == set(FULL_MODES)
    assert modes1 == {m.name for m in MODES}
    # Stage 2 started from stage 1's export.
    marker = json.loads((full_run["results"]["2"].final_dir / "irgl_train.json").read_text())
    assert marker["init"] == str(full_run["results"]["1"].final_dir)


def test_killed_run_resumes_at_checkpoint_with_same_data_order(
    full_run: dict, tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from trainer.train import TrainError, latest_checkpoint, train

    crash_at = 20
    cfg = _config(tmp_path, fail_after_step=crash_at)
    import ray.train

    with pytest.raises(ray.train.TrainingFailedError):  # every worker is SIGKILLed after step 20's checkpoint
        train(cfg, tiny_dataset, stage="1")
    ckpt = latest_checkpoint(cfg, "1")
    assert ckpt is not None and json.loads((ckpt / "irgl_state.json").read_text())["step"] == crash_at
    with pytest.raises(TrainError, match="pass resume"):
        train(cfg, tiny_dataset, stage="1")
    resumed_cfg = _config(tmp_path)  # the same run, without the fault injection
    capfd.readouterr()
    result = train(resumed_cfg, tiny_dataset, stage="1", resume=True)["1"]
    assert result.steps == STAGE1_STEPS
    # Console: rank 0's progress line every log_every (5) steps of the resumed part, then where the export is.
    console = _console_until(capfd, "exported to")
    progress = [line for line in console.splitlines() if "stage 1 step " in line]
    steps = {line.split("stage 1 step ", 1)[1].split()[0] for line in progress}
    # (lines of the killed run's steps 5..20 may still arrive late from Ray's log forwarding: not counted; the
    # capture may hold a line twice, once per stream Ray echoes it on)
    assert sorted((x for x in steps if int(x.split("/")[0]) > crash_at), key=lambda x: int(x.split("/")[0])) == [
        f"{s}/{STAGE1_STEPS}" for s in range(crash_at + 5, STAGE1_STEPS + 1, 5)
    ], console
    assert all(
        "loss text " in line and " image " in line and "tokens/s" in line and "ETA " in line for line in progress
    )
    assert f"stage 1 finished: export in {tmp_path / 'stage1' / 'final'}" in console
    assert f"exported to {tmp_path / 'stage1' / 'final'}" in console
    events = [json.loads(x) for x in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["step"] for e in events if e["event"] == "start"] == [0, crash_at]
    after = _records(tmp_path / "stage1")
    assert sorted(after) == list(range(crash_at + 1, STAGE1_STEPS + 1))
    uninterrupted = _records(full_run["out"] / "stage1")
    assert {s: after[s] for s in after} == {s: uninterrupted[s] for s in after}


def test_fsdp_crash_during_export_resumes_the_export_only(tiny_dataset: Path, tmp_path: Path) -> None:
    """FSDP2 on 2 CPU workers (gloo), EMA on: DCP checkpoints hold one shard file per rank; a run killed in the
    middle of the final export finishes it with resume (no step trained again); a resume with another world size,
    grad accumulation or data order is refused, naming what changed."""
    import re

    import ray.train
    from transformers import JanusForConditionalGeneration

    from trainer.train import TrainError, latest_checkpoint, train

    steps = 4
    facts = {"stage1.steps": steps, "checkpoint_every": 2, "log_every": 2, "ray.strategy": "fsdp", "ema.enabled": True}
    with pytest.raises(ray.train.TrainingFailedError):  # rank 0 is SIGKILLed between final/'s weights and marker
        train(_config(tmp_path, fail_during_export=True, **facts), tiny_dataset, stage="1")
    final = tmp_path / "stage1" / "final"
    assert (final / "config.json").is_file() and not (final / "irgl_train.json").is_file()
    ckpt = latest_checkpoint(_config(tmp_path, **facts), "1")
    assert ckpt is not None and ckpt.name == f"step-{steps:08d}"
    state = json.loads((ckpt / "irgl_state.json").read_text())
    assert (state["step"], state["world_size"], state["grad_accum"], state["ema"]) == (steps, 2, 1, True)
    assert state["files"] == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote (and reads back) its own shard
    assert not list(ckpt.glob("*.pt"))  # no full model.pt / optimizer.pt any more

    for overrides, what in (
        ({"grad_accum": 2}, "grad_accum 1 -> 2"),
        ({"ray.num_workers": 1}, "ray.num_workers 2 -> 1"),
        ({"seed": 1}, "data fingerprint"),
    ):
        with pytest.raises(TrainError, match=re.escape(what) + ".*--force-resume"):
            train(_config(tmp_path, **facts, **overrides), tiny_dataset, stage="1", resume=True)

    result = train(_config(tmp_path, **facts), tiny_dataset, stage="1", resume=True)["1"]
    assert result.steps == steps and (final / "irgl_train.json").is_file()
    events = [json.loads(x) for x in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "start"] == [0, steps]
    assert [e["steps"] for e in events if e.get("event") == "end"] == [0]  # the resumed run only exported
    raw = JanusForConditionalGeneration.from_pretrained(final).state_dict()
    ema = JanusForConditionalGeneration.from_pretrained(tmp_path / "stage1" / "final_ema").state_dict()
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert raw[key].dtype == ema[key].dtype and not raw[key].equal(ema[key])


def test_webdataset_only_dataset_trains_with_grad_accum_cosine_and_ema(
    ray_session: object, tiny_dataset: Path, tmp_path: Path
) -> None:
    """A dataset holding only wds/ trains with `data_format: webdataset`: with grad_accum 2 on 2 workers every step
    consumes the 2 packs per rank the plan (trainer.order.worker_packs over the WebDataset index) gives it, in order;
    each logged lr is the cosine schedule's value for that step; the EMA export differs from the raw one."""
    import math
    import shutil

    from transformers import JanusForConditionalGeneration

    from trainer.index import build_index, janus_sequence_format
    from trainer.order import DataOrder, worker_packs
    from trainer.tiny_janus import resolve_model
    from trainer.train import TrainError, train

    wds_only = tmp_path / "wds-only"
    shutil.copytree(tiny_dataset, wds_only, ignore=shutil.ignore_patterns("data"))
    assert not (wds_only / "data").exists() and list((wds_only / "wds").rglob("*.tar"))
    steps, accum, warmup, lr = 6, 2, 2, 3e-3
    facts = {
        "data_format": "webdataset", "grad_accum": accum, "stage1.steps": steps, "stage1.warmup_steps": warmup,
        "stage1.schedule": "cosine", "stage1.min_lr_ratio": 0.1, "stage1.lr": lr, "ema.enabled": True,
        "checkpoint_every": 100, "log_every": 1,
    }  # fmt: skip
    with pytest.raises(TrainError, match="no parquet shards"):
        train(_config(tmp_path / "out-parquet"), wds_only, stage="1")
    cfg = _config(tmp_path / "out", **facts)
    result = train(cfg, wds_only, stage="1")["1"]
    assert result.steps == steps and sum(result.usable.values()) == 4 * len(MODES)

    # Every step: 2 packs per rank, the plan's packs in order, read from the tars.
    index = build_index(wds_only, list(cfg.stage1.active_modes()), janus_sequence_format(resolve_model(cfg.model)),
                        cfg.token_budget, "webdataset")  # fmt: skip
    assert {e.file.endswith(".tar") for es in index.entries.values() for e in es} == {True}
    weights = {m: w for m, w in cfg.stage1.modes.items() if w > 0}  # in the config's order, as the loop mixes
    for rank in range(2):
        lines = (tmp_path / "out" / "stage1" / "records" / f"rank-{rank:02d}.jsonl").read_text().splitlines()
        logged = [json.loads(x) for x in lines if '"packs"' in x]
        order = DataOrder(weights, cfg.token_budget, cfg.seed, "1", world_size=2, grad_accum=accum,
                          streams=cfg.data_streams, shuffle_blocks=cfg.shuffle_blocks)  # fmt: skip
        plan = worker_packs(index, order, rank)
        for entry, (step, packs) in zip(logged, plan, strict=False):
            assert entry["step"] == step + 1 and len(entry["packs"]) == accum
            assert [p["pack"] for p in entry["packs"]] == [(step * accum + k) * 2 + rank for k in range(accum)]
            assert [p["ids"] for p in entry["packs"]] == [[e.id for e in pack.entries] for pack in packs]
        assert [e["step"] for e in logged] == list(range(1, steps + 1))

    # The lr logged with each step is the one that step used: linear warm-up, then cosine to 0.1 x lr.
    def cosine(s: int) -> float:
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))

    metrics = _metrics(tmp_path / "out" / "stage1" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["lr"] for m in metrics] == pytest.approx([cosine(s) for s in range(steps)])
    raw = JanusForConditionalGeneration.from_pretrained(tmp_path / "out" / "stage1" / "final").state_dict()
    ema = JanusForConditionalGeneration.from_pretrained(tmp_path / "out" / "stage1" / "final_ema").state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not raw[key].equal(ema[key])
