"""Interruptions and failures: kill -9, SIGTERM, a NaN loss, a full disk."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimco import io as ckpt_module
from mimco.errors import MimcoError
from mimco.methods.moco import MoCoV3
from mimco.pipeline import run_stage
from mimco.runs import load_checkpoint
from tests.helpers import HANG, TINY_DATA, TINY_MODEL, TINY_RUN, tiny_teacher_cfg

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
LONG = ["teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32", "optim.epochs=6",
        "train.log_every=1", "train.ckpt_every=2", "train.threads=1"]


def _start(out: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mimco", *LONG, f"train.out_dir={out}", f"train.name={name}",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def _wait_for_step(proc: subprocess.Popen, log: Path, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.is_file():
            lines = log.read_text().splitlines()
            if len(lines) > step:
                return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError("the run did not reach the step in time")


@pytest.mark.slow
def test_kill_9_then_resume_auto_equals_uninterrupted(tmp_path):
    """``kill -9`` at a step drawn from MIMCO_FAULT_SEED (printed on failure: rerun with it to repeat)."""
    seed = int(os.environ.get("MIMCO_FAULT_SEED", time.time_ns() % 1_000_000))
    kill_at = random.Random(seed).randint(3, 30)
    why = f"killed after log row {kill_at}; repeat with MIMCO_FAULT_SEED={seed}"
    full = _start(tmp_path, "full")
    assert full.wait(timeout=HANG) == 0, full.stderr.read()
    victim = _start(tmp_path, "victim")
    _wait_for_step(victim, tmp_path / "victim" / "log.csv", kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    step = load_checkpoint(tmp_path / "victim" / "last.pt")["step"]
    assert 2 <= step < 48, why
    again = subprocess.run([sys.executable, "-m", "mimco", *LONG, f"train.out_dir={tmp_path}", "train.name=victim",
                            "--resume", "auto"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert again.returncode == 0, f"{why}: {again.stderr}"
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "victim" / "last.pt")
    assert a["step"] == b["step"] == 48, why
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k}; {why}"
    steps = [int(r.split(",")[0]) for r in (tmp_path / "victim" / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 49)), why  # rows past the checkpoint were dropped on resume, none doubled


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    proc = _start(tmp_path, "term")
    _wait_for_step(proc, tmp_path / "term" / "log.csv", 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "mimco teacher --resume" in err
    step = load_checkpoint(tmp_path / "term" / "last.pt")["step"]
    assert 3 <= step < 48 and f'"step": {step}' in out
    assert not (tmp_path / "term" / "backbone.safetensors").exists()  # only finished runs export weights


def test_injected_nan_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = MoCoV3.forward

    def poisoned(self, views, step, *rest):
        loss, logs = original(self, views, step, *rest)
        return (loss * float("nan") if step == 4 else loss), logs

    monkeypatch.setattr(MoCoV3, "forward", poisoned)
    cfg = tiny_teacher_cfg(tmp_path, "nan", ("train.log_every=1", "train.ckpt_every=2"))
    with pytest.raises(MimcoError,
                       match=r"NaN/Inf at step 5; stopped, the last checkpoint .*last.pt \(step 4\) is kept"):
        run_stage("teacher", cfg)
    kept = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert kept["step"] == 4 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f):
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)
    cfg = tiny_teacher_cfg(tmp_path, "disk", ("train.ckpt_every=2",))
    with pytest.raises(MimcoError, match="No space left on device; the previous last.pt is intact"):
        run_stage("teacher", cfg)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert load_checkpoint(tmp_path / "disk" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (tmp_path / "disk").iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step(tmp_path):
    """torchrun forwards SIGTERM to its 2 gloo workers; the stop vote (every step) brings both to
    the same step, where they write one checkpoint together and exit 0 within torchrun's 30 s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mimco", *LONG,
           f"train.out_dir={tmp_path}", "train.name=term2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    _wait_for_step(proc, tmp_path / "term2" / "log.csv", 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG)
    assert "stopped by SIGTERM" in err, err[-3000:]
    summary = json.loads((tmp_path / "term2" / "summary.json").read_text())
    step = load_checkpoint(tmp_path / "term2" / "last.pt")["step"]
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == step and 3 <= step < 48
    assert 0 <= step - summary["stop_asked_at_step"] <= 1  # voted every step: stopped one step after seeing it
    assert "exitcode  : -9" not in err  # no worker was killed at the end of torchrun's grace period


@pytest.mark.slow
def test_a_stop_signal_to_every_process_spares_the_loader_workers(tmp_path):
    """Slurm signals every process of a job step (``scancel --signal=TERM JOB.0``, the time-limit
    stop, a preemption), the image loader's worker processes included. A worker killed by it
    would take the run down ("DataLoader worker ... killed by signal") before its checkpoint:
    the workers ignore it and the main process stops, checkpoints and exits 0."""
    from PIL import Image

    from mimco.data.procedural import make_shapes

    images, labels = make_shapes(96, 16, seed=0)
    for i, (x, y) in enumerate(zip(images, labels)):
        d = tmp_path / "imgs" / "train" / f"c{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.transpose(1, 2, 0)).save(d / f"{i:03d}.png")
    cmd = [sys.executable, "-m", "mimco", *LONG, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}",
           "data.num_workers=2", "optim.epochs=40", f"train.out_dir={tmp_path}", "train.name=workers"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    _wait_for_step(proc, tmp_path / "workers" / "log.csv", 3)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 2, "the loader's worker processes were not running"
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as Slurm signals a step
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    step = load_checkpoint(tmp_path / "workers" / "last.pt")["step"]
    assert 3 <= step < 120 and json.loads((tmp_path / "workers" / "summary.json").read_text())["step"] == step


SPARED = r"""
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader
from mimco.data import files

files.WORKER_GRACE_S = float(sys.argv[1])
loader = DataLoader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True,
                    worker_init_fn=files.worker_ignores_stop)
it = iter(loader)
next(it), next(it)  # a batch from each worker: both have run worker_init_fn
pids = [w.pid for w in it._workers]
for p in pids:
    os.kill(p, signal.SIGTERM)  # the signal Slurm sends every process of a step
if sys.argv[2] == "serves":
    print(len([next(it) for _ in range(10)]))  # served on, the workers' own batches included
    os._exit(0)
deadline = time.monotonic() + 120
while any(w.is_alive() for w in it._workers) and time.monotonic() < deadline:
    try:
        time.sleep(0.05)
    except RuntimeError as e:  # the loader says so as each worker goes
        assert "killed by signal: Alarm clock" in str(e), e
print("ended" if not any(w.is_alive() for w in it._workers) else "alive")
os._exit(0)
"""


def test_a_signalled_loader_worker_serves_on_then_ends_after_its_grace(tmp_path):
    for grace, mode, want in (("3600", "serves", "10"), ("1", "ends", "ended")):
        r = subprocess.run([sys.executable, "-c", SPARED, grace, mode], capture_output=True, text=True, env=ENV,
                           cwd=ROOT, timeout=HANG)
        assert r.returncode == 0 and r.stdout.strip() == want, r.stderr[-2000:]


LEFT_OPEN = r"""
import sys
import torch
from mimco.config import TeacherStageConfig, load_config
from mimco.data import files
from mimco.data.stream import build_stream

files.WORKER_GRACE_S = 3600.0  # a process that waited out its workers' grace would hang for an hour
cfg = load_config(TeacherStageConfig, None, sys.argv[1:], model_keys=False)
batches = build_stream(cfg, torch.device("cpu"), "two")(0)
next(batches)
print("one batch", flush=True)
"""


def test_a_process_that_leaves_its_stream_open_still_exits(tmp_path):
    """multiprocessing's exit sends its daemonic workers SIGTERM and joins them; the workers outlive
    that signal, so the stream shuts them down first (at exit, when nobody closed it)."""
    from tests.data.test_shards import shapes_folder

    src = shapes_folder(tmp_path / "imgs", n=40)
    r = subprocess.run([sys.executable, "-c", LEFT_OPEN, "data.name=imagefolder", f"data.root={src}",
                        "data.img_size=16", "data.num_workers=2", "optim.batch_size=8"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "one batch", r.stderr[-2000:]
