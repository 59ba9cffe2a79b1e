"""A real single-node SLURM cluster for the tests: Debian's ``slurm-wlm`` and ``munge`` (installed
where missing, as root), a ``slurm.conf`` of its own in a folder (``proctrack/linuxproc``,
``task/none``, ``select/cons_tres``, a ``gres.conf`` with two stand-in GPUs), and ``munged``,
``slurmctld`` and ``slurmd`` started on free ports and stopped, with every job, at the end.
Nothing outside the folder is touched: the commands find the cluster through ``SLURM_CONF``.

    python -m tests.slurm_cluster up /tmp/slurm     # prints `export SLURM_CONF=...`
    python -m tests.slurm_cluster down /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order
GPUS = 2


def unavailable() -> str:
    """Why a real SLURM cannot run here ('' when it can), installing the packages where missing."""
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch")):
        return ""
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One node named after this host, ``cpus`` CPUs and :data:`GPUS` stand-in GPUs (files in the
    folder: SLURM only counts them, nothing opens them), one partition ``debug``."""

    def __init__(self, folder: Path, kill_wait: int = 120) -> None:
        self.folder = Path(folder).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.kill_wait = kill_wait

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write(self) -> None:
        f = self.folder
        for d in ("state", "spool", "log", "munge"):
            (f / d).mkdir(parents=True, exist_ok=True)
        (f / "munge").chmod(0o755)
        key = f / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        gpus = [f / f"gpu{i}" for i in range(GPUS)]
        for g in gpus:
            g.touch()
        cpus = os.cpu_count() or 1
        mem = max(1000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        self.conf.write_text("\n".join([
            "ClusterName=mimcotest", f"SlurmctldHost={self.node}", f"SlurmUser={user}", f"SlurmdUser={user}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={f / 'munge' / 'munge.sock'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "GresTypes=gpu", "MpiDefault=none", "ReturnToService=2",
            # seconds between a job's SIGTERM and its SIGKILL (a preemption): room for a step and last.pt
            f"KillWait={self.kill_wait}", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            "JobCompType=jobcomp/none", "MailProg=/bin/true", "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides", "SlurmctldTimeout=30", "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} Gres=gpu:{GPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        (f / "gres.conf").write_text("AutoDetect=off\n" + "".join(
            f"NodeName={self.node} Name=gpu File={g}\n" for g in gpus))

    def start(self, timeout: float = 60) -> Cluster:
        self._write()
        f, env = self.folder, self.env
        subprocess.run(["munged", "--force", f"--socket={f / 'munge' / 'munge.sock'}", f"--key-file={f / 'munge.key'}",
                        f"--log-file={f / 'log' / 'munged.log'}", f"--pid-file={f / 'munged.pid'}",
                        f"--seed-file={f / 'munged.seed'}"], check=True, env=env, capture_output=True)
        subprocess.run(["slurmctld", "-i"], check=True, env=env, capture_output=True)  # -i: no saved state
        subprocess.run(["slurmd"], check=True, env=env, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            state = r.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            if state.startswith(("drain", "inval", "down")):
                subprocess.run(["scontrol", "update", f"nodename={self.node}", "state=resume"], env=env,
                               capture_output=True)
            time.sleep(0.5)
        logs = "".join((f / "log" / n).read_text()[-2000:] for n in ("slurmctld.log", "slurmd.log")
                       if (f / "log" / n).exists())
        self.stop()
        raise RuntimeError(f"the SLURM node did not come up in {timeout:.0f} s: {logs}")

    def stop(self) -> None:
        """Cancel every job, wait for their processes, stop the daemons."""
        env = self.env
        if shutil.which("scancel"):
            subprocess.run(["scancel", "--full", "--user", os.environ.get("USER", "root"), "--signal=KILL"], env=env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.squeue().strip():
                time.sleep(0.5)
        for name in DAEMONS:
            pid_file = self.folder / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)

    def run(self, *cmd: str, check: bool = True) -> str:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout

    def squeue(self) -> str:
        return self.run("squeue", "-h", "-o", "%i %T", check=False)

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        out = self.run("scontrol", "-o", "show", "job", job, check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/mimco-slurm")
    if what == "up":
        why = unavailable()
        if why:
            sys.exit(f"slurm_cluster: {why}")
        c = Cluster(where).start()
        print(f"export SLURM_CONF={c.conf}")
    elif what == "down":
        Cluster(where).stop()
    else:
        sys.exit("usage: python -m tests.slurm_cluster up|down [FOLDER]")
