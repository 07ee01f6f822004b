"""Trainer data side without Ray: flags -> segments/masks per mode, skipping too-long records, the deterministic
mixed and packed order, and config errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.conversation import conversation_from_json
from schemas.modes import FULL_MODES, MODES

T, V, G = "text", "vit", "gen"
# Expected spans per mode: (origin, kind, loss). "content" marks a part's own text (checked against the tokenizer).
HEAD = [("bos", T, False), ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False)]
EXPECTED = {
    1: [
        ("bos", T, False), ("turn 0", T, False),
        ("turn 0 part 0 boi", T, False), ("turn 0 part 0", V, False), ("turn 0 part 0 eoi", T, False),
        ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False), ("turn 2 part 0", T, True),
        ("turn 2", T, True),
    ],
    2: [*HEAD, ("turn 2 part 0", T, True), ("turn 2", T, True)],
    3: [
        *HEAD, ("turn 2 part 0", T, True),
        ("turn 2 part 1 boi", T, True), ("turn 2 part 1", G, True), ("turn 2 part 1 eoi", T, False),
        ("turn 2", T, True),
    ],
    4: [
        ("bos", T, False), ("turn 0", T, False),
        ("turn 0 part 0 boi", T, False), ("turn 0 part 0", V, False), ("turn 0 part 0 eoi", T, False),
        ("turn 0 part 1 boi", T, False), ("turn 0 part 1", V, False), ("turn 0 part 1 eoi", T, False),
        ("turn 0", T, False), ("turn 1", T, False), ("turn 2", T, False), ("turn 2 part 0", T, True),
        ("turn 2", T, True),
    ],
    5: [
        *HEAD, ("turn 2 part 0", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", V, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", G, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 2", T, True), ("turn 2", T, True),
    ],
    6: [
        *HEAD, ("turn 2 part 0", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", V, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 1 boi", T, False), ("turn 2 part 1", G, False), ("turn 2 part 1 eoi", T, False),
        ("turn 2 part 2", T, True),
        ("turn 2 part 3 boi", T, True), ("turn 2 part 3", G, True), ("turn 2 part 3 eoi", T, False),
        ("turn 2", T, True),
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.shards import write_dataset
    from pipeline.synthetic import synthetic_trajectories

    out = tmp_path_factory.mktemp("trainer-data-unit") / "ds"
    write_dataset(out, synthetic_trajectories(3))
    return out


@pytest.fixture(scope="module")
def fmt() -> object:
    from trainer.model import load_adapter
    from trainer.tiny_janus import resolve_model

    return load_adapter("janus", resolve_model("tiny:janus")).sequence_format()


def _row(dataset: Path, mode: str) -> dict:
    import pyarrow.parquet as pq

    files = sorted((dataset / "data" / mode).glob("*.parquet"))
    return pq.read_table(files[0]).to_pylist()[0]


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6])
def test_masks_follow_flags_span_by_span(dataset: Path, fmt: object, number: int) -> None:
    import base64

    from trainer.data import GEN, TEXT, VIT, collate, encode_conversation

    mode = MODES[number - 1].name
    row = _row(dataset, mode)
    turns = conversation_from_json(row["conversation"])
    rec = encode_conversation(turns, fmt, record_id=row["id"], mode=mode, resolve=base64.b64decode)
    assert [(s.origin, s.kind, s.loss) for s in rec.segments] == EXPECTED[number]
    batch = collate([rec])
    labels = batch.text_labels[0].tolist()
    target = batch.image_target[0].tolist()
    ids = batch.input_ids[0].tolist()
    assert batch.position_ids[0].tolist() == list(range(len(ids)))
    pos = 0
    for seg in rec.segments:
        span = range(pos, pos + len(seg.ids))
        assert ids[pos : pos + len(seg.ids)] == list(seg.ids)
        if seg.kind == TEXT:
            want = list(seg.ids) if seg.loss else [-100] * len(seg.ids)
            assert [labels[i] for i in span] == want, seg.origin
            assert not any(target[i] for i in span)
            t, _, rest = seg.origin.partition(" part ")
            if rest.isdigit():  # a text part: exactly its tokens, with its own need_loss
                part = turns[int(t.split()[1])]["content"][int(rest)]
                assert list(seg.ids) == fmt.tokenize(part["content"])
                assert seg.loss == part["need_loss"]
        else:
            n = fmt.num_vit_tokens if seg.kind == VIT else fmt.num_gen_tokens
            assert len(seg.ids) == n and all(labels[i] == -100 for i in span)
            assert [target[i] for i in span] == [seg.kind == GEN and seg.loss] * n
        pos += len(seg.ids)
    assert pos == len(ids)
    # User turns never carry loss; images: vit slots match the need_vit images, gen slots the vae/loss ones.
    parts = [p for t in turns if t["role"] == "assistant" for p in t["content"] if p["type"] == "image"]
    assert batch.vit_positions.shape[0] == sum(p["need_vit"] for p in parts)
    assert batch.gen_positions.shape[0] == sum(p["need_vae"] or p["need_loss"] for p in parts)
    assert int(batch.image_target.sum()) == fmt.num_gen_tokens * sum(p["need_loss"] for p in parts)
    assert (number in (3, 6)) == (mode in FULL_MODES)


def test_too_long_records_are_skipped_and_counted(dataset: Path, fmt: object) -> None:
    from trainer.data import build_index, pack_stream

    full = build_index(dataset, [m.name for m in MODES], fmt, token_budget=100_000)
    lengths = {e.id: e.length for es in full.entries.values() for e in es}
    budget = sorted(lengths.values())[len(lengths) // 2]  # about half of the records do not fit
    index = build_index(dataset, [m.name for m in MODES], fmt, token_budget=budget)
    too_long = {i for i, n in lengths.items() if n > budget}
    assert too_long and set(index.skipped_ids) == too_long
    assert all(index.skipped_ids[i] == f"too_long: {lengths[i]} tokens > budget {budget}" for i in too_long)
    assert sum(index.skipped.values()) == len(too_long)
    assert sum(index.counts().values()) == len(lengths) - len(too_long)
    weights = {m.name: 1.0 for m in MODES}
    stream = pack_stream(index, weights, budget, seed=0, stage="1")
    packs = [next(stream) for _ in range(50)]
    assert all(p.tokens <= budget for p in packs)
    assert not {e.id for p in packs for e in p.entries} & too_long


def test_order_is_deterministic_and_weighted(dataset: Path, fmt: object) -> None:
    from collections import Counter

    from trainer.data import build_index, record_stream, worker_packs

    index = build_index(dataset, [m.name for m in MODES], fmt, token_budget=2048)
    weights = {m.name: (1.0 if m.full else 0.5) for m in MODES}

    def ids(seed: int) -> list[str]:
        stream = record_stream(index, weights, seed, "1")
        return [next(stream).id for _ in range(2000)]

    assert ids(0) == ids(0) and ids(0) != ids(1)
    counts = Counter(i.rsplit("_m", 1)[1] for i in ids(0))
    assert 0.4 < counts["2"] / counts["3"] < 0.6  # weight 0.5 vs 1.0
    # Worker r of W takes every W-th pack; starting at step s skips exactly s steps' packs.
    kwargs = {"world_size": 2, "grad_accum": 2}
    full = worker_packs(index, weights, 2048, 0, "1", rank=1, **kwargs)
    steps = [next(full) for _ in range(6)]
    assert [p.index for p in steps[0][1]] == [1, 3]
    later = worker_packs(index, weights, 2048, 0, "1", rank=1, start_step=4, **kwargs)
    step, packs = next(later)
    assert step == 4 and [p.entries for p in packs] == [p.entries for p in steps[4][1]]


def test_webdataset_and_parquet_give_the_same_records(dataset: Path, fmt: object) -> None:
    from trainer.data import RecordReader, build_index

    modes = [m.name for m in MODES]
    pq_index = build_index(dataset, modes, fmt, 4096, "parquet")
    wds_index = build_index(dataset, modes, fmt, 4096, "webdataset")
    reader = RecordReader(fmt)
    for mode in modes:
        a = {e.id: reader.read(e) for e in pq_index.entries[mode]}
        b = {e.id: reader.read(e) for e in wds_index.entries[mode]}
        assert sorted(a) == sorted(b) and len(a) == 3
        for rid in a:
            assert a[rid].segments == b[rid].segments and a[rid].images == b[rid].images


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


def test_shipped_configs_validate() -> None:
    from trainer.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("train_tiny.yaml", "train_janus_pro_1b.yaml", "train_janus_pro_7b.yaml"):
        cfg = load_train_config(root / name)
        assert set(cfg.stage2.active_modes()) == set(FULL_MODES)
        assert cfg.stage1.modes["initial_full_learning"] == 1.0
        assert json.dumps(cfg.model_dump())
