"""Mixed precision done right, in-process (no Ray): the tiny Janus saved in bfloat16, as the Janus-Pro checkpoints
are, loads through the adapter with float32 weights; the optimiser, the EMA and the bf16 autocast of the training
loop (trainer/optim.py) then move the weights and the EMA at lr 2e-5. With bf16 master weights (what loading with
transformers' dtype "auto" gave) most of these updates round to nothing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

LR = 2e-5
STEPS = 10


@pytest.fixture(scope="module")
def bf16_janus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny:janus saved in bfloat16 (config and safetensors say bf16, like the Hub's Janus-Pro)."""
    import torch
    from transformers import AutoProcessor, JanusForConditionalGeneration

    from trainer.tiny_janus import resolve_model

    src = resolve_model("tiny:janus")
    out = tmp_path_factory.mktemp("tiny-janus-bf16")
    JanusForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    return out


def _batch(fmt: object) -> object:
    """All six modes of two synthetic trajectories in one packed batch (text and image targets, both encoders)."""
    from pipeline.synthetic import synthetic_trajectories
    from schemas.conversation import conversation_from_json
    from schemas.modes import mode_records
    from trainer.batch import collate
    from trainer.records import encode_conversation

    records = [
        encode_conversation(
            conversation_from_json(r.conversation), fmt, record_id=r.id, mode=r.mode, resolve=base64.b64decode
        )
        for t in synthetic_trajectories(2)
        for r in mode_records(t)
    ]
    return collate(records)


def test_bf16_checkpoint_trains_float32_weights_adamw_state_and_ema(bf16_janus: Path) -> None:
    import torch

    from trainer.model import load_adapter
    from trainer.optim import Ema, autocast, compute_dtype, make_optimizer

    assert json.loads((bf16_janus / "config.json").read_text())["dtype"] == "bfloat16"
    adapter = load_adapter("janus", str(bf16_janus))
    adapter.freeze(vision=False)
    module = adapter.module
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in named}

    cfg = {"betas": (0.9, 0.95), "adam_eps": 1e-15, "weight_decay": 0.0}
    stage = {"lr": LR, "warmup_steps": 0, "steps": STEPS, "schedule": "constant", "min_lr_ratio": 0.1}
    optimizer, scheduler = make_optimizer([p for _, p in named], cfg, stage)
    ema = Ema(named, decay=0.995)
    ema_before = {n: s.clone() for n, s in ema.shadow.items()}
    dtype = compute_dtype("bf16", "cpu")
    assert dtype == torch.bfloat16 and compute_dtype("auto", "cpu") == torch.float32

    tensors = adapter.batch_tensors(_batch(adapter.sequence_format()))
    reached = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in named}  # weights with a gradient at some step
    module.train()
    for _ in range(STEPS):
        with autocast("cpu", dtype):
            out = module(**tensors)
            loss = out["text_loss"].mean() + out["image_loss"].mean()
        assert out["text_loss"].numel() and out["image_loss"].numel()
        loss.backward()
        for n, p in named:
            if p.grad is not None:
                reached[n] |= p.grad != 0
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(named)

    moments = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    assert {s.dtype for s in ema.shadow.values()} == {torch.float32}
    total = sum(p.numel() for _, p in named)
    n_reached = sum(int(r.sum()) for r in reached.values())
    changed = sum(int(((p.detach() != before[n]) & reached[n]).sum()) for n, p in named)
    ema_moved = sum(int(((ema.shadow[n] != ema_before[n]) & reached[n]).sum()) for n in ema.shadow)
    # Weights no record of the batch reaches (embedding rows of unused tokens, ...) get no gradient and cannot move.
    assert n_reached > 0.5 * total, (n_reached, total)
    assert changed / n_reached > 0.99, (changed, n_reached)
    assert ema_moved / n_reached > 0.99, (ema_moved, n_reached)
