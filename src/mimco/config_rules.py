"""Rules on config values beyond their types: ranges no run can use, values that do not fit together, and overrides a
resumed run cannot honour. Each ends in a one-line :class:`~mimco.errors.MimcoError` naming the key. :func:`validate`
runs whenever a config is built (:func:`mimco.config.load_config`, :func:`mimco.config.apply_overrides`) and again when
a stage starts, so a bad value fails before any data or model is built. The choices of string keys are their ``Literal``
types in :mod:`mimco.config`."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from mimco.errors import MimcoError

#: model.arch -> (embed_dim, depth, num_heads); the presets of :func:`mimco.models.vit.create_vit`
PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_mini": (128, 4, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
#: the in-memory datasets (the rest are image folders)
IN_MEMORY = ("fashion_mnist", "cifar10", "cifar100", "procedural", "fmnist_scenes")
#: the datasets of (image, mask) pairs, for ``mimco segprobe | segfinetune`` only
SEGMENTATION = ("segfolder", "fmnist_scenes")


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, type]]:
    """(dotted key, field, the section class holding it) of every leaf key of a config class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, cls


def bounds(cls: type) -> list[tuple[str, float, bool, str]]:
    """(key, lowest allowed value, whether the lowest is allowed, what the value means) of every key of
    ``cls`` with a range (:func:`mimco.config.setting`'s ``min`` / ``above``)."""
    return [(k, f.metadata["low"], f.metadata["inclusive"], f.metadata["what"]) for k, f, _ in walk(cls)
            if "low" in f.metadata]


def fixed_keys(cls: type) -> list[str]:
    """The keys of ``cls`` a resumed run cannot change: ``method``, the fields marked ``fixed`` and every
    field of a section marked ``FIXED_ON_RESUME`` (the data order, the step count, the model's shape or
    the optimiser state depend on them)."""
    return [k for k, f, sec in walk(cls) if k == "method" or f.metadata.get("fixed") or
            getattr(sec, "FIXED_ON_RESUME", False)]


def _sections(cfg: Any) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield f.name, value


def validate(cfg: Any, model_keys: bool = True) -> None:
    """Refuse values no run can use (a zero batch, a negative schedule): a :class:`MimcoError` naming the key and the
    valid range. Keys a config class does not have are skipped. ``model_keys=False``: the commands that evaluate a
    backbone from a checkpoint (its own geometry), for which the ``model`` and ``mask`` sections mean nothing."""
    for key, low, inclusive, what in bounds(type(cfg)):
        obj = attrgetter(key)(cfg)
        if not isinstance(obj, bool) and (obj < low or (obj == low and not inclusive)):
            need = f">= {low}" if inclusive else f"> {low}"
            raise MimcoError(f"{key}={obj} is out of range: it is {what} and must be {need}; fix the value in the "
                             "config or the override")
    for _, section in _sections(cfg):  # a section's own rules across its keys (a method's, e.g. MimCo's loss)
        if hasattr(section, "check"):
            section.check()
    d = getattr(cfg, "data", None)
    if d is not None and d.labels_fraction > 1:
        raise MimcoError(f"data.labels_fraction={d.labels_fraction:g} is out of range: it is a fraction of each "
                         "class's images and must lie in (0, 1], e.g. 0.01 for 1 %")
    if d is not None and d.labels_per_class and d.labels_fraction:
        raise MimcoError("data.labels_per_class and data.labels_fraction are both set; choose one")
    if d is not None and (d.labels_per_class or d.labels_fraction) and getattr(cfg, "STAGE", "") != "finetune":
        raise MimcoError("data.labels_per_class / data.labels_fraction choose labels for classification fine-tuning "
                         "(mimco finetune); this stage uses none: drop them here (the probes take --per-class)")
    t = getattr(cfg, "train", None)
    if t is not None and t.compile and t.strategy == "fsdp" and t.compile_mode in ("reduce-overhead", "max-autotune"):
        raise MimcoError(f"train.compile_mode={t.compile_mode} records CUDA graphs, which FSDP2's parameter gathers "
                         "and hooks do not run in; with train.strategy=fsdp use train.compile_mode=default or "
                         "max-autotune-no-cudagraphs")
    mask = getattr(cfg, "mask", None)
    if mask is not None and not 0.0 < mask.ratio < 1.0:
        raise MimcoError(f"mask.ratio={mask.ratio} is out of range: it must lie between 0 and 1 (exclusive)")
    if t is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise MimcoError(f"unknown train.device '{t.device}'; choose auto, cpu, cuda or cuda:N")
    if model_keys:
        _model_rules(cfg)
    _data_rules(cfg)
    _segmentation_rules(cfg, model_keys)
    if t is not None and (t.keep_last == 0 or t.keep_last < -1):
        raise MimcoError(f"train.keep_last={t.keep_last} is out of range: it is how many epoch snapshots to keep "
                         "(>= 1, or -1 for all); for no snapshots set train.keep_every_epochs=0")
    if t is not None and t.wandb and importlib.util.find_spec("wandb") is None:
        raise MimcoError(f"train.wandb={t.wandb} needs the wandb package, which is not installed: pip install wandb "
                         "(or drop train.wandb)")


def _model_rules(cfg: Any) -> None:
    """The ViT's shape: heads divide the width, patches tile the image, mask units tile the grid."""
    m, d = getattr(cfg, "model", None), getattr(cfg, "data", None)
    if m is None or d is None:
        return
    dim, _, heads = PRESETS[m.arch]
    dim, heads = m.embed_dim or dim, m.num_heads or heads
    if dim % heads:
        raise MimcoError(f"model.embed_dim={dim} is not divisible by model.num_heads={heads}; change one of them")
    if m.pos_embed == "sincos" and dim % 4:
        raise MimcoError(f"model.pos_embed=sincos needs model.embed_dim divisible by 4, got {dim}")
    if d.img_size % m.patch_size:
        raise MimcoError(f"data.img_size={d.img_size} is not divisible by model.patch_size={m.patch_size}; change one "
                         "of them")
    if (mask := getattr(cfg, "mask", None)) is not None:
        if mask.mask_patch_size % m.patch_size:
            raise MimcoError(f"mask.mask_patch_size={mask.mask_patch_size} is not a multiple of model.patch_size="
                             f"{m.patch_size}; set a multiple (or 0 for the patch size)")
        unit, grid = max(mask.mask_patch_size // m.patch_size, 1), d.img_size // m.patch_size
        if grid % unit:
            raise MimcoError(f"the {grid}x{grid} patch grid does not split into mask units of {unit}x{unit} patches "
                             "(mask.mask_patch_size / model.patch_size); choose a mask.mask_patch_size that tiles it")


def _data_rules(cfg: Any) -> None:
    """Which data keys apply to which datasets."""
    if (d := getattr(cfg, "data", None)) is None:
        return
    if d.decode == "gpu" and (d.name in IN_MEMORY or d.cache or d.on_device):
        other = "data.cache=true" if d.cache else "data.on_device=true" if d.on_device else d.name
        raise MimcoError(f"data.decode=gpu decodes image files on the device; it does not apply to {other}: "
                         "set data.decode=cpu")
    if d.cache and d.name in IN_MEMORY:
        raise MimcoError(f"data.cache=true decodes an image folder once; {d.name} is already in memory: drop it")
    finetune = hasattr(cfg, "classifier")
    if d.on_device and not finetune and d.name not in IN_MEMORY and not d.cache:
        raise MimcoError(f"data.on_device=true needs an in-memory dataset ({', '.join(IN_MEMORY)}) or an image "
                         f"folder with data.cache=true, not '{d.name}'; set one of them")
    if finetune and d.decode == "gpu":
        raise MimcoError("data.decode=gpu decodes for pre-training's batched views; fine-tuning's per-image recipe "
                         "decodes in the loader: set data.decode=cpu (data.on_device=true moves its normalisation "
                         "and random erasing to the device)")
    if finetune and d.name == "folder":
        raise MimcoError("fine-tuning needs labels: use data.name=imagefolder (class sub-folders), not folder")
    if d.shuffle_buffer < 0:
        raise MimcoError(f"data.shuffle_buffer={d.shuffle_buffer} must be 0 (a uniform shuffle) or a window size")
    only = [("data.val_root", d.val_root != "", ("shards", "hf")), ("data.shuffle_buffer", d.shuffle_buffer != 0,
            ("shards",)), ("data.image_column", d.image_column != "image", ("hf",)),
            ("data.label_column", d.label_column != "label", ("hf",))]
    for key, set_, names in only:
        if set_ and d.name not in names:
            raise MimcoError(f"{key} applies to data.name={' or '.join(names)}, not {d.name}: drop it")


def _segmentation_rules(cfg: Any, training: bool) -> None:
    """Segmentation data only where masks are used, and the scene and head keys in range."""
    d, seg = getattr(cfg, "data", None), getattr(cfg, "seg", None)
    if d is None:
        return
    if seg is None:
        if training and d.name == "segfolder":
            raise MimcoError(f"data.name={d.name} is segmentation data (images with masks): use it with `mimco "
                             "segprobe` or `mimco segfinetune`")
        return
    if d.name not in SEGMENTATION:
        raise MimcoError(f"data.name={d.name} has no masks; segmentation takes data.name=segfolder (with data.root) or "
                         "fmnist_scenes")
    for key in ("cache", "on_device"):
        if getattr(d, key):
            raise MimcoError(f"data.{key}=true does not apply to segmentation, whose (image, mask) pairs are read and "
                             f"augmented together in loader workers; drop it")
    if d.decode == "gpu":
        raise MimcoError("data.decode=gpu does not apply to segmentation (image and mask are augmented together in "
                         "loader workers); set data.decode=cpu")
    if len(seg.items) != 2 or not 1 <= seg.items[0] <= seg.items[1]:
        raise MimcoError(f"seg.items={seg.items} must be [fewest, most] items per scene with 1 <= fewest <= most, e.g. "
                         "[2, 4]")
    if seg.threshold > 254:
        raise MimcoError(f"seg.threshold={seg.threshold} is out of range: it is an intensity and must lie in 0..254")
    if seg.num_classes > 255:
        raise MimcoError(f"seg.num_classes={seg.num_classes} is out of range: masks hold 8-bit class indices with 255 "
                         "for ignored pixels, so at most 255 classes")
    if d.name == "fmnist_scenes" and d.img_size < 28:
        raise MimcoError(f"data.img_size={d.img_size} cannot hold a 28-px Fashion-MNIST item; fmnist_scenes needs "
                         "data.img_size >= 28 (56 by default)")
    aug = getattr(cfg, "aug", None)
    if aug is not None and not aug.min_scale <= aug.max_scale <= 1:
        raise MimcoError(f"aug.min_scale={aug.min_scale:g} and aug.max_scale={aug.max_scale:g} must satisfy 0 < min "
                         "<= max <= 1")
    head = getattr(cfg, "head", None)
    if head is not None and (head.layer_decay > 1 or head.drop_path_rate >= 1):
        raise MimcoError(f"head.layer_decay={head.layer_decay:g} must lie in (0, 1] and head.drop_path_rate="
                         f"{head.drop_path_rate:g} in [0, 1)")


def check_resume(saved: dict, cfg: Any) -> None:
    """Refuse overrides a resume cannot honour (``saved``: the checkpoint's config as a dict; keys
    it does not have, from an older mimco, are not compared): the :func:`fixed_keys`, then each
    section's own ``check_resume`` (MimCo's ``loss:``)."""
    for key in fixed_keys(type(cfg)):
        a, b = saved, attrgetter(key)(cfg)
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
        if a is not None and b is not None and a != b:
            raise MimcoError(f"{key} cannot change on resume (the checkpoint has {a!r}, now {b!r}): the data order, "
                             "the step count or the saved state depend on it; drop the override, or start a new "
                             "run with another train.name")
    for name, section in _sections(cfg):
        if hasattr(section, "check_resume") and isinstance(saved.get(name), dict):
            section.check_resume(saved[name])
