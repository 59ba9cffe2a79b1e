"""Images/s per loader worker of each image-folder path, against what a GPU step needs.

    python benchmarks/data_paths.py                 # 256 ImageNet-sized JPEGs, 224 px views
    python benchmarks/data_paths.py --device cuda   # also the device stage of data.decode=gpu on a GPU

One worker is one process doing a worker's job, timed here in the main process (workers run in
parallel, so N workers give about N times this, up to the CPU count). Rows:

* ``data.decode=cpu``: a worker reads, decodes (PIL) and augments each image: MimCo's one light
  view, and MoCo v3's two views;
* ``data.decode=gpu``: a worker reads the bytes, the size from the header and draws the crop
  boxes; the device then decodes (nvJPEG on a GPU, libjpeg on a CPU), crops, resizes and runs the
  photometric ops on the batch (its own row: device images/s).

Then the images/s a MimCo ViT-S/16 step takes on one H100 at the MFU goal, and how many workers
each path needs for it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import jpeg_folder  # noqa: E402

#: MimCo ViT-S/16 at 224 px: GFLOP per image of a training step (student forward and backward,
#: teacher forward), measured by benchmarks/throughput.py (docs/performance.md)
MIMCO_VIT_S_GFLOP = 34.97
H100_BF16_TFLOPS = 989.0


def per_item(fn, n: int, reps: int = 2) -> float:
    """Items/s of ``fn(i)`` over ``n`` items, best of ``reps`` passes."""
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best = max(best, n / (time.perf_counter() - t))
    return best


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="JPEGs written and read")
    p.add_argument("--img-size", type=int, default=224, help="the views' side")
    p.add_argument("--batch", type=int, default=64, help="batch of the device stage")
    p.add_argument("--device", default="cpu", help="device of the data.decode=gpu stage (cuda on a GPU)")
    p.add_argument("--mfu", type=float, default=0.35, help="the MFU goal the needed rate is computed at")
    return p


def main() -> None:
    a = build_parser().parse_args()
    from mimco.config import ContrastiveAugConfig, DataConfig, MimAugConfig
    from mimco.data.device_decode import DeviceViews, EncodedFiles
    from mimco.data.files import FileImages
    from mimco.data.transforms import BatchTwoViews, image_mim_view, image_two_views

    torch.set_num_threads(1)  # a loader worker's share
    folder = Path(tempfile.mkdtemp(prefix="mimco-jpeg-"))
    jpeg_folder(folder, a.images)
    data = DataConfig(name="folder", root=str(folder), img_size=a.img_size)
    rows = []
    for what, tf in (("decode=cpu, MimCo view", image_mim_view(MimAugConfig(), data)),
                     ("decode=cpu, MoCo v3 two views", image_two_views(ContrastiveAugConfig(), data))):
        files = FileImages(str(folder), labelled=False, transform=tf)
        rows.append((what + " (worker)", per_item(lambda i: files[i], len(files))))
    two = BatchTwoViews(ContrastiveAugConfig(), data, crop=False)
    enc = EncodedFiles(FileImages(str(folder), labelled=False), two.crops)
    rows.append(("decode=gpu, bytes + crop boxes (worker)", per_item(lambda i: enc[i], len(enc))))
    device = torch.device(a.device)
    torch.set_num_threads(torch.get_num_threads() if device.type == "cuda" else 1)
    dv = DeviceViews(two.to(device), a.img_size, 3, device)
    batches = [EncodedFiles.collate([(enc[i], ()) for i in range(s, min(s + a.batch, len(enc)))])[0][0]
               for s in range(0, len(enc), a.batch)]
    dv(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        dv(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append((f"decode=gpu, device stage on {a.device} (MoCo v3 two views)", len(enc) / (time.perf_counter() - t)))
    need = a.mfu * H100_BF16_TFLOPS * 1e12 / (MIMCO_VIT_S_GFLOP * 1e9)
    print(f"{a.images} JPEGs of 300-500 px, views at {a.img_size} px, 1 thread per worker\n")
    print("| path | images/s | workers for a MimCo ViT-S/16 step on one H100 at "
          f"{a.mfu:.0%} MFU ({need:,.0f} images/s) |\n|---|---|---|")
    for what, r in rows:
        print(f"| {what} | {r:,.0f} | {need / r:,.0f} |")


if __name__ == "__main__":
    main()
