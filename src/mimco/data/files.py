"""Image files on disk: class sub-folders (ImageFolder) or a flat folder of unlabelled images.

In training, an unreadable or truncated image is replaced by the next readable one in the file
list (:class:`Substituting`: deterministic, so every process keeps its full batch and the
gathers stay equal in size) and counted; a run stops with a clear error when more than
``max_bad_fraction`` of the images read were bad, and prints ``skipped N unreadable images of M``
at its end. Evaluation skips them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from mimco.errors import MimcoError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def _images_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


class FileImages(Dataset):
    """Images under ``root``; labelled by class sub-folder when ``labelled`` (else label -1).

    ``__getitem__`` returns ``(transform(image), label)`` or ``None`` for an unreadable file.
    """

    def __init__(self, root: str, labelled: bool, channels: int = 3, transform: Callable | None = None,
                 subset: int = 0, seed: int = 0) -> None:
        base = Path(root)
        if not root or not base.is_dir():
            raise MimcoError(f"data.root '{root}' is not a folder; set data.root=/path/to/images")
        self.classes: list[str] = []
        items: list[tuple[Path, int]] = []
        if labelled:
            self.classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not self.classes:
                raise MimcoError(f"no class sub-folders in {base}; for a flat folder of unlabelled images use "
                                 "data.name=folder")
            for c, name in enumerate(self.classes):
                items += [(p, c) for p in _images_under(base / name)]
        else:
            items = [(p, -1) for p in _images_under(base)]
        if not items:
            raise MimcoError(f"no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) found under {base}; check data.root")
        if subset and subset < len(items):
            items = random.Random(seed).sample(items, subset)
        self.items, self.channels, self.transform = items, channels, transform

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image | None:
        try:
            with Image.open(self.items[i][0]) as im:
                im.load()
                if im.mode == "I;16" or im.mode == "I":  # 16-bit grey -> 8-bit
                    im = im.point(lambda v: v / 256).convert("L")
                return im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def __getitem__(self, i: int) -> Any:
        img = self.load(i)
        if img is None:
            return None
        return (self.transform(img) if self.transform else img), self.items[i][1]


def collate_skip_bad(batch: list[Any]) -> tuple[Any, int]:
    """Collate the readable samples; returns (collated or None, number of unreadable ones)."""
    good = [b for b in batch if b is not None]
    return (default_collate(good) if good else None), len(batch) - len(good)


class Substituting(Dataset):
    """Training view of a per-image dataset. Key ``epoch * N + i`` gives ``(sample i, the indices of
    the unreadable files tried)``: an unreadable file is replaced by the next readable one (``i + 1``, ``i + 2``,
    ...; the same choice on every process and every epoch), so a batch never shrinks; and the
    image's random augmentation is drawn from generators seeded by (``seed``, epoch, i) alone, so
    it does not depend on the worker that decodes it, on how many workers there are, or on where a
    run was resumed (the caller's generators are left as they were)."""

    MAX_TRIES = 64

    def __init__(self, images: Any, seed: int = 0) -> None:
        self.images, self.seed = images, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[Any, tuple[int, ...]]:
        n = len(self.images)
        epoch, i = divmod(key, n)
        for k in range(min(self.MAX_TRIES, n)):
            with _seeded(((self.seed * 100_003 + epoch) * n + i) % 2**63):
                item = self.images[(i + k) % n]
            if item is not None:
                return item, tuple((i + j) % n for j in range(k))
        raise MimcoError(f"{self.MAX_TRIES} consecutive images from {self.images.items[i][0]} on cannot be read; "
                         "remove the corrupt files")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU) generators seeded with ``seed`` inside, restored after."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def collate_substituted(batch: list[tuple[Any, tuple[int, ...]]]) -> tuple[Any, list[int]]:
    """Collate :class:`Substituting` items: (collated samples, the unreadable files met, by index)."""
    return default_collate([b[0] for b in batch]), [j for b in batch for j in b[1]]


class BadImageCounter:
    """Counts unreadable images among those read (a rate: a file read in two epochs counts twice),
    and which files were unreadable (``files``, dataset indices; each once). ``check`` (given the
    counts of every process, so that all processes stop together) raises past ``max_fraction``."""

    def __init__(self, max_fraction: float, dataset_size: int) -> None:
        self.max_fraction, self.min_seen = max_fraction, min(dataset_size, 200)
        self.bad = self.seen = 0
        self.files: set[int] = set()
        self.undecodable = 0  # files read whose JPEG data failed to decode on the device (data.decode=gpu)

    def update(self, read: int, files: Sequence[int] = (), undecodable: int = 0) -> None:
        """``read`` images read, among them the unreadable ``files`` (by index) and ``undecodable`` ones."""
        self.bad += len(files) + undecodable
        self.seen += read
        self.files.update(files)
        self.undecodable += undecodable

    def check(self, bad: int, seen: int) -> None:
        """Raise when ``bad`` of ``seen`` images (summed over processes) is past the limit."""
        if seen >= self.min_seen and bad > self.max_fraction * seen:
            raise MimcoError(f"{bad} of {seen} images could not be read (more than data.max_bad_fraction="
                             f"{self.max_fraction}); remove the corrupt files or raise data.max_bad_fraction")
