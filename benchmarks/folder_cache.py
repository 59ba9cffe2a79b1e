"""MoCo v3 step rate from an image folder with and without ``data.cache``, against the in-memory run.

    python benchmarks/folder_cache.py                      # 4,000 Fashion-MNIST images as PNGs, 60 steps each
    python benchmarks/folder_cache.py --images 60000 --steps 100

Writes the first ``--images`` Fashion-MNIST training images as an ImageFolder of PNGs (class
sub-folders), then trains the bundled ``fmnist_teacher`` recipe (28 px, batch 256) for ``--steps``
steps three ways, each in a fresh process: in memory (``data.name=fashion_mnist
data.subset=N``), from the folder (loader workers decode and augment every image every epoch),
and from the folder with ``data.cache=true`` (decoded once, then the in-memory batched views).
The rate is the mean ``images_per_s`` of the log rows after the first (start-up excluded).
Goal: the cached folder within 10 % of the in-memory run.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(folder: Path, n: int) -> None:
    """The first ``n`` Fashion-MNIST training images as ``folder/<class>/<index>.png``."""
    from PIL import Image

    from mimco.data.fashion_mnist import CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("", train=True, download=False)
    for i in range(n):
        d = folder / CLASSES[int(labels[i])].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:05d}.png")


def rate(out: Path, name: str, overrides: list[str], steps: int, workers: int, batch: int) -> tuple[float, float]:
    """(images/s after the first log row, seconds from launch to the end) of one short run."""
    cmd = [sys.executable, "-m", "mimco", "teacher", "--config", "fmnist_teacher", f"train.out_dir={out}",
           f"train.name={name}", f"train.max_steps={steps}", f"train.log_every={max(1, min(10, steps // 4))}",
           "train.progress=false",
           "eval.at_end=false", "train.ckpt_every=0", f"data.num_workers={workers}", f"optim.batch_size={batch}",
           *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(out / name / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.mean(float(r["images_per_s"]) for r in rows[1:]), wall


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images exported to the folder")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--batch", type=int, default=256, help="the global batch (the recipe's: 256)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (data.num_workers)")
    p.add_argument("--out", default="", help="working folder (default: a temporary one)")
    return p


def main() -> None:
    a = build_parser().parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    out = Path(a.out or tempfile.mkdtemp(prefix="mimco-cache-"))
    folder = out / "fmnist-png"
    if not folder.is_dir():
        export(folder, a.images)
    runs = [("in memory (fashion_mnist)", "memory", ["data.name=fashion_mnist", f"data.subset={a.images}"]),
            ("PNG folder, per-image loader", "folder", ["data.name=imagefolder", f"data.root={folder}"]),
            ("PNG folder, data.cache=true", "cached",
             ["data.name=imagefolder", f"data.root={folder}", "data.cache=true"])]
    rows = []
    for what, name, overrides in runs:
        r, wall = rate(out / "runs", f"{name}-{time.strftime('%H%M%S')}", overrides, a.steps, a.workers, a.batch)
        rows.append((what, r, wall))
        print(f"{what}: {r:.0f} img/s", file=sys.stderr, flush=True)
    memory = rows[0][1]
    print(f"MoCo v3 step (fmnist_teacher, 28 px, batch {a.batch}), {a.images} images, {a.steps} steps, "
          f"{a.workers} loader workers, {os.cpu_count()} CPUs\n")
    print("| data | images/s | vs in memory | run wall time (s) |\n|---|---|---|---|")
    for what, r, wall in rows:
        print(f"| {what} | {r:.0f} | {r / memory:.0%} | {wall:.0f} |")
    cached = rows[2][1] / memory
    print(f"\n| target | measured | met |\n|---|---|---|\n| cached folder >= 90 % of in memory | {cached:.0%} | "
          f"{'yes' if cached >= 0.9 else 'NO'} |")


if __name__ == "__main__":
    main()
