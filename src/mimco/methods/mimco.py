"""Stage 2: MimCo (Zhou et al. 2022): a masked student reconstructs a frozen contrastive
teacher's view of the unmasked image, at patch level and at image level."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mimco import distributed as dist
from mimco.config import FrozenTeacherConfig, setting
from mimco.distributed import rank
from mimco.errors import MimcoError
from mimco.masking import MaskGenerator, gather_tokens, masked_indices
from mimco.methods.losses import GlobalInfoNCE, PatchContrastiveLoss, regression_loss
from mimco.methods.registry import register_method
from mimco.methods.simmim import MaskedMethod, masked_student
from mimco.models.formats import load_backbone
from mimco.models.heads import ReconstructionHead
from mimco.models.student import MaskedViT
from mimco.models.teachers import TeacherView, projector_width


@dataclass
class MimcoLossConfig:
    """The ``loss:`` section: MimCo's patch and image reconstruction losses and their heads."""

    patch_loss: Literal["infonce", "l1", "smooth_l1", "cosine"] = "infonce"  # infonce | l1 | smooth_l1 | cosine
    # image (the same image's tokens) | batch (every token of the batch) | position (the same grid position in every
    # image of the batch: position cannot tell the positive apart) | image+position (both)
    patch_negatives: Literal["image", "batch", "position", "image+position"] = "image"
    patch_temperature: float = setting(0.2, above=0, what='the InfoNCE temperature')
    patch_neg_threshold: float = 1.0  # drop negatives with teacher cosine to the positive above this
    # patch_negatives=batch: at most this many negatives per step, sampled from the global batch's teacher
    # tokens (0 = all). Logits take (local masked tokens) x (this + 1) floats: ViT-S, 128 images per GPU,
    # ratio 0.6 -> 15k x 8k, about 0.5 GB per fp32 copy; all 8 x 128 x 196 tokens would be 12 GB.
    patch_max_negatives: int = setting(8192, min=0, what='a negatives cap (0 = no cap)')
    image_temperature: float = setting(0.2, above=0, what='the InfoNCE temperature')
    patch_weight: float = setting(1.0, min=0, what='a loss weight')
    image_weight: float = setting(1.0, min=0, what='a loss weight')  # lambda
    head_hidden_dim: int = setting(512, min=1, what="the reconstruction heads' hidden width", fixed=True)
    # position: subtract a running mean of the teacher's patch targets at each grid position before the patch loss
    # (DINO's centring, per position: what every image has at a position is no target); none: the targets as they are
    target_centring: Literal["none", "position"] = "none"
    centre_momentum: float = 0.9  # target_centring: the running mean's momentum per step (DINO's 0.9), in [0, 1)
    head_position: bool = False  # give the patch head the student's position embedding of each masked token

    def check(self) -> None:
        if self.patch_weight == 0 and self.image_weight == 0:
            raise MimcoError("loss.patch_weight and loss.image_weight are both 0: nothing to learn; set one above 0")
        if not 0 <= self.centre_momentum < 1:
            raise MimcoError(f"loss.centre_momentum={self.centre_momentum:g} is out of range: it is the running "
                             "mean's momentum per step and must lie in [0, 1), e.g. 0.9")

    def check_resume(self, saved: dict[str, Any]) -> None:
        """Refuse what a resume from a checkpoint whose ``loss:`` section was ``saved`` cannot honour."""
        old = saved.get("target_centring", "none")  # an older checkpoint: no centring
        if old != self.target_centring:
            raise MimcoError(f"loss.target_centring cannot change on resume (the checkpoint has {old!r}, now "
                             f"{self.target_centring!r}): the running mean is in the checkpoint or not; drop the "
                             "override, or start a new run with another train.name")
        for key in ("patch_weight", "image_weight"):
            a, b = saved.get(key), getattr(self, key)
            if a is not None and (a > 0) != (b > 0):
                raise MimcoError(f"loss.{key} cannot switch between 0 and non-zero on resume (its head exists only "
                                 "when it is above 0); start a new run")


class MimCo(MaskedMethod, nn.Module):
    """Student (:class:`MaskedViT`), patch and image heads, and a frozen teacher (any timm ViT-family
    model, in eval mode, never optimised). ``view`` (:class:`TeacherView`) says how the teacher sees the
    student's crop and which of its features are targets; without one it sees the student's input as
    is, on the student's grid, its final tokens the targets and its ``head`` its projector.
    """

    def __init__(self, student: MaskedViT, teacher: nn.Module, loss: MimcoLossConfig,
                 mask_generator: MaskGenerator, image_target: str = "cls", view: TeacherView | None = None) -> None:
        super().__init__()
        grid = tuple(student.backbone.patch_embed.grid_size)
        if view is None:
            size = student.backbone.patch_embed.img_size[0]
            view = TeacherView(teacher, size, [0.0], [1.0], [0.0] * teacher.patch_embed.proj.in_channels,
                               [1.0] * teacher.patch_embed.proj.in_channels, grid, image_target=image_target)
        if tuple(view.student_grid) != grid:
            raise ValueError(f"the teacher view resamples onto {view.student_grid}, the student's grid is {grid}")
        self.student, self.teacher, self.cfg, self.mask_generator = student, teacher, loss, mask_generator
        self.view, self.image_target = view, view.image_target
        self.teacher.requires_grad_(False).eval()
        s_dim, t_dim = student.backbone.embed_dim, teacher.embed_dim
        image_dim = projector_width(teacher) if self.image_target == "projector" else t_dim
        # a head whose loss weighs 0 is not built: DDP refuses parameters that never receive a gradient
        self.patch_head = ReconstructionHead(s_dim, loss.head_hidden_dim, t_dim) if loss.patch_weight > 0 else None
        self.image_head = ReconstructionHead(s_dim, loss.head_hidden_dim, image_dim) if loss.image_weight > 0 else None
        self.patch_criterion = PatchContrastiveLoss(loss.patch_temperature, loss.patch_negatives,
                                                    loss.patch_neg_threshold, max_negatives=loss.patch_max_negatives)
        self.image_criterion = GlobalInfoNCE(loss.image_temperature)
        if loss.target_centring == "position":  # saved with the weights: a resumed run goes on with the same mean
            self.register_buffer("target_centre", torch.zeros(grid[0] * grid[1], t_dim))

    def train(self, mode: bool = True) -> MimCo:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), the student's batch -> (patch tokens (B, N, Dt) on the student's grid,
        image target (B, Dt or projector width)). In inference mode (no activations kept); the clones
        make ordinary tensors of them, which the losses may save for their backward pass."""
        with torch.inference_mode():
            patch, image = self.view(self.teacher, x)
        return patch.clone(), image.clone()

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [x] (B, C, H, W), the same crop for teacher and student -> (loss, logs)."""
        (x,) = views
        b = x.shape[0]
        mask = self.mask_generator(b, step, rank() * b if first_index is None else first_index, x.device)
        t_patch, t_image = self.teacher_targets(x)
        cfg, logs = self.cfg, {}
        with_position = cfg.head_position and cfg.patch_weight > 0
        out = self.student(x, mask, position=with_position)
        tokens, pos = out if with_position else (out, None)  # pos (1, N, Ds)
        loss = tokens.new_zeros((), dtype=torch.float32)
        if cfg.patch_weight > 0:
            idx = masked_indices(mask, self.mask_generator.count)  # (B, M), ascending
            masked = gather_tokens(tokens[:, self.student.num_prefix_tokens :], idx)  # (B, M, Ds)
            if pos is not None:
                masked = masked + gather_tokens(pos.expand(b, -1, -1), idx)
            pred = self.patch_head(masked)
            if cfg.target_centring == "position":
                t_patch = self.centre_targets(t_patch)
            lp = (self.patch_criterion(pred, t_patch, idx) if cfg.patch_loss == "infonce"
                  else regression_loss(cfg.patch_loss, pred, gather_tokens(t_patch, idx)))
            loss = loss + cfg.patch_weight * lp
            logs["loss_patch"] = lp.detach()
        if cfg.image_weight > 0:
            li = self.image_criterion(self.image_head(tokens[:, 0]), t_image)
            loss = loss + cfg.image_weight * li
            logs["loss_img"] = li.detach()
        return loss, logs

    def centre_targets(self, t_patch: torch.Tensor) -> torch.Tensor:
        """t_patch (B, N, Dt) -> fp32 t_patch minus the running mean at each position (the mean before this
        batch, as DINO centres with the centre before its update); then the mean moves towards this
        global batch's (one all-reduce of N x Dt numbers), in training only."""
        centred = t_patch.float() - self.target_centre  # fp32: under bf16 a difference of close numbers is noise
        if self.training:
            batch = dist.all_reduce_mean(t_patch.detach().float().mean(0))  # (N, Dt)
            self.target_centre.mul_(self.cfg.centre_momentum).add_(batch, alpha=1 - self.cfg.centre_momentum)
        return centred

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def compile_targets(self) -> list[nn.Module]:
        heads = [self.patch_head, self.image_head, getattr(self.teacher, "head", None)]  # the teacher's: its projector
        return [*super().compile_targets(), *(h for h in heads if h is not None and any(True for _ in h.parameters()))]


def build_teacher(cfg: Any, student_grid: tuple[int, int]) -> tuple[nn.Module, TeacherView]:
    """The frozen teacher of a :class:`~mimco.config.PretrainConfig`'s ``teacher:`` section and how
    it sees the student's batch (its image size, normalisation, target features and the resampling
    of its grid onto ``student_grid``)."""
    t, data = cfg.teacher, cfg.data
    if not t.checkpoint:
        raise MimcoError("no teacher given; set teacher.checkpoint=runs/<teacher-run>/last.pt (train one with `mimco "
                         "teacher`) or a released MoCo v3 / DINO file")
    size = t.img_size or data.img_size
    teacher, state = load_backbone(t.checkpoint, t.encoder, size, t.num_heads, t.model)
    chans = teacher.patch_embed.proj.in_channels
    if chans != data.channels and data.channels != 1:
        raise MimcoError(f"the teacher takes {chans}-channel images but data.channels={data.channels}; set "
                         f"data.channels={chans}")
    mean, std = (t.mean, t.std) if t.mean else state.stats or (data.mean, data.std)
    mean, std = list(mean)[:chans], list(std)[:chans]  # the data's 3 values for a grey teacher: its first
    view = TeacherView(teacher, size, data.mean[: data.channels], data.std[: data.channels], mean, std,
                       tuple(student_grid), t.layers, t.target_norm, t.image_target, t.resample)
    if dist.is_main():
        if state.progress is not None and state.progress[0] < state.progress[1]:
            print(f"mimco: warning: the teacher {t.checkpoint} is from an unfinished run (step {state.progress[0]} of "
                  f"{state.progress[1]}); finish it with `mimco teacher --resume {t.checkpoint}` first",
                  file=sys.stderr, flush=True)
        grid, sg = view.grid, view.student_grid
        print(f"mimco: teacher {state.format}{f' as {t.model}' if t.model else ''} at {size} px, patch grid "
              f"{grid[0]}x{grid[1]}" + (f" -> student's {sg[0]}x{sg[1]} ({t.resample})" if grid != sg else "") +
              f", targets: {'final output' if not t.layers else f'mean of blocks {view.layers}'}"
              f"{', layer-normalised' if t.target_norm == 'layernorm' else ''}, image {t.image_target}",
              file=sys.stderr, flush=True)
    return teacher, view


@register_method("mimco", stage="pretrain", views="one",
                 sections={"teacher": FrozenTeacherConfig, "loss": MimcoLossConfig})
def build_mimco(cfg: Any, device: torch.device, **_: Any) -> MimCo:
    """MimCo of a :class:`~mimco.config.PretrainConfig`: its masked student against its frozen teacher."""
    student, masks = masked_student(cfg)
    teacher, view = build_teacher(cfg, student.backbone.patch_embed.grid_size)
    return MimCo(student, teacher, cfg.loss, masks, view=view).to(device)
