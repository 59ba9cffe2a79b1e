"""mimco: MimCo pre-training (masked image modeling with a frozen contrastive teacher).

The Python API (docs/python.md, with examples) is loaded on first use, so ``import mimco`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from mimco.errors import MimcoError

__version__ = "0.1.0"
#: the API's functions, each in :mod:`mimco.api` (their signatures for type checkers: ``__init__.pyi``)
_API = ("load_config", "train", "load_backbone", "extract_features", "knn", "probe", "study", "export")
__all__ = ["MimcoError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("mimco.api"), name)
    raise AttributeError(f"module 'mimco' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
