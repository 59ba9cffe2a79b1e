"""``train.precision`` as torch sees it: the half dtype of autocast (and of FSDP's gathered parameters)."""

from __future__ import annotations

import torch


def half_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The run's autocast on ``device``: enabled in bf16/fp16, a no-op in fp32."""
    dtype = half_dtype(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
