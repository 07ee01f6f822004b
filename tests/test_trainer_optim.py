"""The optimiser side the workers run (trainer/optim.py), without a model: the learning-rate schedules step by step
against their formulas, and the EMA against its update rule over several steps."""

from __future__ import annotations

import math

import pytest

CFG = {"betas": (0.9, 0.95), "adam_eps": 1e-8, "weight_decay": 0.0}


def _lrs(stage: dict, steps: int) -> list[float]:
    """The learning rate each optimiser step uses, read from the optimiser as the loop drives it."""
    import torch

    from trainer.optim import make_optimizer

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = make_optimizer([param], CFG, stage)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(("warmup", "floor"), [(4, 0.1), (0, 0.0), (3, 0.5)])
def test_cosine_schedule_follows_its_formula_step_by_step(warmup: int, floor: float) -> None:
    """lr(s) = lr * (s + 1) / warmup while s < warmup; then lr * (floor + (1 - floor) * (1 + cos(pi * p)) / 2) with
    p = (s - warmup) / (steps - warmup), held at the floor after the last step."""
    lr, steps = 1e-3, 20
    stage = {"lr": lr, "warmup_steps": warmup, "steps": steps, "schedule": "cosine", "min_lr_ratio": floor}
    got = _lrs(stage, steps + 3)
    for s, value in enumerate(got):
        if s < warmup:
            want = lr * (s + 1) / warmup
        else:
            p = min(1.0, (s - warmup) / (steps - warmup))
            want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        assert value == pytest.approx(want, rel=1e-9, abs=1e-15), s
    assert got[warmup] == pytest.approx(lr)  # the peak right after warm-up
    after = got[warmup:steps]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # strictly decreasing to the floor
    assert got[steps:] == pytest.approx([lr * floor] * 3)


def test_constant_schedule_after_linear_warmup() -> None:
    lr = 2e-5
    stage = {"lr": lr, "warmup_steps": 5, "steps": 12, "schedule": "constant", "min_lr_ratio": 0.1}
    assert _lrs(stage, 12) == pytest.approx([lr * (s + 1) / 5 for s in range(5)] + [lr] * 7)


def test_ema_follows_its_update_rule_over_several_steps() -> None:
    """shadow_0 = the weights when the EMA starts; shadow_k = decay * shadow_(k-1) + (1 - decay) * weights_k after
    each step k, per tracked (trainable) parameter, in float32 whatever the weights' dtype; frozen ones untracked."""
    import torch

    from trainer.optim import Ema

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    module[1].bias.requires_grad_(False)
    decay = 0.9
    ema = Ema(module.named_parameters(), decay)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    want = {n: p.detach().double().clone() for n, p in module.named_parameters() if p.requires_grad}
    for step in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * (step + 1))
        ema.update(module.named_parameters())
        for n, p in module.named_parameters():
            if n in want:
                want[n] = decay * want[n] + (1 - decay) * p.detach().double()
        for n, s in ema.shadow.items():
            assert s.dtype == torch.float32
            torch.testing.assert_close(s.double(), want[n], rtol=1e-6, atol=1e-6, msg=f"step {step} {n}")
    # The weights moved a lot; the EMA lags behind them (it is not a copy of the weights).
    assert not torch.allclose(ema.shadow["0.weight"], module[0].weight.detach(), atol=1e-2)
    # bf16 weights: the shadow stays float32 and follows the same rule on their float32 values.
    half = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema16 = Ema(half.named_parameters(), decay)
    start = ema16.shadow["weight"].clone()
    with torch.no_grad():
        half.weight.add_(1.0)
    ema16.update(half.named_parameters())
    assert ema16.shadow["weight"].dtype == torch.float32
    torch.testing.assert_close(ema16.shadow["weight"], decay * start + (1 - decay) * half.weight.float())
