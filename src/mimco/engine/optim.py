"""AdamW with weight decay off for norms, biases and tokens; per-iteration warm-up + cosine."""

from __future__ import annotations

import logging

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from mimco.config import OptimConfig


def scaled_lr(cfg: OptimConfig) -> float:
    """The linear scaling rule: ``base_lr * batch_size / 256``."""
    return cfg.base_lr * cfg.batch_size / 256.0


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of a training method: its own ``param_groups(weight_decay)``
    (fine-tuning's layer decay), or, when it returns None, no decay for ndim <= 1 and
    ``no_weight_decay()``. Fused AdamW when the parameters live on a GPU."""
    groups = model.param_groups(cfg.weight_decay)
    if groups is None:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay())
    cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg), betas=tuple(cfg.betas), fused=cuda or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    warmup_steps: int) -> CosineLRScheduler:
    """timm cosine schedule stepped per iteration (``step_update(step)``): linear warm-up from 0
    over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    # timm warns that a one-step cosine "will have no effect": true, expected and not the user's to fix
    quiet = logging.getLogger(CosineLRScheduler.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=cfg.min_lr,
                                 warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    finally:
        quiet.setLevel(level)
