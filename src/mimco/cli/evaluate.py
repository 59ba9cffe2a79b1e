"""``mimco extract | finetune | linprobe | knn | segprobe | segfinetune | plot | results``.

A model is named by a checkpoint path (any format :mod:`mimco.models.formats` reads),
``random:PATH`` (a randomly initialised ViT shaped like PATH's backbone) or ``pixels`` (raw
pixels; k-NN, linear probe, segmentation probe and t-SNE only). Data settings come from
``--config``, else from the first mimco checkpoint's own config, then ``key=value`` overrides;
segmentation takes its data from ``--config`` or :class:`~mimco.config.SegmentationConfig`'s
defaults (Fashion-MNIST scenes), and only the input statistics (channels, mean, std) from the
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mimco.config import (
    FinetuneConfig,
    PretrainConfig,
    SegmentationConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from mimco.errors import MimcoError
from mimco.eval.probe import spread_metrics
from mimco.runs import CHECKPOINT, CONFIG


def _resolve(spec: str, encoder: str = "momentum", num_heads: int = 0,
             img_size: int = 0) -> tuple[str, torch.nn.Module | None, Any]:
    """(display name, model or None for pixels, parsed checkpoint state or None); ``img_size``: the
    backbone at that side (its position table resampled), 0 = its own."""
    from timm.models.vision_transformer import VisionTransformer

    from mimco.models.export import timm_kwargs
    from mimco.models.formats import load_backbone

    if spec == "pixels":
        return "raw pixels", None, None
    if spec.startswith("random:"):
        shaped, state = load_backbone(spec[len("random:"):], encoder, img_size, num_heads)
        torch.manual_seed(0)
        return "random-init ViT", VisionTransformer(**timm_kwargs(shaped)), state  # timm's fresh initialisation
    model, state = load_backbone(spec, encoder, img_size, num_heads)
    p = Path(spec)
    return (p.parent.name + "/" + p.name if p.name == CHECKPOINT else p.name), model, state


def _data_config(cls: type, args: argparse.Namespace, states: list[Any], sections: tuple[str, ...] = ("data",)) -> Any:
    """The data keys (and the other ``sections``): from ``--config``, else the first mimco
    checkpoint's, then the overrides. Probes take their backbone from a checkpoint: the ``model``
    keys are not theirs to check."""
    probe = cls is not FinetuneConfig
    if args.config:
        return load_config(cls, args.config, args.overrides, model_keys=not probe)
    for st in states:
        if st is not None and st.config is not None:
            cfg, saved = cls(), from_dict(type(st.config), to_dict(st.config))
            for section in sections:
                if hasattr(saved, section):
                    setattr(cfg, section, getattr(saved, section))
            return apply_overrides(cfg, args.overrides, model_keys=not probe)
    return load_config(cls, None, args.overrides, model_keys=not probe)


def _at_data_size(resolved: tuple[str, torch.nn.Module | None, Any], spec: str, cfg: Any, encoder: str = "momentum",
                  num_heads: int = 0) -> tuple[str, torch.nn.Module | None, Any]:
    """``resolved`` again at ``data.img_size`` when the backbone was trained at another side."""
    model = resolved[1]
    if model is None or model.patch_embed.img_size[0] == cfg.data.img_size:
        return resolved
    return _resolve(spec, encoder, num_heads, cfg.data.img_size)


def _out_dir(args: argparse.Namespace, spec: str) -> Path:
    if args.out:
        return Path(args.out)
    p = Path(spec.split(":", 1)[-1])
    return p.parent / "eval" if (p.parent / CONFIG).is_file() else Path("runs") / "eval"


def _row(command: str, spec: str, name: str, state: Any, cfg: Any, metrics: dict[str, Any],
         **extra: Any) -> dict[str, Any]:
    from mimco.eval.results import file_hash

    path = spec.split(":", 1)[-1]
    return {"command": command, "name": name, "checkpoint": spec,
            "sha256": file_hash(path) if Path(path).is_file() else "",
            "format": state.format if state is not None else "", "data": cfg.data.name, "metrics": metrics,
            "config": {"data": to_dict(cfg.data), **extra}}


def _splits(cfg: Any) -> tuple[Any, Any]:
    from mimco.data.build import load_dataset

    train, test = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    if test is None:
        raise MimcoError(f"data.name={cfg.data.name} at {cfg.data.root or 'its default place'} has no labelled test "
                         "split; use a labelled dataset (imagefolder with train/ and val/)")
    return train, test


def _prepare(args: argparse.Namespace) -> tuple[str, torch.nn.Module | None, Any, Any, torch.device, Any, Any]:
    """The common start of knn and linprobe: (name, model on device, state, config, device, train, test)."""
    from mimco.pipeline import setup

    name, model, state = _resolve(args.checkpoint, args.encoder, args.num_heads)
    sections = ("data", "eval") if getattr(args, "monitor", False) else ("data",)
    cfg = _data_config(PretrainConfig, args, [state], sections)
    name, model, state = _at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
    device = setup(cfg, model_keys=False)
    train, test = _splits(cfg)
    return name, (model.to(device) if model is not None else None), state, cfg, device, train, test


def _few(args: argparse.Namespace) -> dict[str, Any]:
    """The few-label settings of a probe command ({} for every label): subset size and seeds."""
    if not (args.per_class or args.labels_fraction):
        return {}
    if args.label_seeds < 1:
        raise MimcoError(f"--label-seeds {args.label_seeds} must be at least 1")
    return {"per_class": args.per_class, "labels_fraction": args.labels_fraction,
            "label_seeds": list(range(args.label_seeds))}


def _features(model: torch.nn.Module | None, split: Any, cfg: Any, device: torch.device,
              pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of ``split`` on the main process, None on the others: under torchrun every
    process extracts its share and the main one gathers them (alone: the whole split)."""
    from mimco.eval.features import extract_features_distributed

    return extract_features_distributed(model, split, cfg.data, device, batch_size=512, pool=pool)


def cmd_knn(args: argparse.Namespace) -> int:
    from mimco import distributed as dist
    from mimco.eval.knn import knn_accuracies
    from mimco.eval.probe import probe_few_labels
    from mimco.eval.results import write_result

    few = _few(args)
    if few and args.monitor:
        raise MimcoError("--monitor scores the run's fixed monitor subsets; it does not combine with --per-class / "
                         "--labels-fraction")
    name, model, state, cfg, device, train, test = _prepare(args)
    subsets: dict[str, Any] = {}
    if args.monitor:  # the k-NN monitor's subsets (eval.monitor_* of the checkpoint's config, then overrides)
        from mimco.eval.monitor import monitor_splits

        train, test = monitor_splits(train, test, cfg.eval)
        subsets = {"monitor": {k: getattr(cfg.eval, k) for k in ("monitor_train", "monitor_test", "monitor_seed")}}
    fte, yte = _features(model, test, cfg, device, args.pool) or (None, None)
    if few:
        values = probe_few_labels(model, train, fte, yte, cfg.data, device, args.per_class, args.labels_fraction,
                                  tuple(few["label_seeds"]), tuple(args.k), args.temperature, None, args.pool)
        if not dist.is_main():  # its shares are with the main process, which scores and writes
            return 0
        metrics = spread_metrics(values)
    else:
        bank = _features(model, train, cfg, device, args.pool)
        if bank is None or fte is None or yte is None:
            return 0
        accs = knn_accuracies(bank[0].to(device), bank[1], fte, yte, args.k, args.temperature)  # on the device
        metrics = {f"knn{k}_top1": round(v, 2) for k, v in accs.items()}
    write_result(_out_dir(args, args.checkpoint), _row("knn", args.checkpoint, name, state, cfg, metrics,
                                                        k=args.k, temperature=args.temperature, pool=args.pool, **few,
                                                        **subsets))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_linprobe(args: argparse.Namespace) -> int:
    from mimco import distributed as dist
    from mimco.data.subsets import labelled_subset
    from mimco.eval.linear import linear_probe, linear_probe_full
    from mimco.eval.probe import probe_few_labels
    from mimco.eval.results import write_result

    few = _few(args)
    name, model, state, cfg, device, train, test = _prepare(args)
    if args.full and model is None:
        raise MimcoError("--full needs a model; raw pixels have no backbone to run")
    fte, yte = _features(model, test, cfg, device, args.pool) or (None, None)
    opts = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                seed=cfg.train.seed, optimizer=args.optimizer)
    start = time.perf_counter()
    if few and not args.full:
        values = probe_few_labels(model, train, fte, yte, cfg.data, device, args.per_class, args.labels_fraction,
                                  tuple(few["label_seeds"]), ks=(), linear=opts, pool=args.pool).get("linear_top1", [])
    elif args.full and (fte is None or yte is None):  # --full trains through the backbone on the main process alone
        return 0
    elif few:  # the full path, once per labelled subset
        values = [linear_probe_full(model, labelled_subset(train, args.per_class, args.labels_fraction, seed), fte, yte,
                                    cfg.data, device, pool=args.pool, augment=args.augment,
                                    **{**opts, "seed": opts["seed"] + seed}) for seed in few["label_seeds"]]
    elif args.full:
        values = [linear_probe_full(model, train, fte, yte, cfg.data, device, pool=args.pool, augment=args.augment,
                                    **opts)]
    else:
        bank = _features(model, train, cfg, device, args.pool)
        if bank is None:
            return 0
        values = [linear_probe(*[t.to(device) for t in (bank[0], bank[1], fte, yte)], **opts)]  # on the device
    if not dist.is_main():
        return 0
    metrics = (spread_metrics({"linear_top1": values}) if few
               else {"linear_top1": round(values[0], 2), "linear_lr": values[0].lr})  # the lr the grid chose
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_result(_out_dir(args, args.checkpoint), _row("linprobe", args.checkpoint, name, state, cfg, metrics,
                                                        path="full" if args.full else "fast", augment=args.augment,
                                                        pool=args.pool, chosen_lr=[v.lr for v in values], **opts,
                                                        **few))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """``mimco probe NAME[,NAME...] CKPT``: registered evaluation protocols on a frozen backbone, the
    features extracted once; ``NAME.key=value`` overrides set a protocol's options."""
    from mimco import distributed as dist
    from mimco.eval.protocols import Probe, get_protocol, protocol_options, run_protocols
    from mimco.eval.results import write_result

    names = [n for n in args.protocols.split(",") if n]
    for n in names:
        get_protocol(n)  # every name known before any data is read
    own: dict[str, dict[str, Any]] = {n: {} for n in names}
    rest = []
    for text in args.overrides:
        keys, value = parse_override(text)
        if keys[0] in own and len(keys) == 2:
            own[keys[0]][keys[1]] = value
        else:
            rest.append(text)
    options = {n: protocol_options(n, own[n]) for n in names}
    args.overrides = rest
    name, model, state, cfg, device, train, test = _prepare(args)
    probe = Probe(model, cfg.data, (train, test), cfg.eval, device, cfg.train.precision, cfg.train.seed)
    metrics = run_protocols(names, probe, options)
    if not dist.is_main():
        return 0
    write_result(_out_dir(args, args.checkpoint),
                 _row("probe", args.checkpoint, name, state, cfg, metrics, protocols=names,
                      options={n: to_dict(o) for n, o in options.items() if o is not None}, eval=to_dict(cfg.eval)))
    print(json.dumps(metrics, indent=2))
    return 0


def _tune(stage: str, args: argparse.Namespace, fresh: Any, section: str, metrics: dict[str, str],
          extra: Any) -> int:
    """``mimco finetune | segfinetune``: the backbone of ``args.checkpoint`` trained by the stage's
    method (``fresh(state)``: a new run's config; ``--resume``: the run's own), its encoder and
    heads from the config's ``section``; a result row with ``metrics`` (row name -> summary key)
    and ``extra(cfg)``."""
    from mimco import distributed as dist
    from mimco.eval.results import write_result
    from mimco.pipeline import open_run, run_stage

    spec = args.checkpoint
    name, model, state = _resolve(spec, "momentum", 0)
    if args.resume:
        cfg, resume, run_dir = open_run(stage, None, args.overrides, args.resume)
    else:
        cfg, resume, run_dir = fresh(state), None, None
    part = getattr(cfg, section)
    if part.encoder != "momentum" or part.num_heads:
        name, model, state = _resolve(spec, part.encoder, part.num_heads)
    if model is None:
        raise MimcoError(f"{stage} trains a backbone; raw pixels have none")
    summary = run_stage(stage, cfg, resume, run_dir, backbone=model)
    if dist.is_main():
        write_result(Path(summary["run_dir"]), _row(stage, spec, name, state, cfg,
                                                    {k: summary.get(v) for k, v in metrics.items()},
                                                    epochs=summary["epochs"], **extra(cfg)))
        print(json.dumps(summary, indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    # the data keys from --config, else from the checkpoint's own config
    return _tune("finetune", args, lambda state: _data_config(FinetuneConfig, args, [state]), "classifier",
                 {"finetune_top1": "top1", "finetune_top5": "top5", "finetune_best_top1": "best_top1"},
                 lambda cfg: {"layer_decay": cfg.classifier.layer_decay})


def _seg_config(args: argparse.Namespace, state: Any, overrides: list[str]) -> SegmentationConfig:
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
    return apply_overrides(cfg, overrides, model_keys=False)


def cmd_segprobe(args: argparse.Namespace) -> int:
    from mimco import distributed as dist
    from mimco.data.segmentation import load_segmentation
    from mimco.eval.plots import segmentation_figure
    from mimco.eval.results import write_result
    from mimco.eval.segmentation import check_backbone, segprobe
    from mimco.pipeline import setup

    name, model, state = _resolve(args.checkpoint, args.encoder, args.num_heads)
    check_backbone(model, args.layers, args.checkpoint)
    cfg = _seg_config(args, state, args.overrides)
    name, model, state = _at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
    if args.seeds < 1:
        raise MimcoError(f"--seeds {args.seeds} must be at least 1")
    if model is None and not args.patch:
        raise MimcoError("raw pixels need --patch P, the side of the patches whose pixels are the features (e.g. the "
                         "model's patch size)")
    patch = args.patch or model.patch_embed.patch_size[0]
    if cfg.data.img_size % patch:
        raise MimcoError(f"data.img_size={cfg.data.img_size} is not a multiple of the patch size {patch}; choose a "
                         "data.img_size that the patches tile")
    device = setup(cfg, model_keys=False)
    train = load_segmentation(cfg.data, cfg.seg, train=True)
    val = load_segmentation(cfg.data, cfg.seg, train=False, verbose=False)
    if model is not None and model.patch_embed.proj.in_channels != cfg.data.channels:
        raise MimcoError(f"the backbone takes {model.patch_embed.proj.in_channels}-channel images but data.channels="
                         f"{cfg.data.channels}; set data.channels={model.patch_embed.proj.in_channels}")
    model = model.to(device) if model is not None else None
    start = time.perf_counter()
    values, heads = segprobe(model, train, val, cfg.data, device, args.layers, patch, args.epochs,
                             args.batch_size, args.lr, args.weight_decay, tuple(range(args.seeds)),
                             cfg.train.precision, cfg.aug if args.augment else None,
                             cache=False if args.augment else None)
    if not dist.is_main():  # its share of the grids is with the main process, which trains and scores
        return 0
    metrics = spread_metrics({k: v for k, v in values.items() if isinstance(v, list)})
    metrics.update({k: v for k, v in values.items() if k.startswith("position_")})  # one figure, no seeds
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    out = _out_dir(args, args.checkpoint)
    write_result(out, _row("segprobe", args.checkpoint, name, state, cfg, metrics, layers=args.layers,
                           epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seeds=args.seeds,
                           augment=args.augment, path=values["path"], seg=to_dict(cfg.seg)))
    picture = segmentation_figure(model, heads[0], val, cfg.data, device, out / "segprobe.png", args.layers, patch,
                                  names=getattr(val, "classes", None))
    print(json.dumps(metrics, indent=2))
    print(f"mimco: wrote {out / 'results.jsonl'} and {picture}", file=sys.stderr)
    return 0


def cmd_segfinetune(args: argparse.Namespace) -> int:
    return _tune("segfinetune", args, lambda state: _seg_config(args, state, args.overrides), "head",
                 {k: k for k in ("miou", "macc", "pixel_acc", "best_miou")},
                 lambda cfg: {"layers": cfg.head.layers, "layer_decay": cfg.head.layer_decay,
                              "seg": to_dict(cfg.seg)})


def _plot_images(cfg: Any, n: int, device: torch.device) -> torch.Tensor:
    """The first ``n`` normalised evaluation images of the data (a segmentation split's validation
    images, or a test split), on ``device``."""
    from mimco.config import SegDataConfig
    from mimco.config_rules import SEGMENTATION

    if cfg.data.name in SEGMENTATION:
        from mimco.data.segmentation import load_segmentation
        from mimco.eval.segmentation import val_batches

        val = load_segmentation(cfg.data, getattr(cfg, "seg", SegDataConfig()), train=False, verbose=False)
        return next(iter(val_batches(val, cfg.data, n)))[0].to(device)
    from mimco.eval.features import eval_batches

    return next(iter(eval_batches(_splits(cfg)[1], cfg.data, n, device)))[0]


def cmd_plot(args: argparse.Namespace) -> int:
    from mimco import distributed as dist
    from mimco.eval.plots import attention_figure, curves_figure, denormalize, tsne_figure
    from mimco.pipeline import setup

    args.overrides = [*args.overrides, *[i for i in args.inputs if "=" in i]]
    args.inputs = [i for i in args.inputs if "=" not in i]
    if args.kind == "curves":
        print(curves_figure(args.inputs, args.out))
        return 0
    resolved = [_resolve(s) for s in args.inputs]
    cfg = _data_config(PretrainConfig, args, [st for _, _, st in resolved])
    resolved = [_at_data_size(r, s, cfg) for r, s in zip(resolved, args.inputs)]
    device = setup(cfg, model_keys=False)
    names = args.names or [n for n, _, _ in resolved]
    if len(names) != len(resolved):
        raise MimcoError(f"--names gives {len(names)} names for {len(resolved)} inputs")
    if args.kind != "tsne" and not dist.is_main():  # one picture, drawn by the main process
        return 0
    if args.kind == "pca":
        from mimco.eval.plots import pca_figure

        rows = [(n, m.to(device)) for n, (_, m, _) in zip(names, resolved) if m is not None]
        if not rows:
            raise MimcoError("plot pca needs a backbone; raw pixels have no patch tokens")
        x = _plot_images(cfg, min(args.n, 16), device)
        print(pca_figure(rows, x, denormalize(x, cfg.data.mean, cfg.data.std), args.out))
        return 0
    _, test = _splits(cfg)
    if args.kind == "tsne":
        from mimco.data.subsets import take

        g = torch.Generator().manual_seed(0)
        sub = take(test, torch.randperm(len(test), generator=g)[: args.n])
        panels = []
        for name, (_, model, _) in zip(names, resolved):  # every process its share, gathered to the main one
            got = _features(model.to(device) if model is not None else None, sub, cfg, device)
            if got is not None:
                panels.append((name, *got))
        if not dist.is_main():
            return 0
        from mimco.data.build import class_names

        print(tsne_figure(panels, args.out, class_names=class_names(cfg.data, test)))
        return 0
    from mimco.eval.features import eval_batches

    x, _ = next(iter(eval_batches(test, cfg.data, args.n, device)))
    rows = [(n, m.to(device)) for n, (_, m, _) in zip(names, resolved) if m is not None]
    print(attention_figure(rows, x, denormalize(x, cfg.data.mean, cfg.data.std), args.out))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from mimco.eval.results import collect, markdown_table

    table = markdown_table(collect(args.dirs))
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


def backbone_options(p: argparse.ArgumentParser, config: str = "data settings (else the checkpoint's own, for mimco "
                                                                 "checkpoints)") -> None:
    """The options of every command that reads one backbone from a checkpoint: ``--config`` (the
    data's settings), ``--encoder`` and ``--num-heads``."""
    p.add_argument("--config", help=config)
    p.add_argument("--encoder", default="momentum", help="momentum | base (teacher / MoCo / DINO files)")
    p.add_argument("--num-heads", type=int, default=0, help="heads count when the format does not fix it")


def add_parsers(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        backbone_options(p)
        p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token or mean of patch tokens")
        p.add_argument("--out", help="folder for results.jsonl/csv (default: <run>/eval or runs/eval)")
        p.add_argument("--per-class", type=int, default=0, metavar="N",
                       help="few labels: train on N labelled images per class (balanced subsets of the training split)")
        p.add_argument("--labels-fraction", type=float, default=0.0, metavar="F",
                       help="few labels: this fraction of each class instead, e.g. 0.01 for 1 %%")
        p.add_argument("--label-seeds", type=int, default=3, metavar="S",
                       help="with --per-class / --labels-fraction: mean and std over subsets 0..S-1 (default 3); "
                            "subset s is the one `mimco finetune data.label_seed=s` uses")
        p.add_argument("overrides", nargs="*", metavar="key=value")

    x = sub.add_parser("extract", help="write a split's CLS, mean-pooled (and patch) features with labels and file "
                                       "names to a .safetensors or .npz file")
    x.add_argument("checkpoint", help="a checkpoint (any format mimco reads) or random:CKPT")
    x.add_argument("--out", required=True, help="the output file, .safetensors or .npz (never overwritten)")
    x.add_argument("--split", default="test", choices=["train", "test"], help="which split (default test)")
    x.add_argument("--patch", action="store_true", help="also every patch token (N, L, D), stored in float16")
    x.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    backbone_options(x)
    x.add_argument("overrides", nargs="*", metavar="key=value", help="data and train keys, e.g. train.precision=bf16")

    k = sub.add_parser("knn", help="weighted k-NN top-1 of frozen features, several k at once")
    k.add_argument("checkpoint", help="a checkpoint, random:CKPT or pixels")
    k.add_argument("--k", type=int, nargs="+", default=[10, 20, 100])
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--monitor", action="store_true",
                   help="score the k-NN monitor's subsets (eval.monitor_train / monitor_test / monitor_seed of the "
                        "checkpoint's run, or overrides): the value its log.csv shows for these weights")
    common(k)
    pr = sub.add_parser("probe", help="registered evaluation protocols (knn, linear, few, a plugin's) on a frozen "
                                      "backbone, features extracted once")
    pr.add_argument("protocols", help="protocol name(s), comma-separated: knn, linear, few or one a plugin registers")
    pr.add_argument("checkpoint", help="a checkpoint, random:CKPT or pixels")
    backbone_options(pr)
    pr.add_argument("--out", help="folder for results.jsonl/csv (default: <run>/eval or runs/eval)")
    pr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="data / eval keys, and a protocol's options as NAME.key=value")
    lp = sub.add_parser("linprobe", help="linear probe (BN without affine + linear) on a frozen backbone")
    lp.add_argument("checkpoint", help="a checkpoint, random:CKPT or pixels")
    lp.add_argument("--full", action="store_true", help="run every batch through the backbone (else features once)")
    lp.add_argument("--augment", action="store_true", help="with --full: random-resized-crop + flip")
    lp.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"])
    lp.add_argument("--epochs", type=int, default=30)
    lp.add_argument("--batch-size", type=int, default=1024)
    lp.add_argument("--lr", type=float, nargs="+",  # mimco.eval.linear.DEFAULT_LR_GRID (not imported here: slow)
                    default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
                    help="one learning rate, or a grid trained in one pass and chosen on a held-out 10%% of the "
                         "training split (default: 0.001 .. 1.0 in 1-2-5 steps)")
    lp.add_argument("--weight-decay", type=float, default=0.0)
    common(lp)
    def tune(name: str, text: str, sections: str) -> None:
        t = sub.add_parser(name, help=text)
        t.add_argument("checkpoint", help="a pre-training checkpoint (any format) or random:CKPT")
        t.add_argument("--config", help=f"YAML with {sections} sections")
        t.add_argument("--resume", help=f"a {name} last.pt to continue")
        t.add_argument("overrides", nargs="*", metavar="key=value")

    tune("finetune", "full fine-tuning (MAE/BEiT recipe: layer decay, RandAugment, mixup/cutmix)",
         "data / aug / classifier / optim / train")
    sp = sub.add_parser("segprobe", help="semantic segmentation on frozen patch tokens (BN + 1x1 conv), mIoU")
    sp.add_argument("checkpoint", help="a checkpoint, random:CKPT or pixels")
    sp.add_argument("--layers", type=int, default=1, help="the last N blocks' patch tokens, concatenated (default 1)")
    sp.add_argument("--epochs", type=int, default=20)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine to 0)")
    sp.add_argument("--weight-decay", type=float, default=1e-4)
    sp.add_argument("--seeds", type=int, default=1, help="heads trained with seeds 0..S-1: mean and std (default 1)")
    sp.add_argument("--augment", action="store_true",
                    help="every batch through the backbone with the joint crop + flip of aug.* (else features once)")
    sp.add_argument("--patch", type=int, default=0, help="pixels: the patch side of the raw-pixel features")
    backbone_options(sp, "segmentation data settings (default: fmnist_scenes)")
    sp.add_argument("--out", help="folder for results.jsonl/csv and segprobe.png (default: <run>/eval or runs/eval)")
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    tune("segfinetune", "segmentation fine-tuning: the linear head with every layer trained",
         "data / seg / aug / head / optim / train")
    pl = sub.add_parser("plot", help="tsne | curves | attention | pca pictures (PNG)")
    pl.add_argument("kind", choices=["tsne", "curves", "attention", "pca"])
    pl.add_argument("inputs", nargs="+",
                    help="checkpoints (tsne, attention; also pixels / random:CKPT) or run folders (curves)")
    pl.add_argument("--out", required=True, help="PNG file to write")
    pl.add_argument("--names", nargs="+", help="panel titles, one per input")
    pl.add_argument("--n", type=int, default=2000, help="test images in the t-SNE (attention, pca: images shown)")
    pl.add_argument("--config", help="data settings (else the first mimco checkpoint's own)")
    pl.set_defaults(overrides=[])
    r = sub.add_parser("results", help="one Markdown table from the results of many runs")
    r.add_argument("dirs", nargs="+", help="folders searched for results.jsonl")
    r.add_argument("--out", help="also write the table to this file")


def cmd_extract(args: argparse.Namespace) -> int:
    from mimco import distributed as dist
    from mimco.data.build import load_dataset
    from mimco.eval.extract import check_out, stream_features
    from mimco.pipeline import setup

    out = check_out(args.out)
    name, model, state = _resolve(args.checkpoint, args.encoder, args.num_heads)
    if model is None:
        raise MimcoError("mimco extract needs a backbone; raw pixels have no features to extract")
    cfg = _data_config(PretrainConfig, args, [state])
    name, model, state = _at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
    device = setup(cfg, model_keys=False)
    split = load_dataset(cfg.data, train=args.split == "train")
    if split is None:
        raise MimcoError(f"data.name={cfg.data.name} at {cfg.data.root or 'its default place'} has no test split; use "
                         "--split train")
    meta = {"checkpoint": args.checkpoint, "format": state.format if state is not None else "", "split": args.split,
            "data": to_dict(cfg.data), "precision": cfg.train.precision}
    got = stream_features(model.to(device), split, cfg.data, device, out, meta, cfg.train.precision, args.patch,
                          args.batch_size, cfg.train.progress)
    if got is None or not dist.is_main():  # not the main process: its share went to the main one
        return 0
    shapes = ", ".join(f"{k} {v}" for k, v in got.items() if k != "names")
    print(f"wrote {out}: {shapes}" + (f", {got['names'][0]} file names" if "names" in got else ""))
    return 0


HANDLERS = {"extract": cmd_extract, "probe": cmd_probe, "knn": cmd_knn, "linprobe": cmd_linprobe,
            "finetune": cmd_finetune, "segprobe": cmd_segprobe, "segfinetune": cmd_segfinetune, "plot": cmd_plot,
            "results": cmd_results}
