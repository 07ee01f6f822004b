"""The streaming loader: a training worker's packs read, dropped out and collated in DataLoader worker processes,
in the order of the plan (trainer/order.py).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.batch import PackedBatch, collate
from trainer.dropout import ConditionDropout, apply_dropout
from trainer.index import DataIndex, load_index
from trainer.order import DataOrder, Pack, worker_stream_packs
from trainer.records import SequenceFormat
from trainer.shards import BlockReader


@dataclass
class LoadedPack:
    """One pack as the loop consumes it: the plan (step, pack), the collated batch and the prepared tensors."""

    step: int
    pack: Pack
    batch: PackedBatch
    tensors: Any  # prepare(batch) when a prepare function was given, else None
    dropped: dict[str, list[str]]  # record id -> conditions dropped in this pack
    block_reads: int = 0  # blocks the loader process that made this pack has read so far


class PackDataset:
    """The packs of one training worker, read in DataLoader worker processes (an IterableDataset).

    DataLoader worker j of n reads the streams v with v % n == (j + start_pack) % n, so that the DataLoader's
    round-robin over its workers (in order, always starting with worker 0) yields worker packs start_pack,
    start_pack + 1, ... (start_pack = start_step x grad_accum); `order.streams` must be a multiple of n. `index`
    may be a DataIndex or the path of a cached index (loaded in the worker process).
    """

    def __init__(
        self,
        index: DataIndex | str | Path,
        fmt: SequenceFormat | Callable[[], SequenceFormat],
        order: DataOrder,
        *,
        rank: int,
        start_step: int = 0,
        dropout: ConditionDropout = ConditionDropout(),
        prepare: Callable[[PackedBatch], Any] | None = None,
    ) -> None:
        self.index, self.fmt, self.order, self.rank = index, fmt, order, rank
        self.start_pack = start_step * order.grad_accum
        self.dropout, self.prepare = dropout, prepare

    def __iter__(self) -> Iterator[LoadedPack]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.order.streams % n:
            raise ValueError(f"streams ({self.order.streams}) must be a multiple of the loader workers ({n})")
        index = self.index
        if not isinstance(index, DataIndex):
            index = load_index(index)
        fmt = self.fmt if isinstance(self.fmt, SequenceFormat) else self.fmt()
        reader = BlockReader(fmt)
        plan = worker_stream_packs(index, self.order, self.rank, self.start_pack, (j + self.start_pack) % n, n)
        for p, pack in plan:
            step = p // self.order.grad_accum
            records, dropped = [], {}
            for entry, release in zip(pack.entries, pack.releases, strict=True):
                rec = reader.read(entry)
                if release:
                    reader.release(entry)
                rec = apply_dropout(rec, fmt, self.dropout, seed=self.order.seed, stage=self.order.stage, step=step)
                if rec.dropped:
                    dropped[rec.id] = rec.dropped
                records.append(rec)
            batch = collate(records)
            tensors = self.prepare(batch) if self.prepare is not None else None
            item = LoadedPack(step, Pack(pack.index, pack.entries), batch, tensors, dropped, reader.block_reads)
            yield _to_wire(item) if info is not None else item


class PackLoader:
    """Iterates a worker's LoadedPacks in plan order through a torch DataLoader.

    `workers` loader processes (0: in this process) each prepare up to `prefetch` packs ahead. Use as a context
    manager (or call close) to stop the processes.
    """

    def __init__(self, dataset: PackDataset, *, workers: int, prefetch: int = 2) -> None:
        import torch.utils.data

        if workers and dataset.order.streams % workers:
            raise ValueError(f"streams ({dataset.order.streams}) must be a multiple of loader workers ({workers})")
        kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers, "collate_fn": _identity}
        if workers:
            # Forked, so the processes share the index and the prepare function without pickling them; and killed
            # with this process (see _die_with_parent).
            kwargs.update(
                prefetch_factor=prefetch,
                persistent_workers=False,
                multiprocessing_context="fork",
                worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        self.loader = torch.utils.data.DataLoader(_iterable_dataset(dataset), **kwargs)
        self._it: Any = None

    def __iter__(self) -> Iterator[LoadedPack]:
        if self.loader.num_workers == 0:  # in this process: the dataset itself, without the DataLoader's per-item cost
            return iter(self.loader.dataset)
        self._it = iter(self.loader)
        return (_from_wire(item) for item in self._it)

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()
        self._it = None

    def __enter__(self) -> PackLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(item: Any) -> Any:
    return item


def _die_with_parent(parent: int, worker_id: int) -> None:
    """In a loader process: die with the process (the thread) that forked it, even when that one is SIGKILLed.

    An orphaned loader process would keep the sockets it inherited open (a Ray worker's connection to its raylet),
    so Ray would never see the training worker die and the run would hang instead of failing over; and it would
    hang itself, writing packs into a pipe nobody reads.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


_BATCH_TENSORS = ("input_ids", "position_ids", "text_labels", "image_target", "mode_ids", "record_index",
                  "vit_positions", "gen_positions")  # fmt: skip
_WIRE_MAX_BYTES = 1 << 20


def _to_wire(item: LoadedPack) -> LoadedPack:
    """In a loader process: small tensors as numpy arrays, which travel pickled through the pipe; torch would put
    each tensor in its own shared-memory segment, which costs more than the copy below ~1 MB."""
    import torch

    def wire(value: Any) -> Any:
        small = isinstance(value, torch.Tensor) and value.numel() * value.element_size() <= _WIRE_MAX_BYTES
        return value.numpy() if small else value

    batch = replace(item.batch, **{f: wire(getattr(item.batch, f)) for f in _BATCH_TENSORS})
    tensors = {k: wire(v) for k, v in item.tensors.items()} if isinstance(item.tensors, dict) else item.tensors
    return replace(item, batch=batch, tensors=tensors)


def _from_wire(item: LoadedPack) -> LoadedPack:
    import numpy as np
    import torch

    def back(value: Any) -> Any:
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    if not isinstance(item.batch.input_ids, np.ndarray):
        return item
    batch = replace(item.batch, **{f: back(getattr(item.batch, f)) for f in _BATCH_TENSORS})
    tensors = {k: back(v) for k, v in item.tensors.items()} if isinstance(item.tensors, dict) else item.tensors
    return replace(item, batch=batch, tensors=tensors)


def _iterable_dataset(dataset: PackDataset) -> Any:
    """`dataset` as a torch IterableDataset (defined on first use: this module does not import torch itself)."""
    import torch.utils.data

    class _Packs(torch.utils.data.IterableDataset):
        def __init__(self, inner: PackDataset) -> None:
            self.inner = inner

        def __iter__(self) -> Iterator[LoadedPack]:
            return iter(self.inner)

    return _Packs(dataset)


def steps_packs(packs: Iterator[LoadedPack], grad_accum: int, step: int) -> list[LoadedPack]:
    """The grad_accum LoadedPacks of `step`, checked against the plan (a wrong order fails loudly)."""
    items = [next(packs) for _ in range(grad_accum)]
    if any(item.step != step for item in items):
        raise RuntimeError(f"loader out of order: expected step {step}, got {[i.step for i in items]}")
    return items
