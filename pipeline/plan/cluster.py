"""The cluster `irgl plan --cluster FILE` checks against: a Ray cluster-launcher YAML read into node types (CPUs,
GPUs, GPU model, how many at most), and the placement of every actor of the stage pools on those nodes (first-fit
decreasing, as Ray must place the fixed-size pools at once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.plan.errors import PlanError

#: GPU model of well-known cloud instance types (the cluster file names instance types, not GPUs). A node type can
#: also say it with a custom resource `accelerator_type:<GPU>`, as Ray names the GPUs it detects.
GPU_BY_INSTANCE_TYPE = {
    "p5.48xlarge": "H100",
    "p5e.48xlarge": "H200",
    "p5en.48xlarge": "H200",
    "p4de.24xlarge": "A100",
    "p4d.24xlarge": "A100",
    "a3-highgpu-8g": "H100",
    "a3-megagpu-8g": "H100",
    "a2-ultragpu-8g": "A100",
    "a2-highgpu-8g": "A100",
    "Standard_ND96isr_H100_v5": "H100",
    "Standard_ND96amsr_A100_v4": "A100",
}


@dataclass(frozen=True)
class NodeType:
    """One node type of a Ray cluster-launcher config: resources per node and how many nodes at most."""

    name: str
    cpus: float
    gpus: float
    max_count: int
    head: bool
    gpus_declared: bool
    accelerator: str | None = None  # GPU model (from an `accelerator_type:` resource or the instance type)


@dataclass(frozen=True)
class ClusterSpec:
    """The largest cluster a cluster-launcher YAML allows (head + workers up to their max_workers limits)."""

    path: str
    node_types: list[NodeType]
    max_workers: int

    def nodes(self) -> list[tuple[str, float, float]]:
        """Every node the cluster can have at most, as (type, cpus, gpus): the head, then workers (most GPUs first)
        up to each type's max_workers and the global max_workers."""
        out = [(t.name, t.cpus, t.gpus) for t in self.node_types if t.head]
        left = self.max_workers
        for t in sorted((t for t in self.node_types if not t.head), key=lambda t: (-t.gpus, -t.cpus, t.name)):
            n = min(t.max_count, left)
            out += [(t.name, t.cpus, t.gpus)] * n
            left -= n
        return out

    @property
    def max_gpus(self) -> float:
        return sum(g for _, _, g in self.nodes())

    @property
    def max_gpus_per_node(self) -> float:
        return max((t.gpus for t in self.node_types), default=0.0)

    @property
    def gpu_node_types(self) -> list[NodeType]:
        return [t for t in self.node_types if t.gpus > 0 and t.max_count > 0]


def node_accelerator(spec: dict) -> str | None:
    """The GPU model of a node type: its `accelerator_type:<GPU>` resource, else its instance type looked up in
    GPU_BY_INSTANCE_TYPE (AWS InstanceType, GCP machineType, Azure vmSize); None when unknown."""
    for key in spec.get("resources") or {}:
        if isinstance(key, str) and key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    node_config = spec.get("node_config") or {}
    azure = (node_config.get("azure_arm_parameters") or {}) if isinstance(node_config, dict) else {}
    for instance in (node_config.get("InstanceType"), node_config.get("machineType"), azure.get("vmSize")):
        if isinstance(instance, str) and instance in GPU_BY_INSTANCE_TYPE:
            return GPU_BY_INSTANCE_TYPE[instance]
    return None


def load_cluster(path: Path) -> ClusterSpec:
    """Read the node types of a Ray cluster-launcher YAML (`available_node_types`, `head_node_type`,
    `max_workers`). Raises PlanError naming the file and field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{path}: cluster file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise PlanError(f"{path}: field 'available_node_types': a mapping of node types is required")
    head = data.get("head_node_type")
    if head not in data["available_node_types"]:
        raise PlanError(f"{path}: field 'head_node_type': must name one of available_node_types")
    max_workers = data.get("max_workers", 2)  # Ray's default
    if not isinstance(max_workers, int) or max_workers < 0:
        raise PlanError(f"{path}: field 'max_workers': must be a non-negative integer")
    types = []
    for name, spec in data["available_node_types"].items():
        if not isinstance(spec, dict):
            raise PlanError(f"{path}: field 'available_node_types.{name}': must be a mapping")
        resources = spec.get("resources") or {}
        for key in ("CPU", "GPU"):
            value = resources.get(key, 0)
            if not isinstance(value, (int, float)) or value < 0:
                raise PlanError(f"{path}: field 'available_node_types.{name}.resources.{key}': must be a number >= 0")
        count = 1 if name == head else spec.get("max_workers", max_workers)
        if not isinstance(count, int) or count < 0:
            raise PlanError(f"{path}: field 'available_node_types.{name}.max_workers': must be an integer >= 0")
        types.append(
            NodeType(
                name=name,
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                max_count=count,
                head=name == head,
                gpus_declared="GPU" in resources,
                accelerator=node_accelerator(spec) if resources.get("GPU", 0) else None,
            )
        )
    return ClusterSpec(path=str(path), node_types=types, max_workers=max_workers)


def pack_actors(actors: list[tuple[str, float, float]], nodes: list[tuple[str, float, float]]) -> list[str]:
    """First-fit decreasing placement of actors (stage, cpus, gpus) on nodes (type, cpus, gpus), as Ray must place
    every actor of the fixed-size pools at once. Returns the stage name of every actor that does not fit."""
    free = [[c, g] for _, c, g in nodes]
    unplaced = []
    eps = 1e-9
    for stage, cpus, gpus in sorted(actors, key=lambda a: (-a[2], -a[1], a[0])):
        for slot in free:
            if slot[0] + eps >= cpus and slot[1] + eps >= gpus:
                slot[0] -= cpus
                slot[1] -= gpus
                break
        else:
            unplaced.append(stage)
    return unplaced
