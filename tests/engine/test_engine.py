import pytest
import torch
from safetensors.torch import load_file

from mimco.config import OptimConfig
from mimco.engine import build_optimizer, build_scheduler
from mimco.errors import MimcoError
from mimco.io import atomic_save
from mimco.methods.mimco import MimCo
from mimco.pipeline import run_stage
from mimco.runs import load_checkpoint
from tests.helpers import tiny_mimco, tiny_pretrain_cfg, tiny_teacher_cfg


def test_param_groups_skip_decay_on_norms_biases_tokens():
    m: MimCo = tiny_mimco()
    opt = build_optimizer(m, OptimConfig(weight_decay=0.05))
    ids = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    for name in ["student.mask_token", "student.backbone.cls_token", "student.backbone.pos_embed",
                 "student.backbone.norm.weight", "student.backbone.blocks.0.attn.qkv.bias"]:
        assert ids[id(named[name])] == 0.0, name
    assert ids[id(named["student.backbone.blocks.0.attn.qkv.weight"])] == 0.05
    assert not any(id(p) in ids for p in m.teacher.parameters())


def test_warmup_then_cosine_per_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(base_lr=2.56e-3, batch_size=100, min_lr=0.0)  # lr = 1e-3
    opt = torch.optim.AdamW([p], lr=1e-3)
    s = build_scheduler(opt, cfg, total_steps=110, warmup_steps=10)
    lrs = []
    for step in range(110):
        s.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5e-4, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-5


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"stage": "teacher", "model": {}, "step": 1, "config": {}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Boom()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_refuses_non_mimco_and_code(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(MimcoError, match="not a mimco checkpoint"):
        load_checkpoint(tmp_path / "other.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil(), "stage": "teacher"}, tmp_path / "evil.pt")
    with pytest.raises(MimcoError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_data_on_device_trains_the_same(tmp_path):
    """``data.on_device=true`` (the gpu preset: images copied to the device once, views made there)
    follows exactly the path of the default loader; on the CPU the weights must be equal."""
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "host"))
    moved = run_stage("teacher", tiny_teacher_cfg(tmp_path, "device", ("data.on_device=true",)))
    assert moved["step"] == 8
    a, b = _weights(tmp_path / "host" / "last.pt"), _weights(tmp_path / "device" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_data_on_device_refuses_file_datasets(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    with pytest.raises(MimcoError, match="data.on_device=true needs an in-memory dataset"):
        tiny_teacher_cfg(tmp_path, "files", ("data.name=imagefolder", f"data.root={tmp_path / 'imgs'}",
                                             "data.on_device=true"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "pretrain"])
def test_resume_equals_uninterrupted(tmp_path, stage, teacher_ckpt):
    make = (lambda n, extra=(): tiny_teacher_cfg(tmp_path, n, extra)) if stage == "teacher" else \
        (lambda n, extra=(): tiny_pretrain_cfg(tmp_path, teacher_ckpt, n, extra))
    full = run_stage(stage, make("full"))
    assert full["step"] == 8
    part = run_stage(stage, make("part", ("train.max_steps=3",)))
    assert part["step"] == 3
    resumed = run_stage(stage, make("part"), resume=load_checkpoint(tmp_path / "part" / "last.pt"),
                        run_dir=tmp_path / "part")
    assert resumed["step"] == 8
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (tmp_path / "part" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,loss") and len(rows) == 1 + 5  # steps 2, 3 | 4, 6, 8
    weights = load_file(str(tmp_path / "full" / "backbone.safetensors"))
    assert "blocks.0.attn.qkv.weight" in weights and not any(k.startswith("head.") for k in weights)
    # the exact architecture rides in the file's metadata (2 heads of 16: no tensor shape says so, and timm's
    # head width of 64 would give 1): timm builds it from model_args, mimco reads it back, both compute the run's net
    import json

    import timm

    from mimco.io import weights_metadata
    from mimco.models.formats import load_backbone

    args = json.loads(weights_metadata(tmp_path / "full" / "backbone.safetensors")["model_args"])
    assert args["num_heads"] == 2 and args["embed_dim"] == 32 and args["depth"] == 2
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **args)
    vit.load_state_dict(weights)
    x = torch.randn(2, 3, 16, 16)
    run = load_backbone(str(tmp_path / "full" / "last.pt"))[0].eval()
    file = load_backbone(str(tmp_path / "full" / "backbone.safetensors"))[0].eval()
    with torch.no_grad():
        want = run.forward_features(x)
        assert torch.allclose(vit.eval().forward_features(x), want, atol=1e-5)
        assert torch.allclose(file.forward_features(x), want, atol=1e-5)


def test_bf16_accumulation_and_clipping(tmp_path, monkeypatch):
    from mimco.methods.moco import MoCoV3

    calls = []
    original = MoCoV3.forward

    def counting(self, views, step, *rest):
        calls.append(views[0].shape[0])
        loss, logs = original(self, views, step, *rest)
        assert loss.dtype == torch.float32  # the loss is computed in fp32 under autocast
        return loss, logs

    monkeypatch.setattr(MoCoV3, "forward", counting)
    out = run_stage("teacher", tiny_teacher_cfg(tmp_path, "bf16", ("train.precision=bf16", "optim.accum_steps=2",
                                                                    "optim.clip_grad=1.0", "train.max_steps=3")))
    assert out["step"] == 3 and torch.isfinite(torch.tensor(out["loss"]))
    assert calls == [16] * 6  # 3 steps x 2 micro-batches of 32 / 2


def _lrs(path):
    import csv

    with open(path) as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path, capsys):
    """``--resume last.pt optim.epochs=4`` after a 2-epoch run: the new steps follow a 4-epoch
    schedule (a restored timm scheduler state would keep the old length and train them at lr 0)."""
    from mimco.cli.main import main

    short = tiny_teacher_cfg(tmp_path, "short", ("train.log_every=1", "optim.epochs=2"))
    run_stage("teacher", short)
    code = main(["teacher", "--resume", str(tmp_path / "short" / "last.pt"), "optim.epochs=4"])
    assert code == 0, capsys.readouterr().err
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "long", ("train.log_every=1", "optim.epochs=4")))
    resumed, fresh = _lrs(tmp_path / "short" / "log.csv"), _lrs(tmp_path / "long" / "log.csv")
    assert sorted(resumed) == list(range(1, 33))
    for step in range(17, 33):
        assert resumed[step] == pytest.approx(fresh[step], rel=1e-6), step
    assert resumed[17] > 0.4 * 1.25e-4  # the 3rd epoch trains (peak lr 1e-3 * 32 / 256; a stale schedule gives 0)


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_honour(tmp_path, capsys):
    from mimco.cli.main import main

    run_stage("teacher", tiny_teacher_cfg(tmp_path, "r", ("optim.epochs=2",)))
    last = str(tmp_path / "r" / "last.pt")
    before = (tmp_path / "r" / "last.pt").read_bytes()
    for override, message in (("optim.batch_size=64",
                               "optim.batch_size cannot change on resume (the checkpoint has 32, now 64)"),
                              ("model.depth=3", "model.depth cannot change on resume (the checkpoint has 2, now 3)"),
                              ("optim.epochs=1", "the checkpoint is at step 16 but optim.epochs=1.0 ends at step 8")):
        assert main(["teacher", "--resume", last, override]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "r" / "last.pt").read_bytes() == before  # nothing written over


def test_accumulation_gives_the_whole_batch_gradient(tmp_path, capsys):
    """SimMIM has no BatchNorm and no negatives: 2 micro-batches must give the gradient of the whole
    batch, so the weights match a run without accumulation (each micro-batch has its own masks:
    one mask reused for both would differ). The run says at start-up what accumulation changes."""
    cfgs = {n: tiny_pretrain_cfg(tmp_path, "unused", n, ("method=simmim", "train.max_steps=3", *extra))
            for n, extra in (("whole", ()), ("accum", ("optim.accum_steps=2",)))}
    for cfg in cfgs.values():
        run_stage("pretrain", cfg)
    err = capsys.readouterr().err
    assert "gradient accumulation over 2 micro-batches of 16 per process: contrastive negatives and BatchNorm" in err
    a, b = _weights(tmp_path / "whole" / "last.pt"), _weights(tmp_path / "accum" / "last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6), k


def test_effective_lr_follows_linear_scaling_and_warmup():
    """lr = base_lr * batch / 256, reached linearly over the warm-up, for every parameter group."""
    m: MimCo = tiny_mimco()
    cfg = OptimConfig(base_lr=1e-3, batch_size=512, min_lr=0.0)
    opt = build_optimizer(m, cfg)
    sched = build_scheduler(opt, cfg, total_steps=100, warmup_steps=10)
    for step, want in ((5, 2e-3 * 0.5), (10, 2e-3)):
        sched.step_update(step)
        assert all(g["lr"] == pytest.approx(want) for g in opt.param_groups), step


def test_one_step_cosine_does_not_warn(caplog):
    import logging

    from mimco.config import OptimConfig

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level(logging.WARNING):
        build_scheduler(opt, OptimConfig(), total_steps=2, warmup_steps=1)  # t_initial = 1: timm warns
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]
    assert logging.getLogger("timm.scheduler.cosine_lr").level == logging.NOTSET  # left as it was


def _first_step_grads(tmp_path, monkeypatch, name, extra):
    """The gradients AdamW sees at the first optimiser step of a SimMIM run (no BatchNorm, no drop path)."""
    seen = []
    real = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        if not seen:
            seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    run_stage("pretrain", tiny_pretrain_cfg(tmp_path, tmp_path / "none.pt", name,
                                            ("method=simmim", "train.max_steps=1", *extra)))
    return seen[0]


def test_micro_batch_gradient_and_clipping_against_the_whole_batch(tmp_path, monkeypatch):
    """The gradient AdamW sees: ``optim.micro_batch=8`` (4 micro-batches of the batch of 32) gives the
    whole batch's (SimMIM: no BatchNorm, per-sample masks), and ``optim.clip_grad`` scales that
    gradient down to its limit without turning it."""
    whole = _first_step_grads(tmp_path, monkeypatch, "whole", ())
    micro = _first_step_grads(tmp_path, monkeypatch, "micro", ("optim.micro_batch=8",))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in whole]))
    for a, c in zip(whole, micro):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-7)
    limit = float(norm) / 10
    clipped = _first_step_grads(tmp_path, monkeypatch, "clip", (f"optim.clip_grad={limit}",))
    got = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert float(got) == pytest.approx(limit, rel=1e-4)
    for a, c in zip(whole, clipped):
        assert torch.allclose(c, a * (limit / norm), rtol=1e-3, atol=1e-8)


def test_a_run_returns_with_no_mask_build_in_flight(tmp_path, monkeypatch):
    """Masks are built one step ahead; the build for the step after the last must be finished
    when training returns (the end-of-run evaluation forks loader workers, and the process may exit)."""
    import time

    from mimco.masking import MaskGenerator

    finished = []
    real = MaskGenerator.build

    def slow(self, batch_size, step, first_index=0):
        if step == 2:  # the prefetch after the last step
            time.sleep(0.5)
            finished.append(step)
        return real(self, batch_size, step, first_index)

    monkeypatch.setattr(MaskGenerator, "build", slow)
    run_stage("pretrain",
              tiny_pretrain_cfg(tmp_path, tmp_path / "none.pt", "r", ("method=simmim", "train.max_steps=2")))
    assert finished == [2]


def test_the_trainer_hands_the_method_its_schedule_length(tmp_path):
    """MoCo's momentum follows the run's schedule: optim.epochs x steps per epoch (here 2 x 8 = 16),
    not a default; the log's momentum at each step is momentum_at(step - 1, 16, base)."""
    import csv

    from mimco.methods.moco import momentum_at

    cfg = tiny_teacher_cfg(tmp_path, "m", ("optim.epochs=2", "train.max_steps=4", "train.log_every=1"))
    run_stage("teacher", cfg)
    with open(tmp_path / "m" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["momentum"]) for r in rows] == pytest.approx(
        [momentum_at(s, 16, cfg.moco.momentum) for s in range(4)], abs=1e-6)


def test_the_momentum_update_follows_each_optimiser_step(tmp_path, monkeypatch):
    """The engine calls ``after_step``: MoCo's EMA runs before a fresh run's first forward and after
    each optimiser step with the next step's momentum, once per step with accumulation, never inside
    a forward, not after the last step, and not again at the start of a resumed run (its checkpoint
    was written after the update): the order of MoCo v3's loop, where step t begins with the EMA of
    momentum_at(t)."""
    from mimco.methods.moco import MoCoV3, momentum_at

    events = []
    forward, update, adamw = MoCoV3.forward, MoCoV3.update_momentum_encoder, torch.optim.AdamW.step

    def recording_forward(self, views, step, *rest):
        events.append(("forward", step))
        inside.append(True)
        try:
            return forward(self, views, step, *rest)
        finally:
            inside.pop()

    def recording_update(self, m):
        assert not inside, "the momentum encoder was written inside a forward"
        events.append(("ema", round(m, 12)))
        return update(self, m)

    def recording_step(self, *args, **kwargs):
        # loading a checkpoint's optimiser state steps once on zero gradients to build the state: not a step
        if any(p.grad is not None and bool(p.grad.any()) for g in self.param_groups for p in g["params"]):
            events.append(("optimiser",))
        return adamw(self, *args, **kwargs)

    inside: list[bool] = []
    monkeypatch.setattr(MoCoV3, "forward", recording_forward)
    monkeypatch.setattr(MoCoV3, "update_momentum_encoder", recording_update)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    make = lambda extra=(): tiny_teacher_cfg(tmp_path, "m", ("optim.accum_steps=2", *extra))  # noqa: E731
    cfg = make()
    run_stage("teacher", make(("train.max_steps=3",)))
    resumed = run_stage("teacher", cfg, resume=load_checkpoint(tmp_path / "m" / "last.pt"), run_dir=tmp_path / "m")
    total = resumed["total_steps"]
    assert total == 8
    want = [("ema", round(momentum_at(0, total, cfg.moco.momentum), 12))]
    for t in range(total):
        want += [("forward", t), ("forward", t), ("optimiser",)]
        if t + 1 < total:
            want.append(("ema", round(momentum_at(t + 1, total, cfg.moco.momentum), 12)))
    assert events == want
