"""Build and run each stage from its config: device, run folder, data, method, trainer, eval."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mimco import distributed as dist
from mimco.config import PretrainConfig, TeacherConfig, save_config
from mimco.config_rules import validate
from mimco.data.build import IN_MEMORY, BatchStream, ImageArray, cached, load_dataset
from mimco.data.device_decode import DeviceViews, EncodedFiles
from mimco.data.transforms import BatchMimView, BatchTwoViews, image_mim_view, image_two_views
from mimco.engine.compiling import check_mode as check_compile_mode
from mimco.engine.rng import seed_process
from mimco.engine.sharding import gathered
from mimco.engine.trainer import Trainer
from mimco.errors import MimcoError
from mimco.eval.probe import has_labels, knn_at_end, probe_backbone
from mimco.masking import MaskGenerator
from mimco.methods import MimCo, MoCoV3
from mimco.methods.simmim import SimMIM
from mimco.models import MaskedViT, create_vit
from mimco.models.formats import load_backbone
from mimco.models.teachers import TeacherView
from mimco.runs import CHECKPOINT, CONFIG, finished, write_summary

STAGES = {"teacher": TeacherConfig, "pretrain": PretrainConfig}


def setup(cfg: TeacherConfig | PretrainConfig) -> torch.device:
    """Threads, device, process group and seeds; refuses out-of-range values first."""
    validate(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    check_compile_mode(t.compile_mode)
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise MimcoError(f"unknown train.precision '{t.precision}'; choose fp32, bf16 or fp16")
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif t.device.startswith("cuda") and not torch.cuda.is_available():
        raise MimcoError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    elif t.device.split(":")[0] not in ("cpu", "cuda"):
        raise MimcoError(f"unknown train.device '{t.device}'; choose auto, cpu or cuda")
    else:
        device = torch.device(t.device)
    if t.precision == "fp16" and device.type != "cuda":
        raise MimcoError("train.precision=fp16 needs a CUDA device; on the CPU use train.precision=bf16")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    set_tf32(device, t.tf32)
    dist.init_from_env(device, t.init_distributed)
    torch.manual_seed(t.seed)  # the same on every process: models start identical (FSDP shards local weights)
    return device


def set_tf32(device: torch.device, on: bool) -> None:
    """On CUDA, fp32 matmuls and convolutions on TF32 tensor cores (``train.tf32``; bf16/fp16 autocast
    regions are unaffected). Set through the ``allow_tf32`` flags, which every reader of the setting
    in torch (``get_float32_matmul_precision``, inductor, the newer ``fp32_precision``) agrees with;
    the CPU's matmuls are left alone."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def run_dir_for(cfg: TeacherConfig | PretrainConfig, stage: str, resuming: bool) -> Path:
    """``train.out_dir/train.name`` (or ``<stage>-<time>``); refuses to start over a run's checkpoint.
    The folder is made once the stage has been built, so a refused command leaves none behind."""
    name = cfg.train.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    d = Path(cfg.train.out_dir) / name
    if not resuming and (d / CHECKPOINT).exists():
        raise MimcoError(f"{d} already holds a run; pass --resume auto to continue it or choose another train.name")
    return d


def _stream(cfg: TeacherConfig | PretrainConfig, device: torch.device, two_views: bool) -> BatchStream:
    """The training batches of a stage: in memory (built-in sets, or a folder with ``data.cache``)
    with batched views; a folder decoded on the device (``data.decode=gpu``); or a folder whose
    loader workers decode and augment each image."""
    data = cfg.data
    if data.decode not in ("cpu", "gpu"):
        raise MimcoError(f"unknown data.decode '{data.decode}'; choose cpu or gpu")
    batched = BatchTwoViews if two_views else BatchMimView
    if data.decode == "gpu":
        if data.name in IN_MEMORY or data.cache or data.on_device:
            other = "data.cache=true" if data.cache else "data.on_device=true" if data.on_device else data.name
            raise MimcoError(f"data.decode=gpu decodes image files on the device; it does not apply to {other}: "
                             "set data.decode=cpu")
        views = batched(cfg.aug, data, crop=False).to(device)
        ds: Any = EncodedFiles(load_dataset(data, train=True), views.crops)
        tf: Any = DeviceViews(views, data.img_size, data.channels, device)
    elif data.name in IN_MEMORY or data.cache:
        ds = load_dataset(data, train=True)
        if not isinstance(ds, ImageArray):  # data.cache: an image folder decoded once
            ds = cached(ds, data, verbose=dist.is_main(), device=device)
        if data.on_device:
            ds = ImageArray(ds.images.to(device), ds.labels, ds.channels)
        tf = batched(cfg.aug, data).to(device)
    elif data.on_device:
        raise MimcoError(f"data.on_device=true needs an in-memory dataset ({', '.join(IN_MEMORY)}) or an image "
                         f"folder with data.cache=true, not '{data.name}'; set one of them")
    else:
        ds = load_dataset(data, train=True, transform=image_two_views(cfg.aug, data) if two_views else image_mim_view(cfg.aug, data))
        tf = None
    return BatchStream(ds, cfg.optim.batch_size, cfg.train.seed, device, tf, data.num_workers,
                       data.max_bad_fraction, dist.rank(), dist.world_size())


def _mask_generator(cfg: PretrainConfig, grid: tuple[int, int]) -> MaskGenerator:
    m, p = cfg.mask, cfg.model.patch_size
    if m.mask_patch_size % p:
        raise MimcoError(f"mask.mask_patch_size={m.mask_patch_size} is not a multiple of model.patch_size={p}")
    try:
        return MaskGenerator(m.type, m.ratio, grid, max((m.mask_patch_size or p) // p, 1), m.min_block_patches,
                             m.min_aspect, cfg.train.seed)
    except ValueError as e:
        raise MimcoError(f"{e}; see configs/ for valid values") from None


def build_teacher(cfg: PretrainConfig, student_grid: tuple[int, int]) -> tuple[torch.nn.Module, TeacherView]:
    """The frozen teacher of ``cfg.teacher`` and how it sees the student's batch (its image size,
    normalisation, target features and the resampling of its grid onto ``student_grid``)."""
    t, data = cfg.teacher, cfg.data
    size = t.img_size or data.img_size
    teacher, state = load_backbone(t.checkpoint, t.encoder, size, t.num_heads, t.model)
    chans = teacher.patch_embed.proj.in_channels
    if chans != data.channels and data.channels != 1:
        raise MimcoError(f"the teacher takes {chans}-channel images but data.channels={data.channels}; set data.channels={chans}")
    if bool(t.mean) != bool(t.std):
        raise MimcoError("set teacher.mean and teacher.std together (or neither, for the teacher's own statistics)")
    mean, std = (t.mean, t.std) if t.mean else state.stats or (data.mean, data.std)
    if len(mean) > chans:  # the data's 3 values for a grey teacher
        mean, std = mean[:chans], std[:chans]
    view = TeacherView(teacher, size, data.mean[: data.channels], data.std[: data.channels], list(mean), list(std),
                       tuple(student_grid), t.layers, t.target_norm, t.image_target, t.resample)
    if dist.is_main():
        grid, sg = view.grid, view.student_grid
        print(f"mimco: teacher {state.format}{f' as {t.model}' if t.model else ''} at {size} px, patch grid "
              f"{grid[0]}x{grid[1]}" + (f" -> student's {sg[0]}x{sg[1]} ({t.resample})" if grid != sg else "") +
              f", targets: {'final output' if not t.layers else f'mean of blocks {view.layers}'}"
              f"{', layer-normalised' if t.target_norm == 'layernorm' else ''}, image {t.image_target}", file=sys.stderr, flush=True)
    return teacher, view


def build_pretrain_method(cfg: PretrainConfig, device: torch.device) -> torch.nn.Module:
    """The stage-2 method of ``cfg.method``: MimCo against its teacher, or SimMIM."""
    data = cfg.data
    if cfg.method not in ("mimco", "simmim"):
        raise MimcoError(f"unknown method '{cfg.method}'; choose mimco or simmim")
    student = MaskedViT(create_vit(cfg.model, data.img_size, data.channels))
    gen = _mask_generator(cfg, student.backbone.patch_embed.grid_size)
    if cfg.method == "simmim":
        return SimMIM(student, gen).to(device)
    if not cfg.teacher.checkpoint:
        raise MimcoError("no teacher given; set teacher.checkpoint=runs/<teacher-run>/last.pt (train one with `mimco teacher`) "
                         "or a released MoCo v3 / DINO file")
    teacher, view = build_teacher(cfg, student.backbone.patch_embed.grid_size)
    try:
        return MimCo(student, teacher, cfg.loss, gen, view=view).to(device)
    except ValueError as e:
        raise MimcoError(f"{e}; see configs/ for valid values") from None


def run_stage(stage: str, cfg: TeacherConfig | PretrainConfig, resume: dict[str, Any] | None = None,
              run_dir: Path | None = None) -> dict[str, Any]:
    """Train one stage end to end; returns a summary (also written to the run folder)."""
    device = setup(cfg)
    run_dir = run_dir or run_dir_for(cfg, stage, resume is not None)
    stream = _stream(cfg, device, two_views=stage == "teacher")
    if stage == "teacher":
        method: torch.nn.Module = MoCoV3(create_vit(cfg.model, cfg.data.img_size, cfg.data.channels), cfg.moco.proj_dim,
                                         cfg.moco.mlp_dim, cfg.moco.temperature, cfg.moco.momentum).to(device)
    else:
        method = build_pretrain_method(cfg, device)
    seed_process(cfg.train.seed * 1000 + dist.rank() + 1)  # per-process streams for augmentation and drop path
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG)
    summary = Trainer(method, cfg, stream, run_dir, stage, device, resume).fit()
    summary["run_dir"] = str(run_dir)
    if cfg.eval.at_end and finished(summary):  # every process extracts its share; rank 0 scores
        splits = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
        if has_labels(*splits):
            with gathered(method):  # FSDP: the backbone's parameters, whole on every process, for its forward_features
                summary.update(knn_at_end(method.backbone(), splits, cfg.data, cfg.eval, device, cfg.train.precision))
    if dist.is_main():
        write_summary(run_dir, summary)
    return summary


def evaluate(backbone: torch.nn.Module | None, cfg: TeacherConfig | PretrainConfig, device: torch.device,
             linear: bool = True) -> dict[str, float]:
    """k-NN (and linear-probe) top-1 on the test split; {} when the dataset has no labelled test split."""
    splits = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    if not has_labels(*splits):
        return {}
    return probe_backbone(backbone, splits, cfg.data, cfg.eval, device, linear, seed=cfg.train.seed).metrics()
