"""The benchmark scripts run end to end at a toy size (their figures are not judged here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHON": sys.executable}


def test_throughput_table(tmp_path):
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "benchmarks/throughput.py", "--arch", "vit_mini", "--img-size", "16", "--patch", "4",
                        "--batch", "8", "--warmup", "0", "--reps", "1", "--precisions", "fp32", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    for w in ("supervised", "simmim", "moco", "mimco", "teacher_fwd"):
        assert f"| fp32 | {w} |" in table
    assert "MimCo step time / SimMIM step time" in table and "loader (" in table


def test_gpu_check_tiny_on_cpu():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--device", "cpu"], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images_per_s"] > 0 and 0 < out["mfu"] < 1 and out["gflop_per_image"] > 0
    assert "images/s" in r.stdout and "MFU" in r.stdout


def test_reproduce_smoke_runs_and_resumes(tmp_path):
    cmd = [sys.executable, "benchmarks/reproduce.py", "--preset", "smoke", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    for row in ("raw pixels", "random-init ViT", "MoCo v3 teacher", "MoCo v3, teacher + MimCo compute", "SimMIM",
                "MimCo (patch + image)", "patch only", "L1 regression", "block masking"):
        assert f"| {row} |" in table, row
    assert "| MimCo (patch + image) | 2 |" in table and " ± " in table
    for png in ("tsne.png", "curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "[reproduce] training" not in again.stderr  # everything reused
    assert again.stdout == r.stdout.replace(r.stdout.splitlines()[0], again.stdout.splitlines()[0])
