"""``mimco segprobe | segfinetune | plot pca`` end to end, and their bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mimco.cli.main import main
from tests.helpers import seg_folder

pytestmark = pytest.mark.slow

SCENES = ["seg.scenes=48", "seg.val_scenes=16", "data.img_size=28", "data.num_workers=0"]
FAST = ["--epochs", "2", "--batch-size", "16"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _row(folder):
    return json.loads((folder / "results.jsonl").read_text().splitlines()[-1])


def test_segprobe_on_fmnist_scenes_at_another_resolution(tmp_path, capsys, teacher_ckpt):
    """A 16-px checkpoint probed on 28-px scenes (its position table resampled to 7 x 7), the last
    two blocks concatenated, two seeds."""
    code, out, err = run_cli(capsys, "segprobe", teacher_ckpt, "--out", tmp_path, "--layers", "2", "--seeds", "2",
                             *FAST, *SCENES)
    assert code == 0, err
    metrics = json.loads(out)
    assert 0 < metrics["miou"] <= 100 and "miou_std" in metrics and 0 < metrics["pixel_acc"] <= 100
    assert metrics["position_chance"] == round(100 / 49, 2) and 0 <= metrics["position_acc"] <= 100  # 7 x 7 tokens
    assert metrics["position_share"] <= 100 and "position_acc_std" not in metrics  # one figure, not per seed
    row = _row(tmp_path)
    assert row["command"] == "segprobe" and row["data"] == "fmnist_scenes" and row["config"]["layers"] == 2
    assert row["config"]["path"] == "cached" and row["config"]["data"]["img_size"] == 28
    assert (tmp_path / "segprobe.png").stat().st_size > 10_000


def test_segprobe_on_a_plain_folder_of_pngs_and_on_raw_pixels(tmp_path, capsys, teacher_ckpt):
    root = seg_folder(tmp_path / "seg")
    data = ["data.name=segfolder", f"data.root={root}", "seg.num_classes=3", "data.img_size=20", "data.num_workers=0"]
    code, _, err = run_cli(capsys, "segprobe", teacher_ckpt, "--out", tmp_path / "vit", *FAST, *data)
    assert code == 0, err
    assert "plain layout, 16 training pairs, 3 classes" in err
    code, out, err = run_cli(capsys, "segprobe", "pixels", "--patch", "4", "--out", tmp_path / "px", "--epochs", "15",
                             "--batch-size", "8", "--lr", "1e-2", *data)
    assert code == 0, err
    assert json.loads(out)["miou"] > 60  # colour says the class: raw pixels separate it
    code, _, err = run_cli(capsys, "segprobe", teacher_ckpt, "--out", tmp_path / "aug", "--augment", "--epochs", "1",
                           "--batch-size", "8", *data)
    assert code == 0, err
    assert _row(tmp_path / "aug")["config"]["path"] == "streamed"
    assert "position_acc" not in _row(tmp_path / "aug")["metrics"]  # measured on the cached grids only


def test_segfinetune_trains_resumes_and_exports(tmp_path, capsys, teacher_ckpt):
    root = seg_folder(tmp_path / "seg")
    args = ["segfinetune", teacher_ckpt, "data.name=segfolder", f"data.root={root}", "seg.num_classes=3",
            "data.img_size=20", "data.num_workers=0", "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0.5",
            "head.layers=2", "train.progress=false", "train.log_every=1", f"train.out_dir={tmp_path}",
            "train.name=seg"]
    code, _, err = run_cli(capsys, *args, "train.max_steps=2")
    assert code == 0, err
    code, out, err = run_cli(capsys, "segfinetune", teacher_ckpt, "--resume", tmp_path / "seg" / "last.pt")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == summary["total_steps"] == 4 and 0 <= summary["miou"] <= 100
    assert "[segfinetune] epoch 2: mIoU" in err
    assert _row(tmp_path / "seg")["metrics"]["miou"] == summary["miou"]
    code, _, err = run_cli(capsys, "segprobe", tmp_path / "seg" / "last.pt")  # a fine-tuned model, as finetune's
    assert code == 2 and "a mimco 'segfinetune' checkpoint (a fine-tuned model)" in err


def test_plot_pca_on_scenes_and_on_the_checkpoints_own_data(tmp_path, capsys, teacher_ckpt):
    code, out, err = run_cli(capsys, "plot", "pca", teacher_ckpt, f"random:{teacher_ckpt}", "--out",
                             tmp_path / "pca.png", "--n", "4", "data.name=fmnist_scenes", "data.img_size=32")
    assert code == 0, err
    assert (tmp_path / "pca.png").stat().st_size > 5_000
    code, _, err = run_cli(capsys, "plot", "pca", teacher_ckpt, "--out", tmp_path / "own.png", "--n", "3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "plot", "pca", "pixels", "--out", tmp_path / "px.png")
    assert code == 2 and "raw pixels have no patch tokens" in err


def _one_line_error(code, err, *parts):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mimco: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in lines[0], lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, teacher_ckpt):
    out = tmp_path / "out"
    (tmp_path / "photos").mkdir()
    code, _, err = run_cli(capsys, "segprobe", teacher_ckpt, "--out", out, "data.name=segfolder",
                           f"data.root={tmp_path}")
    _one_line_error(code, err, "matches no segmentation layout", "ADE20K", "Pascal VOC", "plain", "found: photos/")
    code, _, err = run_cli(capsys, "segprobe", teacher_ckpt, "--out", out, "--layers", "5", *SCENES)
    _one_line_error(code, err, "--layers 5 is out of range", "has 2 blocks")
    import timm

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    code, _, err = run_cli(capsys, "segprobe", tmp_path / "resnet.pth", "--out", out, *SCENES)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "segprobe", "pixels", "--out", out, *SCENES)
    _one_line_error(code, err, "raw pixels need --patch P")
    code, _, err = run_cli(capsys, "segprobe", "pixels", "--patch", "5", "--out", out, *SCENES)
    _one_line_error(code, err, "data.img_size=28 is not a multiple of the patch size 5")
    code, _, err = run_cli(capsys, "teacher", "data.name=segfolder", f"train.out_dir={out}")
    _one_line_error(code, err, "data.name=segfolder is segmentation data", "mimco segprobe")
    assert not out.exists()


def test_a_label_above_the_classes_names_its_file_from_a_loader_worker(tmp_path, capsys, teacher_ckpt):
    root = seg_folder(tmp_path / "seg", classes=3)
    code, _, err = run_cli(capsys, "segfinetune", teacher_ckpt, "data.name=segfolder", f"data.root={root}",
                           "seg.num_classes=2", "data.img_size=20", "data.num_workers=2", "optim.batch_size=8",
                           "train.progress=false", f"train.out_dir={tmp_path / 'out'}", "train.name=x")
    _one_line_error(code, err, "masks/0", "holds label 2, outside the 2 classes 0..1", "seg.num_classes")
