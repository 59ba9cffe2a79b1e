"""Checkpoints: atomic writes, ``weights_only`` reads, safetensors for final weights."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mimco.errors import MimcoError, unreadable_checkpoint


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: the previous file is untouched
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint exists"
        raise MimcoError(f"could not write {path}: {e.strerror or e}; {kept}; free space and resume") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a mimco checkpoint with ``weights_only=True``; user errors are :class:`MimcoError`."""
    p = Path(path)
    if not p.is_file():
        raise MimcoError(f"checkpoint not found: {p}; pass the last.pt of a finished or interrupted run")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MimcoError(unreadable_checkpoint(p, e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "stage" not in ckpt:
        raise MimcoError(f"{p} is not a mimco checkpoint (no 'model'/'stage' keys); pass a last.pt written by mimco")
    return ckpt


def find_last(run_dir: str | Path) -> Path:
    """``--resume auto``: the run folder's last.pt."""
    p = Path(run_dir) / "last.pt"
    if not p.is_file():
        raise MimcoError(f"nothing to resume: {p} does not exist; drop --resume or name a checkpoint")
    return p
