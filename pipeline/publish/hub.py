"""The Hub side of `irgl publish`: the real upload (driver only) and how huggingface_hub batches its commits.

huggingface_hub 2.4's `HfApi.upload_folder` (with `hf_xet`, a dependency of huggingface_hub) streams the files,
commits them in batches and resumes an interrupted upload when the same command is run again (files already
committed are skipped, uploaded chunks deduplicated). The token comes from pipeline.secrets (HF_TOKEN or the login
file of `hf auth login`); it is never printed or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.card import CARD_NAME, MANIFEST_NAME
from pipeline.publish.errors import PublishError

if TYPE_CHECKING:
    from pipeline.publish.files import PublishPlan

REPO_TYPE = "dataset"


def commit_batching() -> tuple[int, int, int]:
    """(initial, smallest, largest) files per commit of huggingface_hub's streamed upload; fixed fallbacks when
    its private constants move."""
    try:
        from huggingface_hub._upload_pipeline import COMMIT_SIZE_SCALE, INITIAL_COMMIT_SIZE_INDEX

        return COMMIT_SIZE_SCALE[INITIAL_COMMIT_SIZE_INDEX], COMMIT_SIZE_SCALE[0], COMMIT_SIZE_SCALE[-1]
    except (ImportError, IndexError):
        return 250, 20, 1000


def upload(plan: PublishPlan, staged: Path) -> str:
    """The real upload from the staged folder (driver only): repo, branch, data files, then card and manifest.
    Returns the dataset URL. Not exercised by the tests (they never contact the Hub).

    The staged folder holds exactly the planned files, so the two steps are told apart by the card and manifest
    names alone (patterns, not a list of every file: huggingface_hub matches each file against each pattern)."""
    from huggingface_hub import HfApi

    from pipeline.secrets import hf_token

    token = hf_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(plan.repo_id, repo_type=REPO_TYPE, private=plan.private, exist_ok=True)
    if plan.revision and plan.revision != "main":
        api.create_branch(plan.repo_id, repo_type=REPO_TYPE, branch=plan.revision, exist_ok=True)
    last = [CARD_NAME, MANIFEST_NAME]
    if plan.data_files:
        api.upload_folder(
            repo_id=plan.repo_id, folder_path=staged, repo_type=REPO_TYPE, revision=plan.revision,
            ignore_patterns=list(last), commit_message=f"irgl publish (1/2): {len(plan.data_files)} file(s)",
        )  # fmt: skip
    api.upload_folder(
        repo_id=plan.repo_id, folder_path=staged, repo_type=REPO_TYPE, revision=plan.revision,
        allow_patterns=list(last), commit_message=f"irgl publish (2/2): {CARD_NAME} and {MANIFEST_NAME}",
    )  # fmt: skip
    suffix = f"/tree/{plan.revision}" if plan.revision else ""
    return f"https://huggingface.co/datasets/{plan.repo_id}{suffix}"
