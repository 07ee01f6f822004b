"""`irgl plan`: the production presets validate and plan offline; impossible requests warn; bad fields fail."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.cli_hub import plan_command
from pipeline.plan import (
    IMAGE_SECONDS_PER_STEP,
    load_cluster,
    make_plan,
    pack_actors,
    params_billions,
    plan_from_file,
    split_slice_count,
)
from schemas.config import load_build_config
from schemas.modes import MODES

ROOT = Path(__file__).resolve().parents[1]
FORWARD = ROOT / "configs" / "irgl-300k.yaml"
HINDSIGHT = ROOT / "configs" / "irgl-300k-hindsight.yaml"
CLUSTER = ROOT / "ray_cluster.yaml"
#: The presets' prompts: the generator's distinct prompts (40,000 drawn, seed 0) + three Hub slices.
GENERATED = 10_462
HUB_ROWS = 1_600 + 70_000 + 220_000


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(plan_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps "plan" as a subcommand name
    return app


def _run(*args: str):
    return CliRunner().invoke(_app(), ["plan", *map(str, args)])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails the test: planning reads Hub prompt sources' sizes from the config only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while planning")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _preset_copy(tmp_path: Path, preset: Path, edit) -> Path:  # noqa: ANN001 (a function editing the dict)
    data = yaml.safe_load(preset.read_text())
    edit(data)
    path = tmp_path / preset.name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("preset", "order", "gpus"),
    [
        (FORWARD, ["think", "draw_initial", "reflect", "draw_refined", "score", "assemble"], 53),
        (HINDSIGHT, ["draw_initial", "draw_refined", "think", "reflect", "score", "assemble"], 64),
    ],
)
def test_presets_plan_cleanly(preset: Path, order: list[str], gpus: int, no_network: None) -> None:
    result = _run(preset, "--cluster", CLUSTER, "--strict")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "stage graph: prompts -> " + " -> ".join(order) in out
    assert f"expected trajectories: at most {GENERATED + HUB_ROWS:,}" in out
    for m in MODES:
        assert f"{m.index} {m.name}" in out
    assert "Qwen/Qwen2.5-VL-72B-Instruct" in out and "black-forest-labs/FLUX.1-dev" in out
    assert "no warnings" in out and "warning:" not in out

    plan = plan_from_file(preset, cluster=CLUSTER)
    assert [s.name for s in plan.stages] == order
    assert plan.trajectories == plan.records_per_mode == GENERATED + HUB_ROWS
    assert plan.total_gpus == gpus <= plan.cluster.max_gpus
    # Plausible H100 numbers: the job takes hours (not minutes, not weeks); reserved >= busy GPU-hours.
    assert 4 * 3600 < plan.wall_seconds < 24 * 3600
    assert 200 < plan.gpu_hours_busy <= plan.gpu_hours_reserved < 1000
    # Replicas are balanced: every GPU-heavy stage (not the CLIP scorer) is busy at least half of the wall time.
    for s in plan.stages:
        if s.name not in ("score", "assemble"):
            assert s.wall_seconds > 0.5 * plan.wall_seconds, s.name
    assert 0.5e12 < plan.disk_bytes < 5e12 and plan.upload_bytes < plan.disk_bytes


def test_forward_estimates_follow_the_figures() -> None:
    """FLUX.1-dev img2img at strength 0.6 runs 16 of 28 steps at 5.1/28 s per step; the 72B VLM at TP=4 gets the
    assumed 2,000 tok/s."""
    plan = plan_from_file(FORWARD)
    stages = {s.name: s for s in plan.stages}
    flux_step = next(v for k, v, _ in IMAGE_SECONDS_PER_STEP if k == "flux")
    assert stages["draw_refined"].items_per_second == pytest.approx(1 / (16 * flux_step))
    assert stages["draw_initial"].items_per_second == pytest.approx(1 / (4 * flux_step))
    assert stages["score"].items_per_second == pytest.approx(1300)
    assert "2,000 output tok/s" in stages["think"].rate_source
    n = plan.trajectories
    assert stages["draw_refined"].wall_seconds == pytest.approx(n * 16 * flux_step / 32)
    assert plan.bottleneck in ("draw_initial", "draw_refined")
    assert plan.wall_seconds == max(s.wall_seconds or 0 for s in plan.stages)


def test_measured_throughput_in_the_config_wins(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["draw_refined"]["resources"]["items_per_second"] = 1.0

    cfg = load_build_config(str(_preset_copy(tmp_path, FORWARD, edit)))
    plan = make_plan(cfg, keep_rate=0.6)
    refined = next(s for s in plan.stages if s.name == "draw_refined")
    assert refined.items_per_second == 1.0 and refined.rate_source == "config: resources.items_per_second"
    assert refined.wall_seconds == pytest.approx(plan.trajectories / 32)
    assert plan.records_per_mode == round(plan.trajectories * 0.6)


def test_impossible_gpu_requests_warn(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["think"]["model"]["tensor_parallel_size"] = 16
        d["think"]["resources"]["num_gpus"] = 16  # no node has 16 GPUs
        d["draw_refined"]["resources"]["replicas"] = 80  # more GPUs than the cluster can have
        d["reflect"]["resources"]["num_gpus"] = 2  # below tensor_parallel_size=4
        d["reflect"]["model"]["max_tokens"] = 2000  # the regex allows 2,570 characters
        d["draw_initial"]["model"]["height"] = 2048  # the official trainer takes long sides <= 1024

    path = _preset_copy(tmp_path, FORWARD, edit)
    result = _run(path, "--cluster", CLUSTER)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    text = "\n".join(warnings)
    assert "think: an actor needs 16 GPUs on one node but the largest node type" in text
    assert "draw_refined: 80 replicas x 1 GPUs = 80 GPUs > 64 GPUs" in text
    assert "the stage pools hold" in text
    assert "reflect: tensor_parallel_size=4 needs 4 GPUs per actor but resources.num_gpus=2" in text
    assert "reflect: max_tokens=2000 < 2570 characters the regex allows" in text
    assert "draw_initial: 1024x2048 images are outside what the official IRG trainer accepts" in text
    assert len(warnings) == 6
    assert _run(path, "--cluster", CLUSTER, "--strict").exit_code == 1


def test_actors_that_fit_in_total_but_not_per_node_warn(tmp_path: Path) -> None:
    """12 GPUs of 4-GPU actors on 3-GPU nodes: the total fits, the placement does not."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {
                "cluster_name": "t",
                "max_workers": 4,
                "provider": {"type": "aws"},
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 4}, "node_config": {}},
                    "gpu3": {"resources": {"CPU": 64, "GPU": 3}, "node_config": {}, "max_workers": 4},
                },
            }
        )
    )
    spec = load_cluster(cluster)
    assert spec.max_gpus == 12
    assert pack_actors([("a", 1, 4)], spec.nodes()) == ["a"]
    assert pack_actors([("a", 1, 2), ("b", 1, 1)] * 4, spec.nodes()) == []
    assert pack_actors([("a", 1, 3)] * 5, spec.nodes()) == ["a"]


def test_bad_field_fails_like_build(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["think"]["resources"]["num_gpu"] = 4

    result = _run(_preset_copy(tmp_path, FORWARD, edit))
    assert result.exit_code == 2
    assert "field 'think.resources.num_gpu'" in result.output and "Extra inputs are not permitted" in result.output
    assert "stage graph" not in result.output
    missing = _run(tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "config file not found" in missing.output
    broken = tmp_path / "cluster.yaml"
    broken.write_text("available_node_types: {a: {resources: {GPU: 8}}}\n")
    bad_cluster = _run(FORWARD, "--cluster", broken)
    assert bad_cluster.exit_code == 2 and "field 'head_node_type'" in bad_cluster.output


def test_hub_source_counts(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["prompts"] = [{"kind": "hf", "path": "org/prompts", "split": "train", "field": "text"}]

    path = _preset_copy(tmp_path, FORWARD, edit)
    unknown = _run(path)
    assert unknown.exit_code == 0
    assert "expected trajectories: unknown" in unknown.output
    assert "warning: prompts hf:org/prompts:train: count unknown offline" in unknown.output
    known = _run(path, "--expected-count", "org/prompts=1234")
    assert "expected trajectories: at most 1,234" in known.output and "warning: prompts" not in known.output
    assert _run(path, "--expected-count", "org/prompts").exit_code == 2
    assert split_slice_count("train[:1000]") == 1000
    assert split_slice_count("train[100:250]+test[:50]") == 200
    assert split_slice_count("train") is None and split_slice_count("train[:10%]") is None


def test_local_prompt_file_is_counted_exactly(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n\na red cube\na  red   cube\na blue ball\n")
    result = _run(FORWARD, "--prompts", prompts)
    assert result.exit_code == 0
    assert "expected trajectories: 2 " in result.output  # duplicates (after normalisation) and empty lines dropped
    limited = plan_from_file(FORWARD, limit=1000)
    assert limited.trajectories == 1000


def test_params_from_model_ids() -> None:
    assert params_billions("Qwen/Qwen2.5-VL-72B-Instruct") == 72
    assert params_billions("Qwen/Qwen2.5-VL-7B-Instruct") == 7
    assert params_billions("black-forest-labs/FLUX.1-dev") is None
