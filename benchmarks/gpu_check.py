"""Every GPU-only path of mimco in one call, each with PASS/FAIL, then the MimCo step rate and MFU.

    bash benchmarks/gpu_check.sh          # on a GPU machine: torchrun with NCCL on every visible GPU (about 10 min)
    bash benchmarks/gpu_check.sh --models vit_small --no-batch-search   # the paths and one model (about 6 min)
    bash benchmarks/gpu_check.sh --cpu    # the same paths with 2 gloo processes on the CPU (part of the tests)

The process group is joined even on one GPU (``train.init_distributed=true``), so the NCCL
collectives (gathers of keys and tokens, the log row's all-reduce, the stop flag, every process's
RNG state) really run. Paths: stage 1 (MoCo v3) in bf16 with evaluation; stage 2 (MimCo) in bf16
with capped batch negatives and the projector target; fp16 with the gradient scaler (GPU only);
a JPEG folder decoded on the GPU (``data.decode=gpu``); FSDP with the end-of-run evaluation;
``train.compile``; a timm-named DINOv2 teacher (/14, registers) at its own resolution with its
grid resampled onto the student's, two averaged layer-normalised blocks; block masks with gradient accumulation; a
resume with a longer schedule; fine-tuning on the shared engine, with DDP and with FSDP. Then MimCo
steps of ViT-S/16 and ViT-B/16 at 224 px in bf16 (``--cpu``: tiny ones), eager and compiled, each
in a fresh process: images/s, MFU against a measured bf16 matmul rate and against the card's dense
bf16 peak, peak memory, compile time, and the largest batch (doubling) whose step fits in memory.
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

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import jpeg_folder, matmul_peak  # noqa: E402

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
    p.add_argument("--models", nargs="+", default=[], help="models timed at the end (default: vit_small vit_base at "
                   "224/16 on a GPU; --cpu: vit_mini at 32/4)")
    p.add_argument("--no-batch-search", action="store_true", help="skip the search for the largest batch that fits")
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
    jpegs, n_jpeg = out / "jpegs", 64 if a.cpu else 1024
    jpeg_folder(jpegs, n_jpeg, (24, 48) if a.cpu else (96, 160), classes="ab")
    batch = 32 if a.cpu else 256
    # random weights in timm's layout for a named teacher; 42 px (3x3) under the CPU student's 4x4, 98 px (7x7) under 8x8
    dinov2, dinov2_size = out / "dinov2_vits14_reg4.pth", 42 if a.cpu else 98
    torch.save(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).state_dict(), dinov2)
    checks: list[tuple[str, list[list[str]], str, int]] = [  # (name, commands, run folder, steps)
        ("teacher: MoCo v3, bf16, eval at end", [["teacher", *base, *head, bf16, "eval.at_end=true", "train.name=teacher"]],
         "teacher", 2 * spe),
        ("teacher: JPEG folder decoded on the device (data.decode=gpu)",
         [["teacher", *base, *head, bf16, "data.name=imagefolder", f"data.root={jpegs}", "data.decode=gpu",
           "data.num_workers=2", "train.name=teacher-jpeg"]], "teacher-jpeg", 2 * (n_jpeg // batch)),
        ("pretrain: MimCo, bf16, batch negatives capped, projector target",
         [["pretrain", *student, bf16, "loss.patch_negatives=batch", "loss.patch_max_negatives=64",
           "teacher.image_target=projector", "train.name=mimco-bf16"]], "mimco-bf16", 2 * spe),
        ("pretrain: fp16 with the gradient scaler", [["pretrain", *student, "train.precision=fp16", "train.name=mimco-fp16"]],
         "mimco-fp16", 2 * spe),
        ("pretrain: FSDP, eval at end", [["pretrain", *student, bf16, "train.strategy=fsdp", "eval.at_end=true",
                                          "train.name=mimco-fsdp"]], "mimco-fsdp", 2 * spe),
        ("pretrain: compiled (train.compile), bf16", [["pretrain", *student, bf16, "train.compile=true",
                                                       "train.name=mimco-compiled"]], "mimco-compiled", 2 * spe),
        ("pretrain: DINOv2 teacher by name, own resolution, grid resampled, bf16",
         [["pretrain", *student, bf16, "teacher.model=vit_small_patch14_reg4_dinov2", f"teacher.checkpoint={dinov2}",
           f"teacher.img_size={dinov2_size}", "teacher.resample=bilinear", "teacher.layers=[-2,-1]",
           "teacher.target_norm=layernorm", "teacher.image_target=mean", "train.name=mimco-dinov2"]], "mimco-dinov2", 2 * spe),
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
    failed = [x for x in results if x[1] == "FAIL"]
    print(f"\n| path | result | seconds | note |\n|---|---|---|---|")
    for n, res, sec, why in results:
        print(f"| {n} | {res} | {sec:.0f} | {why} |")
    print(f"{len(results) - len(failed)} of {len(results)} paths passed or skipped, {len(failed)} failed, "
          f"in {time.perf_counter() - start:.0f} s; runs in {out}", flush=True)
    perf = performance(a, env)
    print(json.dumps({"paths": {n: res for n, res, _, _ in results}, "processes": nproc, **perf}))
    return 1 if failed or not perf["rows"] else 0


#: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of the device name; first match wins
DENSE_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
                     ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                     ("L4", 121.0), ("A10G", None), ("A10", 125.0))


def card_peak(name: str) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from its name, or None when the card is not listed."""
    return next((v for k, v in DENSE_BF16_TFLOPS if k.lower() in name.lower()), None)


def best_batch(fits, start: int, cap: int) -> int:
    """The largest batch of ``start * 2^k`` up to ``cap`` for which ``fits(batch)`` holds (0 if none)."""
    best, b = 0, start
    while b <= cap and fits(b):
        best, b = b, b * 2
    return best


def _single(spec: argparse.Namespace, batch: int, compiled: bool, env: dict, timeout: int) -> dict | None:
    """One MimCo step measurement in a fresh process (benchmarks/throughput.py --single); None on failure."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--single", "mimco", "--precision", "bf16",
           "--arch", spec.arch, "--img-size", str(spec.img_size), "--patch", str(spec.patch), "--batch", str(batch),
           "--warmup", str(spec.warmup), "--reps", str(spec.reps), "--device", spec.device]
    try:
        r = subprocess.run([*cmd, *(["--compiled"] if compiled else [])], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def performance(a: argparse.Namespace, env: dict) -> dict:
    """MimCo steps in bf16, eager and compiled, for each model: images/s, MFU against the measured
    bf16 matmul rate and the card's dense bf16 peak, peak memory, compile time; then the largest
    batch (doubling) whose eager step fits."""
    dev = torch.device("cpu" if a.cpu else "cuda")
    name = "cpu" if a.cpu else torch.cuda.get_device_name()
    matmul = matmul_peak(torch.bfloat16, dev, n=1024 if a.cpu else 8192) / 1e3
    peak = None if a.cpu else card_peak(name)
    models = a.models or (["vit_mini"] if a.cpu else ["vit_small", "vit_base"])
    rows, fits = [], {}
    for arch in models:
        spec = argparse.Namespace(arch=arch, img_size=32 if a.cpu else 224, patch=4 if a.cpu else 16,
                                  batch=8 if a.cpu else (256 if arch != "vit_base" else 128), device=dev.type,
                                  warmup=1 if a.cpu else 5, reps=3 if a.cpu else 20)
        eager = _single(spec, spec.batch, False, env, a.timeout * 3)
        for mode, r in (("eager", eager), ("compiled", _single(spec, spec.batch, True, env, a.timeout * 3))):
            if r is None:
                print(f"perf: {arch} {mode} failed", file=sys.stderr)
                continue
            gflop = eager["gflop_per_image"] if eager else 0.0
            tflops = gflop * r["images_per_s"] / 1e3
            rows.append({"model": f"{arch} {spec.img_size}/{spec.patch}", "mode": mode, "batch": spec.batch,
                         "images_per_s": round(r["images_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 2),
                         "gflop_per_image": round(gflop, 3), "achieved_tflops": round(tflops, 3),
                         "mfu": round(tflops / matmul, 4), "mfu_card": round(tflops / peak, 4) if peak else None,
                         "peak_memory_gib": round(r["peak_mib"] / 1024, 2),
                         "compile_s": round(r["first_step_s"], 1) if mode == "compiled" else None})
        if not a.no_batch_search:
            once = argparse.Namespace(**{**vars(spec), "warmup": 0, "reps": 1})
            cap = 16 if a.cpu else 4096
            fits[arch] = best_batch(lambda b: _single(once, b, False, env, a.timeout * 2) is not None, spec.batch, cap)
    print(f"\nMimCo step, bf16, on {name} ({a.nproc or 1} process; bf16 matmul measured at {matmul:.1f} TFLOP/s"
          + (f", card peak {peak:.0f} TFLOP/s dense bf16)" if peak else ", card peak not listed)"))
    print("| model | mode | batch | images/s | ms/step | TFLOP/s | MFU (measured matmul) | MFU (card peak) | "
          "peak memory GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        card = f"{r['mfu_card']:.1%}" if r["mfu_card"] is not None else "n/a"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['images_per_s']} | {r['ms_per_step']} | "
              f"{r['achieved_tflops']} | {r['mfu']:.1%} | {card} | {r['peak_memory_gib']} | {comp} |")
    for arch, b in fits.items():
        print(f"largest batch that fits, {arch} eager bf16 (doubling from {rows[0]['batch'] if rows else '?'}): {b}")
    first = rows[0] if rows else {}
    return {"device": name, "bf16_matmul_tflops": round(matmul, 3), "card_peak_tflops": peak, "rows": rows,
            "best_batch": fits, "images_per_s": first.get("images_per_s", 0.0), "mfu": first.get("mfu", 0.0),
            "gflop_per_image": first.get("gflop_per_image", 0.0)}




if __name__ == "__main__":
    raise SystemExit(main())
