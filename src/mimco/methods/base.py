"""The contract between a training method and the engine (:class:`~mimco.engine.trainer.Trainer`).

Every method (MoCo v3, MimCo, SimMIM, fine-tuning) is an ``nn.Module`` that satisfies
:class:`TrainingMethod`; :class:`MethodDefaults` gives the optional hooks their defaults. The
engine checks the contract when it is handed a method (:func:`check_method`) and learns from it,
not from the method's class or attribute names, what to freeze, compile, shard and export.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
    - ``after_step(step)``: called on every process once ``step`` optimiser steps are done: after
      each optimiser step (gradients zeroed), and with 0 before a new run's first step (not at the
      start of a resumed one, whose checkpoint was written after its call). Outside any forward,
      so it may write parameters a forward only reads (MoCo's momentum encoder: under FSDP2 an
      all-gather may read its shards while a forward runs).
    - ``on_epoch_end(epoch)``: called on every process after each epoch; returns metrics whose
      names are ``metric_keys`` (log columns); a checkpoint follows.
    - ``encoders()``: the backbones a checkpoint of the method offers, by name, the evaluated one
      first (MoCo: ``momentum``, ``base``). The checkpoint records where each one's weights are
      (:func:`backbone_prefixes`), so export and evaluation find them without knowing the method.
    - ``frozen_modules()``: modules that never train (a teacher): kept whole on every process
      under FSDP, never given to the optimiser (their parameters take no gradient).
    - ``compile_targets()``: the modules ``train.compile`` compiles one by one.
    - ``fsdp_units()``: the modules FSDP shards as units (each module's ViT blocks first); each
      must be called through its own ``forward``.
    """

    total_steps: int
    metric_keys: tuple[str, ...]

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, Logs]: ...

    def backbone(self) -> VisionTransformer: ...

    def no_weight_decay(self) -> set[str]: ...

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None: ...

    def after_step(self, step: int) -> None: ...

    def on_epoch_end(self, epoch: float) -> dict[str, float]: ...

    def encoders(self) -> dict[str, nn.Module]: ...

    def frozen_modules(self) -> list[nn.Module]: ...

    def compile_targets(self) -> list[nn.Module]: ...

    def fsdp_units(self) -> list[nn.Module]: ...


def vits(module: nn.Module) -> list[nn.Module]:
    """Every ViT in ``module`` (timm VisionTransformer, DeiT, EVA: a ``patch_embed`` and ``blocks``)."""
    return [m for m in module.modules()
            if hasattr(m, "patch_embed") and isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList))]


class MethodDefaults:
    """The optional hooks' defaults: no extra metrics, the engine's parameter groups, nothing after a
    step or at epoch end, one encoder (``backbone()``), nothing frozen, every ViT's patch embedding and blocks
    compiled, and every ViT outside the frozen modules sharded as a unit."""

    total_steps: int = 1
    metric_keys: tuple[str, ...] = ()

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        return None

    def after_step(self, step: int) -> None:
        return None

    def on_epoch_end(self, epoch: float) -> dict[str, float]:
        return {}

    def encoders(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone()}  # type: ignore[attr-defined]

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def compile_targets(self) -> list[nn.Module]:
        return [part for vit in vits(self) for part in (vit.patch_embed, *vit.blocks)]  # type: ignore[arg-type]

    def fsdp_units(self) -> list[nn.Module]:
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return [v for v in vits(self) if not any(id(p) in frozen for p in v.parameters())]  # type: ignore[arg-type]


def backbone_prefixes(method: nn.Module) -> dict[str, str]:
    """Each of ``method.encoders()`` -> the key prefix of its weights in the method's state dict
    (``"student.backbone."``), the evaluated encoder first; recorded in every checkpoint."""
    names = {id(m): n for n, m in method.named_modules()}
    out = {}
    for name, enc in method.encoders().items():
        if id(enc) not in names:
            raise TypeError(f"{type(method).__name__}.encoders()['{name}'] is not a submodule of the method")
        out[name] = names[id(enc)] + "." if names[id(enc)] else ""
    return out


def check_method(method: Any) -> None:
    """Raise ``TypeError`` naming what ``method`` lacks of :class:`TrainingMethod`."""
    if not isinstance(method, TrainingMethod):
        names = ("total_steps", "metric_keys", "forward", "backbone", "no_weight_decay", "param_groups", "after_step",
                 "on_epoch_end", "encoders", "frozen_modules", "compile_targets", "fsdp_units")
        missing = [n for n in names if not hasattr(method, n)]
        raise TypeError(f"{type(method).__name__} is not a TrainingMethod: it lacks {', '.join(missing)}")
