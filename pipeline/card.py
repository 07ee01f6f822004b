"""The dataset card `OUT/README.md`: YAML `configs:` with one config per mode, so that
`datasets.load_dataset(OUT, name=<mode>)` loads each mode offline, plus a human-readable description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.fsio import write_atomic
from schemas.config import ShardConfig
from schemas.modes import MODES

#: The config loaded by `datasets.load_dataset(OUT)` without a name: the whole trajectory (T1, I1, T2, I2).
DEFAULT_MODE = "improving_full_learning"


def card_text(counts: dict[str, int], trajectories: int, shard_config: ShardConfig, info: dict[str, Any]) -> str:
    """The card's full text. Deterministic: depends only on its arguments."""
    configs = [
        {
            "config_name": m.name,
            "data_files": [{"split": "train", "path": f"data/{m.name}/*.parquet"}],
            **({"default": True} if m.name == DEFAULT_MODE else {}),
        }
        for m in MODES
    ]
    header: dict[str, Any] = {
        "license": info.get("license", "other"),
        "task_categories": ["text-to-image", "image-to-text"],
        "tags": ["irg", "interleaving-reasoning-generation", "irgl"],
        "configs": configs,
    }
    rows = "\n".join(f"| {m.index} | `{m.name}` | {counts.get(m.name, 0)} |" for m in MODES)
    models = info.get("models") or {}
    model_lines = "\n".join(f"- {stage}: `{name}`" for stage, name in sorted(models.items())) or "- (not recorded)"
    repo = info.get("repo_id", "ORG/NAME")
    return (
        "---\n"
        + yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# {info.get('title', 'IRGL dataset')}\n\n"
        + "Interleaving Reasoning Generation (IRG, arXiv 2509.06945) training data in the six IRGL learning modes, "
        + "built with [irgl](https://github.com/irgl/irgl).\n\n"
        + f"- trajectories: {trajectories}\n"
        + f"- strategy: {info.get('strategy', 'unknown')}\n"
        + f"- T1 loss in improving modes: {str(shard_config.t1_loss_improving).lower()}\n\n"
        + "| # | mode (config name) | records |\n|---|---|---|\n"
        + rows
        + "\n\n## Models\n\n"
        + model_lines
        + "\n\n## Loading\n\n"
        + "```python\nfrom datasets import load_dataset\n"
        + f'ds = load_dataset("{repo}", name="initial_full_learning", split="train")\n'
        + 'turns = __import__("json").loads(ds[0]["conversation"])\n```\n\n'
        + "Each `data/<mode>/` directory can be passed as a `data_dir` to the official IRG SFT trainer. "
        + "The `conversation` column is a JSON string of turns; image parts hold base64 PNG/JPEG bytes with the "
        + "flags `need_loss`, `need_vae`, `need_vit`. WebDataset copies of the same records are under `wds/`.\n"
    )


def write_card(
    out: Path, counts: dict[str, int], trajectories: int, shard_config: ShardConfig, info: dict[str, Any]
) -> Path:
    path = out / "README.md"
    write_atomic(path, card_text(counts, trajectories, shard_config, info).encode("utf-8"))
    return path
