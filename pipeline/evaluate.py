"""`irgl eval DIR`: does reflection help? CLIP prompt alignment of I1 and I2, and GenEval's folder layout.

DIR is an `irgl generate` output (`generations.parquet`) or a built dataset (grading the data itself: its
`trajectories/*.parquet`, or for a downloaded one the mode-6 records `data/improving_full_learning/*.parquet`).
Per prompt: CLIP(prompt, I1), CLIP(prompt, I2) with the builder's scorer (`stages.engines.clip`, any open_clip
model or `tiny:clip`); overall and per tag (the prompt file's "tag", e.g. GenEval's categories): the
mean of both, the mean gain CLIP(I2) - CLIP(I1) and the share of prompts where I2 beats I1; with a VLM
(`--vlm`, through the builder's text engine: vLLM), the build's judge (schemas/judge.py: I1 and I2 in one request,
a JSON answer forced by a structured output): the shares of I1s and of I2s it says satisfy the prompt and of prompts
where it finds I2 better (with I1 only: a yes/no per image). Written to
`OUT/eval.json` (and `OUT/scores.jsonl`, one line per prompt) and printed as a table.

GenEval (github.com/djghosh13/geneval) scores images with an object detector in its own environment (mmdet); this
writes its input layout for each turn, `OUT/geneval/turn1/<index>/metadata.jsonl` (the prompt file's metadata line)
and `OUT/geneval/turn1/<index>/samples/0000.png`, and the same under `turn2/`. Then, in GenEval's environment:

    python evaluation/evaluate_images.py OUT/geneval/turn1 --outfile turn1.jsonl --model-path <detector folder>
    python evaluation/summary_scores.py turn1.jsonl        # and the same for turn2

A GenEval run needs the GenEval prompt file (../shared/prompts/geneval_metadata.jsonl: its "tag", "include" and
"exclude" fields); other prompt files get a metadata line with the prompt and an empty tag.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.fsio import write_atomic
from schemas.judge import (
    Judgement,
    JudgementError,
    judge_instruction,
    judge_regex,
    judge_regex_max_chars,
    parse_judgement,
)

EVAL_NAME = "eval.json"
SCORES_NAME = "scores.jsonl"
GENEVAL_DIR = "geneval"


class EvalError(ValueError):
    """Bad input found before any model loads."""


def load_rows(directory: Path) -> tuple[str, list[dict[str, Any]]]:
    """("generate" | "dataset", rows with index, id, prompt, tag, metadata, i1, i2 (b'' when absent))."""
    from pipeline.generate import RESULTS_NAME

    directory = Path(directory)
    if (directory / RESULTS_NAME).is_file():
        cols = ["index", "id", "prompt", "tag", "metadata", "i1", "i2"]
        return "generate", pq.read_table(directory / RESULTS_NAME, columns=cols).to_pylist()
    parts = sorted((directory / "trajectories").glob("unit-*.parquet"))
    if parts:
        rows = []
        for part in parts:
            for r in pq.read_table(part, columns=["id", "prompt", "i1", "i2"]).to_pylist():
                meta = json.dumps({"prompt": r["prompt"], "tag": ""})
                rows.append({**r, "index": len(rows), "tag": "", "metadata": meta})
        return "dataset", rows
    # A published (or synth) dataset has no trajectories/: mode 6 records hold the prompt, I1 and I2.
    shards = sorted((directory / "data" / "improving_full_learning").glob("*.parquet"))
    if shards:
        import base64

        from schemas.conversation import conversation_from_json

        rows = []
        for shard in shards:
            for r in pq.read_table(shard, columns=["id", "prompt", "conversation"]).to_pylist():
                parts = conversation_from_json(r["conversation"])[-1]["content"]
                images = [p for p in parts if p["type"] == "image"]
                i1 = next(base64.b64decode(p["content"]) for p in images if p["need_vae"])
                i2 = next(base64.b64decode(p["content"]) for p in images if p["need_loss"])
                meta = json.dumps({"prompt": r["prompt"], "tag": ""})
                rows.append({"id": r["id"], "prompt": r["prompt"], "i1": i1, "i2": i2, "index": len(rows),
                             "tag": "", "metadata": meta})  # fmt: skip
        return "dataset", rows
    raise EvalError(
        f"{directory}: neither an irgl generate output ({RESULTS_NAME}) nor a built dataset (trajectories/ or "
        "data/improving_full_learning/)"
    )


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """n, mean CLIP of I1 and I2, mean gain and share of I2 > I1 over scored rows (I2 figures only with I2)."""
    scored = [r for r in rows if r.get("clip_i1") is not None]
    out: dict[str, Any] = {"n": len(scored)}
    if not scored:
        return out
    out["clip_i1"] = sum(r["clip_i1"] for r in scored) / len(scored)
    with_i2 = [r for r in scored if r.get("clip_i2") is not None]
    if with_i2:
        out["clip_i2"] = sum(r["clip_i2"] for r in with_i2) / len(with_i2)
        out["gain"] = sum(r["clip_i2"] - r["clip_i1"] for r in with_i2) / len(with_i2)
        out["i2_beats_i1"] = sum(r["clip_i2"] > r["clip_i1"] for r in with_i2) / len(with_i2)
    for key in ("vlm_i1", "vlm_i2"):
        judged = [r[key] for r in rows if r.get(key) is not None]
        if judged:
            out[f"{key}_yes"] = sum(judged) / len(judged)
    compared = [r["vlm_better"] for r in rows if r.get("vlm_better") is not None]
    if compared:
        out["vlm_i2_better"] = sum(b == "2" for b in compared) / len(compared)
    return out


#: The VLM judge's question for a single image (only I1 was generated); its answer is exactly "yes" or "no". With
#: I1 and I2 the build's judge (schemas/judge.py) is asked instead: both images in one request.
JUDGE_QUESTION = 'Does this image match the request "{prompt}" (objects, counts, colours, positions)? Answer yes or no.'
JUDGE_REGEX = "(yes|no)"
#: The reason budget of the judge's answer in irgl eval (one short sentence).
JUDGE_REASON_CHARS = 120


def _model_context(model: str) -> int | None:
    """The longest context a model's config declares (its text model's max_position_embeddings); None if unknown."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # not loadable here (offline Hub id, ...): vLLM will say what is wrong
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def judge_pairs(engine: Any, rows: list[dict[str, Any]]) -> list[Judgement | None]:
    """The build's VLM judge on each row's I1 and I2 in one request (schemas/judge.py: does each satisfy the prompt,
    which is better, why; the JSON answer forced by its regex; greedy, seed 0). None for a row without both images
    or whose answer does not parse."""
    from stages.engines.text import TextRequest

    todo = [k for k, r in enumerate(rows) if r["i1"] and r["i2"]]
    requests = [
        TextRequest(
            prompt=judge_instruction(rows[k]["prompt"], JUDGE_REASON_CHARS),
            images=[rows[k]["i1"], rows[k]["i2"]],
            regex=judge_regex(JUDGE_REASON_CHARS),
        )
        for k in todo
    ]
    answers: list[Judgement | None] = [None] * len(rows)
    for k, text in zip(todo, engine.generate(requests) if requests else [], strict=True):
        try:
            answers[k] = parse_judgement(str(text))
        except JudgementError:
            continue  # counted as not judged (the shares are over the judged rows)
    return answers


def judge(engine: Any, rows: list[dict[str, Any]], key: str) -> list[bool | None]:
    """The VLM's yes/no per image `key` (vLLM structured output: the answer can only be yes or no; greedy, seed 0).
    None for a row without that image or whose request failed."""
    from stages.engines.text import TextRequest

    todo = [k for k, r in enumerate(rows) if r[key]]
    requests = [
        TextRequest(prompt=JUDGE_QUESTION.format(prompt=rows[k]["prompt"]), images=[rows[k][key]], regex=JUDGE_REGEX)
        for k in todo
    ]
    answers: list[bool | None] = [None] * len(rows)
    for k, text in zip(todo, engine.generate(requests) if requests else [], strict=True):
        word = str(text).strip().lower()
        answers[k] = True if word.startswith("yes") else False if word.startswith("no") else None
    return answers


def write_geneval(out: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """GenEval's input layout for each turn that has images: `<turn>/<index:05d>/metadata.jsonl` and
    `samples/0000.png`. Returns turn -> folder."""
    folders = {}
    for turn, key in (("turn1", "i1"), ("turn2", "i2")):
        present = [r for r in rows if r[key]]
        if not present:
            continue
        root = out / GENEVAL_DIR / turn
        for r in present:
            folder = root / f"{r['index']:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            meta = json.loads(r["metadata"])
            meta.setdefault("tag", r["tag"])
            meta.setdefault("prompt", r["prompt"])
            write_atomic(folder / "metadata.jsonl", (json.dumps(meta, ensure_ascii=False) + "\n").encode())
            write_atomic(folder / "samples" / "0000.png", _png(r[key]))
        folders[turn] = str(root)
    return folders


def _png(data: bytes) -> bytes:
    """GenEval reads samples/NNNN.png: PNG bytes as they are, anything else re-encoded."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    import io

    from schemas.local import decode_rgb

    buf = io.BytesIO()
    decode_rgb(data).save(buf, format="PNG")
    return buf.getvalue()


def evaluate(
    directory: Path,
    out: Path | None = None,
    *,
    clip: str = "ViT-L-14",
    pretrained: str = "openai",
    device: str = "auto",
    force: bool = False,
    echo: Callable[[str], None] = print,
    scorer: Any = None,
    vlm: str | None = None,
    judge_engine: Any = None,
) -> dict[str, Any]:
    """Score DIR (see the module doc); returns what eval.json holds (plus "out")."""
    from pydantic import ValidationError

    from schemas.config import ScoreConfig, TextModelConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise EvalError(f"{directory}: no such directory")
    kind, rows = load_rows(directory)
    out = Path(out) if out is not None else directory / "eval"
    if (out / EVAL_NAME).is_file() and not force:
        raise EvalError(f"{out / EVAL_NAME} exists: pass --force to overwrite it, or choose another --out")
    if scorer is None:
        from stages.engines.clip import ClipScorer
        from stages.tiny import resolve_score

        try:
            cfg = resolve_score(ScoreConfig(model=clip, pretrained=pretrained))
        except ValidationError as exc:
            raise EvalError(f"--clip {clip}: {exc.errors()[0]['msg']}") from exc
        scorer = ClipScorer(cfg, device=device)
        scorer.setup()
    if (out / GENEVAL_DIR).is_dir():
        shutil.rmtree(out / GENEVAL_DIR)
    echo(f"scoring {len(rows)} prompts of {directory} ({kind}) with CLIP {clip}")
    prompts = [r["prompt"] for r in rows]
    first = [r["i1"] for r in rows]
    has_i2 = all(r["i2"] for r in rows)
    second = [r["i2"] for r in rows] if has_i2 else first
    per_row = []
    for r, score in zip(rows, scorer.score_pairs(prompts, first, second), strict=True):
        item = {"index": r["index"], "id": r["id"], "prompt": r["prompt"], "tag": r["tag"]}
        if isinstance(score, Exception):
            item["error"] = str(score)
        else:
            item["clip_i1"] = score[0]
            if has_i2:
                item.update(clip_i2=score[1], gain=score[1] - score[0], clip_i1_i2=score[2])
        per_row.append(item)
    if vlm is not None and judge_engine is None:
        from stages.engines.text import make_text_engine
        from stages.tiny import resolve_text

        try:
            # Room for the judge's longest JSON answer at >= 1 character per token, 4x (the stages' rule).
            budget = 4 * judge_regex_max_chars(JUDGE_REASON_CHARS)
            text_cfg = resolve_text(TextModelConfig(model=vlm, max_tokens=budget, temperature=0.0, max_images=2))
        except ValidationError as exc:
            raise EvalError(f"--vlm {vlm}: {exc.errors()[0]['msg']}") from exc
        # The context: the config's default, unless the model's own is shorter (vLLM refuses a longer one).
        context = _model_context(text_cfg.model)
        if context is not None and context < text_cfg.max_model_len:
            text_cfg = text_cfg.model_copy(update={"max_model_len": context})
        judge_engine = make_text_engine(text_cfg)
        judge_engine.setup()
    if judge_engine is not None:
        name = vlm or getattr(judge_engine, "model_name", "")
        if has_i2:
            echo(f"asking the VLM judge {name} (I1 and I2 side by side: does each satisfy the prompt, which is better)")
            for item, j in zip(per_row, judge_pairs(judge_engine, rows), strict=True):
                if j is not None:
                    item.update(vlm_i1=j.i1_satisfies, vlm_i2=j.i2_satisfies, vlm_better=j.better, vlm_reason=j.reason)
        else:
            echo(f"asking the VLM judge {name} (yes/no per image)")
            for item, answer in zip(per_row, judge(judge_engine, rows, "i1"), strict=True):
                if answer is not None:
                    item["vlm_i1"] = answer
    tags = sorted({r["tag"] for r in per_row if r["tag"]})
    report: dict[str, Any] = {
        "source": str(directory),
        "kind": kind,
        "clip": getattr(scorer, "model_name", clip),
        "vlm": vlm or (getattr(judge_engine, "model_name", None) if judge_engine is not None else None),
        "turns": 2 if has_i2 else 1,
        "overall": summarize(per_row),
        "per_tag": {tag: summarize([r for r in per_row if r["tag"] == tag]) for tag in tags},
        "errors": [f"{r['id']}: {r['error']}" for r in per_row if "error" in r],
    }
    report["geneval"] = write_geneval(out, rows)
    report["geneval_command"] = (
        "python evaluation/evaluate_images.py OUT/geneval/turnN --outfile turnN.jsonl --model-path DETECTOR_DIR; "
        "python evaluation/summary_scores.py turnN.jsonl (in GenEval's own environment)"
    )
    write_atomic(out / SCORES_NAME, "".join(json.dumps(r) + "\n" for r in per_row).encode())
    write_atomic(out / EVAL_NAME, json.dumps(report, indent=2, sort_keys=True).encode())
    report["out"] = str(out)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The console table: one line overall, one per tag."""
    vlm = "vlm_i1_yes" in report["overall"]
    head = f"{'tag':<16} {'n':>5} {'CLIP I1':>8} {'CLIP I2':>8} {'gain':>8} {'I2 > I1':>8}"
    head += f" {'VLM I1':>7} {'VLM I2':>7} {'VLM I2 better':>13}" if vlm else ""
    lines = [head, "-" * len(head)]

    def line(name: str, s: dict[str, Any]) -> str:
        def f(key: str, fmt: str) -> str:
            return format(s[key], fmt) if key in s else "-"

        return (
            f"{name:<16} {s['n']:>5} {f('clip_i1', '.4f'):>8} {f('clip_i2', '.4f'):>8} {f('gain', '+.4f'):>8} "
            f"{f('i2_beats_i1', '.1%'):>8}"
        ) + (f" {f('vlm_i1_yes', '.1%'):>7} {f('vlm_i2_yes', '.1%'):>7} {f('vlm_i2_better', '.1%'):>13}" if vlm else "")

    lines.append(line("all", report["overall"]))
    lines += [line(tag, s) for tag, s in report["per_tag"].items()]
    if report["errors"]:
        lines.append(f"{len(report['errors'])} prompt(s) not scored: {report['errors'][:3]}")
    return "\n".join(lines)
