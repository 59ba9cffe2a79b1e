"""One MimCo training step on an NVIDIA GPU: ViT-S/16 at 224 px, bf16, batch 256, synthetic data on
the device. Prints images/s, peak memory and MFU against a bf16 matmul rate it measures itself.
Under 5 minutes on one H100. ``--tiny`` shrinks everything so the script runs on a CPU in seconds.

    bash benchmarks/gpu_check.sh            # on the GPU machine
    bash benchmarks/gpu_check.sh --tiny     # anywhere, to test the script
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_peak, measure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="ViT-mini at 32 px / patch 4, batch 8, 3 steps (CPU test)")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = argparse.Namespace(arch="vit_mini" if a.tiny else "vit_small", img_size=32 if a.tiny else 224,
                             patch=4 if a.tiny else 16, batch=a.batch or (8 if a.tiny else 256), precision="bf16",
                             device=a.device)
    cfg.warmup, cfg.reps = (1, a.steps or 3) if a.tiny else (5, a.steps or 30)
    r = measure("mimco", cfg)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = matmul_peak(torch.bfloat16, device, n=8192 if device.type == "cuda" else 1024)
    out = {"device": name, "model": f"{cfg.arch} {cfg.img_size}/{cfg.patch}", "batch": cfg.batch, "precision": "bf16",
           "images_per_s": round(r["images_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 2),
           "gflop_per_image": round(r["gflop_per_image"], 3), "achieved_tflops": round(r["gflops"] / 1e3, 3),
           "bf16_matmul_tflops": round(peak / 1e3, 3), "mfu": round(r["gflops"] / peak, 4),
           "peak_memory_gib": round(r["peak_mib"] / 1024, 2)}
    print(f"MimCo step on {name}: {out['images_per_s']} images/s, {out['ms_per_step']} ms/step, "
          f"peak memory {out['peak_memory_gib']} GiB, MFU {out['mfu']:.1%} of a measured "
          f"{out['bf16_matmul_tflops']} TFLOP/s bf16 matmul")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
