"""Staging an upload: the planned files laid out in a folder exactly as the repository will hold them - hard
links to OUT's files (no copies; symlinks across file systems), the Hub card and the restricted manifest written
fresh. `irgl publish --dry-run --stage-dir D` keeps the folder for inspection."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.card import MANIFEST_NAME, write_card
from pipeline.fsio import write_atomic
from pipeline.publish.errors import PublishError
from pipeline.publish.files import PublishPlan


def stage(plan: PublishPlan, dest: Path) -> Path:
    """Lay the upload out in `dest` (created; must be empty): hard links to OUT's files (symlinks when OUT is on
    another file system), the card and the manifest written fresh. Returns `dest`."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PublishError(f"{dest}: the staging folder must not exist or be empty")
    dest.mkdir(parents=True, exist_ok=True)
    for f in plan.files:
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.source is None:
            continue
        try:
            os.link(f.source, target)
        except OSError:  # another file system, or links not allowed
            os.symlink(f.source.resolve(), target)
    card = write_card(dest, plan.info, plan.include_wds, plan.repo_id)  # the one card writer, as for OUT
    if card.read_text(encoding="utf-8") != plan.card:  # the manifest being staged holds the planned card's sha256
        raise PublishError(f"{card}: the card written differs from the planned one")
    write_atomic(dest / MANIFEST_NAME, plan.manifest)
    return dest
