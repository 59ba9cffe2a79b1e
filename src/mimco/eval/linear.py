"""Linear probe on a frozen backbone: BatchNorm without affine, then a linear layer; SGD or LARS.

The fast path (``linear_probe``) trains on features extracted once; the full one
(``linear_probe_full``) sends every batch through the backbone, optionally augmented (MAE). A grid of
settings, one head each in one pass: docs/evaluation.md ("The linear probe's learning-rate grid").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from timm.optim import Lars
from torch import nn
from torch.nn import functional as F

from mimco.config import DataConfig
from mimco.data.build import ImageArray
from mimco.data.files import FileImages
from mimco.data.transforms import Normalize, image_eval
from mimco.errors import MimcoError
from mimco.eval.features import features_of

DEFAULT_LR = 0.1
# DINOv2's 1-2-5 steps, placed around this recipe's single learning rate (SGD with momentum on
# batch-normalised features, batch 1024): 0.001 .. 1.0, 10 settings. `mimco linprobe`'s default.
DEFAULT_LR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
HELD_OUT_FRACTION = 0.1
MIN_HELD_OUT = 10  # fewer held-out images than this: no choice is made (see ``fallback_setting``)

Fetch = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choice:
    """The setting a probe was trained with, and how it was chosen."""

    lr: float
    weight_decay: float
    held_out: int = 0  # training images held out to choose it; 0: no choice was made
    scores: dict[tuple[float, float], float] = field(default_factory=dict)  # (lr, wd) -> held-out top-1 (%)
    note: str = ""


class Top1(float):
    """A top-1 accuracy in percent that also carries the :class:`Choice` behind it. Anything that
    rebuilds a float of its own type from a number (``statistics.mean`` does) gets ``choice=None``:
    a mean of probes was trained with no one setting."""

    choice: Choice | None

    def __new__(cls, value: float, choice: Choice | None = None) -> Top1:
        out = super().__new__(cls, value)
        out.choice = choice
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return Top1, (float(self), self.choice)

    @property
    def lr(self) -> float | None:
        return None if self.choice is None else self.choice.lr


class LinearHeads(nn.Module):
    """K linear heads on one input: one BatchNorm1d without affine (every head sees the same batch,
    so the K normalisations would be the same) and K ``nn.Linear`` layers, one matrix product for
    all. ``forward(x)``: logits (K, B, C); ``per_sample(x)``: the same numbers as (B, K, C)."""

    def __init__(self, dim: int, num_classes: int, heads: int = 1):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(heads))

    def per_sample(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([lin.weight for lin in self.linears])
        b = torch.cat([lin.bias for lin in self.linears])
        return F.linear(self.norm(x), w, b).view(len(x), len(self.linears), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_sample(x).transpose(0, 1)


def held_out_split(labels: torch.Tensor, fraction: float = HELD_OUT_FRACTION,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) ascending indices: ``floor(fraction * n_c)`` images of every class c held
    out, drawn by a generator seeded with ``seed`` alone (a class of fewer than 1 / fraction
    images keeps them all)."""
    y = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=g)[: int(fraction * len(members))]])
    out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[out] = False
    return keep.nonzero().flatten(), out


def train_heads(fetch: Fetch, labels: torch.Tensor, dim: int, num_classes: int,
                settings: Sequence[tuple[float, float]], epochs: int = 30, batch_size: int = 1024,
                optimizer: str = "sgd", seed: int = 0, device: torch.device | str | None = None) -> LinearHeads:
    """Train one BN(affine=False) + Linear head per (lr, weight decay) of ``settings`` on
    ``fetch(indices) -> features (B, dim)``, every batch fetched once for all heads: SGD (momentum 0.9)
    or LARS, one group per head, cosine lr per step. Same start and a batch order from ``seed`` alone,
    so head k is what ``settings[k]`` alone trains. Runs on ``device`` (default: that of ``labels``)."""
    device = torch.device(device) if device is not None else labels.device
    g = torch.Generator().manual_seed(seed)
    heads = LinearHeads(dim, num_classes, len(settings))
    with torch.no_grad():
        first = heads.linears[0]
        first.weight.normal_(0, 0.01, generator=g)
        for lin in heads.linears:
            lin.weight.copy_(first.weight)
            lin.bias.zero_()
    heads.to(device)
    groups = [{"params": list(lin.parameters()), "lr": a, "weight_decay": w}
              for lin, (a, w) in zip(heads.linears, settings, strict=True)]
    optimizers = {"sgd": torch.optim.SGD, "lars": Lars}
    if optimizer not in optimizers:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose sgd or lars")
    opt = optimizers[optimizer](groups, lr=settings[0][0], momentum=0.9)
    labels = labels.to(device)
    n = len(labels)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    heads.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue
            y, logits = labels[idx], heads.per_sample(fetch(idx).float())
            # the sum over heads of each head's mean loss, in one call (a slice per head is slow)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(len(settings))) * len(settings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return heads


def held_out_scores(heads: LinearHeads, fetch: Fetch, labels: torch.Tensor, indices: torch.Tensor,
                    batch_size: int = 1024) -> tuple[list[float], list[float]]:
    """(top-1 in percent, mean cross-entropy) of every head on ``indices``; logits that are not
    finite (a diverged head) count as wrong and as an infinite loss."""
    heads.eval()
    device = next(heads.parameters()).device
    labels = labels.to(device)
    k = len(heads.linears)
    correct = torch.zeros(k, device=device)
    loss = torch.zeros(k, device=device, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            idx = indices[i : i + batch_size]
            logits, y = heads.per_sample(fetch(idx).float()), labels[idx]  # (B, K, C), (B,)
            finite = torch.isfinite(logits).all(-1)
            correct += ((logits.argmax(-1) == y[:, None]) & finite).sum(0)
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(k), reduction="none").view(-1, k)
            loss += torch.where(finite, ce, torch.inf).sum(0).double()
    n = max(len(indices), 1)
    return (correct * 100 / n).tolist(), (loss / n).nan_to_num(nan=math.inf).tolist()


def _choose(fetch: Fetch, score_fetch: Fetch, labels: torch.Tensor, dim: int, num_classes: int,
            settings: list[tuple[float, float]], epochs: int, batch_size: int, optimizer: str, seed: int,
            device: torch.device) -> Choice:
    """The grid's setting whose head, trained on the fit part of the training split, has the best
    held-out top-1 (then the lowest held-out loss, then the first in the grid)."""
    if len(settings) == 1:
        return Choice(*settings[0])
    fit, held = held_out_split(labels, HELD_OUT_FRACTION, seed)
    if len(held) < MIN_HELD_OUT:  # the lr nearest DEFAULT_LR (log scale; the smaller on a tie), the first wd
        lr = min((a for a, _ in settings), key=lambda a: (abs(math.log(max(a, 1e-30) / DEFAULT_LR)), a))
        wd = settings[0][1]
        note = (f"{len(labels)} training images are too few to hold out {HELD_OUT_FRACTION:.0%} of each class "
                f"(at least {MIN_HELD_OUT} images); no choice made: lr {lr:g}, weight decay {wd:g}")
        print(f"[linprobe] {note}", file=sys.stderr, flush=True)
        return Choice(lr, wd, 0, {}, note)
    heads = train_heads(lambda idx: fetch(fit[idx]), labels[fit.to(labels.device)], dim, num_classes, settings,
                        epochs, batch_size, optimizer, seed, device)
    top1, loss = held_out_scores(heads, score_fetch, labels, held, batch_size)
    best = min(range(len(settings)), key=lambda j: (-top1[j], loss[j], j))
    return Choice(*settings[best], len(held), {s: round(t, 2) for s, t in zip(settings, top1, strict=True)})


def _probe(fetch: Fetch, plain: Fetch, labels: torch.Tensor, dim: int, test_feats: torch.Tensor,
           test_labels: torch.Tensor, epochs: int, batch_size: int, lr: float | Sequence[float],
           weight_decay: float | Sequence[float], seed: int, optimizer: str, device: torch.device) -> Top1:
    """Choose a setting (a grid's, on held-out training images scored through ``plain``), train it on
    the whole split through ``fetch`` and score it on the test features: top-1 in percent."""
    lrs, wds = ([float(v)] if isinstance(v, Real) else [float(x) for x in v] for v in (lr, weight_decay))
    if not lrs or not wds:
        raise MimcoError("the linear probe needs at least one learning rate and one weight decay")
    c = int(max(labels.max(), test_labels.max())) + 1
    settings = [(a, w) for a in lrs for w in wds]
    choice = _choose(fetch, plain, labels, dim, c, settings, epochs, batch_size, optimizer, seed, device)
    heads = train_heads(fetch, labels, dim, c, [(choice.lr, choice.weight_decay)], epochs, batch_size, optimizer,
                        seed, device).eval()
    with torch.no_grad():
        pred = heads(test_feats.to(device).float())[0].argmax(1)
    return Top1(float((pred == test_labels.to(device)).float().mean() * 100), choice)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 1024,
                 lr: float | Sequence[float] = DEFAULT_LR, weight_decay: float | Sequence[float] = 0.0,
                 seed: int = 0, optimizer: str = "sgd") -> Top1:
    """The fast path on features (N, D) extracted once, on their device: test top-1 in percent (a
    float; ``.choice`` holds the setting, chosen when ``lr`` or ``weight_decay`` is a grid)."""
    x = train_feats.float()
    fetch = x.__getitem__
    return _probe(fetch, fetch, train_labels, x.shape[1], test_feats, test_labels, epochs, batch_size, lr,
                  weight_decay, seed, optimizer, x.device)


def linear_probe_full(backbone: nn.Module, train: ImageArray | FileImages, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, data: DataConfig, device: torch.device, epochs: int = 30,
                      batch_size: int = 1024, lr: float | Sequence[float] = DEFAULT_LR,
                      weight_decay: float | Sequence[float] = 0.0, seed: int = 0, optimizer: str = "sgd",
                      pool: str = "cls", augment: bool = False) -> Top1:
    """The full path: every batch through the frozen backbone (eval mode, no gradient), the head
    on ``device``. ``augment`` adds random-resized-crop (scale 0.08-1) + flip per batch; a grid's
    held-out part is scored without it."""
    import kornia.augmentation as K

    backbone.eval()
    norm = Normalize(data.mean, data.std, data.channels).to(device)
    aug = nn.Sequential(K.RandomResizedCrop((data.img_size, data.img_size), scale=(0.08, 1.0)),
                        K.RandomHorizontalFlip()) if augment else None
    if isinstance(train, ImageArray):
        labels = train.labels

        def images(idx: torch.Tensor) -> torch.Tensor:
            return train.batch(idx).to(device)
    else:
        tf = image_eval(data)
        labels = torch.tensor([c for _, c in train.items])
        blank = torch.zeros(data.channels, data.img_size, data.img_size)  # an unreadable file

        def images(idx: torch.Tensor) -> torch.Tensor:  # un-normalised [0, 1] images
            out = [blank if (img := train.load(i)) is None else tf(img) for i in idx.tolist()]
            return torch.stack(out).to(device) * norm.std + norm.mean

    def fetch(idx: torch.Tensor, augmented: bool = True) -> torch.Tensor:
        with torch.no_grad():
            x = images(idx)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
            if aug is not None and augmented:
                x = aug(x)
            return features_of(backbone, norm(x), pool).float()

    dim = fetch(torch.arange(2)).shape[1]
    return _probe(fetch, lambda idx: fetch(idx, False), labels, dim, test_feats, test_labels, epochs, batch_size, lr,
                  weight_decay, seed, optimizer, device)
