"""``train.compile``: torch.compile of every transformer block and head of a training method, in place.

Blocks are compiled one by one (``nn.Module.compile``, as torchtitan does per transformer block)
rather than the whole method: the method's forward holds what a graph cannot (mask generation,
collectives, Python control flow), every ViT in it (student, frozen teacher, momentum encoder,
fine-tuned model) spends nearly all of its time in blocks, and each block type compiles once and
is reused by every block of its shape. Parameter names and state dicts are unchanged, so
checkpoints of compiled and eager runs are interchangeable.
"""

from __future__ import annotations

from torch import nn

from mimco.errors import MimcoError
from mimco.models.heads import MoCoMLP, ReconstructionHead

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_mode(mode: str) -> None:
    """Refuse a ``train.compile_mode`` torch.compile does not have, naming the valid ones."""
    if mode not in MODES:
        raise MimcoError(f"unknown train.compile_mode '{mode}'; choose one of {', '.join(MODES)}")


def compile_method(method: nn.Module, mode: str = "default") -> int:
    """Compile, in place, each ViT block, patch embedding and head of ``method`` (a head holding
    SyncBatchNorm stays eager); returns how many modules were compiled. Call after BatchNorm
    conversion and before FSDP sharding."""
    check_mode(mode)
    targets: list[nn.Module] = []
    for m in method.modules():
        if hasattr(m, "patch_embed") and isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList)):
            targets += [m.patch_embed, *m.blocks]  # timm ViTs, DeiT, EVA: any teacher family
        elif isinstance(m, (MoCoMLP, ReconstructionHead)):
            # SyncBatchNorm (MoCo's heads under DDP on GPUs) all-gathers statistics inside an autograd
            # Function, which dynamo breaks its graph on: such a head stays eager (a few small matmuls)
            if not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules()):
                targets.append(m)
    for m in targets:
        m.compile(mode=mode)
    return len(targets)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None

