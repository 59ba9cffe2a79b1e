"""The evaluation commands on the procedural dataset: outputs written, numbers sane, paths agree."""

import csv
import json

import pytest
import torch
from PIL import Image

from mimco.cli.main import main
from mimco.eval.finetune import build_classifier, layer_decay_groups
from mimco.models.formats import load_backbone
from mimco.runs import load_checkpoint

DATA = ["data.name=procedural", "data.img_size=16", "data.procedural_size=256", "train.progress=false"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_knn_and_results_table(tmp_path, capsys, teacher_ckpt):
    out = json.loads(run(capsys, "knn", teacher_ckpt, "--k", 5, 20, "--out", tmp_path / "r", *DATA))
    assert set(out) == {"knn5_top1", "knn20_top1"} and all(0 <= v <= 100 for v in out.values())
    run(capsys, "knn", "pixels", "--k", 5, "--out", tmp_path / "r", *DATA)
    row = json.loads((tmp_path / "r" / "results.jsonl").read_text().splitlines()[0])
    assert len(row["sha256"]) == 12 and row["format"].startswith("mimco teacher")
    assert row["config"]["data"]["img_size"] == 16
    table = run(capsys, "results", tmp_path)
    assert "| teacher/last.pt |" in table and "| raw pixels |" in table and "knn20_top1" in table
    assert (tmp_path / "r" / "results.csv").read_text().startswith("time,command,name")


def test_linprobe_fast_and_full_paths_agree(tmp_path, capsys, teacher_ckpt):
    common = ["--epochs", 10, "--batch-size", 64, "--out", tmp_path, *DATA]
    fast = json.loads(run(capsys, "linprobe", teacher_ckpt, *common))["linear_top1"]
    full = json.loads(run(capsys, "linprobe", teacher_ckpt, "--full", *common))["linear_top1"]
    assert abs(fast - full) <= 1.0
    lars = json.loads(run(capsys, "linprobe", teacher_ckpt, "--optimizer", "lars", "--lr", 1.0, *common))["linear_top1"]
    assert 0 <= lars <= 100
    aug = json.loads(run(capsys, "linprobe", teacher_ckpt, "--full", "--augment", *common))["linear_top1"]
    assert 0 <= aug <= 100


def test_layer_decay_scales(teacher_ckpt):
    backbone, _ = load_backbone(str(teacher_ckpt))
    model = build_classifier(backbone, num_classes=6)
    depth = len(model.blocks)
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        assert scale_of[id(p)] == pytest.approx(0.5 ** (depth + 1 - layer)), name
    assert model.fc_norm.weight.shape == (backbone.embed_dim,) and isinstance(model.norm, torch.nn.Identity)


def test_finetune_writes_outputs_and_resumes(tmp_path, capsys, teacher_ckpt):
    args = ["finetune", teacher_ckpt, *DATA, "data.num_workers=0", "optim.batch_size=32", "optim.epochs=2",
            "optim.warmup_epochs=0.5", "optim.base_lr=1e-3", f"train.out_dir={tmp_path}", "train.name=ft"]
    summary = json.loads(run(capsys, *args))
    assert summary["epochs"] == 2 and 0 <= summary["top1"] <= 100 and summary["top5"] >= summary["top1"]
    for name in ("last.pt", "best.safetensors", "log.csv", "summary.json", "results.jsonl", "config.yaml"):
        assert (tmp_path / "ft" / name).is_file(), name
    rows = (tmp_path / "ft" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,loss,top1,top5") and len(rows) == 3
    again = json.loads(run(capsys, "finetune", teacher_ckpt, "--resume", tmp_path / "ft" / "last.pt", "optim.epochs=3"))
    assert again["epochs"] == 3
    rows = list(csv.DictReader((tmp_path / "ft" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [8, 16, 20, 24]  # every epoch's end, and every train.log_every=20 steps
    assert rows[-1]["top1"] and float(rows[-1]["lr"]) > 0  # the 3rd epoch follows the new 3-epoch schedule


@pytest.mark.slow
def test_finetune_resume_after_one_epoch_equals_uninterrupted(tmp_path, capsys, teacher_ckpt):
    """Stopped after one epoch and resumed: the same weights and metrics as one uninterrupted run
    (RandAugment, mixup, random erasing and drop path on: the random state must resume too)."""
    args = ["finetune", teacher_ckpt, *DATA, "data.num_workers=0", "optim.batch_size=32", "optim.epochs=2",
            "optim.warmup_epochs=0.5", "optim.base_lr=1e-3", f"train.out_dir={tmp_path}",
            "classifier.drop_path_rate=0.1"]
    full = json.loads(run(capsys, *args, "train.name=full"))
    json.loads(run(capsys, *args, "train.name=cut", "train.max_steps=8"))
    again = json.loads(run(capsys, "finetune", teacher_ckpt, "--resume", tmp_path / "cut" / "last.pt"))
    assert again["step"] == full["step"] == 16 and again["top1"] == full["top1"] and again["loss"] == full["loss"]
    a, b = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("full", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_plots_are_real_pngs(tmp_path, capsys, teacher_ckpt):
    run(capsys, "plot", "tsne", "pixels", f"random:{teacher_ckpt}", teacher_ckpt, "--n", 120,
        "--out", tmp_path / "tsne.png", *DATA)
    run(capsys, "plot", "curves", teacher_ckpt.parent, "--out", tmp_path / "curves.png")
    run(capsys, "plot", "attention", teacher_ckpt, "--n", 4, "--out", tmp_path / "attn.png", *DATA)
    for name, min_w in (("tsne.png", 3 * 400), ("curves.png", 1500), ("attn.png", 4 * 150)):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.format == "PNG" and im.width >= min_w and im.height >= 300, name


def test_finetune_ranks_take_disjoint_shares(monkeypatch):
    """Each process trains on its own share: in an epoch, the ranks' samples are disjoint and
    together cover the epoch (N full copies would also equal one process, so check the indices)."""
    from mimco import distributed as dist
    from mimco.config import FinetuneConfig, load_config
    from mimco.data.stream import build_stream

    cfg = load_config(FinetuneConfig, None, [*DATA, "optim.batch_size=32", "data.num_workers=0"])
    shares = []
    for r in range(2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        stream = build_stream(cfg, torch.device("cpu"), "labelled")
        assert stream.local == 16 and stream.labels
        shares.append(stream._local_indices(epoch=0, first=0).flatten().tolist())
    assert not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == stream.steps_per_epoch * 32 == 256


def test_finetune_optimiser_applies_layer_decay(teacher_ckpt):
    """The fine-tuning method hands the engine timm's layer-decay groups from classifier.layer_decay:
    after warm-up, block i trains at peak * decay ** (depth - i) and the head at the peak."""
    from mimco.config import FinetuneConfig, load_config
    from mimco.engine.optim import build_optimizer, build_scheduler
    from mimco.eval.finetune import Finetune

    cfg = load_config(FinetuneConfig, None, [*DATA, "classifier.layer_decay=0.5", "optim.base_lr=1e-3",
                                             "optim.batch_size=256"])
    backbone, _ = load_backbone(str(teacher_ckpt))
    method = Finetune(build_classifier(backbone, 6), cfg, 6, None, None)
    opt = build_optimizer(method, cfg.optim)
    build_scheduler(opt, cfg.optim, total_steps=100, warmup_steps=10).step_update(10)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    depth = len(method.model.blocks)
    assert lr_of[id(method.model.head.weight)] == pytest.approx(1e-3)
    for i, blk in enumerate(method.model.blocks):
        assert lr_of[id(blk.attn.qkv.weight)] == pytest.approx(1e-3 * 0.5 ** (depth - i)), i
    assert lr_of[id(method.model.patch_embed.proj.weight)] == pytest.approx(1e-3 * 0.5 ** (depth + 1))


def test_few_label_probes_use_the_seeded_balanced_subsets(tmp_path, capsys, teacher_ckpt):
    """``--per-class`` against an independent computation on the subsets of ``balanced_subset``."""
    from mimco.config import PretrainConfig, load_config
    from mimco.data.build import load_dataset
    from mimco.data.subsets import balanced_subset, take
    from mimco.eval import extract_features
    from mimco.eval.knn import knn_accuracy
    from mimco.eval.linear import linear_probe

    few = ["--per-class", 4, "--label-seeds", 2, "--out", tmp_path, *DATA]
    knn = json.loads(run(capsys, "knn", teacher_ckpt, "--k", 3, *few))
    lin = json.loads(run(capsys, "linprobe", teacher_ckpt, "--epochs", 5, *few))
    cfg = load_config(PretrainConfig, None, DATA)
    train, test = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    model = load_backbone(str(teacher_ckpt))[0]
    dev = torch.device("cpu")
    fte, yte = extract_features(model, test, cfg.data, dev)
    knns, lins = [], []
    for seed in (0, 1):
        idx = balanced_subset(train.labels, per_class=4, seed=seed)
        assert len(idx) == 4 * len(train.labels.unique())
        ftr, ytr = extract_features(model, take(train, idx), cfg.data, dev)
        knns.append(knn_accuracy(ftr, ytr, fte, yte, 3, 0.07))
        lins.append(linear_probe(ftr, ytr, fte, yte, epochs=5, seed=seed))
    mean = torch.tensor(knns).mean().item()
    assert knn["knn3_top1"] == pytest.approx(mean, abs=0.006) and knn["knn3_top1_std"] == pytest.approx(
        torch.tensor(knns).std().item(), abs=0.006)
    assert lin["linear_top1"] == pytest.approx(torch.tensor(lins).mean().item(), abs=0.006)
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert row["config"]["per_class"] == 4 and row["config"]["label_seeds"] == [0, 1]
    full = json.loads(run(capsys, "linprobe", teacher_ckpt, "--epochs", 5, "--full", *few))  # same subsets, same order
    assert abs(full["linear_top1"] - lin["linear_top1"]) <= 1.0


def test_few_label_finetune_trains_on_the_same_subset(tmp_path, teacher_ckpt):
    from mimco.config import FinetuneConfig, load_config
    from mimco.data.build import load_dataset
    from mimco.data.stream import build_stream
    from mimco.data.subsets import balanced_subset

    cfg = load_config(FinetuneConfig, None, [*DATA, "data.num_workers=0", "optim.batch_size=16",
                                             "data.labels_per_class=4", "data.label_seed=1"])
    stream = build_stream(cfg, torch.device("cpu"), "labelled")
    full = load_dataset(cfg.data, train=True)
    idx = balanced_subset(full.labels, per_class=4, seed=1)
    assert torch.equal(stream.ds.array.images,
                       full.images[idx]) and torch.equal(stream.ds.array.labels, full.labels[idx])


@pytest.mark.parametrize("args,message", [
    (["knn", "pixels", "--per-class", 10000], "--per-class=10000 exceeds the smallest class"),
    (["linprobe", "pixels", "--per-class", -2], "--per-class=-2 must be at least 1"),
    (["finetune", "random:TEACHER", "data.labels_per_class=4", "optim.batch_size=64"],
     "optim.batch_size=64 exceeds the 24 labelled training images"),
    (["pretrain", "data.labels_per_class=4"], "choose labels for classification fine-tuning"),
])
def test_few_label_bad_input_is_one_line(args, message, capsys, tmp_path, teacher_ckpt):
    argv = [str(teacher_ckpt) if a == "TEACHER" else a.replace("TEACHER", str(teacher_ckpt)) if isinstance(a, str)
            else a for a in args]
    code = main([str(a) for a in [*argv, *DATA, f"train.out_dir={tmp_path}"]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_finetune_resume_equals_uninterrupted(tmp_path, capsys, teacher_ckpt):
    """Stopped after 3 steps and resumed, fine-tuning (mixup, RandAugment, drop path: every random
    stream) ends with the weights and best score of the run that was never stopped."""
    from safetensors.torch import load_file

    base = ["finetune", teacher_ckpt, *DATA, "data.num_workers=0", "optim.batch_size=32", "optim.epochs=2",
            "optim.warmup_epochs=0.5", "optim.base_lr=1e-3", "aug.mixup=0.8", "aug.cutmix=1.0",
            "classifier.drop_path_rate=0.1", f"train.out_dir={tmp_path}"]
    full = json.loads(run(capsys, *base, "train.name=full"))
    run(capsys, *base, "train.name=part", "train.max_steps=3")
    resumed = json.loads(run(capsys, "finetune", teacher_ckpt, "--resume", tmp_path / "part" / "last.pt"))
    assert resumed["step"] == full["step"] == 16 and resumed["best_top1"] == full["best_top1"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    best_a = load_file(str(tmp_path / "full" / "best.safetensors"))
    best_b = load_file(str(tmp_path / "part" / "best.safetensors"))
    assert all(torch.allclose(best_a[k], best_b[k], atol=1e-6) for k in best_a)


def test_finetune_at_another_resolution_and_the_wrong_channels(tmp_path, teacher_ckpt, capsys):
    """A 16-px backbone fine-tunes at 24 px (its position table resampled, as timm does); a channel
    count the backbone does not take is one line."""
    from mimco.cli.main import main

    args = ["finetune", str(teacher_ckpt), *DATA, "data.num_workers=0", "optim.batch_size=32", "train.max_steps=1",
            f"train.out_dir={tmp_path}"]
    assert main([*args, "data.img_size=24", "train.name=a"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["step"] == 1
    capsys.readouterr()
    assert main([*args, "data.channels=1", "train.name=b"]) == 2
    assert capsys.readouterr().err.strip() == ("mimco: error: the backbone takes 3-channel images but data.channels=1; "
                                               "set data.channels=3")


def test_probes_take_the_geometry_of_the_checkpoint_not_the_model_keys(tmp_path, teacher_ckpt, capsys):
    """A patch-4 backbone on 20-px images: 20 px fits its patches, not the default model keys' 16; the
    probes read the backbone's geometry from the checkpoint, at the data's side (position table
    resampled), and leave the model keys alone."""
    from mimco.cli.main import main

    over = ["data.name=procedural", "data.procedural_size=64", "data.img_size=20", "train.progress=false"]
    assert main(["knn", str(teacher_ckpt), *over, "--out", str(tmp_path)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["knn20_top1"] <= 100
    assert main(["eval", str(teacher_ckpt), *over, "--no-linear"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["knn_top1"] <= 100
