"""Model and optimiser state for every strategy (single process, DDP, FSDP2), and FSDP2 wrapping. Checkpoints
always hold *full* state dicts keyed by parameter name (torch.distributed.checkpoint's state-dict API), so a
run saved under one strategy or process count resumes under another."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mimco.engine.amp import half_dtype
from mimco.methods.base import vits

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def mixed_precision(precision: str) -> tuple[Any, Any]:
    """FSDP2's mixed-precision policies for ``train.precision`` (docs/training.md, Memory): (for the sharded
    units, for the method itself, whose own inputs are not cast: the frozen teacher, not sharded, and the
    losses see the batch as it comes). fp32: FSDP's defaults."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = half_dtype(precision)
    kw = {} if dtype is None else {"param_dtype": dtype, "reduce_dtype": torch.float32}
    return MixedPrecisionPolicy(**kw), MixedPrecisionPolicy(**kw, cast_forward_inputs=False)


def shard(method: nn.Module, precision: str = "fp32") -> None:
    """FSDP2: the blocks of each of ``method.fsdp_units()``, then the unit, then the rest of the
    method without its ``frozen_modules()``, each with the mixed-precision policy of ``precision``
    (BatchNorm layers, sharded on their own, compute in fp32 on fp32 inputs whatever it is).
    MoCo's momentum encoder is sharded like its base encoder, so the EMA pairs matching shards;
    MimCo's frozen teacher stays whole on every process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    unit, root = mixed_precision(precision)
    frozen = {p for m in method.frozen_modules() for p in m.parameters()}
    if unit.param_dtype is not None:  # BatchNorm (MoCo's heads) in fp32: its running statistics are fp32 buffers
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)  # inputs cast to fp32 too
        for bn in [m for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and not any(p in frozen for p in m.parameters())]:
            fully_shard(bn, mp_policy=fp32)
    for u in method.fsdp_units():
        for vit in vits(u):
            for blk in vit.blocks:
                fully_shard(blk, mp_policy=unit)
        fully_shard(u, mp_policy=unit)
    fully_shard(method, ignored_params=frozen or None, mp_policy=root)


def gradient_sync(model: nn.Module, on: bool) -> None:
    """FSDP2: whether the next backward reduce-scatters the gradients (off for the micro-batches of a
    step but its last, which then reduces their sum once per unit, as DDP's ``no_sync``); gradients
    accumulate unsharded meanwhile, in fp32 under a bf16/fp16 policy. Other modules: nothing."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimiser state), complete and on the CPU (on rank 0 under FSDP)."""
    return get_model_state_dict(method, options=FULL), get_optimizer_state_dict(method, optimizer, options=FULL)


def load_state(method: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
               optim_state: dict[str, Any]) -> None:
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model_state, options=opts)
    set_optimizer_state_dict(method, optimizer, optim_state, options=opts)


@contextlib.contextmanager
def gathered(method: nn.Module) -> Iterator[None]:
    """Within the block, every FSDP2 unit of ``method`` holds its full parameters, so any part of
    it (a backbone's ``forward_features``, which no unit's ``forward`` hook sees) runs as it is.
    A collective: every process enters it. Without FSDP, nothing happens."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in method.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
