"""The contract between a training method (an ``nn.Module``) and the engine: :class:`TrainingMethod`,
the optional hooks' defaults (:class:`MethodDefaults`) and the check (:func:`check_method`). The engine
learns from it, never from class or attribute names, what to freeze, compile, shard and export.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Logs = dict[str, "torch.Tensor | float"]  # a tensor on the loss's device, or a Python number (no device copy)


@runtime_checkable
class TrainingMethod(Protocol):
    """What the engine calls, and when: the table of docs/architecture.md#contracts (the hooks'
    defaults: :class:`MethodDefaults`; ``forward`` never waits for the device: tests/engine/test_host_sync.py)."""

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
    """The optional hooks' defaults (listed in the table of docs/architecture.md#contracts)."""

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
        names = [*TrainingMethod.__annotations__, *(n for n in vars(TrainingMethod) if not n.startswith("_"))]
        missing = [n for n in names if not hasattr(method, n)]
        raise TypeError(f"{type(method).__name__} is not a TrainingMethod: it lacks {', '.join(missing)}")
