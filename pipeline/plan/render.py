"""`irgl plan`'s text: the plan rendered in a stable layout (tests and users grep it)."""

from __future__ import annotations

from pipeline.humanize import format_duration, format_size
from pipeline.plan.estimate import Plan
from pipeline.plan.figures import ASSUMED_GPU, VERIFY_CPU_PER_TRAJECTORY


def format_plan(plan: Plan) -> str:
    """The plan as plain text (stable layout: tests and users grep it)."""
    from schemas.modes import MODES

    lines = [f"plan for {plan.config or plan.name} (name: {plan.name}, strategy: {plan.strategy})", ""]
    lines.append("stage graph: " + " -> ".join(["prompts", *(s.name for s in plan.stages)]))
    lines.append("")
    w = max(len(s.model) for s in plan.stages)
    header = f"{'stage':13s} {'model':{w}s} {'replicas':>8s} {'gpus':>5s} {'cpus':>5s} {'batch':>5s} {'items/s':>8s} "
    lines.append(header + f"{'wall':>9s}  rate source")
    for s in plan.stages:
        r = s.resources
        if r is None:
            lines.append(f"{s.name:13s} {s.model:{w}s} {'1':>8s} {'0':>5s} {'0.1':>5s} {'unit':>5s} {'':>8s} {'':>9s}")
            continue
        rate = f"{s.items_per_second:.3g}" if s.items_per_second else "n/a"
        lines.append(
            f"{s.name:13s} {s.model:{w}s} {r.replicas:8d} {r.num_gpus:5g} {r.num_cpus:5g} {r.batch_size:5d} "
            f"{rate:>8s} {format_duration(s.wall_seconds):>9s}  {s.rate_source}"
        )
    lines.append("")
    lines.append("prompts:")
    for src in plan.sources:
        count = f"{src.count:,}" if src.count is not None else "unknown"
        lines.append(f"  {src.label:55s} {count:>10s}  ({src.how})")
    traj = f"{plan.trajectories:,}" if plan.trajectories is not None else "unknown"
    bound = "at most " if any("slice" in s.how or "expected" in s.how for s in plan.sources) else ""
    lines.append(f"expected trajectories: {bound}{traj} (one per prompt kept; Hub sources before dedup)")
    recs = f"{plan.records_per_mode:,}" if plan.records_per_mode is not None else "unknown"
    lines.append(f"records per mode: {bound}{recs} (keep rate {plan.keep_rate:g}; each kept trajectory -> 1 per mode)")
    for m in MODES:
        lines.append(f"  {m.index} {m.name:45s} {recs:>10s}")
    lines.append("")
    lines.append(f"GPUs held by the stage pools: {plan.total_gpus:g}")
    wall = format_duration(plan.wall_seconds)
    lines.append(f"wall time (streaming; slowest stage: {plan.bottleneck or 'n/a'}): {wall}")
    busy = f"{plan.gpu_hours_busy:,.0f}" if plan.gpu_hours_busy is not None else "n/a"
    reserved = f"{plan.gpu_hours_reserved:,.0f}" if plan.gpu_hours_reserved is not None else "n/a"
    lines.append(f"GPU-hours: {busy} busy, {reserved} reserved (GPUs held x wall time); engine start-up not included")
    if plan.wall_seconds:
        util = ", ".join(
            f"{s.name} {100 * (s.wall_seconds or 0) / plan.wall_seconds:.0f}%"
            for s in plan.stages
            if s.resources is not None
        )
        lines.append(f"stage utilisation: {util}")
    disk, upload = format_size(plan.disk_bytes), format_size(plan.upload_bytes)
    lines.append(f"disk for OUT: ~{disk}; Hub upload (Parquet): ~{upload}")
    if plan.writer_hours is not None and plan.trajectories:
        where = f"{plan.shard_writers} unit-writer processes" if plan.shard_writers else "the driver process"
        verify = plan.trajectories * VERIFY_CPU_PER_TRAJECTORY / 3600
        lines.append(
            f"head node: {where} write each unit's shards while the stages run (~{plan.writer_hours:.1f} CPU-hours "
            f"in all); after the last unit only the manifest, card and report (seconds); irgl verify: "
            f"~{verify:.1f} CPU-hours, spread over the head node's cores (--jobs)"
        )
    if plan.cluster is not None:
        c = plan.cluster
        kinds = ", ".join(
            f"{t.name}: {t.gpus:g} GPUs{f' ({t.accelerator})' if t.accelerator else ''} x {t.max_count}"
            for t in c.node_types
        )
        lines.append(f"cluster {c.path}: at most {c.max_gpus:g} GPUs ({kinds}; max_workers {c.max_workers})")
    else:
        lines.append("cluster: not given (pass --cluster ray_cluster.yaml to check that every actor can be placed)")
    lines.append(f"built-in figures are for {ASSUMED_GPU} GPUs; each stage's rate source says measured or assumed")
    lines.append("")
    for option in plan.options:
        lines.append(f"option: {option}")
    if plan.warnings:
        for w in plan.warnings:
            lines.append(f"warning: {w}")
    else:
        lines.append("no warnings")
    return "\n".join(lines)
