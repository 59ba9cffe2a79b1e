"""Reading and writing tensors: atomic pickles for run state, safetensors for weights, and the
one ``torch.load`` of the package (``weights_only=True``). User errors are :class:`MimcoError`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def atomic_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    """``obj`` as JSON (compact, or indented by ``indent``), written to a temporary file in the same
    folder and renamed over ``path`` (readable as any file the user writes; ``mkstemp`` alone makes it private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, separators=None if indent else (",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def torch_load(path: str | Path, missing: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. DINO and MAE full checkpoints store their
    argparse ``Namespace``: that one plain class is allowed. ``missing`` ends the not-found message."""
    p = Path(path)
    if not p.is_file():
        raise MimcoError(f"checkpoint not found: {p}" + (f"; {missing}" if missing else ""))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MimcoError(unreadable_checkpoint(p, e)) from None


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` for another kind of file or none recorded)."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return {}
    try:
        with safe_open(str(p), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise MimcoError(f"cannot read {p} as safetensors: {str(e).splitlines()[0][:200]}") from None


def read_file(path: str | Path) -> Any:
    """The raw contents of a weights file: safetensors, or a pickle read by :func:`torch_load`."""
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        try:
            return load_file(str(p))
        except Exception as e:
            raise MimcoError(f"cannot read {p} as safetensors: {str(e).splitlines()[0][:200]}") from None
    return torch_load(p)
