"""`irgl publish OUT --repo-id ORG/NAME`: put a verified dataset on the Hugging Face Hub, from the driver only.

What goes up: the six modes' Parquet shards (`data/<mode>/`), optionally the WebDataset tars (`--include-wds`)
and the internal build files (`--include-internal`: trajectories/, rejects/, state/ without its lock), plus two
files written for the upload: the dataset card for the Hub (pipeline.card, the same writer as the card in OUT,
with the repo id in its examples) and a manifest restricted to the uploaded files, so that a downloaded copy
passes `irgl verify` as it is.

Size first: before anything else (verification included) publish prints the upload's file count and total size
and checks them against the Hub's limits. Above `--max-size` (default 300 GB) it refuses unless `--yes`; a dry
run only warns.

The Hub's limits, and why each check: pipeline/publish/files.py.

How: the files are staged in a folder next to OUT (hard links, no copies; symlinks across file systems), then
uploaded in two steps - the data files, then the card and manifest - so that the card only appears on the Hub with
the data it describes; an interrupted upload resumes when the same command is run again.

OUT is held (pipeline.lock) for the whole command: a build cannot write into it while it is checked and staged.
The token comes from HF_TOKEN or the login file (`hf auth login`), looked up by pipeline.secrets; irgl never prints
or writes it. `--dry-run` contacts nothing: it prints the file list, the commit plan and where a token would come
from (never the token).

The package, one idea a module:
- files.py    the file plan (what goes up, its size against the Hub's limits, the commit plan as text);
- staging.py  the upload laid out in a folder (hard links);
- hub.py      the upload itself and huggingface_hub's commit batching;
- errors.py   PublishError, PublishTooLarge, PublishRefused.
Here: `publish`, the command's flow. The Hub card is pipeline.card's (the one writer of both cards).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.publish.errors import PublishError, PublishRefused, PublishTooLarge
from pipeline.publish.files import DEFAULT_MAX_SIZE, PublishPlan, UploadSpec, check_repo_id, plan_publish
from pipeline.publish.hub import upload
from pipeline.publish.staging import stage
from pipeline.secrets import hf_token_source

__all__ = ["PublishError", "PublishRefused", "PublishTooLarge", "UploadSpec", "publish"]


def publish(
    out: Path,
    spec: UploadSpec,
    *,
    dry_run: bool = False,
    stage_dir: Path | None = None,
    decode_images: bool = True,
    max_size: int = DEFAULT_MAX_SIZE,
    yes: bool = False,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
) -> PublishPlan:
    """Hold OUT, plan (size line and Hub-limit warnings first), refuse above `max_size` unless `yes` (a dry run only
    warns: PublishTooLarge), verify (PublishRefused), stage and - unless `dry_run` - upload.

    `stage_dir` keeps the staged folder there (in a dry run too, for inspection, e.g. with `datasets`); otherwise
    a temporary folder next to OUT is used and removed. pipeline.lock.OutLocked when another command holds OUT.

    Verification reuses what `irgl verify` recorded: a unit found clean with the same bytes is re-checked by size
    and sha256 (in `jobs` processes), not decoded again.
    """
    from pipeline.lock import hold_out
    from pipeline.logs import UnitProgress
    from pipeline.verify import verify

    out = Path(out)
    check_repo_id(spec.repo_id)
    if not out.is_dir():
        raise PublishError(f"{out}: no such dataset directory")
    with hold_out(out, "irgl publish"):
        try:
            plan = plan_publish(out, spec)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # no or a broken manifest, an unreadable shard
            problems = verify(out, decode_images=decode_images)
            if problems:
                raise PublishRefused(out, problems) from exc
            raise PublishError(f"{out}: cannot plan the upload ({exc})") from exc
        echo(plan.size_line())
        for warning in plan.hub_warnings():
            echo(f"warning: {warning}")
        too_large = plan.over_limit(max_size)
        if too_large and not yes:
            if not dry_run:
                raise PublishTooLarge(too_large)
            echo(f"warning: {too_large} (a dry run goes on)")
        progress = UnitProgress(echo, verb="verified")  # a line per unit, as irgl verify prints
        problems = verify(out, decode_images=decode_images, jobs=jobs, reuse=True, progress=progress)
        if problems:
            raise PublishRefused(out, problems)
        echo(f"{out} verifies: {plan.info['trajectories']:,} trajectories, {len(plan.files)} files to upload")
        if dry_run:
            if stage_dir is not None:
                stage(plan, stage_dir)
                echo(f"staged in {stage_dir}")
            echo(plan.describe(str(stage_dir) if stage_dir else "<staging folder next to OUT>", hf_token_source()))
            echo("dry run: nothing was uploaded and nothing was contacted")
            return plan
        staged = (
            Path(stage_dir) if stage_dir else Path(tempfile.mkdtemp(prefix=f".{out.name}.publish-", dir=out.parent))
        )
        try:
            if stage_dir is None:
                staged.rmdir()  # stage() creates it
            stage(plan, staged)
            echo(plan.describe(str(staged), hf_token_source()))
            url = upload(plan, staged)
        finally:
            if stage_dir is None:
                shutil.rmtree(staged, ignore_errors=True)
    echo(f"published: {url}")
    return plan
