"""`irgl plan`: the production presets validate and plan offline; impossible requests warn; bad fields fail."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.cli_hub import plan_command
from pipeline.plan import figures as F
from pipeline.plan import plan_from_file
from pipeline.plan import rates as P
from pipeline.plan.cluster import load_cluster, pack_actors
from pipeline.plan.counts import split_slice_count
from pipeline.plan.estimate import make_plan
from pipeline.plan.figures import IMAGE_SECONDS_PER_STEP
from pipeline.plan.rates import params_billions, vlm_image_tokens
from pipeline.plan.render import format_plan
from schemas.config import ConfigError, load_build_config
from schemas.modes import MODES
from schemas.reflection import reflection_regex_max_chars, think_regex_max_chars
from schemas.stages import STAGE_NAMES, STAGES, STRATEGY_ORDER, active_stages, model_stages, stage_order

ROOT = Path(__file__).resolve().parents[1]
FORWARD = ROOT / "configs" / "irgl-300k.yaml"
HINDSIGHT = ROOT / "configs" / "irgl-300k-hindsight.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
CLUSTER = ROOT / "ray_cluster.yaml"
GPU_STAGES = ("think", "draw_initial", "reflect", "draw_refined", "score")


def _expected_prompts(preset: Path) -> int:
    """The presets' prompt count, from the config alone and not through the plan's counting: the generator's
    distinct prompts (it repeats its simple templates) plus the rows of each Hub source's absolute slice."""
    from stages.prompts import generate_prompts

    total = 0
    for src in yaml.safe_load(preset.read_text())["prompts"]:
        if src["kind"] == "generator":
            total += len(set(generate_prompts(src["generator_count"], src["generator_seed"])))
        else:
            m = re.fullmatch(r"train\[:(\d+)\]", src["split"])
            assert m, src
            total += int(m.group(1))
    return total


def _held_gpus(preset: Path) -> float:
    """replicas x num_gpus summed over the stage sections of the YAML."""
    data = yaml.safe_load(preset.read_text())
    return sum(data[s]["resources"]["replicas"] * data[s]["resources"]["num_gpus"] for s in GPU_STAGES)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("plan")(plan_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps "plan" as a subcommand name
    return app


def _run(*args: str):
    """`irgl plan ARGS`; a first argument that is a path is the config (`--config`)."""
    if args and isinstance(args[0], Path):
        args = ("--config", *args)
    return CliRunner().invoke(_app(), ["plan", *map(str, args)])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails the test: planning reads Hub prompt sources' sizes from the config only, and a
    publish dry run contacts nothing (test_publish.py uses this fixture too)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access where nothing may be contacted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _preset_copy(tmp_path: Path, preset: Path, edit) -> Path:  # noqa: ANN001 (a function editing the dict)
    data = yaml.safe_load(preset.read_text())
    edit(data)
    path = tmp_path / preset.name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("preset", "order", "bottleneck"),
    [
        (FORWARD, ["think", "draw_initial", "reflect", "draw_refined", "safety", "score", "assemble"], "draw_initial"),
        (HINDSIGHT, ["draw_initial", "draw_refined", "safety", "think", "reflect", "score", "assemble"], "reflect"),
    ],
)
def test_presets_plan_cleanly(preset: Path, order: list[str], bottleneck: str, no_network: None) -> None:
    result = _run(preset, "--cluster", CLUSTER, "--strict")
    assert result.exit_code == 0, result.output
    out = result.output
    expected = _expected_prompts(preset)
    assert "stage graph: prompts -> " + " -> ".join(order) in out
    assert f"expected trajectories: at most {expected:,}" in out
    for m in MODES:
        assert f"{m.index} {m.name} " in out and f"{expected:,}" in out
    assert "Qwen/Qwen2.5-VL-72B-Instruct" in out and "black-forest-labs/FLUX.1-dev" in out
    assert "no warnings" in out and "warning:" not in out

    plan = plan_from_file(preset, cluster=CLUSTER)
    assert [s.name for s in plan.stages] == order
    assert plan.trajectories == plan.records_per_mode == expected
    assert plan.total_gpus == _held_gpus(preset) <= plan.cluster.max_gpus
    # Records per mode follow the documented formula: round(prompts x keep rate), one per mode per trajectory.
    for keep in (0.6, 0.25):
        assert plan_from_file(preset, keep_rate=keep).records_per_mode == round(expected * keep)
    # Plausible H100 numbers: the job takes hours (not minutes, not weeks); reserved >= busy GPU-hours.
    assert 4 * 3600 < plan.wall_seconds < 24 * 3600
    assert 200 < plan.gpu_hours_busy <= plan.gpu_hours_reserved < 1500
    # With prompt and image tokens counted, T2 (reading 1 or 2 images of 1,369 tokens) needs as many GPUs as FLUX:
    # forward gives reflect 4 replicas so that the image stage is the slowest; hindsight's 64 GPUs leave it the VLMs.
    assert plan.bottleneck == bottleneck
    # Replicas are balanced: every GPU-heavy stage (not the CLIP scorer, not the CPU safety classifier) is busy at
    # least half of the wall time.
    for s in plan.stages:
        if s.name not in ("score", "safety", "assemble"):
            assert s.wall_seconds > 0.5 * plan.wall_seconds, s.name
    assert 0.5e12 < plan.disk_bytes < 5e12 and plan.upload_bytes < plan.disk_bytes


def test_forward_estimates_follow_the_figures() -> None:
    """Every part of a trajectory's cost, from the figures: FLUX.1-dev img2img at strength 0.6 runs 16 of 28 steps
    at 0.183 s/step, plus text encoders, VAE decode and encode of I1, and JPEG decode/encode on the CPU; the 72B VLM
    at TP=4 decodes at the assumed 2,000 tok/s and prefills its prompt and I1's 1,369 tokens; the scorer is
    CPU-bound on 8 preprocessing threads."""
    plan = plan_from_file(FORWARD)
    stages = {s.name: s for s in plan.stages}
    flux_step = next(v for k, v, _ in IMAGE_SECONDS_PER_STEP if k == "flux")
    assert flux_step == 0.183
    _, encoders, vae, _ = next(row for row in F.IMAGE_PIPELINE_SECONDS if row[0] == "flux")
    jpeg_encode, jpeg_decode = F.IMAGE_ENCODE_CPU_SECONDS["jpeg"], F.IMAGE_DECODE_CPU_SECONDS["jpeg"]
    refined = 16 * flux_step + encoders + vae * (1 + F.VAE_ENCODE_OF_DECODE) + jpeg_encode + jpeg_decode
    assert stages["draw_refined"].items_per_second == pytest.approx(1 / refined)
    assert stages["draw_initial"].items_per_second == pytest.approx(1 / (4 * flux_step + encoders + vae + jpeg_encode))
    assert (
        "16 steps 2.93 s + encoders/VAE 0.14 s + CPU 0.02 s (img2img: 16 of 28 steps)"
        in stages["draw_refined"].rate_source
    )
    # Scoring: 2 images x (decode + preprocessing) on 8 threads is slower than ViT-L/14's 2 x 1/2,600 s on the GPU.
    cpu = 2 * (jpeg_decode + F.CLIP_PREPROCESS_CPU_SECONDS) / 8
    assert cpu > 2 / 2600 and stages["score"].items_per_second == pytest.approx(1 / cpu)
    assert "CPU-bound" in stages["score"].rate_source
    # Text: decode + prefill (+ the vision encoder for T2's image); T1 forward is text only.
    decode_tps, prefill_tps = 36_000 / 72 * 4, 400e12 * 4 / (2 * 72e9)
    cfg = load_build_config(FORWARD)
    think_out = 0.5 * think_regex_max_chars(cfg.think.model.max_section_chars) / 4  # half the regex's text, 4 ch/tok
    think_in = F.INSTRUCTION_TOKENS["think"] + F.MEAN_PROMPT_CHARS / 4
    assert stages["think"].items_per_second == pytest.approx(1 / (think_out / decode_tps + think_in / prefill_tps))
    assert "decode ~2,000 output tok/s" in stages["think"].rate_source and "image" not in stages["think"].rate_source
    reflect_out = 0.5 * reflection_regex_max_chars(cfg.reflect.model.max_section_chars) / 4
    reflect_in = F.INSTRUCTION_TOKENS["reflect"] + F.MEAN_PROMPT_CHARS / 4 + think_out + 1369
    vision = 2 * 0.67e9 * 4 * 1369 / (400e12 * 4)
    expected = 1 / (reflect_out / decode_tps + reflect_in / prefill_tps + vision)
    assert stages["reflect"].items_per_second == pytest.approx(expected)
    assert "1 image(s) x 1,369 tok" in stages["reflect"].rate_source
    # Prefill is no rounding error: without it T2 would be more than twice as fast.
    assert stages["reflect"].items_per_second < 0.5 * decode_tps / reflect_out
    n = plan.trajectories
    assert stages["draw_refined"].wall_seconds == pytest.approx(n * refined / 32)
    assert plan.wall_seconds == max(s.wall_seconds or 0 for s in plan.stages)


def test_hindsight_vlm_requests_carry_their_images() -> None:
    """Hindsight: T1 looks at I2, T2 at I1 and I2; each 1024^2 image is 1,369 tokens of prefill."""
    stages = {s.name: s for s in plan_from_file(HINDSIGHT).stages}
    assert "1 image(s) x 1,369 tok" in stages["think"].rate_source
    assert "2 image(s) x 1,369 tok" in stages["reflect"].rate_source
    cfg = load_build_config(HINDSIGHT)
    assert P.text_load(cfg, "reflect", 2000).image_tokens == 2 * 1369
    assert P.text_load(cfg, "think", 2000).images == 1


def test_vlm_image_tokens() -> None:
    """Qwen2.5-VL: sides rounded to multiples of 28 px, one token per 28x28 px, at most 12,845,056 px."""
    assert vlm_image_tokens(1024, 1024) == 37 * 37 == 1369  # ~1,400 tokens for a 1024x1024 image
    assert vlm_image_tokens(512, 512) == 18 * 18
    assert vlm_image_tokens(1344, 768) == 48 * 27
    assert vlm_image_tokens(8192, 8192) * 28 * 28 <= 12_845_056  # scaled down to max_pixels


def test_compile_option_is_offered_and_planned(tmp_path: Path) -> None:
    """With `compile: false` the plan offers torch.compile with its measured figure; with `compile: true` it plans
    with 0.133 s/step (FLUX.1-dev on an H100) and the generation hash does not change."""
    plan = plan_from_file(FORWARD)
    offered = [o for o in plan.options if "`compile: true`" in o]
    assert [o.split(":")[0] for o in offered] == ["draw_initial", "draw_refined"]
    assert "~0.133 s instead of 0.183 s (measured)" in offered[1]
    result = _run(FORWARD)
    assert "option: draw_refined: `compile: true`" in result.output and "warning:" not in result.output

    def edit(d: dict) -> None:
        d["draw_refined"]["model"]["compile"] = True

    path = _preset_copy(tmp_path, FORWARD, edit)
    compiled = plan_from_file(path)
    before = {s.name: s for s in plan.stages}["draw_refined"]
    after = {s.name: s for s in compiled.stages}["draw_refined"]
    assert "torch.compile: 0.133 s/step" in after.rate_source
    saved = 16 * (0.183 - 0.133)
    assert 1 / after.items_per_second == pytest.approx(1 / before.items_per_second - saved)
    assert [o.split(":")[0] for o in compiled.options if "compile" in o] == ["draw_initial"]
    assert load_build_config(path).generation_hash() == load_build_config(FORWARD).generation_hash()
    # A model without a compiled figure gets FLUX.1-dev's speed-up, said to be assumed.
    sana = [o for o in plan_from_file(HINDSIGHT).options if o.startswith("draw_initial: `compile")]
    assert len(sana) == 1 and "assumed: FLUX.1-dev's speed-up" in sana[0]


def test_compile_on_cpu_warns(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["draw_initial"]["model"]["compile"] = True

    cfg = load_build_config(TINY, {"draw_initial.model.compile": True})
    warnings = make_plan(cfg).warnings
    assert any(w.startswith("draw_initial: compile: true on CPU") for w in warnings)
    assert not any("compile" in w for w in make_plan(load_build_config(TINY)).warnings)


def test_image_engine_compiles_the_denoiser() -> None:
    """`compile: true` wraps the UNet/transformer with torch.compile in place at setup (compilation itself is lazy,
    at the first call, so this test stays cheap on CPU); the image-to-image variant shares the compiled module."""
    from schemas.config import ImageModelConfig
    from stages.engines.image import DiffusersImageEngine
    from stages.tiny import tiny_path

    cfg = {"model": str(tiny_path("tiny:sd")), "steps": 2, "height": 64, "width": 64, "img2img": True}
    eager = DiffusersImageEngine(ImageModelConfig(**cfg), device="cpu")
    eager.setup()
    assert eager.compiled is None and eager._t2i.unet._compiled_call_impl is None
    engine = DiffusersImageEngine(ImageModelConfig(**cfg, compile=True), device="cpu")
    engine.setup()
    assert engine.compiled == "unet"
    assert engine._t2i.unet._compiled_call_impl is not None
    assert engine._i2i.unet is engine._t2i.unet
    assert "compile" not in ImageModelConfig(**cfg, compile=True).model_dump()  # never hashed, never in build.json


def test_scorer_cpu_bound_option(tmp_path: Path) -> None:
    """The scorer's rate is the slower of GPU and CPU preprocessing; more CPUs help until the GPU is the limit."""
    plan = plan_from_file(FORWARD)
    option = [o for o in plan.options if o.startswith("score:")]
    assert len(option) == 1 and "CPU-bound (8 preprocessing thread(s)" in option[0] and "num_cpus: 32" in option[0]

    def edit(d: dict) -> None:
        d["score"]["resources"]["num_cpus"] = 32

    score = {s.name: s for s in plan_from_file(_preset_copy(tmp_path, FORWARD, edit)).stages}["score"]
    assert score.items_per_second == pytest.approx(4 * 200)
    assert "on 32 thread(s)" in score.rate_source

    def more(d: dict) -> None:
        d["score"]["model"]["model"] = "ViT-bigG-14"  # 400 images/s on the GPU: GPU-bound even on 8 threads

    big = plan_from_file(_preset_copy(tmp_path, FORWARD, more))
    assert {s.name: s for s in big.stages}["score"].items_per_second == pytest.approx(200)
    assert "GPU-bound" in {s.name: s for s in big.stages}["score"].rate_source
    assert not [o for o in big.options if o.startswith("score:")]


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
    assert "reflect: max_tokens=2000 < 2570 characters the regex allows: the engine stops at max_tokens" in text
    assert "draw_initial: 1024x2048 images are outside what the official IRG trainer accepts" in text
    assert len(warnings) == 5, text
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


def test_token_budget_and_cap_warnings(tmp_path: Path) -> None:
    """`irgl plan` warns before a build makes rows fail: max_tokens below what the regex allows (the engine cuts
    there), section caps below what a real model writes (rows that reach a cap fail), and a context that cannot
    hold the longest prompt + its images + max_tokens."""

    def edit(d: dict) -> None:
        d["think"]["model"]["max_section_chars"] = 400  # a real plan runs to ~1,000 characters
        d["think"]["model"]["max_tokens"] = 400  # < the 418 characters the T1 regex then allows
        d["reflect"]["model"]["max_section_chars"] = 300  # reflection parts run to ~500
        d["reflect"]["model"]["max_tokens"] = 6000
        d["reflect"]["model"]["max_model_len"] = 7000  # < prompt ~1,025 + 1,369 (I1) + 6,000

    path = _preset_copy(tmp_path, FORWARD, edit)
    warnings = [line for line in _run(path).output.splitlines() if line.startswith("warning: ")]
    text = "\n".join(warnings)
    assert "think: max_tokens=400 < 418 characters the regex allows" in text
    assert "think: max_section_chars=400 caps the plan below the ~1000 characters a real model writes" in text
    assert "reflect: max_section_chars=300 caps each reflection part below the ~500 characters" in text
    context = [w for w in warnings if w.startswith("warning: reflect: max_model_len=7000 <")]
    assert len(context) == 1 and "+ 1 image(s) x 1,369 + max_tokens 6,000" in context[0]
    assert len(warnings) == 4, text
    # The numbers behind the context check: instruction + the longest prompt (max_chars 2,000 of the generator
    # source) + the longest T1 the think regex allows, at ~4 characters per token.
    cfg = load_build_config(path)
    load = P.text_load(cfg, "reflect", 2000)
    assert load.max_prompt_tokens == pytest.approx(F.INSTRUCTION_TOKENS["reflect"] + (2000 + 418) / 4)

    # tiny: models write random text: no section-cap warning for them (the tiny preset plans without warnings).
    tiny = make_plan(load_build_config(TINY))
    assert not [w for w in tiny.warnings if "max_section_chars" in w or "max_model_len" in w or "max_tokens" in w]


def test_presets_leave_room_for_prompts_and_images() -> None:
    """Both presets pass the context check with the margins their comments claim."""
    for preset in (FORWARD, HINDSIGHT):
        cfg = load_build_config(preset)
        for name in ("think", "reflect"):
            m = getattr(cfg, name).model
            load = P.text_load(cfg, name, max(s.max_chars for s in cfg.prompts))
            assert load.max_prompt_tokens + load.image_tokens + m.max_tokens < m.max_model_len, (preset.name, name)
            assert m.max_section_chars >= F.MIN_SECTION_CHARS[name]


# ---------------------------------------------------------------------------------------------------------------
# The stage registry (schemas/stages.py): one list that the config, the build, the plan and the report read


def test_stage_registry_is_what_everything_reads() -> None:
    from pipeline.graph import model_names, stage_graph
    from pipeline.report import _num_gpus

    assert STAGE_NAMES == ("think", "draw_initial", "reflect", "draw_refined", "safety", "score", "judge", "assemble")
    assert {s.name: s.kind for s in STAGES} == {
        "think": "text", "draw_initial": "image", "reflect": "text", "draw_refined": "image", "safety": "safety",
        "score": "score", "judge": "text", "assemble": "cpu",
    }  # fmt: skip
    assert [s.name for s in STAGES if s.optional] == ["safety", "judge"]
    judge = {"judge": {"model": {"model": "tiny:vlm"}}}
    for preset, overrides in (
        (FORWARD, {}),
        (HINDSIGHT, {}),
        (TINY, {}),
        (TINY, judge),
        (TINY, {"safety.enabled": False}),
    ):
        cfg = load_build_config(preset, overrides)
        # The strategy's order without the optional stages that are off (no judge section; safety enabled: false).
        off = {"judge"} - set(overrides) | ({"safety"} if "safety.enabled" in overrides else set())
        order = [n for n in STRATEGY_ORDER[cfg.strategy] if n not in off]
        assert [s.name for s in stage_graph(cfg)] == order == [s.name for s in active_stages(cfg)]
        assert [s.name for s in stage_order(cfg.strategy)] == list(STRATEGY_ORDER[cfg.strategy])
        assert [s.name for s in make_plan(cfg, limit=1).stages] == order
        # The build's specs take each stage's model and resources from the section the registry names.
        for spec in stage_graph(cfg):
            section = getattr(cfg, spec.name) if spec.name != "assemble" else None
            assert spec.resources == (section.resources if section else None)
            assert spec.kwargs.get("model") == (section.model if section else None)
        assert list(model_names(cfg)) == [n for n in order if n != "assemble"]
        dump = cfg.model_dump()
        assert [_num_gpus(dump, n) for n in order] == [
            getattr(cfg, n).resources.num_gpus if n != "assemble" else 0.0 for n in order
        ]
    assert model_names(load_build_config(FORWARD))["score"] == "ViT-L-14/openai"


def test_fault_injection_keys_come_from_the_registry(tmp_path: Path) -> None:
    cfg = load_build_config(
        TINY, {"fault_injection": {n: 0.5 for n in STAGE_NAMES}, "judge": {"model": {"model": "tiny:vlm"}}}
    )
    assert set(cfg.fault_injection) == set(STAGE_NAMES)
    from pipeline.graph import stage_graph

    assert {s.name: s.kwargs["fault_rate"] for s in stage_graph(cfg)} == {n: 0.5 for n in STAGE_NAMES}
    with pytest.raises(ConfigError) as err:
        load_build_config(TINY, {"fault_injection": {"reflekt": 0.5}})
    assert "fault_injection.reflekt" in str(err.value) and "'score', 'judge' or 'assemble'" in str(err.value)


def test_generation_hash_is_keyed_by_registry_stages() -> None:
    """The hash covers the model config of every model stage in the registry (a changed model id in any of them is a
    new generation config), the optional ones (the filters decide what is kept) only when they run; performance
    knobs (compile) stay out."""
    cfg = load_build_config(FORWARD, {"judge": {"model": {"model": "org/judge"}}})
    hashes = {cfg.generation_hash()}
    for info in model_stages():
        section = getattr(cfg, info.config_attr)
        other = section.model_copy(update={"model": section.model.model_copy(update={"model": "org/other"})})
        hashes.add(cfg.model_copy(update={info.config_attr: other}).generation_hash())
    assert len(hashes) == 1 + len(model_stages()) == 8
    # An optional stage that does not run: absent and `enabled: false` are the same build, and differ from one with it.
    no_judge = load_build_config(FORWARD)
    off = load_build_config(FORWARD, {"judge": {"enabled": False, "model": {"model": "org/judge"}}})
    assert no_judge.generation_hash() == off.generation_hash() != cfg.generation_hash()
    assert load_build_config(FORWARD, {"safety.enabled": False}).generation_hash() != no_judge.generation_hash()
    fast = cfg.draw_refined.model.model_copy(update={"compile": True})
    compiled = cfg.model_copy(update={"draw_refined": cfg.draw_refined.model_copy(update={"model": fast})})
    assert compiled.draw_refined.model.compile and compiled.generation_hash() == cfg.generation_hash()


def test_head_node_work_is_planned_and_too_few_writers_warn(tmp_path: Path) -> None:
    """The unit writers' CPU over the build, and a warning when they would fall behind the stages."""
    cfg = load_build_config(str(FORWARD))
    plan = make_plan(cfg)
    assert plan.writer_hours == pytest.approx(plan.trajectories * F.WRITER_CPU_PER_TRAJECTORY / 3600)
    text = format_plan(plan)
    assert f"head node: {cfg.shard_writers} unit-writer processes write each unit's shards" in text
    assert not [w for w in plan.warnings if w.startswith("shard_writers")]

    def edit(d: dict) -> None:  # stages that make ~1.1M trajectories an hour: 1 writer (~116K/hour) cannot follow
        for stage in ("think", "draw_initial", "reflect", "draw_refined", "score"):
            d[stage]["resources"]["items_per_second"] = 300.0
        d["shard_writers"] = 1

    fast = make_plan(load_build_config(str(_preset_copy(tmp_path, FORWARD, edit))))
    behind = [w for w in fast.warnings if w.startswith("shard_writers: 1 write ~116,129 trajectories/hour")]
    assert behind, fast.warnings


# ---------------------------------------------------------------------------------------------------------------
# The plan's arithmetic against numbers computed here by hand, and relations that any correct throughput model keeps


def _prompt_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"prompts-{n}.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    return path


def test_hand_computed_plan(tmp_path: Path) -> None:
    """Measured rates in the config, 600 prompts, keep rate 0.5: every number of the plan, worked out by hand.

    stage         replicas x GPUs  items/s   busy s = 600 / rate   wall s = busy / replicas   GPU-s = busy x GPUs
    think             2 x 4          0.5         1,200                   600                       4,800
    draw_initial      3 x 1          1.0           600                   200                         600
    reflect           2 x 4          0.25        2,400                 1,200                       9,600
    draw_refined      4 x 1          0.5         1,200                   300                       1,200
    score             1 x 1         10.0            60                    60                          60
    safety            1 x 0         10.0            60                    60                           0
    wall = 1,200 s (reflect); GPUs held 8 + 3 + 8 + 4 + 1 = 24; busy 16,260 GPU-s = 4.5167 GPU-h; reserved
    24 x 1,200 s = 8 GPU-h; records per mode round(600 x 0.5) = 300; 7 images per trajectory in the six modes at
    0.5 MB (1024^2 JPEG): Parquet 300 x 7 x 0.5 MB = 1.05 GB = upload; disk = Parquet + the same in WebDataset +
    I1 and I2 once in trajectories/ (300 x 2 x 0.5 MB) = 2.4 GB; unit writers 600 x 0.031 s = 18.6 CPU-s."""
    table = {
        "think": (2, 4, 0.5), "draw_initial": (3, 1, 1.0), "reflect": (2, 4, 0.25), "draw_refined": (4, 1, 0.5),
        "score": (1, 1, 10.0), "safety": (1, 0, 10.0),
    }  # fmt: skip

    def edit(d: dict) -> None:
        for name, (replicas, gpus, rate) in table.items():
            d[name]["resources"].update(replicas=replicas, num_gpus=gpus, items_per_second=rate)
        d["shards"]["webdataset"] = True

    cfg = load_build_config(str(_preset_copy(tmp_path, FORWARD, edit)))
    plan = make_plan(cfg, keep_rate=0.5, prompts_path=str(_prompt_file(tmp_path, 600)))
    stages = {s.name: s for s in plan.stages}
    assert plan.trajectories == 600 and plan.records_per_mode == 300
    assert {n: stages[n].busy_seconds for n in table} == pytest.approx(
        {"think": 1200, "draw_initial": 600, "reflect": 2400, "draw_refined": 1200, "score": 60, "safety": 60}
    )
    assert {n: stages[n].wall_seconds for n in table} == pytest.approx(
        {"think": 600, "draw_initial": 200, "reflect": 1200, "draw_refined": 300, "score": 60, "safety": 60}
    )
    assert plan.wall_seconds == pytest.approx(1200) and plan.bottleneck == "reflect"
    assert plan.total_gpus == 24
    assert plan.gpu_hours_busy == pytest.approx(16_260 / 3600)
    assert plan.gpu_hours_reserved == pytest.approx(8.0)
    assert plan.upload_bytes == pytest.approx(1.05e9) and plan.disk_bytes == pytest.approx(2.4e9)
    assert plan.writer_hours == pytest.approx(18.6 / 3600)
    text = format_plan(plan)
    assert "wall time (streaming; slowest stage: reflect): 20 min" in text
    assert "GPU-hours: 5 busy, 8 reserved" in text
    assert "disk for OUT: ~2.4 GB; Hub upload (Parquet): ~1.1 GB" in text
    assert "stage utilisation: think 50%, draw_initial 17%, reflect 100%, draw_refined 25%, safety 5%, score 5%" in text


def _variant(tmp_path: Path, name: str, **changes: object):  # noqa: ANN202 (a Plan)
    """The forward preset planned for 1,000 prompts with `changes` ({'stage.section.key': value}) applied."""

    def edit(d: dict) -> None:
        for dotted, value in changes.items():
            *path, key = dotted.split("__")
            node = d
            for part in path:
                node = node[part]
            node[key] = value

    (tmp_path / name).mkdir()
    path = _preset_copy(tmp_path / name, FORWARD, edit)
    return make_plan(load_build_config(str(path)), limit=1000)


def _stage(plan, name: str):  # noqa: ANN001, ANN202
    return next(s for s in plan.stages if s.name == name)


def test_doubling_every_pool_halves_the_wall_time_not_the_gpu_hours(tmp_path: Path) -> None:
    base = _variant(tmp_path, "base")
    doubled = {f"{s}__resources__replicas": 2 * _stage(base, s).resources.replicas for s in GPU_STAGES}
    twice = _variant(tmp_path, "twice", **doubled)
    assert twice.total_gpus == 2 * base.total_gpus
    assert twice.wall_seconds == pytest.approx(base.wall_seconds / 2)
    assert twice.gpu_hours_busy == pytest.approx(base.gpu_hours_busy)  # the same work on more GPUs
    assert twice.gpu_hours_reserved == pytest.approx(base.gpu_hours_reserved)  # 2x GPUs for half the time
    for s in GPU_STAGES:
        assert _stage(twice, s).wall_seconds == pytest.approx(_stage(base, s).wall_seconds / 2), s


def test_twice_the_prompts_twice_the_time_and_gpu_hours(tmp_path: Path) -> None:
    cfg = load_build_config(FORWARD)
    one, two = make_plan(cfg, limit=1000), make_plan(cfg, limit=2000)
    assert two.trajectories == 2 * one.trajectories == 2000
    assert two.wall_seconds == pytest.approx(2 * one.wall_seconds)
    assert two.gpu_hours_busy == pytest.approx(2 * one.gpu_hours_busy)
    assert two.disk_bytes == pytest.approx(2 * one.disk_bytes)
    assert make_plan(cfg, limit=1000, keep_rate=0.5).upload_bytes == pytest.approx(one.upload_bytes / 2)


def test_more_gpus_per_vlm_engine_make_it_that_much_faster(tmp_path: Path) -> None:
    """Decode and prefill both scale with the engine's GPUs (tensor parallel): 8 GPUs instead of 4 double the rate,
    so the stage's wall time halves and its GPU-hours stay."""
    base = _variant(tmp_path, "base")
    wide = _variant(tmp_path, "wide", think__model__tensor_parallel_size=8, think__resources__num_gpus=8)
    assert _stage(wide, "think").items_per_second == pytest.approx(2 * _stage(base, "think").items_per_second)
    assert _stage(wide, "think").wall_seconds == pytest.approx(_stage(base, "think").wall_seconds / 2)
    busy = [_stage(p, "think").busy_seconds * _stage(p, "think").resources.num_gpus for p in (base, wide)]
    assert busy[1] == pytest.approx(busy[0])


def test_more_tokens_cost_more_gpu_hours(tmp_path: Path) -> None:
    """Longer T1 (a larger section cap lets the structured output run longer): more decode per trajectory, a slower
    think stage, more GPU-hours; a smaller model decodes faster."""
    base = _variant(tmp_path, "base")
    longer = _variant(tmp_path, "longer", think__model__max_section_chars=2400, think__model__max_tokens=9760)
    assert _stage(longer, "think").items_per_second < _stage(base, "think").items_per_second
    assert longer.gpu_hours_busy > base.gpu_hours_busy
    small = _variant(tmp_path, "small", think__model__model="Qwen/Qwen2.5-VL-7B-Instruct")
    assert _stage(small, "think").items_per_second > 5 * _stage(base, "think").items_per_second


def test_image_time_is_linear_in_steps_and_pixels(tmp_path: Path) -> None:
    """Seconds per image grow by the same amount for each added denoising step (image-to-image runs
    floor(steps x strength) of them), and halving the pixels halves every part but the text encoders."""
    seconds = {
        steps: 1
        / _stage(_variant(tmp_path, f"s{steps}", draw_initial__model__steps=steps), "draw_initial").items_per_second
        for steps in (4, 8, 12)
    }
    assert seconds[12] - seconds[8] == pytest.approx(seconds[8] - seconds[4]) and seconds[8] > seconds[4]
    per_step = (seconds[8] - seconds[4]) / 4  # FLUX.1-schnell at 1024^2: the FLUX figure
    flux = next(v for k, v, _ in IMAGE_SECONDS_PER_STEP if k == "flux")
    assert per_step == pytest.approx(flux)
    refined = {
        strength: 1
        / _stage(
            _variant(tmp_path, f"r{strength}", draw_refined__model__strength=strength), "draw_refined"
        ).items_per_second
        for strength in (0.5, 0.75)
    }
    assert refined[0.75] - refined[0.5] == pytest.approx((21 - 14) * flux)  # floor(28 x .75) - floor(28 x .5) steps
    half = _variant(tmp_path, "half", draw_initial__model__width=512, draw_initial__model__height=1024)
    encoders = next(row[1] for row in F.IMAGE_PIPELINE_SECONDS if row[0] == "flux")
    full_s, half_s = seconds[4], 1 / _stage(half, "draw_initial").items_per_second
    assert half_s - encoders == pytest.approx((full_s - encoders) / 2)
