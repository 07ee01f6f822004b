"""`irgl plan --config CONFIG`: what a build will do and cost, before any GPU is rented.

Validates the config exactly as `irgl build` does, then prints the stage graph in the strategy's order with each
stage's model and resources, the expected trajectories and records per mode, GPU-hours, wall time, disk and upload
size, and warnings for requests a cluster cannot meet. Nothing here loads a model or reads a prompt from the
network: local prompt files and the built-in generator are read (they are the exact count), Hugging Face sources
are counted from an absolute split slice (`train[:200000]`) or from `--expected-count`.

The estimates are arithmetic on per-replica throughput figures: `resources.items_per_second` when the config sets
it (your measurement), otherwise the built-in H100 figures (figures.py) - some measured, most assumed, each printed with
its source so that nobody mistakes an assumption for a measurement (what they count: rates.py).
Settings that would speed a stage up (the image engine's `compile`, CPUs for a CPU-bound scorer) are printed as
options; config values that make rows fail (max_tokens, section caps, context length) and clusters that would not
start the planned GPUs are warnings. The stages, their order and config sections come from schemas/stages.py.

The package, one idea a module:
- figures.py   the built-in throughput, CPU, size and head-node figures, each with its source;
- rates.py     the throughput model: trajectories/s of one replica of each stage from those figures;
- counts.py    prompt counts offline (local sources read, Hub sources from slices or --expected-count);
- cluster.py   a Ray cluster-launcher YAML read into node types, and actor placement on them;
- estimate.py  the plan: counts x rates -> wall time, GPU-hours, records, disk, head-node work;
- advice.py    warnings and options;
- render.py    the plan as text;
- errors.py    PlanError.
Here: `plan_from_file`, what `irgl plan` calls.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.plan.errors import PlanError

__all__ = ["PlanError", "plan_from_file"]


def plan_from_file(
    config: Path,
    *,
    cluster: Path | None = None,
    expected_counts: list[str] | None = None,
    keep_rate: float = 1.0,
    prompts_path: str | None = None,
    limit: int | None = None,
):  # noqa: ANN201 (pipeline.plan.estimate.Plan, imported lazily: `import pipeline.plan` stays light)
    """Load and validate CONFIG like `irgl build` (ConfigError on a bad field), read the cluster file, and plan."""
    from pipeline.plan.cluster import load_cluster
    from pipeline.plan.counts import parse_expected_counts
    from pipeline.plan.estimate import make_plan
    from schemas.config import load_build_config

    cfg = load_build_config(str(config))
    spec = load_cluster(cluster) if cluster is not None else None
    counts = parse_expected_counts(expected_counts or [])
    return make_plan(
        cfg,
        config_path=str(config),
        cluster=spec,
        expected_counts=counts,
        keep_rate=keep_rate,
        prompts_path=prompts_path,
        limit=limit,
    )
