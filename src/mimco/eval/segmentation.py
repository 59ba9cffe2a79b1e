"""Semantic segmentation on patch tokens: DINOv2's linear head (BatchNorm + 1x1 convolution, logits
upsampled bilinearly), mIoU and pixel accuracy (scored as mmsegmentation does:
docs/evaluation.md#dense-transfer-segmentation), and the frozen probe behind ``mimco segprobe``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from mimco import distributed as dist
from mimco.config import DataConfig, SegAugConfig
from mimco.data.files import worker_ignores_stop
from mimco.data.segmentation import (
    IGNORE,
    SegSplit,
    collate_eval,
    seg_eval_transform,
    seg_resize_transform,
    seg_train_transform,
)
from mimco.engine.amp import autocast
from mimco.errors import MimcoError
from mimco.eval.features import gather_host_rows
from mimco.eval.position import position_scores


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted, of the pixels of ``pred`` and
    ``target`` (same shape, class indices) whose target is not ``ignore_index``."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores(conf: torch.Tensor) -> dict[str, float]:
    """mIoU, mean class accuracy and pixel accuracy (percent) of a confusion matrix; ``classes``:
    how many classes entered the mean (those with a non-empty union)."""
    c = conf.double()
    tp, true = c.diag(), c.sum(1)  # true: the pixels of each class
    union = c.sum(0) + true - tp
    present, labelled, total = union > 0, true > 0, c.sum()
    return {"miou": float((tp[present] / union[present]).mean() * 100) if present.any() else 0.0,
            "macc": float((tp[labelled] / true[labelled]).mean() * 100) if labelled.any() else 0.0,
            "pixel_acc": float(tp.sum() / total * 100) if total > 0 else 0.0, "classes": int(present.sum())}


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the global batch's training statistics under a process group. On GPUs the
    engine makes it torch's ``SyncBatchNorm``, which refuses CPU tensors: under gloo the per-channel
    sums go through ``torch.distributed.nn``'s differentiable all-reduce here. Alone, in evaluation,
    or with ``across_processes`` False (one process trains it), it is BatchNorm2d."""

    across_processes = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.across_processes and dist.is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf, c = x.float(), x.shape[1]
        n = xf.new_full((1,), float(x.numel() // c))  # a fill on the device, no host copy
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n]))
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp(min=0)
        if self.running_mean is not None and self.running_var is not None:  # track_running_stats
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1) * m)
                self.num_batches_tracked += 1
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class SegHead(nn.Module):
    """BatchNorm2d + 1x1 convolution: patch grid (B, D, h, w) -> logits (B, K, h, w)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = GlobalBatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def check_backbone(backbone: nn.Module | None, layers: int, what: str = "the checkpoint") -> None:
    """Refuse what has no patch tokens (a CNN) and a ``layers`` count beyond the depth."""
    if backbone is None:
        return
    if not all(hasattr(backbone, a) for a in ("forward_intermediates", "blocks", "patch_embed")):
        raise MimcoError(f"{what} is a {type(backbone).__name__}, which has no patch tokens; segmentation here takes a "
                         "ViT (mimco runs, MoCo v3, DINO, DINOv2, MAE, CLIP, timm ViTs)")
    depth = len(backbone.blocks)
    if not 1 <= layers <= depth:
        raise MimcoError(f"--layers {layers} is out of range: {what} has {depth} blocks; give 1..{depth}")


def patch_grid(backbone: nn.Module | None, x: torch.Tensor, layers: int = 1, patch: int = 0) -> torch.Tensor:
    """Patch features on the grid: images (B, C, H, W) -> (B, D * layers, H/p, W/p), the last
    ``layers`` blocks' patch tokens after the final norm (timm's ``forward_intermediates``),
    concatenated. ``backbone=None``: each patch's raw pixels (``patch`` pixels a side), the floor."""
    if backbone is None:
        return F.pixel_unshuffle(x, patch)
    maps = backbone.forward_intermediates(x, indices=layers, norm=True, output_fmt="NCHW", intermediates_only=True)
    return torch.cat(maps, 1) if len(maps) > 1 else maps[0]


def grid_dim(backbone: nn.Module | None, channels: int, layers: int = 1, patch: int = 0) -> int:
    return channels * patch * patch if backbone is None else backbone.embed_dim * layers


@functools.lru_cache(maxsize=32)
def _linear_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): row j holds the weights of the inputs in output j of a 1-D linear resize
    (align_corners=False), read off ``F.interpolate`` of the identity."""
    eye = torch.eye(n_in, device=device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def upsampled(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, K, h, w) -> (B, K, H, W), bilinear (align_corners=False), in float32: the same
    numbers as ``F.interpolate``, computed as two small matrix products (one per axis), whose
    backward is a matrix product too (the CPU kernel of bilinear interpolation's backward is
    the probe's slowest step otherwise)."""
    h, w = logits.shape[-2:]
    rows = _linear_weights(h, int(size[0]), logits.device)
    cols = _linear_weights(w, int(size[1]), logits.device)
    return torch.einsum("Hh,bkhw,Ww->bkHW", rows, logits.float(), cols)


def seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of grid logits (B, K, h, w) upsampled to the masks (B, H, W), ignoring 255."""
    return F.cross_entropy(upsampled(logits, masks.shape[-2:]), masks, ignore_index=IGNORE)


def _readable(split: SegSplit | Subset, batch_size: int, workers: int,
              order: list[int] | None = None) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], int]]:
    """The batches of ``split`` (in ``order``, dropping a last short batch, when given) that hold a
    readable sample: (images, masks at their own sizes, unreadable count)."""
    loader = DataLoader(split, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval, sampler=order,
                        drop_last=order is not None, worker_init_fn=worker_ignores_stop)
    return (b for b in loader if b is not None)


def val_batches(split: SegSplit, data: DataConfig, batch_size: int,
                indices: list[int] | None = None) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], int]]:
    """(images (B, C, S, S), masks at their own sizes, unreadable count) of the validation split (or
    the samples at ``indices``), un-augmented."""
    split.transform = seg_eval_transform(data)
    return _readable(split if indices is None else Subset(split, indices), batch_size, data.num_workers)


def confusion_of(predict: Callable[[torch.Tensor], torch.Tensor], batches: Any, num_classes: int,
                 device: torch.device) -> torch.Tensor:
    """Sum of the confusion matrices of ``predict(images) -> grid logits`` over ``batches`` (on
    ``device``)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for x, masks, _ in batches:
        logits = predict(x.to(device, non_blocking=True))
        same = all(m.shape == masks[0].shape for m in masks)  # else masks at their own sizes: one sample at a time
        pairs = [(logits, torch.stack(masks))] if same else [(lg[None], m[None]) for lg, m in zip(logits, masks)]
        for lg, m in pairs:
            conf += confusion_matrix(upsampled(lg, m.shape[-2:]).argmax(1), m.to(device), num_classes)
    return conf


#: the frozen probe extracts the training split's patch grids once when they take at most this many bytes
#: (float16); above it (ADE20K at 512 px: 20k x 384 x 32 x 32 x 2 B = 16 GB) every batch goes through the backbone
CACHE_BYTES = 4 * 2**30


@torch.no_grad()
def grid_features(backbone: nn.Module | None, split: SegSplit, data: DataConfig, device: torch.device,
                  layers: int = 1, patch: int = 0, batch_size: int = 64,
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen probe's training set, extracted once: (patch grids (N, D, h, w) float16 on the CPU,
    masks resized with the image to S x S (N, S, S) uint8). Unreadable samples are left out. Under
    torchrun each process extracts one contiguous share and the main process gathers them, in the
    split's order (the others get empty tensors)."""
    split.transform = seg_resize_transform(data)
    s, p = data.img_size, patch or backbone.patch_embed.patch_size[0]
    per, r = math.ceil(len(split) / dist.world_size()), dist.rank()
    part = split if not dist.is_dist() else Subset(split, list(range(r * per, min(len(split), (r + 1) * per))))
    feats = [torch.empty(0, grid_dim(backbone, data.channels, layers, p), s // p, s // p, dtype=torch.half)]
    masks = [torch.empty(0, s, s, dtype=torch.uint8)]
    for x, m, _ in _readable(part, batch_size, data.num_workers):
        with autocast(device, precision):
            feats.append(patch_grid(backbone, x.to(device), layers, patch).half().cpu())
        masks.append(torch.stack(m).to(torch.uint8))
    grids, labels = gather_host_rows(torch.cat(feats), device), gather_host_rows(torch.cat(masks), device)
    if grids is None or labels is None:
        return feats[0], masks[0]
    if not len(grids):
        raise MimcoError("no readable training sample; check data.root")
    return grids, labels


def train_probe_head(batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]], dim: int,
                     num_classes: int, steps_per_epoch: int, device: torch.device, epochs: int = 20, lr: float = 1e-3,
                     weight_decay: float = 1e-4, seed: int = 0) -> SegHead:
    """Train :class:`SegHead` on ``batches(epoch) -> (patch grids (B, dim, h, w), masks (B, S, S))``:
    AdamW, per-step cosine, cross-entropy on logits upsampled to the masks; the head's start depends
    only on ``seed``. One process trains it (under torchrun the main one): its BatchNorm stays local."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SegHead(dim, num_classes).to(device)
    head.bn.across_processes = False
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    head.train()
    for epoch in range(epochs):
        for f, m in batches(epoch):
            loss = seg_loss(head(f.to(device).float()), m.to(device).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def segprobe(backbone: nn.Module | None, train: SegSplit, val: SegSplit, data: DataConfig, device: torch.device,
             layers: int = 1, patch: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
             weight_decay: float = 1e-4, seeds: tuple[int, ...] = (0,), precision: str = "fp32",
             augment: SegAugConfig | None = None, cache: bool | None = None,
             position: bool = True) -> tuple[dict[str, Any], list[SegHead]]:
    """The frozen probe: one head per seed on the training split's patch grids, each scored on the
    validation split. The grids are extracted once (``cache``; None = when they take at most
    :data:`CACHE_BYTES`), else every batch goes through the backbone, with the joint augmentation
    ``augment`` when given (which needs the second path). Returns ({"miou": [per seed], "macc": [...],
    "pixel_acc": [...], "path": "cached" | "streamed"}, plus, with ``position`` on the cached path,
    :func:`mimco.eval.position.position_scores`; the heads). Under torchrun the cached grids are
    extracted by every process, a share each; the heads are trained and scored on the main process
    alone (the others return ({"path": ...}, []))."""
    p = patch or backbone.patch_embed.patch_size[0]
    dim = grid_dim(backbone, data.channels, layers, p)
    if cache is None:
        cache = augment is None and len(train) * dim * (data.img_size // p) ** 2 * 2 <= CACHE_BYTES
    if backbone is not None:
        backbone.eval()
    if cache:
        feats, masks = grid_features(backbone, train, data, device, layers, p, batch_size, precision)
        held = grid_features(backbone, val, data, device, layers, p, batch_size, precision)[0] if position else None
    if not dist.is_main():  # the main process trains and scores the heads (the cached grids' shares are with it)
        return {"path": "cached" if cache else "streamed"}, []
    if not cache:
        train.transform = seg_train_transform(augment, data) if augment is not None else seg_resize_transform(data)
    n = len(feats) if cache else len(train)

    def batches(seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        if cache:
            for i in range(0, n - batch_size + 1, batch_size):
                yield feats[perm[i : i + batch_size]], masks[perm[i : i + batch_size]]
            return
        for x, m, _ in _readable(train, batch_size, data.num_workers, perm.tolist()):
            with torch.no_grad(), autocast(device, precision):
                f = patch_grid(backbone, x.to(device), layers, p).float()
            yield f, torch.stack(m)

    per_epoch = n // batch_size
    if per_epoch < 1:
        raise MimcoError(f"--batch-size {batch_size} exceeds the {len(train)} training samples; lower it")
    out: dict[str, Any] = position_scores(feats, held, device) if cache and position else {}
    heads = []
    for seed in seeds:
        head = train_probe_head(functools.partial(batches, seed), dim, train.num_classes, per_epoch, device, epochs,
                                lr, weight_decay, seed)

        def predict(x: torch.Tensor, head: SegHead = head) -> torch.Tensor:
            with torch.no_grad(), autocast(device, precision):
                return head(patch_grid(backbone, x, layers, p).float())

        conf = confusion_of(predict, val_batches(val, data, batch_size), train.num_classes, device)
        for k, v in scores(conf).items():
            if k != "classes":
                out.setdefault(k, []).append(v)
        heads.append(head)
    out["path"] = "cached" if cache else "streamed"
    return out, heads


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, val: SegSplit, data: DataConfig, device: torch.device, batch_size: int = 32,
                       precision: str = "fp32") -> dict[str, float]:
    """mIoU / pixel accuracy of ``model(images) -> grid logits`` on the validation split, across
    processes: each scores every world-th sample, the confusion matrices are summed, and every
    process runs the same number of forward passes (an FSDP model's forward is a collective)."""
    was = model.training
    model.eval()
    idx = list(range(dist.rank(), len(val), dist.world_size()))
    batches = int(dist.all_reduce_(torch.tensor(math.ceil(len(idx) / batch_size), device=device), "max"))
    done = 0

    def predict(x: torch.Tensor) -> torch.Tensor:
        nonlocal done
        done += 1
        with autocast(device, precision):
            return model(x)

    conf = confusion_of(predict, val_batches(val, data, batch_size, idx), val.num_classes, device)
    x0 = torch.zeros(1, data.channels, data.img_size, data.img_size, device=device)
    for _ in range(batches - done):  # unreadable samples left this process short: keep in step
        model(x0)
    model.train(was)
    return scores(dist.all_reduce_(conf))
