"""Tiny, deterministic text models of real architectures, for tests and the `tiny` preset.

They are built from configs with fixed seeds and saved with `save_pretrained`, so they go through exactly the same
loading paths as production checkpoints (`from_pretrained`, `vllm.LLM(model=path)`): tests exercise the real
engines, chat templates, image processors and structured outputs, only with random weights. No download happens.

- `build_tiny_vlm`: a Qwen2-VL (`Qwen2VLForConditionalGeneration`), usable for T1 (text only) and T2 (with
  images), so the tiny preset needs a single vLLM engine.
- `build_tiny_llm`: a Qwen2 causal LM (`Qwen2ForCausalLM`) for T1 on text only.

Both share a byte-level BPE tokenizer trained with `tokenizers` on a fixed corpus that holds the `<think>` tags and
the template headings, plus the Qwen special tokens the chat template and the vision tower need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from schemas.reflection import HEADINGS, THINK_CLOSE, THINK_OPEN

TINY_VLM_NAME = "tiny-qwen2-vl"
TINY_LLM_NAME = "tiny-qwen2"

#: Written last into a model directory: its presence means the build completed.
DONE_MARKER = ".irgl-complete"

#: Bump when the recipe changes so that stale tiny models are rebuilt instead of reused.
RECIPE_VERSION = 1

SEED = 1234
VOCAB_SIZE = 512

# Qwen special tokens, in Qwen's order. `<think>` / `</think>` are deliberately NOT special: vLLM drops special
# tokens when detokenizing, and the tags must survive in the output text.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A Qwen-style ChatML template written for these models: string or OpenAI-style list content, images and videos as
# `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to the image's tokens).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url', 'image_pil'] -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ['video', 'video_url'] -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Fixed training text for the tokenizer: the template pieces and a little descriptive English, so that merges
# exist for the words the tests and the tiny preset use. Changing it changes the tokenizer (bump RECIPE_VERSION).
_CORPUS_LINES: tuple[str, ...] = (
    THINK_OPEN,
    THINK_CLOSE,
    *HEADINGS,
    "The image shows a red circle, a blue square and a green triangle on a grey background.",
    "The previous image has the wrong number of objects; the colours are too dark and the lighting is flat.",
    "Increase the count, brighten the colours, centre the composition and sharpen the edges.",
    "Step 1: keep the layout. Step 2: fix the count. Step 3: adjust the lighting. Step 4: add detail.",
    "A photo of three yellow squares in a row, evenly spaced, soft studio lighting, high detail.",
    "two purple triangles and four orange circles, white and black shapes, sharp focus, plain background",
    "The request asks for exactly the objects named in the prompt, with their colours, sizes and positions.",
    "Describe the scene, the subject, the style, the camera angle and the mood before drawing it.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDraw a cat.<|im_end|>\n",
    "<|im_start|>assistant\n<think>\nA cat sitting on a mat.\n</think><|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|> Look at the image and reflect on it.",
    "0 1 2 3 4 5 6 7 8 9 10 . , ; : ! ? ' \" ( ) [ ] - _ / # ### * + = < > \n\n",
)


def _atomic_build(target: Path, build: Any) -> Path:
    """Run `build(tmpdir)` and move the result to `target`; skip when `target` holds a complete build.

    Writing to a sibling temp dir and renaming makes concurrent or interrupted builds safe: a reader either sees
    no directory or a complete one (the marker is written before the rename).
    """
    marker = target / DONE_MARKER
    if marker.exists() and marker.read_text().strip() == str(RECIPE_VERSION):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / DONE_MARKER).write_text(f"{RECIPE_VERSION}\n")
        if target.exists():
            # A stale or incomplete build: replace it.
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process completed the same build first; theirs is identical.
            if not (target / DONE_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer (deterministic for a fixed corpus) and return a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that merges are driven by these lines and not by ties between single occurrences.
    tok.train_from_iterator([line for _ in range(4) for line in _CORPUS_LINES], trainer=trainer)
    return tok


def _save_tokenizer(out: Path) -> Any:
    """Save the tokenizer in Hugging Face format (tokenizer.json + tokenizer_config.json) and return it."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out)
    return hf_tok


def _write_generation_config(out: Path, tok: Any) -> None:
    """Stop on `<|im_end|>` (end of turn) or `<|endoftext|>`, as Qwen instruct models do."""
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = {"eos_token_id": eos, "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>")}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _init_weights(model: Any) -> None:
    """Re-initialise every parameter from a fixed seed, in name order, independent of the library's init code.

    transformers' `_init_weights` differs between versions (and may skip tensors it considers initialised), so the
    weights are set here from one generator: same recipe, same bytes.
    """
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() == 1 and "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.02)


def _text_dims(tok: Any) -> dict[str, Any]:
    """Decoder dimensions shared by both tiny models. head_dim 32 is the smallest size vLLM's CPU attention takes."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
    }


def _build_vlm(out: Path) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _save_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = _text_dims(tok)
    config = Qwen2VLConfig(
        text_config={
            **text,
            # M-RoPE: the (temporal, height, width) sections must sum to head_dim / 2 = 16.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": text["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    _init_weights(model)
    model.save_pretrained(out)
    # One merged token per 28x28 pixels: a 64x64 image becomes 56x56, i.e. 4 tokens; nothing exceeds 16.
    pixels = {"min_pixels": 28 * 28, "max_pixels": 112 * 112, "patch_size": 14, "merge_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    _write_generation_config(out, tok)


def _build_llm(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _save_tokenizer(out)
    config = Qwen2Config(
        **_text_dims(tok), rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    _init_weights(model)
    model.save_pretrained(out)
    _write_generation_config(out, tok)


def build_tiny_vlm(root: Path) -> Path:
    """Build (once) the tiny Qwen2-VL under `root/tiny-qwen2-vl/` and return its path."""
    return _atomic_build(Path(root) / TINY_VLM_NAME, _build_vlm)


def build_tiny_llm(root: Path) -> Path:
    """Build (once) the tiny Qwen2 causal LM under `root/tiny-qwen2/` and return its path."""
    return _atomic_build(Path(root) / TINY_LLM_NAME, _build_llm)
