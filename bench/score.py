"""Benchmark: the score stage's scorer (decode once, parallel preprocessing, half precision on CUDA) vs the old
single-thread path, side by side on the same rows.

    python bench/score.py [--rows 256] [--size 1024] [--batch-rows 64] [--threads N] [--device auto]
                          [--large-rows N] [--skip-large | --skip-tiny] [--repeats 2]

Rows: a prompt and two PIL-drawn JPEG images (quality 95, size x size, as the production preset writes I1/I2).
Models: `tiny:clip` (built offline), then a real-size ViT-L-14 with random weights
(`open_clip.create_model('ViT-L-14', pretrained=None)`, saved to a temp checkpoint and loaded through
`ScoreConfig(model='ViT-L-14', pretrained=<file>)`, the production loader). On CPU the ViT-L-14 part runs on
`--large-rows` rows only (default 8, one timed pass: ~2 CPU-seconds per image forward there).

The baseline is the old path, reimplemented here: one thread; `text_image(prompts, I1)`, `text_image(prompts, I2)`
and `image_image(I1, I2)`, each decoding and preprocessing its images again (so every image is decoded twice and
embedded twice, every prompt embedded twice), float32 on every device. Both paths run through `ScoreStage` on the
same batches of `--batch-rows` rows, in alternating order, best of `--repeats`; start-up (model load) is timed
apart. Each path's wall-clock rows/s and its CPU time per row (all threads of this process) are printed: on a
loaded machine the CPU time shows the work saved even when the wall clock is noisy. The scores of both paths are
compared: equal within 1e-5 in float32 (asserted), and the half-precision gap is printed on CUDA.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from schemas.config import ScoreConfig  # noqa: E402
from schemas.local import decode_rgb  # noqa: E402
from schemas.work import WORK_COLUMNS, Batch, new_row  # noqa: E402
from stages.engines.clip import ClipScorer, default_threads  # noqa: E402
from stages.engines.image import resolve_device  # noqa: E402
from stages.score import ScoreStage  # noqa: E402

# --- the old path, as it was before the fast scorer -----------------------------------------------------------------


class OldClipScorer:
    """The former ClipScorer: float32, one thread, images decoded and embedded once per call that needs them."""

    def __init__(self, cfg: ScoreConfig, device: str, batch_size: int = 64) -> None:
        self.cfg, self.device, self.batch_size = cfg, device, batch_size

    def setup(self) -> None:
        import open_clip

        pretrained = None if self.cfg.model.startswith(("local-dir:", "hf-hub:")) else self.cfg.pretrained
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            self.cfg.model, pretrained=pretrained, device=self.device, precision="fp32"
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.cfg.model)

    def _encode_images(self, images: list[bytes]) -> Any:
        import torch

        rows = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(decode_rgb(b)) for b in chunk]).to(self.device)
            with torch.inference_mode():
                rows.append(self.model.encode_image(pixels, normalize=True).float())
        return torch.cat(rows)

    def _encode_texts(self, texts: list[str]) -> Any:
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                rows.append(self.model.encode_text(tokens, normalize=True).float())
        return torch.cat(rows)

    @staticmethod
    def _cos(a: Any, b: Any) -> list[float]:
        return (a * b).sum(dim=-1).clamp(-1.0, 1.0).cpu().tolist()

    def text_image(self, prompts: list[str], images: list[bytes]) -> list[float]:
        return self._cos(self._encode_texts(prompts), self._encode_images(images))

    def image_image(self, a: list[bytes], b: list[bytes]) -> list[float]:
        both = self._encode_images([*a, *b])
        return self._cos(both[: len(a)], both[len(a) :])


class OldScoreStage(ScoreStage):
    """The former ScoreStage.process: three engine calls per batch."""

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        prompts = [batch["prompt"][i] for i in rows]
        i1 = [batch["i1"][i] for i in rows]
        i2 = [batch["i2"][i] for i in rows]
        s1 = self.engine.text_image(prompts, i1)
        s2 = self.engine.text_image(prompts, i2)
        s12 = self.engine.image_image(i1, i2)
        return [(*t, None) for t in zip(s1, s2, s12, strict=True)]  # (no I2 embedding: it predates the column)


# --- rows --------------------------------------------------------------------------------------------------------


def drawn_jpeg(seed: int, size: int) -> bytes:
    """A PIL-drawn picture (smooth colour field, shapes, fine grain) as JPEG quality 95: ~0.3-0.6 MB at 1024 px,
    like a generated photo, so that decoding costs what it costs in a build."""
    return drawn_image(seed, size, "jpeg")


def drawn_image(seed: int, size: int, fmt: str) -> bytes:
    """The PIL-drawn picture of `drawn_jpeg` as JPEG q95 (`fmt` "jpeg") or PNG ("png"); bench/safety.py uses it."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pen = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 30, size // 6))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    grain = rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_batches(n: int, size: int, batch_rows: int) -> list[Batch]:
    rows = []
    for k in range(n):
        row = new_row(
            id=f"r{k:05d}", prompt=f"{k % 5 + 1} coloured shapes on a soft background, photo {k}", source="bench",
            where=f"bench:{k}", unit=0, seed=k, strategy="forward",
        )  # fmt: skip
        row["i1"], row["i2"] = drawn_jpeg(2 * k, size), drawn_jpeg(2 * k + 1, size)
        rows.append(row)
    return [
        {name: [r[name] for r in rows[s : s + batch_rows]] for name in WORK_COLUMNS} for s in range(0, n, batch_rows)
    ]


def copy_batch(batch: Batch) -> Batch:
    return {name: list(values) for name, values in batch.items()}


# --- running -----------------------------------------------------------------------------------------------------


def timed_setup(engine: Any) -> float:
    start = time.perf_counter()
    engine.setup()
    return time.perf_counter() - start


def run_stage(stage: ScoreStage, batches: list[Batch], device: str) -> tuple[float, float, list[tuple[float, ...]]]:
    """Wall seconds and CPU seconds (this process, all threads) for all batches through the stage, and every row's
    three scores in order."""
    import torch

    scores: list[tuple[float, ...]] = []
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        out = stage(copy_batch(batch))
        bad = [e for e in out["error"] if e and not e.startswith("verifier")]
        assert not bad, bad[:3]
        scores.extend(zip(out["clip_i1"], out["clip_i2"], out["clip_i1_i2"], strict=True))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, scores


def bench_model(label: str, cfg: ScoreConfig, batches: list[Batch], repeats: int, args: argparse.Namespace) -> None:
    """Old path vs new path (and the new path on one thread) on the same batches; prints one table."""
    import numpy as np

    device = resolve_device(args.device)
    rows = sum(len(b["id"]) for b in batches)
    threads = args.threads or default_threads()
    old = OldClipScorer(cfg, device)
    new = ClipScorer(cfg, device=device, threads=threads)
    startup = {"old": timed_setup(old), "new": timed_setup(new)}
    # The one-thread variant shares the new engine's model: only its pool is resized before it runs.
    paths = {
        "old (1 thread, decode x2, float32)": (OldScoreStage(cfg, engine=old), None),
        f"new (1 thread, {new.dtype})": (ScoreStage(cfg, engine=new), 1),
        f"new ({threads} threads, {new.dtype})": (ScoreStage(cfg, engine=new), threads),
    }
    names = list(paths)

    def run(name: str, subset: list[Batch]) -> tuple[float, float, list]:
        stage, pool_size = paths[name]
        if pool_size is not None and new.threads != pool_size:
            new.close()
            new.threads = pool_size
        return run_stage(stage, subset, device)

    warm = [{name: values[:2] for name, values in batches[0].items()}]  # first-call allocations, kernel choice
    run(names[0], warm)
    run(names[2], warm)
    best = dict.fromkeys(names, float("inf"))
    cpu = dict.fromkeys(names, float("inf"))
    scores: dict[str, list] = {}
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]  # alternate, so that neither side always goes first
        for name in order:
            seconds, cpu_seconds, scores[name] = run(name, batches)
            best[name] = min(best[name], seconds)
            cpu[name] = min(cpu[name], cpu_seconds)
    new.close()
    diff = float(np.abs(np.array(scores[names[0]]) - np.array(scores[names[2]])).max())
    base = rows / best[names[0]]
    images = f"{2 * rows} JPEG images {args.size}x{args.size}"
    per_batch = len(batches[0]["id"])
    print(f"\n{label}: {rows} rows ({images}), batches of {per_batch} rows, device {device}, best of {repeats}")
    print(f"  start-up (model load): old {startup['old']:.2f} s, new {startup['new']:.2f} s (not in rows/s)")
    print(f"  {'path':34s} {'rows/s':>9s}  {'ratio':>6s}  {'CPU ms/row':>10s}")
    for name in names:
        rate = rows / best[name]
        shown = f"{rate:9.3f}" if rate < 10 else f"{rate:9.1f}"
        print(f"  {name:34s} {shown}  {rate / base:5.2f}x  {1000 * cpu[name] / rows:10.1f}")
    print(f"  max |score old - score new| = {diff:.2e}")
    if new.dtype == "float32":
        assert diff <= 1e-5, f"new path's scores differ from the old path's by {diff}"


def random_vit_l14(path: Path) -> Path:
    """A real-size ViT-L-14 with random (seeded) weights, saved as an open_clip checkpoint file."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14", pretrained=None)
    ckpt = path / "vit-l-14-random.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows (each: a prompt, I1 and I2)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--batch-rows", type=int, default=64, help="rows per stage call (resources.batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="preprocessing threads (default: this machine's)")
    parser.add_argument("--device", default="auto", help="torch device for both paths (auto: cuda if present)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per path (best is reported)")
    parser.add_argument(
        "--large-rows", type=int, default=None, help="rows for ViT-L-14 (default: --rows on CUDA, 8 on CPU)"
    )
    parser.add_argument("--skip-large", action="store_true", help="tiny CLIP only")
    parser.add_argument("--skip-tiny", action="store_true", help="ViT-L-14 only")
    args = parser.parse_args()

    import torch

    from stages.tiny_image import build_tiny_clip, tiny_clip_score_fields

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, preprocessing threads {args.threads or default_threads()}"
    )
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    large_rows = args.large_rows or (args.rows if cuda else 8)
    start = time.perf_counter()
    batches = make_batches(args.rows if not args.skip_tiny else large_rows, args.size, args.batch_rows)
    mb = sum(len(x) for b in batches for x in b["i1"] + b["i2"]) / 2 / sum(len(b["id"]) for b in batches) / 1e6
    print(f"drew {2 * sum(len(b['id']) for b in batches)} images in {time.perf_counter() - start:.1f} s "
          f"({mb:.2f} MB per image)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="irgl-bench-score-") as tmp:
        if not args.skip_tiny:
            tiny = ScoreConfig(**tiny_clip_score_fields(build_tiny_clip(Path(tmp))))
            bench_model("tiny:clip", tiny, batches, args.repeats, args)
        if args.skip_large:
            return
        same = args.skip_tiny or large_rows == args.rows
        large_batches = batches if same else make_batches(large_rows, args.size, args.batch_rows)
        large = ScoreConfig(model="ViT-L-14", pretrained=str(random_vit_l14(Path(tmp))))
        bench_model("ViT-L-14 (random weights)", large, large_batches, args.repeats if cuda else 1, args)


if __name__ == "__main__":
    main()
