"""What `irgl plan` advises beyond the numbers: warnings (config values that make rows fail or waste GPUs, clusters
that cannot place or would not start the planned GPUs) and options (settings that would speed a stage up:
`compile: true` for an image stage, CPUs for a CPU-bound scorer)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipeline.humanize import format_duration
from pipeline.plan.cluster import ClusterSpec, pack_actors
from pipeline.plan.figures import (
    ASSUMED_GPU,
    CLIP_IMAGES_PER_SECOND,
    DEFAULT_CLIP_IMAGES_PER_SECOND,
    IMAGE_COMPILED_SECONDS_PER_STEP,
    MAX_PREPROCESS_THREADS,
    MIN_SECTION_CHARS,
    TRAINER_MAX_LONG_SIDE,
    TRAINER_MIN_SHORT_SIDE,
)
from pipeline.plan.rates import (
    clip_rate,
    image_rate,
    image_step,
    lookup_figure,
    preprocess_threads,
    regex_max_chars,
    score_cpu_seconds,
    stage_model,
    text_load,
)
from schemas.config import BuildConfig
from schemas.stages import active_stages, stage_config, stage_info

if TYPE_CHECKING:
    from pipeline.plan.estimate import StagePlan


def speed_options(cfg: BuildConfig, stages: list[StagePlan], n: int | None) -> list[str]:
    """Settings that would speed a stage up, with what they would change: the image engine's `compile`, and more
    preprocessing CPUs for a CPU-bound scorer. Only for stages planned from the built-in figures."""
    out = []
    for s in stages:
        r = s.resources
        if r is None or r.items_per_second is not None or r.num_gpus <= 0:
            continue
        kind = stage_info(s.name).kind
        if kind == "image":
            model = stage_config(cfg, s.name).model
            if model.compile:
                continue
            refine = s.name == "draw_refined" and cfg.strategy == "forward"
            eager_step, _ = image_step(model)
            fast = model.model_copy(update={"compile": True})
            compiled_step, _ = image_step(fast)
            measured = lookup_figure(model.model, IMAGE_COMPILED_SECONDS_PER_STEP, (0.0, ""))[0] > 0
            basis = "measured" if measured else "assumed: FLUX.1-dev's speed-up"
            rate, _ = image_rate(fast, r, refine, cfg.images.format)
            wall = ""
            if n:
                before, after = format_duration(s.wall_seconds), format_duration(n / rate / r.replicas)
                wall = f"; this stage's wall time {before} -> {after}"
            out.append(
                f"{s.name}: `compile: true` (torch.compile of the denoiser; minutes of compilation per actor at start) "
                f"runs a step in ~{compiled_step:.3f} s instead of {eager_step:.3f} s ({basis}): "
                f"{s.items_per_second:.3g} -> "
                f"{rate:.3g} images/s per replica{wall}"
            )
        elif kind == "score" and cfg.score.model.preprocess_threads is None:
            per_s, _ = lookup_figure(cfg.score.model.model, CLIP_IMAGES_PER_SECOND, DEFAULT_CLIP_IMAGES_PER_SECOND)
            threads = preprocess_threads(cfg, r)
            rate, source = clip_rate(cfg, r)
            if "CPU-bound" not in source or threads >= MAX_PREPROCESS_THREADS:
                continue
            # Threads whose preprocessing keeps up with the GPU: CPU seconds per trajectory x GPU trajectories/s.
            gpu_rate = per_s * min(r.num_gpus, 1.0) / 2
            need = min(MAX_PREPROCESS_THREADS, math.ceil(score_cpu_seconds(cfg) * gpu_rate))
            faster, _ = clip_rate(cfg, r, need)
            out.append(
                f"{s.name}: CPU-bound ({threads} preprocessing thread(s) from resources.num_cpus={r.num_cpus:g}); "
                f"num_cpus: {need} would raise it from {rate:,.0f} to {faster:,.0f} trajectories/s per replica"
            )
    return out


def config_warnings(cfg: BuildConfig, max_prompt_chars: int) -> list[str]:
    """Requests that fail or waste GPUs whatever the cluster: token budgets shorter than what the structured-output
    regex allows, section caps a real model runs into, contexts that cannot hold prompt + images + output, image
    sizes the official trainer rejects, compiling on CPU, models left on CPU."""
    out = []
    running = [s for s in active_stages(cfg) if s.has_model]
    for info in (s for s in running if s.kind == "text"):
        name = info.name
        stage = stage_config(cfg, name)
        m = stage.model  # (GPUs per actor vs tensor_parallel_size: the config itself refuses a mismatch)
        if m.structured:
            # A token holds at least one character of this regex's text for any tokenizer that can spell the
            # characters it allows, except multi-byte ones (up to 4 bytes each): 4 x is safe by construction.
            limit = regex_max_chars(m, name)
            if m.max_tokens < limit:
                out.append(
                    f"{name}: max_tokens={m.max_tokens} < {limit} characters the regex allows: the engine stops at "
                    f"max_tokens, so long outputs are cut off and fail (safe by construction: {4 * limit})"
                )
            floor = MIN_SECTION_CHARS.get(name, 0)  # the judge's answer has no sections
            if m.max_section_chars < floor and not m.model.startswith("tiny:"):
                part = "the plan" if name == "think" else "each reflection part"
                out.append(
                    f"{name}: max_section_chars={m.max_section_chars} caps {part} below the ~{floor} characters a "
                    f"real model writes there (assumed): rows whose text reaches the cap fail; raise it to >= {floor}"
                )
        load = text_load(cfg, name, max_prompt_chars)
        needed = math.ceil(load.max_prompt_tokens + load.image_tokens + m.max_tokens)
        if needed > m.max_model_len:
            images = f" + {load.images} image(s) x {load.tokens_per_image:,}" if load.images else ""
            out.append(
                f"{name}: max_model_len={m.max_model_len} < ~{needed:,} tokens = the longest prompt "
                f"~{load.max_prompt_tokens:,.0f}{images} + max_tokens {m.max_tokens:,}: outputs are cut at the context "
                "end and fail (a prompt longer than the context is refused); raise max_model_len or lower max_tokens"
            )
    for info in (s for s in running if s.kind == "image"):
        name = info.name
        stage = stage_config(cfg, name)
        m = stage.model
        long_side, short_side = max(m.height, m.width), min(m.height, m.width)
        if long_side > TRAINER_MAX_LONG_SIDE or short_side < TRAINER_MIN_SHORT_SIDE:
            out.append(
                f"{name}: {m.width}x{m.height} images are outside what the official IRG trainer accepts "
                f"(long side <= {TRAINER_MAX_LONG_SIDE}, short side >= {TRAINER_MIN_SHORT_SIDE})"
            )
        if m.compile and stage.resources.num_gpus == 0:
            out.append(
                f"{name}: compile: true on CPU (resources.num_gpus=0): torch.compile costs minutes at every actor "
                "start for no measured gain there; set compile: false"
            )
    for info in (s for s in running if s.kind != "safety"):  # the safety classifier is a CPU stage by design
        model = stage_model(cfg, info.name)
        if stage_config(cfg, info.name).resources.num_gpus == 0 and not model.startswith("tiny:"):
            out.append(f"{info.name}: {model} has resources.num_gpus=0 and will run on CPU")
    return out


def cluster_warnings(stages: list[StagePlan], cluster: ClusterSpec) -> list[str]:
    """Does the cluster start the GPUs the plan assumes, and can Ray place every actor of every pool at once (the
    pools run concurrently for the whole job)?"""
    out = []
    for t in cluster.node_types:
        if not t.head and not t.gpus_declared:
            out.append(f"cluster {cluster.path}: node type {t.name} declares no GPU resource; GPU checks count it as 0")
    gpu_types = cluster.gpu_node_types
    if len(gpu_types) > 1:
        # Ray's autoscaler picks the node type with the best utilisation score for the pending actors (it preferred
        # 96-CPU A100 nodes over 192-CPU H100 nodes for irgl's actors), never by GPU model.
        names = ", ".join(f"{t.name} ({t.accelerator or 'GPU model unknown'})" for t in gpu_types)
        out.append(
            f"cluster {cluster.path}: {len(gpu_types)} GPU node types ({names}): Ray's autoscaler chooses among them "
            "by its own utilisation score, not by GPU model, so the plan cannot know which GPUs start; keep one GPU "
            "node type per cluster file (ray_cluster.yaml: H100, ray_cluster_a100.yaml: A100)"
        )
    builtin = [s.name for s in stages if s.resources is not None and s.resources.num_gpus > 0
               and s.resources.items_per_second is None]  # fmt: skip
    for t in gpu_types:
        if builtin and t.accelerator != ASSUMED_GPU:
            gpu = t.accelerator or "an unknown GPU model"
            out.append(
                f"cluster {cluster.path}: node type {t.name} has {gpu}, but the built-in figures of "
                f"{', '.join(builtin)} are {ASSUMED_GPU} figures: time and GPU-hours are off (an A100 is about half as "
                "fast, assumed); set resources.items_per_second from a pilot build on these nodes"
            )
    per_node = cluster.max_gpus_per_node
    for s in stages:
        r = s.resources
        if r is None or r.num_gpus == 0:
            continue
        if r.num_gpus > per_node:
            out.append(
                f"{s.name}: an actor needs {r.num_gpus:g} GPUs on one node but the largest node type of "
                f"{cluster.path} has {per_node:g}: no actor of this stage can start"
            )
        elif s.gpus_held > cluster.max_gpus:
            out.append(
                f"{s.name}: {r.replicas} replicas x {r.num_gpus:g} GPUs = {s.gpus_held:g} GPUs > {cluster.max_gpus:g}"
                f" GPUs the cluster {cluster.path} can have"
            )
    total = sum(s.gpus_held for s in stages)
    if total > cluster.max_gpus:
        out.append(
            f"the stage pools hold {total:g} GPUs at once but {cluster.path} can have at most {cluster.max_gpus:g}: "
            "Ray Data cannot start every actor and the build stalls; lower replicas"
        )
    actors = [
        (s.name, s.resources.num_cpus, s.resources.num_gpus)
        for s in stages
        if s.resources is not None
        for _ in range(s.resources.replicas)
    ]
    unplaced = pack_actors(actors, cluster.nodes())
    if unplaced and total <= cluster.max_gpus:
        names = ", ".join(sorted(set(unplaced)))
        out.append(
            f"{len(unplaced)} actor(s) of {names} do not fit on the nodes of {cluster.path} (CPUs or GPUs per node)"
        )
    return out
