"""IRG inference on a Janus export: think (T1) -> draw (I1) -> reflect on I1 (T2) -> redraw (I2).

The official IRG inference (BAGEL's `InterleaveInferencer` and the TIIF multi-turn driver of
github.com/Osilly/Interleaving-Reasoning-Generation) runs two turns:

- turn 1: system prompt + prompt -> T1 (sampled at temperature 0.3) -> I1 with text classifier-free guidance;
- turn 2: I1 fed back for generation (VQ tokens) and understanding (vision encoder) -> T2 -> I2 with two guidance
  branches: the context without T2 and the context without I1, applied in series (text first, then image: BAGEL's
  `serial_text_img`): l = l_noT2 + s_text * (l_full - l_noT2); l = l_noI1 + s_image * (l - l_noI1).

No token layout is written here. Every sequence the model sees is the prefix of a training record: the conversation
of mode 3 (`initial_full_learning`: T1 then an image target) for turn 1 and of mode 6 (`improving_full_learning`:
T1, I1 as a generation + understanding condition, T2, an image target) for turn 2, encoded by the trainer's own
`trainer.records.encode_conversation` and cut before the part to be sampled. The unconditional branches are the
trainer's own condition dropout (`trainer.dropout.apply_dropout`): text dropout (every text token before the target
image -> pad, Janus' CFG input) for turn 1, image-condition dropout (I1's blocks removed) for "without I1". "Without
T2" removes T2 and its EOS, as the official driver's context without T2. The embeddings of a prefix are built as the
trainer builds them (`collate`, the adapter's preprocessing, the module's encoders), so training and inference
cannot drift apart.

Sampling is batched over prompts; guidance branches are extra rows of the same batch (left-padded, one KV cache).
Every prompt draws from its own torch.Generator, seeded per phase from the prompt's seed, so a prompt's outputs do
not depend on which prompts share its batch (up to floating-point differences of batched kernels).

Imports only schemas and trainer modules (no stages, no pipeline, no Ray).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.modes import SYSTEM_PROMPT
from trainer.batch import collate
from trainer.dropout import ConditionDropout, apply_dropout
from trainer.records import EncodedRecord, SequenceFormat, encode_conversation

#: The two record shapes inference follows (docs/IRGL_FORMAT.md): turn 1 is a mode-3 record, turn 2 a mode-6 one.
TURN1_MODE = "initial_full_learning"
TURN2_MODE = "improving_full_learning"
I1_REF, I2_REF = "i1.png", "i2.png"

# Segment origins (trainer.records.Segment.origin) of the parts inference samples: the assistant turn is turn 2.
T1_PART = "turn 2 part 0"  # mode 3 and mode 6
I1_TARGET_BOI = "turn 2 part 1 boi"  # mode 3: the image target's BOI
I1_PART = "turn 2 part 1"  # mode 6: I1, the condition
T2_PART = "turn 2 part 2"  # mode 6
I2_TARGET_BOI = "turn 2 part 3 boi"  # mode 6


@dataclass(frozen=True)
class SamplingConfig:
    """How the IRG loop samples. Defaults: the official IRG inference (think at temperature 0.3; text guidance 4.0
    in both turns, image guidance 2.0 in turn 2)."""

    turns: int = 2
    think_temperature: float = 0.3
    max_think_tokens: int = 1024
    image_temperature: float = 1.0
    cfg_turn1: float = 4.0  # I1: full context vs the trainer's text dropout (pad tokens)
    cfg_text: float = 4.0  # I2: full context vs the context without T2 (1: branch not computed)
    cfg_image: float = 2.0  # I2: vs the context without I1 (1: branch not computed)

    def __post_init__(self) -> None:
        if self.turns not in (1, 2):
            raise ValueError(f"turns must be 1 or 2, got {self.turns}")
        if self.max_think_tokens < 1:
            raise ValueError("max_think_tokens must be >= 1")
        if min(self.think_temperature, self.image_temperature) < 0:
            raise ValueError("temperatures must be >= 0 (0: greedy)")


@dataclass(frozen=True)
class PromptJob:
    """One prompt to run: its id (for resume), text and seed (every phase's seed derives from it)."""

    id: str
    prompt: str
    seed: int


@dataclass
class IRGResult:
    """The trajectory inference produced for one prompt. Images are PNG bytes; turn-2 fields empty with turns=1."""

    id: str
    prompt: str
    seed: int
    t1: str
    i1: bytes
    t2: str = ""
    i2: bytes = b""
    seeds: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of the prompt's batch
    tokens: dict[str, int] = field(default_factory=dict)  # tokens sampled per phase (text: up to EOS)


def phase_seed(seed: int, phase: str) -> int:
    """The seed of one phase ("t1", "i1", "t2", "i2") of a prompt: a stable hash of (seed, phase)."""
    digest = hashlib.sha256(f"{seed}:{phase}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------------
# The records inference continues (pure: no model)


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "need_loss": False}


def _text(text: str, loss: bool) -> dict[str, Any]:
    return {"type": "text", "content": text, "need_loss": loss}


def _image(ref: str, loss: bool, vae: bool, vit: bool) -> dict[str, Any]:
    return {"type": "image", "content": ref, "need_loss": loss, "need_vae": vae, "need_vit": vit}


def turn1_conversation(prompt: str, t1: str) -> list[dict[str, Any]]:
    """The mode-3 conversation: SYS, prompt, then T1 and the image to draw (I1 at inference)."""
    head = [_user(SYSTEM_PROMPT), _user(prompt)]
    return [*head, {"role": "assistant", "content": [_text(t1, True), _image(I2_REF, True, False, False)]}]


def turn2_conversation(prompt: str, t1: str, t2: str) -> list[dict[str, Any]]:
    """The mode-6 conversation: SYS, prompt, then T1, I1 (generation + understanding condition), T2 and the image
    to draw (I2)."""
    head = [_user(SYSTEM_PROMPT), _user(prompt)]
    parts = [_text(t1, False), _image(I1_REF, False, True, True), _text(t2, True), _image(I2_REF, True, False, False)]
    return [*head, {"role": "assistant", "content": parts}]


def _encode(turns: list[dict[str, Any]], fmt: SequenceFormat, mode: str, images: dict[str, bytes]) -> EncodedRecord:
    # The image target's bytes are never read (the prefix ends at its BOI): empty placeholder.
    return encode_conversation(turns, fmt, record_id="irg", mode=mode, resolve=lambda ref: images.get(ref, b""))


def _cut(rec: EncodedRecord, origin: str, *, include: bool) -> EncodedRecord:
    """The record's segments before the first segment of `origin` (with it when `include`)."""
    for k, seg in enumerate(rec.segments):
        if seg.origin == origin:
            return EncodedRecord(rec.id, rec.mode, rec.segments[: k + 1 if include else k], rec.images, rec.dropped)
    raise ValueError(f"record has no segment {origin!r}: the conversation shape changed")


def _without(rec: EncodedRecord, origins: set[str]) -> EncodedRecord:
    kept = [seg for seg in rec.segments if seg.origin not in origins]
    return EncodedRecord(rec.id, rec.mode, kept, rec.images, [*rec.dropped, *sorted(origins)])


def _drop(rec: EncodedRecord, fmt: SequenceFormat, dropout: ConditionDropout) -> EncodedRecord:
    """The trainer's condition dropout with probability 1 (every draw is < 1): the branch it trains."""
    return apply_dropout(rec, fmt, dropout, seed=0, stage="inference", step=0)


def t1_prefix(prompt: str, fmt: SequenceFormat) -> EncodedRecord:
    """Turn 1, thinking: up to the assistant prefix (T1 is sampled next)."""
    return _cut(_encode(turn1_conversation(prompt, ""), fmt, TURN1_MODE, {}), T1_PART, include=False)


def i1_prefixes(prompt: str, t1: str, fmt: SequenceFormat) -> list[EncodedRecord]:
    """Turn 1, image: [full context, text dropped (pads)], each up to the image's BOI."""
    rec = _encode(turn1_conversation(prompt, t1), fmt, TURN1_MODE, {})
    uncond = _drop(rec, fmt, ConditionDropout(text=1.0))
    return [_cut(r, I1_TARGET_BOI, include=True) for r in (rec, uncond)]


def t2_prefix(prompt: str, t1: str, i1: bytes, fmt: SequenceFormat) -> EncodedRecord:
    """Turn 2, reflection: T1 and I1 (both encoders) in context, up to where T2 starts."""
    rec = _encode(turn2_conversation(prompt, t1, ""), fmt, TURN2_MODE, {I1_REF: i1})
    return _cut(rec, T2_PART, include=False)


def i2_prefixes(
    prompt: str, t1: str, i1: bytes, t2: str, fmt: SequenceFormat, *, without_t2: bool, without_i1: bool
) -> list[EncodedRecord]:
    """Turn 2, image: [full context, (without T2), (without I1)], each up to the image's BOI."""
    rec = _encode(turn2_conversation(prompt, t1, t2), fmt, TURN2_MODE, {I1_REF: i1})
    out = [rec]
    if without_t2:
        out.append(_without(rec, {T2_PART, f"{T2_PART} eos"}))
    if without_i1:
        out.append(_drop(rec, fmt, ConditionDropout(gen_image=1.0, vit_image=1.0)))
    return [_cut(r, I2_TARGET_BOI, include=True) for r in out]


def guide(logits: Any, scales: Sequence[float]) -> Any:
    """Serial classifier-free guidance over branches: logits [K, B, V] with row 0 the full context and rows 1..K-1
    the contexts without one condition each, in the order of `scales`: l = l_k + s_k * (l - l_k) for k = 1..K-1."""
    out = logits[0]
    for k, scale in enumerate(scales, start=1):
        out = logits[k] + scale * (out - logits[k])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model side


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto': bfloat16 on CUDA (as the official inference runs), float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


class IRGGenerator:
    """A Janus export (or `tiny:janus`'s folder) loaded once, running the IRG loop on batches of prompts."""

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", adapter: Any = None) -> None:
        import torch

        from trainer.index import tokenizer_format
        from trainer.model import JanusAdapter

        self.path = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.adapter = adapter if adapter is not None else JanusAdapter(path, dtype=self.dtype)
        self.module = self.adapter.module.to(self.device).eval()
        self.janus = self.module.janus
        self.torch_dtype = getattr(torch, self.dtype)
        # The trainer's format (its pad id is the text-dropout token, i.e. Janus' unconditional input).
        self.fmt = tokenizer_format("janus", path)
        self.tokenizer = self.adapter.tokenizer
        self.num_image_tokens = self.fmt.num_gen_tokens

    # --- embeddings and the batched KV-cache loop ----------------------------------------------------------------

    def embed(self, records: list[EncodedRecord]) -> list[Any]:
        """Input embeddings [L_i, H] of each record, built as the trainer builds them: `collate` packs the records,
        the adapter preprocesses the images, understanding slots get the vision encoder + aligner, generation slots
        the VQ codes' generation embeddings."""
        import torch

        batch = collate(records)
        tensors = self.adapter.batch_tensors(batch)
        inner = self.janus.model
        ids = tensors["input_ids"][0].to(self.device)
        embeds = inner.get_input_embeddings()(ids)
        if batch.vit_positions.numel():
            pixels = tensors["vit_pixels"].to(self.device, self.torch_dtype)
            feats = self.module.encode_understanding(pixels).to(embeds.dtype)
            embeds = embeds.index_put(
                (batch.vit_positions.reshape(-1).to(self.device),), feats.reshape(-1, embeds.shape[-1])
            )
        if batch.gen_positions.numel():
            pixels = tensors["gen_pixels"].to(self.device)
            codes = self.module.image_to_generation_tokens(pixels)
            gen = self.module.generation_embeddings(codes).to(embeds.dtype)
            embeds = embeds.index_put(
                (batch.gen_positions.reshape(-1).to(self.device),), gen.reshape(-1, embeds.shape[-1])
            )
        return list(torch.split(embeds, [rec.length for rec in records]))

    def prefill(self, embeds: list[Any]) -> tuple[Any, dict[str, Any]]:
        """Left-pad the prefixes into one batch and run it; return the last hidden state per row and the state of
        the decode loop (KV cache, attention mask, next position). Positions restart at 0 in every row, as each
        record's positions do in training."""
        import torch
        from transformers import DynamicCache

        rows, width = len(embeds), max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[-1]
        x = embeds[0].new_zeros((rows, width, hidden))
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        for r, e in enumerate(embeds):
            x[r, width - e.shape[0] :] = e
            mask[r, width - e.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.janus.model.language_model(
            inputs_embeds=x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        state = {"cache": out.past_key_values, "mask": mask, "next": positions[:, -1] + 1}
        return out.last_hidden_state[:, -1], state

    def step(self, state: dict[str, Any], x: Any) -> Any:
        """One decode step: x [R, 1, H] -> last hidden [R, H]."""
        import torch

        mask = torch.cat([state["mask"], state["mask"].new_ones((x.shape[0], 1))], dim=1)
        out = self.janus.model.language_model(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=state["next"][:, None],
            past_key_values=state["cache"],
            use_cache=True,
        )
        state.update(cache=out.past_key_values, mask=mask, next=state["next"] + 1)
        return out.last_hidden_state[:, -1]

    def generators(self, seeds: Sequence[int]) -> list[Any]:
        import torch

        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    @staticmethod
    def draw(logits: Any, temperature: float, gens: Sequence[Any]) -> Any:
        """One token per row: argmax at temperature 0, else a sample from softmax(logits / T) drawn with the row's
        own generator (exponential race: argmax p / E, E ~ Exp(1), is a draw from p)."""
        import torch

        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in gens])
        return (probs / noise).argmax(-1)

    def text_logits(self, prefixes: list[EncodedRecord]) -> Any:
        """The next-token text logits after each prefix (float32 [R, vocab]): what the first sampled token of T1 or
        T2 is drawn from."""
        import torch

        with torch.inference_mode():
            hidden, _ = self.prefill(self.embed(prefixes))
            return self.janus.lm_head(hidden).float()

    def image_logits(self, branches: list[EncodedRecord], scales: Sequence[float]) -> Any:
        """The guided logits of the first image token for one prompt whose branches are `branches` (full first)."""
        import torch

        with torch.inference_mode():
            hidden, _ = self.prefill(self.embed(branches))
            logits = self.janus.model.generation_head(hidden).float()
            return guide(logits.view(len(branches), 1, -1), scales)[0]

    def sample_text(
        self, prefixes: list[EncodedRecord], seeds: Sequence[int], temperature: float, max_tokens: int
    ) -> list[list[int]]:
        """Sample one text per prefix until EOS (not included) or `max_tokens`."""
        import torch

        gens = self.generators(seeds)
        embed_tokens = self.janus.model.get_input_embeddings()
        eos = self.fmt.eos_id
        out: list[list[int]] = [[] for _ in prefixes]
        done = [False] * len(prefixes)
        with torch.inference_mode():
            hidden, state = self.prefill(self.embed(prefixes))
            for k in range(max_tokens):
                tokens = self.draw(self.janus.lm_head(hidden), temperature, gens)
                for r, tok in enumerate(tokens.tolist()):
                    if done[r]:
                        continue
                    if tok == eos:
                        done[r] = True
                    else:
                        out[r].append(tok)
                if all(done) or k == max_tokens - 1:
                    break
                hidden = self.step(state, embed_tokens(tokens[:, None]))
        return out

    def sample_image(
        self, branches: list[list[EncodedRecord]], scales: Sequence[float], seeds: Sequence[int], temperature: float
    ) -> Any:
        """Sample the image tokens of B prompts, each with K guidance branches (branches[b][k], full context first):
        the K * B prefixes are rows of one batch (branch-major); every step the branches' logits are combined by
        `guide`, one token is drawn per prompt and fed to all its rows. Returns LongTensor [B, num_image_tokens]."""
        import torch

        b, k = len(branches), len(branches[0])
        rows = [branches[j][i] for i in range(k) for j in range(b)]
        gens = self.generators(seeds)
        n = self.num_image_tokens
        tokens = torch.zeros((b, n), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden, state = self.prefill(self.embed(rows))
            for i in range(n):
                logits = self.janus.model.generation_head(hidden).float().view(k, b, -1)
                tok = self.draw(guide(logits, scales), temperature, gens)
                tokens[:, i] = tok
                if i == n - 1:
                    break
                x = self.janus.prepare_embeddings_for_image_generation(tok.repeat(k)[:, None]).to(self.torch_dtype)
                hidden = self.step(state, x)
        return tokens

    def decode_png(self, tokens: Any) -> list[bytes]:
        """VQ tokens [B, N] -> PNG bytes per image (the VQ decoder's output in [-1, 1] mapped to 0..255)."""
        import torch
        from PIL import Image

        with torch.inference_mode():
            pixels = self.janus.decode_image_tokens(tokens)  # [B, H, W, C]
        arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        out = []
        for arr in arrays:
            buf = io.BytesIO()
            Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- the IRG loop ---------------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[PromptJob], cfg: SamplingConfig) -> list[IRGResult]:
        """T1 -> I1 (text CFG) [-> T2 -> I2 (branches without T2 / without I1)] for a batch of prompts."""
        if not jobs:
            return []
        fmt = self.fmt
        seeds = {p: [phase_seed(j.seed, p) for j in jobs] for p in ("t1", "i1", "t2", "i2")}
        timings: dict[str, float] = {}
        counts: dict[str, list[int]] = {}

        def clock(name: str, start: float) -> None:
            self._sync()
            timings[name] = round(time.perf_counter() - start, 4)

        start = time.perf_counter()
        t1_ids = self.sample_text(
            [t1_prefix(j.prompt, fmt) for j in jobs], seeds["t1"], cfg.think_temperature, cfg.max_think_tokens
        )
        t1 = [self._text(ids) for ids in t1_ids]
        counts["t1"] = [len(ids) for ids in t1_ids]
        clock("t1", start)

        start = time.perf_counter()
        branches = [i1_prefixes(j.prompt, t, fmt) for j, t in zip(jobs, t1, strict=True)]
        i1 = self.decode_png(self.sample_image(branches, [cfg.cfg_turn1], seeds["i1"], cfg.image_temperature))
        clock("i1", start)
        results = [IRGResult(id=j.id, prompt=j.prompt, seed=j.seed, t1=t1[r], i1=i1[r]) for r, j in enumerate(jobs)]
        if cfg.turns == 2:
            start = time.perf_counter()
            prefixes = [t2_prefix(j.prompt, t1[r], i1[r], fmt) for r, j in enumerate(jobs)]
            t2_ids = self.sample_text(prefixes, seeds["t2"], cfg.think_temperature, cfg.max_think_tokens)
            t2 = [self._text(ids) for ids in t2_ids]
            counts["t2"] = [len(ids) for ids in t2_ids]
            clock("t2", start)

            start = time.perf_counter()
            without_t2, without_i1 = cfg.cfg_text != 1.0, cfg.cfg_image != 1.0
            scales = [s for s, on in ((cfg.cfg_text, without_t2), (cfg.cfg_image, without_i1)) if on]
            branches = [
                i2_prefixes(j.prompt, t1[r], i1[r], t2[r], fmt, without_t2=without_t2, without_i1=without_i1)
                for r, j in enumerate(jobs)
            ]
            i2 = self.decode_png(self.sample_image(branches, scales, seeds["i2"], cfg.image_temperature))
            clock("i2", start)
            for r, res in enumerate(results):
                res.t2, res.i2 = t2[r], i2[r]
        for r, res in enumerate(results):
            res.seeds = {p: seeds[p][r] for p in (("t1", "i1", "t2", "i2") if cfg.turns == 2 else ("t1", "i1"))}
            res.timings = dict(timings)
            res.tokens = {"t1": counts["t1"][r], "i1": self.num_image_tokens}
            if cfg.turns == 2:
                res.tokens.update(t2=counts["t2"][r], i2=self.num_image_tokens)
        return results

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
