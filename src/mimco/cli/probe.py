"""``mimco eval | probe | knn | linprobe | segprobe | extract``: a frozen backbone scored or read out,
each result a row of ``results.jsonl`` / ``results.csv`` (:mod:`mimco.cli.checkpoints` reads the
backbone and its data)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mimco import distributed as dist
from mimco.cli.checkpoints import (
    at_data_size,
    backbone_options,
    data_config,
    features_of,
    few_labels,
    out_dir,
    prepare,
    report,
    resolve,
    seg_config,
)
from mimco.config import PretrainConfig, parse_override, to_dict
from mimco.data.build import load_dataset
from mimco.data.subsets import labelled_subset
from mimco.errors import MimcoError
from mimco.eval.knn import knn_accuracies
from mimco.eval.linear import DEFAULT_LR_GRID, linear_probe, linear_probe_full
from mimco.eval.probe import probe_few_labels, spread_metrics


def cmd_eval(args: argparse.Namespace) -> int:
    return _run_protocols(args, "eval", ["knn"] if args.no_linear else ["knn", "linear"], {},
                          ("data", "eval", "train"), batch_size=512, linear=not args.no_linear)


def _run_protocols(args: argparse.Namespace, command: str, names: list[str], chosen: dict[str, Any],
                   sections: tuple[str, ...] = (), batch_size: int = 256, **extra: Any) -> int:
    """Protocols ``names`` (``chosen``: their options) on the backbone of ``args.checkpoint``, features
    extracted once; one results row (``extra``: its settings) and one print, by the main process."""
    from mimco.eval.protocols import Probe, run_protocols

    name, model, state, cfg, device, train, test = prepare(args, sections)
    probe = Probe(model, cfg.data, (train, test), cfg.eval, device, cfg.train.precision, cfg.train.seed,
                  batch_size=batch_size)
    metrics = run_protocols(names, probe, chosen or None)
    if dist.is_main():  # the main process scored
        report(out_dir(args, args.checkpoint), command, args.checkpoint, name, state, cfg, metrics,
               eval=to_dict(cfg.eval), **extra)
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from mimco.eval.monitor import monitor_splits

    few = few_labels(args)
    if few and args.monitor:
        raise MimcoError("--monitor scores the run's fixed monitor subsets; it does not combine with --per-class / "
                         "--labels-fraction")
    name, model, state, cfg, device, train, test = prepare(args)
    subsets: dict[str, Any] = {}
    if args.monitor:  # the k-NN monitor's subsets (eval.monitor_* of the checkpoint's config, then overrides)
        train, test = monitor_splits(train, test, cfg.eval)
        subsets = {"monitor": {k: getattr(cfg.eval, k) for k in ("monitor_train", "monitor_test", "monitor_seed")}}
    fte, yte = features_of(model, test, cfg, device, args.pool) or (None, None)
    if few:
        values = probe_few_labels(model, train, fte, yte, cfg.data, device, args.per_class, args.labels_fraction,
                                  tuple(few["label_seeds"]), tuple(args.k), args.temperature, None, args.pool)
        if not dist.is_main():  # its shares are with the main process, which scores and writes
            return 0
        metrics = spread_metrics(values)
    else:
        bank = features_of(model, train, cfg, device, args.pool)
        if bank is None or fte is None or yte is None:
            return 0
        accs = knn_accuracies(bank[0].to(device), bank[1], fte, yte, args.k, args.temperature)  # on the device
        metrics = {f"knn{k}_top1": round(v, 2) for k, v in accs.items()}
    report(out_dir(args, args.checkpoint), "knn", args.checkpoint, name, state, cfg, metrics, k=args.k,
           temperature=args.temperature, pool=args.pool, **few, **subsets)
    return 0


def cmd_linprobe(args: argparse.Namespace) -> int:
    few = few_labels(args)
    name, model, state, cfg, device, train, test = prepare(args)
    if args.full and model is None:
        raise MimcoError("--full needs a model; raw pixels have no backbone to run")
    fte, yte = features_of(model, test, cfg, device, args.pool) or (None, None)
    opts = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                seed=cfg.train.seed, optimizer=args.optimizer)
    start = time.perf_counter()
    if few and not args.full:
        values = probe_few_labels(model, train, fte, yte, cfg.data, device, args.per_class, args.labels_fraction,
                                  tuple(few["label_seeds"]), ks=(), linear=opts, pool=args.pool).get("linear_top1", [])
    elif args.full and (fte is None or yte is None):  # --full trains through the backbone on the main process alone
        return 0
    elif args.full:  # once per labelled subset, else on the whole split
        values = [linear_probe_full(model, (labelled_subset(train, args.per_class, args.labels_fraction, seed) if few
                                            else train), fte, yte, cfg.data, device, pool=args.pool,
                                    augment=args.augment, **{**opts, "seed": opts["seed"] + seed})
                  for seed in few.get("label_seeds", [0])]
    else:
        bank = features_of(model, train, cfg, device, args.pool)
        if bank is None:
            return 0
        values = [linear_probe(*[t.to(device) for t in (bank[0], bank[1], fte, yte)], **opts)]  # on the device
    if not dist.is_main():
        return 0
    metrics = (spread_metrics({"linear_top1": values}) if few
               else {"linear_top1": round(values[0], 2), "linear_lr": values[0].lr})  # the lr the grid chose
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    report(out_dir(args, args.checkpoint), "linprobe", args.checkpoint, name, state, cfg, metrics,
           path="full" if args.full else "fast", augment=args.augment, pool=args.pool,
           chosen_lr=[v.lr for v in values], **opts, **few)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from mimco.eval.protocols import get_protocol, protocol_options

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
    return _run_protocols(args, "probe", names, options, protocols=names,
                          options={n: to_dict(o) for n, o in options.items() if o is not None})


def cmd_segprobe(args: argparse.Namespace) -> int:
    from mimco.data.segmentation import load_segmentation
    from mimco.eval.plots import segmentation_figure
    from mimco.eval.segmentation import check_backbone, segprobe
    from mimco.pipeline import setup

    name, model, state = resolve(args.checkpoint, args.encoder, args.num_heads)
    check_backbone(model, args.layers, args.checkpoint)
    cfg = seg_config(args, state)
    name, model, state = at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
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
    values, heads = segprobe(model, train, val, cfg.data, device, args.layers, patch, args.epochs, args.batch_size,
                             args.lr, args.weight_decay, tuple(range(args.seeds)), cfg.train.precision,
                             cfg.aug if args.augment else None, cache=False if args.augment else None)
    if not dist.is_main():  # its share of the grids is with the main process, which trains and scores
        return 0
    metrics = spread_metrics({k: v for k, v in values.items() if isinstance(v, list)})
    metrics.update({k: v for k, v in values.items() if k.startswith("position_")})  # one figure, no seeds
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    out = out_dir(args, args.checkpoint)
    report(out, "segprobe", args.checkpoint, name, state, cfg, metrics, layers=args.layers, epochs=args.epochs,
           lr=args.lr, batch_size=args.batch_size, seeds=args.seeds, augment=args.augment, path=values["path"],
           seg=to_dict(cfg.seg))
    picture = segmentation_figure(model, heads[0], val, cfg.data, device, out / "segprobe.png", args.layers, patch,
                                  names=getattr(val, "classes", None))
    print(f"mimco: wrote {out / 'results.jsonl'} and {picture}", file=sys.stderr)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from mimco.eval.extract import check_out, stream_features
    from mimco.pipeline import setup

    out = check_out(args.out)
    name, model, state = resolve(args.checkpoint, args.encoder, args.num_heads)
    if model is None:
        raise MimcoError("mimco extract needs a backbone; raw pixels have no features to extract")
    cfg = data_config(PretrainConfig, args, [state])
    name, model, state = at_data_size((name, model, state), args.checkpoint, cfg, args.encoder, args.num_heads)
    device = setup(cfg, model_keys=False)
    if (split := load_dataset(cfg.data, train=args.split == "train")) is None:
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


def add_parsers(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="a checkpoint, random:CKPT or pixels")
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

    e = sub.add_parser("eval", help="k-NN and linear probe of a checkpoint's backbone on its dataset's test split "
                                    "(the protocols knn and linear, with the run's own data, eval and train keys)")
    e.add_argument("checkpoint", help="any checkpoint mimco can load (mimco, MoCo v3, DINO, MAE, SimMIM, timm)")
    backbone_options(e, "data settings for an external checkpoint (mimco checkpoints carry their own)")
    e.add_argument("--no-linear", action="store_true", help="k-NN only")
    e.add_argument("--out", help="folder for results.jsonl/csv (default: <run>/eval or runs/eval)")
    e.add_argument("overrides", nargs="*", metavar="key=value")
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
    lp.add_argument("--full", action="store_true", help="run every batch through the backbone (else features once)")
    lp.add_argument("--augment", action="store_true", help="with --full: random-resized-crop + flip")
    lp.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"])
    lp.add_argument("--epochs", type=int, default=30)
    lp.add_argument("--batch-size", type=int, default=1024)
    lp.add_argument("--lr", type=float, nargs="+", default=list(DEFAULT_LR_GRID),
                    help="one learning rate, or a grid trained in one pass and chosen on a held-out 10%% of the "
                         "training split (default: 0.001 .. 1.0 in 1-2-5 steps)")
    lp.add_argument("--weight-decay", type=float, default=0.0)
    common(lp)
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


HANDLERS = {"eval": cmd_eval, "probe": cmd_probe, "knn": cmd_knn, "linprobe": cmd_linprobe, "segprobe": cmd_segprobe,
            "extract": cmd_extract}
