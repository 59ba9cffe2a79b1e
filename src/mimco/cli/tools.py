"""``mimco export | inspect | shards | plot | results``: checkpoints out to timm, data to shards,
pictures and tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mimco import distributed as dist
from mimco.cli.checkpoints import at_data_size, data_config, features_of, load_splits, resolve
from mimco.config import PretrainConfig, SegDataConfig, load_config
from mimco.config_rules import IN_MEMORY, SEGMENTATION
from mimco.data.build import class_names, load_dataset
from mimco.data.files import FileImages
from mimco.data.subsets import take
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches
from mimco.eval.results import collect, markdown_table
from mimco.models.export import export_checkpoint
from mimco.models.families import describe
from mimco.models.formats import load_backbone
from mimco.models.teachers import projector_width


def cmd_export(args: argparse.Namespace) -> int:
    out, said = export_checkpoint(args.checkpoint, args.out, args.encoder)
    print(f"wrote {out}/ (model.safetensors, config.json, README.md; mean/std: {said}); load with:\n"
          f"  timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    model, state = load_backbone(args.checkpoint, args.encoder, 0, args.num_heads, args.model)
    a = describe(model)
    n = sum(p.numel() for p in model.parameters())
    proj = projector_width(model)
    kind = "MoCo 3-layer MLP" if state.projector else "image projection"
    prefix = f"{a['prefix_tokens']} prefix token(s)" + (f", {a['reg_tokens']} registers" if a["reg_tokens"] else "")
    stats = (f"mean {[round(v, 4) for v in state.stats[0]]}, std {[round(v, 4) for v in state.stats[1]]} (used as the "
             "teacher's unless teacher.mean/std are set)") if state.stats else "not known: the data's (data.mean/std)"
    lines = [f"file:        {args.checkpoint}",
             f"format:      {state.format}" + (f" -> timm {args.model}" if args.model else ""),
             f"backbone:    {state.source or '(top level)'}  ({n / 1e6:.2f} M parameters, {type(model).__name__})",
             f"arch:        width {a['embed_dim']}, depth {a['depth']}, heads {a['num_heads']}, patch "
             f"{a['patch_size']}, image {a['img_size']} px "
             f"({a['img_size'] // a['patch_size']}x{a['img_size'] // a['patch_size']} grid), "
             f"{a['in_chans']} channels, {prefix}",
             f"projector:   {f'{kind} to {proj}, usable as teacher.image_target=projector' if proj else 'none'}",
             f"statistics:  {stats}",
             "not loaded:  " + (", ".join(f"{g} ({n})" for g, n in state.ignored.items()) or "nothing")]
    print("\n".join(lines))
    return 0


#: the side at which ``mimco shards`` keeps an in-memory set's images (their own), unless data.img_size is given
_NATIVE = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "procedural": 32, "fmnist_scenes": 56}


def cmd_shards(args: argparse.Namespace) -> int:
    from mimco.data.shards import parse_size, write_shards

    size = parse_size(args.shard_size)
    given = {o.split("=", 1)[0] for o in args.overrides}
    if args.source in IN_MEMORY:
        base = [f"data.name={args.source}"]
        if "data.img_size" not in given:
            base.append(f"data.img_size={_NATIVE[args.source]}")
    elif (root := Path(args.source)).is_dir():
        split_root = root / args.split if (root / "train").is_dir() else root
        labelled = split_root.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in split_root.iterdir())
        base = [f"data.name={'imagefolder' if labelled else 'folder'}", f"data.root={root}"]
    else:
        raise MimcoError(f"{args.source} is neither a folder of images nor one of {', '.join(IN_MEMORY)}")
    cfg = load_config(PretrainConfig, None, [*base, *args.overrides], model_keys=False)
    if (ds := load_dataset(cfg.data, train=args.split == "train")) is None:
        raise MimcoError(f"{args.source} has no {args.split} split (a folder needs {args.split}/ beside train/)")
    if isinstance(ds, FileImages):
        classes = ds.classes
    else:
        top = int(ds.labels.max()) if len(ds.labels) else -1
        classes = class_names(cfg.data, ds) or [str(c) for c in range(top + 1)]
    out = Path(args.out)
    index = write_shards(ds, out, f"{args.source}:{args.split}", classes, size, args.prefix or args.split,
                         progress=not args.quiet)
    shards, n = index["shardlist"], sum(s["nsamples"] for s in index["shardlist"])
    skipped = index["mimco"]["unreadable"]
    print(f"wrote {len(shards)} shards, {n} images, {len(classes)} classes to {out}"
          + (f" ({skipped} unreadable images left out)" if skipped else "") + f"; read them with data.name=shards "
          f"data.root={out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mimco.data.segmentation import load_segmentation
    from mimco.eval.plots import attention_figure, curves_figure, denormalize, pca_figure, tsne_figure
    from mimco.eval.segmentation import val_batches
    from mimco.pipeline import setup

    args.overrides = [*args.overrides, *[i for i in args.inputs if "=" in i]]
    args.inputs = [i for i in args.inputs if "=" not in i]
    if args.kind == "curves":
        print(curves_figure(args.inputs, args.out))
        return 0
    resolved = [resolve(s) for s in args.inputs]
    cfg = data_config(PretrainConfig, args, [st for _, _, st in resolved])
    resolved = [at_data_size(r, s, cfg) for r, s in zip(resolved, args.inputs)]
    device = setup(cfg, model_keys=False)
    names = args.names or [n for n, _, _ in resolved]
    if len(names) != len(resolved):
        raise MimcoError(f"--names gives {len(names)} names for {len(resolved)} inputs")
    if args.kind != "tsne" and not dist.is_main():  # one picture, drawn by the main process
        return 0
    rows = [(n, m.to(device)) for n, (_, m, _) in zip(names, resolved) if m is not None]
    if args.kind == "pca":
        if not rows:
            raise MimcoError("plot pca needs a backbone; raw pixels have no patch tokens")
        if cfg.data.name in SEGMENTATION:  # a segmentation split's validation images, else the test split's
            val = load_segmentation(cfg.data, getattr(cfg, "seg", SegDataConfig()), train=False, verbose=False)
            x = next(val_batches(val, cfg.data, min(args.n, 16)))[0].to(device)
        else:
            x = next(eval_batches(load_splits(cfg)[1], cfg.data, min(args.n, 16), device))[0]
        print(pca_figure(rows, x, denormalize(x, cfg.data.mean, cfg.data.std), args.out))
        return 0
    _, test = load_splits(cfg)
    if args.kind == "tsne":
        sub = take(test, torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n])
        panels = []
        for name, (_, model, _) in zip(names, resolved):  # every process its share, gathered to the main one
            got = features_of(model.to(device) if model is not None else None, sub, cfg, device)
            if got is not None:
                panels.append((name, *got))
        if dist.is_main():
            print(tsne_figure(panels, args.out, class_names=class_names(cfg.data, test)))
        return 0
    x, _ = next(iter(eval_batches(test, cfg.data, args.n, device)))
    print(attention_figure(rows, x, denormalize(x, cfg.data.mean, cfg.data.std), args.out))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    table = markdown_table(collect(args.dirs))
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


def add_parsers(sub: Any) -> None:
    x = sub.add_parser("export", help="write a checkpoint's backbone as a timm hub folder (model.safetensors, "
                                      "config.json, model card) that timm.create_model('local-dir:OUT', "
                                      "pretrained=True) reads")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--encoder", default="momentum", help="momentum | base, for MoCo/DINO/teacher checkpoints")
    i = sub.add_parser("inspect", help="print a checkpoint's detected format, architecture and what would be loaded")
    i.add_argument("checkpoint")
    i.add_argument("--encoder", default="momentum", help="momentum | base")
    i.add_argument("--num-heads", type=int, default=0, help="heads count when the format does not fix it")
    i.add_argument("--model", default="", help="a timm model name to load the file into (as teacher.model)")
    w = sub.add_parser("shards", help="write a split as WebDataset tar shards (KEY.jpg/.png + KEY.cls) and their "
                                      "index.json, for data.name=shards")
    w.add_argument("source", help="an image folder (class sub-folders, optionally under train/ and val/) or "
                                  "fashion_mnist | cifar10 | cifar100 | procedural")
    w.add_argument("--out", required=True, help="a new (or interrupted) folder for the shards and index.json")
    w.add_argument("--split", default="train", choices=["train", "val"], help="which split (default train)")
    w.add_argument("--shard-size", default="1G", help="about this many bytes a shard (default 1G)")
    w.add_argument("--prefix", default="", help="shard names PREFIX-000000.tar (default: the split)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.add_argument("overrides", nargs="*", metavar="key=value", help="data settings, e.g. data.root=... for "
                                                                     "fashion_mnist")
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


HANDLERS = {"export": cmd_export, "inspect": cmd_inspect, "shards": cmd_shards, "plot": cmd_plot,
            "results": cmd_results}
