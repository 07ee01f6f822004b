"""The dataset card (`README.md`): the one writer of it, for the card `irgl build` writes into OUT and the card
`irgl publish` uploads to the Hub.

YAML `configs:` with one config per mode (`data/<mode>/*.parquet`, a glob: any number of shard files), so that
`datasets.load_dataset(OUT_or_repo, name=<mode>)` loads each mode, plus a description: counts, license, strategy,
models, how to load it with `datasets` and with the official IRG trainer, and how to check it.

    info = dataset_info(out, manifest)       # facts, from a manifest dict and OUT (never from OUT/README.md alone)
    write_card(out, info, include_wds)       # OUT/README.md, loading examples with a local path (irgl build)
    write_card(staged, info, include_wds, repo_id)  # the Hub card: the same text with the repo id (irgl publish)
    card_text(info, repo_id, include_wds)    # the text itself (publish sizes and hashes it before staging)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.fsio import write_atomic
from schemas.modes import MODES

CARD_NAME = "README.md"
MANIFEST_NAME = "manifest.json"

#: The config loaded by `datasets.load_dataset(OUT)` without a name: the whole trajectory (T1, I1, T2, I2).
DEFAULT_MODE = "improving_full_learning"

#: Conditions -> supervised targets of each mode (docs/IRGL_FORMAT.md), for the card.
MODE_SUMMARY = {
    1: "I2 (ViT), query quoting T_in -> T1",
    2: "system prompt, T_in -> T1",
    3: "system prompt, T_in -> T1, I2",
    4: "I1, I2 (ViT), query quoting T_in -> T2",
    5: "system prompt, T_in, T1, I1 -> T2",
    6: "system prompt, T_in, T1, I1 -> T2, I2",
}

#: Where the card's examples point when it is not written for a Hub repo (the card in OUT).
LOCAL_PATH = "path/to/OUT"


def _front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Split a card into its YAML metadata and body ({} when it has none or it does not parse)."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            try:
                meta = yaml.safe_load(text[4:end]) or {}
            except yaml.YAMLError:
                meta = {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4 :]
    return {}, text


def _first_record(out: Path, files: list[dict[str, Any]]) -> dict[str, Any] | None:
    """strategy, models and images of the first record of the first non-empty Parquet file the manifest lists."""
    import pyarrow.parquet as pq

    for f in files:
        if f.get("format") != "parquet" or not f.get("rows"):
            continue
        pf = pq.ParquetFile(out / f["path"])
        for group in range(pf.num_row_groups):
            rows = pf.read_row_group(group, columns=["strategy", "models", "images"]).to_pylist()
            if rows:
                return rows[0]
    return None


def dataset_info(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Facts for the card: counts, trajectories, shard options, config hash and versions (the manifest dict);
    name and license (OUT/state/build.json's "config"; only where that file is absent, e.g. a downloaded copy, the
    card already in OUT; else the defaults OUT's name and "other"); strategy, models and image formats (the first
    Parquet record the manifest lists). Does not need OUT/README.md, nor the card among the manifest's files."""
    out = Path(out)
    info: dict[str, Any] = {
        "curation": (manifest.get("build") or {}).get("curation") or {},
        "counts": dict(manifest["counts"]),
        "trajectories": manifest["trajectories"],
        "shards": manifest.get("shards") or {},
        "config_hash": manifest.get("config_hash"),
        "package_versions": manifest.get("package_versions") or {},
        "name": out.name,
        "license": "other",
        "strategy": "unknown",
        "models": {},
        "images": [],
    }
    build_state = out / "state" / "build.json"
    if build_state.is_file():
        config = json.loads(build_state.read_text(encoding="utf-8")).get("config") or {}
        info["name"] = config.get("name") or info["name"]
        info["license"] = config.get("license") or info["license"]
    elif (out / CARD_NAME).is_file():  # a downloaded copy: the card it came with
        meta, body = _front_matter((out / CARD_NAME).read_text(encoding="utf-8"))
        if isinstance(meta.get("license"), str):
            info["license"] = meta["license"]
        title = next((line[2:].strip() for line in body.splitlines() if line.startswith("# ")), "")
        info["name"] = meta.get("pretty_name") if isinstance(meta.get("pretty_name"), str) else title or info["name"]
    record = _first_record(out, manifest.get("files") or [])
    if record is not None:
        info["strategy"] = record["strategy"]
        info["models"] = json.loads(record["models"])
        info["images"] = json.loads(record["images"])
    return info


def _size_category(n: int) -> str:
    """The Hub's size_categories bucket for n rows per config."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M" if n < 10_000_000 else "10M<n<100M"


#: How the card names each curation filter (pipeline.curation.curation_facts), and what it checks.
CURATION_FILTERS: dict[str, str] = {
    "prompt_safety": "prompt safety (before generation)",
    "prompt_dedup": "near-duplicate prompts (cosine of sentence embeddings)",
    "image_safety": "image safety (I1 and I2)",
    "judge": "VLM judge (do I1/I2 satisfy the prompt, which is better)",
    "image_dedup": "near-duplicate I2 images (cosine of CLIP embeddings)",
}


def curation_section(facts: dict[str, Any]) -> str:
    """The card's "Curation" section: every filter with its model, license, threshold (or rule) and counts; empty
    for a dataset built before curation was recorded."""
    if not facts:
        return ""
    rows = []
    for name, label in CURATION_FILTERS.items():
        f = facts.get(name)
        if not f:
            continue
        if not f.get("enabled"):
            rows.append(f"| {label} | off | | | | |")
            continue
        setting = f"rule `{f['rule']}`" if f.get("rule") else f"{f.get('threshold')}"
        checked = f"{f['checked']:,}" if "checked" in f else ""
        rows.append(
            f"| {label} | `{f.get('model') or ''}` | {f.get('license') or ''} | {setting} | {checked} | "
            f"{f.get('removed', 0):,} |"
        )
    return (
        "\n\n## Curation\n\n"
        "Besides the CLIP verdict (I2 must match the prompt and improve on I1), these filters decided which "
        "trajectories are in this dataset. Prompts are filtered before any generation; a near-duplicate keeps the "
        "first of its cluster in source order.\n\n"
        "| filter | model | license | threshold | checked | removed |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def card_text(info: dict[str, Any], repo_id: str | None = None, include_wds: bool = False) -> str:
    """The card's full text: metadata with one config per mode (`data/<mode>/*.parquet`, the whole trajectory as
    default), counts, license, strategy, models, and how to load it with `datasets` and the official IRG trainer.

    `repo_id` None: the card of OUT itself (examples load a local path); else the Hub card of that repository.
    `include_wds`: the WebDataset copies under `wds/` are part of it. Deterministic in its arguments."""
    counts = info["counts"]
    configs = [
        {
            "config_name": m.name,
            "data_files": [{"split": "train", "path": f"data/{m.name}/*.parquet"}],
            **({"default": True} if m.name == DEFAULT_MODE else {}),
        }
        for m in MODES
    ]
    header = {
        "license": info["license"],
        "pretty_name": info["name"],
        "size_categories": [_size_category(max(counts.values(), default=0))],
        "task_categories": ["text-to-image", "image-to-text"],
        "tags": ["irg", "interleaving-reasoning-generation", "irgl", "synthetic"],
        "configs": configs,
    }
    rows = "\n".join(f"| {m.index} | `{m.name}` | {MODE_SUMMARY[m.index]} | {counts.get(m.name, 0):,} |" for m in MODES)
    models = "\n".join(f"- {stage}: `{name}`" for stage, name in sorted(info["models"].items())) or "- (not recorded)"
    images = ", ".join(sorted({f"{i['format'].upper()} {i['width']}x{i['height']}" for i in info["images"]})) or "n/a"
    t1_loss = str(bool(info["shards"].get("t1_loss_improving", False))).lower()
    wds = (
        "\nWebDataset copies of the same records are under `wds/<mode>/` (`<id>.json` + `<id>.i1.*` / `<id>.i2.*`).\n"
        if include_wds
        else ""
    )
    stage1 = "initial_full_learning, improving_full_learning (weight 1.0) and the four thinking modes (0.5)"
    if repo_id is None:
        where, local = LOCAL_PATH, LOCAL_PATH
        get = (
            "Point each dataset entry's `data_dir` at a mode directory of this folder:\n\n"
            f"`data_dir: {local}/data/<mode>/`"
        )
        files = f"`{MANIFEST_NAME}` lists every file of this dataset with its size and sha256; "
        check = f"`irgl verify {local}` checks every file against it and re-reads every record against the IRGL format."
    else:
        where, local = repo_id, "irgl-data"
        get = (
            "Download the dataset (or one mode, with `--include 'data/<mode>/*'`) and point each dataset entry's "
            "`data_dir` at a mode directory:\n\n"
            f"```bash\nhf download {repo_id} --repo-type dataset --local-dir {local}\n```\n\n"
            f"then `data_dir: {local}/data/<mode>/`"
        )
        files = f"`{MANIFEST_NAME}` lists every file of this repository with its size and sha256; after a download, "
        check = f"`irgl verify {local}` checks a full download and re-reads every record against the IRGL format."
    versions = info["package_versions"].get("irgl", "")
    built = f"Built by irgl {versions}".rstrip() + (
        f" (config hash `{info['config_hash']}`).\n" if info.get("config_hash") else ".\n"
    )
    return (
        "---\n"
        + yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# {info['name']}\n\n"
        + "Training data for Interleaving Reasoning Generation (IRG, arXiv 2509.06945) in the six IRGL learning "
        + "modes, built with irgl. Each trajectory answers a prompt T_in with a thinking T1, an image I1, a "
        + "reflection T2 and an improved image I2; each mode is the same trajectory cut differently.\n\n"
        + f"- trajectories: {info['trajectories']:,} (one record per mode each)\n"
        + f"- strategy: {info['strategy']}\n"
        + f"- images: {images}\n"
        + f"- T1 carries loss in the improving modes: {t1_loss}\n"
        + f"- license: {info['license']} (the images and texts also fall under the terms of the models below)\n\n"
        + "| # | config (mode) | conditions -> targets | records |\n|---|---|---|---|\n"
        + rows
        + "\n\n## Models\n\n"
        + models
        + curation_section(info.get("curation") or {})
        + "\n\n## Load with `datasets`\n\n"
        + "```python\nimport json\nfrom datasets import load_dataset\n\n"
        + f'ds = load_dataset("{where}", "initial_full_learning", split="train")\n'
        + 'turns = json.loads(ds[0]["conversation"])  # a list of turns; image parts hold base64 PNG/JPEG\n```\n\n'
        + f'Without a config name, `load_dataset("{where}")` loads `{DEFAULT_MODE}` (the whole trajectory).\n\n'
        + "## Train with the official IRG trainer\n\n"
        + get
        + " (Parquet with a `conversation` JSON column and small row groups, as the trainer expects). "
        + f"Stage 1 mixes {stage1}; stage 2 uses the two full modes only.\n"
        + wds
        + "\n## Files and checks\n\n"
        + files
        + check
        + "\n\n"
        + built
    )


def write_card(out: Path, info: dict[str, Any], include_wds: bool = False, repo_id: str | None = None) -> Path:
    """Write `out`/README.md atomically: `card_text(info, repo_id, include_wds)` - the card of OUT itself (`irgl
    build`, repo_id None) or the Hub card in a staged upload (`irgl publish`). Returns its path."""
    path = Path(out) / CARD_NAME
    write_atomic(path, card_text(info, repo_id, include_wds).encode("utf-8"))
    return path
