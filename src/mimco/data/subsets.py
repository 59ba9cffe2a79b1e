"""Balanced labelled subsets of a training split, for few-label evaluation (SimCLR's 1 % / 10 %
ImageNet labels, MSN's few images per class). The same (split, size, seed) gives the same images
in every command: ``mimco knn``, ``mimco linprobe`` and ``mimco finetune``."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch

from mimco.data.build import ImageArray
from mimco.data.files import FileImages
from mimco.errors import MimcoError

D = TypeVar("D", ImageArray, FileImages)


def labels_of(dataset: ImageArray | FileImages) -> torch.Tensor:
    """(N,) int64 labels without reading any image (-1 where unlabelled)."""
    if isinstance(dataset, ImageArray):
        return dataset.labels
    return torch.tensor([c for _, c in dataset.items], dtype=torch.int64)


def balanced_subset(labels: torch.Tensor, per_class: int = 0, fraction: float = 0.0, seed: int = 0,
                    what: str = "--per-class") -> torch.Tensor:
    """Ascending indices of ``per_class`` images of every class (or ``fraction`` of each class, at
    least one), drawn without replacement by a generator seeded with ``seed`` alone. A one-line
    error (naming ``what``) for an unlabelled split, a size below 1 or beyond the smallest class."""
    if len(labels) == 0 or int(labels.min()) < 0:
        raise MimcoError(f"{what} needs a labelled training split; this one has no labels "
                         "(use data.name=imagefolder with class sub-folders, or a labelled dataset)")
    counts = torch.bincount(labels)
    present = counts.nonzero().flatten()
    if fraction:
        if not 0 < fraction <= 1:
            raise MimcoError(f"{what}={fraction:g} is not a fraction in (0, 1]; write e.g. 0.01 for 1 % of the labels")
        sizes = {int(c): max(1, round(fraction * int(counts[c]))) for c in present}
    else:
        if per_class < 1:
            raise MimcoError(f"{what}={per_class} must be at least 1 labelled image per class")
        smallest = int(counts[present].min())
        if per_class > smallest:
            c = int(present[counts[present].argmin()])
            raise MimcoError(f"{what}={per_class} exceeds the smallest class (class {c} has {smallest} images); "
                             f"use at most {smallest}")
        sizes = {int(c): per_class for c in present}
    g = torch.Generator().manual_seed(seed)
    picked = [(labels == c).nonzero().flatten()[torch.randperm(int(counts[c]), generator=g)[:n]]
              for c, n in sizes.items()]
    return torch.cat(picked).sort().values


def take(dataset: D, indices: torch.Tensor) -> D:
    """The images at ``indices`` as a dataset of the same kind (files are not read)."""
    if isinstance(dataset, ImageArray):
        return ImageArray(dataset.images[indices], dataset.labels[indices], dataset.channels)
    out = copy.copy(dataset)
    out.items = [dataset.items[i] for i in indices.tolist()]
    return out


def labelled_subset(dataset: D, per_class: int = 0, fraction: float = 0.0, seed: int = 0,
                    what: str = "--per-class") -> D:
    """:func:`take` of :func:`balanced_subset`."""
    return take(dataset, balanced_subset(labels_of(dataset), per_class, fraction, seed, what))
