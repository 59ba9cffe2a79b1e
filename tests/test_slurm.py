"""scripts/slurm/pretrain.sbatch: shellcheck-clean and the torchrun command it builds from SLURM_*
(srun and scontrol faked); then on a real single-node SLURM (tests/slurm_cluster.py: Debian's
slurm-wlm and munge, started here, skipped in one line where they cannot be): stopped at the time
limit as its own ``#SBATCH --signal`` line makes SLURM stop it, and preempted, it checkpoints,
requeues and resumes to the end of its schedule; two processes on the node train as one torchrun of
two outside SLURM."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from tests.helpers import ENV, HANG, ROOT, TINY_DATA, TINY_MODEL, TORCHRUN

SCRIPT = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
SLURM = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mimco-pretrain",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"}


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
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "-c", "64", sys.executable, "-m",
        "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu07:19242", "--rdzv_id=4242",
        "-m", "mimco", "pretrain", "--config", "vit_small_pretrain", "data.root=/data/in", f"train.out_dir={tmp_path}",
        "train.name=mimco-pretrain-4242"]
    (tmp_path / "mimco-pretrain-4242").mkdir()
    (tmp_path / "mimco-pretrain-4242" / "last.pt").write_text("x")  # a requeued job: its run has a checkpoint
    assert "mimco pretrain --resume auto --config" in run().stdout
    env["SLURM_GPUS_ON_NODE"], env["MIMCO_STAGE"] = "h100:4", "teacher"
    assert "--nproc_per_node=4" in run().stdout and "mimco teacher" in run().stdout
    env["SLURM_JOB_ID"] = "4243"  # another job on the same head node: another port
    assert "--rdzv_endpoint=gpu07:19243" in run().stdout
    env["MIMCO_PORT"] = "29400"
    del env["SLURM_CPUS_PER_TASK"]
    assert "--rdzv_endpoint=gpu07:29400" in run().stdout and " -c " not in run().stdout


def test_outside_slurm_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "not inside a SLURM job: submit with sbatch" in r.stderr




def test_a_stop_before_any_checkpoint_says_so(tmp_path):
    """The stop line goes to the job's steps (scancel), not to srun; with no last.pt written the
    script says the job starts again from step 0, not that it resumes."""
    calls = tmp_path / "calls"
    env = {**_fakes(tmp_path / "bin", calls), **SLURM, "MIMCO_OUT_DIR": str(tmp_path)}
    pid = tmp_path / "srun.pid"
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/sh\necho $$ > {pid}\nexec sleep 600\n')
    (tmp_path / "bin" / "scancel").write_text(f'#!/bin/sh\necho "scancel $*" >> {calls}\nkill -TERM $(cat {pid})\n')
    (tmp_path / "bin" / "scancel").chmod(0o755)
    job = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG
    while not pid.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=HANG)[1]
    assert job.returncode == 0, err
    assert calls.read_text() == "scancel --signal=TERM 4242\nscontrol requeue 4242\n"
    assert "no checkpoint was written" in err and "starts again from step 0" in err and "resumes from" not in err


# --- a real SLURM -----------------------------------------------------------------------------------

#: a teacher run of 20 epochs of 8 steps; every step logged
ARGS = [*TINY_DATA, *TINY_MODEL, "moco.mlp_dim=64", "moco.proj_dim=32", "optim.batch_size=32", "optim.epochs=20",
        "optim.warmup_epochs=1", "train.log_every=1", "train.progress=false", "eval.at_end=false"]
#: the script's own resource lines, but for one node with the cluster's two stand-in GPUs and its CPUs
SBATCH = ["--nodes=1", f"--cpus-per-task={os.cpu_count() or 1}", "--time=30", "--parsable"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.slurm_cluster import Cluster, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"no real SLURM here: {why}")
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _until(what, test, timeout: float = HANG, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = test()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(cluster, out: Path, gpus: int, args: list[str]) -> str:
    env = {**cluster.env, "PYTHON": sys.executable, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1",
           "MIMCO_OUT_DIR": str(out), "MIMCO_STAGE": "teacher"}
    r = subprocess.run(["sbatch", *SBATCH, f"--gpus-per-node={gpus}", f"--output={out}/%x-%j.out", str(SCRIPT),
                        *args], env=env, capture_output=True, text=True, cwd=out, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _rows(run: Path) -> list[dict[str, str]]:
    try:
        with open(run / "log.csv") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _stop_as_the_script_says(cluster, job: str) -> None:
    """What SLURM does at the script's own ``#SBATCH --signal=[B:]SIG@T`` time: SIG to the batch
    shell alone with ``B:``, else to every task of the job."""
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("#SBATCH --signal="))
    spec = line.split("=", 1)[1].split("@")[0]
    cluster.run("scancel", *(["--batch"] if spec.startswith("B:") else []), f"--signal={spec.removeprefix('B:')}", job)


def _requeued_and_held(cluster, job: str) -> bool:
    info = cluster.job(job)
    return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"


def _to_the_end(cluster, job: str) -> dict[str, str]:
    """Start the requeued job now (SLURM holds a requeued job a while: its BeginTime) and wait for it.
    Not within the second of the requeue: slurmd refuses a credential made in the second its job's
    earlier credential was revoked ("Job credential revoked"; second resolution), which a held job
    never meets."""
    time.sleep(2)
    cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    return _until(f"job {job} to end", lambda: (lambda i: i if i.get("JobState") in
                                                   ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None)(
        cluster.job(job)), every=1)


def _ran_to_the_end_step_by_step(run: Path, stopped: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert "stopped_by" not in summary and summary["step"] == summary["total_steps"] == 160
    assert [int(r["step"]) for r in _rows(run)] == list(range(1, 161))  # no step lost or trained twice
    assert 0 < stopped < 160


@pytest.mark.slow
def test_the_time_limit_stop_checkpoints_requeues_and_resumes_to_the_end(cluster, tmp_path):
    job = _submit(cluster, tmp_path, 1, ARGS)
    run = tmp_path / f"mimco-pretrain-{job}"
    _until("the first steps", lambda: len(_rows(run)) >= 3)
    _stop_as_the_script_says(cluster, job)
    _until("the requeue", lambda: _requeued_and_held(cluster, job))
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and (run / "last.pt").is_file()
    info = _to_the_end(cluster, job)
    log = (tmp_path / f"mimco-pretrain-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert f"requeueing job {job}; it resumes from {run}/last.pt (step {stopped} of 160)" in log
    assert "task 0: Killed" not in log
    _ran_to_the_end_step_by_step(run, stopped)


@pytest.mark.slow
def test_a_preempted_continued_pretraining_job_resumes_to_the_end(cluster, tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2)
    save_file(vit.state_dict(), str(tmp_path / "start.safetensors"))
    job = _submit(cluster, tmp_path, 1, [*ARGS, f"model.init_from={tmp_path / 'start.safetensors'}"])
    run = tmp_path / f"mimco-pretrain-{job}"
    _until("the first steps", lambda: len(_rows(run)) >= 3)
    cluster.run("scontrol", "requeue", job)  # a preemption: SLURM signals every task and requeues the job
    _until("the requeue", lambda: _requeued_and_held(cluster, job))
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["stopped_by"] == "SIGTERM"
    info = _to_the_end(cluster, job)
    log = (tmp_path / f"mimco-pretrain-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert log.count("mimco: model.init_from=") == 1  # loaded by the first start only; the requeue resumes
    _ran_to_the_end_step_by_step(run, stopped)


@pytest.mark.slow
def test_two_processes_on_the_node_train_as_one_torchrun_of_two(cluster, tmp_path):
    short = [*ARGS, "optim.epochs=2"]
    job = _submit(cluster, tmp_path, 2, short)
    info = _until(f"job {job} to end", lambda: (lambda i: i if i.get("JobState") in
                                                   ("COMPLETED", "FAILED", "CANCELLED") else None)(
        cluster.job(job)), every=1)
    log = (tmp_path / f"mimco-pretrain-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    outside = subprocess.run([*TORCHRUN, "-m", "mimco", "teacher", *short, f"train.out_dir={tmp_path}",
                              "train.name=outside"], env=ENV, capture_output=True, text=True, timeout=HANG)
    assert outside.returncode == 0, outside.stderr[-3000:]
    inside, alone = _rows(tmp_path / f"mimco-pretrain-{job}"), _rows(tmp_path / "outside")
    assert len(inside) == len(alone) == 16
    assert [r["loss"] for r in inside] == [r["loss"] for r in alone]
    assert log.count('"run_dir"') == 1  # one summary, from the main process
