"""``data.name=fmnist_scenes``: segmentation scenes made of real Fashion-MNIST items at seeded random
positions, labelled per pixel (the layout, classes and keys: docs/evaluation.md#dense-transfer-segmentation).
"""

from __future__ import annotations

import numpy as np

#: class 0 is the background; the items' classes follow Fashion-MNIST's, shifted by one
CLASSES = ["background", "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot"]


def scene_layout(n: int, pool: int, size: int, item: int = 28, items: tuple[int, int] = (2, 4),
                 seed: int = 0) -> list[list[tuple[int, int, int]]]:
    """The placements of ``n`` scenes: for each, the (source index in 0..pool-1, top, left) of each item
    in drawing order, drawn from one seeded generator."""
    if size < item:
        raise ValueError(f"a scene of {size} px cannot hold a {item}-px item")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(items[0], items[1] + 1))
        src = rng.integers(0, pool, size=k)
        pos = rng.integers(0, size - item + 1, size=(k, 2))
        out.append([(int(s), int(t), int(left)) for s, (t, left) in zip(src, pos)])
    return out


def render_scenes(images: np.ndarray, labels: np.ndarray, layout: list[list[tuple[int, int, int]]], size: int,
                  threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``layout`` (:func:`scene_layout`) with the items ``images`` (M, h, w) uint8 of classes
    ``labels`` (M,) in 0..9. Returns (canvases (n, size, size) uint8, masks (n, size, size) uint8 with
    0 = background and 1..10 = the item's class + 1)."""
    h, w = images.shape[1:]
    canvas = np.zeros((len(layout), size, size), np.uint8)
    masks = np.zeros((len(layout), size, size), np.uint8)
    for i, placed in enumerate(layout):
        for src, top, left in placed:
            item = images[src]
            on = item > threshold
            canvas[i, top : top + h, left : left + w][on] = item[on]
            masks[i, top : top + h, left : left + w][on] = int(labels[src]) + 1
    return canvas, masks


def make_scenes(images: np.ndarray, labels: np.ndarray, n: int, size: int = 56, items: tuple[int, int] = (2, 4),
                threshold: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of side ``size`` from the items ``images`` (M, 28, 28) uint8, ``labels`` (M,):
    (canvases (n, size, size) uint8, masks (n, size, size) uint8); see :func:`render_scenes`."""
    layout = scene_layout(n, len(images), size, images.shape[1], items, seed)
    return render_scenes(images, labels, layout, size, threshold)


#: the layouts of pre-training scenes, apart from the segmentation probe's (scene seeds 0 and 1)
PRETRAIN_SEED = 1000


def pretraining_scenes(images: np.ndarray, labels: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scenes as unlabelled-style pre-training images: as many scenes as there are ``images`` (M, 28,
    28), each labelled with the class (0..9) that covers most of its pixels (for k-NN and the linear
    probe on scenes). Returns (canvases (M, 56, 56) uint8, labels (M,) int64)."""
    canvases, masks = make_scenes(images, labels, len(images), seed=PRETRAIN_SEED + (0 if train else 1))
    counts = np.stack([np.bincount(m.ravel(), minlength=len(CLASSES))[1:] for m in masks])
    return canvases, counts.argmax(1).astype(np.int64)
