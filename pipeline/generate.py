"""`irgl generate`: run a trained Janus export the IRG way (trainer/generate.py) over a prompt file.

Runs on a Ray Data actor pool (one model per actor, batches of prompts) like the builder's model stages, or in a
plain loop in this process (`--executor local`). Resumable by prompt id: each finished batch is written as one
Parquet part (temp name, fsync, rename), and a rerun of the same command skips the prompt ids already in a part.
At the end the parts are merged into `generations.parquet` (prompt order) and `gallery.html` shows every prompt's
T1, I1, T2 and I2 side by side (the images are also files under `images/`).

    DIR/
      generate.json          the run's settings and their hash (a rerun with other settings is refused)
      parts/part-*.parquet   finished batches (resume)
      generations.parquet    one row per prompt: GENERATION_SCHEMA
      images/NNNNN-i1.png    I1 and I2 of prompt NNNNN (its 0-based line in the prompt file)
      gallery.html
      logs/driver.log        Ray's and Ray Data's log lines (the console shows progress only)
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fsio import fsync_rename, write_atomic
from pipeline.logs import Progress
from schemas.local import driver_env

SETTINGS_NAME = "generate.json"
RESULTS_NAME = "generations.parquet"
GALLERY_NAME = "gallery.html"
PARTS_DIR = "parts"
IMAGES_DIR = "images"
LOGS_DIR = "logs"

#: One row per prompt. `index` is the prompt's 0-based line (item) in the prompt file, `metadata` the prompt file's
#: JSON object for the prompt (GenEval's metadata: tag, include, exclude...), `tag` its "tag" field if any. JSON
#: columns: `seeds` (per phase), `timings` (seconds per phase of the prompt's batch), `tokens` (sampled per phase).
GENERATION_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("t1", pa.string(), nullable=False),
        pa.field("i1", pa.binary(), nullable=False),
        pa.field("t2", pa.string(), nullable=False),
        pa.field("i2", pa.binary(), nullable=False),
        pa.field("seeds", pa.string(), nullable=False),
        pa.field("timings", pa.string(), nullable=False),
        pa.field("tokens", pa.string(), nullable=False),
        pa.field("batch_size", pa.int64(), nullable=False),
    ]
)
_JOB_COLUMNS = ("index", "id", "prompt", "tag", "metadata", "seed")


class GenerateError(ValueError):
    """Bad input found before any model loads (prompt file, output directory, settings)."""


@dataclass(frozen=True)
class PromptItem:
    index: int  # 0-based line (or list item) of the prompt file
    id: str
    prompt: str
    tag: str
    metadata: str  # JSON object


def prompt_id(index: int, prompt: str) -> str:
    """`NNNNN-<sha256 of the prompt, 10 hex>`: stable while the file's line and text stay."""
    return f"{index:05d}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:10]}"


def prompt_seed(seed: int, pid: str) -> int:
    """The seed of one prompt: a stable hash of (global seed, prompt id); every phase's seed derives from it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big") & ((1 << 63) - 1)


def read_prompts(path: Path, limit: int | None = None) -> list[PromptItem]:
    """The prompts of a .txt (one per line), .jsonl (one JSON object with "prompt" per line, e.g. GenEval's
    metadata) or .json file (a list of strings or objects). Blank lines are skipped but keep their index, so an
    index is always the line number - 1 (GenEval's folder numbering)."""
    from stages.prompts import normalize

    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"--prompts {path}: no such file")
    suffix = path.suffix.lower()
    raw: list[tuple[int, Any]] = []
    try:
        if suffix == ".json":
            items = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(items, list):
                raise GenerateError(f"{path}: expected a JSON list of prompts or objects")
            raw = list(enumerate(items))
        elif suffix in (".txt", ".jsonl"):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    raw.append((i, json.loads(line) if suffix == ".jsonl" else line))
                except json.JSONDecodeError as exc:
                    raise GenerateError(f"{path}:{i + 1}: not a JSON object ({exc.msg})") from exc
        else:
            raise GenerateError(f"{path}: prompt files are .txt, .jsonl or .json, not '{suffix}'")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerateError(f"{path}: cannot read ({exc})") from exc
    out: list[PromptItem] = []
    for index, item in raw:
        meta = item if isinstance(item, dict) else {"prompt": item}
        text = meta.get("prompt")
        if not isinstance(text, str) or not normalize(text):
            raise GenerateError(f"{path}:{index + 1}: no prompt (a string, or an object with a 'prompt' string)")
        text = normalize(text)
        tag = meta.get("tag")
        out.append(
            PromptItem(
                index=index,
                id=prompt_id(index, text),
                prompt=text,
                tag=tag if isinstance(tag, str) else "",
                metadata=json.dumps(meta, ensure_ascii=False, sort_keys=False),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise GenerateError(f"{path}: no prompts")
    return out


@dataclass
class GenerateOptions:
    """What `irgl generate` was asked to do."""

    model: str  # an export folder (save_pretrained) or tiny:janus
    prompts: Path
    out: Path
    turns: int = 2
    seed: int = 0
    batch_size: int = 8
    executor: str = "ray"  # ray | local
    address: str | None = None
    replicas: int = 1
    gpus_per_replica: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    force: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingConfig fields other than turns


@dataclass
class GenerateResult:
    out: Path
    prompts: int
    ran: int
    skipped: int
    seconds: float
    image_tokens: int
    generate_seconds: float  # summed over batches (all phases)


def settings_of(opts: GenerateOptions) -> dict[str, Any]:
    """The settings a result depends on (their hash guards resume): model, sampling, seed. Not the batch size:
    per-prompt generators make a prompt's outputs independent of its batch (up to batched-kernel rounding)."""
    from trainer.generate import SamplingConfig

    sampling = asdict(SamplingConfig(turns=opts.turns, **opts.sampling))
    return {"model": opts.model, "sampling": sampling, "seed": opts.seed, "dtype": opts.dtype}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def resolve_model_path(model: str) -> str:
    from trainer.tiny_janus import resolve_model

    path = resolve_model(model)
    if not Path(path).is_dir():
        raise GenerateError(f"--model {model}: not a folder (a Janus export written by irgl train, or tiny:janus)")
    if not (Path(path) / "config.json").is_file():
        raise GenerateError(f"--model {model}: no config.json (expected a save_pretrained export)")
    return path


def check_out_dir(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Refuse an OUT that holds something else, or a generate run with other settings (unless --force, which
    removes that run's files and nothing else)."""
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out}: not a directory")
    if not out.is_dir() or not any(p.name != LOGS_DIR for p in out.iterdir()):
        return
    marker = out / SETTINGS_NAME
    if not marker.is_file():
        raise GenerateError(f"--out {out} is not empty and holds no irgl generate run: choose another --out")
    old = json.loads(marker.read_text())
    if old.get("hash") == settings_hash(settings):
        return
    if not force:
        raise GenerateError(
            f"--out {out} holds a generate run with other settings ({old.get('settings')}): use another --out, "
            "or --force to replace it"
        )
    for name in (PARTS_DIR, IMAGES_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RESULTS_NAME, GALLERY_NAME, SETTINGS_NAME):
        (out / name).unlink(missing_ok=True)


def done_ids(out: Path) -> set[str]:
    """The prompt ids in finished parts (complete files only: a part is renamed into place once written)."""
    ids: set[str] = set()
    for part in sorted((out / PARTS_DIR).glob("part-*.parquet")):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def write_part(out: Path, table: pa.Table) -> Path:
    ids = table.column("id").to_pylist()
    name = f"part-{min(table.column('index').to_pylist()):05d}-{hashlib.sha256(''.join(ids).encode()).hexdigest()[:8]}"
    final = out / PARTS_DIR / f"{name}.parquet"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    pq.write_table(table, tmp, compression="zstd")
    fsync_rename(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------------------------
# Running batches: the same function in a Ray actor and in the plain loop


class BatchRunner:
    """One model, loaded once; maps a table of prompts (`_JOB_COLUMNS`) to a table of GENERATION_SCHEMA."""

    def __init__(self, model_path: str, turns: int, sampling: dict[str, Any], device: str, dtype: str) -> None:
        from trainer.generate import IRGGenerator, SamplingConfig

        self.cfg = SamplingConfig(turns=turns, **sampling)
        self.generator = IRGGenerator(model_path, device=device, dtype=dtype)

    def __call__(self, table: pa.Table) -> pa.Table:
        from trainer.generate import PromptJob

        rows = table.to_pylist()
        jobs = [PromptJob(id=r["id"], prompt=r["prompt"], seed=int(r["seed"])) for r in rows]
        results = self.generator.run(jobs, self.cfg)
        out = []
        for row, res in zip(rows, results, strict=True):
            out.append(
                {
                    **{k: row[k] for k in _JOB_COLUMNS},
                    "t1": res.t1, "i1": res.i1, "t2": res.t2, "i2": res.i2,
                    "seeds": json.dumps(res.seeds, sort_keys=True),
                    "timings": json.dumps(res.timings, sort_keys=True),
                    "tokens": json.dumps(res.tokens, sort_keys=True),
                    "batch_size": len(rows),
                }
            )  # fmt: skip
        return pa.Table.from_pylist(out, schema=GENERATION_SCHEMA)


class _GenerateActor(BatchRunner):
    """The Ray Data actor: one model per actor process."""


def _job_table(items: Sequence[PromptItem], seed: int) -> pa.Table:
    rows = [
        {"index": p.index, "id": p.id, "prompt": p.prompt, "tag": p.tag, "metadata": p.metadata,
         "seed": prompt_seed(seed, p.id)}
        for p in items
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=pa.schema([GENERATION_SCHEMA.field(c) for c in _JOB_COLUMNS]))


def run_local(runner: Callable[[pa.Table], pa.Table], jobs: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for start in range(0, jobs.num_rows, batch_size):
        yield runner(jobs.slice(start, batch_size))


def run_ray(opts: GenerateOptions, model_path: str, jobs: pa.Table) -> Iterator[pa.Table]:
    import ray
    import ray.data

    from pipeline.executors import connect_ray

    try:
        connect_ray(opts.address, env=driver_env())
    except ConnectionError as exc:
        raise GenerateError(str(exc)) from exc
    gpus = opts.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    device = opts.device if opts.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own k/N line
    blocks = [jobs.slice(s, opts.batch_size) for s in range(0, jobs.num_rows, opts.batch_size)]
    env = driver_env()
    ds = ray.data.from_arrow(blocks).map_batches(
        _GenerateActor,
        fn_constructor_args=(model_path, opts.turns, opts.sampling, device, opts.dtype),
        batch_format="pyarrow",
        zero_copy_batch=False,
        batch_size=opts.batch_size,
        compute=ray.data.ActorPoolStrategy(size=opts.replicas),
        num_gpus=gpus,
        num_cpus=opts.cpus_per_replica,
        runtime_env={"env_vars": env} if env else None,
    )
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def generate(opts: GenerateOptions, echo: Callable[[str], None] = print) -> GenerateResult:
    """Run (or finish) a generate run into opts.out; see the module doc."""
    started = time.monotonic()
    if opts.turns not in (1, 2):
        raise GenerateError(f"--turns must be 1 or 2, got {opts.turns}")
    try:
        settings = settings_of(opts)
    except (TypeError, ValueError) as exc:
        raise GenerateError(str(exc)) from exc
    items = read_prompts(opts.prompts, opts.limit)
    check_out_dir(opts.out, settings, opts.force)
    model_path = resolve_model_path(opts.model)
    opts.out.mkdir(parents=True, exist_ok=True)
    write_atomic(
        opts.out / SETTINGS_NAME,
        json.dumps({"settings": settings, "hash": settings_hash(settings)}, indent=2, sort_keys=True).encode(),
    )
    done = done_ids(opts.out)
    todo = [p for p in items if p.id not in done]
    echo(f"{len(items)} prompts: {len(items) - len(todo)} already done, {len(todo)} to run ({opts.executor})")
    progress = Progress(len(todo), noun="prompts")
    image_tokens, gen_seconds = 0, 0.0
    if todo:
        jobs = _job_table(todo, opts.seed)
        if opts.executor == "local":
            runner = BatchRunner(model_path, opts.turns, opts.sampling, opts.device, opts.dtype)
            batches = run_local(runner, jobs, opts.batch_size)
        else:
            batches = run_ray(opts, model_path, jobs)
        for table in batches:
            if table.num_rows == 0:
                continue
            write_part(opts.out, table)
            echo(f"generate {progress.advance(table.num_rows)}")
            for tokens in table.column("tokens").to_pylist():
                t = json.loads(tokens)
                image_tokens += t.get("i1", 0) + t.get("i2", 0)
            # Every row of a batch carries the batch's phase times: count each batch once.
            for key in sorted(
                {(r["batch_size"], r["timings"]) for r in table.select(["batch_size", "timings"]).to_pylist()}
            ):
                gen_seconds += sum(json.loads(key[1]).values())
    merge(opts.out, items)
    write_gallery(opts.out)
    return GenerateResult(
        out=opts.out, prompts=len(items), ran=len(todo), skipped=len(items) - len(todo),
        seconds=time.monotonic() - started, image_tokens=image_tokens, generate_seconds=gen_seconds,
    )  # fmt: skip


def merge(out: Path, items: Sequence[PromptItem]) -> pa.Table:
    """Parts -> `generations.parquet` in prompt order, only the prompts of `items` (a part may hold prompts of an
    earlier, larger --limit); images -> `images/`."""
    wanted = {p.id for p in items}
    tables = [pq.read_table(p) for p in sorted((out / PARTS_DIR).glob("part-*.parquet"))]
    if not tables:
        raise GenerateError(f"{out}: no finished batches")
    table = pa.concat_tables([t.cast(GENERATION_SCHEMA) for t in tables])
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row["id"] in wanted:
            rows.setdefault(row["id"], row)
    ordered = sorted(rows.values(), key=lambda r: r["index"])
    result = pa.Table.from_pylist(ordered, schema=GENERATION_SCHEMA)
    tmp = out / f".tmp-{RESULTS_NAME}"
    pq.write_table(result, tmp, compression="zstd", row_group_size=64)
    fsync_rename(tmp, out / RESULTS_NAME)
    images = out / IMAGES_DIR
    images.mkdir(exist_ok=True)
    for row in ordered:
        for name in ("i1", "i2"):
            if row[name]:
                path = images / f"{row['index']:05d}-{name}.png"
                if not path.is_file() or path.stat().st_size != len(row[name]):
                    write_atomic(path, row[name])
    return result


# ----------------------------------------------------------------------------------------------------------------
# Gallery

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{margin:0 0 4px} .muted{color:#57606a}
.row{display:grid;grid-template-columns:1.2fr 2fr 1fr 2fr 1fr;gap:10px;align-items:start;margin:10px 0;
border-top:1px solid #d0d7de;padding-top:10px}
.cell{font-size:12px;overflow-wrap:anywhere;max-height:320px;overflow:auto}
.cell img{width:100%;max-width:384px;image-rendering:pixelated;border:1px solid #d0d7de}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace;font-size:11px}
.head{font-weight:600;background:#f6f8fa}
"""


def write_gallery(out: Path) -> Path:
    """`gallery.html`: one row per prompt (prompt and tag, T1, I1, T2, I2), images from `images/`."""
    table = pq.read_table(out / RESULTS_NAME, columns=["index", "id", "prompt", "tag", "t1", "t2", "i2", "seeds"])
    settings = json.loads((out / SETTINGS_NAME).read_text())["settings"]
    e = html.escape
    rows = []
    for r in table.to_pylist():
        idx = f"{r['index']:05d}"
        i2 = f'<img alt="I2" src="{IMAGES_DIR}/{idx}-i2.png">' if r["i2"] else '<span class="muted">(1 turn)</span>'
        rows.append(
            f'<div class="row" id="p{idx}"><div class="cell"><b>{e(r["prompt"])}</b><br>'
            f'<span class="muted">#{idx} {e(r["tag"])}<br>id {e(r["id"])}</span></div>'
            f'<div class="cell"><pre class="t1">{e(r["t1"])}</pre></div>'
            f'<div class="cell"><img alt="I1" src="{IMAGES_DIR}/{idx}-i1.png"></div>'
            f'<div class="cell"><pre class="t2">{e(r["t2"])}</pre></div>'
            f'<div class="cell">{i2}</div></div>'
        )
    n_images = sum(1 + bool(r["i2"]) for r in table.select(["i2"]).to_pylist())
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>irgl generate: {e(str(out))}</title>"
        f"<style>{_CSS}</style></head><body><h1>irgl generate</h1>"
        f'<p class="muted">model {e(settings["model"])} | <b id="count">{table.num_rows}</b> prompts | '
        f"sampling {e(json.dumps(settings['sampling'], sort_keys=True))} | seed {settings['seed']} | images shown "
        f'<b id="loaded">0</b>/<b id="images">{n_images}</b></p>'
        # Counts the images that really loaded (a missing file shows as a gap in this count).
        "<script>addEventListener('load',()=>{document.getElementById('loaded').textContent="
        "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length})</script>"
        '<div class="row head"><div>prompt</div><div>T1 (thinking)</div><div>I1</div><div>T2 (reflection)</div>'
        f"<div>I2</div></div>{''.join(rows)}</body></html>"
    )
    path = out / GALLERY_NAME
    write_atomic(path, page.encode("utf-8"))
    return path
