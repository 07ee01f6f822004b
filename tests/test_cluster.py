"""ray_cluster.yaml against Ray's own cluster-config validation (the checks `ray up` runs before contacting AWS)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.plan import load_cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"


def _validate(config: dict) -> dict:
    """What `ray up` does first: merge the provider defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_config_passes_rays_validator(raw: dict) -> None:
    prepared = _validate(raw)
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head_cpu"
    assert types["head_cpu"]["resources"] == {"CPU": 32, "GPU": 0}
    assert types["gpu_h100"]["resources"]["GPU"] == 8 and types["gpu_h100"]["node_config"]["InstanceType"] == (
        "p5.48xlarge"
    )
    assert types["gpu_a100"]["resources"]["GPU"] == 8
    assert types["gpu_h100"]["min_workers"] == 0 and types["gpu_h100"]["max_workers"] == 8
    assert prepared["max_workers"] == 8
    # Every node installs irgl with its CUDA extra; the head mounts the shared, durable OUT storage.
    setup = "\n".join(prepared["worker_setup_commands"])
    assert "pip install -e" in setup and "[gpu]" in setup
    head = "\n".join(prepared["head_setup_commands"])
    assert "/mnt/irgl" in head and "mount -t nfs4" in head and "[gpu]" in head


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
