"""Frozen features of a split to a file (``mimco extract``): CLS and mean-pooled tokens, optionally
every patch token (float16), with labels, dataset indices and file names, extracted as the evaluation
extracts them and streamed to the file: the main process holds one batch at a time, never the split."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open

from mimco import distributed as dist
from mimco.config import DataConfig
from mimco.data.files import FileImages
from mimco.errors import MimcoError
from mimco.eval.features import extract_distributed


def check_out(path: str | Path) -> Path:
    """The output file, refused before any work when its type is unknown or it exists already."""
    p = Path(path)
    if p.suffix not in (".safetensors", ".npz"):
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
    """On the main process, in memory: {``cls``, ``mean``, with ``patch`` ``patch`` (float16), ``labels``,
    ``index``: CPU tensors in dataset order (unreadable files left out); ``names``: the files' paths,
    or [] for an in-memory dataset}; None on the other processes."""
    got = extract_distributed(backbone, dataset, data, device, token_outputs(backbone, patch), precision, batch_size,
                              progress, half=("patch",))
    if got is None:
        return None
    out: dict[str, Any] = {k: v.cpu() for k, v in got.items()}
    out["names"] = [str(dataset.items[i][0]) for i in out["index"].tolist()] if isinstance(dataset, FileImages) else []
    return out


#: safetensors' names of the dtypes ``mimco extract`` writes
_SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
#: the key of the file names (image folders)
NAMES = "names"


class FeatureWriter:
    """The main process's side of :func:`stream_features`: each batch's rows appended to one part
    file per key next to ``path``, then the file put together from a header and the parts under a
    temporary name and renamed (the layout, and why the names are a tensor: docs/evaluation.md)."""

    def __init__(self, path: Path, names_of: Any = None) -> None:
        self.path, self.names_of = path, names_of
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parts = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".parts", dir=path.parent))
        self.files: dict[str, IO[bytes]] = {}  # closed in close()
        if names_of is not None:
            self.files[NAMES] = open(self.parts / NAMES, "wb")  # noqa: SIM115
        self.rows: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.count = 0

    def __call__(self, rows: dict[str, torch.Tensor]) -> None:
        for k, v in rows.items():
            a = v.contiguous().numpy()
            if k not in self.files:
                self.files[k] = open(self.parts / k, "wb")  # noqa: SIM115  closed in close()
                self.rows[k] = (a.dtype, a.shape[1:])
            a.tofile(self.files[k])
        self.count += len(rows["index"])
        if self.names_of is not None:
            self.files[NAMES].write(b"".join(n.encode() + b"\0" for n in self.names_of(rows["index"].tolist())))

    def finish(self, meta: dict[str, Any]) -> Path:
        """Put the file together and rename it to ``path`` (atomic); the parts are removed."""
        for f in self.files.values():
            f.close()
        if not self.count:
            raise MimcoError("no readable image in the split; nothing to write")
        tmp = self.path.with_name(f".{self.path.name}.tmp{self.path.suffix}")
        try:
            (self._safetensors if self.path.suffix == ".safetensors" else self._npz)(tmp, meta)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        """Drop the parts (after :meth:`finish`, or when the extraction failed)."""
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.parts, ignore_errors=True)

    def _copy(self, key: str, out: IO[bytes]) -> None:
        with open(self.parts / key, "rb") as f:
            shutil.copyfileobj(f, out, 4 * 2**20)  # 4 MiB at a time

    def _safetensors(self, tmp: Path, meta: dict[str, Any]) -> None:
        header: dict[str, Any] = {"__metadata__": {"mimco": json.dumps(meta)}}
        keys = [*self.rows, *([NAMES] if NAMES in self.files else [])]
        start = 0
        for k in keys:
            size = (self.parts / k).stat().st_size
            dtype, shape = ("U8", [size]) if k == NAMES else (_SAFETENSORS_DTYPES[self.rows[k][0]],
                                                                [self.count, *self.rows[k][1]])
            header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for k in keys:
                self._copy(k, out)

    def _npz(self, tmp: Path, meta: dict[str, Any]) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for k, (dtype, shape) in self.rows.items():
                with z.open(f"{k}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_2_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                               "fortran_order": False, "shape": (self.count, *shape)})
                    self._copy(k, out)
            names = (self.parts / NAMES).read_bytes().decode().split("\0")[:-1] if NAMES in self.files else []
            for k, a in ((NAMES, np.array(names, dtype=str)), ("mimco", np.array(json.dumps(meta)))):
                with z.open(f"{k}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, a)


def stream_features(backbone: torch.nn.Module, dataset: Any, data: DataConfig, device: torch.device, path: Path,
                    meta: dict[str, Any], precision: str = "fp32", patch: bool = False, batch_size: int = 256,
                    progress: bool = True) -> dict[str, tuple[int, ...]] | None:
    """``mimco extract``: what :func:`extract_tokens` gives, written to ``path`` batch by batch
    (``.safetensors``: ``meta`` as JSON in the header's metadata, names as :class:`FeatureWriter`
    writes them; ``.npz``: names as a string array, ``meta`` as a JSON string). Returns the shapes
    written (and ``names`` (count,) for a folder) on the main process, None on the others."""
    names_of = ((lambda index: [str(dataset.items[i][0]) for i in index]) if isinstance(dataset, FileImages)
                else None)
    writer = FeatureWriter(path, names_of) if dist.is_main() else None
    try:
        extract_distributed(backbone, dataset, data, device, token_outputs(backbone, patch), precision, batch_size,
                            progress, half=("patch",), sink=writer)
        if writer is None:
            return None
        writer.finish(meta)
        shapes = {k: (writer.count, *shape) for k, (_, shape) in writer.rows.items()}
        return {**shapes, **({"names": (writer.count,)} if names_of is not None else {})}
    finally:
        if writer is not None:
            writer.close()


def read_names(path: str | Path) -> list[str]:
    """The file names in a ``mimco extract`` file (``.safetensors`` or ``.npz``), in its row order;
    [] for an in-memory dataset."""
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            return [str(n) for n in z[NAMES]]
    with safe_open(str(p), "np") as f:
        return bytes(f.get_tensor(NAMES)).decode().split("\0")[:-1] if NAMES in f.keys() else []
