"""Deterministic tiny models of the real image architectures, for tests and device smoke checks.

The tests must exercise the same loaders as production (diffusers' `DiffusionPipeline.from_pretrained`, open_clip's
`create_model_and_transforms`), but nothing may be downloaded. So the models are built here from small configs with
fixed seeds and saved in the libraries' own on-disk formats:

- `build_tiny_diffusion(root)` -> `root/tiny-sd/`: a Stable-Diffusion-style pipeline folder (model_index.json,
  unet/, vae/, text_encoder/, tokenizer/, scheduler/) whose tokenizer is a small byte-level BPE trained with the
  `tokenizers` library on a fixed corpus. Put the returned path in `ImageModelConfig.model`.
- `build_tiny_clip(root)` -> `root/tiny-clip/`: an open_clip model folder (open_clip_config.json +
  open_clip_model.safetensors) loaded with `model='local-dir:<path>'`; it uses open_clip's default tokenizer,
  whose BPE vocabulary ships inside the open_clip package (works offline).

Both builders are idempotent (`schemas.local.build_once`: a completion marker holding the recipe; built in a temporary
sibling folder and renamed into place, so a crash never leaves a half-written model behind) and deterministic (same
bytes twice). Heavy imports live inside the
functions so importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.config import ImageModelConfig
from schemas.local import build_once

DIFFUSION_NAME = "tiny-sd"
CLIP_NAME = "tiny-clip"
#: Bump when a builder below changes, so that cached folders of the old recipe are rebuilt (`build_once` compares
#: the recipe written into a folder's marker).
RECIPE_VERSION = 1
SEED = 1234
IMAGE_SIZE = 64  # pixels; the VAE downsamples by 8, so latents are 8x8
TOKENIZER_MAX_LENGTH = 77  # CLIP's context length; the SD pipeline pads every prompt to it

# A fixed English corpus for the tiny BPE: enough repeated words that merges exist, small enough to train in ms.
_BPE_CORPUS = [
    "a photo of a red cube on top of a blue sphere",
    "a painting of a small dog sitting next to a large cat",
    "two green apples and three yellow bananas on a wooden table",
    "a city street at night with bright neon signs and rain",
    "an astronaut riding a horse on the surface of the moon",
    "a bowl of soup with a spoon, studio lighting, high detail",
    "the initial image shows a cube; the refined image should move the sphere to the left",
    "a watercolor landscape with mountains, a lake and a small house",
    "a close-up portrait of an old man wearing a hat and glasses",
    "three birds flying over the ocean at sunset",
]


def _byte_unicode_alphabet() -> list[str]:
    """The 256 printable stand-ins of bytes used by byte-level BPE (GPT-2/CLIP), in byte order."""
    from tokenizers import pre_tokenizers

    chars = set(pre_tokenizers.ByteLevel.alphabet())
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    ordered = [chr(b) for b in visible]
    ordered += sorted(chars - set(ordered))
    return ordered


def _train_clip_bpe(num_merges: int = 256) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level BPE with CLIP's conventions on `_BPE_CORPUS`; return (vocab, merges).

    Words are split with the `tokenizers` library's normalizer and pre-tokenizer, configured like transformers'
    CLIPTokenizer. The merges are learned here rather than by `tokenizers.trainers.BpeTrainer` because that trainer
    orders merges of equal count differently from run to run, and the tiny model must be the same bytes every build;
    ties are broken by the pair itself. The vocabulary is laid out like CLIP's: bytes, bytes + '</w>', merges, then
    <|startoftext|> and <|endoftext|>, so every string tokenizes without unknown tokens.
    """
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in _BPE_CORPUS:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged

    alphabet = _byte_unicode_alphabet()
    tokens = [*alphabet, *(ch + "</w>" for ch in alphabet), *("".join(m) for m in merges)]
    vocab: dict[str, int] = {}
    for token in [*tokens, "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _build_diffusion(out: Path) -> None:
    """Assemble and save the tiny SD pipeline into `out` (weights seeded per component)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _train_clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=TOKENIZER_MAX_LENGTH)

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    ).eval()

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    ).eval()
    latent = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)

    torch.manual_seed(SEED + 2)
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()

    # SD's scheduler settings; Euler (not ancestral) is deterministic given the initial noise.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; transformers 4.x's (slow) CLIPTokenizer needs vocab.json + merges.txt.
    tok_dir = out / "tokenizer"
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_diffusion(root: Path) -> Path:
    """Build (once) the tiny SD pipeline under `root/tiny-sd/` and return its path (for `ImageModelConfig.model`).

    UNet2DConditionModel + AutoencoderKL (8x downsampling) + CLIPTextModel + CLIPTokenizer + EulerDiscreteScheduler,
    about 1 MB of weights; its default output is 64x64 RGB and it loads with `DiffusionPipeline.from_pretrained`
    and wraps with `AutoPipelineForImage2Image.from_pipe`.
    """
    return build_once(Path(root) / DIFFUSION_NAME, f"{DIFFUSION_NAME}-{RECIPE_VERSION}", _build_diffusion)


def tiny_diffusion_config(path: Path, steps: int = 4, dtype: str = "float32") -> ImageModelConfig:
    """An `ImageModelConfig` for the tiny pipeline at `path`: 64x64, `steps` steps, guidance 3, img2img on with
    strength 0.5 (half the steps refine)."""
    return ImageModelConfig(
        model=str(path), steps=steps, guidance_scale=3.0, height=IMAGE_SIZE, width=IMAGE_SIZE, dtype=dtype,
        img2img=True, strength=0.5,
    )  # fmt: skip


def tiny_clip_model_cfg() -> dict:
    """The open_clip `model_cfg` of the tiny CLIP: a 2-layer ViT on 32x32 images and a 2-layer text tower.

    The text tower keeps CLIP's vocabulary size (49408) and context length (77) so open_clip's default
    SimpleTokenizer, whose BPE file ships in the package, can be used unchanged.
    """
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def _build_clip(out: Path) -> None:
    """Instantiate the tiny open_clip model with a fixed seed and save it in open_clip's local-dir/HF format."""
    import open_clip
    import torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from safetensors.torch import save_file

    cfg = tiny_clip_model_cfg()
    torch.manual_seed(SEED + 3)
    model = open_clip.CLIP(**cfg).eval()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / HF_SAFE_WEIGHTS_NAME))
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }
    (out / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_clip(root: Path) -> Path:
    """Build (once) the tiny open_clip model under `root/tiny-clip/` and return its folder.

    Use it as `ScoreConfig(model=f"local-dir:{path}", pretrained="")` (see `tiny_clip_score_fields`): open_clip's
    `local-dir:` schema reads open_clip_config.json and the safetensors checkpoint from the folder.
    """
    return build_once(Path(root) / CLIP_NAME, f"{CLIP_NAME}-{RECIPE_VERSION}", _build_clip)


def tiny_clip_score_fields(path: Path) -> dict[str, str]:
    """The `ScoreConfig` fields (model, pretrained) that load the tiny CLIP at `path`."""
    return {"model": f"local-dir:{Path(path).resolve()}", "pretrained": ""}
