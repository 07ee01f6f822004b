"""Precision, optimiser and EMA of the training loop (kept apart so tests drive exactly what the workers run).

Mixed precision the usual way: the weights the optimiser updates (master weights), the AdamW moments and the EMA
are float32; only the compute runs in bfloat16 (torch.autocast around forward and loss; under FSDP the
all-gathered parameters are cast to bf16 by the mixed-precision policy and gradients are reduced in float32).
A bf16 master copy would round away most updates: at lr 2e-5 a step changes a weight of magnitude 0.02 by ~1e-3
of its value, below bf16's resolution of 2^-8.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any


def compute_dtype(precision: str, device_type: str) -> Any:
    """The dtype forward/backward run in: bf16 when asked, or with "auto" on a GPU; float32 otherwise (CPU)."""
    import torch

    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(device_type: str, dtype: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device_type` (CUDA or CPU) when `dtype` is bf16; a no-op for float32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def lr_lambda(stage: dict[str, Any]) -> Any:
    """LambdaLR factor: linear warm-up to 1, then constant or cosine down to `min_lr_ratio`."""
    warmup, steps, schedule, floor = stage["warmup_steps"], stage["steps"], stage["schedule"], stage["min_lr_ratio"]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(params: list[Any], cfg: dict[str, Any], stage: dict[str, Any]) -> tuple[Any, Any]:
    """AdamW over the float32 trainable parameters, and its LambdaLR schedule. `cfg` is TrainConfig.model_dump()."""
    import torch

    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"trainable parameter in {p.dtype}: master weights must be float32 (load in float32)")
    optimizer = torch.optim.AdamW(
        params,
        lr=stage["lr"],
        betas=tuple(cfg["betas"]),
        eps=cfg["adam_eps"],
        weight_decay=cfg["weight_decay"],
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))


class Ema:
    """A float32 exponential moving average of the trainable parameters, keyed by parameter name.

    Works on plain tensors (single process, DDP) and on FSDP2's sharded DTensors (each rank averages its shard).
    """

    def __init__(self, named_params: Iterable[tuple[str, Any]], decay: float) -> None:
        import torch

        self.decay = decay
        self.shadow: dict[str, Any] = {
            n: p.detach().to(torch.float32, copy=True) for n, p in named_params if p.requires_grad
        }

    def update(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """shadow += (1 - decay) * (param - shadow), for every tracked parameter."""
        import torch

        pairs = [(self.shadow[n], p.detach()) for n, p in named_params if n in self.shadow]
        with torch.no_grad():
            torch._foreach_lerp_([s for s, _ in pairs], [p.float() for _, p in pairs], 1.0 - self.decay)

    def full_state_dict(self, keep: bool = True) -> Iterator[tuple[str, Any]]:
        """(name, full CPU tensor) per tracked parameter, on the ranks that `keep` them. Gathers DTensor shards,
        a collective: under FSDP every rank must iterate to the end, also those that keep nothing."""
        for n, s in self.shadow.items():
            full = s.full_tensor() if hasattr(s, "full_tensor") else s
            if keep:
                yield n, full.detach().cpu()
