"""`irgl publish OUT --repo-id ORG/NAME`: put a verified dataset on the Hugging Face Hub, from the driver only.

What goes up: the six modes' Parquet shards (`data/<mode>/`), optionally the WebDataset tars (`--include-wds`)
and the internal build files (`--include-internal`: trajectories/, rejects/, state/ without its lock), plus two
files written for the upload: the dataset card for the Hub (pipeline.card, the same writer as the card in OUT,
with the repo id in its examples) and a manifest restricted to the uploaded files, so that a downloaded copy
passes `irgl verify` as it is.

Size first: before anything else (verification included) publish prints the upload's file count and total size
and checks them against the Hub's limits. Above `--max-size` (default 300 GB) it refuses unless `--yes`; a dry
run only warns.

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

How: the files are staged in a folder next to OUT (hard links, no copies; symlinks across file systems), then
uploaded in two steps - the data files, then the card and manifest - so that the card only appears on the Hub with
the data it describes. huggingface_hub 2.4's `HfApi.upload_folder` (with `hf_xet`, a dependency of
huggingface_hub) streams the files, commits them in batches and resumes an interrupted upload when the same command
is run again (files already committed are skipped, uploaded chunks deduplicated).

OUT is held (pipeline.lock) for the whole command: a build cannot write into it while it is checked and staged.
The token comes from HF_TOKEN or the login file (`hf auth login`), read by huggingface_hub itself; irgl never
prints or writes it. `--dry-run` contacts nothing and reads no token: it prints the file list and the commit plan.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.card import CARD_NAME, MANIFEST_NAME, card_text, dataset_info
from pipeline.fsio import write_atomic
from pipeline.lock import LOCK_PATH

REPO_TYPE = "dataset"
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


class PublishError(RuntimeError):
    """Publishing cannot start: bad repo id or size, unusable staging folder, no token. The message says which."""


class PublishTooLarge(PublishError):
    """The upload is larger than `--max-size` and `--yes` was not given."""


class PublishRefused(PublishError):
    """OUT does not verify; `problems` holds what `irgl verify` found."""

    def __init__(self, out: Path, problems: list[Any]) -> None:
        super().__init__(f"{out}: refusing to publish a dataset that does not verify ({len(problems)} problem(s))")
        self.problems = problems


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
        batch, low, high = _commit_batching()
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


# ---------------------------------------------------------------------------------------------------------------
# Sizes


_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
    "tb": 10**12, "p": 10**15, "pb": 10**15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from a human size: `300GB`, `1.5TB`, `500 GiB`, `300000000000`: a number with an optional unit (B, kB,
    MB, GB, TB, PB decimal; KiB ... PiB binary; case-insensitive; `1,000` and `1_000` allowed). ValueError if not."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text.replace(",", "").replace("_", ""))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r}: expected a size such as 300GB, 1.5TB, 500GiB or a number of bytes")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def _size(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} B"


def _commit_batching() -> tuple[int, int, int]:
    """(initial, smallest, largest) files per commit of huggingface_hub's streamed upload; fixed fallbacks when
    its private constants move."""
    try:
        from huggingface_hub._upload_pipeline import COMMIT_SIZE_SCALE, INITIAL_COMMIT_SIZE_INDEX

        return COMMIT_SIZE_SCALE[INITIAL_COMMIT_SIZE_INDEX], COMMIT_SIZE_SCALE[0], COMMIT_SIZE_SCALE[-1]
    except (ImportError, IndexError):
        return 250, 20, 1000


# ---------------------------------------------------------------------------------------------------------------
# Plan, stage, upload


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


def plan_publish(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_wds: bool = False,
    include_internal: bool = False,
    license_name: str | None = None,
) -> PublishPlan:
    """The exact upload: files from OUT's manifest (Parquet; WebDataset if asked), internal files if asked, the Hub
    card (pipeline.card, for `repo_id`) and the restricted manifest. Reads OUT only."""
    out = Path(out)
    check_repo_id(repo_id)
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    info = dataset_info(out, manifest)
    if license_name:
        info["license"] = license_name
    card = card_text(info, repo_id, include_wds).encode("utf-8")
    files = []
    for f in manifest["files"]:
        if f["format"] == "parquet" or (f["format"] == "webdataset" and include_wds):
            files.append(PlannedFile(f["path"], int(f["bytes"]), f["format"], out / f["path"]))
    if include_internal:
        for sub in INTERNAL_DIRS:
            for p in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
                rel = p.relative_to(out).as_posix()
                if p.is_file() and not p.name.startswith(".tmp-") and rel != LOCK_PATH:
                    files.append(PlannedFile(rel, p.stat().st_size, "internal", p))
    published = published_manifest(out, card, include_wds, repo_id)
    files.append(PlannedFile(CARD_NAME, len(card), "card", None))
    files.append(PlannedFile(MANIFEST_NAME, len(published), "manifest", None))
    files.sort(key=lambda f: f.path)
    return PublishPlan(out, repo_id, private, revision, files, card.decode("utf-8"), published, info)


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
    write_atomic(dest / CARD_NAME, plan.card.encode("utf-8"))
    write_atomic(dest / MANIFEST_NAME, plan.manifest)
    return dest


def token_source() -> str | None:
    """Where huggingface_hub would find a token, without reading it: HF_TOKEN, the legacy variable, or the login
    file. None when there is none."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"from the {var} environment variable (not shown)"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return f"from the login file {constants.HF_TOKEN_PATH} (not shown)"
    return None


def upload(plan: PublishPlan, staged: Path) -> str:
    """The real upload from the staged folder (driver only): repo, branch, data files, then card and manifest.
    Returns the dataset URL. Not exercised by the tests (they never contact the Hub).

    The staged folder holds exactly the planned files, so the two steps are told apart by the card and manifest
    names alone (patterns, not a list of every file: huggingface_hub matches each file against each pattern)."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
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


def publish(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_wds: bool = False,
    include_internal: bool = False,
    license_name: str | None = None,
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
    from pipeline.verify import verify

    out = Path(out)
    check_repo_id(repo_id)
    if not out.is_dir():
        raise PublishError(f"{out}: no such dataset directory")
    with hold_out(out, "irgl publish"):
        try:
            plan = plan_publish(
                out, repo_id, private=private, revision=revision, include_wds=include_wds,
                include_internal=include_internal, license_name=license_name,
            )  # fmt: skip
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
        problems = verify(out, decode_images=decode_images, jobs=jobs, reuse=True)
        if problems:
            raise PublishRefused(out, problems)
        echo(f"{out} verifies: {plan.info['trajectories']:,} trajectories, {len(plan.files)} files to upload")
        if dry_run:
            if stage_dir is not None:
                stage(plan, stage_dir)
                echo(f"staged in {stage_dir}")
            echo(plan.describe(str(stage_dir) if stage_dir else "<staging folder next to OUT>", token_source()))
            echo("dry run: nothing was uploaded and nothing was contacted")
            return plan
        staged = (
            Path(stage_dir) if stage_dir else Path(tempfile.mkdtemp(prefix=f".{out.name}.publish-", dir=out.parent))
        )
        try:
            if stage_dir is None:
                staged.rmdir()  # stage() creates it
            stage(plan, staged)
            echo(plan.describe(str(staged), token_source()))
            url = upload(plan, staged)
        finally:
            if stage_dir is None:
                shutil.rmtree(staged, ignore_errors=True)
    echo(f"published: {url}")
    return plan
