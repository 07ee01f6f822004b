"""Which engine errors are fatal.

A fatal error means the engine (and usually its process) can serve no more requests: vLLM's engine core died
(`EngineDeadError`), a CUDA error poisoned the device context, or our own engine loop stopped. Retrying rows on such
an engine fails them all in no time, so stages raise `EngineDead` instead of marking rows `failed`, and the Ray
actor that hosts the stage ends its process: Ray restarts it and retries its batches. Everything else (a prompt vLLM
refuses, a bad image, an out-of-memory on one batch) stays an error of the rows involved.
"""

from __future__ import annotations

#: Class names of exceptions that mean the engine is gone (matched by name: no vllm/torch import needed here).
FATAL_TYPES = frozenset({"EngineDead", "EngineDeadError", "AcceleratorError", "CudaError"})

#: Message fragments of torch/CUDA runtime errors after which the CUDA context cannot be trusted.
FATAL_MESSAGES = (
    "CUDA error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "NCCL error",
    "device-side assert",
    "unspecified launch failure",
    "illegal memory access",
)


class EngineDead(RuntimeError):
    """The engine cannot serve any more requests; the process that hosts it must be replaced."""


def is_engine_dead(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) means the engine is gone, not that one input was bad."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ in FATAL_TYPES for cls in type(current).__mro__):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current) for m in FATAL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False
