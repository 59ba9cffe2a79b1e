"""Run under torchrun (2 gloo processes, CPU): ``mimco extract`` (argv[1:]) through the real command
line, each process's resident-set growth during the extraction recorded: the kernel's high-water
mark (reset just before) minus the resident set at the start. Writes OUT_DIR/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import mimco.eval.extract as extract
from mimco import distributed as dist
from mimco.cli.main import main


def status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


streamed, grew = extract.stream_features, {}


def measured(backbone, dataset, data, device, *args, **kwargs):
    with torch.no_grad():  # the first forward pass maps the kernels' code: not what the extraction holds
        extract.token_outputs(backbone, True)(torch.zeros(64, data.channels, data.img_size, data.img_size))
    dist.barrier()  # and the process group's first collective sets up its buffers
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    got = streamed(backbone, dataset, data, device, *args, **kwargs)
    grew.update(bytes=status("VmHWM") - base, rank=dist.rank())
    Path(os.environ["OUT_DIR"], f"rank{dist.rank()}.json").write_text(json.dumps(grew))
    return got


extract.stream_features = measured
sys.exit(main(sys.argv[1:]))
