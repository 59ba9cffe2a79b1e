"""How much of a backbone's patch tokens is their grid position, from frozen patch grids
``(N, D, h, w)`` (:func:`mimco.eval.segmentation.grid_features`): ``position_acc`` and
``position_share``, both in percent, defined in docs/evaluation.md ("Token position")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: tokens the classifier is trained on (a seeded sample when the grids hold more)
MAX_TOKENS = 200_000
#: the classifier's fewest steps (small grids: several passes)
MIN_STEPS = 300


def _tokens(grids: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> (N * h * w, D) float32; token ``k`` sits at position ``k % (h * w)``."""
    n, d, h, w = grids.shape
    return grids.float().permute(0, 2, 3, 1).reshape(n * h * w, d)


def position_share(train: torch.Tensor, val: torch.Tensor) -> float:
    """The share (%) of ``val``'s token variance explained by the per-position means of ``train``."""
    x = _tokens(val)
    per_position = train.float().mean(0).flatten(1).T  # (h * w, D)
    residual = (x - per_position.repeat(len(val), 1)).pow(2).sum(1).mean()
    total = (x - _tokens(train).mean(0)).pow(2).sum(1).mean()
    return float(100 * (1 - residual / total.clamp_min(1e-12)))


def position_accuracy(train: torch.Tensor, val: torch.Tensor, device: torch.device, epochs: int = 10,
                      batch_size: int = 4096, lr: float = 1e-2, seed: int = 0) -> float:
    """Accuracy (%) on ``val`` of a linear token -> position classifier trained on ``train`` (AdamW,
    cosine, cross-entropy, ``epochs`` passes and at least :data:`MIN_STEPS` steps; at most
    :data:`MAX_TOKENS` training tokens, a seeded sample)."""
    positions = train.shape[2] * train.shape[3]
    x = _tokens(train)
    y = torch.arange(positions).repeat(len(train))
    g = torch.Generator().manual_seed(seed)
    if len(x) > MAX_TOKENS:
        keep = torch.randperm(len(x), generator=g)[:MAX_TOKENS]
        x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = ((x - mean) / std).to(device)
    y = y.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], positions).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    batch_size = min(batch_size, len(x))
    steps = max(epochs * (len(x) // batch_size), MIN_STEPS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:  # a new pass over the tokens in a seeded order
            order = torch.cat([order, torch.randperm(len(x), generator=g)])
        b, order = order[:batch_size].to(device), order[batch_size:]
        loss = F.cross_entropy(head(x[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    right = 0
    with torch.no_grad():
        xv = _tokens(val)
        yv = torch.arange(positions).repeat(len(val))
        for i in range(0, len(xv), batch_size):
            pred = head(((xv[i : i + batch_size] - mean) / std).to(device)).argmax(1).cpu()
            right += int((pred == yv[i : i + batch_size]).sum())
    return 100 * right / len(xv)


def position_scores(train: torch.Tensor, val: torch.Tensor, device: torch.device, seed: int = 0) -> dict[str, float]:
    """``{"position_acc": %, "position_share": %, "position_chance": %}`` of patch grids ``train``
    and ``val`` (N, D, h, w), see docs/evaluation.md ("Token position")."""
    return {"position_acc": round(position_accuracy(train, val, device, seed=seed), 2),
            "position_share": round(position_share(train, val), 2),
            "position_chance": round(100 / (train.shape[2] * train.shape[3]), 2)}
