"""Run under torchrun (gloo, CPU): checks the cross-process gathers; writes OUT_DIR/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mimco.distributed import gather_no_grad
from mimco.methods.losses import GlobalInfoNCE, PatchContrastiveLoss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
b, n, d = 3, 4, 8
gathered = gather_no_grad(torch.full((b, d), float(rank)))
g = torch.Generator().manual_seed(rank)
q = torch.randn(b, d, generator=g, requires_grad=True)
image_loss = GlobalInfoNCE(0.01,
                           scale_by_2t=False)(q, q.detach().clone())  # positive = own key: ~0 only if offset right
image_loss.backward()
tokens = torch.randn(b, n, d, generator=g)
mask = torch.zeros(b, n, dtype=torch.bool)
mask[:, :2] = True
pred = tokens[mask].view(b, 2, d)
captured = {}
orig = torch.nn.functional.cross_entropy
torch.nn.functional.cross_entropy = lambda logits, labels: captured.setdefault("shape",
                                                                               list(logits.shape)) and orig(logits,
                                                                                                            labels)
patch_loss = PatchContrastiveLoss(0.01, "batch")(pred, tokens, mask)
torch.nn.functional.cross_entropy = orig
Path(sys.argv[1],
     f"rank{rank}.json").write_text(json.dumps({"rank": rank, "gathered_rows": gathered.shape[0],
                                                "rows_from_1": int((gathered[:, 0] == 1).sum()),
                  "image_loss": image_loss.item(), "grad_finite": bool(torch.isfinite(q.grad).all()),
                  "patch_logits": captured["shape"], "patch_loss": patch_loss.item()}))
dist.destroy_process_group()
