"""Where a run's numbers go: ``log.csv`` always, TensorBoard (``train.tensorboard``) and Weights &
Biases (``train.wandb``) when asked. Only the main process writes; every row goes to each logger
with the same step, so the three agree (a resumed run's rows past its checkpoint are dropped from
``log.csv`` and hidden in TensorBoard by its ``purge_step``)."""

from __future__ import annotations

import csv
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

#: the run folder's TensorBoard event files (``tensorboard --logdir runs``)
TENSORBOARD = "tensorboard"
#: the run's Weights & Biases id, so a resumed run continues the same W&B run
WANDB_ID = "wandb_id.json"


class CsvLog:
    """Appends one row per logging step to ``log.csv``; the header comes from the first row."""

    def __init__(self, path: Path, after_step: int | None = None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.is_file() and path.stat().st_size:
            with path.open() as f:
                rows = list(csv.reader(f))
            self.fields = rows[0]
            if after_step is not None and "step" in self.fields:  # resumed: drop rows past the checkpoint
                i = self.fields.index("step")
                kept = [rows[0]] + [r for r in rows[1:] if r and float(r[i]) <= after_step]
                with path.open("w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def write(self, row: dict[str, Any]) -> None:
        if new := (self.fields is None):
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a log row, without ``step`` (blank metrics are left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLog:
    """``torch.utils.tensorboard`` events under ``<run>/tensorboard``: each log row's scalars, tagged
    ``<stage>/<column>``, and images at the monitor points."""

    def __init__(self, run_dir: Path, stage: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.stage = stage
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        self.writer.flush()

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        for name, grid in images.items():  # (3, H, W) in [0, 1]
            self.writer.add_image(f"{self.stage}/{name}", grid, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A Weights & Biases run (project ``train.wandb``), resumed with the run folder's saved id;
    ``WANDB_MODE=offline`` and the other ``WANDB_*`` variables are wandb's own."""

    def __init__(self, run_dir: Path, stage: str, project: str, config: dict[str, Any]) -> None:
        import wandb  # present: the config's rules refuse train.wandb without it

        self.wandb, self.stage = wandb, stage
        id_file = run_dir / WANDB_ID
        # its own id (8 lowercase hex characters, a valid W&B run id): wandb 0.31 no longer has wandb.util.generate_id
        run_id = json.loads(id_file.read_text())["id"] if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(json.dumps({"id": run_id}))
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, job_type=stage)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{self.stage}/{k}": v for k, v in values.items()}, step=step)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        self.run.log({f"{self.stage}/{k}": self.wandb.Image(v.permute(1, 2, 0).numpy()) for k, v in images.items()},
                     step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """``log.csv`` plus the optional loggers a run's ``train`` section asks for; on the main process
    only (elsewhere every call does nothing). ``resumed_at``: the checkpoint's step on resume."""

    def __init__(self, run_dir: Path, stage: str, train: Any, config: dict[str, Any], log_name: str,
                 resumed_at: int | None, main: bool) -> None:
        self.csv = CsvLog(run_dir / log_name, resumed_at) if main else None
        self.others: list[Any] = []
        if main and train.tensorboard:
            try:
                # resumed: the reader hides events past the checkpoint, from the files of earlier attempts
                self.others.append(TensorBoardLog(run_dir, stage, None if resumed_at is None else resumed_at + 1))
            except ImportError:
                print("mimco: train.tensorboard=true but the tensorboard package is missing (pip install tensorboard);"
                      " logging to log.csv only", file=sys.stderr, flush=True)
        if main and train.wandb:
            self.others.append(WandbLog(run_dir, stage, train.wandb, config))

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.write(row)
        values = scalars(row)
        for log in self.others:
            log.write(int(row["step"]), values)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        for log in self.others:
            log.images(step, images)

    def close(self) -> None:
        for log in self.others:
            log.close()
        self.others = []
