"""scripts/slurm/pretrain.sbatch: shellcheck-clean, the torchrun command it builds from SLURM_*, and
(with srun and scontrol faked) a SIGTERM that checkpoints, requeues, and a next start that resumes."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HANG, ROOT, TINY_DATA, TINY_MODEL

SCRIPT = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
SLURM = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mimco-pretrain",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8"}


def _fakes(folder: Path, log: Path) -> dict[str, str]:
    """srun runs its command here (options dropped); scontrol expands the node list and logs the rest."""
    folder.mkdir(exist_ok=True)
    (folder / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text('#!/bin/sh\nif [ "$1 $2" = "show hostnames" ]; then echo gpu07; echo gpu08; '
                                     f'exit 0; fi\necho "scontrol $*" >> {log}\n')
    for f in ("srun", "scontrol"):
        (folder / f).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def test_the_script_passes_shellcheck():
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    r = subprocess.run([found, str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_dry_run_prints_the_torchrun_command_from_the_slurm_environment(tmp_path):
    env = {**_fakes(tmp_path / "bin", tmp_path / "calls"), **SLURM, "MIMCO_DRY_RUN": "1",
           "MIMCO_OUT_DIR": str(tmp_path)}
    run = lambda: subprocess.run(["bash", str(SCRIPT), "--config", "vit_small_pretrain", "data.root=/data/in"],  # noqa: E731
                                 capture_output=True, text=True, env=env, cwd=tmp_path)
    r = run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu07:29500", "--rdzv_id=4242",
        "-m", "mimco", "pretrain", "--config", "vit_small_pretrain", "data.root=/data/in", f"train.out_dir={tmp_path}",
        "train.name=mimco-pretrain-4242"]
    (tmp_path / "mimco-pretrain-4242").mkdir()
    (tmp_path / "mimco-pretrain-4242" / "last.pt").write_text("x")  # a requeued job: its run has a checkpoint
    assert "mimco pretrain --resume auto --config" in run().stdout
    env["SLURM_GPUS_ON_NODE"], env["MIMCO_STAGE"] = "h100:4", "teacher"
    assert "--nproc_per_node=4" in run().stdout and "mimco teacher" in run().stdout


def test_outside_slurm_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "not inside a SLURM job: submit with sbatch" in r.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_requeues_then_the_next_start_resumes(tmp_path):
    calls = tmp_path / "calls"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**_fakes(tmp_path / "bin", calls), **SLURM, "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1",
           "SLURM_JOB_NODELIST": "localhost", "MIMCO_OUT_DIR": str(tmp_path), "MIMCO_STAGE": "teacher",
           "MIMCO_PORT": str(port)}
    (tmp_path / "bin" / "scontrol").write_text('#!/bin/sh\nif [ "$1 $2" = "show hostnames" ]; then echo localhost; '
                                               f'exit 0; fi\necho "scontrol $*" >> {calls}\n')
    args = [*TINY_DATA, *TINY_MODEL, "moco.mlp_dim=64", "moco.proj_dim=32", "optim.batch_size=32", "optim.epochs=100",
            "train.log_every=1", "train.progress=false", "eval.at_end=false"]
    run = tmp_path / "mimco-pretrain-4242"
    job = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG
    while not (run / "log.csv").is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends before the time limit
    err = job.communicate(timeout=HANG)[1]
    assert job.returncode == 0, err[-3000:]
    assert "requeueing job 4242" in err and calls.read_text() == "scontrol requeue 4242\n"
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and 0 < stopped < summary["total_steps"]
    calls.unlink()
    # the requeued job: the same job id, so the same run folder; it continues (here for 3 more steps)
    again = subprocess.run(["bash", str(SCRIPT), *args, f"train.max_steps={stopped + 3}"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["step"] == stopped + 3 and not calls.exists()
    with open(run / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, stopped + 4))
