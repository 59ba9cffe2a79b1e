"""Run under torchrun (gloo, CPU): ``mimco`` with the main process's checkpoint writes slowed
down; every other process records, as soon as ``Trainer.checkpoint`` returns, the step it finds
in last.pt (OUT/seen<rank>.json). With ``--kill-on-bad-exit`` a process that left before the
main process finished writing could have Slurm kill the writer: each must find its own step."""

import json
import os
import sys
import time
from pathlib import Path

from mimco.cli.main import main
from mimco.engine import trainer
from mimco.runs import load_checkpoint

out, args = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
real_save, real_checkpoint = trainer.save_checkpoint, trainer.Trainer.checkpoint


def slow_save(*a, **kw):
    time.sleep(2)
    return real_save(*a, **kw)


def checkpoint(self, snapshot=False):
    path = real_checkpoint(self, snapshot)
    seen = load_checkpoint(path)["step"] if path.is_file() else None
    with open(out / f"seen{rank}.json", "a") as f:
        f.write(json.dumps({"step": self.step, "on_disk": seen}) + "\n")
    return path


trainer.save_checkpoint = slow_save
trainer.Trainer.checkpoint = checkpoint
raise SystemExit(main(args))
