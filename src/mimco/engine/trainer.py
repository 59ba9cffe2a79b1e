"""The one training loop both stages share.

A *method* is an ``nn.Module`` whose ``forward(views, step)`` returns ``(loss, logs)``, with
``backbone()`` for evaluation and optionally ``no_weight_decay()`` and ``total_steps``. The
loop adds everything else: per-iteration warm-up + cosine, bf16/fp16 autocast, gradient
accumulation and clipping, gradient checkpointing, DDP, a CSV row every ``log_every`` steps,
a progress bar, atomic checkpoints (model, optimiser, scheduler, step, RNG state, resolved
config), resume, a clean stop on SIGTERM/SIGINT and a stop on a non-finite loss.
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
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm import tqdm

from mimco.config import to_dict
from mimco.data.build import BatchStream
from mimco.engine import distributed as dist
from mimco.engine.checkpoint import atomic_save, save_weights
from mimco.engine.guards import FiniteGuard, StopSignal
from mimco.engine.optim import build_optimizer, build_scheduler
from mimco.engine.sharding import full_state, load_state, shard
from mimco.errors import MimcoError


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


def accumulation(local_batch: int, accum_steps: int, micro_batch: int) -> int:
    """Micro-batches per step: ``accum_steps``, raised so no micro-batch exceeds ``micro_batch``."""
    steps = max(accum_steps, math.ceil(local_batch / micro_batch) if micro_batch else 1)
    if steps < 1 or local_batch % steps:
        raise MimcoError(f"the per-process batch {local_batch} does not split into {steps} equal micro-batches; "
                         "change optim.accum_steps / optim.micro_batch or optim.batch_size")
    return steps


class Trainer:
    def __init__(self, method: nn.Module, cfg: Any, stream: BatchStream, run_dir: Path, stage: str,
                 device: torch.device, resume: dict[str, Any] | None = None) -> None:
        self.method, self.cfg, self.stream, self.run_dir, self.stage, self.device = method, cfg, stream, run_dir, stage, device
        o, t = cfg.optim, cfg.train
        self.accum = accumulation(stream.local, o.accum_steps, o.micro_batch)
        spe = stream.steps_per_epoch
        self.total_steps = max(1, int(round(o.epochs * spe)))
        self.method.total_steps = self.total_steps
        if t.grad_checkpointing:
            for m in method.modules():
                if isinstance(m, VisionTransformer) and any(p.requires_grad for p in m.parameters()):
                    m.set_grad_checkpointing(True)
        if t.strategy not in ("ddp", "fsdp"):
            raise MimcoError(f"unknown train.strategy '{t.strategy}'; choose ddp or fsdp")
        fsdp = t.strategy == "fsdp" and dist.world_size() > 1
        if dist.world_size() > 1 and device.type == "cuda":  # SyncBatchNorm only runs on GPUs
            method = self.method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if fsdp:
            shard(method)  # before the optimiser, which must see the sharded parameters
        self.optimizer = build_optimizer(method, o)
        self.scheduler = build_scheduler(self.optimizer, o, self.total_steps, int(round(o.warmup_epochs * spe)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")
        self.step = 0
        if resume is not None:
            load_state(method, self.optimizer, resume["model"], resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            if "scaler" in resume:
                self.scaler.load_state_dict(resume["scaler"])
            self.step = int(resume["step"])
            set_rng_state(resume["rng"])
        self.model: nn.Module = method
        if dist.world_size() > 1 and not fsdp:
            self.model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
        self.log = CsvLog(run_dir / "log.csv", self.step if resume is not None else None) if dist.is_main() else None
        self.guard = FiniteGuard(device)
        self.last_saved: tuple[Path, int] | None = (run_dir / "last.pt", self.step) if resume is not None else None

    def checkpoint(self) -> Path:
        """Write last.pt atomically, unless the loss went non-finite since the last check."""
        self.check_finite()
        path = self.run_dir / "last.pt"
        model_state, optim_state = full_state(self.method, self.optimizer)  # collective under FSDP
        if dist.is_main():
            atomic_save({"stage": self.stage, "step": self.step, "total_steps": self.total_steps,
                         "model": model_state, "optimizer": optim_state,
                         "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                         "rng": rng_state(), "config": to_dict(self.cfg)}, path)
            if self.step >= self.total_steps:  # finished: the backbone alone, as a timm state dict
                prefix = self.method.backbone_prefix
                backbone = {k[len(prefix):]: v for k, v in model_state.items()
                            if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}
                save_weights(backbone, self.run_dir / "backbone.safetensors", {"stage": self.stage})
        self.last_saved = (path, self.step)
        return path

    def check_finite(self) -> None:
        bad = self.guard.bad_step()
        if bad is not None:
            kept = (f"the last checkpoint {self.last_saved[0]} (step {self.last_saved[1]}) is kept" if self.last_saved
                    else "no checkpoint was written")
            raise MimcoError(f"loss became NaN/Inf at step {bad + 1}; stopped, {kept}; lower optim.base_lr or set "
                             "optim.clip_grad, then resume")

    def _micro_step(self, views: list[torch.Tensor], sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prec = self.cfg.train.precision
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        ctx = self.model.no_sync() if (not sync and ddp) else contextlib.nullcontext()
        dtype = torch.float16 if prec == "fp16" else torch.bfloat16
        with ctx:
            with torch.autocast(self.device.type, dtype=dtype, enabled=prec != "fp32"):
                loss, logs = self.model(views, self.step)
            self.scaler.scale(loss / self.accum).backward()
        return loss.detach(), logs

    def _optimizer_step(self, params: list[torch.Tensor]) -> None:
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        end = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=end, initial=self.step, desc=self.stage, disable=not (t.progress and dist.is_main()),
                   dynamic_ncols=True, leave=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        batches = self.stream(self.step)
        sums: dict[str, torch.Tensor] = {}
        n_logged, seen, t0, start = 0, 0, time.perf_counter(), time.perf_counter()
        last: dict[str, float] = {}
        stopped_by = None
        with StopSignal() as stop:
            while self.step < end:
                views = next(batches)
                self.scheduler.step_update(self.step)
                chunks = list(zip(*[v.chunk(self.accum) for v in views]))
                for i, chunk in enumerate(chunks):
                    loss, logs = self._micro_step(list(chunk), sync=i == len(chunks) - 1)
                    self.guard.update(loss, self.step)
                    for k, v in {"loss": loss, **logs}.items():
                        sums[k] = sums.get(k, 0.0) + v.float() / len(chunks)
                self._optimizer_step(params)
                self.step += 1
                n_logged += 1
                seen += views[0].shape[0] * dist.world_size()
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == end:
                    self.check_finite()
                    elapsed = time.perf_counter() - t0
                    last = {k: float(dist.all_reduce_mean(v / n_logged)) for k, v in sums.items()}
                    row = {"step": self.step, "epoch": round(self.step / self.stream.steps_per_epoch, 4),
                           "lr": self.optimizer.param_groups[0]["lr"], **last,
                           "images_per_s": round(seen / elapsed, 1), "elapsed_s": round(time.perf_counter() - start, 2)}
                    if self.log:
                        self.log.write(row)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")
                    sums, n_logged, seen, t0 = {}, 0, 0, time.perf_counter()
                # one flag all-reduce every 10 steps when distributed; a Python flag otherwise
                if (not dist.is_dist() or self.step % 10 == 0) and stop.agreed(self.device) and self.step < end:
                    stopped_by = stop.requested or "a signal on another process"
                    break
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < end:
                    self.checkpoint()
            bar.close()
            path = self.checkpoint()
        out = {"step": self.step, "total_steps": self.total_steps, "checkpoint": str(path), **last,
               "train_seconds": round(time.perf_counter() - start, 1)}
        if stopped_by:
            out["stopped_by"] = stopped_by
        return out
