"""Every GPU-only path of mimco in one call, each with PASS/FAIL, then the MimCo step rate and MFU.

    bash benchmarks/gpu_check.sh          # on a GPU machine: torchrun with NCCL on every visible GPU (8 min at most)
    bash benchmarks/gpu_check.sh --cpu    # the same paths with 2 gloo processes on the CPU (part of the tests)

The process group is joined even on one GPU (``train.init_distributed=true``), so the NCCL
collectives (gathers of keys and tokens, the log row's all-reduce, the stop flag, every process's
RNG state) really run. Paths: stage 1 (MoCo v3) in bf16 with evaluation; stage 2 (MimCo) in bf16
with capped batch negatives and the projector target; fp16 with the gradient scaler (GPU only);
FSDP with the end-of-run evaluation; block masks with gradient accumulation; a resume with a longer
schedule; fine-tuning on the shared engine, with DDP and with FSDP; then a ViT-S/16 MimCo step at 224 px in bf16 (batch
256; ``--cpu``: a tiny one) with images/s, peak memory and MFU against a measured bf16 matmul rate.
Exits 1 when any path fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_peak, measure  # noqa: E402

from mimco.runs import CHECKPOINT, load_checkpoint, read_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sizes(cpu: bool) -> tuple[list[str], list[str], int]:
    """(data and batch overrides every run shares, the model's, steps per epoch) for the mode."""
    if cpu:
        data = ["data.name=procedural", "data.img_size=16", "data.procedural_size=256", "optim.batch_size=32",
                "train.threads=1"]
        return data, ["model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"], 8
    data = ["data.name=procedural", "data.img_size=64", "data.procedural_size=4096", "optim.batch_size=256"]
    return data, ["model.patch_size=8", "model.arch=vit_small", "model.depth=4"], 16


def last_step(run: Path) -> int:
    return int(load_checkpoint(run / CHECKPOINT)["step"])


def finite_log(run: Path) -> bool:
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and all(math.isfinite(float(r["loss"])) for r in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="2 gloo processes on the CPU, tiny sizes (checks the script)")
    p.add_argument("--nproc", type=int, default=0, help="processes (default: every GPU; --cpu: 2)")
    p.add_argument("--out", default="", help="run folder (default: a temporary one)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per path")
    p.add_argument("--budget", type=int, default=420, help="seconds for all paths; later ones are skipped past it")
    return p


def main() -> int:
    a = build_parser().parse_args()
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run `bash benchmarks/gpu_check.sh --cpu` on a CPU", file=sys.stderr)
        return 2
    nproc = a.nproc or (2 if a.cpu else torch.cuda.device_count())
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_check-"))
    common, model, spe = sizes(a.cpu)
    device = "train.device=cpu" if a.cpu else "train.device=cuda"
    base = [*common, *model, device, "train.progress=false", "train.log_every=5", "train.init_distributed=true",
            "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.base_lr=5e-4", f"train.out_dir={out}"]
    head = ["moco.mlp_dim=64", "moco.proj_dim=32"] if a.cpu else ["moco.mlp_dim=1024", "moco.proj_dim=256"]
    tune = [*common, device, "train.progress=false", "train.init_distributed=true", "optim.epochs=2",
            f"train.out_dir={out}", "aug.auto_augment="]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "mimco"]
    bf16 = "train.precision=bf16"
    teacher = out / "teacher" / CHECKPOINT
    student = [*base, f"teacher.checkpoint={teacher}", "loss.head_hidden_dim=64" if a.cpu else "loss.head_hidden_dim=1024"]
    checks: list[tuple[str, list[list[str]], str, int]] = [  # (name, commands, run folder, steps)
        ("teacher: MoCo v3, bf16, eval at end", [["teacher", *base, *head, bf16, "eval.at_end=true", "train.name=teacher"]],
         "teacher", 2 * spe),
        ("pretrain: MimCo, bf16, batch negatives capped, projector target",
         [["pretrain", *student, bf16, "loss.patch_negatives=batch", "loss.patch_max_negatives=64",
           "teacher.image_target=projector", "train.name=mimco-bf16"]], "mimco-bf16", 2 * spe),
        ("pretrain: fp16 with the gradient scaler", [["pretrain", *student, "train.precision=fp16", "train.name=mimco-fp16"]],
         "mimco-fp16", 2 * spe),
        ("pretrain: FSDP, eval at end", [["pretrain", *student, bf16, "train.strategy=fsdp", "eval.at_end=true",
                                          "train.name=mimco-fsdp"]], "mimco-fsdp", 2 * spe),
        ("pretrain: block masks, 2 micro-batches", [["pretrain", *student, bf16, "mask.type=block", "optim.accum_steps=2",
                                                     "train.name=mimco-block"]], "mimco-block", 2 * spe),
        ("resume: stopped, resumed with a longer schedule",
         [["pretrain", *student, bf16, f"train.max_steps={spe}", "train.name=mimco-resume"],
          ["pretrain", "--resume", str(out / "mimco-resume" / CHECKPOINT), "optim.epochs=3"]], "mimco-resume", 3 * spe),
        ("finetune: shared engine, bf16, mixup", [["finetune", str(teacher), *tune, bf16, "train.name=finetune"]],
         "finetune", 2 * spe),
        ("finetune: FSDP", [["finetune", str(teacher), *tune, bf16, "train.strategy=fsdp", "train.name=finetune-fsdp"]],
         "finetune-fsdp", 2 * spe),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if a.cpu else "4")}
    results, start = [], time.perf_counter()
    for name, commands, folder, steps in checks:
        if a.cpu and "fp16" in name:
            results.append((name, "SKIP", 0.0, "fp16 needs CUDA"))
            continue
        left = a.budget - (time.perf_counter() - start)
        if left < 10:
            results.append((name, "SKIP", 0.0, f"past the {a.budget} s budget"))
            continue
        t0, why = time.perf_counter(), ""
        for cmd in commands:
            limit = int(min(a.timeout, a.budget - (time.perf_counter() - start)))
            try:
                r = subprocess.run([*launch, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(limit, 1))
            except subprocess.TimeoutExpired:
                why = f"timed out after {limit} s"
                break
            if r.returncode != 0:
                lines = r.stderr.strip().splitlines()
                errors = [ln for ln in lines if "mimco: error" in ln or "Error" in ln]
                why = ((errors or lines or [f"exit code {r.returncode}"])[0])[:200]
                break
        run = out / folder
        if not why:
            got = last_step(run) if (run / CHECKPOINT).is_file() else -1
            why = "" if got == steps else f"ended at step {got}, expected {steps}"
        if not why and not folder.startswith("finetune") and not finite_log(run):
            why = "a non-finite loss in log.csv"
        if not why and "eval at end" in name and "knn_top1" not in read_summary(run):
            why = "no k-NN result in summary.json"
        results.append((name, "FAIL" if why else "PASS", time.perf_counter() - t0, why))
        print(f"{results[-1][1]}  {name}  ({results[-1][2]:.0f} s){'  ' + why if why else ''}", flush=True)
    dev = torch.device("cpu" if a.cpu else "cuda")
    cfg = argparse.Namespace(arch="vit_mini" if a.cpu else "vit_small", img_size=32 if a.cpu else 224,
                             patch=4 if a.cpu else 16, batch=8 if a.cpu else 256, precision="bf16", device=dev.type)
    cfg.warmup, cfg.reps = (1, 3) if a.cpu else (5, 30)
    r = measure("mimco", cfg)
    name = "cpu" if a.cpu else torch.cuda.get_device_name()
    peak = matmul_peak(torch.bfloat16, dev, n=1024 if a.cpu else 8192)
    mfu = {"device": name, "processes": nproc, "model": f"{cfg.arch} {cfg.img_size}/{cfg.patch}", "batch": cfg.batch,
           "precision": "bf16", "images_per_s": round(r["images_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 2),
           "gflop_per_image": round(r["gflop_per_image"], 3), "achieved_tflops": round(r["gflops"] / 1e3, 3),
           "bf16_matmul_tflops": round(peak / 1e3, 3), "mfu": round(r["gflops"] / peak, 4),
           "peak_memory_gib": round(r["peak_mib"] / 1024, 2)}
    failed = [x for x in results if x[1] == "FAIL"]
    print(f"\n| path | result | seconds | note |\n|---|---|---|---|")
    for n, res, sec, why in results:
        print(f"| {n} | {res} | {sec:.0f} | {why} |")
    print(f"\nMimCo step on {name}: {mfu['images_per_s']} images/s, {mfu['ms_per_step']} ms/step, peak memory "
          f"{mfu['peak_memory_gib']} GiB, MFU {mfu['mfu']:.1%} of a measured {mfu['bf16_matmul_tflops']} TFLOP/s bf16 matmul")
    print(f"{len(results) - len(failed)} of {len(results)} paths passed or skipped, {len(failed)} failed, "
          f"in {time.perf_counter() - start:.0f} s; runs in {out}")
    print(json.dumps({"paths": {n: res for n, res, _, _ in results}, **mfu}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
