"""Linear probe on a frozen backbone: BatchNorm without affine, then a linear layer; SGD or LARS.

Two paths train the same head on the same batch order:
* fast (``linear_probe``): features are extracted once and the head trains on them;
* full (``linear_probe_full``): every batch goes through the frozen backbone, optionally with
  random-resized-crop + flip (the MAE protocol); without augmentation it agrees with the fast path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.optim import Lars
from torch import nn

from mimco.config import DataConfig
from mimco.data.build import ImageArray
from mimco.data.files import FileImages
from mimco.data.transforms import Normalize, image_eval
from mimco.eval.features import features_of


def _evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        pred = head(feats.float()).argmax(1)
    return float((pred == labels).float().mean() * 100)


def train_head(fetch: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, dim: int, num_classes: int,
               epochs: int = 30, batch_size: int = 1024, lr: float = 0.1, weight_decay: float = 0.0,
               optimizer: str = "sgd", seed: int = 0) -> nn.Sequential:
    """Train BN(affine=False) + Linear on ``fetch(indices) -> features (B, dim)``.

    SGD (momentum 0.9) or LARS, cosine lr per step; the batch order depends only on ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "lars":
        opt = Lars(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose sgd or lars")
    n = len(labels)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(head(fetch(idx).float()), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 1024, lr: float = 0.1,
                 weight_decay: float = 0.0, seed: int = 0, optimizer: str = "sgd") -> float:
    """The fast path: train on features extracted once; returns test top-1 in percent."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    x = train_feats.float()
    head = train_head(lambda idx: x[idx], train_labels, x.shape[1], c, epochs, batch_size, lr, weight_decay, optimizer,
                      seed)
    return _evaluate(head, test_feats, test_labels)


def linear_probe_full(backbone: nn.Module, train: ImageArray | FileImages, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, data: DataConfig, device: torch.device, epochs: int = 30,
                      batch_size: int = 1024, lr: float = 0.1, weight_decay: float = 0.0, seed: int = 0,
                      optimizer: str = "sgd", pool: str = "cls", augment: bool = False) -> float:
    """The full path: every batch through the frozen backbone (eval mode, no gradient).

    ``augment`` adds random-resized-crop (scale 0.08-1) + flip per batch.
    """
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

        def images(idx: torch.Tensor) -> torch.Tensor:  # un-normalised [0, 1] images
            out = []
            for i in idx.tolist():
                img = train.load(i)
                out.append(tf(img) if img is not None else torch.zeros(data.channels, data.img_size, data.img_size))
            return torch.stack(out).to(device) * norm.std + norm.mean

    def fetch(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = images(idx)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
            if aug is not None:
                x = aug(x)
            return features_of(backbone, norm(x), pool).float().cpu()

    c = int(max(labels.max(), test_labels.max())) + 1
    dim = fetch(torch.arange(2)).shape[1]
    head = train_head(fetch, labels, dim, c, epochs, batch_size, lr, weight_decay, optimizer, seed)
    return _evaluate(head, test_feats, test_labels)
