"""Run under torchrun (2 gloo processes, CPU): SimMIM under FSDP2 for 2 steps with
``optim.accum_steps`` 1 and 2. Counts the gradient reduce-scatters of each run and keeps the
gradients (whole, gathered) the optimiser sees at its first step; writes OUT_DIR/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from mimco.pipeline import run_stage
from tests.helpers import tiny_pretrain_cfg

out = Path(sys.argv[1])
calls = {"n": 0}
reduce_scatter = tdist.reduce_scatter_single  # what FSDP2 calls for each unit's gradients


def counting(*args, **kwargs):
    calls["n"] += 1
    return reduce_scatter(*args, **kwargs)


tdist.reduce_scatter_single = counting
grads: dict[str, list[list[float]]] = {}
adamw = torch.optim.AdamW.step


def recording(self, *args, **kwargs):
    if run not in grads:  # the first step: every process gathers every gradient together
        grads[run] = [p.grad.full_tensor().flatten().tolist() for g in self.param_groups for p in g["params"]
                      if p.grad is not None]
    return adamw(self, *args, **kwargs)


torch.optim.AdamW.step = recording
counts = {}
for run, accum in (("whole", 1), ("accum", 2)):
    start = calls["n"]
    cfg = tiny_pretrain_cfg(out, out / "none.pt", run, ("method=simmim", "train.max_steps=2", "train.strategy=fsdp",
                                                        "train.threads=1", f"optim.accum_steps={accum}"))
    summary = run_stage("pretrain", cfg)
    counts[run] = calls["n"] - start
    assert summary["step"] == 2
(out / f"rank{tdist.get_rank()}.json").write_text(json.dumps({"reduce_scatters": counts, "grads": grads}))
tdist.destroy_process_group()
