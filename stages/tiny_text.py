"""Tiny, deterministic text models of real architectures, for tests and the `tiny` preset.

They are built from configs with fixed seeds and saved with `save_pretrained`, so they go through exactly the same
loading paths as production checkpoints (`from_pretrained`, `vllm.LLM(model=path)`): tests exercise the real
engines, chat templates, image processors and structured outputs, only with tiny weights (random, then briefly
trained on template-shaped text, see below). No download happens.

- `build_tiny_vlm`: a Qwen2-VL (`Qwen2VLForConditionalGeneration`), usable for T1 (text only) and T2 (with
  images), so the tiny preset needs a single vLLM engine.
- `build_tiny_llm`: a Qwen2 causal LM (`Qwen2ForCausalLM`) for T1 on text only.

Both share a byte-level BPE tokenizer trained with `tokenizers` on a fixed corpus that holds the `<think>` tags and
the template headings, plus the Qwen special tokens the chat template and the vision tower need.

After the random initialisation each language model is trained briefly (a few hundred AdamW steps on CPU, one
thread, fixed seed, a fixed synthetic corpus) on chat-templated T1 and T2 exchanges whose every section is one
short sentence (about 20 to 50 characters) followed by the next heading or `</think>`. Without it a random model
practically never closes a section by itself, so every section would run into the regex's cap and every row would
fail (see `schemas.reflection.capped_section`); trained, the tiny models close their sections well inside the
tiny preset's caps in most rows and still hit a small cap (16 characters), which is what the tests need. The
text stays meaningless: the preset exercises code paths, not quality.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from schemas.local import build_once
from schemas.reflection import HEADINGS, THINK_CLOSE, THINK_OPEN

TINY_VLM_NAME = "tiny-qwen2-vl"
TINY_LLM_NAME = "tiny-qwen2"

#: Bump when the recipe changes so that stale tiny models are rebuilt instead of reused. (The training corpus is
#: also hashed into the completion marker, so a change of the instructions it is made from rebuilds them too.)
RECIPE_VERSION = 2

SEED = 1234
VOCAB_SIZE = 1024

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
    # Repeat the corpus so that merges are driven by these lines and not by ties between single occurrences. The
    # language models' training texts (the stages' own instructions and template-shaped answers) come too: merges
    # for their words make prompts about three times shorter in tokens, so training and generation cost less.
    lines = [line for _ in range(4) for line in _CORPUS_LINES]
    lines += [part for e in _training_examples(True) for part in (e["prompt"], e["answer"])]
    tok.train_from_iterator(lines, trainer=trainer)
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


# ---------------------------------------------------------------------------------------------------------------
# Brief language-model training on template-shaped text (see the module docstring)

#: AdamW steps, rows per step, peak learning rate and corpus size of the brief training.
TRAIN_STEPS = 300
TRAIN_BATCH = 8
TRAIN_LR = 3e-3
TRAIN_EXAMPLES = 256
#: Steps per kind of example in each round: a reflection (four sections to keep apart) is harder than a plan.
TRAIN_KIND_WEIGHTS = {"t1": 1, "t1_hindsight": 1, "t2": 2, "t2_hindsight": 2}

_LIGHTS = ("soft light", "warm light", "bright light", "studio light", "dim light", "cold light", "daylight")
_PLACES = ("on the left", "on the right", "in the centre", "at the top", "at the bottom", "on a table", "on grass")
_QUALITIES = ("larger", "smaller", "sharper", "brighter", "darker", "rounder", "clearer")
_FAULTS = ("small", "large", "dark", "pale", "blurry", "flat")
_COUNTS = ("One", "Two", "Three", "Four")


def _plan(rng: random.Random) -> str:
    """One short T1-style sentence (about 20 to 50 characters)."""
    from stages.prompts import COLOURS, OBJECTS

    count, colour, thing = rng.choice(_COUNTS), rng.choice(COLOURS), rng.choice(OBJECTS)
    return f"{count} {colour} {thing} {rng.choice(_PLACES)}, {rng.choice(_LIGHTS)}."


def _reflection_parts(rng: random.Random) -> tuple[str, str, str, str]:
    """Opening, improvements, guidance and final prompt: one short sentence each."""
    from stages.prompts import COLOURS, OBJECTS

    thing, wrong, right = rng.choice(OBJECTS), *rng.sample(COLOURS, 2)
    opening = rng.choice(
        (f"The {thing} is {wrong}, not {right}.", f"The {thing} is too {rng.choice(_FAULTS)}.",
         f"The {thing} sits {rng.choice(_PLACES)}, not {rng.choice(_PLACES)}.")
    )  # fmt: skip
    improvements = f"Make the {thing} {right} and {rng.choice(_QUALITIES)}."
    guidance = f"Move the {thing} {rng.choice(_PLACES)}; use {rng.choice(_LIGHTS)}."
    final = f"A {right} {thing} {rng.choice(_PLACES)}, {rng.choice(_LIGHTS)}."
    return opening, improvements, guidance, final


#: Code point ranges of the foreign words mixed into some training prompts: accented Latin, Greek, Cyrillic, Hebrew,
#: Arabic, CJK, emoji, symbols.
_FOREIGN = ((0xC0, 0xFF), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A), (0x4E00, 0x4FFF),
            (0x1F300, 0x1F5FF), (0x2190, 0x21FF))  # fmt: skip


def _roughen(prompt: str, rng: random.Random) -> str:
    """`prompt` with one to three words of random foreign characters put in at random places.

    Real prompt files hold scripts, emoji and symbols the tiny tokenizer has no merges for; trained only on plain
    English prompts, the model loses its template on such a prompt and writes until the cap.
    """
    words = prompt.split(" ")
    for _ in range(rng.randint(1, 3)):
        lo, hi = rng.choice(_FOREIGN)
        word = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 8)))
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def _training_examples(with_images: bool) -> list[dict[str, Any]]:
    """The fixed corpus: (instruction, number of images, image colours, answer) for T1 and T2, both strategies.

    The instructions are the stages' own, so the model sees at build time what the preset sends it; the images
    (for the VLM) are plain coloured squares. Deterministic: a function of SEED and the instruction code only.
    """
    from stages.prompts import generate_prompts
    from stages.reflect import reflect_instruction, reflect_instruction_hindsight
    from stages.think import think_instruction, think_instruction_hindsight

    rng, rough = random.Random(SEED), random.Random(SEED + 2)
    # The text-only LLM only ever writes T1 from the prompt (T2 and hindsight T1 look at images).
    kinds = ("t1", "t1_hindsight", "t2", "t2_hindsight") if with_images else ("t1",)
    examples = []
    for i, prompt in enumerate(generate_prompts(TRAIN_EXAMPLES, SEED)):
        kind, budget = kinds[i % len(kinds)], rng.choice((60, 96, 120, 600))
        if rough.random() < 0.25:
            prompt = _roughen(prompt, rough)
        plan = f"{THINK_OPEN}\n{_plan(rng)}\n{THINK_CLOSE}"
        opening, improvements, guidance, final = _reflection_parts(rng)
        reflection = "\n".join(
            (THINK_OPEN, opening, HEADINGS[0], improvements, HEADINGS[1], guidance, HEADINGS[2], final, THINK_CLOSE)
        )
        if kind == "t1":
            text, images, answer = think_instruction(prompt, budget), 0, plan
        elif kind == "t1_hindsight":
            text, images, answer = think_instruction_hindsight(prompt, budget), 1, plan
        elif kind == "t2":
            plan_used = f"{THINK_OPEN}\n{_plan(rng)}\n{THINK_CLOSE}"
            text, images, answer = reflect_instruction(prompt, plan_used, budget), 1, reflection
        else:
            text, images, answer = reflect_instruction_hindsight(prompt, budget), 2, reflection
        colours = [[rng.randrange(256) for _ in range(3)] for _ in range(images)]
        examples.append({"kind": kind, "prompt": text, "colours": colours, "answer": answer})
    return examples


def _recipe_id() -> str:
    """RECIPE_VERSION plus a digest of the training settings and both corpora: the recipe that
    `schemas.local.build_once` writes into the folder's marker and compares on reuse, so a cached model made by
    another recipe is rebuilt."""
    recipe = [TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR, TRAIN_EXAMPLES, TRAIN_KIND_WEIGHTS, VOCAB_SIZE, SEED]
    corpus = json.dumps([recipe, _training_examples(True), _training_examples(False)], sort_keys=True)
    return f"{RECIPE_VERSION}-{hashlib.sha256(corpus.encode('utf-8')).hexdigest()[:16]}"


def _encode_example(example: dict[str, Any], tok: Any, processor: Any) -> dict[str, Any]:
    """Token ids (answer tokens labelled, prompt tokens masked) and, for the VLM, the processed images."""
    from PIL import Image

    content: Any = example["prompt"]
    images = [Image.new("RGB", (64, 64), tuple(c)) for c in example["colours"]]
    if images:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": example["prompt"]}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    full = prompt + example["answer"] + "<|im_end|>"
    if processor is not None and images:
        enc_prompt = processor(text=[prompt], images=images, return_tensors="pt")
        enc = processor(text=[full], images=images, return_tensors="pt")
        pixel_values, grid, mm_types = enc["pixel_values"], enc["image_grid_thw"], enc["mm_token_type_ids"][0]
    else:
        enc_prompt = tok([prompt], return_tensors="pt")
        enc = tok([full], return_tensors="pt")
        pixel_values = grid = None
        mm_types = enc["input_ids"][0] * 0  # text only: no token is an image token (M-RoPE needs the column)
    ids, n_prompt = enc["input_ids"][0], enc_prompt["input_ids"].shape[1]
    # The answer must start on a token boundary, or the labels would teach a tokenization vLLM never produces.
    if not ids[:n_prompt].equal(enc_prompt["input_ids"][0]):
        raise RuntimeError("tiny model training: the chat prompt does not tokenize as a prefix of the example")
    labels = ids.clone()
    labels[:n_prompt] = -100
    return {
        "kind": example["kind"], "input_ids": ids, "labels": labels, "mm_token_type_ids": mm_types,
        "pixel_values": pixel_values, "image_grid_thw": grid,
    }  # fmt: skip


def _collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    mm_types = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
        mm_types[row, :n] = e["mm_token_type_ids"]
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    with_images = [e for e in examples if e["pixel_values"] is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
        batch["mm_token_type_ids"] = mm_types
    return batch


def _answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy of the answer tokens. Logits are computed only for the positions whose next token is an
    answer token in some row: the prompt is most of every sequence, and projecting each prompt position onto the
    vocabulary was most of a step's time."""
    import torch

    labels = batch.pop("labels")
    labelled = (labels != -100).any(dim=0).nonzero().flatten()
    keep = torch.arange(int(labelled[0]) - 1, int(labelled[-1]))
    logits = model(**batch, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=-100)


def _train_lm(model: Any, tok: Any, processor: Any) -> None:
    """Train `model` in place for TRAIN_STEPS AdamW steps on the fixed corpus (VLM when `processor` is given).

    One thread and a fixed batch order: the same recipe gives the same weights on a machine whatever its core
    count (thread count changes the order of float sums).
    """
    import torch

    examples = [_encode_example(e, tok, processor) for e in _training_examples(processor is not None)]
    # One kind of example per step (T1 and T2 prompts differ a lot in length): little padding to compute on.
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in examples:
        by_kind.setdefault(e["kind"], []).append(e)
    kinds = [kind for kind in sorted(by_kind) for _ in range(TRAIN_KIND_WEIGHTS[kind])]
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    order = random.Random(SEED + 1)
    threads = torch.get_num_threads()
    # torch._C's own setter: an in-process vLLM CPU engine (tests) replaces `torch.set_num_threads` with a no-op,
    # and training on two threads instead of one gives other weights.
    torch._C.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / TRAIN_STEPS)
        model.train()
        for step in range(TRAIN_STEPS):
            batch = _collate(order.sample(by_kind[kinds[step % len(kinds)]], TRAIN_BATCH), pad_id)
            loss = _answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    finally:
        torch._C.set_num_threads(threads)
        model.eval()


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
    # One merged token per 28x28 pixels: a 64x64 image becomes 56x56, i.e. 4 tokens; nothing exceeds 16.
    pixels = {"min_pixels": 28 * 28, "max_pixels": 112 * 112, "patch_size": 14, "merge_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    _train_lm(model, tok, processor)
    model.save_pretrained(out)
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
    _train_lm(model, tok, None)
    model.save_pretrained(out)
    _write_generation_config(out, tok)


def build_tiny_vlm(root: Path) -> Path:
    """Build (once) the tiny Qwen2-VL under `root/tiny-qwen2-vl/` and return its path."""
    return build_once(Path(root) / TINY_VLM_NAME, _recipe_id(), _build_vlm)


def build_tiny_llm(root: Path) -> Path:
    """Build (once) the tiny Qwen2 causal LM under `root/tiny-qwen2/` and return its path."""
    return build_once(Path(root) / TINY_LLM_NAME, _recipe_id(), _build_llm)
