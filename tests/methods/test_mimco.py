import pytest
import torch

from mimco.config import ModelConfig, PretrainConfig, load_config
from mimco.errors import MimcoError
from mimco.masking import MaskGenerator, gather_tokens, masked_indices
from mimco.methods.mimco import MimCo, MimcoLossConfig
from mimco.models import MaskedViT, create_vit
from tests.helpers import tiny_mimco


def test_gradients_reach_student_never_teacher():
    m = tiny_mimco()
    loss, logs = m([torch.randn(4, 3, 16, 16)], step=0)
    loss.backward()
    assert set(logs) == {"loss_patch", "loss_img"}
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert m.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.student.mask_token.grad.abs().sum() > 0
    assert m.patch_head[0].weight.grad is not None and m.image_head[0].weight.grad is not None


def test_teacher_stays_in_eval_mode():
    m = tiny_mimco()
    m.train()
    assert m.student.training and not m.teacher.training


def test_patch_loss_ignores_unmasked_positions():
    m = tiny_mimco(image_weight=0.0)
    x = torch.randn(2, 3, 16, 16)
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["tokens"] = out

    m.student.register_forward_hook(keep)
    loss, _ = m([x], step=3)
    loss.backward()
    mask = m.mask_generator(2, 3)
    grad = captured["tokens"].grad[:, 1:]  # patch tokens, CLS dropped
    assert grad[~mask].abs().max() == 0
    assert grad[mask].abs().sum(-1).min() > 0


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "cosine"])
def test_regression_switch(kind):
    m = tiny_mimco(patch_loss=kind)
    loss, logs = m([torch.randn(2, 3, 16, 16)], step=0)
    assert torch.isfinite(loss) and logs["loss_patch"] > 0


def test_weights_switch_terms_off():
    _, logs = tiny_mimco(patch_weight=0.0)([torch.randn(2, 3, 16, 16)], step=0)
    assert set(logs) == {"loss_img"}
    _, logs = tiny_mimco(image_weight=0.0)([torch.randn(2, 3, 16, 16)], step=0)
    assert set(logs) == {"loss_patch"}


def test_teacher_bit_identical_after_training_steps():
    m = tiny_mimco(patch_negatives="batch")
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for step in range(5):
        loss, _ = m([torch.randn(4, 3, 16, 16)], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny_mimco()
    x = torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = m([x], step=0)  # same mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_grad_checkpointing_recomputes_with_same_gradients():
    import copy

    torch.manual_seed(0)
    plain = tiny_mimco()
    ckpt = copy.deepcopy(plain)
    ckpt.student.backbone.set_grad_checkpointing(True)
    calls = {"plain": 0, "ckpt": 0}
    plain.student.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain",
                                                                                            calls["plain"] + 1))
    ckpt.student.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x = torch.randn(4, 3, 16, 16)
    for m in (plain, ckpt):
        loss, _ = m([x], step=1)
        loss.backward()
    assert calls == {"plain": 1, "ckpt": 2}  # the block ran again in backward
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_loss_weights_apply_as_configured():
    """L = patch_weight * L_patch + image_weight * L_img, for weights other than 0 and 1."""
    torch.manual_seed(0)
    m = tiny_mimco(patch_weight=0.7, image_weight=0.3)
    loss, logs = m([torch.randn(4, 3, 16, 16)], step=1)
    assert loss.item() == pytest.approx(0.7 * logs["loss_patch"].item() + 0.3 * logs["loss_img"].item(), rel=1e-6)
    only_patch = tiny_mimco(image_weight=0)
    loss, logs = only_patch([torch.randn(4, 3, 16, 16)], step=1)
    assert set(logs) == {"loss_patch"} and only_patch.image_head is None and loss.item() == logs["loss_patch"].item()


@pytest.mark.parametrize("image_target", ["cls", "projector"])
def test_forward_matches_a_plain_loop_reference(image_target):
    """The whole objective, recomputed by hand from timm's public forward: every masked prediction
    scored against the teacher token at its own position (same-image negatives), the image loss
    pairing each student embedding with its own image's teacher CLS (or projector output) against
    the batch, and the weights as configured."""
    import torch.nn.functional as F

    from mimco.models import MoCoMLP

    torch.manual_seed(0)
    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16, 3))
    teacher = create_vit(ModelConfig(patch_size=4, embed_dim=48, depth=1, num_heads=2), 16, 3)
    if image_target == "projector":
        teacher.head = MoCoMLP(3, 48, 64, 24).eval()
    cfg = MimcoLossConfig(head_hidden_dim=32, patch_weight=0.7, image_weight=0.4, patch_temperature=0.3,
                          image_temperature=0.15)
    m = MimCo(student, teacher, cfg, MaskGenerator("random", 0.5, (4, 4), seed=0), image_target).eval()
    x = torch.randn(3, 3, 16, 16)
    loss, logs = m([x], step=2, first_index=0)

    mask = m.mask_generator(3, 2, 0)
    with torch.no_grad():
        t = teacher.forward_features(x)  # timm's own path, not mimco's encode
        t_img = teacher.head(t[:, 0]) if image_target == "projector" else t[:, 0]
        s = student(x, mask)
        terms = []
        for b in range(3):
            for i in mask[b].nonzero().flatten().tolist():
                pred = F.normalize(m.patch_head(s[b, 1 + i]), dim=-1)
                logits = F.normalize(t[b, 1:], dim=-1) @ pred / 0.3
                terms.append(F.cross_entropy(logits[None], torch.tensor([i])))
        lp = torch.stack(terms).mean()
        q = F.normalize(m.image_head(s[:, 0]), dim=-1)
        li = F.cross_entropy(q @ F.normalize(t_img, dim=-1).T / 0.15, torch.arange(3)) * 2 * 0.15
    assert logs["loss_patch"].item() == pytest.approx(lp.item(), rel=1e-5)
    assert logs["loss_img"].item() == pytest.approx(li.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * lp.item() + 0.4 * li.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "cosine"])
def test_regression_switch_regresses_the_masked_teacher_tokens(kind):
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = tiny_mimco(patch_loss=kind, image_weight=0.0).eval()
    x = torch.randn(2, 3, 16, 16)
    loss, logs = m([x], step=0, first_index=0)
    mask = m.mask_generator(2, 0, 0)
    with torch.no_grad():
        target = m.teacher.forward_features(x)[:, 1:][mask]
        pred = m.patch_head(m.student(x, mask)[:, 1:][mask])
        want = {"l1": F.l1_loss(pred, target), "smooth_l1": F.smooth_l1_loss(pred, target),
                "cosine": (1 - F.cosine_similarity(pred, target, dim=-1)).mean()}[kind]
    assert logs["loss_patch"].item() == pytest.approx(want.item(),
                                                      rel=1e-5) and loss.item() == logs["loss_patch"].item()


def test_loss_settings_reach_the_criteria_and_bad_switches_are_named():
    m = tiny_mimco(patch_neg_threshold=0.7, patch_max_negatives=5)
    assert m.patch_criterion.neg_threshold == 0.7 and m.patch_criterion.max_negatives == 5
    assert tiny_mimco(patch_weight=0.0).patch_head is None and tiny_mimco(patch_weight=0.1).patch_head is not None
    with pytest.raises(MimcoError, match="unknown loss.patch_loss 'l3'; choose infonce, l1, smooth_l1 or cosine"):
        load_config(PretrainConfig, None, ["loss.patch_loss=l3"])  # the config's choices, checked when it is built
    with pytest.raises(MimcoError, match="unknown teacher.image_target 'median'; choose cls, mean or projector"):
        load_config(PretrainConfig, None, ["teacher.image_target=median"])
    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3))
    teacher = create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3)
    cls = MimCo(student, teacher, MimcoLossConfig(head_hidden_dim=32), MaskGenerator("random", 0.5, (4, 4)))
    assert cls.image_head[-1].out_features == 32  # the CLS target: the teacher's width, no projector


def test_loss_is_fp32_under_bf16_autocast():
    m = tiny_mimco()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m([torch.randn(4, 3, 16, 16)], step=0)
    assert loss.dtype == torch.float32


def test_masks_follow_the_slice_of_the_global_batch(monkeypatch):
    """The forward asks for the masks of its own slice of the global batch (first_index), and of
    slice 0 when none is given (a single process)."""
    from mimco.masking import join_pending
    from mimco.methods.simmim import SimMIM

    seen = []
    real = MaskGenerator.build
    monkeypatch.setattr(MaskGenerator, "build", lambda self, b, step,
                        first=0: seen.append((step, first)) or real(self, b, step, first))
    x = torch.randn(4, 3, 16, 16)
    simmim = SimMIM(MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3)),
                    MaskGenerator("random", 0.5, (4, 4), seed=0, prefetch=False))
    for m in (tiny_mimco(), simmim):
        m.mask_generator.prefetch = False
        seen.clear()
        m([x], step=3, first_index=6)
        m([x], step=3)
        join_pending()
        assert seen == [(3, 6), (3, 0)]


def _capture_criterion(m):
    """Record the (pred, target, idx) the patch criterion is called with."""
    seen = {}
    crit = m.patch_criterion.forward

    def spy(pred, target, idx):
        seen.update(pred=pred, target=target, idx=idx)
        return crit(pred, target, idx)

    m.patch_criterion.forward = spy
    return seen


def test_target_centring_subtracts_the_running_mean_per_position_then_updates_it(monkeypatch):
    """The patch loss sees the teacher's tokens minus the centre as it was before the batch; in
    training the centre then moves to m * centre + (1 - m) * the batch's mean at each position,
    averaged over processes (one all-reduce); in eval mode it stays."""
    import mimco.methods.mimco as mm

    torch.manual_seed(0)
    m = tiny_mimco(target_centring="position", centre_momentum=0.75)
    assert m.target_centre.shape == (16, 48) and not m.target_centre.any()
    assert "target_centre" in m.state_dict() and "target_centre" not in tiny_mimco().state_dict()
    start = torch.randn(16, 48)
    m.target_centre.copy_(start)
    reduced = []
    monkeypatch.setattr(mm.dist, "all_reduce_mean", lambda x: reduced.append(x.shape) or x)
    seen = _capture_criterion(m)
    x = torch.randn(4, 3, 16, 16)
    t_patch, _ = m.teacher_targets(x)
    m.train()
    m([x], step=0)
    assert torch.allclose(seen["target"], t_patch - start, atol=1e-6)
    assert torch.allclose(m.target_centre, 0.75 * start + 0.25 * t_patch.mean(0), atol=1e-6)
    assert reduced == [(16, 48)]
    m.eval()
    before = m.target_centre.clone()
    m([x], step=1)
    assert torch.equal(m.target_centre, before) and len(reduced) == 1


def test_target_centring_removes_what_every_image_shares_at_a_position():
    """After a few batches the centre is the targets' mean at each position: a target made of a
    fixed per-position pattern plus noise is centred to the noise."""
    torch.manual_seed(1)
    m = tiny_mimco(target_centring="position", centre_momentum=0.5)
    pattern = torch.randn(16, 48) * 5
    for _ in range(30):
        m.centre_targets(pattern + 0.01 * torch.randn(8, 16, 48))
    assert (m.centre_targets(pattern + 0.01 * torch.randn(8, 16, 48)).abs().max()) < 0.1


def test_head_position_adds_the_students_position_rows_to_the_head_input():
    torch.manual_seed(0)
    for on in (False, True):
        m = tiny_mimco(head_position=on)
        seen = {}
        m.patch_head.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
        tokens = {}
        m.student.register_forward_hook(lambda _m, _i, out: tokens.update(t=out[0] if on else out))
        m([torch.randn(2, 3, 16, 16)], step=0)
        idx = masked_indices(m.mask_generator(2, 0), m.mask_generator.count)
        want = gather_tokens(tokens["t"][:, 1:], idx)
        if on:
            want = want + gather_tokens(m.student.backbone.pos_embed[:, 1:].expand(2, -1, -1), idx)
        assert torch.allclose(seen["x"], want)


@pytest.mark.parametrize("patch, image, momentum, error", [
    (0.0, 0.0, 0.9, "loss.patch_weight and loss.image_weight are both 0: nothing to learn; set one above 0"),
    (1.0, 1.0, 1.0, "loss.centre_momentum=1 is out of range: it is the running mean's momentum per step and must "
                    "lie in [0, 1), e.g. 0.9"),
    (1.0, 0.0, -0.5, "loss.centre_momentum=-0.5 is out of range: it is the running mean's momentum per step and "
                     "must lie in [0, 1), e.g. 0.9"),
    (0.0, 1.0, 0.0, None), (1.0, 0.0, 0.99, None), (1.0, 1.0, 0.9, None)])
def test_the_loss_section_check(patch, image, momentum, error):
    import re

    cfg = MimcoLossConfig(patch_weight=patch, image_weight=image, centre_momentum=momentum)
    if error is None:
        cfg.check()
    else:
        with pytest.raises(MimcoError, match=f"^{re.escape(error)}$"):
            cfg.check()


def test_a_resume_refuses_a_changed_centring_or_a_head_switched_on_or_off():
    import re

    now = MimcoLossConfig(target_centring="position", patch_weight=0.5, image_weight=0.0)
    now.check_resume({"target_centring": "position", "patch_weight": 2.0, "image_weight": 0.0})  # same heads
    now.check_resume({"target_centring": "position"})  # weights not saved: nothing to compare
    MimcoLossConfig().check_resume({})  # an older checkpoint: no centring, as the default
    MimcoLossConfig().check_resume({"target_centring": "none", "patch_weight": 0.3, "image_weight": 7.0})
    msg = ("loss.target_centring cannot change on resume (the checkpoint has 'none', now 'position'): the running "
           "mean is in the checkpoint or not; drop the override, or start a new run with another train.name")
    for saved in ({}, {"target_centring": "none"}):
        with pytest.raises(MimcoError, match=f"^{re.escape(msg)}$"):
            now.check_resume(saved)
    with pytest.raises(MimcoError, match=r"the checkpoint has 'position', now 'none'"):
        MimcoLossConfig().check_resume({"target_centring": "position"})
    for key, saved, cfg in (("patch_weight", 0.0, MimcoLossConfig(patch_weight=0.5)),
                            ("patch_weight", 1.0, MimcoLossConfig(patch_weight=0.0)),
                            ("image_weight", 0.0, MimcoLossConfig(image_weight=1.0)),
                            ("image_weight", 0.2, MimcoLossConfig(image_weight=0.0))):
        msg = (f"loss.{key} cannot switch between 0 and non-zero on resume (its head exists only when it is above 0); "
               "start a new run")
        with pytest.raises(MimcoError, match=f"^{re.escape(msg)}$"):
            cfg.check_resume({key: saved})


def test_compile_targets_add_the_heads_and_the_teachers_projector():
    from mimco.models import MoCoMLP

    m = tiny_mimco()
    vit_parts = [p for v in (m.student.backbone, m.teacher) for p in (v.patch_embed, *v.blocks)]
    # the teacher's head is an Identity (no parameters): nothing to compile
    assert [id(x) for x in m.compile_targets()] == [id(x) for x in [*vit_parts, m.patch_head, m.image_head]]
    m.teacher.head = MoCoMLP(3, 48, 64, 24)
    only_image = tiny_mimco(patch_weight=0.0)
    only_image.teacher.head = m.teacher.head
    got = [id(x) for x in only_image.compile_targets()]
    assert got[-2:] == [id(only_image.image_head), id(m.teacher.head)] and id(m.patch_head) not in got
    del only_image.teacher.head
    assert only_image.compile_targets()[-1] is only_image.image_head  # a teacher without a head


def test_the_default_image_target_is_the_teachers_cls_and_the_grids_must_agree():
    from mimco.models.teachers import TeacherView

    m = tiny_mimco()
    assert m.image_target == m.view.image_target == "cls"
    student = MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3))
    teacher = create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3)
    view = TeacherView(teacher, 16, [0.0], [1.0], [0.0] * 3, [1.0] * 3, (2, 2))
    with pytest.raises(ValueError, match=r"^the teacher view resamples onto \(2, 2\), the student's grid is \(4, 4\)$"):
        MimCo(student, teacher, MimcoLossConfig(head_hidden_dim=32), MaskGenerator("random", 0.5, (4, 4)), view=view)


def test_forward_stays_on_the_device_of_the_batch():
    """The masks are asked for on the batch's device (the meta device here, a stand-in for a GPU)."""
    torch.manual_seed(0)
    m = tiny_mimco().to("meta")
    loss, logs = m([torch.randn(2, 3, 16, 16, device="meta")], step=0, first_index=0)
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in logs.values())


def test_without_first_index_a_process_takes_its_rank_times_the_batch(monkeypatch):
    """Without first_index (a forward outside the engine) process r masks global samples r * B ... ."""
    import mimco.methods.mimco as mm
    import mimco.methods.simmim as sm
    from mimco.methods.simmim import SimMIM

    monkeypatch.setattr(mm, "rank", lambda: 2)
    monkeypatch.setattr(sm, "rank", lambda: 2)
    simmim = SimMIM(MaskedViT(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), 16, 3)),
                    MaskGenerator("random", 0.5, (4, 4), seed=0, prefetch=False))
    for m in (tiny_mimco(), simmim):
        m.mask_generator.prefetch = False
        seen = []
        real = m.mask_generator.build
        m.mask_generator.build = lambda b, step, first=0: seen.append(first) or real(b, step, first)
        m([torch.randn(4, 3, 16, 16)], step=1)  # 4 images of 3 channels: the batch's size, not another dimension
        assert seen == [8]


def _timm_teacher(path, in_chans: int = 3):
    """A 2-block timm ViT (width 32, 2 heads, 16 px / patch 4) saved as a safetensors state dict."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            in_chans=in_chans)
    save_file(vit.state_dict(), str(path))
    return vit


def _student_cfg(tmp_path, *extra):
    from tests.helpers import tiny_overrides

    return load_config(PretrainConfig, None, [*tiny_overrides(tmp_path, "student"), "teacher.num_heads=2", *extra])


def test_build_teacher_loads_the_file_and_sees_the_batch_as_asked(tmp_path, capsys):
    """build_teacher: the file's weights, frozen later by MimCo; the teacher's side, grid, blocks,
    target norm, image target and normalisation from ``teacher.*`` (the student's data stats mapped
    onto the teacher's), and the line that says so."""
    from mimco.methods.mimco import build_teacher

    vit = _timm_teacher(tmp_path / "t.safetensors")
    cfg = _student_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 't.safetensors'}", "teacher.img_size=32",
                       "teacher.mean=[0.5,0.4,0.3]", "teacher.std=[0.25,0.2,0.5]", "teacher.layers=[0]",
                       "teacher.target_norm=layernorm", "teacher.image_target=mean", "teacher.resample=bilinear")
    teacher, view = build_teacher(cfg, (4, 4))
    assert torch.equal(teacher.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert teacher.pos_embed.shape[1] == 1 + 8 * 8  # resampled to the teacher's 32 px
    assert (view.img_size, view.grid, view.student_grid, view.layers) == (32, (8, 8), (4, 4), [0])
    assert (view.target_norm, view.image_target, view.resample) == ("layernorm", "mean", "bilinear")
    d, t_mean, t_std = cfg.data, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.5])
    assert torch.allclose(view.scale.flatten(), torch.tensor(d.std) / t_std)
    assert torch.allclose(view.shift.flatten(), (torch.tensor(d.mean) - t_mean) / t_std)
    err = capsys.readouterr().err
    assert ("at 32 px, patch grid 8x8 -> student's 4x4 (bilinear), targets: mean of blocks [0], layer-normalised, "
            "image mean") in err


def test_build_teacher_defaults_to_the_data_and_the_final_output(tmp_path, capsys):
    from mimco.methods.mimco import build_teacher

    _timm_teacher(tmp_path / "t.safetensors")
    teacher, view = build_teacher(_student_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 't.safetensors'}"), (4, 4))
    assert (view.img_size, view.grid, view.layers, view.image_target) == (16, (4, 4), [], "cls")
    assert not view.renormalise  # no stats in the file, none given: the data's own
    err = capsys.readouterr().err
    assert "at 16 px, patch grid 4x4, targets: final output, image cls" in err and "->" not in err
    assert " as " not in err  # no teacher.model named


def test_build_teacher_refuses_no_file_and_other_channels_and_warns_of_an_unfinished_run(tmp_path, capsys):
    from mimco.config import to_dict
    from mimco.methods.mimco import build_teacher
    from mimco.runs import save_checkpoint
    from tests.helpers import tiny_teacher_cfg

    with pytest.raises(MimcoError) as e:
        build_teacher(_student_cfg(tmp_path), (4, 4))
    assert str(e.value) == ("no teacher given; set teacher.checkpoint=runs/<teacher-run>/last.pt (train one with "
                            "`mimco teacher`) or a released MoCo v3 / DINO file")
    _timm_teacher(tmp_path / "grey.safetensors", in_chans=1)
    with pytest.raises(MimcoError, match="the teacher takes 1-channel images but data.channels=3; set data.channels=1"):
        build_teacher(_student_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 'grey.safetensors'}"), (4, 4))
    _timm_teacher(tmp_path / "rgb.safetensors")  # grey images into an RGB teacher: allowed, the data's first stats
    cfg = _student_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 'rgb.safetensors'}", "data.channels=1")
    _, view = build_teacher(cfg, (4, 4))
    std = torch.tensor(cfg.data.std)
    assert view.in_chans == 3 and torch.allclose(view.scale.flatten(), std[0] / std)  # grey's stats -> each channel's
    tcfg = tiny_teacher_cfg(tmp_path)
    momentum, base = create_vit(tcfg.model, 16, 3), create_vit(tcfg.model, 16, 3)
    weights = {**{f"momentum_encoder.{k}": v for k, v in momentum.state_dict().items()},
               **{f"base_encoder.{k}": v for k, v in base.state_dict().items()}}
    ckpt = tmp_path / "last.pt"
    for step in (1, 4):  # an unfinished run (1 of 4 steps) is warned of, a finished one not
        save_checkpoint(tmp_path, "teacher", step, 4, weights, {"momentum": "momentum_encoder.",
                                                                "base": "base_encoder."}, {}, {}, [], to_dict(tcfg))
        capsys.readouterr()
        teacher, _ = build_teacher(_student_cfg(tmp_path, f"teacher.checkpoint={ckpt}", "teacher.encoder=base"), (4, 4))
        assert torch.equal(teacher.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)  # the encoder asked for
        err = capsys.readouterr().err
        warned = f"warning: the teacher {ckpt} is from an unfinished run (step 1 of 4)" in err
        assert warned == (step == 1) and "mimco: teacher mimco teacher (stage 1) checkpoint at 16 px" in err
