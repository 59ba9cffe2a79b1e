"""A stand-in for a GPU tensor on a CPU-only machine, for the class of bug only a GPU run shows:
``.numpy()`` of a device tensor, or a device tensor mixed with a host tensor in one op."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map


class OnDevice(torch.Tensor):
    """A CPU tensor that behaves as if it lived on a GPU: ``.numpy()`` and ``.tolist()`` refuse, and so
    does an op that mixes it with a plain (host) tensor of one or more dimensions, as CUDA does;
    ``.cpu()`` (or ``.to("cpu")``) gives a plain tensor back. 0-dim host tensors mix freely, as CUDA
    allows. Results stay OnDevice. :func:`module_on_device` moves a model's parameters and buffers."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.tolist):
            raise TypeError("can't convert cuda:0 device type tensor to numpy/list: use Tensor.cpu() first")
        to_host = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            str(a) == "cpu" for a in [*args[1:], kwargs.get("device")]))
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if any(isinstance(t, OnDevice) for t in tensors) and not to_host:
            host = [t for t in tensors if type(t) is torch.Tensor and t.dim() > 0]
            if host:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found cuda:0 and a cpu "
                                   f"tensor {tuple(host[0].shape)} in {getattr(func, '__name__', func)}")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if to_host:
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return tree_map(lambda t: t.as_subclass(OnDevice) if type(t) is torch.Tensor else t, out)


def on_device(x: torch.Tensor) -> OnDevice:
    return x.as_subclass(OnDevice)


def module_on_device(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every parameter and buffer made :class:`OnDevice`, in place (``module.to("cuda")``)."""
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        return module._apply(on_device)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
