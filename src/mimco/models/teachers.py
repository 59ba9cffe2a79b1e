"""What a frozen teacher contributes to MimCo: its own view of the student's crop (resolution,
normalisation, channels), the features chosen as targets (a block or a mean of blocks, optionally
layer-normalised), and its patch-token map resampled onto the student's grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimco.errors import MimcoError


def projector_width(model: nn.Module) -> int:
    """The width of the teacher's image projector (a MoCo MLP or CLIP's projection), 0 = none."""
    head = getattr(model, "head", None)
    return head.out_features if isinstance(head, nn.Linear) else int(getattr(head, "out_dim", 0))


def resample_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str) -> torch.Tensor:
    """Patch tokens (B, Hs*Ws, D) on grid ``src`` -> (B, Hd*Wd, D) on grid ``dst``, row-major: ``area``
    averages the teacher tokens each student patch covers (overlapping windows when the sizes do not
    divide); ``bilinear`` interpolates (antialiased when shrinking)."""
    if tuple(src) == tuple(dst):
        return tokens
    b, n, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *src)
    if mode == "area":
        x = F.adaptive_avg_pool2d(x, dst)
    else:
        shrink = dst[0] < src[0] or dst[1] < src[1]
        x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False, antialias=shrink)
    return x.flatten(2).transpose(1, 2)


class TeacherView(nn.Module):
    """Turns the student's batch into the teacher's targets. Holds no weights (its buffers are not
    saved), so checkpoints keep the teacher's keys as they were.

    Args:
        model: the frozen teacher (timm ViT, DeiT, EVA...).
        img_size: the teacher's input side in pixels.
        data_mean, data_std: the student's normalisation (per channel of the batch).
        mean, std: the teacher's normalisation (per channel of the teacher's input).
        student_grid: the student's patch grid (rows, cols).
        layers, target_norm, image_target, resample: the keys ``teacher.*`` of the same names
            (docs/teachers.md#which-teacher-features, docs/teachers.md#the-teacher-keeps-its-own-geometry).
    """

    def __init__(self, model: nn.Module, img_size: int, data_mean: list[float], data_std: list[float],
                 mean: list[float], std: list[float], student_grid: tuple[int, int], layers: list[int] | None = None,
                 target_norm: str = "none", image_target: str = "cls", resample: str = "area") -> None:
        super().__init__()
        in_chans = model.patch_embed.proj.in_channels
        if len(data_mean) not in (1, in_chans) or len(data_std) != len(data_mean):
            raise MimcoError(f"the teacher takes {in_chans}-channel images but the data has {len(data_mean)} channels; "
                             "set data.channels to the teacher's")
        if len(mean) != in_chans or len(std) != in_chans:
            raise MimcoError(f"teacher.mean / teacher.std need {in_chans} values each (one per teacher input channel), "
                             f"got {len(mean)} and {len(std)}")
        grid = tuple(model.patch_embed.grid_size)
        if resample == "area" and (grid[0] < student_grid[0] or grid[1] < student_grid[1]):
            raise MimcoError(f"the teacher's patch grid {grid[0]}x{grid[1]} is coarser than the student's "
                             f"{student_grid[0]}x{student_grid[1]}: area averaging cannot fill it; set "
                             "teacher.resample=bilinear or a larger teacher.img_size")
        depth = len(model.blocks)
        if bad := [i for i in (layers or []) if not -depth <= i < depth]:
            raise MimcoError(f"teacher.layers {bad} out of range: the teacher has {depth} blocks (0..{depth - 1}, or "
                             f"-1..-{depth} from the end)")
        if image_target == "cls" and getattr(model, "cls_token", None) is None:
            raise MimcoError("teacher.image_target=cls but the teacher has no class token; use "
                             "teacher.image_target=mean")
        if image_target == "projector" and not projector_width(model):
            raise MimcoError("teacher.image_target=projector needs a teacher with a projector (a MoCo v3 file's MLP or "
                             "CLIP's image projection); use teacher.image_target=cls or mean")
        self.img_size, self.in_chans, self.grid, self.student_grid = img_size, in_chans, grid, tuple(student_grid)
        self.layers = [i % depth for i in (layers or [])]
        self.target_norm, self.image_target, self.resample = target_norm, image_target, resample
        self.prefix = int(model.num_prefix_tokens)
        # x_teacher = (x * s_std + s_mean - t_mean) / t_std = x * scale + shift, per teacher channel
        s_mean, s_std = torch.tensor(data_mean), torch.tensor(data_std)
        t_mean, t_std = torch.tensor(mean), torch.tensor(std)
        for name, v in (("scale", s_std / t_std), ("shift", (s_mean - t_mean) / t_std)):
            self.register_buffer(name, v.view(1, -1, 1, 1).expand(1, in_chans, 1, 1).clone(), persistent=False)
        self.renormalise = not (self.scale.allclose(torch.ones(())) and self.shift.allclose(torch.zeros(())))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch (B, C, H, W) as the teacher takes it: (B, C_t, S_t, S_t)."""
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)  # grey images into an RGB teacher
        if self.renormalise:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return x

    def features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's target tokens (B, P + N_t, D) and its final output (B, P + N_t, D)."""
        if not self.layers:
            out = model.forward_features(x)
            return (self._norm(out), out)
        final, inter = model.forward_intermediates(x, indices=self.layers, return_prefix_tokens=self.prefix > 0,
                                                   norm=False, output_fmt="NLC",
                                                   stop_early=self.image_target != "projector")  # later blocks unused
        blocks = [self._norm(torch.cat(t[::-1], dim=1) if self.prefix else t) for t in inter]  # (spatial, prefix) pairs
        return torch.stack(blocks).mean(0), final

    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:]) if self.target_norm == "layernorm" else t

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the student's batch (B, C, H, W) -> (patch targets (B, N_student, D) on the student's
        grid, image target (B, D) or (B, projector width))."""
        tokens, final = self.features(model, self.inputs(x))
        patches = tokens[:, self.prefix:]
        image = (tokens[:, 0] if self.image_target == "cls" else patches.mean(1) if self.image_target == "mean"
                 else model.forward_head(final))
        return resample_grid(patches, self.grid, self.student_grid, self.resample), image
