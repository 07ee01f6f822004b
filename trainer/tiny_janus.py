"""`tiny:janus`: a Janus-Pro architecture with tiny deterministic weights, built offline for tests and the tiny preset.

The Hub is unreachable on our machines, so the tiny preset cannot download Janus-Pro. Instead this builds a
`JanusForConditionalGeneration` from a small `JanusConfig` (SigLIP-style vision encoder, VQ-VAE, Llama LM) with
fixed seeds, a byte-level BPE tokenizer trained with `tokenizers` on a fixed corpus that holds the Janus special
tokens, and a `JanusImageProcessor`; it saves them with `save_pretrained`, so the trainer loads the tiny model
through exactly the `from_pretrained` path a production model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.local import TINY_PREFIX, TINY_TRAINER_KINDS, build_once, tiny_root
from schemas.modes import SYSTEM_PROMPT, understanding_query_improving, understanding_query_initial
from schemas.reflection import HEADINGS

TINY_JANUS = TINY_PREFIX + "janus"
assert TINY_TRAINER_KINDS == ("janus",), "schemas.local.TINY_TRAINER_KINDS names the tiny models built here"
_DIR_NAME = "tiny-janus"
#: Bump when anything below changes, so an old build under $IRGL_TINY_DIR is rebuilt rather than reused.
BUILD_VERSION = 1

# The special tokens of Janus-Pro's tokenizer that the trainer relies on (names as in the Hub tokenizer).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE_TOKEN, BOI, EOI]

#: The sizes of the tiny model (reported in the README): every dimension as small as the architecture allows.
TINY_SIZES = {
    "vocab_size": 512,
    "image_size": 32,  # pixels; both encoders see 32x32 images
    "vit_patch": 8,  # -> 4x4 = 16 understanding tokens per image
    "vit_hidden": 32,
    "vit_layers": 1,
    "lm_hidden": 64,
    "lm_layers": 2,
    "lm_heads": 4,
    "lm_kv_heads": 2,
    "lm_intermediate": 128,
    "vq_codebook": 64,  # image CE is over 64 classes
    "vq_embed_dim": 8,
    "vq_base_channels": 32,  # GroupNorm(32) needs multiples of 32
    "vq_levels": 4,  # 3 downsamplings: 32 px -> 4x4 = 16 generation tokens per image
}


def _corpus() -> list[str]:
    """A fixed corpus: the project's fixed prompts, the reflection headings and plain English about images."""
    words = (
        "red green blue yellow purple orange white black grey circle circles square squares triangle triangles "
        "one two three four five six row rows side by side evenly spaced centred off-centre background plain "
        "photo image first second improved initial soft studio lighting colour colours texture position style "
        "shows instead of and they sit keep the add so there are exactly centre space a an in on of with to is "
        "request asks for objects counts attributes positions lighting textures"
    )
    lines = [
        SYSTEM_PROMPT,
        understanding_query_initial("a photo"),
        understanding_query_improving("a photo"),
        *HEADINGS,
        "<think>\n",
        "\n</think>",
        "<|User|>: ",
        "<|Assistant|>: ",
        words,
        " ".join(str(i) for i in range(100)),
        "# 0123456789 .,;:!?'\"()[]{}<>/\\|-_=+*&^%$@~`",
    ]
    return lines * 4


def build_tokenizer() -> object:
    """Train the byte-level BPE tokenizer (deterministic for the fixed corpus); return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SIZES["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI},
    )


def tiny_janus_config(tokenizer: object) -> object:
    """The JanusConfig of the tiny model: Janus-Pro's architecture, tiny sizes (see TINY_SIZES)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    s = TINY_SIZES
    vocab = len(tokenizer)  # type: ignore[arg-type]
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["lm_hidden"],
        intermediate_size=s["lm_intermediate"],
        num_hidden_layers=s["lm_layers"],
        num_attention_heads=s["lm_heads"],
        num_key_value_heads=s["lm_kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    vision = JanusVisionConfig(
        hidden_size=s["vit_hidden"],
        num_hidden_layers=s["vit_layers"],
        num_attention_heads=2,
        image_size=s["image_size"],
        patch_size=s["vit_patch"],
        mlp_ratio=2.0,
        projection_dim=s["lm_hidden"],
        depth=2,
        num_image_tokens=(s["image_size"] // s["vit_patch"]) ** 2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=s["vq_embed_dim"],
        num_embeddings=s["vq_codebook"],
        latent_channels=s["vq_base_channels"],
        base_channels=s["vq_base_channels"],
        channel_multiplier=[1] * s["vq_levels"],
        num_res_blocks=1,
        projection_dim=s["lm_hidden"],
        image_token_embed_dim=s["lm_hidden"],
        num_hidden_layers=2,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )


def _spread_codebook(model: object) -> None:
    """Re-seed the VQ codebook from latents of fixed random block images, so images map to many codes.

    A random codebook far from the random encoder's latents collapses every image to one code, which would make
    image CE trivial; codebook entries drawn from real encoder latents spread the codes like a trained VQ-VAE.
    """
    import torch

    vq = model.model.vqmodel  # type: ignore[attr-defined]
    with torch.no_grad():
        # Identity attention in the encoder (zero output projections): codes depend on local content, as a trained
        # VQ-VAE's do, instead of on random global mixing that gives every image unrelated codes.
        for module in vq.encoder.modules():
            if hasattr(module, "proj_out") and hasattr(module, "q"):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    size = TINY_SIZES["image_size"]
    gen = torch.Generator().manual_seed(1)
    blocks = torch.rand((32, 3, 4, 4), generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")
    with torch.no_grad():
        latents = vq.quant_conv(vq.encoder(images)).permute(0, 2, 3, 1).reshape(-1, TINY_SIZES["vq_embed_dim"])
        # Farthest-point sampling: entries far apart, so that similar latents (flat backgrounds) share a code.
        pick = [int(torch.randint(latents.shape[0], (1,), generator=gen))]
        dist = torch.cdist(latents, latents[pick[-1]].unsqueeze(0)).squeeze(1)
        while len(pick) < TINY_SIZES["vq_codebook"]:
            pick.append(int(dist.argmax()))
            dist = torch.minimum(dist, torch.cdist(latents, latents[pick[-1]].unsqueeze(0)).squeeze(1))
        vq.quantize.embedding.weight.copy_(latents[pick])


def _recipe() -> str:
    """What `schemas.local.build_once` writes into the folder's marker and compares on reuse: the build version and
    the sizes (a folder built by another recipe is rebuilt)."""
    return json.dumps({"build_version": BUILD_VERSION, "sizes": TINY_SIZES}, sort_keys=True)


def _build(tmp: Path) -> None:
    import torch
    from transformers import JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    tokenizer = build_tokenizer()
    config = tiny_janus_config(tokenizer)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config)
    _spread_codebook(model)
    with torch.no_grad():
        # Generation embeddings as distinct as the codes they stand for (unit-variance, nn.Embedding's default):
        # the 0.02-std init leaves the tiny model unable to tell image tokens apart for many steps.
        emb = model.model.generation_embeddings.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(2)))
    model.save_pretrained(tmp)
    size = TINY_SIZES["image_size"]
    image_processor = JanusImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.vision_config.num_image_tokens,
    )
    processor.save_pretrained(tmp)


def build_tiny_janus(root: Path | str | None = None) -> Path:
    """Build `tiny:janus` under `root/tiny-janus` once (root: `schemas.local.tiny_root()`); return the folder.
    `schemas.local.build_once` makes it atomically and reuses a complete build of the same recipe."""
    return build_once(tiny_root(root) / _DIR_NAME, _recipe(), _build)


def resolve_model(name: str) -> str:
    """A `tiny:` name -> its local folder (built on first use); a Hub id or path is returned unchanged. Configs
    never get here with an unknown tiny name (trainer/config.py refuses it); a direct call with one raises
    ValueError."""
    if not name.startswith(TINY_PREFIX):
        return name
    if name != TINY_JANUS:
        raise ValueError(f"unknown tiny model {name!r} for the trainer; known: {TINY_JANUS}")
    return str(build_tiny_janus())
