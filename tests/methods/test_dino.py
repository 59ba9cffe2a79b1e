"""examples/dino.py, a method and a view kind defined outside the package in one file: DINO's loss
against a loop reference, its centre, temperature and EMA, its multi-crop views; trained by
``mimco teacher --plugin`` on 2 gloo processes under DDP and FSDP (each equal to one process),
then used as stage 2's frozen teacher by a ``mimco pretrain`` that does not load the plugin."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from mimco.config import TeacherStageConfig, load_config
from mimco.errors import MimcoError
from mimco.plugins import load_file
from mimco.runs import load_checkpoint
from tests.helpers import ENV, HANG, ROOT, TINY_DATA, TINY_MODEL, TINY_RUN, TORCHRUN

DINO_FILE = ROOT / "examples" / "dino.py"
dino = load_file(DINO_FILE)  # registers method=dino and views=multicrop, as --plugin does
SMALL = ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops=2"]


def _cfg(*over: str):
    return load_config(TeacherStageConfig, None, ["method=dino", *TINY_DATA, *TINY_MODEL, *SMALL, *over])


def _reference_loss(student, teacher, center, ts, tt):
    """DINO's loss written out per sample in float64: H(teacher i, student v) over v != i."""
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            for b in range(len(t)):
                z = [(float(x) - float(c)) / tt for x, c in zip(t[b], center[0])]
                q = [math.exp(x - max(z)) for x in z]
                q = [x / sum(q) for x in q]
                y = [float(x) / ts for x in s[b]]
                log_norm = max(y) + math.log(sum(math.exp(x - max(y)) for x in y))
                total += -sum(qk * (yk - log_norm) for qk, yk in zip(q, y)) / len(t)
            n += 1
    return total / n


def test_the_loss_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(3, 5, generator=g) for _ in range(2)]
    center = torch.randn(1, 5, generator=g) * 0.1
    got = dino.dino_loss(student, teacher, center, 0.1, 0.04)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), _reference_loss(student, teacher, center, 0.1, 0.04), rel_tol=1e-4)
    # the same crop as its own target is left out: with it the value differs
    same = dino.dino_loss(student[:2], teacher, center, 0.1, 0.04)
    assert not math.isclose(float(same), _reference_loss(student, teacher, center, 0.1, 0.04), rel_tol=1e-3)


def test_centre_temperature_and_ema():
    cfg = _cfg("dino.warmup_teacher_temp=0.02", "dino.teacher_temp=0.06", "dino.warmup_teacher_temp_epochs=2",
               "optim.epochs=4", "dino.center_momentum=0.75")
    method = dino.build_dino(cfg, torch.device("cpu"))
    method.total_steps = 40
    assert method.teacher_temp(0) == pytest.approx(0.02) and method.teacher_temp(10) == pytest.approx(0.04)
    assert method.teacher_temp(20) == pytest.approx(0.06) and method.teacher_temp(39) == pytest.approx(0.06)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    with torch.no_grad():
        t = method.teacher(torch.cat(views[:2]))
    loss, logs = method(views, 0)
    assert loss.isfinite() and 0 < float(logs["teacher_entropy"]) <= math.log(64) + 1e-4
    assert torch.allclose(method.center, 0.25 * t.mean(0, keepdim=True), atol=1e-6)  # 0.75 * 0 + 0.25 * mean
    method.eval()
    before = method.center.clone()
    method(views, 0)
    assert torch.equal(method.center, before)  # evaluation leaves the centre alone
    # the EMA: teacher <- m * teacher + (1 - m) * student, m from DINO's cosine schedule
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    old = [p.clone() for p in method.teacher.parameters()]
    method.after_step(10)
    m = dino.momentum_at(10, 40, 0.996)
    for o, t_new, s in zip(old, method.teacher.parameters(), method.student.parameters()):
        assert torch.allclose(t_new, m * o + (1 - m) * s, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_multicrop_views_batched_and_per_image(channels):
    from PIL import Image

    cfg = _cfg(f"data.channels={channels}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]")
    assert dino.local_side(cfg) == 8  # 96/224 of 16 px in whole 4-px patches
    x = torch.randint(0, 256, (5, channels, 16, 16), dtype=torch.uint8)
    views = dino.MultiCrop(cfg)(x)
    assert [tuple(v.shape) for v in views] == [(5, channels, 16, 16)] * 2 + [(5, channels, 8, 8)] * 2
    img = Image.fromarray(x[0].permute(1, 2, 0).squeeze(-1).numpy())
    one = dino.image_multicrop(cfg)(img)
    assert [tuple(v.shape) for v in one] == [(channels, 16, 16)] * 2 + [(channels, 8, 8)] * 2


def test_its_keys_are_checked_at_load():
    with pytest.raises(MimcoError, match=r"dino.local_scale=\[0.5, 0.2\] must satisfy 0 < low <= high <= 1"):
        _cfg("dino.local_scale=[0.5,0.2]")
    with pytest.raises(MimcoError, match="dino.student_temp=0.0 is out of range"):
        _cfg("dino.student_temp=0")
    with pytest.raises(MimcoError, match="unknown config key 'dino.out_dims'; did you mean dino.out_dim"):
        _cfg("dino.out_dims=8")


#: no randomness outside the data order: every crop the whole image, no colour, blur, solarize or flip
DET = ["dino.global_scale=[1.0,1.0]", "dino.local_scale=[1.0,1.0]", "dino.local_blur_prob=0", "aug.flip_prob=0",
       "aug.jitter_prob=0", "aug.grayscale_prob=0", "aug.blur_prob1=0", "aug.blur_prob2=0", "aug.solarize_prob2=0"]


def _train(tmp_path, name, *extra, procs=2):
    args = ["teacher", "--plugin", str(DINO_FILE), "method=dino", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *SMALL, *DET,
            "train.threads=1", "train.log_every=1", "optim.epochs=2", f"train.out_dir={tmp_path}", f"train.name={name}",
            *extra]
    launch = [*TORCHRUN[:-1], str(procs), "-m", "mimco"] if procs > 1 else [sys.executable, "-m", "mimco"]
    r = subprocess.run([*launch, *args], capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_checkpoint(tmp_path / name / "last.pt")


@pytest.mark.slow
def test_dino_trains_under_ddp_and_fsdp_and_teaches_stage_2(tmp_path):
    one = _train(tmp_path, "one", procs=1)
    for strategy in ("ddp", "fsdp"):
        two = _train(tmp_path, strategy, f"train.strategy={strategy}")
        assert two["step"] == two["total_steps"] == 16
        # the centre is the global batch's mean (one all-reduce): 2 processes train what 1 does
        for k, v in one["model"].items():
            a, b = v.float(), two["model"][k].float()
            if k.endswith("attn.qkv.bias"):  # the key bias: softmax ignores it, its gradient is float noise that
                d = len(a) // 3  # Adam scales to whole steps; its query and value thirds are compared
                a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
            assert torch.allclose(a, b, atol=1e-5), (strategy, k)
    ckpt = load_checkpoint(tmp_path / "fsdp" / "last.pt")
    assert ckpt["backbones"] == {"momentum": "teacher.", "base": "student."}
    saved = yaml.safe_load((tmp_path / "fsdp" / "config.yaml").read_text())
    assert saved["method"] == "dino" and saved["dino"]["out_dim"] == 64 and "moco" not in saved
    header = (tmp_path / "fsdp" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "teacher_entropy", "teacher_temp"} <= set(header)
    # stage 2 distils from DINO's teacher encoder; the plugin is not needed to read the checkpoint
    teacher = tmp_path / "fsdp" / "last.pt"
    r = subprocess.run([sys.executable, "-m", "mimco", "pretrain", f"teacher.checkpoint={teacher}", *TINY_DATA,
                        *TINY_MODEL, *TINY_RUN, "loss.head_hidden_dim=32", "train.max_steps=4",
                        f"train.out_dir={tmp_path}", "train.name=student"],
                       capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["step"] == 4 and math.isfinite(summary["loss"])
    assert "teacher mimco teacher (stage 1) checkpoint" in r.stderr
