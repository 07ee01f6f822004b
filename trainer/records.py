"""A conversation as the model sees it: segments of token ids with loss flags, taken from the parts' flags.

The flags of each part decide everything (docs/IRGL_FORMAT.md), never the mode name:

- a user turn is text without loss;
- a text part with `need_loss` is a text cross-entropy target, one without is context; every text part is
  followed by EOS, which is a target exactly when the text is (the official IRG trainer labels its end-of-text
  token after every supervised text, and never the image-start token);
- an image with `need_vit` is an understanding condition (vision encoder slots), one with `need_vae` a generation
  condition (VQ-token embeddings), one with `need_loss` an image target (VQ tokens predicted by the generation
  head); an image may be both a vit and a vae condition, which gives both blocks, vit first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Segment kinds. A "vit" slot is filled by the understanding encoder, a "gen" slot by a VQ-token embedding.
TEXT, VIT, GEN = "text", "vit", "gen"


@dataclass(frozen=True)
class SequenceFormat:
    """What the data side needs from a model: its chat template pieces, special ids and image token counts.

    The adapter (or `trainer.index.tokenizer_format`, from the tokenizer alone) builds it; nothing here knows which
    model it is. `pad_id` replaces dropped text conditions (classifier-free guidance); None: text dropout refused.
    """

    tokenize: Callable[[str], list[int]]
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    vit_id: int  # placeholder id written at understanding slots (replaced by encoder features)
    gen_id: int  # placeholder id written at generation slots (replaced by VQ-token embeddings)
    num_vit_tokens: int
    num_gen_tokens: int
    user_prefix: str = "<|User|>: "
    user_suffix: str = "\n\n"
    assistant_prefix: str = "<|Assistant|>: "
    pad_id: int | None = None


@dataclass(frozen=True)
class Segment:
    """A run of positions of one kind with one loss flag, and where in the conversation it comes from.

    `origin` is "bos", "turn T" (a user turn, an assistant turn's template tokens or the EOS closing a turn that
    ends with an image), "turn T part P" (a part's content), "turn T part P eos" (the EOS after a text part) or
    "turn T part P boi|eoi" (the brackets of an image block).
    """

    kind: str  # TEXT, VIT or GEN
    ids: tuple[int, ...]  # token ids (placeholders for image slots)
    loss: bool  # TEXT: cross-entropy on these tokens; GEN: image targets; VIT: always False
    origin: str
    image: int | None = None  # index into EncodedRecord.images for VIT/GEN


@dataclass
class EncodedRecord:
    """One record as the model sees it: segments, flat arrays and the images it needs."""

    id: str
    mode: str
    segments: list[Segment]
    images: list[bytes | str]  # bytes once resolved; the raw content (base64 or a member name) before
    dropped: list[str] = field(default_factory=list)  # conditions dropped for CFG: "text", "vit ORIGIN", ...

    @property
    def length(self) -> int:
        return sum(len(s.ids) for s in self.segments)


def encode_conversation(
    turns: list[dict[str, Any]],
    fmt: SequenceFormat,
    *,
    record_id: str = "?",
    mode: str = "?",
    resolve: Callable[[str], bytes] | None = None,
) -> EncodedRecord:
    """Turn a parsed conversation into segments with loss flags taken from the parts' flags (see module doc).

    The template is Janus-Pro's: BOS, "<|User|>: text\\n\\n" per user turn, "<|Assistant|>: " then the parts per
    assistant turn. Every text part is followed by EOS, a text target exactly when the text is one (the model
    learns where each text ends, as the official IRG trainer labels its end-of-text token after every supervised
    text); an assistant turn that ends with an image is closed by an EOS without loss. BOI and EOI (the image
    brackets) and template tokens are never targets: a sampler switches to image generation by appending BOI.
    """
    segs: list[Segment] = [Segment(TEXT, (fmt.bos_id,), False, "bos")]
    images: list[bytes | str] = []
    for t, turn in enumerate(turns):
        if turn["role"] == "user":
            text = f"{fmt.user_prefix}{turn['content']}{fmt.user_suffix}"
            segs.append(Segment(TEXT, tuple(fmt.tokenize(text)), False, f"turn {t}"))
            continue
        segs.append(Segment(TEXT, tuple(fmt.tokenize(fmt.assistant_prefix)), False, f"turn {t}"))
        ends_with_text = False
        for p, part in enumerate(turn["content"]):
            where = f"turn {t} part {p}"
            if part["type"] == "text":
                loss = bool(part.get("need_loss", True))
                segs.append(Segment(TEXT, tuple(fmt.tokenize(part["content"])), loss, where))
                segs.append(Segment(TEXT, (fmt.eos_id,), loss, f"{where} eos"))
                ends_with_text = True
                continue
            content = part["content"]
            index = len(images)
            images.append(resolve(content) if resolve is not None else content)
            if part["need_vit"]:
                segs += _image_block(fmt, VIT, index, False, where)
            if part["need_loss"]:
                segs += _image_block(fmt, GEN, index, True, where)
            elif part["need_vae"]:
                segs += _image_block(fmt, GEN, index, False, where)
            ends_with_text = False
        if not ends_with_text:
            segs.append(Segment(TEXT, (fmt.eos_id,), False, f"turn {t}"))
    return EncodedRecord(id=record_id, mode=mode, segments=segs, images=images)


def _image_block(fmt: SequenceFormat, kind: str, index: int, target: bool, where: str) -> list[Segment]:
    """BOI, the image's slots, EOI. Only a target image's slots carry loss; BOI and EOI never do."""
    n, pid = (fmt.num_vit_tokens, fmt.vit_id) if kind == VIT else (fmt.num_gen_tokens, fmt.gen_id)
    return [
        Segment(TEXT, (fmt.boi_id,), False, f"{where} boi"),
        Segment(kind, (pid,) * n, target, where, image=index),
        Segment(TEXT, (fmt.eoi_id,), False, f"{where} eoi"),
    ]
