"""Bad input: each case ends in a one-line message (exit 2) or a documented automatic handling."""

import re

import numpy as np
import pytest
import torch

from mimco.cli.main import main
from tests.helpers import TINY_MODEL, TINY_RUN, messy_folder

COMMON = [*TINY_MODEL, *TINY_RUN, "data.img_size=16", "data.num_workers=0"]
TEACHER = [*COMMON, "moco.mlp_dim=64", "moco.proj_dim=32"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


def test_messy_folder_trains(tmp_path, capsys):
    messy_folder(tmp_path / "imgs")
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=folder", f"data.root={tmp_path / 'imgs'}",
                        "optim.batch_size=8", "data.max_bad_fraction=0.2", f"train.out_dir={tmp_path}", "train.name=m")
    assert code == 0, err
    # 27 files, 8 per step, 3 steps: each unreadable one met is replaced and counted, reported once at the end
    line = [ln for ln in err.splitlines() if "unreadable" in ln]
    assert len(line) == 1 and re.fullmatch(r"mimco: skipped [12] unreadable files of 27 \(.*\.jpg(, .*\.jpg)?\), each "
                                           r"replaced by the next readable file", line[0]), err
    assert (tmp_path / "m" / "last.pt").is_file()


def test_modes_load_as_rgb(tmp_path):
    from mimco.data.files import FileImages

    messy_folder(tmp_path / "imgs")
    ds = FileImages(str(tmp_path / "imgs"), labelled=False)
    names = [p.name for p, _ in ds.items]
    assert "notes.txt" not in names and len(ds) == 27
    for name in ("grey.png", "rgba.png", "palette.png", "deep16.png", "tiny.png"):
        img = ds.load(names.index(name))
        assert img.mode == "RGB", name
    deep = np.asarray(ds.load(names.index("deep16.png")))
    assert deep.max() > 128  # 16-bit values scaled into 8 bits, not clipped to white
    assert ds.load(names.index("empty.jpg")) is None and ds.load(names.index("text.jpg")) is None


def test_batch_larger_than_dataset(tmp_path, capsys):
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=procedural", "data.procedural_size=16",
                        f"train.out_dir={tmp_path}")
    assert code == 2 and "optim.batch_size=32 is larger than the dataset (16 images)" in err


def test_teacher_geometry_that_cannot_be_used(tmp_path, capsys, teacher_ckpt):
    # the teacher's 4x4 grid is coarser than a patch-2 student's 8x8: area averaging cannot fill it
    code, err = run_cli(capsys, "pretrain", *COMMON, "data.name=procedural", "model.patch_size=2",
                        f"teacher.checkpoint={teacher_ckpt}", f"train.out_dir={tmp_path}")
    assert code == 2 and "patch grid 4x4 is coarser than the student's 8x8" in err
    assert "teacher.resample=bilinear" in err
    assert not any(tmp_path.iterdir())  # refused before the run folder is made
    for over, words in ((["teacher.layers=[7]"], "teacher.layers [7] out of range: the teacher has 2 blocks"),
                        (["teacher.target_norm=batchnorm"], "unknown teacher.target_norm 'batchnorm'"),
                        (["teacher.resample=nearest"], "unknown teacher.resample 'nearest'"),
                        (["teacher.mean=[0.5,0.5,0.5]"], "set teacher.mean and teacher.std together"),
                        (["teacher.mean=[0.5]", "teacher.std=[0.5]"], "teacher.mean / teacher.std need 3 values"),
                        (["teacher.model=vit_tiny_patch4_16"],
                         "teacher.model=vit_tiny_patch4_16 is not a timm model name"),
                        (["teacher.model=vit_tiny_patch16_224"],
                         "the file has patch size 4 but teacher.model=vit_tiny_patch16_224 has 16"),
                        (["loss.head_hidden_dim=0"],
                         "loss.head_hidden_dim=0 is out of range: it is the reconstruction heads' hidden width")):
        code, err = run_cli(capsys, "pretrain", *COMMON, "data.name=procedural", f"teacher.checkpoint={teacher_ckpt}",
                            f"train.out_dir={tmp_path}", *over)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (over, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda(tmp_path, capsys):
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=procedural", "train.device=cuda",
                        f"train.out_dir={tmp_path}")
    assert code == 2 and "no CUDA device" in err
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=procedural", "train.precision=fp16",
                        f"train.out_dir={tmp_path}")
    assert code == 2 and "fp16 needs a CUDA device" in err


@pytest.mark.parametrize("override, message", [
    ("optim.batch_size=0", "optim.batch_size=0 is out of range"),
    ("optim.batch_size=-4", "optim.batch_size=-4 is out of range"),
    ("optim.epochs=-1", "optim.epochs=-1.0 is out of range"),
    ("optim.epochs=0", "optim.epochs=0.0 is out of range"),
    ("train.log_every=0", "train.log_every=0 is out of range"),
    ("moco.temperature=0", "moco.temperature=0.0 is out of range"),
    ("train.compile_mode=fastest", "unknown train.compile_mode 'fastest'; choose default, reduce-overhead"),
    ("train.compile=true train.strategy=fsdp train.compile_mode=reduce-overhead",
     "train.compile_mode=reduce-overhead records CUDA graphs"),
    ("train.compile=true train.strategy=fsdp train.compile_mode=max-autotune", "use train.compile_mode=default or"),
])
def test_out_of_range_values(tmp_path, capsys, override, message):
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=procedural", *override.split(),
                        f"train.out_dir={tmp_path}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "last.pt").exists() and not list(tmp_path.iterdir())  # no run folder either


def test_out_of_range_in_stage_two_and_finetune(tmp_path, capsys, teacher_ckpt):
    code, err = run_cli(capsys, "pretrain", *COMMON, "data.name=procedural", f"teacher.checkpoint={teacher_ckpt}",
                        "loss.patch_weight=0", "loss.image_weight=0", f"train.out_dir={tmp_path}")
    assert code == 2 and "nothing to learn" in err
    code, err = run_cli(capsys, "pretrain", *COMMON, "data.name=procedural", f"teacher.checkpoint={teacher_ckpt}",
                        "mask.ratio=1.5", f"train.out_dir={tmp_path}")
    assert code == 2 and "mask.ratio=1.5" in err
    code, err = run_cli(capsys, "finetune", teacher_ckpt, "data.name=procedural", "data.img_size=16",
                        "optim.batch_size=0", f"train.out_dir={tmp_path}")
    assert code == 2 and "optim.batch_size=0 is out of range" in err


@pytest.mark.parametrize("command", ["teacher-resume", "pretrain-teacher", "eval", "inspect", "finetune"])
def test_a_text_file_as_checkpoint(tmp_path, capsys, command):
    text = tmp_path / "text.pt"
    text.write_text("epoch 1: loss 0.5\n")
    args = {"teacher-resume": ["teacher", "--resume", text],
            "pretrain-teacher": ["pretrain", *COMMON, "data.name=procedural", f"teacher.checkpoint={text}"],
            "eval": ["eval", text], "inspect": ["inspect", text],
            "finetune": ["finetune", text, "data.name=procedural"]}
    code, err = run_cli(capsys, *args[command])
    assert code == 2 and f"cannot read checkpoint {text}: it is not a PyTorch checkpoint" in err, err
    # no pickle detail ("invalid load key, 'e'" / byte 101) in the message; the path may hold any digits
    assert len(err.strip().splitlines()) == 1 and "101" not in err.replace(str(text), "") and "load key" not in err


def test_a_second_process_cannot_train_in_a_run_folder_in_use(tmp_path, capsys):
    """While a process holds a run folder's lock (trains there), a second `mimco teacher` on the same
    folder stops with one line naming the holder, and writes nothing there; once the lock is
    dropped (the first process ended) the same command trains."""
    from mimco.runs import LOCK, RunLock

    run = tmp_path / "t"
    args = ["teacher", *TEACHER, "data.name=procedural", "data.procedural_size=64", f"train.out_dir={tmp_path}",
            "train.name=t"]
    run.mkdir()
    (run / "config.yaml").write_text("kept: true\n")
    holder = RunLock(run)
    assert holder.acquire() is None and "pid" in (run / LOCK).read_text()
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is training in {run}" in err and "pid" in err and "choose another train.name" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "config.yaml"]
    assert (run / "config.yaml").read_text() == "kept: true\n"
    holder.release()
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert (run / "last.pt").is_file() and RunLock(run).acquire() is None  # released at the end


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, err = run_cli(capsys, "teacher", *TEACHER, "data.name=procedural", "data.procedural_size=64",
                        f"train.out_dir={tmp_path / 'file'}", "train.name=t")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write the run folder" in err and "writable train.out_dir" in err
