"""A stop stops the whole pipeline: SIGTERM in a stage of ``mimco demo`` or of the study
(benchmarks/reproduce.py) checkpoints that stage, runs nothing after it, prints the command that
resumes, and exits non-zero; a stage-2 run on an unfinished teacher says so."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, ROOT, TINY_DATA, TINY_MODEL

pytestmark = pytest.mark.slow

LONG = [*TINY_DATA, *TINY_MODEL, "data.channels=3", "model.pos_embed=learned", "optim.batch_size=32",
        "optim.warmup_epochs=0.25", "train.progress=false", "train.log_every=1", "train.threads=1"]
DEMO = """
import sys
from mimco.cli import main, train
train.QUICK = {quick!r}
sys.exit(main.main(["demo", "--out", {out!r}, "--quick"]))
"""


def _stop_when(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> tuple[int, str, str]:
    """SIGTERM ``proc`` once a run under ``folder`` has logged a step (its stage is training); its exit."""
    start = time.monotonic()
    while not any(len(f.read_text().splitlines()) >= 2 for f in folder.glob("*/log.csv")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "the stage never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_sigterm_in_the_demos_teacher_stage_stops_the_demo(tmp_path):
    quick = [*LONG, "optim.epochs=200", "teacher:moco.mlp_dim=64", "teacher:moco.proj_dim=32",
             "mimco:loss.head_hidden_dim=64"]
    code = DEMO.format(quick=quick, out=str(tmp_path))  # --quick's overrides, made long
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    code, out, err = _stop_when(proc, tmp_path)
    assert code == 143, err
    lines = err.strip().splitlines()
    assert lines[-2].startswith("mimco: the teacher stage was stopped by SIGTERM at step ")
    assert lines[-2].endswith("is written; the demo stops here. Resume it with:")
    assert lines[-1] == f"  mimco demo --out {tmp_path} --quick"
    assert not (tmp_path / "mimco").exists() and not (tmp_path / "results.md").exists()  # nothing ran after it
    assert "Traceback" not in err


def test_sigterm_in_the_studys_first_run_stops_the_study(tmp_path):
    cmd = [sys.executable, "benchmarks/reproduce.py", "--preset", "smoke", "--out", str(tmp_path), "--seeds", "0",
           "teacher:optim.epochs=200", "teacher:train.log_every=1", "teacher:train.threads=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    code, out, err = _stop_when(proc, tmp_path / "runs")
    assert code == 143, err
    lines = err.strip().splitlines()
    assert "stage was stopped by SIGTERM at step " in lines[-2] and lines[-2].endswith("Resume it with:")
    assert lines[-1] == "  python " + " ".join(cmd[1:])
    assert len(list((tmp_path / "runs").iterdir())) == 1 and not (tmp_path / "results.md").exists()
    assert "Traceback" not in err
