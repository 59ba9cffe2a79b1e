"""Run under torchrun (2 gloo processes, CPU): the evaluation commands listed in the JSON file
argv[1], one after another through their handlers in one process group; writes
OUT_DIR/rank<r>.json: per command its exit code, what it printed and how often this process ran
each scoring function (the k-NN search, the linear probe, a segmentation head's training)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import mimco.eval.knn as knn
import mimco.eval.linear as linear
import mimco.eval.probe as probe
import mimco.eval.segmentation as seg
from mimco import distributed as dist
from mimco.cli.main import handlers, parse_args

calls = {"knn": 0, "linear": 0, "seg_head": 0}


def counted(name, fn):
    def run(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return run


knn.knn_predict_multi = counted("knn", knn.knn_predict_multi)
linear.linear_probe = probe.linear_probe = counted("linear", linear.linear_probe)
linear.linear_probe_full = counted("linear", linear.linear_probe_full)
seg.train_probe_head = counted("seg_head", seg.train_probe_head)

done = []
for argv in json.loads(Path(sys.argv[1]).read_text()):
    before, printed = dict(calls), io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = handlers()[argv[0]](parse_args(argv))
    done.append({"argv": argv, "code": code, "stdout": printed.getvalue(),
                 "calls": {k: calls[k] - before[k] for k in calls}})
    dist.barrier()
Path(os.environ["OUT_DIR"], f"rank{dist.rank()}.json").write_text(json.dumps(done))
dist.destroy()
