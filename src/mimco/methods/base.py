"""The contract between a training method and the engine (:class:`~mimco.engine.trainer.Trainer`).

Every method (MoCo v3, MimCo, SimMIM, fine-tuning) is an ``nn.Module`` that satisfies
:class:`TrainingMethod`; :class:`MethodDefaults` gives the optional hooks their neutral values.
The engine checks the contract when it is handed a method (:func:`check_method`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from timm.models.vision_transformer import VisionTransformer

Logs = dict[str, "torch.Tensor | float"]  # a tensor on the loss's device, or a Python number (no device copy)


@runtime_checkable
class TrainingMethod(Protocol):
    """What the engine calls, and when.

    - ``forward(views, step, first_index)``: one micro-batch. ``views`` are the batch's tensors
      (two augmented views for MoCo, one for MimCo/SimMIM, images and labels for fine-tuning),
      ``step`` the optimiser step (for schedules such as MoCo's momentum), ``first_index`` the
      global index of the micro-batch's first sample (per-sample masks). Returns the scalar loss
      and detached per-term logs, each a tensor on the loss's device or a Python number (they are
      all-reduced at each log row). The step must not wait for the device: no ``.item()``, no
      tensor made from host data (tests/engine/test_host_sync.py).
    - ``backbone()``: the ViT that is evaluated and exported.
    - ``no_weight_decay()``: parameter names excluded from weight decay.
    - ``param_groups(weight_decay)``: the optimiser's groups, or None for the engine's default
      (decay off for ``ndim <= 1`` and ``no_weight_decay()``).
    - ``total_steps``: set by the engine before the first step (the schedule's length).
    - ``on_epoch_end(epoch)``: called on every process after each epoch; returns metrics whose
      names are ``metric_keys`` (log columns); a checkpoint follows.
    """

    total_steps: int
    metric_keys: tuple[str, ...]

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, Logs]: ...

    def backbone(self) -> VisionTransformer: ...

    def no_weight_decay(self) -> set[str]: ...

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None: ...

    def on_epoch_end(self, epoch: float) -> dict[str, float]: ...


class MethodDefaults:
    """Neutral optional hooks: no extra metrics, the engine's parameter groups, nothing at epoch end."""

    total_steps: int = 1
    metric_keys: tuple[str, ...] = ()

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        return None

    def on_epoch_end(self, epoch: float) -> dict[str, float]:
        return {}


def check_method(method: Any) -> None:
    """Raise ``TypeError`` naming what ``method`` lacks of :class:`TrainingMethod`."""
    if not isinstance(method, TrainingMethod):
        names = ("total_steps", "metric_keys", "forward", "backbone", "no_weight_decay", "param_groups", "on_epoch_end")
        missing = [n for n in names if not hasattr(method, n)]
        raise TypeError(f"{type(method).__name__} is not a TrainingMethod: it lacks {', '.join(missing)}")
