"""Peak memory of one segmentation step at ADE20K size: ``mimco segprobe``'s streamed path (frozen
backbone, head trained) and ``mimco segfinetune`` (every layer trained, AdamW), ViT-S/16 at 512 px,
150 classes, under autocast. Prints a table.

    python benchmarks/seg_memory.py                       # ViT-S/16, 512 px, batch 16, bf16
    python benchmarks/seg_memory.py --batch 4 --img-size 256

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the step; on a CPU each path runs in a
fresh process and the peak is its maximum resident set minus the one before the model is built
(an upper bound: the allocator's caching and fragmentation count too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step(path: str, arch: str, img: int, batch: int, classes: int, precision: str, device: torch.device) -> float:
    """Build, then run one step of ``path`` (probe | finetune); returns the seconds of the step."""
    import timm

    from mimco.engine.amp import autocast
    from mimco.eval.segfinetune import Segmenter, pixel_loss
    from mimco.eval.segmentation import SegHead, patch_grid, seg_loss

    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img).to(device)
    x = torch.randn(batch, 3, img, img, device=device)
    masks = torch.randint(0, classes, (batch, img, img), device=device)
    if path == "probe":
        head = SegHead(vit.embed_dim, classes).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        vit.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, precision):
            f = patch_grid(vit, x).float()
        loss = seg_loss(head(f), masks)
    else:
        model = Segmenter(vit, classes).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        with autocast(device, precision):
            loss = pixel_loss(model(x), masks)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    """One path in this process; prints JSON with the peak memory of the step."""
    import timm  # noqa: F401  (imported before the baseline is read: libraries are not the step's memory)

    import mimco.eval.segfinetune  # noqa: F401

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sec = step(args.child, args.arch, args.img_size, args.batch, args.classes, args.precision, device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        # the model is built inside step(): its weights and optimiser state count, as on CUDA
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sec = step(args.child, args.arch, args.img_size, args.batch, args.classes, args.precision, device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak_bytes": peak, "seconds": sec}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "max resident set - baseline"
    print(f"{args.arch} at {args.img_size} px, batch {args.batch}, {args.classes} classes, {args.precision} autocast, "
          f"{args.device}; peak memory of one step ({how})\n")
    print("| path | peak GiB | step seconds |\n|---|---|---|")
    for path, name in (("probe", "segprobe (streamed: frozen backbone, head trained)"),
                       ("finetune", "segfinetune (every layer trained, AdamW)")):
        r = subprocess.run([sys.executable, __file__, "--child", path, "--arch", args.arch, "--img-size",
                            str(args.img_size), "--batch", str(args.batch), "--classes", str(args.classes),
                            "--precision", args.precision, "--device", args.device], capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), **dict(__import__("os").environ)})
        if r.returncode != 0:
            raise SystemExit(f"{path} failed: {r.stderr.strip().splitlines()[-1]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {name} | {out['peak_bytes'] / 2**30:.2f} | {out['seconds']:.1f} |")


if __name__ == "__main__":
    main()
