"""The one way the commands read a backbone for evaluation or fine-tuning: a checkpoint (any format
:mod:`mimco.models.formats` reads), ``random:PATH`` or ``pixels``, with its data keys (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from mimco.config import PretrainConfig, SegmentationConfig, apply_overrides, from_dict, load_config, to_dict
from mimco.data.build import load_dataset
from mimco.errors import MimcoError
from mimco.eval.features import extract_features_distributed
from mimco.eval.results import file_hash, write_result
from mimco.models.export import timm_kwargs
from mimco.models.formats import load_backbone
from mimco.runs import CHECKPOINT, CONFIG


def resolve(spec: str, encoder: str = "momentum", num_heads: int = 0,
             img_size: int = 0) -> tuple[str, torch.nn.Module | None, Any]:
    """(display name, model or None for pixels, parsed checkpoint state or None); ``img_size``: the
    backbone at that side (its position table resampled), 0 = its own."""
    if spec == "pixels":
        return "raw pixels", None, None
    if spec.startswith("random:"):
        shaped, state = load_backbone(spec[len("random:"):], encoder, img_size, num_heads)
        torch.manual_seed(0)
        return "random-init ViT", VisionTransformer(**timm_kwargs(shaped)), state  # timm's fresh initialisation
    model, state = load_backbone(spec, encoder, img_size, num_heads)
    p = Path(spec)
    return (p.parent.name + "/" + p.name if p.name == CHECKPOINT else p.name), model, state


def data_config(cls: type, args: argparse.Namespace, states: list[Any], sections: tuple[str, ...] = ("data",)) -> Any:
    """The data keys (and the other ``sections``): from ``--config``, else the first mimco
    checkpoint's, then the overrides. Probes take their backbone from a checkpoint: the ``model``
    keys are not theirs to check."""
    model_keys = cls.STAGE == "finetune"
    saved = next((st.config for st in states if st is not None and st.config is not None), None)
    if args.config or saved is None:
        return load_config(cls, args.config, args.overrides, model_keys=model_keys)
    cfg, saved = cls(), from_dict(type(saved), to_dict(saved))
    for section in sections:
        if hasattr(saved, section):
            setattr(cfg, section, getattr(saved, section))
    return apply_overrides(cfg, args.overrides, model_keys=model_keys)


def at_data_size(resolved: tuple[str, torch.nn.Module | None, Any], spec: str, cfg: Any, encoder: str = "momentum",
                  num_heads: int = 0) -> tuple[str, torch.nn.Module | None, Any]:
    """``resolved`` again at ``data.img_size`` when the backbone was trained at another side."""
    model = resolved[1]
    if model is None or model.patch_embed.img_size[0] == cfg.data.img_size:
        return resolved
    return resolve(spec, encoder, num_heads, cfg.data.img_size)


def out_dir(args: argparse.Namespace, spec: str) -> Path:
    if args.out:
        return Path(args.out)
    p = Path(spec.split(":", 1)[-1])
    return p.parent / "eval" if (p.parent / CONFIG).is_file() else Path("runs") / "eval"


def report(out: Path, command: str, spec: str, name: str, state: Any, cfg: Any, metrics: dict[str, Any],
           shown: dict[str, Any] | None = None, **extra: Any) -> None:
    """A command's row of ``out/results.jsonl`` (and .csv): its ``metrics`` and settings (``extra``),
    with the checkpoint's hash; then ``shown`` (default: the metrics) printed as JSON."""
    path = spec.split(":", 1)[-1]
    write_result(out, {"command": command, "name": name, "checkpoint": spec,
                       "sha256": file_hash(path) if Path(path).is_file() else "",
                       "format": state.format if state is not None else "", "data": cfg.data.name,
                       "metrics": metrics, "config": {"data": to_dict(cfg.data), **extra}})
    print(json.dumps(metrics if shown is None else shown, indent=2))


def load_splits(cfg: Any) -> tuple[Any, Any]:
    train, test = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    if test is None:
        raise MimcoError(f"data.name={cfg.data.name} at {cfg.data.root or 'its default place'} has no labelled test "
                         "split; use a labelled dataset (imagefolder with train/ and val/)")
    return train, test


def prepare(args: argparse.Namespace, sections: tuple[str, ...] = ()) -> tuple[str, torch.nn.Module | None, Any, Any,
                                                                           torch.device, Any, Any]:
    """The common start of the probe commands: (name, model on device, state, config, device, train,
    test); ``sections``: the checkpoint's config sections taken over (default: ``data``, and ``eval``
    for ``--monitor``)."""
    from mimco.pipeline import setup

    name, model, state = resolve(args.checkpoint, args.encoder, args.num_heads)
    sections = sections or (("data", "eval") if getattr(args, "monitor", False) else ("data",))
    cfg = data_config(PretrainConfig, args, [state], sections)
    name, model, state = at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
    device = setup(cfg, model_keys=False)
    train, test = load_splits(cfg)
    return name, (model.to(device) if model is not None else None), state, cfg, device, train, test


def few_labels(args: argparse.Namespace) -> dict[str, Any]:
    """The few-label settings of a probe command ({} for every label): subset size and seeds."""
    if not (args.per_class or args.labels_fraction):
        return {}
    if args.label_seeds < 1:
        raise MimcoError(f"--label-seeds {args.label_seeds} must be at least 1")
    return {"per_class": args.per_class, "labels_fraction": args.labels_fraction,
            "label_seeds": list(range(args.label_seeds))}


def features_of(model: torch.nn.Module | None, split: Any, cfg: Any, device: torch.device,
              pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of ``split`` on the main process, None on the others: under torchrun every
    process extracts its share and the main one gathers them (alone: the whole split)."""
    return extract_features_distributed(model, split, cfg.data, device, batch_size=512, pool=pool)


def seg_config(args: argparse.Namespace, state: Any) -> SegmentationConfig:
    """Segmentation data: ``--config`` or the defaults (fmnist_scenes), with the input statistics
    of the checkpoint (a mimco run's data.channels/mean/std, a released family's mean/std) when no
    ``--config`` is given, then the overrides."""
    cfg = load_config(SegmentationConfig, args.config, [], model_keys=False)
    if not args.config and state is not None:
        if state.config is not None:
            d = state.config.data
            cfg.data.channels, cfg.data.mean, cfg.data.std = d.channels, list(d.mean), list(d.std)
        elif state.stats:
            cfg.data.mean, cfg.data.std = list(state.stats[0]), list(state.stats[1])
    return apply_overrides(cfg, args.overrides, model_keys=False)


def backbone_options(p: argparse.ArgumentParser, config: str = "data settings (else the checkpoint's own, for mimco "
                                                                 "checkpoints)") -> None:
    """The options of every command that reads one backbone from a checkpoint."""
    p.add_argument("--config", help=config)
    p.add_argument("--encoder", default="momentum", help="momentum | base (teacher / MoCo / DINO files)")
    p.add_argument("--num-heads", type=int, default=0, help="heads count when the format does not fix it")
