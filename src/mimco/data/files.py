"""Image files on disk: class sub-folders (ImageFolder) or a flat folder of unlabelled images.

Unreadable or truncated images are skipped, counted and warned about once; a run stops with
a clear error when more than ``max_bad_fraction`` of the images seen were bad.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Callable

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
                raise MimcoError(f"no class sub-folders in {base}; for a flat folder of unlabelled images use data.name=folder")
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


class BadImageCounter:
    """Counts unreadable images; warns on the first, raises past ``max_fraction``."""

    def __init__(self, max_fraction: float, dataset_size: int) -> None:
        self.max_fraction, self.min_seen = max_fraction, min(dataset_size, 200)
        self.bad = self.seen = 0

    def update(self, bad: int, total: int) -> None:
        self.bad += bad
        self.seen += total
        if bad and self.bad == bad:
            warnings.warn(f"skipping unreadable image(s) ({bad} so far); more are counted silently", stacklevel=2)
        if self.seen >= self.min_seen and self.bad > self.max_fraction * self.seen:
            raise MimcoError(f"{self.bad} of {self.seen} images could not be read (more than data.max_bad_fraction="
                             f"{self.max_fraction}); remove the corrupt files or raise data.max_bad_fraction")

