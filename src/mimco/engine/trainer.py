"""The one training loop both stages share.

A *method* is an ``nn.Module`` whose ``forward(views, step)`` returns ``(loss, logs)``, with
``backbone()`` for evaluation and optionally ``no_weight_decay()`` and ``total_steps``. The
loop adds everything else: per-iteration warm-up + cosine, bf16 autocast, gradient
accumulation and clipping, a CSV row every ``log_every`` steps, a progress bar, atomic
checkpoints (model, optimiser, scheduler, step, RNG state, resolved config) and resume.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mimco.config import to_dict
from mimco.data.build import BatchStream
from mimco.engine import distributed as dist
from mimco.engine.checkpoint import atomic_save, save_weights
from mimco.engine.optim import build_optimizer, build_scheduler
from mimco.errors import MimcoError


class CsvLog:
    """Appends one row per logging step to ``log.csv``; the header comes from the first row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.is_file() and path.stat().st_size:
            with path.open() as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, method: nn.Module, cfg: Any, stream: BatchStream, run_dir: Path, stage: str,
                 device: torch.device, resume: dict[str, Any] | None = None) -> None:
        self.method, self.cfg, self.stream, self.run_dir, self.stage, self.device = method, cfg, stream, run_dir, stage, device
        o = cfg.optim
        if o.accum_steps < 1 or stream.local % o.accum_steps:
            raise MimcoError(f"per-process batch {stream.local} is not divisible by optim.accum_steps={o.accum_steps}")
        spe = stream.steps_per_epoch
        self.total_steps = max(1, int(round(o.epochs * spe)))
        self.method.total_steps = self.total_steps
        self.optimizer = build_optimizer(method, o)
        self.scheduler = build_scheduler(self.optimizer, o, self.total_steps, int(round(o.warmup_epochs * spe)))
        self.step = 0
        if resume is not None:
            method.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self.step = int(resume["step"])
            set_rng_state(resume["rng"])
        self.model: nn.Module = method
        if dist.world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
        self.log = CsvLog(run_dir / "log.csv") if dist.is_main() else None

    def checkpoint(self) -> Path:
        path = self.run_dir / "last.pt"
        if dist.is_main():
            atomic_save({"stage": self.stage, "step": self.step, "total_steps": self.total_steps,
                         "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                         "config": to_dict(self.cfg)}, path)
        return path

    def _micro_step(self, views: list[torch.Tensor], sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        amp = self.cfg.train.precision == "bf16"
        ctx = self.model.no_sync() if (not sync and isinstance(self.model, nn.parallel.DistributedDataParallel)) else contextlib.nullcontext()
        with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, logs = self.model(views, self.step)
        with ctx:
            (loss / self.cfg.optim.accum_steps).backward()
        return loss.detach(), logs

    def fit(self) -> dict[str, Any]:
        cfg, o, t = self.cfg, self.cfg.optim, self.cfg.train
        end = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=end, initial=self.step, desc=self.stage, disable=not (t.progress and dist.is_main()),
                   dynamic_ncols=True, leave=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        batches = self.stream(self.step)
        sums: dict[str, torch.Tensor] = {}
        n_logged, seen, t0, start = 0, 0, time.perf_counter(), time.perf_counter()
        last: dict[str, float] = {}
        while self.step < end:
            views = next(batches)
            self.scheduler.step_update(self.step)
            chunks = list(zip(*[v.chunk(o.accum_steps) for v in views]))
            for i, chunk in enumerate(chunks):
                loss, logs = self._micro_step(list(chunk), sync=i == len(chunks) - 1)
                for k, v in {"loss": loss, **logs}.items():
                    sums[k] = sums.get(k, 0.0) + v.float() / len(chunks)
            if o.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, o.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            n_logged += 1
            seen += views[0].shape[0] * dist.world_size()
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - t0
                last = {k: float(dist.all_reduce_mean(v / n_logged)) for k, v in sums.items()}
                if not math.isfinite(last["loss"]):
                    raise MimcoError(f"loss is {last['loss']} at step {self.step}; lower optim.base_lr or enable "
                                     f"optim.clip_grad (the last checkpoint is kept)")
                row = {"step": self.step, "epoch": round(self.step / self.stream.steps_per_epoch, 4),
                       "lr": self.optimizer.param_groups[0]["lr"], **last,
                       "images_per_s": round(seen / elapsed, 1), "elapsed_s": round(time.perf_counter() - start, 2)}
                if self.log:
                    self.log.write(row)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")
                sums, n_logged, seen, t0 = {}, 0, 0, time.perf_counter()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < end:
                self.checkpoint()
        bar.close()
        path = self.checkpoint()
        if dist.is_main() and self.step >= self.total_steps:
            backbone = {k: v for k, v in self.method.backbone().state_dict().items() if not k.startswith("head.")}
            save_weights(backbone, self.run_dir / "backbone.safetensors", {"stage": self.stage})
        return {"step": self.step, "total_steps": self.total_steps, "checkpoint": str(path), **last,
                "train_seconds": round(time.perf_counter() - start, 1)}
