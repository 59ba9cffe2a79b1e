"""The k-NN monitor of a pre-training run (``eval.every_epochs`` / ``eval.every_steps``).

Class-balanced subsets of the training and test splits drawn once (:func:`monitor_splits`, the
ones ``mimco knn --monitor`` scores) are embedded by the live backbone on every process and scored
by weighted k-NN on rank 0 (``knn_monitor`` in ``log.csv``); a few test images become TensorBoard
pictures (input, masked input, CLS attention, PCA of the patch tokens). Sizing: docs/training.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torchvision.utils import make_grid

from mimco import distributed as dist
from mimco.config import DataConfig, EvalConfig
from mimco.data.build import load_dataset
from mimco.data.subsets import labelled_subset, labels_of
from mimco.engine.amp import autocast
from mimco.engine.compiling import is_compiled
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches, extract_features_distributed
from mimco.eval.knn import knn_accuracy
from mimco.eval.probe import has_labels
from mimco.masking import random_mask


def _balanced(split: Any, size: int, seed: int, key: str, name: str) -> Any:
    """Up to ``size`` images of ``split``, the same number from every class (``size // classes``,
    at most the smallest class: a size beyond what the split holds is capped, in one line on the
    main process)."""
    labels = labels_of(split)
    counts = torch.bincount(labels[labels >= 0])
    present = counts[counts > 0]
    classes = len(present)
    if classes and size < classes:
        raise MimcoError(f"{key}={size} is fewer than one image for each of the {classes} classes; set {key} to at "
                         f"least {classes}")
    per_class = max(size // max(classes, 1), 1)
    if classes and per_class > int(present.min()):
        per_class = int(present.min())
        if dist.is_main():
            print(f"mimco: {key}={size} is more than the {name} split's {len(split)} images give class-balanced; the "
                  f"monitor uses {per_class * classes} ({per_class} of each of {classes} classes)", file=sys.stderr)
    return labelled_subset(split, per_class, 0.0, seed, key)


def monitor_splits(train: Any, test: Any, ev: EvalConfig) -> tuple[Any, Any]:
    """(bank, queries): the monitor's fixed class-balanced subsets of the training and test splits."""
    if not has_labels(train, test):
        raise MimcoError("eval.every_epochs / eval.every_steps score k-NN, which needs a labelled dataset with a test "
                         "split (fashion_mnist, cifar10, an imagefolder with train/ and val/); set them to 0")
    return (_balanced(train, ev.monitor_train, ev.monitor_seed, "eval.monitor_train", "training"),
            _balanced(test, ev.monitor_test, ev.monitor_seed + 1, "eval.monitor_test", "test"))


@contextmanager
def _eager(module: torch.nn.Module) -> Iterator[None]:
    """Inside, the modules of ``module`` compiled in place (``train.compile``) run their plain forward.
    The attention picture reads a block's q/k projection through a forward hook, which a compiled
    block's graph (traced without it, for the extraction just before) would skip; the compiled code
    is left as it is, so the steps after reuse it without recompiling."""
    saved = [(m, m._compiled_call_impl) for m in module.modules() if is_compiled(m)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def monitor_images(backbone: torch.nn.Module, x: torch.Tensor, data: DataConfig, mask: Any = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Pictures of images ``x`` (B, C, S, S, normalised) for TensorBoard, each (3, H, W) in [0, 1]:
    ``inputs`` (with, given a ``mask`` section, each image masked as stage 2 masks it, below) and
    ``features`` (the CLS attention of the last block and the PCA of the patch tokens, upsampled,
    one row each)."""
    from mimco.eval.plots import cls_attention, denormalize, pca_maps

    was = backbone.training
    shown = denormalize(x, data.mean, data.std).clamp(0, 1).expand(-1, 3, -1, -1)  # grey: 3 channels
    size = x.shape[-2:]
    rows = [shown]
    if mask is not None:
        grid = tuple(backbone.patch_embed.grid_size)
        unit = max(mask.mask_patch_size // backbone.patch_embed.patch_size[0], 1) if mask.mask_patch_size else 1
        hidden = random_mask(len(x), grid, mask.ratio, unit, torch.Generator().manual_seed(seed))
        hidden = F.interpolate(hidden.view(-1, 1, *grid).float(), size=size, mode="nearest")
        rows.append(shown * (1 - hidden) + 0.5 * hidden)
    out = {"inputs": make_grid(torch.cat(rows), nrow=len(x), padding=1)}
    feats = []
    if hasattr(backbone, "blocks") and hasattr(backbone.blocks[-1], "attn"):
        with _eager(backbone):
            att = cls_attention(backbone, x).float().cpu()
        att = att / att.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1)
        feats.append(F.interpolate(att[:, None], size=size, mode="nearest").expand(-1, 3, -1, -1))
    pca = torch.from_numpy(pca_maps(backbone, x)).permute(0, 3, 1, 2).float()
    feats.append(F.interpolate(pca, size=size, mode="nearest"))
    out["features"] = make_grid(torch.cat(feats), nrow=len(x), padding=1)
    backbone.train(was)
    return out


class KnnMonitor:
    """The monitor of one run: its subsets, when it is due, and one scoring."""

    def __init__(self, cfg: Any) -> None:
        self.ev, self.data, self.mask = cfg.eval, cfg.data, getattr(cfg, "mask", None)
        self.bank, self.queries = monitor_splits(load_dataset(cfg.data, train=True),
                                                 load_dataset(cfg.data, train=False), cfg.eval)

    @property
    def size(self) -> int:
        return len(self.bank) + len(self.queries)

    def describe(self) -> str:
        """``60 bank, 30 queries, of 6 classes``."""
        classes = int((torch.bincount(labels_of(self.bank)) > 0).sum())
        return f"{len(self.bank)} bank, {len(self.queries)} queries, of {classes} classes"

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """After step ``step``: every ``every_steps`` steps, and at the end of every ``every_epochs``-th
        whole epoch."""
        ev = self.ev
        by_steps = bool(ev.every_steps) and step % ev.every_steps == 0
        epochs, rest = divmod(step, steps_per_epoch)
        return by_steps or (rest == 0 and bool(ev.every_epochs) and epochs % ev.every_epochs == 0)

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device,
                 precision: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """({"knn_monitor": top-1 %} on rank 0, {} elsewhere; the pictures on the main process, {}
        elsewhere). A collective: every process calls it."""
        bank = extract_features_distributed(backbone, self.bank, self.data, device, precision)
        queries = extract_features_distributed(backbone, self.queries, self.data, device, precision)
        images: dict[str, torch.Tensor] = {}
        # the main process alone draws them; under FSDP (the backbone holds FSDP2 units) each unit's forward is a
        # collective, so every process runs the pictures' forward passes with it (and drops what it drew)
        if dist.is_main() or any(isinstance(m, FSDPModule) for m in backbone.modules()):
            x = next(eval_batches(self.queries, self.data, 8, device))[0]  # the 8 test images shown
            with autocast(device, precision):  # FSDP's bf16 policy gathers bf16 parameters: inputs must follow
                images = monitor_images(backbone, x, self.data, self.mask, self.ev.monitor_seed)
            images = images if dist.is_main() else {}
        if bank is None or queries is None:
            return {}, images
        # gathered to host memory; scored on the run's device (the search is a matrix product)
        acc = knn_accuracy(bank[0].to(device), bank[1], queries[0], queries[1], self.ev.knn_k, self.ev.knn_temperature)
        return {"knn_monitor": round(acc, 2)}, images
