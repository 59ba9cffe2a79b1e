"""``mimco teacher | pretrain | eval | demo``.

User errors (:class:`~mimco.errors.MimcoError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mimco.errors import MimcoError

BUNDLED = Path(__file__).resolve().parent.parent / "configs"


def config_path(name: str | None) -> str | None:
    """A config file path, or the name of a bundled config (``fmnist_teacher``)."""
    if not name or Path(name).is_file():
        return name
    bundled = BUNDLED / (name if name.endswith(".yaml") else name + ".yaml")
    return str(bundled) if bundled.is_file() else name


def _train(stage: str, args: argparse.Namespace) -> int:
    from mimco.config import apply_overrides, from_dict, load_config
    from mimco.engine.checkpoint import find_last, load_checkpoint
    from mimco.pipeline import STAGES, run_stage

    cls = STAGES[stage]
    resume, run_dir = None, None
    if args.resume:
        if args.resume == "auto":
            cfg = load_config(cls, config_path(args.config), args.overrides)
            if not cfg.train.name:
                raise MimcoError("--resume auto needs the run's folder: set train.name=<run name> (and train.out_dir)")
            path = find_last(Path(cfg.train.out_dir) / cfg.train.name)
        else:
            path = Path(args.resume)
        resume = load_checkpoint(path)
        if resume["stage"] != stage:
            raise MimcoError(f"{path} is a '{resume['stage']}' checkpoint; resume it with `mimco {resume['stage']}`")
        cfg = from_dict(cls, resume["config"])
        cfg.train.max_steps = 0  # continue to the end of the schedule unless told otherwise below
        cfg = apply_overrides(cfg, args.overrides)
        run_dir = path.parent
    else:
        cfg = load_config(cls, config_path(args.config), args.overrides)
    summary = run_stage(stage, cfg, resume, run_dir)
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mimco.config import apply_overrides
    from mimco.pipeline import evaluate, load_backbone, setup

    model, _, cfg = load_backbone(args.checkpoint)
    cfg = apply_overrides(cfg, args.overrides)
    device = setup(cfg)
    print(json.dumps(evaluate(model.to(device), cfg, device, linear=not args.no_linear), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mimco.cli.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimco", description="MimCo pre-training: MoCo v3 teacher, then masked image modeling against it.")
    sub = p.add_subparsers(dest="command", required=True)
    for stage, text in (("teacher", "stage 1: train a MoCo v3 contrastive teacher"),
                        ("pretrain", "stage 2: MimCo pre-training against a frozen teacher")):
        s = sub.add_parser(stage, help=text, description=text)
        s.add_argument("--config", help="YAML config file (or the name of a bundled one, e.g. fmnist_%s)" % stage)
        s.add_argument("--resume", help="a last.pt to continue, or 'auto' for train.out_dir/train.name/last.pt")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=10")
    e = sub.add_parser("eval", help="k-NN and linear probe of a checkpoint's backbone on its dataset's test split")
    e.add_argument("checkpoint")
    e.add_argument("--no-linear", action="store_true", help="k-NN only")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    d = sub.add_parser("demo", help="stage 1, stage 2 and evaluation on Fashion-MNIST (about 15 min on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); finished stages are reused")
    d.add_argument("--quick", action="store_true", help="a 1-minute version on 6k images (checks the machinery only)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("teacher", "pretrain"):
            return _train(args.command, args)
        if args.command == "eval":
            return _eval(args)
        return _demo(args)
    except MimcoError as e:
        print(f"mimco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
