"""A procedurally generated labelled dataset for tests and smoke runs: no files, seconds.

Six classes: disk, square, triangle, plus sign, stripes, checkerboard, each drawn at a
random position, size and colour on a noisy background of another random colour.
"""

from __future__ import annotations

import numpy as np

CLASSES = ["disk", "square", "triangle", "plus", "stripes", "checker"]


def make_shapes(n: int, img_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (n, 3, S, S), labels int64 (n,)); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    s = img_size
    labels = rng.integers(0, len(CLASSES), size=n)
    yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    yy, xx = yy[None] / s, xx[None] / s  # (1, S, S) in [0, 1)
    cy = rng.uniform(0.3, 0.7, size=(n, 1, 1))
    cx = rng.uniform(0.3, 0.7, size=(n, 1, 1))
    r = rng.uniform(0.18, 0.3, size=(n, 1, 1))
    period = rng.uniform(0.12, 0.25, size=(n, 1, 1))
    dy, dx = yy - cy, xx - cx
    shapes = [  # in the order of CLASSES
        dy**2 + dx**2 < r**2,
        (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85),
        (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) * 0.55),
        ((np.abs(dy) < r * 0.3) & (np.abs(dx) < r)) | ((np.abs(dx) < r * 0.3) & (np.abs(dy) < r)),
        np.floor(yy / period) % 2 == 0,
        (np.floor(yy / period) + np.floor(xx / period)) % 2 == 0,
    ]
    fg_mask = np.stack([np.broadcast_to(m, (n, s, s)) for m in shapes])[labels, np.arange(n)]  # image i's own shape
    fg = rng.uniform(0.5, 1.0, size=(n, 3, 1, 1))
    bg = rng.uniform(0.0, 0.4, size=(n, 3, 1, 1))
    img = np.where(fg_mask[:, None], fg, bg) + rng.normal(0, 0.05, size=(n, 3, s, s))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64)
