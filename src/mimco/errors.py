"""User-facing errors.

A :class:`MimcoError` is a mistake in what the user asked for (a missing folder, an unknown
config key, a wrong checkpoint). The CLI prints its one-line message and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path


class MimcoError(Exception):
    """An error caused by user input; its message names the problem and the fix."""


def message(error: MimcoError) -> str:
    """The one-line message of ``error``, also when a DataLoader worker raised it (the loader
    re-raises it in the main process with the worker's traceback around the message)."""
    text = str(error)
    tail = [line for line in text.strip().splitlines() if "MimcoError: " in line]
    return tail[-1].split("MimcoError: ", 1)[1] if tail and "Original Traceback" in text else text


def unreadable_checkpoint(path: Path, error: BaseException) -> str:
    """The message for a file ``torch.load`` cannot read: which file, what it is not, and what to pass."""
    head = b""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(2)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if head.startswith((b"PK", b"\x80")):  # a zip (torch >= 1.6) or a legacy pickle that failed inside
        if isinstance(error, pickle.UnpicklingError):
            return (f"cannot read checkpoint {path}: refusing it, it holds Python objects beyond tensors and could run "
                    f"code when loaded ({first}); convert it to a plain state dict or safetensors you trust")
        return f"cannot read checkpoint {path}: the file is damaged or truncated ({first}); use an intact copy"
    return (f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (neither a torch.save zip nor a pickle); "
            "pass a last.pt written by mimco or a released .pth/.safetensors file")
