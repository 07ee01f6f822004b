"""Trainer data side without Ray: flags -> segments/masks and the official targets per mode, condition dropout,
the block-shuffled order (a pure function of seed, stage and step, equal across a resume), the streaming loader
(DataLoader processes, Parquet and WebDataset), the tokenizer-only format, and config errors that name the field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from schemas.conversation import conversation_from_json
from schemas.modes import FULL_MODES, MODES, MODES_BY_NAME

T, V, G = "text", "vit", "gen"
# Expected spans per mode: (origin, kind, loss). Every text part is followed by its EOS, a target exactly when the
# text is (the official trainer's end-of-text label); BOI/EOI are never targets; a turn ending with an image closes
# with an EOS without loss.
HEAD = [("bos", T, False), ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False)]
EXPECTED = {
    1: [
        ("bos", T, False), ("turn 0", T, False),
        ("turn 0 part 0 boi", T, False), ("turn 0 part 0", V, False), ("turn 0 part 0 eoi", T, False),
        ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False), ("turn 2 part 0", T, True),
        ("turn 2 part 0 eos", T, True),
    ],
    2: [*HEAD, ("turn 2 part 0", T, True), ("turn 2 part 0 eos", T, True)],
    3: [
        *HEAD, ("turn 2 part 0", T, True), ("turn 2 part 0 eos", T, True),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", G, True), ("turn 2 part 1 eoi", T, False),
        ("turn 2", T, False),
    ],
    4: [
        ("bos", T, False), ("turn 0", T, False),
        ("turn 0 part 0 boi", T, False), ("turn 0 part 0", V, False), ("turn 0 part 0 eoi", T, False),
        ("turn 0 part 1 boi", T, False), ("turn 0 part 1", V, False), ("turn 0 part 1 eoi", T, False),
        ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False), ("turn 2 part 0", T, True),
        ("turn 2 part 0 eos", T, True),
    ],
    5: [
        *HEAD, ("turn 2 part 0", T, False), ("turn 2 part 0 eos", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", V, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", G, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 2", T, True), ("turn 2 part 2 eos", T, True),
    ],
    6: [
        *HEAD, ("turn 2 part 0", T, False), ("turn 2 part 0 eos", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", V, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", G, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 2", T, True), ("turn 2 part 2 eos", T, True),
        ("turn 2 part 3 boi", T, False), ("turn 2 part 3", G, True), ("turn 2 part 3 eoi", T, False),
        ("turn 2", T, False),
    ],
}  # fmt: skip
ALL = [m.name for m in MODES]
STAGE1 = {m.name: (1.0 if m.full else 0.5) for m in MODES}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 trajectories in 2 units (2 files per mode and format), row groups of 2: 6 blocks of 2 records per mode."""
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories
    from schemas.config import ShardConfig

    out = tmp_path_factory.mktemp("trainer-data-unit") / "ds"
    write_dataset(out, synthetic_trajectories(12, size=32), ShardConfig(rows_per_group=2), unit_size=6)
    return out


@pytest.fixture(scope="module")
def fmt() -> object:
    from trainer.index import janus_sequence_format
    from trainer.tiny_janus import resolve_model

    return janus_sequence_format(resolve_model("tiny:janus"))


@pytest.fixture(scope="module")
def index(dataset: Path, fmt: object) -> object:
    from trainer.index import build_index

    return build_index(dataset, ALL, fmt, token_budget=4096)


def _row(dataset: Path, mode: str) -> dict:
    import pyarrow.parquet as pq

    files = sorted((dataset / "data" / mode).glob("*.parquet"))
    return pq.read_table(files[0]).to_pylist()[0]


def _encoded(dataset: Path, fmt: object, number: int) -> tuple[object, list]:
    import base64

    from trainer.records import encode_conversation

    mode = MODES[number - 1].name
    row = _row(dataset, mode)
    turns = conversation_from_json(row["conversation"])
    return encode_conversation(turns, fmt, record_id=row["id"], mode=mode, resolve=base64.b64decode), turns


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6])
def test_segments_of_each_mode_are_the_documented_layout(dataset: Path, fmt: object, number: int) -> None:
    rec, _ = _encoded(dataset, fmt, number)
    assert [(s.origin, s.kind, s.loss) for s in rec.segments] == EXPECTED[number]


def _flipped(turns: list) -> list:
    """The same conversation with every assistant part's need_loss flipped (flags, not the mode, decide)."""
    import copy

    out = copy.deepcopy(turns)
    for turn in out:
        if turn["role"] == "assistant":
            for part in turn["content"]:
                part["need_loss"] = not part["need_loss"]
    return out


def test_masks_follow_flags_span_by_span(dataset: Path, fmt: object) -> None:
    """One pack of twelve records, one per mode and the same ones with every need_loss flipped: walking the pack
    span by span, each label, image-target bit, position id and mode id is what the owning record's part flags say
    (read from the conversation, not from the segments), and the image slots point at that record's images."""
    import base64

    from trainer.batch import collate
    from trainer.records import GEN, TEXT, VIT, encode_conversation

    records, convs = [], []
    for number in range(1, 7):
        rec, turns = _encoded(dataset, fmt, number)
        for k, t in enumerate((turns, _flipped(turns))):
            records.append(encode_conversation(t, fmt, record_id=f"{rec.id}-{k}", mode=rec.mode,
                                               resolve=base64.b64decode))  # fmt: skip
            convs.append(t)
    batch = collate(records)
    ids, labels = batch.input_ids[0].tolist(), batch.text_labels[0].tolist()
    target, positions = batch.image_target[0].tolist(), batch.position_ids[0].tolist()
    mode_ids = batch.mode_ids[0].tolist()
    vit = [tuple(r) for r in batch.vit_positions.tolist()]
    gen = [tuple(r) for r in batch.gen_positions.tolist()]
    assert batch.record_ids == [r.id for r in records]
    pos, n_vit, n_gen = 0, 0, 0
    for rec, turns in zip(records, convs, strict=True):
        start, seen = pos, Counter()
        parts = {f"turn {t} part {p}": part for t, turn in enumerate(turns) if turn["role"] == "assistant"
                 for p, part in enumerate(turn["content"])}  # fmt: skip
        for seg in rec.segments:
            span = range(pos, pos + len(seg.ids))
            assert ids[pos : span.stop] == list(seg.ids)
            assert positions[pos : span.stop] == list(range(pos - start, span.stop - start)), rec.id
            assert mode_ids[pos : span.stop] == [MODES_BY_NAME[rec.mode].index] * len(span)
            base, _, suffix = seg.origin.rpartition(" ") if seg.origin.endswith((" eos", " boi", " eoi")) else (
                seg.origin, "", "")  # fmt: skip
            part = parts.get(base)
            if seg.kind == TEXT:
                # Text of a part, or the EOS closing it: a target exactly when the part's need_loss says so.
                # Everything else (BOS, user turns, template, BOI/EOI, a closing EOS) never is.
                loss = part is not None and part["type"] == "text" and suffix in ("", "eos")
                loss = loss and part["need_loss"]
                assert labels[pos : span.stop] == (list(seg.ids) if loss else [-100] * len(span)), seg.origin
                assert not any(target[pos : span.stop]), seg.origin
                if part is not None and part["type"] == "text":
                    seen[(base, suffix)] += 1
                    if suffix == "":
                        assert list(seg.ids) == fmt.tokenize(part["content"])
                    else:
                        assert list(seg.ids) == [fmt.eos_id]
            else:
                assert part is not None and part["type"] == "image", seg.origin
                seen[(base, seg.kind)] += 1
                slots = tuple(span)
                if seg.kind == VIT:
                    assert vit[n_vit] == slots and len(slots) == fmt.num_vit_tokens
                    assert batch.vit_images[n_vit] == base64.b64decode(part["content"])
                    n_vit += 1
                else:
                    assert gen[n_gen] == slots and len(slots) == fmt.num_gen_tokens
                    assert batch.gen_images[n_gen] == base64.b64decode(part["content"])
                    n_gen += 1
                assert labels[pos : span.stop] == [-100] * len(span)
                assert target[pos : span.stop] == [seg.kind == GEN and part["need_loss"]] * len(span), seg.origin
            pos = span.stop
        # Every part is there once: a text part with its EOS; an image with a vit block iff need_vit and a
        # generation block iff need_vae or need_loss.
        want = Counter()
        for where, part in parts.items():
            if part["type"] == "text":
                want[(where, "")] += 1
                want[(where, "eos")] += 1
            else:
                want[(where, VIT)] += bool(part["need_vit"])
                want[(where, GEN)] += bool(part["need_vae"] or part["need_loss"])
        assert seen == +want, rec.id
    assert pos == len(ids) and n_vit == len(vit) and n_gen == len(gen)
    # The twelve records' flags differ: both label values occur in text parts and image targets.
    assert sum(label != -100 for label in labels) > 0 and 0 < sum(target) < len(target)


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6])
def test_official_targets_eos_after_every_supervised_text_never_boi(dataset: Path, fmt: object, number: int) -> None:
    """The same rule in every mode, read off the labels alone: each supervised text is followed by a labelled EOS
    (and is the only thing an EOS label follows); BOI and EOI are never labels."""
    from trainer.batch import collate

    rec, turns = _encoded(dataset, fmt, number)
    labels = collate([rec]).text_labels[0].tolist()
    supervised = [p for t in turns if t["role"] == "assistant" for p in t["content"] if p["type"] == "text"]
    supervised = [p for p in supervised if p["need_loss"]]
    assert labels.count(fmt.eos_id) == len(supervised) >= 1
    assert fmt.boi_id not in labels and fmt.eoi_id not in labels
    for i, label in enumerate(labels):
        if label == fmt.eos_id:
            assert labels[i - 1] not in (-100, fmt.eos_id)  # right after supervised text tokens


def test_rows_parse_without_decoding_images_and_broken_rows_are_skipped(
    dataset: Path, fmt: object, tmp_path: Path
) -> None:
    """Image contents are split out of the canonical JSON (never JSON- or base64-decoded while indexing); another
    JSON form parses in full to the same record; a broken image content or flag makes the row "invalid"."""
    import base64

    import pyarrow.parquet as pq

    from schemas.conversation import ConversationError
    from trainer.index import build_index
    from trainer.records import encode_conversation
    from trainer.shards import parse_parquet_conversation, split_images

    mode = "improving_full_learning"
    path = sorted((dataset / "data" / mode).glob("*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    conversation = rows[0]["conversation"]
    stripped, images = split_images(conversation)
    assert len(images) == 2 and stripped == conversation.replace(images[0], "0.png").replace(images[1], "1.png")
    originals = [p["content"] for t in json.loads(conversation) if t["role"] == "assistant"
                 for p in t["content"] if p["type"] == "image"]  # fmt: skip
    assert images == originals
    turns, resolve = parse_parquet_conversation(conversation, check=True)
    other_turns, other_resolve = parse_parquet_conversation(json.dumps(json.loads(conversation), indent=1), check=True)
    a = encode_conversation(turns, fmt, resolve=resolve)
    b = encode_conversation(other_turns, fmt, resolve=other_resolve)
    assert a.segments == b.segments and a.images == b.images == [base64.b64decode(x) for x in originals]

    broken = [dict(r) for r in rows]
    broken[1]["conversation"] = broken[1]["conversation"].replace(
        split_images(broken[1]["conversation"])[1][0][:9], "", 1
    )
    turns2 = json.loads(rows[2]["conversation"])
    del turns2[2]["content"][1]["need_vit"]
    broken[2]["conversation"] = json.dumps(turns2, ensure_ascii=False, separators=(",", ":"))
    with pytest.raises(ConversationError, match="not base64"):
        parse_parquet_conversation(broken[1]["conversation"], check=True)
    (tmp_path / "data" / mode).mkdir(parents=True)
    pq.write_table(
        pq.read_table(path).from_pylist(broken, schema=pq.read_schema(path)), tmp_path / "data" / mode / "x.parquet"
    )
    index = build_index(tmp_path, [mode], fmt, 4096)
    assert index.skipped == Counter({f"{mode}: invalid": 2})
    assert index.skipped_ids[rows[1]["id"]].startswith("invalid: image 0: content is not base64")
    assert "lacks the flag need_vit" in index.skipped_ids[rows[2]["id"]]
    assert [e.id for e in index.entries[mode]] == [r["id"] for r in rows if r["id"] not in index.skipped_ids]


def test_tokenizer_only_format_matches_the_adapter(fmt: object) -> None:
    from trainer.model import load_adapter
    from trainer.tiny_janus import resolve_model

    adapter = load_adapter("janus", resolve_model("tiny:janus"))
    want = adapter.sequence_format()
    facts = ("bos_id", "eos_id", "boi_id", "eoi_id", "vit_id", "gen_id", "num_vit_tokens", "num_gen_tokens")
    assert {k: getattr(fmt, k) for k in facts} == {k: getattr(want, k) for k in facts}
    assert fmt.pad_id == adapter.tokenizer.pad_token_id is not None
    for text in ("<think>\nred circles, side by side</think>", "### Final Comprehensive Prompt: 3 squares", "é ✓"):
        assert fmt.tokenize(text) == adapter.tokenize(text)


def test_too_long_records_are_skipped_and_counted(dataset: Path, fmt: object, index: object) -> None:
    from trainer.index import build_index
    from trainer.order import DataOrder, worker_packs

    lengths = {e.id: e.length for es in index.entries.values() for e in es}
    budget = sorted(lengths.values())[len(lengths) // 2]  # about half of the records do not fit
    small = build_index(dataset, ALL, fmt, token_budget=budget)
    too_long = {i for i, n in lengths.items() if n > budget}
    assert too_long and set(small.skipped_ids) == too_long
    assert all(small.skipped_ids[i] == f"too_long: {lengths[i]} tokens > budget {budget}" for i in too_long)
    assert sum(small.skipped.values()) == len(too_long)
    assert sum(small.counts().values()) == len(lengths) - len(too_long)
    weights = {m: 1.0 for m in ALL if small.entries[m]}
    steps = worker_packs(small, DataOrder(weights, budget, seed=0, stage="1"), rank=0)
    packs = [p for _ in range(50) for p in next(steps)[1]]
    assert all(p.tokens <= budget for p in packs)
    assert not {e.id for p in packs for e in p.entries} & too_long


def _plan(index: object, steps: int, **kwargs: object) -> dict[int, list[tuple[int, tuple[str, ...]]]]:
    """step -> [(global pack, record ids)] of one worker's plan."""
    from trainer.order import DataOrder, worker_packs

    kw = {"weights": STAGE1, "token_budget": 2048, "seed": 0, "stage": "1", **kwargs}
    rank, start_step = kw.pop("rank", 0), kw.pop("start_step", 0)
    it = worker_packs(index, DataOrder(**kw), rank, start_step)
    out = {}
    for _ in range(steps):
        step, packs = next(it)
        out[step] = [(p.index, tuple(e.id for e in p.entries)) for p in packs]
    return out


def test_order_is_a_pure_function_of_seed_stage_step_and_resumes_exactly(index: object) -> None:
    a = _plan(index, 40, world_size=2, rank=1, grad_accum=2)
    assert a == _plan(index, 40, world_size=2, rank=1, grad_accum=2)
    assert a != _plan(index, 40, world_size=2, rank=1, grad_accum=2, seed=1)
    assert a != _plan(index, 40, world_size=2, rank=1, grad_accum=2, stage="2")
    # A resumed plan is the tail of the uninterrupted one, pack for pack.
    resumed = _plan(index, 15, world_size=2, rank=1, grad_accum=2, start_step=25)
    assert resumed == {s: a[s] for s in range(25, 40)}
    # Worker r holds global packs (s * grad_accum + k) * W + r.
    assert [g for g, _ in a[3]] == [(3 * 2 + k) * 2 + 1 for k in range(2)]
    # Mixing follows the weights (thinking modes 0.5, full modes 1.0).
    counts = Counter(i.rsplit("_m", 1)[1] for packs in _plan(index, 400).values() for _, ids in packs for i in ids)
    assert 0.4 < counts["2"] / counts["3"] < 0.65 and 0.4 < counts["5"] / counts["6"] < 0.65


def test_every_record_once_per_epoch_across_workers_and_streams(index: object) -> None:
    """Streams split each epoch's blocks between them: with one mode, the first len(mode) records drawn over all
    workers and streams are exactly the mode's records, each once."""
    from trainer.order import _blocks_of, _mode_stream

    mode = "initial_full_learning"
    entries = index.entries[mode]
    n_blocks = len(_blocks_of(entries))
    assert n_blocks == 6  # 12 records in row groups of 2
    streams = 3  # e.g. 3 workers x 1 stream: 2 blocks each per epoch
    seen = []
    for q in range(streams):
        stream = _mode_stream(entries, 0, "1", mode, q, streams, shuffle_blocks=2)
        seen += [next(stream)[0].id for _ in range(len(entries) // streams)]
    assert sorted(seen) == sorted(e.id for e in entries)
    # Block shuffle, not a fixed order: epochs differ and the records of a window are shuffled across its blocks.
    one = _mode_stream(entries, 0, "1", mode, 0, 1, shuffle_blocks=2)
    first, second = [next(one)[0].id for _ in entries], [next(one)[0].id for _ in entries]
    assert sorted(first) == sorted(second) and first != second
    assert first[:4] != [e.id for e in entries[:4]]


def _loaded(dataset_index: object, fmt: object, steps: int, workers: int, **kwargs: object) -> list:
    from trainer.dropout import ConditionDropout
    from trainer.loader import PackDataset, PackLoader
    from trainer.order import DataOrder

    kw = {"world_size": 1, "grad_accum": 2, "streams": 2, "shuffle_blocks": 2}
    kw.update(kwargs)
    dropout = kw.pop("dropout", ConditionDropout(text=0.5, gen_image=0.5, vit_image=0.5))
    rank, start_step = kw.pop("rank", 0), kw.pop("start_step", 0)
    order = DataOrder(STAGE1, 2048, seed=0, stage="1", **kw)
    ds = PackDataset(dataset_index, fmt, order, rank=rank, start_step=start_step, dropout=dropout)
    out = []
    with PackLoader(ds, workers=workers, prefetch=2) as loader:
        it = iter(loader)
        for _ in range(steps * order.grad_accum):
            out.append(next(it))
    return out


def _summary(items: list) -> list:
    return [(i.step, i.pack.index, tuple(e.id for e in i.pack.entries), i.batch.input_ids[0].tolist(),
             sorted(i.dropped.items())) for i in items]  # fmt: skip


def test_loader_processes_read_the_plan_in_order_and_resume_exactly(dataset: Path, fmt: object, index: object) -> None:
    """2 DataLoader processes give the plan's packs in the plan's order, the same batches (dropout included) as
    reading in this process, and a resumed loader gives the tail; each block is read once per window."""
    inline = _loaded(index, fmt, 12, workers=0)
    forked = _loaded(index, fmt, 12, workers=2)
    assert _summary(forked) == _summary(inline)
    plan = _plan(index, 12, grad_accum=2, streams=2)
    assert [(i.pack.index, tuple(e.id for e in i.pack.entries)) for i in forked] == [
        p for s in range(12) for p in plan[s]
    ]
    assert any(i.dropped for i in forked)
    resumed = _loaded(index, fmt, 5, workers=2, start_step=7)
    assert _summary(resumed) == _summary(forked)[14:]
    # Resuming at an odd pack: the DataLoader still starts with its process 0, which must then hold that pack.
    one = _loaded(index, fmt, 12, workers=2, grad_accum=1)
    assert _summary(_loaded(index, fmt, 5, workers=2, grad_accum=1, start_step=7)) == _summary(one)[7:]


def test_each_block_is_read_once_per_window_not_once_per_record(index: object, fmt: object) -> None:
    """One mode, one stream: windows of 2 blocks of 2 records, so reading n records costs 2 * ceil(n / 4) block
    reads at most (one row-group read per record would cost n)."""
    import math

    from trainer.loader import PackDataset
    from trainer.order import DataOrder

    mode = "improving_full_learning"
    ds = PackDataset(index, fmt, DataOrder({mode: 1.0}, 2048, seed=0, stage="1", streams=1), rank=0)
    it, n = iter(ds), 0
    while n < 60:
        item = next(it)
        n += len(item.pack.entries)
    assert 0 < item.block_reads <= 2 * math.ceil(n / 4), (item.block_reads, n)


def test_loader_processes_die_with_a_killed_training_process(index: object, fmt: object, tmp_path: Path) -> None:
    """SIGKILL the process that reads the loader: its loader processes must go too (an orphan keeps the inherited
    sockets of a Ray worker open, so Ray never sees the worker die and the run hangs)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from trainer.index import save_index
    from trainer.tiny_janus import resolve_model

    path = tmp_path / "index.json"
    save_index(index, path, Path(index.entries[ALL[0]][0].file).parents[2])
    script = f"""
import time
from trainer.loader import PackDataset, PackLoader
from trainer.index import janus_sequence_format
from trainer.order import DataOrder
fmt = janus_sequence_format({resolve_model("tiny:janus")!r})
ds = PackDataset({str(path)!r}, fmt, DataOrder({{"initial_full_learning": 1.0}}, 2048, seed=0, stage="1"), rank=0)
loader = PackLoader(ds, workers=2, prefetch=8)
it = iter(loader)
next(it)
print(" ".join(str(w.pid) for w in loader._it._workers), flush=True)
time.sleep(600)
"""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # let the loader processes fill their pipe
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _running(p)]
            time.sleep(0.1)
        assert not alive, f"loader processes outlived their parent: {alive}"
    finally:
        proc.kill()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_webdataset_and_parquet_give_the_same_records(
    dataset: Path, fmt: object, index: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.shards
    from trainer.index import build_index
    from trainer.shards import RecordReader

    monkeypatch.setattr(trainer.shards, "WDS_BLOCK_ROWS", 4)  # several blocks per tar
    wds = build_index(dataset, ALL, fmt, 4096, "webdataset")
    assert max(e.locator[0] for es in wds.entries.values() for e in es) == 1
    reader = RecordReader(fmt)
    for mode in ALL:
        a = {e.id: reader.read(e) for e in index.entries[mode]}
        b = {e.id: reader.read(e) for e in wds.entries[mode]}
        assert sorted(a) == sorted(b) and len(a) == 12
        for rid in a:
            assert a[rid].segments == b[rid].segments and a[rid].images == b[rid].images
    items = _loaded(wds, fmt, 4, workers=2)
    assert all(i.pack.entries[0].file.endswith(".tar") for i in items)
    assert [r for i in items for r in i.batch.record_ids] == [e.id for i in items for e in i.pack.entries]


def test_dropout_is_deterministic_at_the_configured_rates(dataset: Path, fmt: object) -> None:
    from trainer.dropout import ConditionDropout, apply_dropout
    from trainer.records import GEN, TEXT

    rec6, _ = _encoded(dataset, fmt, 6)
    rec5, _ = _encoded(dataset, fmt, 5)
    cfg = ConditionDropout(text=0.1, gen_image=0.3, vit_image=0.2)
    n = 3000
    runs = [apply_dropout(rec6, fmt, cfg, seed=0, stage="1", step=s) for s in range(n)]
    again = [apply_dropout(rec6, fmt, cfg, seed=0, stage="1", step=s) for s in range(n)]
    assert [r.segments for r in runs] == [r.segments for r in again]
    other = [apply_dropout(rec6, fmt, cfg, seed=1, stage="1", step=s).dropped for s in range(n)]
    assert other != [r.dropped for r in runs]
    rate = Counter(d.split()[0] for r in runs for d in r.dropped)
    assert abs(rate["text"] / n - 0.1) < 0.025 and abs(rate["gen"] / n - 0.3) < 0.04
    assert abs(rate["vit"] / n - 0.2) < 0.035
    target = [(s.origin, s.ids) for s in rec6.segments if s.kind == GEN and s.loss]
    for r in runs:
        assert [(s.origin, s.ids) for s in r.segments if s.kind == GEN and s.loss] == target  # targets stay
        if "text" in r.dropped:  # Janus' unconditional branch: BOS, pads, ..., BOI, the target image
            cut = next(i for i, s in enumerate(r.segments) if s.kind == GEN and s.loss) - 1
            texts = [s for s in r.segments[1:cut] if s.kind == TEXT and not s.origin.endswith(("boi", "eoi"))]
            assert texts and all(set(s.ids) == {fmt.pad_id} and not s.loss for s in texts)
            assert r.segments[0].ids == (fmt.bos_id,) and r.segments[cut].ids == (fmt.boi_id,)
        removed = sum(1 for d in r.dropped if d != "text")
        size = {"vit": fmt.num_vit_tokens + 2, "gen": fmt.num_gen_tokens + 2}
        assert rec6.length - r.length == sum(size[d.split()[0]] for d in r.dropped if d != "text")
        assert len(r.segments) == len(rec6.segments) - 3 * removed
    # Text dropout is for image generation only: a record without an image target keeps its text.
    assert not any("text" in apply_dropout(rec5, fmt, cfg, seed=0, stage="1", step=s).dropped for s in range(500))
    assert apply_dropout(rec6, fmt, ConditionDropout(), seed=0, stage="1", step=0) is rec6


def test_bad_config_names_the_field_and_exits_2(tmp_path: Path) -> None:
    import typer
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli_train import train_command

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml").read_text())
    base["stage2"]["modes"]["initial_thinking_generation_learning"] = 0.5
    base["ray"]["num_wokers"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base))
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, ["--config", str(bad), "--data", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "field 'stage2': " in lines[0] and "field 'ray.num_wokers'" in lines[0]


def test_unknown_tiny_model_is_a_config_error_before_anything_loads(tmp_path: Path) -> None:
    """`model: tiny:<unknown>` fails validation, naming the file and the field, like every other config mistake
    (not a ValueError from the model builder inside a Ray worker)."""
    from schemas.config import ConfigError
    from trainer.config import load_train_config

    base = Path(__file__).resolve().parents[1] / "configs" / "train_tiny.yaml"
    for name, reason in [
        ("tiny:llama", "unknown tiny model 'tiny:llama'; known here: tiny:janus"),
        ("tiny:llm", "tiny model 'tiny:llm' cannot serve here; use tiny:janus"),  # a builder's tiny model
    ]:
        with pytest.raises(ConfigError) as err:
            load_train_config(base, {"model": name})
        assert str(err.value) == f"{base}: field 'model': Value error, {reason}"
    assert load_train_config(base, {"model": "org/some-janus"}).model == "org/some-janus"


# What each shipped preset is documented to be (README "Presets", the configs' own headers): the official IRG SFT
# recipe for Janus-Pro (AdamW betas (0.9, 0.95), eps 1e-15, no weight decay, clip 1.0, constant lr 2e-5 after 500
# warm-up steps in stage 1 and none in stage 2, EMA 0.995, stage 2 from stage 1's EMA, ~320K tokens per step as
# token_budget x grad_accum x workers), DDP on 8 GPUs for 1B and FSDP2 on 16 for 7B; the tiny preset on CPU.
PRESETS = {
    "train_janus_pro_1b.yaml": {
        "model": "deepseek-community/Janus-Pro-1B", "token_budget": 8192, "grad_accum": 5,
        "ray": {"num_workers": 8, "use_gpu": True, "backend": "nccl", "strategy": "ddp"},
    },
    "train_janus_pro_7b.yaml": {
        "model": "deepseek-community/Janus-Pro-7B", "token_budget": 10240, "grad_accum": 2,
        "ray": {"num_workers": 16, "use_gpu": True, "backend": "nccl", "strategy": "fsdp"},
    },
    "train_tiny.yaml": {
        "model": "tiny:janus", "ray": {"num_workers": 2, "use_gpu": False, "backend": "gloo", "strategy": "ddp"},
    },
}  # fmt: skip
OFFICIAL = {
    "betas": (0.9, 0.95), "adam_eps": 1e-15, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "auto",
    "ema": {"enabled": True, "decay": 0.995, "stage2_from_ema": True},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shipped_configs_are_the_documented_presets(name: str) -> None:
    from trainer.config import load_train_config

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / name)
    dump = cfg.model_dump()
    for key, want in PRESETS[name].items():
        got = {k: dump[key][k] for k in want} if isinstance(want, dict) else dump[key]
        assert got == want, f"{name}: {key}"
    # Stage 1: all six modes, full modes 1.0, thinking modes 0.5; stage 2: the two full modes at 1.0.
    assert cfg.stage1.active_modes() == {m.name: (1.0 if m.full else 0.5) for m in MODES}, name
    assert cfg.stage2.active_modes() == dict.fromkeys(FULL_MODES, 1.0), name
    assert cfg.stage1.steps > cfg.stage1.warmup_steps and cfg.stage2.steps > cfg.stage2.warmup_steps
    assert cfg.data_streams % max(cfg.loader_workers, 1) == 0
    if name == "train_tiny.yaml":
        return
    for key, want in OFFICIAL.items():
        got = {k: dump[key][k] for k in want} if isinstance(want, dict) else dump[key]
        assert got == want, f"{name}: {key}"
    for stage, warmup, steps in ((cfg.stage1, 500, 20_000), (cfg.stage2, 0, 5_000)):
        assert (stage.lr, stage.schedule, stage.warmup_steps, stage.steps) == (2e-5, "constant", warmup, steps), name
    assert cfg.token_budget * cfg.grad_accum * cfg.ray.num_workers == 327_680, name  # ~320K tokens per step
