"""Stage 2 with teachers of other families, geometries and target choices, end to end."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from mimco.cli.main import main
from mimco.config import PretrainConfig, load_config
from mimco.runs import load_checkpoint
from tests.helpers import TINY_RUN, clip_file, deit_hub_folder, dinov2_hub_file, eva02_file

STUDENT = ["data.name=procedural", "data.procedural_size=64", "data.num_workers=0", "model.embed_dim=32",
           "model.depth=1", "model.num_heads=2", "loss.head_hidden_dim=32", "train.max_steps=2", *TINY_RUN]


def test_a_patch14_teacher_at_its_resolution_teaches_a_patch16_student_at_another(tmp_path, capsys):
    dinov2_hub_file(tmp_path / "dinov2_vits14_reg4_pretrain.pth", regs=4)
    args = ["pretrain", *STUDENT, "data.img_size=32", "model.patch_size=16", "teacher.img_size=42",
            f"teacher.checkpoint={tmp_path / 'dinov2_vits14_reg4_pretrain.pth'}", f"train.out_dir={tmp_path}"]
    for name, extra in (("area", []), ("bilinear", ["teacher.resample=bilinear", "teacher.layers=[0,1]",
                                                   "teacher.target_norm=layernorm", "teacher.image_target=mean"])):
        assert main([*args, f"train.name={name}", *extra]) == 0
        err = capsys.readouterr().err
        assert "at 42 px, patch grid 3x3 -> student's 2x2" in err, err
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["step"] == 2 and summary["loss"] == summary["loss"]  # finite
    ckpt = load_checkpoint(tmp_path / "area" / "last.pt")
    assert ckpt["model"]["teacher.pos_embed"].shape == (1, 9,
                                                        64)  # the teacher at 42 px: 3x3 positions (registers apart)
    assert ckpt["model"]["patch_head.2.weight"].shape[0] == 64  # student width 32 -> the teacher's 64


def test_a_timm_named_teacher_and_the_maskdistill_baseline(tmp_path, capsys):
    torch.manual_seed(0)
    t = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32)
    torch.save(t.state_dict(), tmp_path / "deit.pth")
    args = ["pretrain", *STUDENT, "data.img_size=16", "model.patch_size=4", "data.channels=1",
            "teacher.model=deit_tiny_distilled_patch16_224", "teacher.img_size=64",
            f"teacher.checkpoint={tmp_path / 'deit.pth'}",
            "loss.patch_loss=smooth_l1", "teacher.target_norm=layernorm", "loss.image_weight=0",
            f"train.out_dir={tmp_path}", "train.name=md"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "as deit_tiny_distilled_patch16_224 at 64 px, patch grid 4x4, targets" in err, err  # grey data, RGB teacher
    assert json.loads((tmp_path / "md" / "summary.json").read_text())["step"] == 2


def test_the_teacher_normalisation_comes_from_the_file_the_override_or_the_data(tmp_path, teacher_ckpt):
    from mimco.config import PretrainConfig, load_config
    from mimco.methods.mimco import build_teacher
    from tests.helpers import clip_file

    clip_file(tmp_path / "clip.bin")
    base = ["data.img_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    clip_mean, clip_std = torch.tensor([0.48145466, 0.4578275,
                                        0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    for over, mean, std in (([], clip_mean, clip_std),
                            (["teacher.mean=[0.1,0.2,0.3]", "teacher.std=[0.5,0.6,0.7]"], torch.tensor([0.1, 0.2, 0.3]),
                             torch.tensor([0.5, 0.6, 0.7]))):
        cfg = load_config(PretrainConfig, None, [*base, f"teacher.checkpoint={tmp_path / 'clip.bin'}", *over])
        _, view = build_teacher(cfg, (2, 2))
        # x_teacher = (x * 0.25 + 0.5 - mean) / std
        assert torch.allclose(view.scale.flatten(),
                              0.25 / std) and torch.allclose(view.shift.flatten(), (0.5 - mean) / std)
    cfg = load_config(PretrainConfig, None, ["data.img_size=16", f"teacher.checkpoint={teacher_ckpt}"])
    _, view = build_teacher(cfg, (4, 4))
    assert not view.renormalise  # a mimco teacher was trained on the data's own statistics


def test_a_run_with_a_foreign_teacher_resumes(tmp_path, capsys):
    dinov2_hub_file(tmp_path / "dinov2.pth", regs=4)
    args = ["pretrain", *STUDENT, "data.img_size=32", "model.patch_size=16", "teacher.img_size=42",
            f"teacher.checkpoint={tmp_path / 'dinov2.pth'}", "teacher.layers=[-1]", f"train.out_dir={tmp_path}",
            "train.name=r", "train.max_steps=1"]
    assert main(args) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "r" / "last.pt"), "train.max_steps=2"]) == 0
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    # the teacher is part of the run: another teacher size cannot be swapped in on resume
    assert main(["pretrain", "--resume", str(tmp_path / "r" / "last.pt"), "teacher.img_size=56"]) == 2
    assert "teacher.img_size cannot change on resume" in capsys.readouterr().err


def test_clip_teacher_with_its_image_projection_as_target(tmp_path, capsys):
    from tests.helpers import clip_file

    clip_file(tmp_path / "open_clip_pytorch_model.bin")
    args = ["pretrain", *STUDENT, "data.img_size=16", "model.patch_size=4", "teacher.img_size=64",
            f"teacher.checkpoint={tmp_path / 'open_clip_pytorch_model.bin'}", "teacher.image_target=projector",
            f"train.out_dir={tmp_path}", "train.name=clip"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "OpenCLIP / OpenAI CLIP visual tower at 64 px, patch grid 4x4, targets: final output, image projector" in err
    model = load_checkpoint(tmp_path / "clip" / "last.pt")["model"]
    # the image head predicts the projection, the patch head the teacher's width
    assert model["image_head.2.weight"].shape[0] == 32 and model["patch_head.2.weight"].shape[0] == 64


def test_a_teacher_from_an_unfinished_run_is_named_with_its_step(tmp_path, capsys):
    from mimco.config import PretrainConfig, load_config
    from mimco.methods.mimco import build_teacher
    from mimco.pipeline import run_stage
    from tests.helpers import tiny_teacher_cfg

    run_stage("teacher", tiny_teacher_cfg(tmp_path, "cut", ("train.max_steps=2",)))
    ckpt = tmp_path / "cut" / "last.pt"
    capsys.readouterr()
    build_teacher(load_config(PretrainConfig, None, ["data.img_size=16", f"teacher.checkpoint={ckpt}"]), (4, 4))
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warning == [f"mimco: warning: the teacher {ckpt} is from an unfinished run (step 2 of 8); finish it with "
                       f"`mimco teacher --resume {ckpt}` first"]


CLIP_STATS = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])  # OpenAI CLIP's
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


#: family -> (writes its file, the file's name, its own image side, the statistics it was trained with)
FAMILIES = {
    "OpenCLIP": (lambda p: clip_file(p), "open_clip_pytorch_model.bin", 32, CLIP_STATS),
    "DINOv2 hub": (lambda p: dinov2_hub_file(p, regs=4), "dinov2_vits14_reg4_pretrain.pth", 42, IMAGENET_STATS),
    "EVA-02": (lambda p: eva02_file(p), "eva02_B_pt_in21k_p14.pt", 28, CLIP_STATS),
    "timm hub folder": (lambda p: deit_hub_folder(p, depth=1), "deit_tiny", 32, ([0.4] * 3, [0.3] * 3)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_what_a_teacher_file_brings_reaches_the_teachers_input(family, tmp_path):
    """Each family's own statistics, at its own resolution, reach the input of its patch embedding in a
    MimCo step (built as the stage builds it), and its patch grid is resampled onto the student's;
    the reference is computed here from the raw image and the published statistics."""
    from mimco.methods import get_method

    write, name, size, (mean, std) = FAMILIES[family]
    write(tmp_path / name)
    data_mean, data_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    cfg = load_config(PretrainConfig, None, ["data.img_size=32", "model.patch_size=16", "model.embed_dim=32",
                                             "model.depth=1", "model.num_heads=2", "loss.head_hidden_dim=16",
                                             f"data.mean={data_mean}", f"data.std={data_std}",
                                             f"teacher.checkpoint={tmp_path / name}", f"teacher.img_size={size}"])
    method = get_method("mimco", "pretrain").build(cfg, torch.device("cpu"))
    seen = []
    method.teacher.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 32, 32)  # an image in [0, 1]
    x = (raw - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    patch, _ = method.teacher_targets(x)
    resized = F.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    want = (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert seen[0].shape == (2, 3, size, size) and torch.allclose(seen[0], want, atol=1e-4)
    assert patch.shape[:2] == (2, 4)  # the teacher's own grid (3x3 for DINOv2) on the student's 2x2
