"""The build end to end: stages in a plain loop, then `build` on local Ray for both strategies, with prompts
from every source kind, and `verify` on the result. Real tiny models throughout (vLLM CPU, diffusers, open_clip).
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.build import build
from pipeline.graph import make_rows, rows_to_batch, stage_graph
from pipeline.verify import verify
from schemas import MODES, parse_reflection, strip_think
from schemas.config import BuildConfig, PromptSourceConfig, load_build_config
from schemas.trajectory import trajectory_id
from schemas.work import OK
from stages.assemble import AssembleStage
from stages.draw import DrawStage
from stages.prompts import load_sources
from stages.reflect import ReflectStage
from stages.score import ScoreStage
from stages.think import ThinkStage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(**overrides) -> BuildConfig:
    data = yaml.safe_load(TINY.read_text())
    data.update(overrides)
    return BuildConfig.model_validate(data)


def _png_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


@pytest.mark.parametrize("strategy", ["forward", "hindsight"])
def test_stages_in_a_plain_loop(strategy, vlm_engine, image_engine, clip_scorer, tiny_vlm_config) -> None:
    """Every stage object called in order on one batch, with the verifier on: its bar is set between the rows'
    improvements (I2 over I1), so it must keep some rows and filter the others, each by the rule it states."""
    cfg = tiny_config(strategy=strategy)
    prompts, _ = load_sources([PromptSourceConfig(kind="generator", generator_count=3, generator_seed=5)])
    rows = make_rows(cfg, prompts)
    text = tiny_vlm_config  # the session engine's own settings (bounds that fit its max_tokens)
    stages = {
        "think": ThinkStage(text, strategy, engine=vlm_engine),
        "draw_initial": DrawStage(cfg.draw_initial.model, "initial", strategy, engine=image_engine),
        "reflect": ReflectStage(text, strategy, engine=vlm_engine),
        "draw_refined": DrawStage(cfg.draw_refined.model, "refined", strategy, engine=image_engine),
    }
    order = ["think", "draw_initial", "reflect", "draw_refined"]
    if strategy == "hindsight":
        order = ["draw_initial", "draw_refined", "think", "reflect"]
    batch = rows_to_batch(rows)
    for name in order:
        batch = stages[name](batch)
        assert len(batch["id"]) == 3, name
    assert batch["status"] == [OK] * 3, batch["error"]

    # The scores do not depend on the thresholds: read them once with the tiny preset's verifier (which keeps any
    # finite score), then put min_improvement between the lowest gain and the next one.
    probe = ScoreStage(cfg.score.model, engine=clip_scorer)({k: list(v) for k, v in batch.items()})
    gains = [probe["clip_i2"][i] - probe["clip_i1"][i] for i in range(3)]
    low, mid = sorted(gains)[:2]
    assert low < mid, gains
    bar = (low + mid) / 2
    verifier = cfg.score.model.model_copy(update={"min_improvement": bar})
    assert verifier.min_clip_i2 == -1.0 and verifier.max_i1_i2_similarity == 1.0  # only the gain can decide
    batch = ScoreStage(verifier, engine=clip_scorer)(batch)
    batch = AssembleStage()(batch)
    assert len(batch["id"]) == 3
    assert batch["id"] == [trajectory_id(p.text, p.source, cfg.seed, cfg.generation_hash()) for p in prompts]
    for i in range(3):
        assert strip_think(batch["t1"][i])
        reflection = parse_reflection(batch["t2"][i])
        assert reflection.final_prompt == batch["final_prompt"][i]
        assert _png_size(batch["i1"][i]) == (64, 64) and _png_size(batch["i2"][i]) == (64, 64)
        for key in ("clip_i1", "clip_i2", "clip_i1_i2"):
            assert math.isfinite(batch[key][i]) and -1.0 <= batch[key][i] <= 1.0
            assert batch[key][i] == probe[key][i]
        assert json.loads(batch["models"][i])["think"] == tiny_vlm_config.model
        gain = batch["clip_i2"][i] - batch["clip_i1"][i]
        if gain >= bar:
            assert (batch["status"][i], batch["verdict"][i]) == (OK, "accept"), batch["error"][i]
            assert set(json.loads(batch["timings"][i])) == {*order, "score", "assemble"}
        else:
            assert (batch["status"][i], batch["stage"][i], batch["verdict"][i]) == ("filtered", "score", "reject")
            assert batch["error"][i] == f"verifier: clip(I2)-clip(I1)={gain:.4f} < min_improvement={bar}"
            assert set(json.loads(batch["timings"][i])) == {*order, "score"}  # assemble skips filtered rows
    assert batch["status"].count(OK) == 2 and batch["verdict"].count("reject") == 1


def _write_sources(d: Path) -> list[dict]:
    """One or two prompts from every source kind, with an empty line and duplicates in the txt file."""
    (d / "p.txt").write_text("a red apple\n\n   \na red apple\na blue chair\n", encoding="utf-8")
    (d / "p.jsonl").write_text(json.dumps({"prompt": "a green kite"}) + "\n{broken\n", encoding="utf-8")
    (d / "p.json").write_text(json.dumps([{"prompt": "a black cat"}, "a blue chair"]), encoding="utf-8")
    pq.write_table(pa.table({"caption": ["a white vase"]}), d / "p.parquet")
    (d / "hf").mkdir()
    pq.write_table(pa.table({"text": ["a purple book"]}), d / "hf" / "train.parquet")
    return [
        {"kind": "txt", "path": str(d / "p.txt")},
        {"kind": "jsonl", "path": str(d / "p.jsonl")},
        {"kind": "json", "path": str(d / "p.json")},
        {"kind": "parquet", "path": str(d / "p.parquet"), "field": "caption"},
        {"kind": "hf", "path": str(d / "hf"), "field": "text"},
        {"kind": "generator", "generator_count": 1, "generator_seed": 9},
    ]


def _check_build(out: Path, result, n_ok: int, strategy: str) -> None:
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {m.name: n_ok for m in MODES}
    stages = manifest["build"]["stages"]
    assert [c["stage"] for c in stages] == list(result.stage_counts)  # graph order
    assert stages[0]["in"] == result.prompts.kept
    for c in stages:
        assert c["in"] == c["ok"] + c["filtered"] + c["failed"]
    trajectories = pq.read_table(out / "trajectories").to_pylist()
    assert len(trajectories) == n_ok and {t["strategy"] for t in trajectories} == {strategy}
    rows = pq.read_table(out / "data" / "improving_full_learning").to_pylist()
    assert [r["trajectory_id"] for r in rows] == [t["id"] for t in trajectories]


def test_build_forward_on_ray_from_every_source_kind(tmp_path: Path, ray_session) -> None:
    sources = _write_sources(tmp_path)
    cfg = tiny_config(prompts=sources)
    out = tmp_path / "out"
    result = build(cfg, out, executor="ray")
    # txt: 2 kept (empty x2, duplicate), jsonl: 1 (+1 malformed), json: 1 (+1 duplicate across sources),
    # parquet 1, hf 1, generator 1
    assert result.prompts.kept == 7
    assert result.prompts.dropped == {"empty": 2, "duplicate": 2, "malformed_json": 1}
    assert any(p.startswith("p.jsonl:2: malformed JSON") for p in result.prompts.problems)
    assert result.units_run == 1 and result.units_skipped == 0
    _check_build(out, result, result.stage_counts["assemble"]["ok"], "forward")
    assert result.stage_counts["assemble"]["ok"] == 7
    prompts = [r["prompt"] for r in pq.read_table(out / "trajectories").to_pylist()]
    assert prompts[:3] == ["a red apple", "a blue chair", "a green kite"]
    sources_seen = {r["source"] for r in pq.read_table(out / "trajectories").to_pylist()}
    assert sources_seen == {"txt:p.txt", "jsonl:p.jsonl", "json:p.json", "parquet:p.parquet",
                            f"hf:{tmp_path / 'hf'}:train", "generator:9"}  # fmt: skip

    # The same command again: every unit has a valid marker, nothing runs, the shards are byte-identical.
    before = {p: p.read_bytes() for p in (out / "data").rglob("*.parquet")} | {
        out / "manifest.json": (out / "manifest.json").read_bytes()
    }
    again = build(cfg, out, executor="ray")
    assert again.units_run == 0 and again.units_skipped == 1
    assert {p: p.read_bytes() for p in before} == before


def test_build_hindsight_on_ray(tmp_path: Path, ray_session) -> None:
    cfg = tiny_config(strategy="hindsight", prompts={"kind": "generator", "generator_count": 4, "generator_seed": 2},
                      unit_size=2)  # fmt: skip
    out = tmp_path / "out"
    result = build(cfg, out, executor="ray")
    assert result.units_run == 2
    assert list(result.stage_counts) == [
        "draw_initial", "draw_refined", "safety", "think", "reflect", "score", "assemble"
    ]  # fmt: skip
    _check_build(out, result, 4, "hindsight")
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == ["unit-00000.parquet", "unit-00001.parquet"]


def session_stages(cfg: BuildConfig, text, vlm_engine, image_engine, clip_scorer) -> list:
    """Stage objects in graph order on the session's engines: no engine start in this test (the image safety stage,
    when on, opens its ONNX session in well under a second)."""
    return graph_stages(cfg, text, vlm_engine, image_engine, clip_scorer)


def test_verifier_filters_and_rejects_are_written(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    """A strict verifier filters every trajectory: no records, rejects name the stage and the rule."""
    data = yaml.safe_load(TINY.read_text())
    data["prompts"] = {"kind": "generator", "generator_count": 2}
    data["score"]["model"]["min_clip_i2"] = 2.0
    strict = BuildConfig.model_validate(data)
    stages = session_stages(strict, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    out = tmp_path / "out"
    result = build(strict, out, executor="local", stages=stages)
    assert result.stage_counts["score"] == {"in": 2, "ok": 0, "filtered": 2, "failed": 0, "capped": 0}
    rejects = [json.loads(line) for line in (out / "rejects" / "unit-00000.jsonl").read_text().splitlines()]
    assert [(r["status"], r["stage"]) for r in rejects] == [("filtered", "score")] * 2
    assert all("min_clip_i2=2.0" in r["reason"] for r in rejects)
    assert json.loads((out / "manifest.json").read_text())["counts"] == {m.name: 0 for m in MODES}


def _irgl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False)


def test_cli_bad_inputs_fail_before_models_load(tmp_path: Path) -> None:
    proc = _irgl("build", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "missing.txt: prompt file not found" in proc.stderr
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(TINY.read_text())
    data["think"]["resources"]["replicas"] = "many"
    data["draw_initial"]["model"]["stepz"] = 3
    bad.write_text(yaml.safe_dump(data))
    proc = _irgl("build", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "field 'think.resources.replicas'" in proc.stderr and "field 'draw_initial.model.stepz'" in proc.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="config file not found"):
        load_build_config(str(tmp_path / "nope.yaml"))


def test_a_tensor_parallel_engine_asks_for_one_gpu_per_worker(tmp_path: Path) -> None:
    preset = Path(__file__).resolve().parents[1] / "configs" / "irgl-300k.yaml"
    load_build_config(preset)  # the preset itself holds: 4 GPUs for a TP=4 reflect
    data = yaml.safe_load(preset.read_text())
    data["reflect"]["resources"]["num_gpus"] = 2
    bad = tmp_path / "tp.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception) as info:
        load_build_config(bad)
    assert str(info.value).startswith(f"{bad}: Value error, reflect.resources.num_gpus (2) must equal "
                                      "reflect.model.tensor_parallel_size (4)")  # fmt: skip


def graph_stages(cfg: BuildConfig, text, vlm_engine, image_engine, clip_scorer) -> list:
    """The configured graph's own stage objects (`stage_graph(cfg)`: the config's options reach them as in a real
    build, e.g. the image format), on the session's engines: no engine start. Text stages take the session engine's
    settings (`text`), which its structured-output bounds were made for."""
    stages = []
    for spec in stage_graph(cfg):
        stage = spec.make()
        if spec.name in ("think", "reflect"):
            stage.cfg, stage.engine = text, vlm_engine
        elif spec.name.startswith("draw_"):
            stage.engine = image_engine
        elif spec.name == "score":
            stage.engine = clip_scorer
        elif spec.name == "safety":
            stage.setup()  # the Open-NSFW ONNX session: well under a second
        stages.append(stage)
    return stages


def test_jpeg_images_through_the_draw_stage(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    """`images: {format: jpeg}`: the draw stages encode I1 and I2 as JPEG, the reflect stage reads the JPEG I1,
    and the trajectories, the Parquet records and the WebDataset members all hold JPEG; verify passes."""
    import io
    import tarfile

    from PIL import Image

    cfg = tiny_config(prompts={"kind": "generator", "generator_count": 2, "generator_seed": 3},
                      images={"format": "jpeg", "jpeg_quality": 92})  # fmt: skip
    out = tmp_path / "out"
    stages = graph_stages(cfg, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    result = build(cfg, out, executor="local", stages=stages)
    assert result.stage_counts["assemble"]["ok"] == 2, result.stage_counts
    assert verify(out) == []
    for t in pq.read_table(out / "trajectories").to_pylist():
        for key in ("i1", "i2"):
            with Image.open(io.BytesIO(t[key])) as img:
                assert (img.format, img.size, img.mode) == ("JPEG", (64, 64), "RGB"), key
    rows = pq.read_table(out / "data" / "improving_full_learning").to_pylist()
    assert len(rows) == 2
    for row in rows:
        images = json.loads(row["images"])
        assert images and all(i["format"] == "jpeg" and i["name"].endswith(".jpg") for i in images), images
        turns = json.loads(row["conversation"])
        parts = [p for t in turns if isinstance(t["content"], list) for p in t["content"] if p["type"] == "image"]
        assert parts
        for part in parts:
            with Image.open(io.BytesIO(base64.b64decode(part["content"]))) as img:
                assert img.format == "JPEG"
    members = []
    for tar in (out / "wds" / "improving_full_learning").glob("*.tar"):
        with tarfile.open(tar) as tf:
            members += [m.name for m in tf.getmembers()]
    images = [m for m in members if not m.endswith(".json")]
    assert images and all(m.endswith((".i1.jpg", ".i2.jpg")) for m in images), members


def test_webdataset_off_writes_no_tars_and_verifies(
    tmp_path: Path, vlm_engine, image_engine, clip_scorer, tiny_vlm_config
) -> None:
    """`shards: {webdataset: false}`: no wds/ at all, the manifest lists Parquet only, verify passes. Turned off
    on an OUT built with it on, the rerun rewrites the shards (no stage runs) and drops every tar."""
    data = yaml.safe_load(TINY.read_text())
    data.update(prompts={"kind": "generator", "generator_count": 2, "generator_seed": 6})
    out = tmp_path / "out"

    def formats(where: Path) -> set[str]:
        return {f["format"] for f in json.loads((where / "manifest.json").read_text())["files"]}

    off = BuildConfig.model_validate({**data, "shards": {"rows_per_group": 64, "webdataset": False}})
    stages = graph_stages(off, tiny_vlm_config, vlm_engine, image_engine, clip_scorer)
    result = build(off, out, executor="local", stages=stages)
    assert result.trajectories == 2
    assert not (out / "wds").exists()
    assert "webdataset" not in formats(out) and "parquet" in formats(out)
    assert verify(out) == []

    on = BuildConfig.model_validate(data)  # the preset: WebDataset on
    assert on.shards.webdataset and on.generation_hash() == off.generation_hash()
    other = tmp_path / "other"
    build(on, other, executor="local", stages=stages)
    assert list((other / "wds").rglob("*.tar")) and "webdataset" in formats(other)
    again = build(off, other, executor="local", stages=stages)
    assert (again.units_run, again.stage_seconds) == (0, {})  # shards rewritten from the trajectories only
    assert not list((other / "wds").rglob("*.tar")) and "webdataset" not in formats(other)
    assert verify(other) == []


def _recording_text_stage(base: type) -> type:
    """`base` (ThinkStage or ReflectStage) that writes, once set up, which engine class it runs on into the folder
    `record` (`<stage>-<pid>`). Defined in a function: Ray gets the class by value."""

    class Recording(base):
        def __init__(self, record: str, **kwargs) -> None:  # noqa: ANN003
            super().__init__(**kwargs)
            self.record = record

        def setup(self) -> None:
            import os

            super().setup()
            Path(self.record, f"{self.name}-{os.getpid()}").write_text(type(self.engine).__name__)

    return Recording


def test_transformers_engine_inside_a_build(tmp_path: Path, ray_session) -> None:
    """`engine: transformers` for T1 and T2 in a build on Ray: the stage actors run the transformers fallback
    (recorded by each actor once set up), every row ends kept or failed with a reason, and what is kept verifies."""
    import dataclasses

    data = yaml.safe_load(TINY.read_text())
    data.update(prompts={"kind": "generator", "generator_count": 2, "generator_seed": 4}, unit_size=2)
    for stage in ("think", "reflect"):
        data[stage]["model"]["engine"] = "transformers"
    cfg = BuildConfig.model_validate(data)
    record = tmp_path / "record"
    record.mkdir()
    classes = {"think": _recording_text_stage(ThinkStage), "reflect": _recording_text_stage(ReflectStage)}
    graph = [
        dataclasses.replace(spec, cls=classes[spec.name], kwargs={**spec.kwargs, "record": str(record)})
        if spec.name in classes else spec
        for spec in stage_graph(cfg)
    ]  # fmt: skip
    out = tmp_path / "out"
    result = build(cfg, out, executor="ray", graph=graph)
    engines = {p.name.split("-")[0]: p.read_text() for p in record.iterdir()}
    assert engines == {"think": "TransformersTextEngine", "reflect": "TransformersTextEngine"}, engines
    counts = result.stage_counts
    assert counts["think"]["in"] == 2
    assert all(c["in"] == c["ok"] + c["filtered"] + c["failed"] for c in counts.values())
    assert verify(out) == []
    kept = pq.read_table(out / "trajectories").to_pylist()
    print(f"transformers build: {counts}")
    assert kept and len(kept) == counts["assemble"]["ok"] == result.trajectories, counts
    for t in kept:
        strip_think(t["t1"])
        parse_reflection(t["t2"])
        assert json.loads(t["models"])["reflect"] == "tiny:vlm"
    rejects = [json.loads(x) for x in (out / "rejects" / "unit-00000.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejects) == 2 and all(r["reason"] for r in rejects)
