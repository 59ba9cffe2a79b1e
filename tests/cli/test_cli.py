"""The CLI end to end on the procedural dataset, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimco.cli.main import main
from tests.helpers import HANG, TINY_DATA, TINY_MODEL, TINY_RUN

TEACHER = [*TINY_DATA, *TINY_MODEL, *TINY_RUN, "moco.mlp_dim=64", "moco.proj_dim=32", "eval.at_end=true"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_teacher_then_pretrain(tmp_path, capsys):
    code, out, err = run_cli(capsys, "teacher", *TEACHER, f"train.out_dir={tmp_path}", "train.name=t")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 8 and np.isfinite(summary["loss"]) and 0 <= summary["knn_top1"] <= 100
    for name in ("last.pt", "config.yaml", "log.csv", "summary.json", "backbone.safetensors"):
        assert (tmp_path / "t" / name).is_file(), name

    code, out, _ = run_cli(capsys, "pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "loss.head_hidden_dim=64",
                           f"teacher.checkpoint={tmp_path / 't' / 'last.pt'}", f"train.out_dir={tmp_path}",
                           "train.name=s")
    assert code == 0
    summary = json.loads(out)
    assert np.isfinite(summary["loss_patch"]) and np.isfinite(summary["loss_img"])
    assert "mask:" in (tmp_path / "s" / "config.yaml").read_text()

    code, out, _ = run_cli(capsys, "eval", tmp_path / "s" / "last.pt", "--no-linear")
    assert code == 0 and "knn_top1" in json.loads(out)

    # the same run folder is not overwritten
    code, _, err = run_cli(capsys, "teacher", *TEACHER, f"train.out_dir={tmp_path}", "train.name=t")
    assert code == 2 and "already holds a run" in err and "--resume auto" in err


def test_both_stages_train_on_scenes(tmp_path, capsys):
    """data.name=fmnist_scenes as pre-training data: a teacher and its student train on the scenes
    (in memory, augmented on the device like Fashion-MNIST) and the teacher's k-NN at the end reads
    the scenes' labels."""
    scenes = ["data.name=fmnist_scenes", "data.img_size=28", "data.subset=64", "data.num_workers=0", *TINY_MODEL,
              *TINY_RUN, "train.max_steps=2", f"train.out_dir={tmp_path}"]
    code, out, err = run_cli(capsys, "teacher", *scenes, "moco.mlp_dim=64", "moco.proj_dim=32", "eval.at_end=true",
                             "train.name=t")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 2 and np.isfinite(summary["loss"]) and 0 <= summary["knn_top1"] <= 100
    code, out, err = run_cli(capsys, "pretrain", *scenes, "loss.head_hidden_dim=64",
                             f"teacher.checkpoint={tmp_path / 't' / 'last.pt'}", "train.name=s")
    assert code == 0, err
    assert json.loads(out)["step"] == 2


def test_resume_auto_continues(tmp_path, capsys):
    args = [*TEACHER, "eval.at_end=false", f"train.out_dir={tmp_path}", "train.name=r"]
    assert run_cli(capsys, "teacher", *args, "train.max_steps=4")[0] == 0
    code, out, _ = run_cli(capsys, "teacher", "--resume", "auto", *args)
    assert code == 0 and json.loads(out)["step"] == 8


@pytest.mark.parametrize("args, message", [
    (["teacher", "optim.bacth_size=3"], "unknown config key 'optim.bacth_size'; did you mean optim.batch_size"),
    (["teacher", "data.name=imagenet"], "unknown data.name 'imagenet'; choose imagefolder, folder, fashion_mnist"),
    (["pretrain", *TINY_DATA, "teacher.checkpoint=/no/such/last.pt"], "checkpoint not found: /no/such/last.pt"),
    (["pretrain", *TINY_DATA], "no teacher given"),
    (["teacher", "--resume", "auto"], "--resume auto needs the run's folder"),
    (["pretrain", *TINY_DATA, "method=mae"], "unknown method 'mae'; choose mimco or simmim"),
])
def test_user_errors_are_one_line(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, *args, f"train.out_dir={tmp_path}")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # a refused command leaves no run folder behind


def test_empty_and_corrupt_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "teacher", "data.name=folder", f"data.root={tmp_path / 'empty'}",
                           f"train.out_dir={tmp_path}")
    assert code == 2 and "no images" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(40):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 garbage")
    for i in range(8):
        Image.fromarray((np.random.rand(20, 20, 3) * 255).astype(np.uint8)).save(bad / f"ok{i}.png")
    code, _, err = run_cli(capsys, "teacher", *TEACHER, "data.name=folder", f"data.root={bad}", "data.num_workers=0",
                           "optim.batch_size=8", f"train.out_dir={tmp_path}", "train.name=b")
    assert code == 2 and "could not be read" in err and "data.max_bad_fraction" in err


@pytest.mark.slow
def test_subprocess_no_traceback_and_module_entry(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mimco", "teacher", "model.arch=vit_giant", "data.name=procedural",
                        f"train.out_dir={tmp_path}"], capture_output=True, text=True, timeout=HANG,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("mimco: error: unknown model.arch 'vit_giant'")
    assert "Traceback" not in r.stderr


def test_pretrain_on_a_released_moco_layout_with_projector_target(tmp_path, capsys):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from mimco.models import MoCoMLP

    sd = {}
    for name in ("base_encoder", "momentum_encoder"):
        enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=12, num_classes=0)
        sd.update({f"module.{name}.{k}": v for k, v in enc.state_dict().items()})
        sd.update({f"module.{name}.head.{k}": v for k, v in MoCoMLP(3, 48, 64, 24).state_dict().items()})
    torch.save({"epoch": 1, "arch": "vit_small", "state_dict": sd, "optimizer": {}, "scaler": {}},
               tmp_path / "moco.pth.tar")
    code, out, err = run_cli(capsys, "pretrain", *TINY_DATA, *TINY_MODEL, *TINY_RUN, "train.max_steps=2",
                             f"teacher.checkpoint={tmp_path / 'moco.pth.tar'}", "teacher.image_target=projector",
                             f"train.out_dir={tmp_path}", "train.name=s")
    assert code == 0, err  # 32 px teacher resampled to the 16 px student grid
    assert np.isfinite(json.loads(out)["loss_img"])
    code, _, err = run_cli(capsys, "pretrain", *TINY_DATA, *TINY_MODEL,
                           f"teacher.checkpoint={tmp_path / 'moco.pth.tar'}",
                           "teacher.num_heads=6", f"train.out_dir={tmp_path}", "train.name=s2")
    assert code == 2 and "trained with 12 heads" in err


def test_eval_an_external_timm_file(tmp_path, capsys):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=1, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    code, out, err = run_cli(capsys, "eval", tmp_path / "w.pth", "--no-linear", *TINY_DATA)
    assert code == 0, err
    assert 0 <= json.loads(out)["knn_top1"] <= 100


def test_every_subcommand_has_a_handler_and_unknown_ones_stop(capsys):
    from mimco.cli.main import build_parser, handlers

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(handlers())
    with pytest.raises(SystemExit) as e:
        main(["demoo"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
