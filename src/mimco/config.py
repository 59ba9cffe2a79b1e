"""Typed run configuration: dataclasses, YAML files and ``key=value`` overrides.

Each stage has one top-level dataclass (:class:`TeacherStageConfig` for ``mimco teacher``,
:class:`PretrainConfig` for ``mimco pretrain``, :class:`FinetuneConfig` for ``mimco finetune``)
made of the sections below (stage 2's frozen teacher is its ``teacher:`` section, :class:`FrozenTeacherConfig`).
A YAML file gives any subset of the keys; ``section.key=value`` overrides on the command line come last.
An unknown key or a value of the wrong type is a :class:`~mimco.errors.MimcoError` that names the closest valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from mimco.config_rules import validate, walk
from mimco.errors import MimcoError

# The string choices of the config, in one place: a value outside them fails when the config is
# built (file or override), naming the key and the choices. The modules that act on a choice take
# their tables from here (``typing.get_args``).
DatasetName = Literal["imagefolder", "folder", "fashion_mnist", "cifar10", "cifar100", "procedural", "shards", "hf",
                      "segfolder", "fmnist_scenes"]
Decode = Literal["cpu", "gpu"]
Arch = Literal["vit_mini", "vit_tiny", "vit_small", "vit_base"]
Encoder = Literal["momentum", "base"]


def setting(default: Any, *, min: float | None = None, above: float | None = None, what: str = "",
            fixed: bool = False) -> Any:
    """A config field with its rules, which live with it: ``min`` (lowest allowed value) or ``above``
    (the value must exceed it) with ``what`` the value means, for the one-line range error; ``fixed``:
    a resumed run cannot change it (the data order, the step count or the saved state depend on it).
    :func:`mimco.config_rules.validate` and :func:`mimco.config_rules.check_resume` read them."""
    meta: dict[str, Any] = {"fixed": fixed}
    if min is not None or above is not None:
        meta.update(low=min if min is not None else above, inclusive=min is not None, what=what)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where images come from and how they are prepared before augmentation."""

    # imagefolder | folder | fashion_mnist | cifar10 | cifar100 | procedural | shards (WebDataset tars) | hf (a saved
    # Hugging Face dataset, parquet files); segmentation (mimco segprobe /
    # segfinetune): segfolder (ADE20K, Pascal VOC or plain layout under data.root) | fmnist_scenes (also pre-training
    # data: one 56-px scene per Fashion-MNIST image, labelled with the class of most visible pixels, resized)
    name: DatasetName = setting("imagefolder", fixed=True)
    # "" = the dataset's default location (fashion_mnist: the Debian package's folder)
    root: str = setting("", fixed=True)
    img_size: int = setting(224, min=1, what='the image side in pixels', fixed=True)
    channels: int = setting(3, fixed=True)  # grey images are repeated to 3 channels unless this is 1
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    subset: int = setting(0, min=0, what='a training-set cap (0 = all)', fixed=True)
    download: bool = True  # files absent: let torchvision download them (needs network), else fail with how to install
    # stop when more than this fraction of images cannot be read
    max_bad_fraction: float = setting(0.01, min=0, what='the tolerated share of unreadable images')
    num_workers: int = setting(2, min=0, what='loader workers')  # for file datasets (in-memory ones need none)
    on_device: bool = False  # in-memory datasets: copy the images to the GPU once, augment there
    cache: bool = False  # image folders: decode every image once into memory (uint8), then train like an in-memory set
    # the cached square's side (short side resized, centre crop); 0 = img_size
    cache_size: int = setting(0, min=0, what="the cached images' side (0 = data.img_size)")
    decode: Decode = "cpu"  # image folders: cpu (workers decode and augment each image) | gpu (workers read bytes and
    #                      draw crops; JPEGs are decoded, cropped and augmented in batches on the training device)
    procedural_size: int = setting(2048, fixed=True)  # images per split of the procedural dataset
    # shards | hf: the evaluation split's source when data.root holds only training data (a shard folder, index.json
    # or brace pattern; a saved dataset or parquet files); "" = data.root's val (shards) or validation/test split (hf)
    val_root: str = ""
    shuffle_buffer: int = 0  # shards: 0 = a uniform shuffle (as a folder); N = shards in a seeded order, samples
    #                          shuffled within windows of N (reads stay within a few shards at a time)
    image_column: str = "image"  # hf: the column holding the images (datasets.Image, or encoded bytes)
    label_column: str = "label"  # hf: the column holding the class index ("" or absent = unlabelled)
    # fine-tuning on few labels: a balanced subset of the training split (the probes' --per-class draws the same)
    # N labelled images per class (0 = every label)
    labels_per_class: int = setting(0, min=0, what='labelled images per class (0 = all)', fixed=True)
    # or this fraction of each class, e.g. 0.01 for 1 % (0 = off)
    labels_fraction: float = setting(0.0, min=0, what='the labelled fraction of each class (0 = all)', fixed=True)
    label_seed: int = setting(0, fixed=True)  # which subset


@dataclass
class ModelConfig:
    """The ViT backbone (a timm VisionTransformer)."""

    FIXED_ON_RESUME: ClassVar[bool] = True  # the whole section: the weights' shapes depend on it

    arch: Arch = "vit_tiny"  # preset: vit_mini | vit_tiny | vit_small | vit_base
    patch_size: int = setting(16, min=1, what='the patch side in pixels')
    embed_dim: int = 0  # 0 = the preset's value
    depth: int = 0
    num_heads: int = 0  # MoCo v3 ViT-S uses 12, DINO/DeiT ViT-S 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    pos_embed: Literal["learned", "sincos"] = "learned"  # learned | sincos (MoCo v3's fixed 2-D table)
    freeze_patch_embed: bool = False  # MoCo v3's frozen random patch projection
    # timm (trunc-normal 0.02) | mocov3 (xavier-uniform Linear, q/k/v apart, xavier patch projection with zero bias;
    # the stage-1 default)
    init: Literal["timm", "mocov3"] = "timm"
    # continued pre-training: start the trained ViT (stage 2: the student; stage 1: both encoders) from the backbone
    # in this file (any format mimco reads: a mimco run, timm/safetensors, a hub folder, MoCo v3, DINO, MAE, DINOv2,
    # ...); the position table is resampled to this grid. "" = from scratch. Not on resume.
    init_from: str = ""


@dataclass
class ContrastiveAugConfig:
    """MoCo v3's two asymmetric views (view 2 differs in blur and solarize)."""

    min_scale: float = setting(0.08, above=0, what="the smallest crop's share of the image")
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob1: float = 1.0
    blur_prob2: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_prob1: float = 0.0
    solarize_prob2: float = 0.2
    flip_prob: float = 0.5


@dataclass
class MimAugConfig:
    """MIM-style light augmentation: one crop shared by teacher and student."""

    min_scale: float = setting(0.67, above=0, what="the smallest crop's share of the image")
    max_scale: float = 1.0
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect range
    flip_prob: float = 0.5


@dataclass
class MaskConfig:
    type: Literal["random", "block"] = "random"  # random (SimMIM) | block (BEiT)
    ratio: float = 0.6
    mask_patch_size: int = 0  # pixels; 0 = the model's patch size
    min_block_patches: int = 4
    min_aspect: float = 0.3


@dataclass
class FrozenTeacherConfig:
    """The frozen teacher of stage 2: which weights, how it sees the image, which features are targets."""

    # mimco last.pt, MoCo v3, DINO, MAE, SimMIM, DINOv2, OpenCLIP / CLIP, EVA-02, timm weights or a hub folder
    checkpoint: str = setting("", fixed=True)
    # a timm model name to build and load the checkpoint into; "" = from the file's layout
    model: str = setting("", fixed=True)
    encoder: Encoder = "momentum"  # momentum | base (DINO full checkpoints: momentum = teacher, base = student)
    # cls | mean (of the teacher's patch tokens) | projector (MoCo MLP or CLIP projection)
    image_target: Literal["cls", "mean", "projector"] = setting("cls", fixed=True)
    num_heads: int = 0  # 0 = from the checkpoint's format (MoCo v3: 12) or width / 64
    # the teacher's input side in pixels; 0 = data.img_size
    img_size: int = setting(0, min=0, what="the teacher's image side (0 = data.img_size)", fixed=True)
    mean: list[float] = field(default_factory=list)  # [] = the teacher's own (CLIP, timm, hub folder) or data.mean
    std: list[float] = field(default_factory=list)
    resample: Literal["area", "bilinear"] = "area"  # the teacher's patch map onto the student's grid, when they differ
    layers: list[int] = field(default_factory=list)  # [] = final output; else the mean of these blocks' outputs
    target_norm: Literal["none", "layernorm"] = "none"  # layernorm: per token, no affine (MaskDistill, data2vec)

    def check(self) -> None:
        if bool(self.mean) != bool(self.std):
            raise MimcoError("set teacher.mean and teacher.std together (or neither, for the teacher's own statistics)")


@dataclass
class OptimConfig:
    base_lr: float = setting(1.5e-4, above=0, what='the learning rate before scaling')  # lr = this * global_batch / 256
    min_lr: float = setting(0.0, min=0, what='the final learning rate')
    weight_decay: float = setting(0.05, min=0, what='the weight decay')
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    epochs: float = setting(100.0, above=0, what='the length of the schedule')
    warmup_epochs: float = setting(10.0, min=0, what='the warm-up length')
    batch_size: int = setting(256, min=1, what='the global batch per optimiser step', fixed=True)
    accum_steps: int = setting(1, min=1, what='micro-batches per step (batch_size must divide by it)')
    # largest per-process micro-batch; raises accum_steps to fit (0 = no limit). Keeps the global batch's schedule, data
    # order and masks on fewer processes; InfoNCE negatives and BatchNorm statistics then come from each micro-batch.
    micro_batch: int = setting(0, min=0, what='the largest micro-batch (0 = no limit)')
    clip_grad: float = setting(0.0, min=0, what='the gradient-norm limit (0 = off)')  # max grad norm, 0 = off


@dataclass
class TrainConfig:
    out_dir: str = "runs"
    name: str = ""  # run folder name; "" = <stage>-<time>
    seed: int = setting(0, fixed=True)
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: CPU and CUDA; fp16: CUDA, with a grad scaler
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (false: full fp32 everywhere)
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    compile: bool = False  # torch.compile every ViT block, patch embedding and head (the first step compiles)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp (FSDP2) shards the trained encoders, for ViT-L+
    init_distributed: bool = False  # join a process group even at world size 1 (torchrun with one GPU), so the
    #                                 NCCL collectives (and FSDP) really run: benchmarks/gpu_check.sh uses it
    # how long a collective waits for the slowest process before the run fails
    dist_timeout_minutes: int = setting(120, min=1, what="the process group's timeout in minutes")
    #                                  (NCCL's watchdog); data.cache's decode on one process per node must fit
    threads: int = setting(0, min=0, what='CPU threads (0 = default)')  # torch CPU threads, 0 = torch's default
    log_every: int = setting(20, min=1, what='steps between log rows')  # steps between CSV rows
    ckpt_every: int = setting(0, min=0, what='steps between checkpoints (0 = at the end)')
    # stop after this many steps (schedule unchanged), 0 = run all
    max_steps: int = setting(0, min=0, what='a step limit (0 = none)')
    progress: bool = True
    # also keep epoch_XXXX.pt (a copy of last.pt) every N epochs, 0 = none
    keep_every_epochs: int = setting(0, min=0, what='epochs between kept snapshots (0 = none)')
    keep_last: int = 5  # of those snapshots, keep the newest K (-1 = all)
    tensorboard: bool = True  # write every log.csv scalar (and monitor images) to <run>/tensorboard
    wandb: str = ""  # a Weights & Biases project to log to as well ("" = off; WANDB_MODE=offline honoured)


@dataclass
class EvalConfig:
    knn_k: int = setting(20, min=1, what='the neighbour count')
    knn_temperature: float = 0.07
    at_end: bool = True  # eval.protocols (k-NN) on the test split when training ends (labelled datasets)
    max_train: int = 0  # bank size cap, 0 = all
    # few labels (the demo's and the study's few-label columns): this many labelled images per class, over this many
    # balanced subsets (the same as `mimco knn/linprobe --per-class N --label-seeds S`), k-NN with few_knn_k
    few_per_class: int = setting(10, min=1, what='labelled images per class in the few-label columns')
    few_label_seeds: int = setting(3, min=1, what='the number of labelled subsets')
    few_knn_k: int = setting(10, min=1, what='the neighbour count')
    # the k-NN monitor during pre-training: k-NN top-1 (eval.knn_k, eval.knn_temperature) of a bank of
    # monitor_train training images scored on monitor_test test images, both fixed, seeded and class-balanced, in
    # log.csv (knn_monitor), TensorBoard and the progress bar. Off when both intervals are 0. The default sizes cost
    # about 1 % of an ImageNet epoch (docs/training.md#multi-day-runs); they are "up to" sizes, capped (in one
    # line) at what a smaller split gives class-balanced.
    every_epochs: int = setting(0, min=0, what='epochs between k-NN monitor points (0 = off)')  # every N epochs
    every_steps: int = setting(0, min=0, what='steps between k-NN monitor points (0 = off)')  # and/or every N steps
    monitor_train: int = setting(50000, min=1, what="the k-NN monitor's bank size (at most; capped at the split)")
    monitor_test: int = setting(10000, min=1, what="the k-NN monitor's query count (at most; capped at the split)")
    monitor_seed: int = 0
    # the evaluation at the end of a run (at_end): registered protocols by name (mimco.eval.protocols), e.g.
    # [knn, linear, few] or a plugin's; each writes its metrics to summary.json
    protocols: list[str] = field(default_factory=lambda: ["knn"])


@dataclass
class TeacherStageConfig:
    """Stage 1 (``mimco teacher``): the contrastive teacher, MoCo v3 by default (``method``). The
    method's own sections (MoCo v3's ``moco:``) come with it (:func:`stage_class`)."""

    STAGE: ClassVar[str] = "teacher"
    method: str = "mocov3"  # a registered method of this stage (mimco.methods.registry)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="mocov3"))
    aug: ContrastiveAugConfig = field(default_factory=ContrastiveAugConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.1, epochs=300.0, warmup_epochs=40.0,
                                                                   betas=[0.9, 0.999]))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class PretrainConfig:
    """Stage 2 (``mimco pretrain``): MimCo (or the SimMIM baseline, with no teacher). The method's
    own sections (MimCo's ``teacher:`` and ``loss:``) come with it (:func:`stage_class`)."""

    STAGE: ClassVar[str] = "pretrain"
    method: str = "mimco"  # mimco | simmim (mask token, linear pixel decoder, L1 on masked pixels) | a registered one
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: MimAugConfig = field(default_factory=MimAugConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class FinetuneAugConfig:
    """The MAE/BEiT fine-tuning recipe (timm's RandAugment, mixup/cutmix, random erasing)."""

    # MAE's rand-m9-mstd0.5-inc1, with the magnitude capped at 9: at 10 timm posterizes to 0 bits,
    # which current Pillow refuses. "" = off.
    auto_augment: str = "rand-m9-mstd0.5-inc1-mmax9"
    min_scale: float = setting(0.08, above=0, what="the smallest crop's share of the image")
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect range
    flip_prob: float = 0.5
    color_jitter: float = 0.4  # used when auto_augment is off
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    reprob: float = 0.25


@dataclass
class ClassifierConfig:
    layer_decay: float = 0.75  # 0.65 for ViT-B
    drop_path_rate: float = 0.1
    pool: Literal["avg", "token"] = setting("avg", fixed=True)  # avg (mean of patch tokens + fc_norm) | token (CLS)
    # which encoder of a two-encoder checkpoint (MoCo v3, DINO); others have one
    encoder: Encoder = setting("momentum", fixed=True)
    num_heads: int = 0  # 0 = from the checkpoint


@dataclass
class FinetuneConfig:
    """``mimco finetune``: full fine-tuning of a pre-trained backbone."""

    STAGE: ClassVar[str] = "finetune"
    method: str = "finetune"  # a registered method of this stage
    data: DataConfig = field(default_factory=DataConfig)
    aug: FinetuneAugConfig = field(default_factory=FinetuneAugConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=5e-4, weight_decay=0.05, epochs=100.0,
                                                                   warmup_epochs=5.0, betas=[0.9, 0.999], min_lr=1e-6))
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SegDataConfig:
    """What segmentation data adds: the classes of a plain-layout folder and the generated scenes."""

    FIXED_ON_RESUME: ClassVar[bool] = True  # the whole section: the data and the head's classes depend on it

    # plain layout: classes 0..N-1 (ADE20K: 150, Pascal VOC: 21, fmnist_scenes: 11, fixed)
    num_classes: int = setting(0, min=0, what="a plain folder's class count (0 = from the layout)")
    ignore_index: int = setting(255, min=0, what='the mask value of unscored pixels')  # plain layout
    # fmnist_scenes: training scenes (from Fashion-MNIST's training images)
    scenes: int = setting(2000, min=1, what='the number of training scenes')
    val_scenes: int = setting(500, min=1, what='the number of validation scenes')  # fmnist_scenes: from its test images
    items: list[int] = field(default_factory=lambda: [2, 4])  # fmnist_scenes: fewest and most items per scene
    # fmnist_scenes: an item's pixel (0-255) above this takes the item's class, else background
    threshold: int = setting(40, min=0, what='an intensity (0-254)')
    scene_seed: int = 0  # fmnist_scenes: which scenes


@dataclass
class SegAugConfig:
    """Joint image/mask augmentation for segmentation fine-tuning (masks nearest-neighbour)."""

    # random resized crop scale range
    min_scale: float = setting(0.5, above=0, what="the smallest crop's share of the image")
    max_scale: float = 1.0
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5


@dataclass
class SegHeadConfig:
    """The linear segmentation head (BatchNorm + 1x1 convolution on the patch grid) and the backbone under it."""

    # the last N blocks' patch tokens, concatenated (DINOv2's linear: 1; its "+ms" variant: 4)
    layers: int = setting(1, min=1, what='how many last blocks feed the head', fixed=True)
    layer_decay: float = setting(0.65, above=0, what='the lr ratio between consecutive layers')
    drop_path_rate: float = setting(0.1, min=0, what='the stochastic depth rate')
    encoder: Encoder = setting("momentum", fixed=True)  # which encoder of a two-encoder checkpoint (MoCo v3, DINO)
    num_heads: int = 0  # 0 = from the checkpoint


@dataclass
class SegmentationConfig:
    """``mimco segfinetune`` (and the data of ``mimco segprobe``): semantic segmentation on a backbone's
    patch tokens, every layer trained (layer decay, drop path, warm-up + cosine)."""

    STAGE: ClassVar[str] = "segfinetune"
    method: str = "segfinetune"  # a registered method of this stage
    data: DataConfig = field(default_factory=lambda: DataConfig(name="fmnist_scenes", img_size=56))
    seg: SegDataConfig = field(default_factory=SegDataConfig)
    aug: SegAugConfig = field(default_factory=SegAugConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=1e-3, weight_decay=0.05, epochs=20.0,
                                                                   warmup_epochs=1.0, betas=[0.9, 0.999], min_lr=1e-6,
                                                                   batch_size=16))
    train: TrainConfig = field(default_factory=TrainConfig)


C = TypeVar("C")

#: the config sections each registered method owns, (stage, method) -> {section: dataclass}; filled by
#: :func:`mimco.methods.register_method` (a method with none has an empty entry)
_METHOD_SECTIONS: dict[tuple[str, str], dict[str, type]] = {}
_STAGE_CLASSES: dict[tuple[type, str], type] = {}


def register_sections(stage: str, method: str, sections: dict[str, type]) -> None:
    """Record ``method`` of ``stage`` and the config sections it owns (``{"moco": MocoConfig}``):
    a run of that method has them beside the stage's own sections, typed and checked like them.
    Re-registering a method replaces its sections."""
    for name, sec in sections.items():
        if not dataclasses.is_dataclass(sec) or not name.isidentifier():
            raise ValueError(f"method {method!r}: section {name!r} must be a dataclass under an identifier, "
                             f"not {sec!r}")
    _METHOD_SECTIONS[(stage, method)] = dict(sections)
    for key in [k for k in _STAGE_CLASSES if k[1] == method]:
        del _STAGE_CLASSES[key]


def stage_methods(stage: str) -> list[str]:
    """The registered methods of ``stage``, by name (mimco's own, installed plugins and ``--plugin`` files)."""
    from mimco.plugins import load_plugins

    load_plugins()
    return sorted(m for s, m in _METHOD_SECTIONS if s == stage)


def unknown_method(name: str, stage: str) -> MimcoError:
    """The one-line error for a ``method`` that ``stage`` does not have."""
    names = stage_methods(stage)
    if (other := next((s for s, m in _METHOD_SECTIONS if m == name), None)) is not None:
        return MimcoError(f"method '{name}' trains with `mimco {other}`, not `mimco {stage}`; choose "
                          f"{choices_text(names)}")
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = (f" (did you mean {close[0]}?)" if close
            else " (a method defined in a file of your own loads with --plugin FILE)")
    return MimcoError(f"unknown method '{name}'; choose {choices_text(names)}{hint}")


def base_class(cls: type) -> type:
    """The stage's own config class (:class:`PretrainConfig`) of ``cls`` or of a :func:`stage_class` of it."""
    return getattr(cls, "_stage_base", cls)


def stage_class(cls: type, method: str, strict: bool = True) -> type:
    """The config class of a ``method`` run of ``cls``'s stage: the stage's sections plus the ones the
    method owns (MoCo v3's ``moco``, MimCo's ``teacher`` and ``loss``, a plugin's own), a subclass of
    ``cls``. An unregistered method is a :class:`MimcoError` naming the choices (``strict=False``: the
    stage's sections alone, for a saved config whose method is not loaded)."""
    base = base_class(cls)
    if (stage := getattr(base, "STAGE", None)) is None:
        return base
    # mimco's own methods and the plugins register on first use (stage_methods loads them)
    if (stage, method) not in _METHOD_SECTIONS and method not in stage_methods(stage):
        if strict:
            raise unknown_method(method, stage)
        return base
    own = _METHOD_SECTIONS[(stage, method)]
    if not own and method == base.method:
        return base
    key = (base, method)
    if key not in _STAGE_CLASSES:
        fields: list[Any] = [("method", str, field(default=method))]
        fields += [(name, sec, field(default_factory=sec)) for name, sec in own.items()]
        new = dataclasses.make_dataclass(base.__name__, fields, bases=(base,),
                                         namespace={"_stage_base": base, "__reduce__": _reduce})
        new.__module__, new.__qualname__ = base.__module__, f"{base.__qualname__}[{method}]"
        _STAGE_CLASSES[key] = new
    return _STAGE_CLASSES[key]


def _reduce(cfg: Any) -> tuple[Any, tuple[Any, ...]]:
    """Pickle a method's config by its stage class, method and values (its class is made at run time)."""
    return from_dict, (base_class(type(cfg)), to_dict(cfg))


def _foreign(root: type, name: str) -> type | None:
    """The config class of another method of ``root``'s stage that owns section ``name`` (its keys are
    checked there, then left out: one file may serve several methods), else None."""
    base = base_class(root)
    owner = next((m for (s, m), secs in _METHOD_SECTIONS.items() if s == getattr(base, "STAGE", None) and name in secs),
                 None)
    return None if owner is None else stage_class(base, owner)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a config dataclass."""
    return [key for key, _, _ in walk(cls, prefix)]


def choices_text(choices: tuple[str, ...] | list[str]) -> str:
    """``a, b or c``."""
    return " or ".join(filter(None, (", ".join(choices[:-1]), choices[-1])))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        raise MimcoError(f"unknown {key} '{value}'; choose {choices_text(choices)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MimcoError(f"config key '{key}' expects a list like [0.5, 0.5], got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, key) for v in value]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (hint is bool and isinstance(value, bool)) or (hint is int and number and isinstance(value, int)):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if (hint is float and number) or (hint is str and (number or isinstance(value, str))):
        return hint(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    raise MimcoError(f"config key '{key}' expects {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(obj: Any, data: dict, root: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            if not prefix and isinstance(value, dict) and (owner := _foreign(root, name)):
                _apply(owner(), {name: value}, owner)  # another method's section: checked, not kept
                continue
            close = difflib.get_close_matches(key, all_keys(root), n=3, cutoff=0.5)
            sections = [sec for sec, kind in typing.get_type_hints(root).items() if dataclasses.is_dataclass(kind)]
            tip = f"; did you mean {', '.join(close)}?" if close else f"; valid sections: {', '.join(sections)}"
            raise MimcoError(f"unknown config key '{key}'{tip}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise MimcoError(f"config key '{key}' is a section; give its keys, e.g. "
                                 f"{key}.{dataclasses.fields(hint)[0].name}=...")
            _apply(getattr(obj, name), value, root, key + ".")
        else:
            setattr(obj, name, _coerce(value, hint, key))


def load_section(cls: type[C], values: dict[str, Any], name: str) -> C:
    """An instance of the section dataclass ``cls`` from ``{key: value}``, typed and checked (ranges, its own
    ``check()``) like a config's sections, its keys named ``name.key`` in every message (``name=""``: ``key``)."""
    holder = dataclasses.make_dataclass("Section", [(name, cls, field(default_factory=cls))]) if name else cls
    cfg = holder()
    _apply(cfg, {name: values} if name else values, holder)
    validate(cfg)
    return getattr(cfg, name) if name else cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.base_lr=1e-3"`` -> (["optim", "base_lr"], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise MimcoError(f"override '{text}' is not of the form key=value (e.g. optim.epochs=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


#: the config files shipped inside the package (``configs/`` in the repository)
BUNDLED = Path(__file__).resolve().parent / "configs"


def read_mapping(path: Path, what: str, holds: str) -> dict:
    """The YAML mapping in ``path`` (``what`` it is and what it ``holds``, for the one-line errors)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MimcoError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MimcoError(f"{what} {path} must hold {holds}, not {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                model_keys: bool = True) -> C:
    """Build the config of ``cls``'s stage from defaults, then the YAML file at ``path`` (a file, or
    the name of a bundled config), then ``key=value`` overrides; its class is the chosen method's
    (:func:`stage_class`: the method given last, in an override or the file, else the stage's default)."""
    if path and not Path(path).is_file():  # not a file: the bundled config of that name (``fmnist_teacher``)
        bundled = BUNDLED / (str(path) if str(path).endswith(".yaml") else f"{path}.yaml")
        if not bundled.is_file():
            raise MimcoError(f"config file not found: {Path(path)} (configs live in configs/; pass --config "
                             "configs/<name>.yaml)")
        path = bundled
    data = read_mapping(Path(path), "config file", "a mapping of sections") if path else {}
    base = base_class(cls)
    method = data.get("method", base.method) if hasattr(base, "STAGE") else None
    for keys, value in map(parse_override, overrides):
        if keys == ["method"]:
            method = value
    root = stage_class(base, str(method)) if method is not None else base
    cfg = root()
    _apply(cfg, data, root)
    return apply_overrides(cfg, overrides, model_keys)


def apply_overrides(cfg: C, overrides: list[str] | tuple[str, ...], model_keys: bool = True) -> C:
    """Apply ``key=value`` overrides to ``cfg`` (in place, unless ``method`` changes: then a config of
    the new method's class, with the sections both share) and return it, then check the whole config
    (:func:`mimco.config_rules.validate`): every value is checked here, before anything is built."""
    for keys, value in map(parse_override, overrides):
        if keys == ["method"] and hasattr(cfg, "method") and value != cfg.method:
            root = stage_class(type(cfg), str(value))
            cfg = from_dict(root, {**to_dict(cfg), "method": value})
            continue
        _apply(cfg, functools.reduce(lambda inner, k: {k: inner}, reversed(keys), value), type(cfg))
    validate(cfg, model_keys)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(cls: type[C], data: dict) -> C:
    """A saved config (a run's ``config.yaml``, a checkpoint's ``config``) as the class of its method; sections no
    longer known (another method's, from an older mimco, or a method whose plugin is not loaded) are left out."""
    base = base_class(cls)
    root = stage_class(base, str(data.get("method", base.method)), strict=False) if hasattr(base, "STAGE") else base
    hints = typing.get_type_hints(root)
    cfg = root()
    _apply(cfg, {k: v for k, v in data.items() if k in hints or not isinstance(v, dict)}, root)
    return cfg
