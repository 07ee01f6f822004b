"""The file plan of `irgl publish`: exactly what will go up (files from OUT's manifest, the Hub card, a manifest
restricted to the uploaded files), its size against the Hub's limits, and the commit plan as text. Reads OUT only;
contacts nothing.

The Hub's limits for large datasets (https://huggingface.co/docs/hub/storage-limits, "Repository limitations and
recommendations"; hub-docs as of June 2026):
- repository size: no per-repository limit for datasets, but every upload counts against the account's storage:
  private storage is 100 GB on a free account, 1 TB on PRO (1 TB per seat for Team/Enterprise organizations, more
  paid as you go); public storage is best-effort on a free account and up to 10 TB included on PRO (12 TB + 1 TB
  per seat for Team, 200 TB + 1 TB per seat for Enterprise). The Hub's dataset upload guide
  (docs/hub/datasets-upload-guide-llm.md) still names 300 GB as the public repository's soft cap ("contact HF if
  larger", datasets@huggingface.co), hence the default `--max-size`;
- file size: chunks under 200 GB recommended, 500 GB the hard limit of a single file (warned here);
- files: under 100k per repository recommended, at most 10k entries per folder (warned here);
- commits: no hard limit, but the Hub degrades after a few thousand; about 50-100 files per commit, which
  `upload_folder` does by itself.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.card import CARD_NAME, MANIFEST_NAME, card_text, dataset_info
from pipeline.humanize import format_size as _size  # the one size formatter
from pipeline.lock import LOCK_PATH
from pipeline.publish.errors import PublishError
from pipeline.publish.hub import commit_batching

INTERNAL_DIRS = ("trajectories", "rejects", "state")

#: Default `--max-size`: the public repository size up to which the Hub's dataset upload guide hosts a dataset
#: without asking (its "recommended_repo_size_gb: 300").
DEFAULT_MAX_SIZE = 300 * 10**9
#: docs/hub/storage-limits: "we strongly recommend splitting them into chunks <200GB each" ...
HUB_FILE_RECOMMENDED = 200 * 10**9
#: ... "500GB is the hard limit for a single file size".
HUB_FILE_MAX = 500 * 10**9
#: "The maximum number of files per folder cannot exceed 10k files per folder" (entries: files and folders).
HUB_ENTRIES_PER_FOLDER = 10_000
#: "we recommend keeping the total number of files under 100k".
HUB_FILES_PER_REPO = 100_000
#: Private storage of a free account.
HUB_FREE_PRIVATE = 100 * 10**9
HUB_LIMITS_URL = "https://huggingface.co/docs/hub/storage-limits"


@dataclass(frozen=True)
class UploadSpec:
    """What to publish where: the repository and its options (`irgl publish` options of the same names)."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch, made from main if missing; None: main
    include_wds: bool = False  # also the WebDataset tars (wds/)
    include_internal: bool = False  # also trajectories/, rejects/ and state/
    license_name: str | None = None  # the card's license; None: the build's


@dataclass(frozen=True)
class PlannedFile:
    """One file of the upload: its path in the repo, size, kind, and where its bytes come from."""

    path: str
    bytes: int
    kind: str  # parquet | webdataset | internal | card | manifest
    source: Path | None  # the file in OUT; None for the files written for the upload (card, manifest)


@dataclass
class PublishPlan:
    """Everything the upload will do, computed without contacting anything."""

    out: Path
    repo_id: str
    private: bool
    revision: str | None
    files: list[PlannedFile]
    card: str
    manifest: bytes
    info: dict[str, Any] = field(default_factory=dict)
    include_wds: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def data_files(self) -> list[PlannedFile]:
        """Uploaded first: everything but the card and the manifest."""
        return [f for f in self.files if f.kind not in ("card", "manifest")]

    def bytes_of(self, kind: str) -> int:
        return sum(f.bytes for f in self.files if f.kind == kind)

    def size_line(self) -> str:
        """The first line publish prints: `upload: 1,234 files, 812.4 GB`."""
        return f"upload: {len(self.files):,} files, {_size(self.total_bytes)}"

    def hub_warnings(self) -> list[str]:
        """Where the upload crosses the Hub's per-file, per-folder and per-repository limits (HUB_* above)."""
        warnings = []
        for f in self.files:
            if f.bytes > HUB_FILE_MAX:
                warnings.append(
                    f"{f.path} is {_size(f.bytes)}: above the Hub's hard limit of {_size(HUB_FILE_MAX)} per file, "
                    "the upload of this file will fail (write smaller shards)"
                )
            elif f.bytes > HUB_FILE_RECOMMENDED:
                warnings.append(
                    f"{f.path} is {_size(f.bytes)}: the Hub recommends files under {_size(HUB_FILE_RECOMMENDED)}"
                )
        entries: dict[str, set[str]] = defaultdict(set)
        for f in self.files:
            parts = f.path.split("/")
            for depth in range(len(parts)):
                entries["/".join(parts[:depth]) or "."].add(parts[depth])
        for folder, names in sorted(entries.items()):
            if len(names) > HUB_ENTRIES_PER_FOLDER:
                warnings.append(
                    f"{folder}/ would hold {len(names):,} entries: the Hub allows at most "
                    f"{HUB_ENTRIES_PER_FOLDER:,} per folder (write fewer, larger shards)"
                )
        if len(self.files) > HUB_FILES_PER_REPO:
            warnings.append(
                f"{len(self.files):,} files: the Hub recommends under {HUB_FILES_PER_REPO:,} per repository"
            )
        if self.private and self.total_bytes > HUB_FREE_PRIVATE:
            warnings.append(
                f"a private repository of {_size(self.total_bytes)}: a free account holds {_size(HUB_FREE_PRIVATE)} "
                "of private storage (PRO 1 TB, Team/Enterprise 1 TB per seat, more paid as you go)"
            )
        return warnings

    def over_limit(self, max_bytes: int) -> str | None:
        """Why the upload is above `max_bytes` and how to go on; None when it is not."""
        if self.total_bytes <= max_bytes:
            return None
        ways = ["pass --yes to upload it anyway", "raise --max-size"]
        if self.bytes_of("webdataset"):
            ways.append(f"leave out --include-wds (the WebDataset tars are {_size(self.bytes_of('webdataset'))})")
        if self.bytes_of("internal"):
            ways.append(f"leave out --include-internal ({_size(self.bytes_of('internal'))})")
        return (
            f"the upload is {_size(self.total_bytes)} ({len(self.files):,} files), above --max-size "
            f"{_size(max_bytes)}: {', or '.join(ways)}. The Hub's storage limits for large datasets: {HUB_LIMITS_URL}"
        )

    def describe(self, staging: str = "<staging folder next to OUT>", token: str | None = None) -> str:
        """The file list with sizes and the commit plan, as text. `token` is where a token would come from
        (never the token)."""
        lines = [f"files ({len(self.files)}, {_size(self.total_bytes)}):"]
        for f in self.files:
            lines.append(f"  {f.bytes:>15,d}  {f.path}")
        branch = self.revision or "main"
        visibility = "private" if self.private else "public"
        batch, low, high = commit_batching()
        n = len(self.data_files)
        lines += [
            "",
            "commit plan:",
            f"  1. create_repo({self.repo_id!r}, repo_type='dataset', private={self.private}, exist_ok=True): "
            f"creates a {visibility} dataset repo if it does not exist; an existing repo is used as it is "
            "(its visibility is not changed)",
        ]
        step = 2
        if branch != "main":
            lines.append(
                f"  {step}. create_branch({self.repo_id!r}, branch={branch!r}, exist_ok=True): "
                "the branch is made from main if it does not exist"
            )
            step += 1
        lines += [
            f"  {step}. upload the {n} data file(s) from {staging} to revision {branch!r}: huggingface_hub streams "
            f"them and commits in batches of about {batch} files (adapted between {low} and {high}), so about "
            f"{max(1, math.ceil(n / batch))} commit(s); files already on the Hub with the same content are skipped",
            f"  {step + 1}. upload {CARD_NAME} and {MANIFEST_NAME} last, in one commit: the card appears with its data",
            "  An interrupted upload resumes when the same command is run again.",
            f"token: {token or 'none found (set HF_TOKEN or run `hf auth login` before the real upload)'}",
        ]
        return "\n".join(lines)


def published_manifest(out: Path, card: bytes, include_wds: bool, repo_id: str) -> bytes:
    """OUT's manifest restricted to the uploaded files, with the Hub card's size and sha256: what a downloaded
    copy must match for `irgl verify`."""
    import hashlib

    raw = (out / MANIFEST_NAME).read_bytes()
    manifest = json.loads(raw)
    keep = {"parquet", "card"} | ({"webdataset"} if include_wds else set())
    files = []
    for f in manifest["files"]:
        if f["format"] not in keep:
            continue
        if f["format"] == "card":
            f = {**f, "bytes": len(card), "sha256": hashlib.sha256(card).hexdigest()}
        files.append(f)
    manifest["files"] = files
    manifest["published"] = {"repo_id": repo_id, "build_manifest_sha256": hashlib.sha256(raw).hexdigest()}
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_repo_id(repo_id: str) -> str:
    """ORG/NAME as the Hub accepts it (huggingface_hub's own offline check)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise PublishError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PublishError(f"--repo-id {repo_id!r}: {exc}") from exc
    return repo_id


def plan_publish(out: Path, spec: UploadSpec) -> PublishPlan:
    """The exact upload: files from OUT's manifest (Parquet; WebDataset if asked), internal files if asked, the Hub
    card (pipeline.card, for the repo id) and the restricted manifest. Reads OUT only."""
    out = Path(out)
    repo_id, include_wds = check_repo_id(spec.repo_id), spec.include_wds
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    info = dataset_info(out, manifest)
    if spec.license_name:
        info["license"] = spec.license_name
    card = card_text(info, repo_id, include_wds).encode("utf-8")
    files = []
    for f in manifest["files"]:
        if f["format"] == "parquet" or (f["format"] == "webdataset" and include_wds):
            files.append(PlannedFile(f["path"], int(f["bytes"]), f["format"], out / f["path"]))
    if spec.include_internal:
        for sub in INTERNAL_DIRS:
            for p in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
                rel = p.relative_to(out).as_posix()
                if p.is_file() and not p.name.startswith(".tmp-") and rel != LOCK_PATH:
                    files.append(PlannedFile(rel, p.stat().st_size, "internal", p))
    published = published_manifest(out, card, include_wds, repo_id)
    files.append(PlannedFile(CARD_NAME, len(card), "card", None))
    files.append(PlannedFile(MANIFEST_NAME, len(published), "manifest", None))
    files.sort(key=lambda f: f.path)
    return PublishPlan(
        out, repo_id, spec.private, spec.revision, files, card.decode("utf-8"), published, info, include_wds
    )
