"""Random state of a process (Python, NumPy, torch CPU, CUDA) and of every process of a run: each process
draws its own augmentations and drop-path masks, so a checkpoint keeps one state per process (rank order)
and a resume gives each process its own back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from mimco import distributed as dist


def rng_state() -> dict[str, Any]:
    """This process's generators, as tensors and plain values (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_process(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) of this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_rng_states() -> list[dict[str, Any]]:
    """Every process's :func:`rng_state`, in rank order (a collective when distributed)."""
    out: list[Any] = [rng_state()] * dist.world_size()
    if dist.is_dist():
        torch.distributed.all_gather_object(out, out[0])
    return out


def restore_rank_state(saved: list[dict[str, Any]] | dict[str, Any], fallback_seed: int) -> None:
    """Give this process its own saved state; a process the run did not have before (resumed on
    more processes) is seeded from ``fallback_seed`` and its rank instead."""
    states = [saved] if isinstance(saved, dict) else list(saved)
    r = dist.rank()
    if r < len(states):
        set_rng_state(states[r])
    else:
        seed_process(fallback_seed * 1000 + r + 1)
