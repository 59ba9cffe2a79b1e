"""How far the contrastive logits and losses drift from fp64 under bf16 autocast, with the loss
bodies run as autocast leaves them ("autocast": what mimco did before its losses switched autocast
off) and as mimco runs them now ("fp32": autocast off, inputs cast to fp32).

    python benchmarks/loss_precision.py

The inputs mimic the hard case of the patch loss: teacher tokens of one image that are near
duplicates (cosine 0.95-0.999 to each other), student predictions close to their positive, as in
a bf16 training step (the predictions arrive in bf16 from the heads). Prints a Markdown table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimco.methods.losses import PatchContrastiveLoss, contrastive_logits, info_nce


def inputs(seed: int = 0, b: int = 8, n: int = 196, m: int = 118, d: int = 384, spread: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, d, generator=g)
    target = base + spread * torch.randn(b, n, d, generator=g)  # near-duplicate tokens of one image
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
    pos = torch.gather(target, 1, idx.unsqueeze(-1).expand(-1, -1, d))
    pred = (pos + 0.5 * spread * torch.randn(b, m, d, generator=g)).bfloat16()  # heads run in bf16 under autocast
    return pred, target, idx


def main() -> None:
    pred, target, idx = inputs()
    t = 0.2
    q, k = pred.flatten(0, 1), target.flatten(0, 1)[: pred.shape[0] * pred.shape[1]]  # 944 x 944
    ref_logits = F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).T / t
    crit = PatchContrastiveLoss(t)
    pd, td = pred.double(), target.double()
    logits64 = F.normalize(pd, dim=-1) @ F.normalize(td, dim=-1).transpose(1, 2) / t
    ref_patch = F.cross_entropy(logits64.flatten(0, 1), idx.flatten()).item()
    ref_image = info_nce(q.double(), k.double(), torch.arange(q.shape[0]), t).item()
    rows = []
    for name, logits_fn, patch_fn, nce_fn in (
        ("autocast (before)", contrastive_logits.__wrapped__, PatchContrastiveLoss.forward.__wrapped__,
         lambda q, k, y, t: F.cross_entropy(contrastive_logits.__wrapped__(q, k, t).float(), y)),
        ("fp32 (now)", contrastive_logits, PatchContrastiveLoss.forward, info_nce),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = logits_fn(q, k, t)
            patch = patch_fn(crit, pred, target, idx).item()
            image = nce_fn(q, k, torch.arange(q.shape[0]), t).item()
        err = (logits.double() - ref_logits).abs()
        rows.append((name, str(logits.dtype).replace("torch.", ""), err.max().item(), err.mean().item(),
                     abs(patch - ref_patch), abs(image - ref_image)))
    print("bf16 autocast on the CPU; logits of 944 x 944 near-duplicate tokens (width 384, T = 0.2); "
          f"patch loss over 8 images x 118 masked of 196 tokens (fp64 value {ref_patch:.4f})\n")
    print("| loss body | logits dtype | max logit error vs fp64 | mean logit error | patch loss error | image InfoNCE "
          "error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2e} | {r[3]:.2e} | {r[4]:.2e} | {r[5]:.2e} |")


if __name__ == "__main__":
    main()
