"""Two CPU processes (gloo) through torchrun against one process with the same global batch."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimco.engine.checkpoint import load_checkpoint
from tests.conftest import TINY_DATA, TINY_MODEL, TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_gathered_negatives_cover_the_global_batch(tmp_path):
    _run([*TORCHRUN, str(ROOT / "tests" / "engine" / "ddp_worker.py"), str(tmp_path)])
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(rows) == 2
    for r in rows:
        assert r["gathered_rows"] == 6 and r["rows_from_1"] == 3
        assert r["image_loss"] < 1e-3 and r["grad_finite"]  # the positive sits at rank * B + i
        assert r["patch_logits"] == [6, 24]  # B*M local queries against world*B*N teacher tokens
        assert r["patch_loss"] < 1e-3


def _losses(path):
    with open(path) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, teacher_ckpt, strategy):
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0.0"]  # no randomness outside data order and masks
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=4", "train.threads=1", "loss.patch_negatives=batch", f"teacher.checkpoint={teacher_ckpt}",
            f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=ddp", f"train.strategy={strategy}"])
    _run([sys.executable, "-m", "mimco", *args, "train.name=single"])
    ddp, single = _losses(tmp_path / "ddp" / "log.csv"), _losses(tmp_path / "single" / "log.csv")
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5
    wa, wb = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"], load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moco_on_two_processes_resumes_on_one(tmp_path, strategy):
    args = ["teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1",
            f"train.out_dir={tmp_path}", "train.name=m", f"train.strategy={strategy}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.max_steps=3"])
    # resume the 2-process run on 1 process with micro-batches of 16: same global batch, same schedule
    r = _run([sys.executable, "-m", "mimco", "teacher", "--resume", str(tmp_path / "m" / "last.pt"), "optim.micro_batch=16"])
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["step"] == out["total_steps"] == 8
