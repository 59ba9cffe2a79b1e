"""Two CPU processes (gloo) through torchrun against one process with the same global batch."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimco.runs import load_checkpoint
from tests.helpers import HANG, TINY_DATA, TINY_MODEL, TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_gathered_negatives_cover_the_global_batch(tmp_path):
    _run([*TORCHRUN, str(ROOT / "tests" / "engine" / "ddp_worker.py"), str(tmp_path)])
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(rows) == 2
    for r in rows:
        assert r["gathered_rows"] == 6 and r["rows_from_1"] == 3
        assert r["image_loss"] < 1e-3 and r["grad_finite"]  # the positive sits at rank * B + i
        assert r["patch_logits"] == [6, 24]  # B*M local queries against world*B*N teacher tokens
        assert r["patch_loss"] < 1e-3


#: one-process reference runs, trained once for the tests (a parametrized pair of strategies) that share them
_SINGLE: dict[tuple[str, ...], Path] = {}


def _single(args: list[str], folder: Path) -> Path:
    """The folder of the one-process run of ``args`` (whose ``train.out_dir`` is replaced by ``folder``
    the first time), trained once: the DDP and FSDP variants of a test compare against the same run."""
    key = tuple(a for a in args if not a.startswith("train.out_dir="))
    if key not in _SINGLE:
        _run([sys.executable, "-m", "mimco", *key, f"train.out_dir={folder}", "train.name=single"])
        _SINGLE[key] = folder / "single"
    return _SINGLE[key]


def _losses(path):
    with open(path) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, teacher_ckpt, strategy):
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]",
           "aug.flip_prob=0.0"]  # no randomness outside data order and masks
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=4", "train.threads=1", "loss.patch_negatives=batch", f"teacher.checkpoint={teacher_ckpt}",
            f"train.out_dir={tmp_path}", "optim.clip_grad=1e6"]  # no clipping; the norm is logged
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=ddp", f"train.strategy={strategy}"])
    one = _single(args, tmp_path)
    ddp, single = _losses(tmp_path / "ddp" / "log.csv"), _losses(one / "log.csv")
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5
    # the gradients' total norm before clipping: under FSDP the norm of sharded gradients, gathered
    norms = [[float(r["grad_norm"]) for r in csv.DictReader(open(d / "log.csv"))] for d in (tmp_path / "ddp", one)]
    assert all(x > 0 for x in norms[1]) and all(abs(x - y) <= 1e-4 * y for x, y in zip(*norms))
    wa = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    wb = load_checkpoint(one / "last.pt")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_position_remedies_on_two_processes_equal_one_process(tmp_path, teacher_ckpt, strategy):
    """Same-position negatives gathered from both processes, the per-position target mean averaged
    over them (saved in the checkpoint) and the head's position input: 2 processes equal 1."""
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0.0"]
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=4", "train.threads=1", "loss.patch_negatives=image+position",
            "loss.target_centring=position", "loss.head_position=true", f"teacher.checkpoint={teacher_ckpt}",
            f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=two", f"train.strategy={strategy}"])
    one = _single(args, tmp_path)
    two, single = _losses(tmp_path / "two" / "log.csv"), _losses(one / "log.csv")
    assert [s for s, _ in two] == [1, 2, 3, 4] and all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(two, single))
    wa, wb = load_checkpoint(tmp_path / "two" / "last.pt")["model"], load_checkpoint(one / "last.pt")["model"]
    assert wa["target_centre"].abs().sum() > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.slow
def test_a_run_folder_in_use_stops_every_process_at_start(tmp_path):
    """A run folder another process trains in: both processes of a torchrun stop at start with the
    same one line (rank 0 holds the verdict and shares it), none waits in a collective, nothing is
    written there."""
    from mimco.runs import LOCK, RunLock

    run = tmp_path / "m"
    run.mkdir()
    holder = RunLock(run)
    assert holder.acquire() is None
    r = subprocess.run([*TORCHRUN, "-m", "mimco", "teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64",
                        "moco.proj_dim=32", "train.threads=1", f"train.out_dir={tmp_path}", "train.name=m"],
                       capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT)
    holder.release()
    assert r.returncode != 0
    assert f"is training in {run}; wait for it to end" in r.stderr
    assert "Connection closed" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-2000:]
    assert [p.name for p in run.iterdir()] == [LOCK]


@pytest.mark.slow
def test_fsdp_bf16_policy_on_two_processes_matches_one_process(tmp_path, teacher_ckpt):
    """FSDP2 with train.precision=bf16 gathers parameters in bf16 and reduces gradients in fp32
    (its MixedPrecisionPolicy): the losses match a single bf16 process within bf16 rounding, and the
    checkpoint keeps fp32 weights."""
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0.0"]
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=4", "train.threads=1", "train.precision=bf16", f"teacher.checkpoint={teacher_ckpt}",
            f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=fsdp", "train.strategy=fsdp"])
    _run([sys.executable, "-m", "mimco", *args, "train.name=single"])
    fsdp, single = _losses(tmp_path / "fsdp" / "log.csv"), _losses(tmp_path / "single" / "log.csv")
    assert [s for s, _ in fsdp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(fsdp, single):
        assert a == pytest.approx(b, rel=2e-2)  # bf16 parameters: ~3 significant digits
    weights = _weights(tmp_path / "fsdp" / "last.pt")
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_fsdp_accumulation_reduces_gradients_once_per_step(tmp_path):
    """FSDP2 with optim.accum_steps=2 reduce-scatters each unit's gradients once per step, at the last
    micro-batch (set_requires_gradient_sync, as DDP's no_sync), not once per micro-batch: as many
    reduce-scatters as without accumulation, and the optimiser sees the whole batch's gradients
    (SimMIM: no BatchNorm, no negatives)."""
    _run([*TORCHRUN, str(ROOT / "tests" / "engine" / "fsdp_accum_worker.py"), str(tmp_path)])
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        counts = got["reduce_scatters"]
        assert counts["whole"] > 0 and counts["accum"] == counts["whole"], counts
        whole, accum = got["grads"]["whole"], got["grads"]["accum"]
        assert len(whole) == len(accum) > 0
        for a, b in zip(whole, accum):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-7)


def test_the_process_group_takes_the_configured_timeout(tmp_path, monkeypatch):
    """setup() joins the process group with train.dist_timeout_minutes as its timeout (how long a
    collective waits for the slowest process: data.cache's decode by each node's local rank 0 must
    fit in it), read back from a real gloo group of one."""
    import socket
    from datetime import timedelta

    import torch.distributed as tdist

    from mimco.pipeline import setup
    from tests.helpers import tiny_teacher_cfg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = tiny_teacher_cfg(tmp_path, "t", ("train.init_distributed=true", "train.device=cpu",
                                           "train.dist_timeout_minutes=7"))
    setup(cfg)
    try:
        group = tdist.distributed_c10d._get_default_group()
        assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(minutes=7)
    finally:
        tdist.destroy_process_group()


def test_fsdp_mixed_precision_policy_follows_the_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from mimco.engine.sharding import mixed_precision

    unit, root = mixed_precision("bf16")
    assert (unit.param_dtype, unit.reduce_dtype, unit.cast_forward_inputs) == (torch.bfloat16, torch.float32, True)
    assert (root.param_dtype, root.reduce_dtype, root.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    assert mixed_precision("fp16")[0].param_dtype == torch.float16
    assert mixed_precision("fp32")[0] == MixedPrecisionPolicy() and mixed_precision("fp32")[1].param_dtype is None


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_two_processes_match_eager_one_process(tmp_path, teacher_ckpt, strategy):
    """train.compile=true (every block, patch embedding and head) under DDP or FSDP2 gives the eager
    single-process run's losses and weights (inductor fuses differently: a tolerance, not equality)."""
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0.0"]
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=3", "train.threads=1", f"teacher.checkpoint={teacher_ckpt}", f"train.out_dir={tmp_path}"]
    r = _run([*TORCHRUN, "-m", "mimco", *args, "train.name=compiled", "train.compile=true",
              f"train.strategy={strategy}"])
    eager_run = _single(args, tmp_path)
    # student: patch embedding + 2 blocks; teacher: the same and its projector; the patch and image heads
    assert "mimco: first step " in r.stderr and "torch.compile of 9 blocks" in r.stderr, r.stderr[-2000:]
    compiled, eager = _losses(tmp_path / "compiled" / "log.csv"), _losses(eager_run / "log.csv")
    assert [s for s, _ in compiled] == [1, 2, 3]
    for (_, a), (_, b) in zip(compiled, eager):
        assert abs(a - b) < 1e-4
    wa, wb = _weights(tmp_path / "compiled" / "last.pt"), _weights(eager_run / "last.pt")
    assert wa.keys() == wb.keys()  # compiling in place keeps the parameter names
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["first_step_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy, precision", [("ddp", "fp32"), ("fsdp", "fp32"), ("fsdp", "bf16")])
def test_moco_on_two_processes_resumes_on_one(tmp_path, strategy, precision):
    args = ["teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1",
            f"train.out_dir={tmp_path}", "train.name=m", f"train.strategy={strategy}", f"train.precision={precision}"]
    two = _run([*TORCHRUN, "-m", "mimco", *args, "train.max_steps=3"])
    assert two.stdout.count('"total_steps"') == 1, two.stdout  # the summary, printed by rank 0 only
    assert json.loads(two.stdout[two.stdout.index("{"):])["step"] == 3
    # resume the 2-process run on 1 process with micro-batches of 16: same global batch, same schedule
    r = _run([sys.executable, "-m", "mimco", "teacher", "--resume", str(tmp_path / "m" / "last.pt"),
              "optim.micro_batch=16"])
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["step"] == out["total_steps"] == 8


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_run_evaluates_at_the_end(tmp_path, teacher_ckpt, strategy):
    """At the end of a 2-process run each process extracts its share of the features (under FSDP
    from the live sharded model, its parameters gathered) and rank 0 scores the k-NN: the score of
    a single process."""
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "loss.head_hidden_dim=64", "train.max_steps=0",
            "optim.epochs=0.5", "train.threads=1", f"teacher.checkpoint={teacher_ckpt}", f"train.out_dir={tmp_path}",
            "eval.at_end=true", "eval.knn_k=5", "eval.every_steps=2", "eval.monitor_train=60", "eval.monitor_test=30"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=two", f"train.strategy={strategy}"])
    one = _single(args, tmp_path)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "two", one))
    assert a["step"] == b["step"] == 4 and abs(a["knn_top1"] - b["knn_top1"]) <= 1.0 and "knn_seconds" in a
    # the k-NN monitor (each process its share, under FSDP from the sharded model): one query of 30 at most differs
    monitors = [[(r["step"], float(r["knn_monitor"])) for r in csv.DictReader(open(d / "log.csv"))
                 if r["knn_monitor"]] for d in (tmp_path / "two", one)]
    assert [s for s, _ in monitors[0]] == [s for s, _ in monitors[1]] == ["2", "4"]
    assert all(abs(x - y) <= 100 / 30 + 1e-6 for (_, x), (_, y) in zip(*monitors))


@pytest.mark.slow
@pytest.mark.parametrize("weights", [["loss.image_weight=0"], ["loss.patch_weight=0"]])
def test_a_zero_weight_loss_runs_under_ddp(tmp_path, teacher_ckpt, weights):
    """DDP refuses parameters that never get a gradient: a head whose loss weighs 0 is not built."""
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "loss.head_hidden_dim=64", "train.max_steps=3",
            "train.threads=1", f"teacher.checkpoint={teacher_ckpt}", f"train.out_dir={tmp_path}", "train.name=z",
            *weights]
    _run([*TORCHRUN, "-m", "mimco", *args])
    assert load_checkpoint(tmp_path / "z" / "last.pt")["step"] == 3


@pytest.mark.slow
def test_resume_gives_each_rank_its_own_random_state(tmp_path):
    """MoCo's views are drawn on each process from its own generator. Stopped and resumed on 2
    processes, the run must equal the uninterrupted one: each rank gets its own state back."""
    args = ["teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1",
            "model.drop_path_rate=0.1", f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=full"])
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=cut", "train.max_steps=4"])
    _run([*TORCHRUN, "-m", "mimco", "teacher", "--resume", str(tmp_path / "cut" / "last.pt")])
    rng = load_checkpoint(tmp_path / "cut" / "last.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.slow
def test_unreadable_image_keeps_batches_equal_on_every_rank(tmp_path):
    """A zero-byte file in an image folder: on 2 processes the gathers need equal batches; the file
    is replaced by the next readable one and the run reports the count once at its end."""
    from tests.helpers import messy_folder as _messy_folder

    _messy_folder(tmp_path / "imgs")
    r = _run([*TORCHRUN, "-m", "mimco", "teacher", *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32",
              "data.name=folder", f"data.root={tmp_path / 'imgs'}", "data.img_size=16", "data.num_workers=0",
              "optim.batch_size=8", "optim.epochs=2", "data.max_bad_fraction=0.2", "train.threads=1",
              f"train.out_dir={tmp_path}", "train.name=m"])
    assert load_checkpoint(tmp_path / "m" / "last.pt")["step"] == 6
    lines = [ln for ln in r.stderr.splitlines() if "unreadable" in ln]
    # 27 files, 2 of them unreadable: each counted once, whichever process and epoch met it, and named
    assert len(lines) == 1 and re.fullmatch(r"mimco: skipped 2 unreadable files of 27 \(.*(empty|text)\.jpg, "
                                            r".*(empty|text)"
                                            r"\.jpg\), each replaced by the next readable file", lines[0]), r.stderr
    assert "Warning" not in r.stderr
    # log.csv (and TensorBoard) count the unreadable images met so far over both processes (what
    # data.max_bad_fraction is checked against)
    skipped = [int(row["skipped_images"]) for row in csv.DictReader(open(tmp_path / "m" / "log.csv"))]
    assert skipped == sorted(skipped) and skipped[-1] == 2


@pytest.mark.slow
def test_finetune_two_processes_equal_one_process(tmp_path, teacher_ckpt):
    """Fine-tuning on the shared engine: 2 processes, each on its half of every batch, give the
    single process's weights (deterministic augmentation; DDP averages the gradients)."""
    det = ["aug.auto_augment=", "aug.mixup=0", "aug.cutmix=0", "aug.reprob=0", "aug.label_smoothing=0",
           "aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0", "aug.color_jitter=0",
           "classifier.drop_path_rate=0"]
    args = ["finetune", str(teacher_ckpt), *TINY_DATA, "data.num_workers=0", "optim.batch_size=32", "optim.epochs=1",
            "optim.warmup_epochs=0.5", "optim.base_lr=1e-3", "train.progress=false", "train.threads=1",
            "train.log_every=1",
            f"train.out_dir={tmp_path}", *det]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=ddp"])
    _run([sys.executable, "-m", "mimco", *args, "train.name=single"])
    for (_, a), (_, b) in zip(_losses(tmp_path / "ddp" / "log.csv"), _losses(tmp_path / "single" / "log.csv")):
        assert abs(a - b) < 1e-5
    wa, wb = _weights(tmp_path / "ddp" / "last.pt"), _weights(tmp_path / "single" / "last.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ddp", "single"))
    assert a["top1"] == b["top1"] and a["step"] == 8


@pytest.mark.slow
def test_too_many_unreadable_images_stop_every_rank_together(tmp_path):
    """Past data.max_bad_fraction every process stops with the same one-line error (the counts are
    summed over processes), so no process dies in a collective its peer left."""
    from tests.helpers import messy_folder as _messy_folder

    _messy_folder(tmp_path / "imgs")
    r = subprocess.run([*TORCHRUN, "-m", "mimco", "teacher", *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64",
                        "moco.proj_dim=32",
                        "data.name=folder", f"data.root={tmp_path / 'imgs'}", "data.img_size=16", "data.num_workers=0",
                        "optim.batch_size=8", "optim.epochs=2", "train.threads=1", f"train.out_dir={tmp_path}",
                        "train.name=m"], capture_output=True, text=True, env=ENV, timeout=HANG, cwd=ROOT)
    assert r.returncode != 0
    # each process raises the same error at the same step (torchrun may stop the second before it prints)
    assert "mimco: error: 2 of 34 images could not be read (more than data.max_bad_fraction=0.01)" in r.stderr
    assert "Connection closed" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_foreign_teacher_on_two_processes_equals_one_process(tmp_path, strategy):
    """A DINOv2 file (registers, /14) seen at its own resolution, its grid resampled, mean of two
    blocks layer-normalised, mean-token image target: the teacher view on every rank."""
    from tests.helpers import dinov2_hub_file

    dinov2_hub_file(tmp_path / "dinov2.pth", regs=4)
    det = ["aug.min_scale=1.0", "aug.ratio=[1.0,1.0]", "aug.flip_prob=0.0"]
    args = ["pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, *det, "loss.head_hidden_dim=64", "train.log_every=1",
            "train.max_steps=3", "train.threads=1", f"teacher.checkpoint={tmp_path / 'dinov2.pth'}",
            "teacher.img_size=42",
            "teacher.layers=[-2,-1]", "teacher.target_norm=layernorm", "teacher.image_target=mean",
            "teacher.resample=bilinear", f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=ddp", f"train.strategy={strategy}"])
    _run([sys.executable, "-m", "mimco", *args, "train.name=single"])
    ddp, single = _losses(tmp_path / "ddp" / "log.csv"), _losses(tmp_path / "single" / "log.csv")
    assert [s for s, _ in ddp] == [1, 2, 3]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_sharded_blocks_compute_in_the_run_precision(precision, dtype):
    """shard() hands each unit the policy of train.precision: inside a block's forward its weights are
    the all-gathered bf16 copies (fp32 with fp32), while the optimiser's shards stay fp32."""
    import torch.distributed as tdist

    from mimco.config import ModelConfig
    from mimco.engine.sharding import shard
    from mimco.methods import MoCoV3
    from mimco.models import create_vit

    store = tdist.HashStore()
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        method = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16), 32, 64)
        method.total_steps = 4
        shard(method, precision)
        seen, bn = [], []
        method.base_encoder.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        norm = next(m for m in method.predictor.modules() if isinstance(m, torch.nn.BatchNorm1d))
        norm.register_forward_pre_hook(lambda m, a: bn.append((m.weight.dtype, a[0].dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as the trainer runs it
            loss, _ = method([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)], 0, 0)
        loss.backward()
        assert torch.isfinite(loss)
        assert seen == [dtype, dtype]  # two views
        assert bn == [(torch.float32, torch.float32)] * 2  # BatchNorm: fp32 weights and inputs, fp32 statistics
        assert all(p.dtype == torch.float32 for p in method.parameters())
    finally:
        tdist.destroy_process_group()


def test_fsdp_fp16_scaler_and_fused_adamw_step_together():
    """The GPU combination FSDP2 + fp16 (its policy) + GradScaler + fused AdamW + gradient clipping,
    on the CPU (which has all four): the scaler unscales DTensor gradients, backs off on overflow,
    and the sharded fp32 weights stay finite and move. gpu_check runs it on CUDA."""
    import torch.distributed as tdist
    from timm.optim import param_groups_weight_decay

    from mimco.config import ModelConfig
    from mimco.engine.sharding import shard
    from mimco.methods import MoCoV3
    from mimco.models import create_vit

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        m = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16), 32, 64)
        m.total_steps = 4
        shard(m, "fp16")
        opt = torch.optim.AdamW(param_groups_weight_decay(m, 0.05), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=True)
        before = {n: p.full_tensor().clone() for n, p in m.named_parameters() if p.requires_grad}
        scales = []
        for step in range(4):
            with torch.autocast("cpu", dtype=torch.float16):
                loss, _ = m([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], step, 0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            scales.append(scaler.get_scale())
        after = {n: p.full_tensor() for n, p in m.named_parameters() if p.requires_grad}
        assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in after.values())
        assert any(not torch.equal(before[n], after[n]) for n in before)  # some steps were taken
        assert scales == sorted(scales, reverse=True) and scales[-1] <= 2.0**8  # backs off on overflow, else holds
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_segfinetune_two_processes_equal_one_process(tmp_path, teacher_ckpt):
    """Segmentation fine-tuning, with its joint crop and flip on (drawn per sample, not per process):
    2 processes, each on its half of every batch, give the single process's losses, weights and
    mIoU. The head's BatchNorm takes the global batch's statistics and the loss is averaged over
    the global batch's labelled pixels, as one process does."""
    args = ["segfinetune", str(teacher_ckpt), "data.img_size=28", "seg.scenes=64", "seg.val_scenes=16",
            "data.num_workers=0", "optim.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0.5",
            "head.drop_path_rate=0", "head.layers=2", "train.progress=false", "train.threads=1", "train.log_every=1",
            f"train.out_dir={tmp_path}"]
    _run([*TORCHRUN, "-m", "mimco", *args, "train.name=ddp"])
    _run([sys.executable, "-m", "mimco", *args, "train.name=single"])
    ddp, single = _losses(tmp_path / "ddp" / "log.csv"), _losses(tmp_path / "single" / "log.csv")
    assert [s for s, _ in ddp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5
    wa, wb = _weights(tmp_path / "ddp" / "last.pt"), _weights(tmp_path / "single" / "last.pt")
    assert any(k.startswith("model.head.bn.running") for k in wa)
    # the final norm's bias shifts each channel the head's BatchNorm then centres: its gradient is rounding
    # noise, which Adam scales to steps of +-lr (here 1e-5), so it alone is left out
    for k in [k for k in wa if k != "model.backbone.norm.bias"]:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ddp", "single"))
    assert abs(a["miou"] - b["miou"]) < 0.02


@pytest.mark.slow
def test_no_process_leaves_a_checkpoint_before_it_is_written(tmp_path):
    """Only the main process writes last.pt; every other one must wait for the write before it
    goes on (or exits, at a stop: Slurm's ``--kill-on-bad-exit`` would then kill the writer mid-
    write). The main process's writes are slowed down; the other process, as soon as its
    ``checkpoint()`` returns, must find its step on disk."""
    _run([*TORCHRUN, "tests/engine/slow_save_worker.py", str(tmp_path), "teacher", *TINY_DATA, *TINY_MODEL, *TINY_RUN,
          "moco.mlp_dim=64", "moco.proj_dim=32", "train.ckpt_every=4", "train.threads=1", f"train.out_dir={tmp_path}",
          "train.name=wait"])
    rows = [json.loads(r) for r in (tmp_path / "seen1.json").read_text().splitlines()]
    assert len(rows) >= 2, rows
    assert all(r["on_disk"] == r["step"] for r in rows), rows
