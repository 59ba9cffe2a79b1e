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


def compile_method(method: nn.Module, mode: str = "default") -> int:
    """Compile, in place, each of ``method.compile_targets()`` (by default every ViT block and patch
    embedding; MoCo and MimCo add their heads) except those holding SyncBatchNorm; returns how many
    modules were compiled. Call after BatchNorm conversion and before FSDP sharding."""
    n = 0
    for m in method.compile_targets():
        # SyncBatchNorm (MoCo's heads under DDP on GPUs) all-gathers statistics inside an autograd
        # Function, which dynamo breaks its graph on: such a module stays eager (a few small matmuls)
        if not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules()):
            m.compile(mode=mode)
            n += 1
    return n


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None

