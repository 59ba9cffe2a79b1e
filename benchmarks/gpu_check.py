"""Every GPU-only path of mimco in one call, each with PASS/FAIL, then the MimCo step rate and MFU.

    bash benchmarks/gpu_check.sh          # on a GPU machine: torchrun with NCCL on every visible GPU, <= 8 min
    bash benchmarks/gpu_check.sh --cpu    # the same paths with 2 gloo processes on the CPU (part of the tests)

The whole check keeps to ``--budget`` seconds (default 440 on a GPU, none with ``--cpu``): the paths
get all of it but ``--perf-reserve`` seconds, and a path that cannot start in time is skipped; the
performance half then measures ViT-S/16 eager and compiled, and ViT-B/16 and the batch search only
with the time left. Every subprocess runs in its own session and is killed, with its workers, at its
deadline. Results are written as they come to ``--report`` (default ``$OUT`` when set, else the run
folder): ``gpu_check.md`` (versions, one row per path, the MFU table) and ``gpu_check.json``; a failed
path's last lines of output are printed, so a call cut short still brings back what it measured.

The process group is joined even on one GPU (``train.init_distributed=true``), so the NCCL
collectives (gathers of keys and tokens, the log row's all-reduce, the stop flag, every process's
RNG state) really run. Paths: stage 1 (MoCo v3) in bf16 with the distributed end-of-run k-NN; stage
1 from a JPEG folder decoded on the GPU (``data.decode=gpu``) and from one cached once per node
(``data.cache``); stage 2 (MimCo) in bf16 with capped batch negatives and the projector target; fp16
with the gradient scaler; FSDP2 (bf16 mixed-precision policy) with the end-of-run evaluation; FSDP2
with fp16, the scaler and fused AdamW; ``train.compile``; a timm-named DINOv2 teacher (/14,
registers) at its own resolution with its grid resampled onto the student's, two averaged
layer-normalised blocks; block masks with gradient accumulation; a resume with a longer schedule;
fine-tuning on the shared engine, with DDP and with FSDP. Then MimCo steps at 224 px in bf16
(``--cpu``: a tiny one), eager and compiled, each in a fresh process: images/s, MFU against a
measured bf16 matmul rate and against the card's dense bf16 peak, peak memory, compile time, and
the largest batch (doubling) whose step fits. Exits 1 when any path fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import jpeg_folder, matmul_peak  # noqa: E402

from mimco.runs import CHECKPOINT, load_checkpoint, read_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Budget:
    """Seconds left of a budget started at construction (``seconds <= 0``: unlimited)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.end = clock() + seconds if seconds > 0 else math.inf

    def left(self, reserve: float = 0.0) -> float:
        return self.end - reserve - self.clock()


class Report:
    """``gpu_check.md`` and ``gpu_check.json`` in ``folder``, rewritten after every result."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.md, self.json = folder / "gpu_check.md", folder / "gpu_check.json"
        self.lines: list[str] = []
        self.data: dict[str, Any] = {"paths": {}, "rows": []}
        self.lock = threading.Lock()  # paths finish on several threads

    def add(self, line: str = "", **data: Any) -> None:
        with self.lock:
            self._add(line, **data)

    def _add(self, line: str = "", **data: Any) -> None:
        if line or not data:
            self.lines.append(line)
        for k, v in data.items():
            if isinstance(self.data.get(k), dict) and isinstance(v, dict):
                self.data[k].update(v)
            else:
                self.data[k] = v
        self.md.write_text("\n".join(self.lines) + "\n")
        self.json.write_text(json.dumps(self.data, indent=1))


def versions(cpu: bool) -> dict[str, str]:
    """What the check runs on: Python, torch, CUDA, cuDNN, NCCL, torchvision, timm, kornia, the GPU and its driver."""
    import kornia
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "timm": timm.__version__, "kornia": kornia.__version__}
    if not cpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        try:
            nccl = torch.cuda.nccl.version()
            nccl_v = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as e:  # a report, not a check: say what could not be read
            nccl_v = f"? ({type(e).__name__})"
        v.update({"cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version()), "nccl": nccl_v,
                  "gpu": f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, "
                         f"{p.multi_processor_count} SMs)"})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            v["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "?"
        except (OSError, subprocess.TimeoutExpired):
            v["driver"] = "?"
    else:
        v["device"] = f"CPU ({os.cpu_count()} cores)"
    return v


def run_cmd(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr) of ``cmd`` in a session of its own, killed
    with every process it started (torchrun's workers) at ``timeout`` seconds."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(timeout, 1.0) if math.isfinite(timeout) else None)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return None, out, err


def sizes(cpu: bool) -> tuple[list[str], list[str], int]:
    """(data and batch overrides every run shares, the model's, steps per epoch) for the mode."""
    if cpu:
        data = ["data.name=procedural", "data.img_size=16", "data.procedural_size=256", "optim.batch_size=32",
                "train.threads=1"]
        return data, ["model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"], 8
    data = ["data.name=procedural", "data.img_size=64", "data.procedural_size=4096", "optim.batch_size=256"]
    return data, ["model.patch_size=8", "model.arch=vit_small", "model.depth=4"], 16


def seg_pairs(root: Path, n: int, side: int) -> None:
    """A plain-layout segmentation folder: ``n`` training and ``n // 4`` validation PNG pairs, each a
    grey image with two coloured rectangles (classes 1 and 2 on background 0)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([(90, 90, 90), (220, 40, 40), (40, 60, 220)], np.uint8)
    for split, count in (("train", n), ("val", max(n // 4, 2))):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((side, side), np.uint8)
            for c in (1, 2):
                h, w = rng.integers(side // 4, side // 2, size=2)
                top, left = rng.integers(0, side - h), rng.integers(0, side - w)
                mask[top : top + h, left : left + w] = c
            Image.fromarray(colours[mask]).save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:05d}.png")


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
    p.add_argument("--report", default="", help="folder for gpu_check.md/.json (default: $OUT when set, else --out)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 440 on a GPU, "
                   "0 = unlimited, the --cpu default)")
    p.add_argument("--perf-reserve", type=float, default=170.0,
                   help="seconds of the budget kept for the performance half")
    p.add_argument("--timeout", type=int, default=None, help="seconds per path at most (default 150 on a GPU; --cpu: "
                   "3600, so a loaded machine's verdict does not depend on its speed)")
    p.add_argument("--jobs", type=int, default=0,
                   help="paths run at once after the first (default: 4 on a GPU, 1 with --cpu)")
    p.add_argument("--models", nargs="+", default=[], help="models timed at the end (default: vit_small, then vit_base "
                   "if time is left, at 224/16 on a GPU; --cpu: vit_mini at 32/4)")
    p.add_argument("--no-batch-search", action="store_true", help="skip the search for the largest batch that fits")
    return p


def _result_rows(run: Path) -> str:
    rows = {c: (run / "rows" / c / "results.jsonl") for c in ("knn", "linprobe", "eval")}
    counts = {c: len(f.read_text().splitlines()) if f.is_file() else 0 for c, f in rows.items()}
    return "" if set(counts.values()) == {1} else f"results.jsonl rows {counts}, expected one each"


#: what a check may assert beyond its step count and finite losses, by name: run folder -> "" or why not
EXPECTS: dict[str, Callable[[Path], str]] = {
    "knn_at_end": lambda run: "" if "knn_top1" in read_summary(run) else "no k-NN result in summary.json",
    "knn_monitor": lambda run: "" if "knn_monitor" in read_summary(run) else "no k-NN monitor value in summary.json",
    "miou": lambda run: "" if "miou" in read_summary(run) else "no mIoU in summary.json",
    "snapshot": lambda run: "" if (run / "epoch_0002.pt").is_file() else "no epoch_0002.pt snapshot",
    "result_rows": _result_rows,
    "features": lambda run: "" if (run / "features.npz").is_file() else "mimco extract wrote no features.npz",
}


@dataclass(frozen=True)
class Check:
    """One GPU-only path: its ``mimco`` commands (run in order), the run folder they write, the step
    it must reach, and what else it asserts (:data:`EXPECTS`), declared here, not read from its name."""

    name: str
    commands: list[list[str]]
    folder: str
    steps: int
    expects: tuple[str, ...] = ()
    cuda_only: bool = False  # fp16 with the gradient scaler: skipped on a CPU
    finite_loss: bool = True  # log.csv's losses all finite (fine-tuning logs mixup's soft-target loss elsewhere)

    def __post_init__(self) -> None:
        unknown = set(self.expects) - set(EXPECTS)
        if unknown:
            raise ValueError(f"check {self.name!r}: unknown expectation(s) {sorted(unknown)}; choose from "
                             f"{sorted(EXPECTS)}")


def main() -> int:
    a = build_parser().parse_args()
    budget = Budget(a.budget if a.budget is not None else (0 if a.cpu else 440))
    a.timeout = a.timeout or (3600 if a.cpu else 150)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run `bash benchmarks/gpu_check.sh --cpu` on a CPU",
              file=sys.stderr)
        return 2
    nproc = a.nproc or (2 if a.cpu else torch.cuda.device_count())
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report(Path(a.report or os.environ.get("OUT") or out))
    ver = versions(a.cpu)
    print("gpu_check on " + ", ".join(f"{k} {v}" for k, v in ver.items()), flush=True)
    listed = "\n".join(f"- {k}: {v}" for k, v in ver.items())
    report.add(f"# gpu_check ({time.strftime('%Y-%m-%d %H:%M:%S')})\n\n" + listed
               + f"\n- processes: {nproc}\n\n| path | result | seconds | note |\n|---|---|---|---|", versions=ver,
               processes=nproc)
    common, model, spe = sizes(a.cpu)
    device = "train.device=cpu" if a.cpu else "train.device=cuda"
    base = [*common, *model, device, "train.progress=false", "train.log_every=5", "train.init_distributed=true",
            "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.base_lr=5e-4", f"train.out_dir={out}"]
    head = ["moco.mlp_dim=64", "moco.proj_dim=32"] if a.cpu else ["moco.mlp_dim=1024", "moco.proj_dim=256"]
    tune = [*common, device, "train.progress=false", "train.init_distributed=true", "optim.epochs=2",
            f"train.out_dir={out}", "aug.auto_augment="]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
              "-m", "mimco"]
    bf16 = "train.precision=bf16"
    teacher = out / "teacher" / CHECKPOINT
    student = [*base, f"teacher.checkpoint={teacher}",
               "loss.head_hidden_dim=64" if a.cpu else "loss.head_hidden_dim=1024"]
    jpegs, n_jpeg = out / "jpegs", 64 if a.cpu else 1024
    jpeg_folder(jpegs, n_jpeg, (24, 48) if a.cpu else (96, 160), classes="ab")
    batch = 32 if a.cpu else 256
    # random weights in timm's layout for a named teacher; 42 px (3x3) under the CPU student's 4x4,
    # 98 px (7x7) under 8x8
    dinov2, dinov2_size = out / "dinov2_vits14_reg4.pth", 42 if a.cpu else 98
    torch.save(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).state_dict(), dinov2)
    folder = [*base, *head, bf16, "data.name=imagefolder", f"data.root={jpegs}", "data.num_workers=2"]
    # segmentation: a plain-layout folder of PNG pairs, at the teacher's side (the backbone's grid)
    n_seg, seg_batch, seg_side = (64, 16, 16) if a.cpu else (512, 64, 64)
    seg_pairs(out / "seg", n_seg, seg_side)
    seg = [device, "train.progress=false", "train.log_every=2", "train.init_distributed=true", "optim.epochs=2",
           "optim.warmup_epochs=0.5", f"optim.batch_size={seg_batch}", f"train.out_dir={out}", "data.name=segfolder",
           f"data.root={out / 'seg'}", "seg.num_classes=3", f"data.img_size={seg_side}", "data.num_workers=2"]
    checks = [
        Check("teacher: MoCo v3, bf16, eval at end",
              [["teacher", *base, *head, bf16, "eval.at_end=true", "train.name=teacher"]], "teacher", 2 * spe,
              expects=("knn_at_end",)),
        Check("teacher: MoCo v3, FSDP (bf16 policy, BatchNorm in fp32)",
              [["teacher", *base, *head, bf16, "train.strategy=fsdp", "train.name=teacher-fsdp"]], "teacher-fsdp",
              2 * spe),
        Check("teacher: JPEG folder decoded on the device (data.decode=gpu)",
              [["teacher", *folder, "data.decode=gpu", "train.name=teacher-jpeg"]], "teacher-jpeg",
              2 * (n_jpeg // batch)),
        Check("teacher: JPEG folder cached once per node (data.cache)",
              [["teacher", *folder, "data.cache=true", "train.name=teacher-cache"]], "teacher-cache",
              2 * (n_jpeg // batch)),
        Check("pretrain: MimCo, bf16, batch negatives capped, projector target",
              [["pretrain", *student, bf16, "loss.patch_negatives=batch", "loss.patch_max_negatives=64",
                "teacher.image_target=projector", "train.name=mimco-bf16"]], "mimco-bf16", 2 * spe),
        Check("pretrain: fp16 with the gradient scaler, image + same-position negatives, targets centred per position",
              [["pretrain", *student, "train.precision=fp16", "loss.patch_negatives=image+position",
                "loss.target_centring=position", "train.name=mimco-fp16"]], "mimco-fp16", 2 * spe, cuda_only=True),
        Check("pretrain: FSDP (bf16 policy), init_from, k-NN monitor, snapshots, eval at end; extract",
              [["pretrain", *student, bf16, "train.strategy=fsdp", "eval.at_end=true", f"model.init_from={teacher}",
                "eval.every_epochs=1", "eval.monitor_train=120", "eval.monitor_test=60", "train.keep_every_epochs=1",
                "train.name=mimco-fsdp"],
               ["extract", str(out / "mimco-fsdp" / "epoch_0001.pt"), "--out", str(out / "mimco-fsdp" / "features.npz"),
                "--patch", device, bf16, "train.init_distributed=true", "train.progress=false"]], "mimco-fsdp", 2 * spe,
              expects=("knn_monitor", "snapshot", "knn_at_end", "features")),
        Check("pretrain: FSDP, fp16 with the gradient scaler, fused AdamW",
              [["pretrain", *student, "train.precision=fp16", "train.strategy=fsdp", "train.name=mimco-fsdp-fp16"]],
              "mimco-fsdp-fp16", 2 * spe, cuda_only=True),
        Check("pretrain: compiled (train.compile), bf16, k-NN monitor",
              [["pretrain", *student, bf16, "train.compile=true", "eval.every_epochs=1", "eval.monitor_train=120",
                "eval.monitor_test=60", "train.name=mimco-compiled"]], "mimco-compiled", 2 * spe,
              expects=("knn_monitor",)),
        Check("pretrain: DINOv2 teacher by name, own resolution, grid resampled, bf16",
              [["pretrain", *student, bf16, "teacher.model=vit_small_patch14_reg4_dinov2",
                f"teacher.checkpoint={dinov2}", f"teacher.img_size={dinov2_size}", "teacher.resample=bilinear",
                "teacher.layers=[-2,-1]", "teacher.target_norm=layernorm", "teacher.image_target=mean",
                "train.name=mimco-dinov2"]], "mimco-dinov2", 2 * spe),
        Check("pretrain: FSDP, block masks, 2 micro-batches (one reduce-scatter a step)",
              [["pretrain", *student, bf16, "mask.type=block", "optim.accum_steps=2", "train.strategy=fsdp",
                "train.name=mimco-block"]], "mimco-block", 2 * spe),
        Check("eval: knn, linprobe (lr grid), eval under torchrun, one result row each",
              [["knn", str(teacher), device, bf16, "train.init_distributed=true", "train.progress=false", "--out",
                str(out / "teacher" / "rows" / "knn")],
               ["linprobe", str(teacher), device, bf16, "train.init_distributed=true", "train.progress=false",
                "--epochs", "5", "--out", str(out / "teacher" / "rows" / "linprobe")],
               ["eval", str(teacher), device, bf16, "train.init_distributed=true", "train.progress=false", "--out",
                str(out / "teacher" / "rows" / "eval")]], "teacher", 2 * spe, expects=("result_rows",)),
        Check("resume: stopped, resumed with a longer schedule",
              [["pretrain", *student, bf16, f"train.max_steps={spe}", "train.name=mimco-resume"],
               ["pretrain", "--resume", str(out / "mimco-resume" / CHECKPOINT), "optim.epochs=3"]], "mimco-resume",
              3 * spe),
        Check("finetune: shared engine, bf16, mixup", [["finetune", str(teacher), *tune, bf16, "train.name=finetune"]],
              "finetune", 2 * spe, finite_loss=False),
        Check("finetune: FSDP",
              [["finetune", str(teacher), *tune, bf16, "train.strategy=fsdp", "train.name=finetune-fsdp"]],
              "finetune-fsdp", 2 * spe, finite_loss=False),
        Check("segfinetune: FSDP, bf16, BatchNorm statistics all-reduced, mIoU every epoch",
              [["segfinetune", str(teacher), *seg, bf16, "train.strategy=fsdp", "train.name=segfinetune"]],
              "segfinetune", 2 * (n_seg // seg_batch), expects=("miou",)),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if a.cpu else "4")}
    results: dict[str, tuple[str, float, str]] = {}
    start = time.perf_counter()

    def run_path(check: Check) -> None:
        name = check.name
        if a.cpu and check.cuda_only:
            return finish(name, "SKIP", 0.0, "fp16 needs CUDA")
        if budget.left(a.perf_reserve) < 20:
            return finish(name, "SKIP", 0.0, "past the paths' share of the budget")
        t0, why = time.perf_counter(), ""
        for cmd in check.commands:
            limit = min(a.timeout, budget.left(a.perf_reserve))
            code, _, err = run_cmd([*launch, *cmd], limit, env)
            if code is None:
                why = f"timed out after {limit:.0f} s"
            elif code != 0:
                lines = err.strip().splitlines()
                errors = [ln for ln in lines if "mimco: error" in ln or "Error" in ln]
                why = ((errors or lines or [f"exit code {code}"])[0])[:200]
            if why:
                tail = "\n".join(f"    {ln}" for ln in err.strip().splitlines()[-30:])
                print(f"--- {name}: the last lines of its output\n{tail}", flush=True)
                break
        run = out / check.folder
        if not why:
            got = last_step(run) if (run / CHECKPOINT).is_file() else -1
            why = "" if got == check.steps else f"ended at step {got}, expected {check.steps}"
        if not why and check.finite_loss and not finite_log(run):
            why = "a non-finite loss in log.csv"
        for expect in check.expects:
            why = why or EXPECTS[expect](run)
        finish(name, "FAIL" if why else "PASS", time.perf_counter() - t0, why)

    def finish(name: str, res: str, sec: float, why: str) -> None:
        results[name] = (res, sec, why)
        print(f"{res}  {name}  ({sec:.0f} s){'  ' + why if why else ''}", flush=True)
        report.add(f"| {name} | {res} | {sec:.0f} | {why} |", paths={name: res})

    run_path(checks[0])  # every later path reads the teacher it trains
    with ThreadPoolExecutor(max_workers=a.jobs or (1 if a.cpu else 4)) as pool:
        list(pool.map(run_path, checks[1:]))
    ordered = [(c.name, *results[c.name]) for c in checks]
    failed = [x for x in ordered if x[1] == "FAIL"]
    print("\n| path | result | seconds | note |\n|---|---|---|---|")
    for n, res, sec, why in ordered:
        print(f"| {n} | {res} | {sec:.0f} | {why} |")
    summary = (f"{len(ordered) - len(failed)} of {len(ordered)} paths passed or skipped, {len(failed)} failed, "
               f"in {time.perf_counter() - start:.0f} s; runs in {out}")
    print(summary, flush=True)
    report.add(f"\n{summary}\n", paths={n: res for n, res, _, _ in ordered})
    perf = performance(a, env, budget, report)
    print(json.dumps({"paths": {n: res for n, res, _, _ in ordered}, "processes": nproc, **perf}))
    print(f"gpu_check: {time.perf_counter() - start:.0f} s in all; report in {report.md}", flush=True)
    return 1 if failed or not perf["rows"] else 0


#: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of the device name; first match wins
DENSE_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", None), ("A10", 125.0))


def card_peak(name: str) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from its name, or None when the card is not listed."""
    return next((v for k, v in DENSE_BF16_TFLOPS if k.lower() in name.lower()), None)


def best_batch(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest batch of ``start * 2^k`` up to ``cap`` for which ``fits(batch)`` holds (0 if none);
    the first batch that does not fit (or, in gpu_check, that time does not allow) ends the search."""
    best, b = 0, start
    while b <= cap and fits(b):
        best, b = b, b * 2
    return best


def _single(spec: argparse.Namespace, batch: int, compiled: bool, env: dict, timeout: float) -> dict | None:
    """One MimCo step measurement in a fresh process (benchmarks/throughput.py --single); None on failure."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--single", "mimco", "--precision", "bf16",
           "--arch", spec.arch, "--img-size", str(spec.img_size), "--patch", str(spec.patch), "--batch", str(batch),
           "--warmup", str(spec.warmup), "--reps", str(spec.reps), "--device", spec.device]
    code, out, err = run_cmd([*cmd, *(["--compiled"] if compiled else [])], timeout, env)
    if code != 0:
        why = "timed out" if code is None else (err.strip().splitlines() or [f"exit code {code}"])[-1][:200]
        print(f"perf: {spec.arch} batch {batch} {'compiled' if compiled else 'eager'}: {why}", file=sys.stderr,
              flush=True)
        return None
    return json.loads(out.strip().splitlines()[-1])


def performance(a: argparse.Namespace, env: dict, budget: Budget, report: Report) -> dict:
    """MimCo steps in bf16, eager and compiled, for each model while the budget lasts: images/s, MFU
    against the measured bf16 matmul rate and the card's dense bf16 peak, peak memory, compile time;
    then, with time left, the largest batch (doubling) whose eager step fits."""
    dev = torch.device("cpu" if a.cpu else "cuda")
    name = "cpu" if a.cpu else torch.cuda.get_device_name()
    matmul = matmul_peak(torch.bfloat16, dev, n=1024 if a.cpu else 8192) / 1e3
    peak = None if a.cpu else card_peak(name)
    models = a.models or (["vit_mini"] if a.cpu else ["vit_small", "vit_base"])
    title = (f"MimCo step, bf16, on {name} (1 process; bf16 matmul measured at {matmul:.1f} TFLOP/s"
             + (f", card peak {peak:.0f} TFLOP/s dense bf16)" if peak else ", card peak not listed)"))
    header = ("| model | mode | batch | images/s | ms/step | TFLOP/s | MFU (measured matmul) | MFU (card peak) | "
              "peak memory GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    report.add(f"\n{title}\n\n{header}", bf16_matmul_tflops=round(matmul, 3), card_peak_tflops=peak, device=name)
    rows: list[dict[str, Any]] = []
    fits: dict[str, int] = {}
    spent: dict[str, float] = {}  # seconds each measured mode took for the first model
    for i, arch in enumerate(models):
        spec = argparse.Namespace(arch=arch, img_size=32 if a.cpu else 224, patch=4 if a.cpu else 16,
                                  batch=8 if a.cpu else (256 if arch != "vit_base" else 128), device=dev.type,
                                  warmup=1 if a.cpu else 5, reps=3 if a.cpu else 20)
        eager: dict | None = None
        for mode in ("eager", "compiled"):
            # the first model is measured whatever is left; a later one only when it can finish (ViT-B ~2.5 x ViT-S)
            need = 20.0 if i == 0 else 2.5 * spent.get(mode, 60.0)
            if budget.left() < need:
                print(f"perf: {arch} {mode} skipped, {max(budget.left(), 0):.0f} s of the budget left", flush=True)
                report.add(f"| {arch} | {mode} | skipped: {max(budget.left(), 0):.0f} s of the budget left |")
                continue
            t0 = time.perf_counter()
            r = _single(spec, spec.batch, mode == "compiled", env, budget.left())
            if i == 0:
                spent[mode] = time.perf_counter() - t0
            if mode == "eager":
                eager = r
            if r is None:
                continue
            gflop = eager["gflop_per_image"] if eager else 0.0
            tflops = gflop * r["images_per_s"] / 1e3
            row = {"model": f"{arch} {spec.img_size}/{spec.patch}", "mode": mode, "batch": spec.batch,
                   "images_per_s": round(r["images_per_s"], 1), "ms_per_step": round(r["ms_per_step"], 2),
                   "gflop_per_image": round(gflop, 3), "achieved_tflops": round(tflops, 3),
                   "mfu": round(tflops / matmul, 4), "mfu_card": round(tflops / peak, 4) if peak else None,
                   "peak_memory_gib": round(r["peak_mib"] / 1024, 2),
                   "compile_s": round(r["first_step_s"], 1) if mode == "compiled" else None}
            rows.append(row)
            card = f"{row['mfu_card']:.1%}" if row["mfu_card"] is not None else "n/a"
            report.add(f"| {row['model']} | {mode} | {row['batch']} | {row['images_per_s']} | {row['ms_per_step']} | "
                       f"{row['achieved_tflops']} | {row['mfu']:.1%} | {card} | {row['peak_memory_gib']} | "
                       f"{row['compile_s'] if row['compile_s'] is not None else ''} |", rows=list(rows))
    for arch in models:
        if a.no_batch_search:
            break
        spec = argparse.Namespace(arch=arch, img_size=32 if a.cpu else 224, patch=4 if a.cpu else 16, device=dev.type,
                                  batch=8 if a.cpu else (256 if arch != "vit_base" else 128), warmup=0, reps=1)
        per_try = spent.get("eager", 30.0) * (1.0 if arch == models[0] else 2.5)

        def fit(b: int) -> bool:
            if budget.left() < per_try * max(b / spec.batch, 1.0) ** 0.5:
                return False  # out of time: the search ends with what it found
            return _single(spec, b, False, env, budget.left()) is not None

        fits[arch] = best_batch(fit, spec.batch, 16 if a.cpu else 4096)
        report.add(f"\nlargest batch that fits, {arch} eager bf16 (doubling from {spec.batch}, while time lasts): "
                   f"{fits[arch]}", best_batch=dict(fits))
    print(f"\n{title}\n{header}")
    for r in rows:
        card = f"{r['mfu_card']:.1%}" if r["mfu_card"] is not None else "n/a"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['images_per_s']} | {r['ms_per_step']} | "
              f"{r['achieved_tflops']} | {r['mfu']:.1%} | {card} | {r['peak_memory_gib']} | {comp} |")
    for arch, b in fits.items():  # each model's search starts at its own measured batch
        start = next((r["batch"] for r in rows if r["model"].startswith(f"{arch} ")), "?")
        print(f"largest batch that fits, {arch} eager bf16 (doubling from {start}, while time lasts): {b}")
    first = rows[0] if rows else {}
    return {"device": name, "bf16_matmul_tflops": round(matmul, 3), "card_peak_tflops": peak, "rows": rows,
            "best_batch": fits, "images_per_s": first.get("images_per_s", 0.0), "mfu": first.get("mfu", 0.0),
            "gflop_per_image": first.get("gflop_per_image", 0.0)}


if __name__ == "__main__":
    raise SystemExit(main())
