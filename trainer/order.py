"""The order of the data: a pure function of (seed, stage, step) for a given world size and `streams`.

Each of `world_size * streams` streams walks every mode's row groups ("blocks") in a per-epoch shuffled order (stream
q takes blocks q, q + R, q + 2R, ... of the endless sequence of epochs), shuffles the records of each window of
`shuffle_blocks` consecutive blocks, draws modes by weight and greedily packs records into sequences of at most
`token_budget` tokens. Pack k of stream v of worker r is the worker's pack p = k * streams + v and the global pack
g = p * world_size + r: global pack g goes to worker g mod W, and the data position of a run is just its step, so a
resumed run regenerates the same plan and continues at the same pack. A stream reads each block once per window,
sequentially, never one row group per record. Planning reads nothing: it works on the index alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainer.draws import seeded
from trainer.index import DataIndex
from trainer.shards import Entry

#: Defaults of the order (trainer/config.py's field defaults are these).
DEFAULT_STREAMS = 2
DEFAULT_SHUFFLE_BLOCKS = 2


@dataclass(frozen=True)
class DataOrder:
    """What fixes a stage's data order, with the index: the mixture, the packing budget, the seed and stage, the
    number of workers and of packs per step, and each worker's streams and shuffle window."""

    weights: dict[str, float]  # mode -> sampling weight, in the order the modes are mixed (the config's)
    token_budget: int
    seed: int
    stage: str
    world_size: int = 1
    grad_accum: int = 1
    streams: int = DEFAULT_STREAMS  # per worker
    shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS


@dataclass(frozen=True)
class Pack:
    """One packed sequence: its global index in the stage's stream and its records, in order."""

    index: int
    entries: tuple[Entry, ...]
    releases: tuple[bool, ...] = ()  # per entry: the last use of its block in its window (the reader frees it)

    @property
    def tokens(self) -> int:
        return sum(e.length for e in self.entries)


def _blocks_of(entries: list[Entry]) -> list[list[int]]:
    """Entry positions grouped by block, blocks in index order."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(e.block, []).append(i)
    return list(groups.values())


def _mode_stream(
    entries: list[Entry], seed: int, stage: str, mode: str, stream: int, streams: int, shuffle_blocks: int
) -> Iterator[tuple[Entry, bool]]:
    """(entry, last use of its block in this window) of one mode for global stream `stream` of `streams`.

    The endless block sequence is epoch after epoch of the mode's blocks, each epoch in its own seeded order (the
    same for every stream); stream q takes blocks q, q + streams, ...; every window of `shuffle_blocks` blocks it
    takes is shuffled record by record.
    """
    blocks = _blocks_of(entries)
    nb = len(blocks)
    perm: list[int] = []
    perm_epoch = -1
    taken = 0
    window = 0
    while True:
        keys = []
        for _ in range(shuffle_blocks):
            epoch, pos = divmod(stream + streams * taken, nb)
            taken += 1
            if epoch != perm_epoch:
                perm = list(range(nb))
                seeded(seed, stage, mode, "blocks", epoch).shuffle(perm)
                perm_epoch = epoch
            keys.append(perm[pos])
        items = [(b, i) for b in keys for i in blocks[b]]
        seeded(seed, stage, mode, "window", stream, window).shuffle(items)
        last = {b: n for n, (b, _) in enumerate(items)}
        for n, (b, i) in enumerate(items):
            yield entries[i], last[b] == n
        window += 1


def stream_packs(
    index: DataIndex, order: DataOrder, stream: int
) -> Iterator[tuple[tuple[Entry, ...], tuple[bool, ...]]]:
    """Endless packs (entries, releases) of global stream `stream` (of world_size x streams): modes drawn by weight
    (mode m with probability w_m / sum(w)), each mode's next record from its block stream, greedy packing within the
    budget.

    Every entry fits the budget alone (indexing skipped the others), so every pack holds at least one record.
    """
    weights, seed, stage = order.weights, order.seed, order.stage
    modes = [m for m in weights if weights[m] > 0 and index.entries.get(m)]
    if not modes:
        raise ValueError("no usable records in any mode of this stage")
    total = sum(weights[m] for m in modes)
    cumulative = []
    acc = 0.0
    for m in modes:
        acc += weights[m] / total
        cumulative.append(acc)
    draw = seeded(seed, stage, "mix", stream)
    streams = order.world_size * order.streams
    per_mode = {m: _mode_stream(index.entries[m], seed, stage, m, stream, streams, order.shuffle_blocks) for m in modes}
    current: list[Entry] = []
    releases: list[bool] = []
    used = 0
    while True:
        u = draw.random()
        m = next((mode for mode, c in zip(modes, cumulative, strict=True) if u < c), modes[-1])
        entry, release = next(per_mode[m])
        if current and used + entry.length > order.token_budget:
            yield tuple(current), tuple(releases)
            current, releases, used = [], [], 0
        current.append(entry)
        releases.append(release)
        used += entry.length


def worker_stream_packs(
    index: DataIndex, order: DataOrder, rank: int, start_pack: int = 0, residue: int = 0, modulus: int = 1
) -> Iterator[tuple[int, Pack]]:
    """(worker pack p, Pack) of worker `rank` for p >= start_pack with p % modulus == residue, in order of p.

    Worker pack p = k * streams + v is pack k of the worker's stream v (global stream rank + world_size * v), and
    global pack p * world_size + rank. Packs before start_pack are planned but not read (planning reads nothing).
    """
    world, streams = order.world_size, order.streams
    mine = [v for v in range(streams) if v % modulus == residue % modulus]
    gens = {v: stream_packs(index, order, rank + world * v) for v in mine}
    k = 0
    while True:
        for v in mine:
            p = k * streams + v
            entries, releases = next(gens[v])
            if p >= start_pack:
                yield p, Pack(p * world + rank, entries, releases)
        k += 1


def worker_packs(
    index: DataIndex, order: DataOrder, rank: int, start_step: int = 0
) -> Iterator[tuple[int, list[Pack]]]:
    """(step, the grad_accum packs of this worker) from `start_step` on: the data position is the step alone.

    Step s of worker r holds global packs (s * grad_accum + k) * world_size + r for k < grad_accum. This is the
    plan `PackLoader` reads, whatever its number of loader processes.
    """
    step, buffer = start_step, []
    for _, pack in worker_stream_packs(index, order, rank, start_step * order.grad_accum):
        buffer.append(pack)
        if len(buffer) == order.grad_accum:
            yield step, buffer
            step, buffer = step + 1, []
