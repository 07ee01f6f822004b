"""`irgl report OUT`: a self-contained HTML page (`OUT/report.html`, images embedded) about one build.

What it shows: the funnel (prompts -> each stage -> accepted -> in the dataset), the curation filters, records per
mode, histograms of the CLIP scores of I1, I2 and their difference, sample trajectories side by side (prompt, T1,
I1, T2 with its sections, I2), per-stage throughput and time, and the cost per kept trajectory in stage-seconds
(GPU-seconds where stages hold GPUs).
Everything is read back from OUT (manifest, trajectories, rejects, state); nothing is recomputed from models.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.card import CURATION_FILTERS
from pipeline.fsio import write_atomic
from schemas.reflection import HEADINGS, ReflectionError, parse_reflection, strip_think
from schemas.stages import STAGE_NAMES, stage_info, stage_order

REPORT_NAME = "report.html"

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{margin:0 0 4px} h2{margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left} .bar{background:#2f81f7;height:14px;display:inline-block}
.muted{color:#57606a} .grid{display:grid;grid-template-columns:1fr 1fr 1fr 1fr 1fr;gap:10px;align-items:start}
.cell{border:1px solid #d0d7de;padding:8px;font-size:12px;overflow-wrap:anywhere;max-height:360px;overflow:auto}
.cell img{width:100%;image-rendering:pixelated} .hist{display:inline-block;margin-right:24px}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace;font-size:11px} .sec{font-weight:600}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _img(data: bytes) -> str:
    kind = "png" if data[:4] == b"\x89PNG" else "jpeg"
    return f'<img alt="" src="data:image/{kind};base64,{base64.b64encode(data).decode("ascii")}">'


def _histogram(values: list[float], title: str, bins: int = 20) -> str:
    """An inline SVG histogram (no plotting library needed)."""
    w, h = 320, 120
    if not values:
        return f'<div class="hist"><b>{_e(title)}</b><p class="muted">no values</p></div>'
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / span * bins), bins - 1)] += 1
    top = max(counts)
    bw = w / bins
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - c / top * (h - 4):.1f}" width="{bw - 1:.1f}" height="{c / top * (h - 4):.1f}"'
        f' fill="#2f81f7"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    return (
        f'<div class="hist"><b>{_e(title)}</b> <span class="muted">n={len(values)}</span><br>'
        f'<svg width="{w}" height="{h}" role="img">{bars}</svg>'
        f'<div class="muted">{lo:.4f} &hellip; {hi:.4f}</div></div>'
    )


def _reflection_html(t2: str) -> str:
    try:
        r = parse_reflection(t2)
    except ReflectionError:
        return f"<pre>{_e(t2)}</pre>"
    parts = [f"<pre>{_e(r.opening)}</pre>"]
    for heading, body in zip(HEADINGS, (r.improvements, r.guidance, r.final_prompt), strict=True):
        parts.append(f'<div class="sec">{_e(heading.lstrip("# "))}</div><pre>{_e(body)}</pre>')
    return "".join(parts)


def _think_html(t1: str) -> str:
    try:
        return f"<pre>{_e(strip_think(t1))}</pre>"
    except ReflectionError:
        return f"<pre>{_e(t1)}</pre>"


def _num_gpus(config: dict[str, Any], stage: str) -> float:
    """GPUs per actor of `stage` in a build's config dump (the registry says which section holds its resources)."""
    attr = stage_info(stage).config_attr if stage in STAGE_NAMES else None
    return float(((config.get(attr) or {}).get("resources") or {}).get("num_gpus", 0.0)) if attr else 0.0


def collect(out: Path, samples: int = 8) -> dict[str, Any]:
    """Everything the page shows, as plain data (also handy for tests and notebooks)."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    state = json.loads((out / "state" / "build.json").read_text(encoding="utf-8"))
    build = manifest.get("build", {})
    clip1, clip2, timings, sample_rows = [], [], Counter(), []
    files = sorted((out / "trajectories").glob("unit-*.parquet"))
    for path in files:
        # Two small columns per trajectory; images are read only for the few sample rows below.
        table = pq.read_table(path, columns=["scores", "timings"])
        for scores_json, timings_json in zip(table.column("scores").to_pylist(), table.column("timings").to_pylist(),
                                             strict=True):  # fmt: skip
            scores = json.loads(scores_json)
            clip1.append(scores["clip_i1"])
            clip2.append(scores["clip_i2"])
            timings.update(json.loads(timings_json))
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            if len(sample_rows) >= samples:
                break
            sample_rows.extend(pf.read_row_group(g).to_pylist()[: samples - len(sample_rows)])
    for path in sorted((out / "rejects").glob("unit-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            timings.update(json.loads(line).get("timings") or {})
    kept = len(clip1)
    # The time table follows the build's stage order (rows of different units record their stages in any order).
    order = {s.name: i for i, s in enumerate(stage_order(state["config"].get("strategy") or "forward"))}
    timings = Counter(dict(sorted(timings.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))))
    gpus = {name: _num_gpus(state["config"], name) for name in timings}
    return {
        "name": state["config"].get("name", "irgl"),
        "strategy": state["config"].get("strategy"),
        "prompts": build.get("prompts", {}),
        "stages": {s["stage"]: s for s in build.get("stages", [])},
        "curation": build.get("curation") or {},
        "in_dataset": manifest["trajectories"],
        "modes": manifest["counts"],
        "kept": kept,
        "clip_i1": clip1,
        "clip_i2": clip2,
        "stage_seconds": dict(timings),
        "stage_gpus": gpus,
        "samples": sample_rows,
    }


def render(data: dict[str, Any]) -> str:
    p = data["prompts"]
    stages = data["stages"]
    kept = data["kept"]
    funnel = [("prompts read", p.get("read", 0)), ("prompts kept", p.get("kept", 0))]
    funnel += [(f"{name} ok", c["ok"]) for name, c in stages.items()]
    funnel.append(("in the dataset (after the I2 near-duplicates)", data.get("in_dataset", kept)))
    top = max([n for _, n in funnel] + [1])
    funnel_rows = "".join(
        f'<tr><td>{_e(label)}</td><td>{n}</td><td style="text-align:left"><span class="bar" '
        f'style="width:{300 * n / top:.0f}px"></span></td></tr>'
        for label, n in funnel
    )
    # `capped` (failed rows whose text reached a section's cap) is absent from manifests built before it was counted.
    stage_rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{c['in']}</td><td>{c['ok']}</td><td>{c['filtered']}</td><td>{c['failed']}</td>"
        f"<td>{c.get('capped', 0)}</td></tr>"
        for name, c in stages.items()
    )
    dropped = ", ".join(f"{_e(k)}={v}" for k, v in sorted((p.get("dropped") or {}).items())) or "none"
    curation_rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{_e(f.get('model') or '') if f.get('enabled') else 'off'}</td>"
        f"<td>{_e(f.get('rule') or f.get('threshold', ''))}</td><td>{f.get('checked', '')}</td>"
        f"<td>{f.get('removed', 0)}</td></tr>"
        for name, f in ((n, data.get("curation", {}).get(n)) for n in CURATION_FILTERS)
        if f
    )
    mode_rows = "".join(f"<tr><td>{_e(m)}</td><td>{n}</td></tr>" for m, n in data["modes"].items())
    secs = data["stage_seconds"]
    total = sum(secs.values())
    gpu_total = sum(secs[s] * (data["stage_gpus"].get(s) or 0) for s in secs)
    time_rows = ""
    for name, sec in secs.items():
        rows_in = stages.get(name, {}).get("in", 0)
        rate = f"{rows_in / sec:.2f}" if sec > 0 else "-"
        gpus = data["stage_gpus"].get(name) or 0
        time_rows += f"<tr><td>{_e(name)}</td><td>{sec:.1f}</td><td>{rate}</td><td>{gpus:g}</td></tr>"
    cost = (
        f"<p><b>cost per kept trajectory:</b> {total / kept:.2f} stage-seconds"
        + (f", {gpu_total / kept:.2f} GPU-seconds" if gpu_total else " (no GPU stages)")
        + f" over {kept} kept trajectories</p>"
        if kept
        else "<p>no trajectory was kept</p>"
    )
    diffs = [b - a for a, b in zip(data["clip_i1"], data["clip_i2"], strict=True)]
    hist = (
        _histogram(data["clip_i1"], "CLIP(prompt, I1)")
        + _histogram(data["clip_i2"], "CLIP(prompt, I2)")
        + _histogram(diffs, "CLIP(I2) - CLIP(I1)")
    )
    cells = ""
    for row in data["samples"]:
        cells += (
            f'<div class="cell"><b>prompt</b><pre id="prompt-{_e(row["id"])}">{_e(row["prompt"])}</pre></div>'
            f'<div class="cell"><b>T1</b>{_think_html(row["t1"])}</div>'
            f'<div class="cell"><b>I1</b>{_img(row["i1"])}</div>'
            f'<div class="cell"><b>T2</b>{_reflection_html(row["t2"])}</div>'
            f'<div class="cell"><b>I2</b>{_img(row["i2"])}</div>'
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>irgl report: {_e(data["name"])}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(data["name"])}</h1>
<div class="muted">strategy: {_e(data["strategy"])} &middot; kept trajectories: <b id="kept">{kept}</b></div>
<h2>Funnel</h2><table id="funnel">{funnel_rows}</table>
<p class="muted">prompts dropped: {dropped}</p>
<table id="stages"><tr><th>stage</th><th>in</th><th>ok</th><th>filtered</th><th>failed</th>
<th title="failed rows whose text reached a section's character cap">of which capped</th></tr>{stage_rows}</table>
<h2>Curation</h2><table id="curation"><tr><th>filter</th><th>model</th><th>threshold / rule</th><th>checked</th>
<th>removed</th></tr>{curation_rows or '<tr><td colspan="5">not recorded</td></tr>'}</table>
<h2>Records per mode</h2><table id="modes"><tr><th>mode</th><th>records</th></tr>{mode_rows}</table>
<h2>CLIP scores</h2>{hist}
<h2>Time</h2>
<table id="time"><tr><th>stage</th><th>stage-seconds</th><th>rows/s per actor</th><th>GPUs per actor</th></tr>
{time_rows}</table>{cost}
<h2>Samples</h2><div class="grid">{cells or '<p class="muted">no trajectory was kept</p>'}</div>
</body></html>
"""


def write_report(out: Path, samples: int = 8) -> Path:
    """Render `OUT/report.html` from the build at `out`; returns its path."""
    out = Path(out)
    path = out / REPORT_NAME
    write_atomic(path, render(collect(out, samples)).encode("utf-8"))
    return path
