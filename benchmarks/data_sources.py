"""Image folder, WebDataset shards and a Hugging Face dataset, on the same JPEGs: loader
throughput and start-up time.

    python benchmarks/data_sources.py                         # 20,000 JPEGs; a 100,000-file tree
    python benchmarks/data_sources.py --images 2000 --tree 10000 --batches 10

Writes ``--images`` JPEGs (``--side`` x ``--side`` * 3/4 px, smooth random colour fields, 10
classes) as an image folder, then as shards (``mimco shards``: the files' own bytes, 64 MB
shards) and as a ``datasets`` DatasetDict saved with ``save_to_disk`` (the bytes in an Image
column). For each source:

- **images/s per loader worker**: the real training stream (``build_stream``) with one loader
  worker, stage 1's two MoCo views and stage 2's one MIM view at ``--img-size``, timed over
  ``--batches`` batches of 64 after the first;
- **first batch**: a fresh interpreter that has imported mimco, until its first batch of 64
  (one worker), on a tree of ``--tree`` files (tiny JPEGs; listing, not decoding, is what grows):
  *fresh* (no file list yet; the shards' index and the saved dataset are written beforehand, as
  a user does once) and *requeue* (the second start);
- **random reads** of the encoded samples, one process: wids' indexed tar reader against
  mimco's (the offsets kept in the index), on the 64 MB shards and on the same images in about
  200 small shards (more than the 64 a reader keeps open, as ImageNet's 1 GB shards are); needs
  wids (in the test extra).

Each figure is the median of ``--runs``. The machine's load moves them; compare the ratios of
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def make_jpegs(root: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` JPEGs in ``root/train/cXX``: smooth colour fields (a small random image upsampled), which
    compress like photographs rather than noise."""
    rng = np.random.default_rng(seed)
    h = side * 3 // 4
    for i in range(n):
        d = root / "train" / f"c{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
        small.resize((side, h), Image.BICUBIC).save(d / f"{i:07d}.jpg", quality=90)


def make_hf(folder: Path, out: Path) -> None:
    import datasets

    from mimco.data.files import FileImages

    datasets.disable_progress_bars()

    files = FileImages(str(folder / "train"), labelled=True)
    rows = {"image": [{"bytes": files.read(i), "path": None} for i in range(len(files))],
            "label": [c for _, c in files.items]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=files.classes)})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(out))


def make_shards(folder: Path, out: Path, size: int = 64 * 2**20) -> None:
    from mimco.data.files import FileImages
    from mimco.data.shards import write_shards

    files = FileImages(str(folder / "train"), labelled=True)
    write_shards(files, out / "train", str(folder), files.classes, size, "train", progress=False)


SOURCES = {"image folder": lambda d: ["data.name=imagefolder", f"data.root={d / 'folder'}"],
           "shards": lambda d: ["data.name=shards", f"data.root={d / 'shards'}"],
           "HF dataset": lambda d: ["data.name=hf", f"data.root={d / 'hf'}"]}

def random_reads(shards: Path, reads: int, seed: int = 0) -> dict[str, float]:
    """Encoded samples read in a uniform random order, one process, no decoding: with wids'
    indexed tar reader (the reader mimco's shards first used: a shard opened parses every tar
    header, at most 64 kept open) and with mimco's (one ``pread`` at the offset in the index).
    Also the time wids takes to open the largest shard."""
    import random

    from wids.wids import IndexedTarSamples

    from mimco.config import DataConfig
    from mimco.data.build import load_dataset

    ds = load_dataset(DataConfig(name="shards", root=str(shards)), True)
    order = random.Random(seed).choices(range(len(ds)), k=reads)
    t = time.perf_counter()
    for i in order:
        ds.read(i)
    ours = reads / (time.perf_counter() - t)
    open_: dict[str, Any] = {}
    t = time.perf_counter()
    for i in order:
        url, _, j = ds.items[i][0].rpartition("#")
        tar = open_.pop(url, None)
        if tar is None:
            if len(open_) >= 64:
                open_.pop(next(iter(open_))).close()
            tar = IndexedTarSamples(path=url)
        open_[url] = tar
        sample = tar[int(j)]
        next(v for k, v in sample.items() if k != "__key__").read()
    theirs = reads / (time.perf_counter() - t)
    for tar in open_.values():
        tar.close()
    big = max(range(len(ds.urls)), key=lambda k: ds.lengths[k])
    t = time.perf_counter()
    IndexedTarSamples(path=ds.urls[big]).close()
    return {"ours": ours, "wids": theirs, "open": time.perf_counter() - t, "samples": ds.lengths[big],
            "shards": len(ds.urls)}


#: run in a fresh interpreter: the stream of a stage, timed (JSON on stdout)
PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from mimco.config import PretrainConfig, TeacherStageConfig, load_config
from mimco.data.stream import build_stream
stage, batches, over = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
torch.set_num_threads(1)
cfg = load_config(TeacherStageConfig if stage == "two" else PretrainConfig, None, over, model_keys=False)
t1 = time.perf_counter()
it = build_stream(cfg, torch.device("cpu"), stage)(0)
next(it)
t2 = time.perf_counter()
for _ in range(batches):
    next(it)
t3 = time.perf_counter()
print(json.dumps({"first": t2 - t1, "rate": batches * cfg.optim.batch_size / (t3 - t2) if batches else 0}))
"""


def probe(stage: str, batches: int, over: list[str]) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", PROBE, stage, str(batches), *over], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--side", type=int, default=400, help="JPEG width (height 3/4 of it)")
    p.add_argument("--tree", type=int, default=100000, help="files of the start-up tree")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reads", type=int, default=5000, help="random reads of the reader table")
    p.add_argument("--out", help="also write the tables (markdown) here")
    return p


def main() -> None:
    args = build_parser().parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(tempfile.mkdtemp(prefix="mimco-sources-"))
    common = ["data.num_workers=1", "optim.batch_size=64", f"data.img_size={args.img_size}", "train.progress=false"]
    lines = []
    try:
        t = time.perf_counter()
        make_jpegs(work / "folder", args.images, args.side)
        made = time.perf_counter() - t
        make_shards(work / "folder", work / "shards")
        make_hf(work / "folder", work / "hf")
        mb = sum(f.stat().st_size for f in (work / "folder").rglob("*.jpg")) / 2**20
        lines += [f"{args.images} JPEGs of {args.side}x{args.side * 3 // 4} px ({mb:.0f} MB, written in {made:.0f} s), "
                  f"crops at {args.img_size} px, one loader worker, batches of 64, median of {args.runs}:", "",
                  "| source | stage 1, two views (img/s per worker) | stage 2, one view (img/s per worker) |",
                  "|---|---|---|"]
        for name, over in SOURCES.items():
            rates = {s: statistics.median(probe(s, args.batches, [*common, *over(work)])["rate"]
                                          for _ in range(args.runs)) for s in ("two", "one")}
            lines.append(f"| {name} | {rates['two']:.0f} | {rates['one']:.0f} |")
            print(lines[-1], flush=True)
        mb_total = sum(f.stat().st_size for f in (work / "shards" / "train").glob("*.tar"))
        make_shards(work / "folder", work / "small", max(mb_total // 200, 2**16))
        lines += ["", f"Reading encoded samples in a uniform random order ({args.reads} reads, one process, no "
                      "decoding; wids keeping 64 shards open, as a loader worker did):", "",
                  "| shards | wids: opening the largest shard | wids: reads/s | mimco (offsets in the index): "
                  "reads/s |", "|---|---|---|---|"]
        for name in ("shards", "small"):
            r = random_reads(work / name, args.reads)
            lines.append(f"| {r['shards']} | {r['open'] * 1000:.0f} ms ({r['samples']} samples) | {r['wids']:.0f} | "
                         f"{r['ours']:.0f} |")
            print(lines[-1], flush=True)
        shutil.rmtree(work)
        work.mkdir()
        make_jpegs(work / "folder", args.tree, 32, seed=1)
        make_shards(work / "folder", work / "shards")
        make_hf(work / "folder", work / "hf")
        lines += ["", f"Until the first batch of 64, a tree of {args.tree} files (32 px JPEGs), one worker, median of "
                      f"{args.runs}:", "", "| source | fresh start | requeue |", "|---|---|---|"]
        small = [*common, "data.img_size=16"]
        for name, over in SOURCES.items():
            fresh, again = [], []
            for _ in range(args.runs):
                (work / "folder" / "train" / ".mimco-files.json").unlink(missing_ok=True)
                fresh.append(probe("one", 0, [*small, *over(work)])["first"])
                again.append(probe("one", 0, [*small, *over(work)])["first"])
            lines.append(f"| {name} | {statistics.median(fresh):.2f} s | {statistics.median(again):.2f} s |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
