"""Training-step throughput of each workload against a plain timm ViT step and the matmul peak.

    python benchmarks/throughput.py --arch vit_tiny --img-size 32 --patch 4 --batch 128
    python benchmarks/throughput.py --arch vit_small --img-size 224 --patch 16 --batch 16 --reps 5
    python benchmarks/throughput.py --arch vit_small --img-size 224 --patch 16 --batch 256 --compile   # a GPU

For fp32 and bf16: images/s (median over repetitions after warm-up) of a supervised timm ViT
step (the reference), a SimMIM step, a MoCo v3 step (two views), a MimCo step (teacher of the
same size) and the teacher forward alone; FLOPs per image (torch.utils.flop_counter, attention
included); achieved GFLOP/s and its share of a matmul peak measured in the same run; peak step
memory (CUDA: max allocated; CPU: rise of the process's peak RSS, each workload in a fresh
process). With ``--compile``, each workload again with ``train.compile``'s torch.compile of every
block, patch embedding and head (its own fresh process): images/s and the first step's compile
time. Also the data loader alone, against the MimCo step. Prints and writes a Markdown table
and checks the project's performance targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

WORKLOADS = ("supervised", "simmim", "moco", "mimco", "teacher_fwd")
#: MimCo with BEiT block masks, built one step ahead in a background thread (the default) or inline
#: in the step (``prefetch=False``): the cost the prefetch takes off the critical path
BLOCK_WORKLOADS = ("mimco_block", "mimco_block_inline")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n matmul, best of ``reps``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(workload: str, args: argparse.Namespace, device: torch.device):
    """(step function taking a batch, the batch) for one workload."""
    from mimco.config import ModelConfig, OptimConfig, PretrainConfig, TeacherStageConfig, load_config
    from mimco.engine.compiling import compile_method
    from mimco.engine.optim import build_optimizer
    from mimco.methods import get_method
    from mimco.models import create_vit, encode
    from mimco.models.vit import resolve_arch

    mcfg = ModelConfig(arch=args.arch, patch_size=args.patch)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    kind = "block" if workload.startswith("mimco_block") else "random"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    compiled = getattr(args, "compiled", False)
    if workload == "teacher_fwd":
        teacher = create_vit(mcfg, args.img_size).to(device).eval()
        if compiled:  # as train.compile does: the patch embedding and each block
            for part in (teacher.patch_embed, *teacher.blocks):
                part.compile()

        def step(i: int) -> None:
            with torch.inference_mode(), amp:
                encode(teacher, x)
        return step
    if workload == "supervised":
        model = create_vit(mcfg, args.img_size)
        model.reset_classifier(1000)
        model = model.to(device)
        y = torch.randint(0, 1000, (args.batch,), device=device)

        def loss_fn(i: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(x), y)
    else:  # the training methods, built as their stage builds them (mimco.methods.registry)
        common = ["data.name=procedural", f"data.img_size={args.img_size}", f"model.arch={args.arch}",
                  f"model.patch_size={args.patch}", "model.init=timm", "model.pos_embed=learned"]
        if workload == "moco":
            mlp = 4096 if args.img_size >= 128 else 1024
            cfg = load_config(TeacherStageConfig, None, [*common, f"moco.mlp_dim={mlp}"])
        else:
            over = [*common, f"mask.type={kind}", f"loss.head_hidden_dim={2048 if args.img_size >= 128 else 512}"]
            if workload == "simmim":
                over.append("method=simmim")
            else:  # a frozen teacher of the student's shape, from a timm state dict as a released one comes
                path = Path(tempfile.mkdtemp()) / "teacher.safetensors"
                save_file(create_vit(mcfg, args.img_size).state_dict(), str(path))
                over += [f"teacher.checkpoint={path}", f"teacher.num_heads={resolve_arch(mcfg)[2]}"]
            cfg = load_config(PretrainConfig, None, over)
        spec = get_method(cfg.method, "teacher" if workload == "moco" else "pretrain")
        model = spec.build(cfg, device)
        model.total_steps = 10**6
        if workload == "mimco_block_inline":
            model.mask_generator.prefetch = False
        views = [x, x.flip(-1)] if workload == "moco" else [x]

        def loss_fn(i: int) -> torch.Tensor:
            return model(views, i, 0)[0]
    model.train()
    if compiled:
        compile_method(model)
    if workload == "supervised":  # a bare classifier, not a training method: the same AdamW, timm's groups
        from timm.optim import param_groups_weight_decay

        opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                fused=device.type == "cuda" or None)
    else:
        opt = build_optimizer(model, OptimConfig(base_lr=1e-4))

    def step(i: int) -> None:
        with amp:
            loss = loss_fn(i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(workload: str, args: argparse.Namespace) -> dict:
    """One workload at one precision, in this (fresh) process."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    torch.manual_seed(0)
    step = build(workload, args, device)
    base_rss = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if getattr(args, "compiled", False):  # the first step compiles; FLOPs come from the eager row
        step(0)
        flops = 0
    else:
        with FlopCounterMode(display=False) as fc:
            step(0)
        flops = fc.get_total_flops()
    sync(device)
    first_s = time.perf_counter() - t0
    for i in range(args.warmup):
        step(i + 1)
    times = []
    for i in range(args.reps):
        sync(device)
        t = time.perf_counter()
        step(args.warmup + 1 + i)
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"workload": workload, "precision": args.precision, "images_per_s": args.batch / med,
            "ms_per_step": med * 1e3, "gflop_per_image": flops / args.batch / 1e9, "gflops": flops / med / 1e9,
            "peak_mib": peak, "first_step_s": first_s}


def jpeg_folder(root: Path, n: int, sides: tuple[int, int] = (300, 500), classes: str = "") -> None:
    """``n`` RGB JPEGs of random sizes in ``sides`` (ImageNet-like by default) with smooth content,
    so their file sizes are realistic; spread over one sub-folder per character of ``classes``
    (an ImageFolder), or flat when it is empty."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % len(classes)] if classes else root
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(*sides, size=2))
        small = (rng.random((max(h // 16, 2), max(w // 16, 2), 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)


def loader_rate(args: argparse.Namespace) -> tuple[str, float]:
    """Images/s of the data pipeline alone: Fashion-MNIST (in memory, batched views) for small
    images, else a JPEG ImageFolder it writes (2 workers, per-image MimCo views)."""
    from mimco.config import DataConfig, MimAugConfig
    from mimco.data.build import BatchStream, load_dataset
    from mimco.data.files import FileImages
    from mimco.data.transforms import BatchMimView, image_mim_view

    device = torch.device(args.device)
    if args.img_size <= 64:
        data = DataConfig(name="fashion_mnist", img_size=args.img_size, mean=[0.5] * 3, std=[0.5] * 3)
        try:
            ds, what = load_dataset(data), "Fashion-MNIST in memory, batched views"
        except Exception:
            data.name = "procedural"
            ds, what = load_dataset(data), "procedural in memory, batched views"
        stream = BatchStream(ds, args.batch, 0, device, BatchMimView(MimAugConfig(), data).to(device))
        n_batches = 50
    else:
        folder = Path(tempfile.mkdtemp(prefix="mimco-jpeg-"))
        jpeg_folder(folder, 256)
        data = DataConfig(name="folder", root=str(folder), img_size=args.img_size, num_workers=2)
        ds = FileImages(str(folder), labelled=False, transform=image_mim_view(MimAugConfig(), data))
        stream = BatchStream(ds, min(args.batch, 64), 0, device, None, num_workers=2)
        what, n_batches = "JPEG folder at 224, 2 workers, per-image views", 24
    it = stream(0)
    for _ in range(3):
        next(it)
    sync(device)
    t = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        n += next(it)[0].shape[0]
    sync(device)
    return what, n / (time.perf_counter() - t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                   help=f"any of {', '.join(WORKLOADS + BLOCK_WORKLOADS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time each workload under torch.compile (train.compile)")
    p.add_argument("--out", help="Markdown file to write (default benchmarks/results/throughput-<arch>-<size>.md)")
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one workload in a fresh process
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # internal: --single, compiled
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.single:
        print(json.dumps(measure(args.single, args)))
        return
    device = torch.device(args.device)
    peaks = {pr: matmul_peak(torch.float32 if pr == "fp32" else torch.bfloat16, device) for pr in args.precisions}
    rows = []
    for pr in args.precisions:
        for w in args.workloads:
            cmd = [sys.executable, __file__, "--single", w, "--precision", pr, "--arch", args.arch, "--img-size",
                   str(args.img_size), "--patch", str(args.patch), "--batch", str(args.batch), "--warmup",
                   str(args.warmup), "--reps", str(args.reps), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["peak_share"] = r["gflops"] / peaks[pr]
            if args.compile:
                out = subprocess.run([*cmd, "--compiled"], capture_output=True, text=True, check=True).stdout
                c = json.loads(out.strip().splitlines()[-1])
                r["compiled_images_per_s"], r["compile_s"] = c["images_per_s"], c["first_step_s"]
            rows.append(r)
            print(f"{pr:5s} {w:12s} {r['images_per_s']:9.1f} img/s  {r['gflops']:7.1f} GFLOP/s"
                  + (f"  compiled {r['compiled_images_per_s']:9.1f} img/s" if args.compile else ""), file=sys.stderr)
    what, loader = loader_rate(args) if "mimco" in args.workloads else ("", 0.0)
    md = report(rows, peaks, args, what, loader)
    print(md)
    out = Path(args.out or Path(__file__).parent / "results" / f"throughput-{args.arch}-{args.img_size}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)


def report(rows: list[dict], peaks: dict, args: argparse.Namespace, loader_what: str, loader: float) -> str:
    threads = torch.get_num_threads()
    lines = [f"## {args.arch}, {args.img_size} px / patch {args.patch}, batch {args.batch}, {args.device} "
             f"({platform.processor() or platform.machine()}, {threads} threads), torch {torch.__version__}", "",
             "matmul peak (2048^2): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), "",
             "| precision | workload | images/s | ms/step | GFLOP/image | GFLOP/s | share of matmul peak | peak step "
             "memory (MiB) |"
             + (" compiled images/s | compiled / eager | compile s |" if args.compile else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.compile else "")]
    for r in rows:
        extra = (f" {r['compiled_images_per_s']:.1f} | {r['compiled_images_per_s'] / r['images_per_s']:.2f} | "
                 f"{r['compile_s']:.1f} |" if args.compile else "")
        lines.append(f"| {r['precision']} | {r['workload']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['gflop_per_image']:.3f} | {r['gflops']:.1f} | {r['peak_share']:.0%} | {r['peak_mib']:.0f} "
                     f"|{extra}")
    by = {(r["precision"], r["workload"]): r for r in rows}
    checks = []
    for pr in args.precisions:
        mim, sim, sup = by.get((pr, "mimco")), by.get((pr, "simmim")), by.get((pr, "supervised"))
        if mim and sim:
            ratio = sim["images_per_s"] / mim["images_per_s"]
            checks.append((f"{pr}: MimCo step time / SimMIM step time <= 1.4", f"{ratio:.2f}", ratio <= 1.4))
            mem = mim["peak_mib"] / max(sim["peak_mib"], 1e-9)
            checks.append((f"{pr}: MimCo peak memory / SimMIM peak memory <= 1.3", f"{mem:.2f}", mem <= 1.3))
        if mim and sup and pr == "fp32":
            share = mim["gflops"] / sup["gflops"]
            checks.append(("fp32: MimCo GFLOP/s / plain timm step GFLOP/s >= 0.85", f"{share:.2f}", share >= 0.85))
    if loader and by.get(("fp32", "mimco")):
        ratio = loader / by[("fp32", "mimco")]["images_per_s"]
        checks.append((f"loader ({loader_what}): {loader:.0f} img/s / fp32 MimCo step >= 3", f"{ratio:.1f}",
                       ratio >= 3))
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
