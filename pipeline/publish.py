"""`irgl publish OUT --repo-id ORG/NAME`: put a verified dataset on the Hugging Face Hub, from the driver only.

What goes up: the six modes' Parquet shards (`data/<mode>/`), optionally the WebDataset tars (`--include-wds`)
and the internal build files (`--include-internal`: trajectories/, rejects/, state/), plus two files written for
the upload: a dataset card for the Hub (six configs, counts, license, models, strategy, how to load it with
`datasets` and with the official IRG trainer) and a manifest restricted to the uploaded files, so that a
downloaded copy passes `irgl verify` as it is.

How: the files are staged in a folder next to OUT (hard links, no copies; symlinks across file systems), then
uploaded in two steps - the shards, then the card and manifest - so that the card only appears on the Hub with
the data it describes. huggingface_hub 2.x uploads a folder through `HfApi.upload_folder`, which (with `hf_xet`,
a dependency of huggingface_hub) streams files, commits in batches and resumes an interrupted upload when the same
command is run again; earlier huggingface_hub versions have that behaviour in `HfApi.upload_large_folder`, which is
used when present.

The token comes from HF_TOKEN or the login file (`hf auth login`), read by huggingface_hub itself; irgl never
prints or writes it. `--dry-run` contacts nothing and reads no token: it prints the file list and the commit plan.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.card import DEFAULT_MODE
from pipeline.fsio import write_atomic
from pipeline.shards import CARD_NAME, MANIFEST_NAME
from schemas.modes import MODES

REPO_TYPE = "dataset"
INTERNAL_DIRS = ("trajectories", "rejects", "state")

#: Conditions -> supervised targets of each mode (docs/IRGL_FORMAT.md), for the card.
MODE_SUMMARY = {
    1: "I2 (ViT), query quoting T_in -> T1",
    2: "system prompt, T_in -> T1",
    3: "system prompt, T_in -> T1, I2",
    4: "I1, I2 (ViT), query quoting T_in -> T2",
    5: "system prompt, T_in, T1, I1 -> T2",
    6: "system prompt, T_in, T1, I1 -> T2, I2",
}


class PublishError(RuntimeError):
    """Publishing cannot start: bad repo id, unusable staging folder, no token. The message says which."""


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
# What the dataset is (from OUT only)


def _size(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _commit_batching() -> tuple[int, int, int]:
    """(initial, smallest, largest) files per commit of huggingface_hub's streamed upload; fixed fallbacks when
    its private constants move."""
    try:
        from huggingface_hub._upload_pipeline import COMMIT_SIZE_SCALE, INITIAL_COMMIT_SIZE_INDEX

        return COMMIT_SIZE_SCALE[INITIAL_COMMIT_SIZE_INDEX], COMMIT_SIZE_SCALE[0], COMMIT_SIZE_SCALE[-1]
    except (ImportError, IndexError):
        return 250, 20, 1000


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


def dataset_info(out: Path) -> dict[str, Any]:
    """Facts for the card, read from OUT: counts and versions (manifest), strategy, models and image format (the
    records themselves), name and license (the build's state/build.json, else the card `irgl build` wrote)."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    info: dict[str, Any] = {
        "counts": manifest["counts"],
        "trajectories": manifest["trajectories"],
        "shards": manifest.get("shards", {}),
        "config_hash": manifest.get("config_hash"),
        "package_versions": manifest.get("package_versions", {}),
        "name": out.name,
        "license": "other",
        "strategy": "unknown",
        "models": {},
        "images": [],
    }
    card = out / CARD_NAME
    meta, body = _front_matter(card.read_text(encoding="utf-8")) if card.is_file() else ({}, "")
    if isinstance(meta.get("license"), str):
        info["license"] = meta["license"]
    for line in body.splitlines():
        if line.startswith("# "):
            info["name"] = line[2:].strip()
            break
    build_state = out / "state" / "build.json"
    if build_state.is_file():
        config = json.loads(build_state.read_text(encoding="utf-8")).get("config", {})
        info["name"] = config.get("name", info["name"])
        info["license"] = config.get("license", info["license"])
    first = next((f for f in manifest["files"] if f["format"] == "parquet" and f["rows"]), None)
    if first is not None:
        row = pq.ParquetFile(out / first["path"]).read_row_group(0, columns=["strategy", "models", "images"])
        record = row.to_pylist()[0]
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


def publish_card_text(info: dict[str, Any], repo_id: str, include_wds: bool = False) -> str:
    """The card for the Hub: metadata with one config per mode (`data/<mode>/*.parquet`, the whole trajectory as
    default), counts, license, strategy, models, and how to load it with `datasets` and the official IRG trainer.
    Deterministic in its arguments."""
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
        + "\n\n## Load with `datasets`\n\n"
        + "```python\nimport json\nfrom datasets import load_dataset\n\n"
        + f'ds = load_dataset("{repo_id}", "initial_full_learning", split="train")\n'
        + 'turns = json.loads(ds[0]["conversation"])  # a list of turns; image parts hold base64 PNG/JPEG\n```\n\n'
        + f'Without a config name, `load_dataset("{repo_id}")` loads `{DEFAULT_MODE}` (the whole trajectory).\n\n'
        + "## Train with the official IRG trainer\n\n"
        + "Download the dataset (or one mode, with `--include 'data/<mode>/*'`) and point each dataset entry's "
        + "`data_dir` at a mode directory:\n\n"
        + f"```bash\nhf download {repo_id} --repo-type dataset --local-dir irgl-data\n```\n\n"
        + "then `data_dir: irgl-data/data/<mode>/` (Parquet with a `conversation` JSON column and small row "
        + f"groups, as the trainer expects). Stage 1 mixes {stage1}; stage 2 uses the two full modes only.\n"
        + wds
        + "\n## Files and checks\n\n"
        + f"`{MANIFEST_NAME}` lists every file of this repository with its size and sha256; after a download, "
        + "`irgl verify irgl-data` checks a full download and re-reads every record against the IRGL format.\n\n"
        + f"Built by irgl {info['package_versions'].get('irgl', '')} (config hash `{info['config_hash']}`).\n"
    )


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


# ---------------------------------------------------------------------------------------------------------------
# Plan, stage, upload


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
    card and the restricted manifest. Reads OUT only."""
    out = Path(out)
    check_repo_id(repo_id)
    info = dataset_info(out)
    if license_name:
        info["license"] = license_name
    card = publish_card_text(info, repo_id, include_wds).encode("utf-8")
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    files = []
    for f in manifest["files"]:
        if f["format"] == "parquet" or (f["format"] == "webdataset" and include_wds):
            files.append(PlannedFile(f["path"], int(f["bytes"]), f["format"], out / f["path"]))
    if include_internal:
        for sub in INTERNAL_DIRS:
            for p in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
                if p.is_file() and not p.name.startswith(".tmp-"):
                    files.append(PlannedFile(p.relative_to(out).as_posix(), p.stat().st_size, "internal", p))
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
    Returns the dataset URL. Not exercised by the tests (they never contact the Hub)."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(plan.repo_id, repo_type=REPO_TYPE, private=plan.private, exist_ok=True)
    if plan.revision and plan.revision != "main":
        api.create_branch(plan.repo_id, repo_type=REPO_TYPE, branch=plan.revision, exist_ok=True)
    steps = [[f.path for f in plan.data_files], [CARD_NAME, MANIFEST_NAME]]
    for number, paths in enumerate(steps, start=1):
        if not paths:
            continue
        if hasattr(api, "upload_large_folder"):  # huggingface_hub < 2: the resumable multi-commit upload
            api.upload_large_folder(
                repo_id=plan.repo_id, folder_path=staged, repo_type=REPO_TYPE, revision=plan.revision,
                allow_patterns=paths,
            )  # fmt: skip
        else:
            api.upload_folder(
                repo_id=plan.repo_id, folder_path=staged, repo_type=REPO_TYPE, revision=plan.revision,
                allow_patterns=paths, commit_message=f"irgl publish ({number}/2): {len(paths)} file(s)",
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
    echo: Callable[[str], None] = print,
) -> PublishPlan:
    """Verify OUT (PublishRefused if it does not verify), plan, stage and - unless `dry_run` - upload.

    `stage_dir` keeps the staged folder there (in a dry run too, for inspection, e.g. with `datasets`); otherwise
    a temporary folder next to OUT is used and removed.
    """
    from pipeline.verify import verify

    out = Path(out)
    check_repo_id(repo_id)
    problems = verify(out, decode_images=decode_images)
    if problems:
        raise PublishRefused(out, problems)
    plan = plan_publish(
        out, repo_id, private=private, revision=revision, include_wds=include_wds,
        include_internal=include_internal, license_name=license_name,
    )  # fmt: skip
    echo(f"{out} verifies: {plan.info['trajectories']:,} trajectories, {len(plan.files)} files to upload")
    if dry_run:
        if stage_dir is not None:
            stage(plan, stage_dir)
            echo(f"staged in {stage_dir}")
        echo(plan.describe(str(stage_dir) if stage_dir else "<staging folder next to OUT>", token_source()))
        echo("dry run: nothing was uploaded and nothing was contacted")
        return plan
    staged = Path(stage_dir) if stage_dir else Path(tempfile.mkdtemp(prefix=f".{out.name}.publish-", dir=out.parent))
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
