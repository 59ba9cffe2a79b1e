"""Mask generators for masked image modeling: pure, batched, seeded.

A mask is a bool tensor of shape (B, H*W) over the patch grid, row-major, True where the
patch is hidden from the student. Every row of a mask holds exactly the same number of True
values, so masked tokens can be gathered into a dense (B, M, D) tensor.
"""

from __future__ import annotations

import atexit
import math
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch


def num_masked(num_cells: int, ratio: float) -> int:
    """Number of cells hidden for a mask ``ratio`` (rounded; at least 1, at most all but one)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    return min(max(int(round(num_cells * ratio)), 1), num_cells - 1)


def random_mask(batch_size: int, grid_size: tuple[int, int], ratio: float, mask_unit: int = 1,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """SimMIM random masking -> bool (B, H*W): exactly ``num_masked(units, ratio)`` units of
    ``mask_unit`` x ``mask_unit`` patches hidden per image (SimMIM's mask_patch_size / patch_size)."""
    hc, wc = _unit_grid(grid_size, mask_unit)
    return _lowest_units(torch.rand(batch_size, hc * wc, generator=generator), grid_size, ratio, mask_unit).to(device)


def _unit_grid(grid_size: tuple[int, int], mask_unit: int) -> tuple[int, int]:
    h, w = grid_size
    if h % mask_unit or w % mask_unit:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the mask unit {mask_unit}")
    return h // mask_unit, w // mask_unit


def _lowest_units(noise: torch.Tensor, grid_size: tuple[int, int], ratio: float, mask_unit: int) -> torch.Tensor:
    """Hide the ``num_masked`` units of lowest noise: noise (B, units) -> bool (B, H*W), each unit
    expanded to ``mask_unit`` x ``mask_unit`` patches."""
    b = noise.shape[0]
    hc, wc = _unit_grid(grid_size, mask_unit)
    cells = torch.zeros(b, hc * wc, dtype=torch.bool)
    cells.scatter_(1, noise.argsort(dim=1)[:, : num_masked(hc * wc, ratio)], True)
    return cells.view(b, hc, 1, wc, 1).expand(b, hc, mask_unit, wc, mask_unit).reshape(b, grid_size[0] * grid_size[1])


def sample_blocks(grid_size: tuple[int, int], target: int, rng: np.random.Generator, min_patches: int = 4,
                  min_aspect: float = 0.3,
                  max_attempts: int = 10) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """BEiT blockwise masking of one image -> (mask (H, W) bool array, the accepted rectangles
    (top, left, height, width)).

    Rectangles of area in [min_patches, remaining] and aspect ratio h/w in [min_aspect,
    1/min_aspect] are placed until ``target`` patches are masked, overlapping earlier ones but never
    past ``target``; when none fits (tiny grids), random single patches make the count exact.
    """
    h, w = grid_size
    mask = np.zeros((h, w), dtype=bool)
    blocks: list[tuple[int, int, int, int]] = []
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    while (remaining := target - int(mask.sum())) > 0:
        for _ in range(max_attempts):
            area = rng.uniform(min_patches, max(min_patches, remaining))
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (1 <= bh <= h and 1 <= bw <= w) or bh * bw < min_patches or \
                    not (min_aspect <= bh / bw <= 1.0 / min_aspect):
                continue
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            new = bh * bw - int(mask[top : top + bh, left : left + bw].sum())
            if 0 < new <= remaining:
                mask[top : top + bh, left : left + bw] = True
                blocks.append((top, left, bh, bw))
                break
        else:  # no rectangle fits
            fill = rng.choice(np.flatnonzero(~mask.ravel()), size=remaining, replace=False)
            mask.ravel()[fill] = True
    return mask, blocks


def block_mask(batch_size: int, grid_size: tuple[int, int], ratio: float, seed: int, min_patches: int = 4,
               min_aspect: float = 0.3, device: torch.device | str | None = None, first_index: int = 0) -> torch.Tensor:
    """BEiT blockwise masking for a batch -> bool (B, H*W), ``num_masked(H*W, ratio)`` per row. Sample i
    is drawn from its own generator seeded by (``seed``, ``first_index + i``): a batch's slice is the slice's mask."""
    target = num_masked(grid_size[0] * grid_size[1], ratio)
    masks = [sample_blocks(grid_size, target, np.random.default_rng([seed, first_index + i]), min_patches,
                           min_aspect)[0].ravel() for i in range(batch_size)]
    out = torch.from_numpy(np.stack(masks))
    return out.to(device) if device is not None else out


def masked_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Grid indices of the masked patches, ascending: bool (B, N) with ``count`` True per row ->
    long (B, count). Sorting instead of ``nonzero`` keeps the step free of host syncs."""
    return mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :count].sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens at grid indices: x (B, N, D), idx long (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def seeded_random_mask(batch_size: int, grid_size: tuple[int, int], ratio: float, seed: int, mask_unit: int = 1,
                       first_index: int = 0) -> torch.Tensor:
    """:func:`random_mask` -> bool (B, H*W), sample i drawn from its own generator seeded by (``seed``,
    ``first_index + i``), like :func:`block_mask`: a slice of a batch equals the batch's slice."""
    hc, wc = _unit_grid(grid_size, mask_unit)
    noise = np.stack([np.random.default_rng([seed, first_index + i]).random(hc * wc) for i in range(batch_size)])
    return _lowest_units(torch.from_numpy(noise), grid_size, ratio, mask_unit)


class MaskGenerator:
    """Builds the masks of step ``step`` from the config, deterministically: the mask of sample ``j`` of a
    step's global batch depends only on (seed, step, j), so a run draws the same masks on any number of
    processes, with any accumulation, and after a resume.

    Masks are built on the host one step ahead in a background thread (``prefetch``): blockwise masks
    are a per-sample Python loop, which would otherwise sit on the training step's critical path.
    """

    def __init__(self, kind: str, ratio: float, grid_size: tuple[int, int], mask_unit: int = 1,
                 min_patches: int = 4, min_aspect: float = 0.3, seed: int = 0, prefetch: bool = True) -> None:
        if kind not in ("random", "block"):
            raise ValueError(f"unknown mask type '{kind}'")
        self.kind, self.ratio, self.grid_size, self.mask_unit = kind, ratio, grid_size, mask_unit
        self.min_patches, self.min_aspect, self.seed, self.prefetch = min_patches, min_aspect, seed, prefetch
        num_masked(grid_size[0] * grid_size[1] // (mask_unit * mask_unit), ratio)  # validates ratio
        self._ahead: dict[tuple[int, int, int], _Ahead] = {}

    @classmethod
    def from_config(cls, mask: Any, patch_size: int, grid_size: tuple[int, int], seed: int) -> MaskGenerator:
        """The generator of a ``mask:`` section (:class:`~mimco.config.MaskConfig`) for a ViT of
        ``patch_size`` on ``grid_size`` (the config's rules have checked that its units tile the grid)."""
        unit = max((mask.mask_patch_size or patch_size) // patch_size, 1)
        return cls(mask.type, mask.ratio, tuple(grid_size), unit, mask.min_block_patches, mask.min_aspect, seed)

    @property
    def count(self) -> int:
        """Masked patches per image (the same for every image)."""
        h, w = self.grid_size
        u = 1 if self.kind == "block" else self.mask_unit
        return num_masked((h // u) * (w // u), self.ratio) * u * u

    def build(self, batch_size: int, step: int, first_index: int = 0) -> torch.Tensor:
        """The masks (batch_size, H*W) of global samples ``first_index ...`` at ``step``, on the host."""
        seed = self.seed * 1_000_003 + step
        if self.kind == "random":
            return seeded_random_mask(batch_size, self.grid_size, self.ratio, seed, self.mask_unit, first_index)
        return block_mask(batch_size, self.grid_size, self.ratio, seed, self.min_patches, self.min_aspect,
                          first_index=first_index)

    def __call__(self, batch_size: int, step: int, first_index: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Masks (batch_size, H*W) for the slice of the global batch starting at ``first_index``."""
        # for a GPU the host masks are built in page-locked memory, so the copy below is truly
        # asynchronous (from pageable memory it would wait for the device: a sync every step)
        pin = device is not None and torch.device(device).type == "cuda"
        key = (batch_size, step, first_index)
        ahead = self._ahead.pop(key, None)
        out = ahead.out.result() if ahead is not None else self._host(*key, pin)
        if self.prefetch:
            if len(self._ahead) > 64:  # keys that were never asked for (a changed schedule): forget them
                self._ahead.clear()
            nxt = (batch_size, step + 1, first_index)
            self._ahead[nxt] = _Ahead(self._host, (*nxt, pin))
        return out.to(device, non_blocking=True)

    def _host(self, batch_size: int, step: int, first_index: int, pin: bool) -> torch.Tensor:
        out = self.build(batch_size, step, first_index)
        return out.pin_memory() if pin else out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ahead": {}}


_PENDING: weakref.WeakSet[_Ahead] = weakref.WeakSet()


def join_pending() -> None:
    """Wait for every mask still being built in the background.

    The generator builds one step ahead, so the step after the last one is in flight when
    training ends. A process that exits (or forks loader workers) while that thread is inside
    torch can abort with "terminate called without an active exception"; the trainer calls
    this at the end of a run, and it also runs at interpreter exit."""
    for ahead in list(_PENDING):
        ahead.join()


atexit.register(join_pending)


class _Ahead(threading.Thread):
    """``fn(*args)`` in a short-lived daemon thread, which :func:`join_pending` waits for; ``out`` is
    the future of its result."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple) -> None:
        super().__init__(daemon=True, name="mimco-masks")
        self.fn, self.args, self.out = fn, args, Future()
        _PENDING.add(self)
        self.start()

    def run(self) -> None:
        try:
            self.out.set_result(self.fn(*self.args))
        except BaseException as e:  # handed to the caller by out.result()
            self.out.set_exception(e)
