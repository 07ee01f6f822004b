"""The tiny Janus scoring packed sequences, in-process (no Ray): packed records never attend to each other (the
module's block-diagonal mask, not transformers' inference from position ids), and gradient accumulation over a
step's packs gives the mean of the packs' gradients (what as many DDP workers with one pack each give).
"""

from __future__ import annotations

import base64
import copy

import pytest


@pytest.fixture(scope="module")
def adapter() -> object:
    from trainer.model import load_adapter
    from trainer.tiny_janus import resolve_model

    adapter = load_adapter("janus", resolve_model("tiny:janus"))
    adapter.freeze(vision=False)
    return adapter


@pytest.fixture(scope="module")
def records(adapter: object) -> dict[str, list]:
    """mode name -> records of two synthetic trajectories, encoded with images resolved."""
    from pipeline.synthetic import synthetic_trajectories
    from schemas.conversation import conversation_from_json
    from schemas.modes import mode_records
    from trainer.records import encode_conversation

    fmt = adapter.sequence_format()
    out: dict[str, list] = {}
    for t in synthetic_trajectories(2, size=32):
        for r in mode_records(t):
            turns = conversation_from_json(r.conversation)
            rec = encode_conversation(turns, fmt, record_id=r.id, mode=r.mode, resolve=base64.b64decode)
            out.setdefault(r.mode, []).append((rec, turns))
    return out


def _scores(adapter: object, recs: list) -> dict:
    """The module's per-token losses of `recs` packed into one sequence, split per record (in pack order)."""
    import torch

    from trainer.batch import collate

    batch = collate(recs)
    with torch.no_grad():
        out = adapter.module.eval()(**adapter.batch_tensors(batch))
    # Per-token losses come in position order: the first record's first, then the next record's, ...
    lengths = [r.length for r in recs]
    owner = torch.repeat_interleave(torch.arange(len(recs)), torch.tensor(lengths))
    split = {}
    for kind in ("text", "image"):
        positions = (batch.text_labels[0] != -100) if kind == "text" else batch.image_target[0]
        where = positions.nonzero().squeeze(-1)
        for i in range(len(recs)):
            split[(kind, i)] = out[f"{kind}_loss"][owner[where] == i]
    return split


def _other_tokens(rec: object, fmt: object, turns: list) -> object:
    """`rec` with every text part rewritten (other tokens, other lengths) and its images replaced: what B must not
    see of A."""
    from trainer.records import encode_conversation

    changed = copy.deepcopy(turns)
    for turn in changed:
        if turn["role"] == "user":
            turn["content"] = "something else entirely " + turn["content"][::-1]
        else:
            for part in turn["content"]:
                if part["type"] == "text":
                    part["content"] = part["content"][::-1] + " and more words here"
    out = encode_conversation(changed, fmt, record_id=rec.id, mode=rec.mode, resolve=base64.b64decode)
    out.images = [_solid_png(i) for i in range(len(out.images))]
    return out


def _solid_png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40 * i % 256, 200, 17)).save(buf, format="PNG")
    return buf.getvalue()


def test_packed_records_do_not_attend_to_each_other(adapter: object, records: dict) -> None:
    """Record B's per-token text and image losses inside a pack are those of B alone, and do not change when record
    A before it gets other tokens, other lengths and other images."""
    import torch

    fmt = adapter.sequence_format()
    a, a_turns = records["improving_full_learning"][0]  # both encoders, an image condition and an image target
    b, _ = records["initial_full_learning"][1]  # text and image targets
    alone = _scores(adapter, [b])
    packed = _scores(adapter, [a, b])
    a2 = _other_tokens(a, fmt, a_turns)
    assert a2.length != a.length
    changed = _scores(adapter, [a2, b])
    assert packed[("text", 0)].shape != changed[("text", 0)].shape or not torch.allclose(
        packed[("text", 0)], changed[("text", 0)]
    )  # A itself did change
    for kind in ("text", "image"):
        assert alone[(kind, 0)].numel() > 0
        torch.testing.assert_close(packed[(kind, 1)], alone[(kind, 0)], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(changed[(kind, 1)], alone[(kind, 0)], rtol=1e-4, atol=1e-5)


def test_record_attention_mask_is_block_diagonal_causal() -> None:
    import torch

    from trainer.model import record_attention_mask

    index = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = record_attention_mask(index, "sdpa", torch.float32)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool and torch.equal(mask[0, 0], want)
    eager = record_attention_mask(index, "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, want) and bool((eager[~want] == torch.finfo(torch.float32).min).all())
    with pytest.raises(ValueError, match="sdpa or eager"):
        record_attention_mask(index, "flash_attention_2", torch.float32)


def test_grad_accumulation_is_the_mean_of_the_packs_gradients(adapter: object, records: dict) -> None:
    """accumulate_gradients over two packs (grad_accum 2) leaves the mean of each pack's own gradient, the gradient
    two DDP workers with one pack each average to; the per-pack outputs come back for the loss statistics."""
    import torch

    from trainer.batch import collate
    from trainer.loop import accumulate_gradients, pack_loss

    module = adapter.module.train()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    cfg = {"text_loss_weight": 1.0, "image_loss_weight": 0.5}
    packs = [
        adapter.batch_tensors(
            collate([records["improving_full_learning"][0][0], records["initial_full_learning"][1][0]])
        ),
        adapter.batch_tensors(collate([r for r, _ in records["improving_thinking_generation_learning"]])),
    ]

    def grads() -> dict:
        out = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return out

    per_pack = []
    for tensors in packs:
        pack_loss(module(**tensors), cfg).backward()
        per_pack.append(grads())
    outs = accumulate_gradients(module, packs, cfg, device=torch.device("cpu"), dtype=torch.float32, strategy="ddp")
    accumulated = grads()
    assert len(outs) == 2 and all(o["text_loss"].requires_grad is False for o in outs)
    assert set(accumulated) == set(per_pack[0]) | set(per_pack[1])
    moved = 0
    for name, g in accumulated.items():
        want = (per_pack[0].get(name, torch.zeros_like(g)) + per_pack[1].get(name, torch.zeros_like(g))) / 2
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7, msg=name)
        moved += int(g.abs().sum() > 0)
    assert moved > 10
