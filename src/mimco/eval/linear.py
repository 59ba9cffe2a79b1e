"""Linear probe on frozen features: BatchNorm without affine, then a linear layer, SGD."""

from __future__ import annotations

import math

import torch
from torch import nn


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 1024, lr: float = 0.1,
                 weight_decay: float = 0.0, seed: int = 0) -> float:
    """Train BN(affine=False) + Linear with SGD (momentum 0.9, cosine lr) on features extracted
    once; returns test top-1 accuracy in percent."""
    g = torch.Generator().manual_seed(seed)
    c = int(max(train_labels.max(), test_labels.max())) + 1
    d = train_feats.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, c))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(train_feats)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    x, y = train_feats.float(), train_labels
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        pred = head(test_feats.float()).argmax(1)
    return float((pred == test_labels).float().mean() * 100)
