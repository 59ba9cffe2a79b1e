"""The k-NN monitor: fixed class-balanced subsets, scored when due, equal to `mimco knn --monitor`."""

import csv
import json

import pytest
import torch

from mimco.cli.main import main
from mimco.config import EvalConfig
from mimco.data.build import ImageArray
from mimco.data.subsets import labels_of
from mimco.errors import MimcoError
from mimco.eval.monitor import KnnMonitor, monitor_splits
from tests.helpers import tiny_overrides


def _split(n, classes=4):
    return ImageArray(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.arange(n) % classes, 1)


def test_subsets_are_balanced_seeded_and_fixed():
    ev = EvalConfig(monitor_train=40, monitor_test=8, monitor_seed=3)
    bank, queries = monitor_splits(_split(400), _split(100), ev)
    assert torch.bincount(labels_of(bank)).tolist() == [10] * 4
    assert torch.bincount(labels_of(queries)).tolist() == [2] * 4
    again = monitor_splits(_split(400), _split(100), ev)[0]
    assert torch.equal(bank.images, again.images) and torch.equal(bank.labels, again.labels)
    picked = lambda ev: monitor_splits(_split(400), _split(100), ev)  # noqa: E731
    images = torch.arange(400, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # each image its index
    train = ImageArray(images.clone(), torch.arange(400) % 4, 1)
    first = monitor_splits(train, _split(100), ev)[0].images[:, 0, 0, 0].tolist()
    other = monitor_splits(train, _split(100), EvalConfig(monitor_train=40, monitor_test=8, monitor_seed=4))[0]
    assert first != other.images[:, 0, 0, 0].tolist()  # another seed, other images
    assert picked(ev)[0].labels.tolist() == bank.labels.tolist()


@pytest.mark.parametrize("train, test, match", [
    (3, 8, "eval.monitor_train=3 is fewer than one image for each of the 4 classes"),
    (40, 2, "eval.monitor_test=2 is fewer than one image for each of the 4 classes"),
])
def test_fewer_than_one_image_per_class_is_a_one_line_error(train, test, match):
    with pytest.raises(MimcoError, match=match):
        monitor_splits(_split(400), _split(100), EvalConfig(monitor_train=train, monitor_test=test))


def test_sizes_beyond_the_split_are_capped_in_one_line(capsys):
    """The defaults (50,000 and 10,000) are sizes "up to": on a smaller split the monitor takes all
    it can, class-balanced (an uneven split: as many of each class as the smallest has)."""
    bank, queries = monitor_splits(_split(400), _split(100), EvalConfig())
    assert torch.bincount(labels_of(bank)).tolist() == [100] * 4
    assert torch.bincount(labels_of(queries)).tolist() == [25] * 4
    err = capsys.readouterr().err.splitlines()
    assert err == ["mimco: eval.monitor_train=50000 is more than the training split's 400 images give class-balanced; "
                   "the monitor uses 400 (100 of each of 4 classes)",
                   "mimco: eval.monitor_test=10000 is more than the test split's 100 images give class-balanced; "
                   "the monitor uses 100 (25 of each of 4 classes)"]
    uneven = ImageArray(torch.zeros(30, 1, 8, 8, dtype=torch.uint8), torch.tensor([0] * 20 + [1] * 10), 1)
    bank = monitor_splits(uneven, _split(100), EvalConfig(monitor_train=24, monitor_test=8))[0]
    assert torch.bincount(labels_of(bank)).tolist() == [10, 10]
    assert "eval.monitor_train=24 is more than the training split's 30 images" in capsys.readouterr().err
    monitor_splits(_split(400), _split(100), EvalConfig(monitor_train=400, monitor_test=100))
    assert capsys.readouterr().err == ""  # a size the split holds: nothing to say


def test_the_cap_is_said_on_the_main_process_only(monkeypatch, capsys):
    monkeypatch.setattr("mimco.distributed.is_main", lambda: False)
    bank = monitor_splits(_split(400), _split(100), EvalConfig())[0]
    assert len(bank) == 400 and capsys.readouterr().err == ""


@pytest.mark.parametrize("main, sharded, drawn", [(True, False, 1), (False, False, 0), (False, True, 1)])
def test_the_pictures_are_drawn_on_the_main_process_only_except_under_fsdp(monkeypatch, main, sharded, drawn):
    """Under DDP the other processes skip the pictures' forward passes; under FSDP those are
    collectives, so every process runs them (the main process alone keeps them)."""
    import timm

    import mimco.eval.monitor as mon
    from mimco.config import DataConfig

    calls = []
    monkeypatch.setattr(mon, "monitor_images", lambda *a, **k: calls.append(1) or {"inputs": torch.zeros(3, 1, 1)})
    monkeypatch.setattr("mimco.distributed.is_main", lambda: main)
    if sharded:  # every module an FSDP2 unit
        monkeypatch.setattr(mon, "FSDPModule", torch.nn.Module)
    m = KnnMonitor.__new__(KnnMonitor)
    m.ev, m.mask = EvalConfig(monitor_train=8, monitor_test=4, knn_k=2), None
    m.data = DataConfig(img_size=8, channels=1, mean=[0.5], std=[0.5])
    m.bank, m.queries = monitor_splits(_split(40), _split(20), m.ev)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, patch_size=4,
                            embed_dim=32, depth=1, num_heads=2, in_chans=1)
    values, images = m(vit, torch.device("cpu"), "fp32")
    assert len(calls) == drawn and bool(images) == main and ("knn_monitor" in values) == main


def test_due_at_epochs_and_steps():
    class Cfg:
        data, eval = None, EvalConfig(every_epochs=2, every_steps=3)

    m = KnnMonitor.__new__(KnnMonitor)
    m.ev = Cfg.eval
    due = [s for s in range(1, 25) if m.due(s, 8)]
    assert due == [3, 6, 9, 12, 15, 16, 18, 21, 24]
    m.ev = EvalConfig(every_epochs=1)
    assert [s for s in range(1, 21) if m.due(s, 8)] == [8, 16]  # a schedule's fractional end (2.5 epochs) is none


@pytest.mark.slow
def test_the_last_monitor_value_is_mimco_knn_on_the_same_subsets(monitored_run, capsys):
    """The value log.csv holds for the last epoch is what a separate `mimco knn --monitor` of the
    checkpoint computes: the same weights, subsets, k and temperature."""
    with open(monitored_run / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["knn_monitor"]]
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    assert json.loads((monitored_run / "summary.json").read_text())["knn_monitor"] == float(rows[-1]["knn_monitor"])
    capsys.readouterr()
    assert main(["knn", str(monitored_run / "last.pt"), "--monitor", "--k", "20", "--out",
                 str(monitored_run.parent / "knn")]) == 0
    assert json.loads(capsys.readouterr().out)["knn20_top1"] == float(rows[-1]["knn_monitor"])


@pytest.mark.slow
def test_the_monitor_prints_its_cost_once(tmp_path, capsys):
    from mimco.pipeline import run_stage
    from tests.helpers import tiny_teacher_cfg

    run_stage("teacher", tiny_teacher_cfg(tmp_path, "t", ("optim.epochs=2", "eval.every_epochs=1",
                                                          "eval.monitor_train=64", "eval.monitor_test=32")))
    err = capsys.readouterr().err
    # the procedural set's 6 classes: 10 and 5 of each
    assert err.count("mimco: k-NN monitor on 90 images (60 bank, 30 queries, of 6 classes) took") == 1
    assert "% of an epoch" in err


def test_a_monitor_below_one_image_per_class_stops_before_anything_is_written(tmp_path, capsys):
    code = main(["teacher", *tiny_overrides(tmp_path, "small"), "moco.mlp_dim=64", "moco.proj_dim=32",
                 "eval.every_epochs=1", "eval.monitor_train=1"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.monitor_train=1 is fewer than one image for each of the" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "small").exists()


def test_cls_attention_is_the_last_blocks_attention_from_cls():
    """Checked against the attention probabilities timm's own (unfused) path computes."""
    import timm

    from mimco.eval.plots import cls_attention

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    probs = {}
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, i, _o: probs.__setitem__("p", i[0]))
    vit.forward_features(x)
    handle.remove()
    want = probs["p"][:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    assert torch.allclose(cls_attention(vit, x), want, atol=1e-6)


def test_monitor_pictures_show_the_input_its_masked_copy_and_the_features():
    import timm

    from mimco.config import DataConfig, MaskConfig
    from mimco.eval.monitor import monitor_images

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2, in_chans=1).train()
    data = DataConfig(img_size=16, channels=1, mean=[0.5], std=[0.5])
    x = torch.ones(3, 1, 16, 16)  # white after denormalisation
    pics = monitor_images(vit, x, data, MaskConfig(ratio=0.5))
    assert vit.training  # put back as it was
    inputs, feats = pics["inputs"], pics["features"]
    assert inputs.shape == feats.shape == (3, 2 * 17 + 1, 3 * 17 + 1)  # 2 rows (image, masked), 3 images, padding 1
    assert (inputs[:, 1:17, 1:17] == 1).all()
    masked = inputs[0, 18:34, 1:17]  # the first image's masked copy: half of its 16 patches grey
    assert ((masked == 0.5).float().mean() == 0.5) and ((masked == 1).float().mean() == 0.5)
    assert feats.min() >= 0 and feats.max() <= 1


def test_monitor_pictures_of_a_compiled_backbone_reuse_its_graphs():
    """``train.compile`` compiles each block in place; the attention picture reads the last block's
    q/k projection through a hook, which the block's graph (traced for the extraction just before)
    would skip. The pictures equal the eager backbone's, and a second monitor point (training step,
    extraction, pictures) compiles nothing new."""
    import copy

    import timm
    from torch._dynamo.utils import counters

    from mimco.config import DataConfig
    from mimco.eval.monitor import monitor_images

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2, in_chans=1)
    plain = copy.deepcopy(vit)
    torch._dynamo.reset()
    for m in (vit.patch_embed, *vit.blocks):  # as train.compile does (engine/compiling.py), on dynamo's eager backend
        m.compile(backend="eager")
    data = DataConfig(img_size=16, channels=1, mean=[0.5], std=[0.5])
    x = torch.randn(3, 1, 16, 16)

    def point():
        vit.train()
        vit.forward_features(torch.randn(4, 1, 16, 16)).sum().backward()  # a training step
        with torch.no_grad():
            vit.eval()
            vit.forward_features(torch.randn(5, 1, 16, 16))  # the monitor's extraction
        return monitor_images(vit, x, data)

    first = point()
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs > 0  # the blocks did run compiled
    second = point()
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (graphs, frames)  # no recompile
    want = monitor_images(plain, x, data)
    for pics in (first, second):
        assert torch.allclose(pics["features"], want["features"], atol=1e-5)


def test_the_monitor_searches_its_bank_on_the_run_device(monkeypatch):
    """Features are gathered to host memory; the k-NN search (a matrix product of the queries with
    the whole bank) must go back to the run's device, not run on the host's CPU every time."""
    import contextlib

    import mimco.eval.monitor as mon

    seen = []
    host = (torch.randn(8, 4), torch.arange(8) % 2)
    monkeypatch.setattr(mon, "extract_features_distributed", lambda *a, **k: host)
    monkeypatch.setattr(mon, "monitor_images", lambda *a, **k: {})
    monkeypatch.setattr(mon, "eval_batches", lambda *a, **k: iter([(torch.zeros(1),)]))
    monkeypatch.setattr(mon, "autocast", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(mon, "knn_accuracy", lambda bank, *a: seen.append(bank.device.type) or 50.0)
    m = KnnMonitor.__new__(KnnMonitor)
    m.ev, m.mask, m.data, m.bank, m.queries = EvalConfig(knn_k=2), None, None, None, None
    assert m(torch.nn.Identity(), torch.device("meta"), "fp32")[0] == {"knn_monitor": 50.0}
    assert seen == ["meta"]
