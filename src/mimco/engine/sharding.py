"""Model and optimiser state for every strategy (single process, DDP, FSDP2), and FSDP2 wrapping.

Checkpoints always hold *full* state dicts keyed by parameter name (torch.distributed.checkpoint's
state-dict API), so a run saved under one strategy or process count resumes under another.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(method: nn.Module) -> None:
    """FSDP2: every block of every ViT that is not a frozen teacher, then each such ViT, then the
    rest of the method. MoCo's momentum encoder is sharded like its base encoder, so the EMA pairs
    matching shards; MimCo's frozen teacher stays whole on every process."""
    from torch.distributed.fsdp import fully_shard

    from mimco.models.student import MaskedViT

    teacher = getattr(method, "teacher", None)
    wrappers = {id(m.backbone): m for m in method.modules() if isinstance(m, MaskedViT)}
    for m in list(method.modules()):
        if isinstance(m, VisionTransformer) and m is not teacher:
            for blk in m.blocks:
                fully_shard(blk)
            # the unit must be a module whose forward() runs: the masked student calls its backbone's parts
            fully_shard(wrappers.get(id(m), m))
    fully_shard(method, ignored_params=set(teacher.parameters()) if teacher is not None else None)


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimiser state), complete and on the CPU (on rank 0 under FSDP)."""
    return get_model_state_dict(method, options=FULL), get_optimizer_state_dict(method, optimizer, options=FULL)


def load_state(method: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
               optim_state: dict[str, Any]) -> None:
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model_state, options=opts)
    set_optimizer_state_dict(method, optimizer, optim_state, options=opts)
