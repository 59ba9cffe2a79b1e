"""The run folder and its checkpoint: the one place that writes and reads their layout (the files
and ``last.pt``'s keys, :data:`CHECKPOINT_KEYS`: docs/architecture.md#contracts; the snapshots
``epoch_XXXX.pt``, ``tensorboard/`` and the ``.lock`` the training process holds: docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from mimco.errors import MimcoError
from mimco.io import atomic_json, atomic_save, save_weights, torch_load

LOCK = ".lock"
CHECKPOINT = "last.pt"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
LOG = "log.csv"
BACKBONE = "backbone.safetensors"

#: the stages, each with its command (``mimco teacher | pretrain | finetune``) and config class
STAGES = ("teacher", "pretrain", "finetune", "segfinetune")
CHECKPOINT_KEYS = ("stage", "step", "total_steps", "model", "backbones", "optimizer", "scaler", "rng", "config")

#: ``backbones`` of checkpoints written before the checkpoint recorded them, by stage
_LEGACY_BACKBONES: dict[str, dict[str, str]] = {
    "teacher": {"momentum": "momentum_encoder.", "base": "base_encoder."},
    "pretrain": {"backbone": "student.backbone."},
    "finetune": {"backbone": "model."},
}


def backbones(ckpt: dict[str, Any]) -> dict[str, str]:
    """A run checkpoint's encoders -> the key prefix of each one's weights, the evaluated one first."""
    return ckpt.get("backbones") or _LEGACY_BACKBONES[ckpt["stage"]]


def pick_encoder(encoder: str, prefixes: dict[str, str], what: str) -> str:
    """The prefix of ``encoder`` among ``prefixes``; with one encoder, any name means it."""
    if encoder in prefixes:
        return prefixes[encoder]
    if len(prefixes) == 1:
        return next(iter(prefixes.values()))
    raise MimcoError(f"unknown encoder '{encoder}' for a {what}; choose {' or '.join(prefixes)}")


def backbone_state(model_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a run's ``model`` state dict, in timm names, without ``head.*``."""
    return {k[len(prefix):]: v for k, v in model_state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}


def save_checkpoint(run_dir: Path, stage: str, step: int, total_steps: int, model: dict[str, Any],
                    backbones: dict[str, str], optimizer: dict[str, Any], scaler: dict[str, Any], rng: list[Any],
                    config: dict[str, Any], backbone_args: dict[str, Any] | None = None) -> Path:
    """Write ``last.pt`` atomically; on the last step also ``backbone.safetensors`` (the first of ``backbones``), with
    ``backbone_args`` (the exact timm ``VisionTransformer`` keyword arguments, :func:`mimco.models.export.timm_kwargs`)
    as JSON in its ``model_args`` metadata: the heads count is not in the tensors' shapes."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    path = run_dir / CHECKPOINT
    atomic_save({"stage": stage, "step": step, "total_steps": total_steps, "model": model, "backbones": backbones,
                 "optimizer": optimizer, "scaler": scaler, "rng": rng, "config": config}, path)
    if step >= total_steps:  # finished: the backbone alone, as a timm state dict
        meta = {"stage": stage, **({"model_args": json.dumps(backbone_args)} if backbone_args else {})}
        save_weights(backbone_state(model, next(iter(backbones.values()))), run_dir / BACKBONE, meta)
    return path


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    """``epoch_0010.pt``: the run checkpoint as it was at the end of that epoch."""
    return Path(run_dir) / f"epoch_{epoch:04d}.pt"


def snapshots(run_dir: str | Path) -> list[Path]:
    """The run folder's epoch snapshots, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("epoch_*.pt")
             if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def prune_snapshots(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots (-1: keep all); returns the deleted paths."""
    gone = snapshots(run_dir)[:-keep] if keep > 0 else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a mimco run checkpoint (as opposed to a foreign format)."""
    return isinstance(obj, dict) and {"stage", "model", "config"} <= obj.keys() and obj["stage"] in STAGES


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run's ``last.pt`` (``weights_only=True``); user errors are :class:`MimcoError`."""
    p = Path(path)
    ckpt = torch_load(p, "pass the last.pt of a finished or interrupted run")
    if not is_checkpoint(ckpt):
        raise MimcoError(f"{p} is not a mimco checkpoint (no 'model'/'stage' keys); pass a last.pt written by mimco")
    return ckpt


def resume_path(run_dir: str | Path) -> Path:
    """``--resume auto``: the path of the run folder's last.pt (a :class:`MimcoError` when there is none)."""
    p = Path(run_dir) / CHECKPOINT
    if not p.is_file():
        raise MimcoError(f"nothing to resume: {p} does not exist; drop --resume or name a checkpoint")
    return p


def resume_state(run_dir: str | Path) -> dict[str, Any] | None:
    """The loaded checkpoint of the run folder to resume from, or None for a fresh run."""
    p = Path(run_dir) / CHECKPOINT
    return load_checkpoint(p) if p.is_file() else None


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` ({} when there is none yet)."""
    f = Path(run_dir) / SUMMARY
    return json.loads(f.read_text()) if f.is_file() else {}


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically: a process killed mid-write leaves the previous one."""
    atomic_json(Path(run_dir) / SUMMARY, summary, indent=2)


def finished(summary: dict[str, Any]) -> bool:
    """Whether a run's summary says it reached the end of its schedule (not stopped early)."""
    reached = "step" in summary and summary["step"] >= summary.get("total_steps", float("inf"))
    return reached and "stopped_by" not in summary


def is_finished(run_dir: str | Path) -> bool:
    return finished(read_summary(run_dir))


class RunLock:
    """The run folder's ``.lock``, held with ``flock`` while a process trains there: a second process (the same command
    started twice, a study run twice, a requeued job whose first copy still runs) is refused at start instead of writing
    the same checkpoint and log. The kernel drops the lock when the process ends, however it ends, so no stale lock is
    ever left. On a file system without ``flock`` (some Lustre mounts) the folder is not locked."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path, self.fd = Path(run_dir) / LOCK, -1

    def acquire(self) -> str | None:
        """Take the lock; None when taken (or when the file system has no locks), else the holder's
        description (the pid and host it wrote)."""
        import fcntl
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # BlockingIOError: held; another error: no flock here (ENOLCK, EINVAL, ENOSYS)
            holder = (os.read(fd, 200).decode(errors="replace").strip() or "another process"
                      if isinstance(e, BlockingIOError) else None)
            os.close(fd)
            return holder
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        _HELD.add(fd)
        return None

    def release(self) -> None:
        if self.fd >= 0:
            _HELD.discard(self.fd)
            os.close(self.fd)  # the last descriptor of the open file: the flock goes with it
            self.fd = -1


#: descriptors of the locks this process holds; a forked child (a loader worker) closes its copies,
#: or the lock would outlive release() and the process for as long as the worker lives
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
