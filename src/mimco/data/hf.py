"""Hugging Face datasets (``data.name=hf``): a ``save_to_disk`` folder or parquet files, read memory-mapped
with random access like an image folder; nothing is downloaded (docs/training.md#shards-and-hugging-face-datasets)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mimco.data.files import FileImages, read_file, subset_of
from mimco.data.shards import ShardItems
from mimco.errors import MimcoError

#: split names tried for the evaluation split, in order
EVAL_SPLITS = ("validation", "val", "valid", "test")
_SPLIT = re.compile(r"(?:^|[/_.-])(train|validation|valid|val|test)(?:[/_.-]|$)")


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the user brings the files: never a hub request
    try:
        import datasets
    except ImportError:
        raise MimcoError("data.name=hf needs Hugging Face datasets: pip install 'mimco[hf]'") from None
    datasets.disable_progress_bars()
    return datasets


def _parquet_splits(root: Path) -> dict[str, list[str]]:
    """{split: parquet files} under ``root`` (or ``root`` itself, a file): a file's split is the
    split word in its path (``train-00000-of-00004.parquet``, ``data/validation/...``); files with
    none are the training split."""
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    out: dict[str, list[str]] = {}
    for f in files:
        m = _SPLIT.search(str(f.relative_to(root.parent if root.is_file() else root)))
        out.setdefault(m.group(1) if m else "train", []).append(str(f))
    return out


def load_split(root: str, train: bool, val_root: str = "") -> Any | None:
    """The ``datasets.Dataset`` of a split (None: the source has none). Training: ``root``'s
    ``train`` split (or its only one). Evaluation: ``val_root``'s evaluation split (or its only
    one) when set, else ``root``'s ``validation``, ``val``, ``valid`` or ``test`` split."""
    datasets = _datasets()
    own = bool(val_root) and not train  # the evaluation split has a source of its own
    spec = Path(val_root if own else root)
    if str(spec) == "." or not spec.exists():  # Path("") is "."
        raise MimcoError(f"data.{'val_root' if own else 'root'} '{spec}' does not exist; data.name=hf reads a "
                         "folder saved by datasets' save_to_disk or parquet files (nothing is downloaded)")
    wanted = ("train",) if train else EVAL_SPLITS
    single = train or own  # a source of one split is this one
    if spec.is_dir() and not any(spec.rglob("*.parquet")):
        try:
            obj = datasets.load_from_disk(str(spec))
        except (FileNotFoundError, ValueError) as e:
            raise MimcoError(f"{spec} cannot be read by datasets.load_from_disk ({str(e).splitlines()[0]}); save it "
                             "with save_to_disk, or point data.root at parquet files") from None
        if not isinstance(obj, datasets.DatasetDict):
            return obj if single else None
        splits: dict[str, Any] = dict(obj)
    elif not (splits := _parquet_splits(spec)):
        raise MimcoError(f"no parquet files and no saved dataset in {spec}; point data.root at a folder saved by "
                         "datasets' save_to_disk or at parquet files")
    if own and len(splits) == 1:
        wanted = tuple(splits)
    if (name := next((k for k in wanted if k in splits), None)) is None:
        return None
    if isinstance(splits[name], list):  # parquet files: converted once into datasets' cache, then memory-mapped
        return datasets.load_dataset("parquet", data_files={name: splits[name]}, split=name)
    return splits[name]


class HFImages(FileImages):
    """A ``datasets.Dataset``'s rows as a dataset like :class:`~mimco.data.files.FileImages`:
    ``items`` (``<source>#<row>``, label), ``classes`` (a ``ClassLabel``'s names), ``read(i)`` the
    image's encoded bytes (the image column read undecoded, or a bytes column)."""

    def __init__(self, ds: Any, source: str, image_column: str = "image", label_column: str = "label",
                 channels: int = 3, transform: Callable | None = None, subset: int = 0, seed: int = 0) -> None:
        datasets = _datasets()
        columns = list(ds.column_names)
        if image_column not in columns:
            raise MimcoError(f"data.image_column={image_column} is not a column of {source} (columns: "
                             f"{', '.join(columns)}); set data.image_column")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        if label_column in columns:
            feature = ds.features[label_column]
            column = ds.with_format("arrow", columns=[label_column])[label_column]  # one Arrow read, not a row walk
            labels = [-1 if c is None else int(c) for c in column.to_pylist()]
            self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else [
                str(c) for c in range(max(labels, default=-1) + 1)]
        else:
            if label_column:
                print(f"mimco: {source} has no column data.label_column={label_column}: its images are unlabelled",
                      file=sys.stderr, flush=True)
            labels, self.classes = [-1] * len(ds), []
        self.items, self.sizes = subset_of(ShardItems([source], [0], labels), [], subset, seed)
        self.ds, self.image_column = ds.select_columns([image_column]), image_column
        self.channels, self.transform = channels, transform

    def read(self, i: int) -> bytes | None:
        row = int(self.items[i][0].rpartition("#")[2])
        try:
            value = self.ds[row][self.image_column]
        except (OSError, ValueError, IndexError):
            return None
        if isinstance(value, dict):  # datasets.Image, undecoded: its bytes, or the file it names
            return value.get("bytes") or read_file(value.get("path") or "")
        return value if isinstance(value, bytes) else None

