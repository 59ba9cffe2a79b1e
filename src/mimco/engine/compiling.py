"""``train.compile``: torch.compile of every transformer block and head of a training method, in place
(docs/performance.md#compiled-steps-traincompiletrue, which says why one shared ``recompile_limit``). Blocks
are compiled one by one, not the whole method: its forward holds what a graph cannot (mask generation,
collectives, Python control flow), and every ViT in it spends nearly all of its time in blocks."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from mimco import distributed as dist

#: dynamo cache entries one compiled module may hold: training (gradients) and evaluation (the
#: monitor, ``no_grad``), each with a second entry when its batch size first changes (dynamic shapes)
ENTRIES_PER_MODULE = 4

#: hits of the recompile limit already counted when the latest run compiled its modules
_hits_before = [0]


def limit_hits() -> int:
    """How many times dynamo found a code object past its recompile limit (and ran it eager) in this process."""
    from torch._dynamo.utils import counters

    names = ("recompile limit", "cache limit", "cache size limit")  # the name's wording across releases
    return sum(v for k, v in counters["unimplemented"].items() if any(s in k.lower() for s in names))


def compile_method(method: nn.Module, mode: str = "default", backend: Any = "inductor") -> int:
    """Compile, in place, each of ``method.compile_targets()`` (by default every ViT block and patch
    embedding; MoCo and MimCo add their heads) except those holding SyncBatchNorm; returns how many
    modules were compiled, and raises dynamo's recompile limits to cover them. Call after BatchNorm
    conversion and before FSDP sharding. ``backend``: dynamo's (tests use ``"eager"``)."""
    # SyncBatchNorm (MoCo's heads under DDP on GPUs) all-gathers statistics inside an autograd
    # Function, which dynamo breaks its graph on: such a module stays eager (a few small matmuls)
    targets = [m for m in method.compile_targets() if not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())]
    for m in targets:
        m.compile(mode=mode, backend=backend)
    if n := len(targets):
        cfg = torch._dynamo.config
        need = ENTRIES_PER_MODULE * n
        cfg.recompile_limit = max(cfg.recompile_limit, need)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 2 * need)
        _hits_before[0] = limit_hits()
    return n


def report_recompile_limit(compiled: int) -> int:
    """After a run that compiled ``compiled`` modules: the recompile-limit hits since they were
    compiled, printed as one line on the main process when there are any."""
    hits = limit_hits() - _hits_before[0] if compiled else 0
    if hits and dist.is_main():
        print(f"mimco: torch.compile hit its recompile limit (torch._dynamo.config.recompile_limit="
              f"{torch._dynamo.config.recompile_limit}) {hits} time(s); the modules past it ran eager "
              f"(TORCH_LOGS=recompiles names them)", file=sys.stderr)
    return hits


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None

