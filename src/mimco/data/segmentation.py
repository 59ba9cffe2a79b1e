"""Segmentation data: (image, mask) pairs of a split, from a folder in one of three layouts
(``ade20k``, ``voc``, ``plain``; each layout, and what a missing, unreadable or out-of-range mask does:
docs/evaluation.md#dense-transfer-segmentation) or from generated Fashion-MNIST scenes (:mod:`mimco.data.scenes`).

Masks are held as class indices 0..K-1 with :data:`IGNORE` (255) for pixels that are not scored,
whatever the layout writes (ADE20K's 0, "other", is ignored and its classes 1..150 become 0..149).
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mimco.config import DataConfig, SegAugConfig, SegDataConfig
from mimco.data.fashion_mnist import load_fashion_mnist
from mimco.data.files import IMG_EXTENSIONS
from mimco.data.scenes import CLASSES, make_scenes
from mimco.errors import MimcoError

IGNORE = 255
LAYOUTS = ("ade20k", "voc", "plain")
_DESCRIBE = ("ADE20K (images/training + annotations/training), Pascal VOC (JPEGImages + SegmentationClass + "
             "ImageSets/Segmentation/train.txt) or plain (train/images + train/masks)")


def _stem_map(d: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in exts} if d.is_dir() else {}


def detect_layout(root: Path) -> tuple[str, Path]:
    """(layout, the folder it starts at) of a segmentation folder; the usual archive folders
    (``ADEChallengeData2016``, ``VOCdevkit/VOC2012``) are looked into."""
    for base in (root, root / "ADEChallengeData2016", root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        for layout, folders in (("ade20k", ("images/training", "annotations/training")),
                                ("voc", ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")),
                                ("plain", ("train/images", "train/masks"))):
            if all((base / f).is_dir() for f in folders):
                return layout, base
    if not root.is_dir():
        raise MimcoError(f"data.root '{root}' is not a folder; set data.root to a segmentation dataset: {_DESCRIBE}")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]
    raise MimcoError(f"data.root {root} matches no segmentation layout; lay it out as {_DESCRIBE} (found: "
                     f"{', '.join(found) or 'nothing'})")


def list_pairs(layout: str, base: Path, train: bool) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, mask) paths of a split, and the images that have no mask."""
    split = ("training" if train else "validation") if layout == "ade20k" else ("train" if train else "val")
    image_dir, mask_dir = {"ade20k": (base / "images" / split, base / "annotations" / split),
                           "voc": (base / "JPEGImages", base / "SegmentationClass"),
                           "plain": (base / split / "images", base / split / "masks")}[layout]
    images, masks = _stem_map(image_dir, IMG_EXTENSIONS), _stem_map(mask_dir, (".png",))
    if layout == "voc":
        ids = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids.is_file():
            raise MimcoError(f"{ids} is missing: the Pascal VOC layout names each split's images there")
        images = {n: images.get(n, image_dir / f"{n}.jpg") for n in ids.read_text().split()}
    pairs = [(p, masks[n]) for n, p in images.items() if n in masks and p.is_file()]
    return pairs, [p for n, p in images.items() if n not in masks or not p.is_file()]


class SegSplit(Dataset, abc.ABC):
    """One split's (image, mask) samples: ``transform(image, mask)`` of :meth:`load`, or None for an
    unreadable sample. ``load(i)`` gives (PIL image, mask (H, W) uint8 in 0..K-1 or 255)."""

    num_classes: int
    transform: Callable | None = None

    @abc.abstractmethod
    def load(self, i: int) -> tuple[Image.Image, np.ndarray] | None:
        """(PIL image, mask) of sample ``i``, or None when it cannot be read."""

    def __getitem__(self, i: int) -> Any:
        item = self.load(i)
        return self.transform(*item) if item is not None and self.transform is not None else item


class SegFolder(SegSplit):
    """``data.name=segfolder``: a split of a folder in one of :data:`LAYOUTS`."""

    def __init__(self, root: str, train: bool, seg: SegDataConfig, channels: int = 3, subset: int = 0,
                 verbose: bool = True) -> None:
        self.layout, base = detect_layout(Path(root))
        self.num_classes = {"ade20k": 150, "voc": 21}.get(self.layout, seg.num_classes)
        if not self.num_classes:  # plain
            raise MimcoError("a plain-layout folder does not say how many classes its masks hold; set "
                             "seg.num_classes=N (masks hold 0..N-1, and seg.ignore_index for unlabelled pixels)")
        self.ignore_index, self.channels = seg.ignore_index, channels
        self.items, no_mask = list_pairs(self.layout, base, train)
        split = "training" if train else "validation"
        if not self.items:
            raise MimcoError(f"the {self.layout} folder {base} has no {split} images with masks; check data.root")
        self.items = self.items[: subset or None]
        if verbose:
            left = f"; {len(no_mask)} images without a mask left out (e.g. {no_mask[0]})" if no_mask else ""
            print(f"mimco: {base}: {self.layout} layout, {len(self.items)} {split} pairs, {self.num_classes} "
                  f"classes{left}", file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.items)

    def _mask(self, m: np.ndarray) -> np.ndarray:
        """The file's values -> 0..K-1 / 255."""
        if self.layout == "ade20k":
            return (m.astype(np.int16) - 1).astype(np.uint8)  # 0 -> 255 (ignored), 1..150 -> 0..149
        if self.layout == "plain" and self.ignore_index != IGNORE:
            m = m.astype(np.int64)
            return np.where(m == self.ignore_index, IGNORE, m)
        return m

    def load(self, i: int) -> tuple[Image.Image, np.ndarray] | None:
        path, mpath = self.items[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB" if self.channels == 3 else "L")
            with Image.open(mpath) as mm:
                mm.load()
                raw = np.array(mm if mm.mode in ("P", "L", "I", "I;16") else mm.convert("L"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        if raw.ndim != 2 or raw.shape != (image.height, image.width):
            return None
        mask = self._mask(raw)
        labels = mask[mask != IGNORE]
        if labels.size and int(labels.max()) >= self.num_classes:
            raise MimcoError(f"{mpath} holds label {int(labels.max())}, outside the {self.num_classes} classes "
                             f"0..{self.num_classes - 1} of this {self.layout} folder; fix the mask"
                             + (", or set seg.num_classes / seg.ignore_index" if self.layout == "plain" else ""))
        return image, mask.astype(np.uint8)


class SceneSplit(SegSplit):
    """``data.name=fmnist_scenes``: generated scenes in memory (:mod:`mimco.data.scenes`)."""

    def __init__(self, data: DataConfig, seg: SegDataConfig, train: bool) -> None:
        images, labels = load_fashion_mnist(data.root, train, data.download)
        n = seg.scenes if train else seg.val_scenes
        if train and data.subset:
            n = min(n, data.subset)
        self.images, self.masks = make_scenes(images, labels, n, data.img_size, (seg.items[0], seg.items[1]),
                                              seg.threshold, seed=seg.scene_seed * 2 + (0 if train else 1))
        self.num_classes, self.channels, self.classes = len(CLASSES), data.channels, CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image = Image.fromarray(self.images[i], "L")
        return (image.convert("RGB") if self.channels == 3 else image), self.masks[i]


def load_segmentation(data: DataConfig, seg: SegDataConfig, train: bool, verbose: bool = True) -> SegSplit:
    """The training or validation split of ``data.name`` (segfolder or fmnist_scenes)."""
    if data.name == "fmnist_scenes":
        return SceneSplit(data, seg, train)
    if data.name != "segfolder":
        raise MimcoError(f"data.name={data.name} has no masks; segmentation takes data.name=segfolder (with data.root)"
                         " or fmnist_scenes")
    return SegFolder(data.root, train, seg, data.channels, data.subset if train else 0, verbose)


def _joint(ops: list[Any], data: DataConfig, resize_mask: bool = True) -> Callable:
    """(PIL image, mask) -> ``ops`` then normalisation, applied to both (``resize_mask=False``: to the
    image only, the mask kept at its own size): (image (C, S, S), mask int64)."""
    c = data.channels
    t = v2.Compose([*ops, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                    v2.Normalize(data.mean[:c], data.std[:c]), v2.ToPureTensor()])

    def apply(image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = v2.functional.pil_to_tensor(image).as_subclass(tv_tensors.Image)
        if not resize_mask:
            return t(x), torch.from_numpy(np.asarray(mask)).long()
        x, m = t(x, tv_tensors.Mask(torch.from_numpy(mask)))
        return x, m.long()

    return apply


def seg_train_transform(aug: SegAugConfig, data: DataConfig) -> Callable:
    """(PIL image, mask) -> (normalised image (C, S, S), mask (S, S) int64): one random resized crop
    and flip for both (bilinear for the image, nearest-neighbour for the mask)."""
    return _joint([v2.RandomResizedCrop(data.img_size, scale=(aug.min_scale, aug.max_scale), ratio=tuple(aug.ratio),
                                        antialias=True), v2.RandomHorizontalFlip(p=aug.flip_prob)], data)


def seg_resize_transform(data: DataConfig) -> Callable:
    """(PIL image, mask) -> both resized to S x S (image bilinear, mask nearest): fixed-size training
    samples without augmentation (the frozen probe's features)."""
    return _joint([v2.Resize((data.img_size, data.img_size), antialias=True)], data)


def seg_eval_transform(data: DataConfig) -> Callable:
    """(PIL image, mask) -> (image resized to S x S and normalised, the mask at its own size, int64):
    predictions are upsampled to the mask's size before they are scored."""
    return _joint([v2.Resize((data.img_size, data.img_size), antialias=True)], data, resize_mask=False)


def collate_eval(batch: list[Any]) -> tuple[torch.Tensor, list[torch.Tensor], int] | None:
    """Readable evaluation samples: (images (B, C, S, S), masks at their own sizes, unreadable count)."""
    good = [b for b in batch if b is not None]
    return (torch.stack([b[0] for b in good]), [b[1] for b in good], len(batch) - len(good)) if good else None
