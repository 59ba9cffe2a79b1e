"""``mimco teacher | pretrain | finetune | segfinetune | demo | study``: the commands that train."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Any

from mimco import distributed as dist
from mimco.cli.checkpoints import data_config, report, resolve, seg_config
from mimco.config import FinetuneConfig, to_dict
from mimco.errors import MimcoError


def cmd_train(stage: str, args: argparse.Namespace) -> int:
    from mimco.pipeline import open_run, run_stage

    cfg, resume, run_dir = open_run(stage, args.config, args.overrides, args.resume)
    summary = run_stage(stage, cfg, resume, run_dir)
    if not dist.is_main():  # under torchrun every process returns the summary; one prints it
        return 0
    print(json.dumps(summary, indent=2))
    if "stopped_by" in summary:
        print(f"mimco: stopped by {summary['stopped_by']} at step {summary['step']}/{summary['total_steps']}; "
              f"checkpoint written. Resume with:\n  mimco {stage} --resume {summary['checkpoint']}", file=sys.stderr)
    return 0


def _tune(stage: str, args: argparse.Namespace, fresh: Any, section: str, metrics: dict[str, str], extra: Any) -> int:
    """``mimco finetune | segfinetune``: the backbone of ``args.checkpoint`` trained by the stage's
    method (``fresh(state)``: a new run's config; ``--resume``: the run's own), its encoder and
    heads from the config's ``section``; a result row with ``metrics`` (row name -> summary key)
    and ``extra(cfg)``."""
    from mimco.pipeline import open_run, run_stage

    spec = args.checkpoint
    name, model, state = resolve(spec, "momentum", 0)
    cfg, resume, run_dir = (open_run(stage, None, args.overrides, args.resume) if args.resume
                            else (fresh(state), None, None))
    part = getattr(cfg, section)
    if part.encoder != "momentum" or part.num_heads:
        name, model, state = resolve(spec, part.encoder, part.num_heads)
    if model is None:
        raise MimcoError(f"{stage} trains a backbone; raw pixels have none")
    summary = run_stage(stage, cfg, resume, run_dir, backbone=model)
    if dist.is_main():
        report(Path(summary["run_dir"]), stage, spec, name, state, cfg, {k: summary.get(v) for k, v in metrics.items()},
               summary, epochs=summary["epochs"], **extra(cfg))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _tune("finetune", args, lambda state: data_config(FinetuneConfig, args, [state]), "classifier",
                 {"finetune_top1": "top1", "finetune_top5": "top5", "finetune_best_top1": "best_top1"},
                 lambda cfg: {"layer_decay": cfg.classifier.layer_decay})


def cmd_segfinetune(args: argparse.Namespace) -> int:
    return _tune("segfinetune", args, lambda state: seg_config(args, state), "head",
                 {k: k for k in ("miou", "macc", "pixel_acc", "best_miou")},
                 lambda cfg: {"layers": cfg.head.layers, "layer_decay": cfg.head.layer_decay, "seg": to_dict(cfg.seg)})


#: ``mimco demo --quick``: 6k images, 2 epochs a stage, fewer scenes (checks the machinery only)
QUICK = ["data.subset=6000", "optim.epochs=2", "optim.warmup_epochs=0.5", "segprobe.scenes=500",
         "segprobe.val_scenes=200"]


def cmd_study(args: argparse.Namespace) -> int:
    """``mimco study SPEC`` and ``mimco demo`` (the bundled spec ``demo``): a stop prints the command that resumes."""
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


def add_parsers(sub: Any) -> None:
    for stage, text in (("teacher", "stage 1: train a MoCo v3 contrastive teacher"),
                        ("pretrain", "stage 2: MimCo pre-training against a frozen teacher")):
        s = sub.add_parser(stage, help=text, description=text)
        s.add_argument("--config", help=f"YAML config file (or the name of a bundled one, e.g. fmnist_{stage})")
        s.add_argument("--resume", help="a last.pt to continue, or 'auto' for train.out_dir/train.name/last.pt")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=10")

    def tune(name: str, text: str, sections: str) -> None:
        t = sub.add_parser(name, help=text)
        t.add_argument("checkpoint", help="a pre-training checkpoint (any format) or random:CKPT")
        t.add_argument("--config", help=f"YAML with {sections} sections")
        t.add_argument("--resume", help=f"a {name} last.pt to continue")
        t.add_argument("overrides", nargs="*", metavar="key=value")

    tune("finetune", "full fine-tuning (MAE/BEiT recipe: layer decay, RandAugment, mixup/cutmix)",
         "data / aug / classifier / optim / train")
    tune("segfinetune", "segmentation fine-tuning: the linear head with every layer trained",
         "data / seg / aug / head / optim / train")
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


HANDLERS = {"teacher": partial(cmd_train, "teacher"), "pretrain": partial(cmd_train, "pretrain"),
            "finetune": cmd_finetune, "segfinetune": cmd_segfinetune, "demo": cmd_study, "study": cmd_study}
