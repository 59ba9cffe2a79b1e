"""train.precision as torch sees it: one mapping for the trainer, FSDP's policy and evaluation."""

import torch

from mimco.engine.amp import autocast, half_dtype


def test_precision_maps_to_one_half_dtype_and_autocast():
    assert (half_dtype("bf16"), half_dtype("fp16"), half_dtype("fp32")) == (torch.bfloat16, torch.float16, None)
    a = torch.ones(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32
