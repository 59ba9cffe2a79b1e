"""``mimco teacher | pretrain | eval | export | inspect | shards | demo``, and the evaluation commands of
:mod:`mimco.cli.evaluate` (``knn | linprobe | finetune | plot | results``).

User errors (:class:`~mimco.errors.MimcoError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mimco.errors import MimcoError, message


def _train(stage: str, args: argparse.Namespace) -> int:
    from mimco.distributed import is_main
    from mimco.pipeline import open_run, run_stage

    cfg, resume, run_dir = open_run(stage, args.config, args.overrides, args.resume)
    summary = run_stage(stage, cfg, resume, run_dir)
    if not is_main():  # under torchrun every process returns the summary; one prints it
        return 0
    print(json.dumps(summary, indent=2))
    if "stopped_by" in summary:
        print(f"mimco: stopped by {summary['stopped_by']} at step {summary['step']}/{summary['total_steps']}; "
              f"checkpoint written. Resume with:\n  mimco {stage} --resume {summary['checkpoint']}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mimco.config import PretrainConfig, apply_overrides, load_config
    from mimco.distributed import is_main
    from mimco.models.formats import load_backbone
    from mimco.pipeline import evaluate, setup

    model, state = load_backbone(args.checkpoint, args.encoder)
    if state.config is not None and not args.config:
        cfg = apply_overrides(state.config, args.overrides, model_keys=False)
    else:  # an external checkpoint: the data comes from --config / overrides
        cfg = load_config(PretrainConfig, args.config, args.overrides, model_keys=False)
    if model.patch_embed.img_size[0] != cfg.data.img_size:  # its position table resampled to the data's side
        model, state = load_backbone(args.checkpoint, args.encoder, cfg.data.img_size)
    device = setup(cfg, model_keys=False)
    metrics = evaluate(model.to(device), cfg, device, linear=not args.no_linear)  # each process extracts its share
    if is_main():  # the main process scored; one row, one print
        from mimco.cli.evaluate import _out_dir, _row
        from mimco.eval.results import write_result
        from mimco.runs import CHECKPOINT

        path = Path(args.checkpoint)
        name = f"{path.parent.name}/{path.name}" if path.name == CHECKPOINT else path.name
        write_result(_out_dir(args, args.checkpoint), _row("eval", args.checkpoint, name, state, cfg, metrics,
                                                            linear=not args.no_linear))
        print(json.dumps(metrics, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from mimco.models.export import export_checkpoint

    out, said = export_checkpoint(args.checkpoint, args.out, args.encoder)
    print(f"wrote {out}/ (model.safetensors, config.json, README.md; mean/std: {said}); load with:\n"
          f"  timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mimco.models.families import describe
    from mimco.models.formats import load_backbone
    from mimco.models.teachers import projector_width

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


#: ``mimco demo --quick``: 6k images, 2 epochs a stage, fewer scenes (checks the machinery only)
QUICK = ["data.subset=6000", "optim.epochs=2", "optim.warmup_epochs=0.5", "segprobe.scenes=500",
         "segprobe.val_scenes=200"]


def _study(args: argparse.Namespace) -> int:
    """``mimco study SPEC`` and ``mimco demo`` (the bundled spec ``demo``): a stop prints the command that resumes."""
    import shlex

    from mimco.pipeline import StageStopped
    from mimco.studies import load_spec, run_study, with_overrides

    demo = args.command == "demo"
    spec = load_spec("demo" if demo else args.spec)
    if not demo and args.seeds:
        spec.seeds = [int(v) for v in args.seeds.split(",")]
    over = [*(QUICK if demo and args.quick else []), *([f"train.threads={args.threads}"] if args.threads else []),
            *getattr(args, "overrides", [])]
    out = Path(args.out or f"runs/{spec.name}")
    try:
        run_study(with_overrides(spec, over), out, quick=demo and args.quick)
    except StageStopped as e:
        again = (["mimco", "demo", "--out", str(out), *(["--quick"] if args.quick else [])] if demo
                 else ["mimco", "study", args.spec, "--out", str(out), *(["--seeds", args.seeds] if args.seeds else []),
                       *args.overrides])
        again += [f"--threads={args.threads}"] if args.threads else []
        print(f"mimco: {e}; the {args.command} stops here. Resume it with:\n  {shlex.join(again)}", file=sys.stderr)
        return e.exit_code
    return 0


#: the side at which ``mimco shards`` keeps an in-memory set's images (their own), unless data.img_size is given
_NATIVE = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "procedural": 32, "fmnist_scenes": 56}


def _shards(args: argparse.Namespace) -> int:
    from mimco.config import PretrainConfig, load_config
    from mimco.config_rules import IN_MEMORY
    from mimco.data.build import class_names, load_dataset
    from mimco.data.files import FileImages
    from mimco.data.shards import parse_size, write_shards

    size = parse_size(args.shard_size)
    given = {o.split("=", 1)[0] for o in args.overrides}
    if args.source in IN_MEMORY:
        base = [f"data.name={args.source}"]
        if "data.img_size" not in given:
            base.append(f"data.img_size={_NATIVE[args.source]}")
    elif Path(args.source).is_dir():
        root = Path(args.source)
        split_root = root / args.split if (root / "train").is_dir() else root
        labelled = split_root.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in split_root.iterdir())
        base = [f"data.name={'imagefolder' if labelled else 'folder'}", f"data.root={root}"]
    else:
        raise MimcoError(f"{args.source} is neither a folder of images nor one of {', '.join(IN_MEMORY)}")
    cfg = load_config(PretrainConfig, None, [*base, *args.overrides], model_keys=False)
    ds = load_dataset(cfg.data, train=args.split == "train")
    if ds is None:
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


def handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    """Every subcommand of :func:`build_parser` and the function that runs it."""
    from mimco.cli.evaluate import HANDLERS

    return {"teacher": partial(_train, "teacher"), "pretrain": partial(_train, "pretrain"), "eval": _eval,
            "export": _export, "inspect": _inspect, "demo": _study, "study": _study, "shards": _shards, **HANDLERS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimco",
                                description="MimCo pre-training: MoCo v3 teacher, then masked image modeling against "
                                            "it.")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="a Python file that registers a method (and its config section), e.g. examples/simsiam.py; "
                        "may come anywhere on the line, and more than once (installed plugins load by themselves)")
    sub = p.add_subparsers(dest="command", required=True)
    for stage, text in (("teacher", "stage 1: train a MoCo v3 contrastive teacher"),
                        ("pretrain", "stage 2: MimCo pre-training against a frozen teacher")):
        s = sub.add_parser(stage, help=text, description=text)
        s.add_argument("--config", help=f"YAML config file (or the name of a bundled one, e.g. fmnist_{stage})")
        s.add_argument("--resume", help="a last.pt to continue, or 'auto' for train.out_dir/train.name/last.pt")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=10")
    e = sub.add_parser("eval", help="k-NN and linear probe of a checkpoint's backbone on its dataset's test split")
    e.add_argument("checkpoint", help="any checkpoint mimco can load (mimco, MoCo v3, DINO, MAE, SimMIM, timm)")
    e.add_argument("--config", help="data settings for an external checkpoint (mimco checkpoints carry their own)")
    e.add_argument("--encoder", default="momentum", help="momentum | base (DINO: momentum = teacher)")
    e.add_argument("--no-linear", action="store_true", help="k-NN only")
    e.add_argument("--out", help="folder for results.jsonl/csv (default: <run>/eval or runs/eval)")
    e.add_argument("overrides", nargs="*", metavar="key=value")
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
    from mimco.cli.evaluate import add_parsers

    add_parsers(sub)
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
    d = sub.add_parser("demo", help="stage 1, stage 2 and evaluation on Fashion-MNIST (about 15 min on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); finished stages are reused")
    d.add_argument("--quick", action="store_true", help="a short version on 6k images (checks the machinery only)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    st = sub.add_parser("study", help="a study spec (YAML, or a bundled name: demo): its runs over seeds, every row "
                                      "scored by its evaluation protocols, one table and the pictures")
    st.add_argument("spec", help="a study spec file (docs/evaluation.md#studies) or a bundled one's name (demo)")
    st.add_argument("--out", help="output folder (default runs/<spec name>); finished runs are reused")
    st.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the spec's)")
    st.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    st.add_argument("overrides", nargs="*", metavar="[RUN:]KEY=VALUE",
                    help="KEY=VALUE for every run, RUN:KEY=VALUE for one, PROTOCOL.key=value for a protocol's option")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as :func:`main` reads it (argparse exits with code 2 on a bad one)."""
    parser = build_parser()
    argv, plugins = _plugin_files(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    args.plugin = [*args.plugin, *plugins]
    # key=value overrides may come after options too (argparse stops collecting positionals at the first option)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _plugin_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--plugin FILE`` / ``--plugin=FILE`` pairs after the subcommand, and those files."""
    rest, files, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--plugin" and i + 1 < len(argv) and i > 0:
            files.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--plugin=") and i > 0:
            files.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest, files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from mimco.plugins import load_file, load_plugins

        load_plugins()
        for path in args.plugin:
            load_file(path)
        return handlers()[args.command](args)
    except MimcoError as e:
        print(f"mimco: error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimco: interrupted", file=sys.stderr)
        return 130
    finally:
        from mimco.distributed import destroy

        destroy()


if __name__ == "__main__":
    raise SystemExit(main())
