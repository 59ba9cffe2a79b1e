"""Frozen features of a split to a file (``mimco extract``): CLS and mean-pooled tokens, optionally
every patch token, with labels, dataset indices and file names, extracted like the evaluation
(every process its share under the run's autocast, gathered to rank 0)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimco.config import DataConfig
from mimco.data.files import FileImages
from mimco.errors import MimcoError
from mimco.eval.features import extract_distributed

#: the file types ``mimco extract`` writes, by suffix
SUFFIXES = (".safetensors", ".npz")


def check_out(path: str | Path) -> Path:
    """The output file, refused before any work when its type is unknown or it exists already."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise MimcoError(f"--out {p}: write a .safetensors or .npz file")
    if p.exists():
        raise MimcoError(f"--out {p} exists; choose another name (or delete it) so nothing is overwritten")
    return p


def token_outputs(backbone: torch.nn.Module, patch: bool) -> Any:
    """images (B, C, H, W) -> {"cls": (B, D), "mean": (B, D)[, "patch": (B, L, D)]}, the tokens after
    the final norm (``forward_features``), prefix tokens left out of the mean and the patches."""

    def outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = backbone.forward_features(x)
        patches = tokens[:, backbone.num_prefix_tokens :]
        out = {"cls": tokens[:, 0], "mean": patches.mean(1)}
        if patch:
            out["patch"] = patches
        return out

    return outputs


def extract_tokens(backbone: torch.nn.Module, dataset: Any, data: DataConfig, device: torch.device,
                   precision: str = "fp32", patch: bool = False, batch_size: int = 256,
                   progress: bool = True) -> dict[str, Any] | None:
    """On rank 0 ({} keys ``cls``, ``mean``, ``patch`` with ``patch``, ``labels``, ``index``: tensors
    on the CPU in dataset order; ``names``: the files' paths, or [] for an in-memory dataset); None
    on the other processes. Unreadable files are left out (their indices are missing)."""
    got = extract_distributed(backbone, dataset, data, device, token_outputs(backbone, patch), precision, batch_size,
                              progress)
    if got is None:
        return None
    out: dict[str, Any] = {k: v.cpu() for k, v in got.items()}
    out["names"] = [str(dataset.items[i][0]) for i in out["index"].tolist()] if isinstance(dataset, FileImages) else []
    return out


def save_features(got: dict[str, Any], path: Path, meta: dict[str, Any]) -> Path:
    """Write ``got`` atomically: safetensors (patch tokens in float16; names and ``meta`` as JSON in
    the header's metadata) or npz (names as a string array, ``meta`` as a JSON string)."""
    tensors = {k: (v.half() if k == "patch" else v).contiguous() for k, v in got.items() if k != "names"}
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"names": json.dumps(got["names"]), "mimco": json.dumps(meta)})
    else:
        np.savez(tmp, **{k: v.numpy() for k, v in tensors.items()}, names=np.array(got["names"], dtype=str),
                 mimco=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path
