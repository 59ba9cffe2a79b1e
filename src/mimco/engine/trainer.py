"""The one training loop every stage shares (teacher, pretrain, finetune): it runs any
:class:`~mimco.methods.base.TrainingMethod` and adds everything else (schedule, precision, accumulation,
DDP/FSDP, logs, the k-NN monitor, checkpoints and resume, stops), as docs/training.md describes."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm import tqdm

from mimco import distributed as dist
from mimco.config import to_dict
from mimco.data.build import BatchStream
from mimco.engine.amp import autocast
from mimco.engine.compiling import compile_method, report_recompile_limit
from mimco.engine.guards import FiniteGuard, StopSignal
from mimco.engine.logs import RunLog
from mimco.engine.optim import build_optimizer, build_scheduler
from mimco.engine.rng import all_rng_states, restore_rank_state
from mimco.engine.sharding import full_state, gathered, gradient_sync, load_state, shard
from mimco.errors import MimcoError
from mimco.masking import join_pending
from mimco.methods.base import TrainingMethod, backbone_prefixes, check_method
from mimco.models.export import timm_kwargs
from mimco.runs import CHECKPOINT, LOG, prune_snapshots, save_checkpoint, snapshot_path


def accumulation(local_batch: int, accum_steps: int, micro_batch: int) -> int:
    """Micro-batches per step: ``accum_steps``, raised so no micro-batch exceeds ``micro_batch``."""
    steps = max(accum_steps, math.ceil(local_batch / micro_batch) if micro_batch else 1)
    if steps < 1 or local_batch % steps:
        raise MimcoError(f"the per-process batch {local_batch} does not split into {steps} equal micro-batches; "
                         "change optim.accum_steps / optim.micro_batch or optim.batch_size")
    return steps


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """The gradient scaler's saved state, when it has one: a bf16/fp32 checkpoint holds an empty one (a disabled
    scaler), which GradScaler refuses to load, so an fp16 resume of it starts the scaler fresh and says so."""
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled() and dist.is_main():
        print("mimco: the checkpoint was not trained in fp16; the gradient scaler starts fresh "
              f"(scale {scaler.get_scale():g})", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, method: TrainingMethod, cfg: Any, stream: BatchStream, run_dir: Path, stage: str,
                 device: torch.device, resume: dict[str, Any] | None = None, monitor: Any = None) -> None:
        """``monitor``: the k-NN monitor (:class:`mimco.eval.monitor.KnnMonitor`, or None): ``due(step,
        steps_per_epoch)``, and a call ``(backbone, device, precision) -> (values, pictures)`` that
        every process makes."""
        check_method(method)
        self.method, self.cfg, self.stream, self.monitor = method, cfg, stream, monitor
        self.run_dir, self.stage, self.device = run_dir, stage, device
        o, t = cfg.optim, cfg.train
        self.accum = accumulation(stream.local, o.accum_steps, o.micro_batch)
        spe = stream.steps_per_epoch
        self.total_steps = self.method.total_steps = max(1, int(round(o.epochs * spe)))
        if t.grad_checkpointing:
            for m in method.modules():
                if isinstance(m, VisionTransformer) and any(p.requires_grad for p in m.parameters()):
                    m.set_grad_checkpointing(True)
        fsdp = t.strategy == "fsdp" and dist.is_dist()
        if dist.world_size() > 1 and device.type == "cuda":  # SyncBatchNorm only runs on GPUs
            method = self.method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.compiled = compile_method(method, t.compile_mode) if t.compile else 0  # after BatchNorm conversion,
        #                                                                  before sharding (torchtitan's order)
        if fsdp:
            shard(method, t.precision)  # before the optimiser, which must see the sharded parameters
        self.optimizer = build_optimizer(method, o)
        # the schedule comes from this config, also on resume: a timm scheduler's saved state would
        # bring back the old run's length (t_initial) over a changed optim.epochs
        self.scheduler = build_scheduler(self.optimizer, o, self.total_steps, int(round(o.warmup_epochs * spe)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")
        self.step = 0 if resume is None else int(resume["step"])
        self.fresh = resume is None  # a resumed run's after_step for its first step ran before its checkpoint
        if resume is not None:
            if self.step > self.total_steps:
                raise MimcoError(f"the checkpoint is at step {self.step} but optim.epochs={o.epochs} ends at step "
                                 f"{self.total_steps}; resume with optim.epochs of at least {self.step / spe:g}")
            kept = ("weight_decay", "betas", "lr_scale")
            fresh = [{k: g[k] for k in kept if k in g} for g in self.optimizer.param_groups]
            load_state(method, self.optimizer, resume["model"], resume["optimizer"])
            for g, values in zip(self.optimizer.param_groups, fresh):  # hyper-parameters from this config
                g.update(values)
            restore_scaler(self.scaler, resume.get("scaler", {}))
            restore_rank_state(resume["rng"], t.seed + self.step)
        if self.accum > 1 and dist.is_main():
            micro = stream.local // self.accum
            print(f"mimco: gradient accumulation over {self.accum} micro-batches of {micro} per process: contrastive "
                  f"negatives and BatchNorm statistics come from {micro * dist.world_size()} images at a time, not the "
                  f"global batch of {stream.gb} (lr schedule, data order and masks are those of the global batch)",
                  file=sys.stderr, flush=True)
        self.model: nn.Module = method
        if dist.world_size() > 1 and not fsdp:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(method, device_ids=ids)
        self.log = RunLog(run_dir, stage, t, to_dict(cfg), LOG, self.step if resume is not None else None,
                          dist.is_main())
        self.guard = FiniteGuard(device)
        self.last_saved: tuple[Path, int] | None = (run_dir / CHECKPOINT, self.step) if resume is not None else None

    def checkpoint(self, snapshot: bool = False) -> Path:
        """Write last.pt atomically, unless the loss went non-finite since the last check; with
        ``snapshot``, keep a copy as ``epoch_XXXX.pt`` too (``train.keep_last`` of them)."""
        self.check_finite()
        path = self.run_dir / CHECKPOINT
        model_state, optim_state = full_state(self.method, self.optimizer)  # collective under FSDP
        rng = all_rng_states()  # collective: every process's generators, in rank order
        if dist.is_main():
            save_checkpoint(self.run_dir, self.stage, self.step, self.total_steps, model_state,
                            backbone_prefixes(self.method), optim_state, self.scaler.state_dict(), rng,
                            to_dict(self.cfg), timm_kwargs(self.method.backbone()))
            if snapshot:
                self._snapshot(path)
        # nobody goes on (or exits, at a stop) before the file is written: under srun
        # --kill-on-bad-exit a process that left first could have Slurm kill the writer mid-write
        dist.barrier()
        self.last_saved = (path, self.step)
        return path

    def _snapshot(self, path: Path) -> None:
        """``epoch_XXXX.pt``: a hard link to the last.pt just written (the next last.pt replaces the name, not
        the file), or a copy where links are not allowed; then the oldest beyond ``train.keep_last`` go."""
        target = snapshot_path(self.run_dir, self.step // self.stream.steps_per_epoch)
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        prune_snapshots(self.run_dir, self.cfg.train.keep_last)

    def _snapshot_due(self) -> bool:
        """At the end of every ``train.keep_every_epochs``-th whole epoch (not a schedule's fractional end)."""
        every, spe = self.cfg.train.keep_every_epochs, self.stream.steps_per_epoch
        return bool(every) and self.step % spe == 0 and (self.step // spe) % every == 0

    def _monitor(self, spe: int, rows: RowLogger) -> dict[str, float]:
        """Score the k-NN monitor (every process: its share), log its pictures, and the first time
        say what it costs (time that ``rows``' images/s does not count)."""
        start = time.perf_counter()
        with gathered(self.method):  # FSDP: the backbone's parameters whole, for its forward_features
            values, images = self.monitor(self.method.backbone(), self.device, self.cfg.train.precision)
        seconds = time.perf_counter() - start
        self.log.images(self.step, images)
        if not self._monitor_s and dist.is_main():  # the first monitor point of this run
            per_epoch = (time.perf_counter() - self._start) / max(self.step - self._start_step, 1) * spe
            tqdm.write(f"mimco: k-NN monitor on {self.monitor.size} images ({self.monitor.describe()}) took "
                       f"{seconds:.1f} s, {100 * seconds / per_epoch:.1f} % "
                       f"of an epoch ({per_epoch:.0f} s) of this run", file=sys.stderr)
        self._monitor_s += seconds
        rows.pause(seconds)
        return values

    def _bad_images(self) -> tuple[int, int] | None:
        """(unreadable, read) images summed over processes, for runs that read files; stops every
        process together, with one message, past ``data.max_bad_fraction``."""
        if not self.stream.reads_files:
            return None
        counts = dist.all_reduce_(torch.tensor([self.stream.bad.bad, self.stream.bad.seen], device=self.device))
        n, m = (int(v) for v in counts.tolist())
        self.stream.bad.check(n, m)
        return n, m

    def _report_bad_images(self) -> None:
        """At the end of a run that read files: how many of the dataset's files were unreadable (each
        file once, whichever process and epoch met it), the first few by name."""
        if self._bad_images() is None:
            return
        bad = self.stream.bad
        found: list[Any] = [(sorted(bad.files), bad.undecodable)] * dist.world_size()
        if dist.is_dist():
            torch.distributed.all_gather_object(found, found[0])
        files = sorted({i for f, _ in found for i in f})
        undecodable = sum(u for _, u in found)
        if dist.is_main() and (files or undecodable):
            items = getattr(self.stream.ds, "items", None)
            names = [str(items[i][0]) for i in files[:3]] if items is not None else []
            more = ", ..." if len(files) > 3 else ""
            print(f"mimco: skipped {len(files)} unreadable files of {len(self.stream.ds)}"
                  + (f" ({', '.join(names)}{more})" if names else "") + ", each replaced by the next readable file"
                  + (f"; {undecodable} JPEG reads failed to decode on the device" if undecodable else ""),
                  file=sys.stderr, flush=True)

    def check_finite(self) -> None:
        if (bad := self.guard.bad_step()) is not None:
            kept = (f"the last checkpoint {self.last_saved[0]} (step {self.last_saved[1]}) is kept" if self.last_saved
                    else "no checkpoint was written")
            raise MimcoError(f"loss became NaN/Inf at step {bad + 1}; stopped, {kept}; lower optim.base_lr or set "
                             "optim.clip_grad, then resume")

    def train_step(self, views: list[torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """One optimiser step on this process's share of the global batch (``views``): its micro-batches,
        clip and step, then the method's ``after_step``. Returns the step's logs (``loss`` and the
        method's, the mean over micro-batches, tensors left on the device; ``grad_norm``, the gradients'
        unscaled norm before clipping, with ``optim.clip_grad``)."""
        self.scheduler.step_update(self.step)
        chunks = list(zip(*[v.chunk(self.accum) for v in views]))
        micro, first = self.stream.local // self.accum, dist.rank() * self.stream.local
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        logs: dict[str, torch.Tensor | float] = {}
        for i, chunk in enumerate(chunks):
            sync = i == len(chunks) - 1
            if self.accum > 1:  # FSDP2: one reduce-scatter per unit and step, at the last micro-batch
                gradient_sync(self.model, sync)
            with self.model.no_sync() if (not sync and ddp) else contextlib.nullcontext():
                with autocast(self.device, self.cfg.train.precision):
                    loss, got = self.model(list(chunk), self.step, first + i * micro)
                self.scaler.scale(loss / self.accum).backward()
            self.guard.update(loss, self.step)
            for k, v in {"loss": loss, **got}.items():  # tensors stay on the device; numbers on the host
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                logs[k] = logs.get(k, 0.0) + v / len(chunks)
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
            # FSDP2: the norm of sharded gradients is a DTensor (a collective)
            logs["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.method.after_step(self.step)  # every process, outside any forward (MoCo's EMA)
        return logs

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to the schedule's end (or ``train.max_steps``, or an agreed stop)
        and return the summary."""
        t = self.cfg.train
        end = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rows = RowLogger(self, end)
        batches = self.stream(self.step)
        spe = self.stream.steps_per_epoch
        metrics: dict[str, Any] = {k: "" for k in self.method.metric_keys}
        watched: dict[str, float] = {}
        stopped_by, first_step_s, asked_at = None, None, None
        self._start, self._start_step, self._monitor_s = time.perf_counter(), self.step, 0.0
        with StopSignal() as stop, contextlib.closing(self.log):
            if self.fresh and self.step < end:
                self.method.after_step(self.step)  # no step done yet: what comes before the first (MoCo's first EMA)
            while self.step < end:
                views = next(batches)
                rows.add(self.train_step(views, params), views[0].shape[0] * dist.world_size())
                if self.step == self._start_step + 1:  # loader start-up, and with train.compile the compilation
                    first_step_s = round(time.perf_counter() - self._start, 2)
                    if self.compiled and dist.is_main():
                        tqdm.write(f"mimco: first step {first_step_s} s (torch.compile of {self.compiled} blocks, "
                                   "patch embeddings and heads; later steps reuse the compiled code)", file=sys.stderr)
                epoch_done = self.step % spe == 0 or self.step == self.total_steps
                if epoch_done:  # every process runs the hook (fine-tuning evaluates its share)
                    metrics = {**metrics, **self.method.on_epoch_end(round(self.step / spe, 4))}
                epoch_end = epoch_done and bool(self.method.metric_keys)  # new metrics: a log row and a checkpoint
                watch = self.monitor is not None and self.monitor.due(self.step, spe)
                if watch:  # every process: its share of the features
                    watched = self._monitor(spe, rows)
                if self.step % t.log_every == 0 or self.step == end or epoch_end or watch:
                    rows.write(metrics, watched if watch else {})
                if stop.requested and asked_at is None:
                    asked_at = self.step  # this process's own signal, seen after this step
                # a Python flag alone; distributed, a tiny all-reduce every step, read one step later
                if stop.agreed(self.device) and self.step < end:
                    stopped_by = stop.requested or "a signal on another process"
                    break
                snap = self._snapshot_due()  # a checkpoint before the end: new epoch metrics, a snapshot, ckpt_every
                if (epoch_end or snap or bool(t.ckpt_every and self.step % t.ckpt_every == 0)) and self.step < end:
                    self.checkpoint(snapshot=snap)
            rows.close()
            join_pending()  # the next step's masks are being built: let no thread run on past the run
            path = self.checkpoint(snapshot=self._snapshot_due())
        self._report_bad_images()
        report_recompile_limit(self.compiled)  # one line if dynamo ran compiled modules eager
        out = {"step": self.step, "total_steps": self.total_steps, "checkpoint": str(path), **rows.last,
               **{k: v for k, v in metrics.items() if v != ""}, **watched,
               "train_seconds": round(time.perf_counter() - self._start, 1), "first_step_seconds": first_step_s}
        if stopped_by:
            out["stopped_by"] = stopped_by
            if asked_at is not None:
                out["stop_asked_at_step"] = asked_at
        return out


class RowLogger:
    """The log rows of a run and its progress bar: the steps' logs summed between rows, written as one row of
    means over steps and processes (``log.csv``, TensorBoard, W&B) with the learning rate, the epoch metrics,
    the k-NN monitor, skipped images and images/s of training time."""

    def __init__(self, trainer: Trainer, end: int) -> None:
        self.trainer = trainer
        self.bar = tqdm(total=end, initial=trainer.step, desc=trainer.stage,
                        disable=not (trainer.cfg.train.progress and dist.is_main()), dynamic_ncols=True, leave=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.columns = {"knn_monitor": ""} if trainer.monitor is not None else {}  # filled in the rows that score it
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps, self.seen, self.t0, self.start = 0, 0, time.perf_counter(), time.perf_counter()
        self.last: dict[str, float] = {}

    def add(self, logs: dict[str, torch.Tensor | float], images: int) -> None:
        """One step's logs and the images it trained on (all processes)."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.seen += images
        self.bar.update(1)

    def pause(self, seconds: float) -> None:
        """Time spent outside training (the k-NN monitor): not counted in images/s."""
        self.t0 += seconds

    def close(self) -> None:
        self.bar.close()

    def write(self, metrics: dict[str, Any], watched: dict[str, float]) -> None:
        """A row of the means since the last one (a collective under torchrun: every process writes)."""
        tr = self.trainer
        tr.check_finite()
        bad = tr._bad_images()
        elapsed = time.perf_counter() - self.t0
        self.last = dist.mean_over_processes({k: v / self.steps for k, v in self.sums.items()}, tr.device)
        row = {"step": tr.step, "epoch": round(tr.step / tr.stream.steps_per_epoch, 4),
               "lr": max(g["lr"] for g in tr.optimizer.param_groups), **self.last, **metrics, **self.columns,
               **watched, **({"skipped_images": bad[0]} if bad is not None else {}),
               "images_per_s": round(self.seen / elapsed, 1), "elapsed_s": round(time.perf_counter() - self.start, 2)}
        tr.log.write(row)
        shown = {"knn": f"{watched['knn_monitor']:.1f}"} if "knn_monitor" in watched else {}
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}",
                             **shown)
        self.sums, self.steps, self.seen, self.t0 = {}, 0, 0, time.perf_counter()
