"""Memory held per process by the distributed feature extraction, measured on a small ViT on the
CPU, then scaled to ImageNet-1k (train 1,281,167 / val 50,000 images; ViT-S/16 and ViT-B/16, 196
patch tokens at 224 px). Prints a table.

    python benchmarks/extract_memory.py                     # 2048 images, ViT D=64, 8x8 patch grid
    python benchmarks/extract_memory.py --images 256 --dim 32

Measured here, one process (the main one; under torchrun the others hold only the batch in flight):

- bytes per image of the results the main process keeps on the host: CLS features (the k-NN bank,
  ``extract_features_distributed``) and every output of ``mimco extract --patch`` kept in memory
  (``extract_tokens``, the Python API), counted from the tensors returned;
- the largest batch the main process receives at once (the rows a gather hands it);
- ``mimco extract --patch``'s streamed path (``stream_features``): the growth of the resident set
  (the kernel's high-water mark, reset before the extraction) over the size of the split written,
  at two split sizes, to show that it does not grow with the split.

The ImageNet figures multiply the measured bytes per token element (CLS: float32; patch tokens:
float16) by the token counts; "before" is the previous path (every output kept on the accelerator
in float32, all-gathered to every process, rank 0 holding the gathered copy and its reordered one
besides its own).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GB = 1e9
GPU = 80 * GB  # one 80 GB accelerator
HOST = (1e12, 2e12)  # a typical 8-GPU node's host memory


def _rss_peak_reset() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _size(got: dict) -> int:
    return sum(v.numel() * v.element_size() for v in got.values() if isinstance(v, torch.Tensor))


def measure(images: int, dim: int, grid: int, batch: int) -> dict[str, float]:
    from timm.models.vision_transformer import VisionTransformer

    from mimco.config import DataConfig
    from mimco.data.build import ImageArray
    from mimco.eval.extract import extract_tokens, stream_features
    from mimco.eval.features import extract_distributed, extract_features_distributed, features_of

    torch.manual_seed(0)
    patch, device = 4, torch.device("cpu")
    side = grid * patch
    model = VisionTransformer(img_size=side, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                              num_classes=0).eval()
    data = DataConfig(name="procedural", img_size=side, num_workers=0)
    out: dict[str, float] = {"dim": dim, "tokens": grid * grid, "batch": batch}

    def split(n: int) -> ImageArray:
        g = torch.Generator().manual_seed(n)
        return ImageArray(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
                          torch.arange(n) % 10, 3)

    ds = split(images)
    feats = extract_features_distributed(model, ds, data, device, batch_size=batch)
    assert feats is not None
    out["cls_bytes_per_image"] = (_size({"f": feats[0], "y": feats[1]})) / images
    got = extract_tokens(model, ds, data, device, patch=True, batch_size=batch, progress=False)
    assert got is not None
    out["patch_bytes_per_image"] = got["patch"].numel() * got["patch"].element_size() / images
    out["extract_bytes_per_image"] = _size(got) / images
    out["patch_bytes_per_element"] = got["patch"].element_size()
    out["cls_bytes_per_element"] = got["cls"].element_size()
    del got, feats
    largest = [0]

    def sink(rows: dict) -> None:
        largest[0] = max(largest[0], _size(rows))

    extract_distributed(model, ds, data, device, lambda x: {"cls": features_of(model, x)}, batch_size=batch,
                        sink=sink)
    out["cls_batch_bytes"] = largest[0]
    for n in (images, 4 * images):
        big = split(n)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.safetensors"
            base = _status("VmRSS")
            reset = _rss_peak_reset()
            stream_features(model, big, data, device, path, {}, patch=True, batch_size=batch, progress=False)
            peak = _status("VmHWM") - base if reset else float("nan")
            out[f"stream_written_{n}"] = path.stat().st_size
            out[f"stream_held_{n}"] = peak
        del big
    out["images"] = images
    return out


def _fmt(b: float) -> str:
    return f"{b / GB:,.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:,.0f} MB"


def table(m: dict[str, float], batch: int, world: int) -> str:
    n1, n4 = int(m["images"]), int(4 * m["images"])
    lines = [f"Measured (CPU, one process, ViT D={int(m['dim'])}, {int(m['tokens'])} patch tokens, batch {batch}):",
             "",
             "| what | measured |",
             "|---|---|",
             f"| CLS features kept on the main process, per image | {m['cls_bytes_per_image']:.0f} B "
             f"(D x {int(m['cls_bytes_per_element'])} B + label and index) |",
             f"| patch tokens kept, per image | {m['patch_bytes_per_image']:.0f} B "
             f"(L x D x {int(m['patch_bytes_per_element'])} B) |",
             f"| every output of `extract --patch` kept (API), per image | {m['extract_bytes_per_image']:.0f} B |",
             f"| largest batch handed to the main process (CLS) | {m['cls_batch_bytes']:.0f} B |",
             f"| `mimco extract --patch` streamed, {n1} images | held {_fmt(m[f'stream_held_{n1}'])} for "
             f"{_fmt(m[f'stream_written_{n1}'])} written |",
             f"| `mimco extract --patch` streamed, {n4} images | held {_fmt(m[f'stream_held_{n4}'])} for "
             f"{_fmt(m[f'stream_written_{n4}'])} written |",
             "",
             f"ImageNet-1k from these bytes per element ({world} processes, {batch} images per batch and process; "
             "GPU: 80 GB; host: 1-2 TB):",
             "",
             "| split | model | outputs | before: each GPU | before: rank 0's GPU | now: each GPU (batch in flight) "
             "| now: main host, kept in memory | now: `mimco extract`, streamed |",
             "|---|---|---|---|---|---|---|---|"]
    cls_b, patch_b = m["cls_bytes_per_element"], m["patch_bytes_per_element"]

    def gpu(b: float) -> str:
        return _fmt(b) + (" (over 80 GB)" if b > GPU else "")

    def host(b: float) -> str:
        return _fmt(b) + (" (over 2 TB)" if b > HOST[1] else " (over 1 TB)" if b > HOST[0] else "")

    for split, n in (("train", 1_281_167), ("val", 50_000)):
        for model, d in (("ViT-S/16", 384), ("ViT-B/16", 768)):
            for what, per_fp32, per_now in (("CLS", d * 4 + 16, d * cls_b + 16),
                                            ("CLS + mean + patch", (2 * d + 196 * d) * 4 + 16,
                                             2 * d * cls_b + 196 * d * patch_b + 16)):
                before = n * per_fp32  # all-gathered to every process, in float32
                batch_bytes = world * batch * per_now  # one gathered batch: on the main process's device, then host
                lines.append(f"| {split} | {model} | {what} | {gpu(before)} | {gpu(3 * before)} | {gpu(batch_bytes)} | "
                             f"{host(n * per_now)} | {_fmt(batch_bytes)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048, help="images measured (the streamed path also 4x as many)")
    p.add_argument("--dim", type=int, default=64, help="the measured ViT's width")
    p.add_argument("--grid", type=int, default=8, help="the measured ViT's patch grid side")
    p.add_argument("--batch", type=int, default=256, help="images per batch and process")
    p.add_argument("--world", type=int, default=8, help="processes of the ImageNet figures")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    text = table(measure(args.images, args.dim, args.grid, args.batch), args.batch, args.world)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
