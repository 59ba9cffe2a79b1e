"""``data.cache``: decode an image folder once into memory, then train at in-memory speed.

Loader workers decode every image every epoch; for a folder that fits in memory that decoding is
most of a small model's step. Cached, the folder becomes a uint8 tensor (N, C, S, S) and training
takes the batched-view path of the in-memory datasets (the same augmentation recipe, run on whole
batches, optionally on the GPU).

Each image is resized so its short side is S (``data.cache_size``, default ``data.img_size``) and
centre-cropped to S x S, once: random crops then come from that square, as they do for the
in-memory datasets. Unreadable files are left out and counted (the run stops past
``data.max_bad_fraction``), like the per-image path.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mimco.data.files import FileImages, collate_skip_bad
from mimco.errors import MimcoError


class _Square(Dataset):
    """(uint8 (C, S, S), label) of each image of a folder, or None for an unreadable file."""

    def __init__(self, files: FileImages, size: int) -> None:
        self.files = files
        self.tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        img = self.files.load(i)
        return None if img is None else (self.tf(img), self.files.items[i][1])


def available_bytes() -> int:
    """Memory the system can still give (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def decode_all(files: FileImages, size: int, num_workers: int, max_bad_fraction: float,
               verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable image of ``files`` as uint8 (N, C, size, size), with its labels (N,); C = 1
    when every image is grey (:class:`~mimco.data.build.ImageArray` repeats it on access).

    Decoded by ``num_workers`` loader processes in file order (the result does not depend on the
    worker count). Refuses a folder that would take more than half the free memory."""
    n, c = len(files), files.channels
    need, free = n * c * size * size, available_bytes()
    if free and need > free // 2:
        raise MimcoError(f"data.cache=true needs {need / 2**30:.1f} GiB for {n} images at {size} px but only "
                         f"{free / 2**30:.1f} GiB is free; set data.cache=false (or a smaller data.cache_size)")
    images = torch.empty(n, c, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    kept, bad, t0 = 0, 0, time.perf_counter()
    # its own generator: iterating must not draw from the global one, which the models' initialisation uses next
    loader = DataLoader(_Square(files, size), batch_size=256, num_workers=num_workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator())
    for batch, n_bad in loader:
        bad += n_bad
        if batch is not None:
            x, y = batch
            images[kept : kept + len(x)], labels[kept : kept + len(x)] = x, y
            kept += len(x)
    if bad > max_bad_fraction * n:
        raise MimcoError(f"{bad} of {n} images could not be read (more than data.max_bad_fraction={max_bad_fraction}); "
                         "remove the corrupt files or raise data.max_bad_fraction")
    images = images[:kept]
    if c == 3 and torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]):
        images = images[:, :1].clone()  # a grey folder: one channel kept (expanded on access), a third of the memory
    if verbose:
        skipped = f"; skipped {bad} unreadable images" if bad else ""
        print(f"mimco: cached {kept} images at {size} px ({images.numel() / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s "
              f"with {num_workers} workers{skipped}", file=sys.stderr, flush=True)
    return images, labels[:kept]

