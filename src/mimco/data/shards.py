"""WebDataset tar shards (``data.name=shards``), written by ``mimco shards`` and read with random
access, so that a set of shards is a dataset like an image folder (the same seeded order or a
shard-local one, ``data.shuffle_buffer``; exact resume; unreadable samples substituted and counted).

The shard layout, ``index.json`` (where each sample's image lies, so a sample is one ``pread`` and no
tar header is parsed) and other tools' shards (walked once with ``tarfile``, the result cached):
docs/training.md#shards-and-hugging-face-datasets.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from mimco.data.files import FileImages, NamedItems, stat_or_none, subset_of
from mimco.errors import MimcoError
from mimco.io import atomic_json

#: the index of a shard set, next to its shards
INDEX = "index.json"
#: wids' descriptor kind (``index.json`` is one)
KIND = "wids-shard-index-v1"
#: image extensions in a sample, in the order looked for
IMAGE_KEYS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
#: shard files kept open per process (a file descriptor each)
OPEN_SHARDS = 256
#: WebDataset's sample key: a member's path up to the first dot of its base name
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand(spec: str) -> list[str]:
    """Shard paths of ``spec``: brace patterns (``train-{000000..000127}.tar``), several joined by
    ``::`` (webdataset's separator)."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise MimcoError("a brace pattern of shards needs braceexpand: pip install 'mimco[shards]'") from None
    return [p for part in spec.split("::") for p in braceexpand(part)]


def members(path: str) -> dict[str, list[int]]:
    """What a WebDataset shard holds, walked once with ``tarfile``: per sample (consecutive
    members sharing a key, in the tar's order) the byte ``offsets`` and ``sizes`` of its image
    (-1 / 0: none; of several, the first extension of :data:`IMAGE_KEYS`) and its ``labels`` (the
    ``.cls`` text; -1: none)."""
    out: dict[str, list[int]] = {"offsets": [], "sizes": [], "labels": []}
    key, rank = None, len(IMAGE_KEYS)
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            got = _KEY.match(m.name)
            if not m.isfile() or got is None:
                continue
            if got.group(1) != key:  # a new sample
                key, rank = got.group(1), len(IMAGE_KEYS)
                out["offsets"].append(-1), out["sizes"].append(0), out["labels"].append(-1)
            ext = "." + got.group(2).lower()
            if ext == ".cls":
                f = tar.extractfile(m)
                try:
                    out["labels"][-1] = int((f.read() if f is not None else b"").decode().strip())
                except (UnicodeDecodeError, ValueError):
                    out["labels"][-1] = -1
            elif ext in IMAGE_KEYS and IMAGE_KEYS.index(ext) < rank:
                rank = IMAGE_KEYS.index(ext)
                out["offsets"][-1], out["sizes"][-1] = m.offset_data, m.size
    return out


def _read_index(path: Path) -> dict[str, Any]:
    try:
        desc = json.loads(path.read_text())
        shards = desc["shardlist"]
        if not all(isinstance(s["url"], str) and isinstance(s["nsamples"], int) for s in shards):
            raise ValueError
    except FileNotFoundError:
        raise MimcoError(f"data.root: {path} does not exist; write the shards with `mimco shards` or point "
                         "data.root at their index.json or a brace pattern of the .tar files") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise MimcoError(f"{path} is not a shard index (wids' shardlist JSON); write it again with `mimco shards` or "
                         "point data.root at the .tar files (a brace pattern)") from None
    for s in shards:
        s["url"] = str(path.parent / s["url"]) if not os.path.isabs(s["url"]) else s["url"]
    return desc


def _scan(paths: list[str]) -> list[dict[str, Any]]:
    """The shard-list entries of shards written by another tool (each one walked once, see
    :func:`members`), kept in the cache folder under the shards' paths, sizes and times, so a
    later start reads one file."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise MimcoError(f"data.root: shard {p} does not exist; check the pattern") from None
        stats.append((p, st.st_size, st.st_mtime_ns))
    key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimco" / "shards" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cache.read_text())
    print(f"mimco: reading where the samples and labels of {len(paths)} shards are, once (kept in {cache})",
          file=sys.stderr, flush=True)
    shards = []
    for p, size, _ in stats:
        try:
            held = members(p)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise MimcoError(f"shard {p} cannot be read as a tar file ({type(e).__name__}); rewrite it or leave it "
                             "out of data.root") from None
        shards.append({"url": p, "nsamples": len(held["labels"]), "filesize": size, **held})
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(cache, shards)
    return shards


def _complete(desc: dict[str, Any]) -> dict[str, Any]:
    """``desc`` with every shard's offsets, sizes and labels: those an index lacks (wids' own
    descriptors) are walked once (:func:`_scan`); the class names default to the label numbers."""
    shards = desc["shardlist"]

    def held(s: dict[str, Any], k: str) -> bool:
        return isinstance(s.get(k), list) and len(s[k]) == s["nsamples"]

    keys = ("offsets", "sizes", "labels")
    lacking = [i for i, s in enumerate(shards) if not all(held(s, k) for k in keys)]
    if lacking:
        for i, got in zip(lacking, _scan([shards[i]["url"] for i in lacking])):
            given = shards[i]
            if given["nsamples"] != got["nsamples"]:
                raise MimcoError(f"shard {given['url']} holds {got['nsamples']} samples, its index says "
                                 f"{given['nsamples']}; write the index again")
            shards[i] = {**given, **{k: given[k] if held(given, k) else got[k] for k in keys}}
    meta = desc.setdefault("mimco", {})
    if not meta.get("classes"):
        top = max((max(s["labels"], default=-1) for s in shards), default=-1)
        meta["classes"] = [str(c) for c in range(top + 1)]
    return desc


def describe(root: str, train: bool, val_root: str = "") -> dict[str, Any] | None:
    """The shard-list descriptor of a split (None: the source has no such split). ``root``: a folder
    written by ``mimco shards`` (with ``train``/``val`` inside, or one split), an ``index.json``, or
    brace patterns of ``.tar`` files; ``val_root`` the same for the evaluation split."""
    own = train or bool(val_root)  # False: the evaluation split looked for beside the training one
    spec = root if train or not val_root else val_root
    if not spec:
        raise MimcoError("data.name=shards needs data.root: a folder written by `mimco shards`, its index.json, or a "
                         "brace pattern of .tar files (/data/train-{000000..000127}.tar)")
    if ".tar" in spec:  # a pattern names one split; the evaluation one comes from data.val_root
        return _complete({"__kind__": KIND, "shardlist": _scan(expand(spec))}) if own else None
    base = Path(spec)
    if base.suffix == ".json":
        path = base if own else None
    elif (base / "train" / INDEX).is_file():  # split folders
        path = base / ("train" if own else "val") / INDEX
        path = path if path.is_file() else None
    else:  # the folder of one (training) split
        path = base / INDEX if own else None
    return None if path is None else _complete(_read_index(path))


class ShardItems(NamedItems):
    """``(name, label)`` of each sample: the name is ``<shard path>#<sample number in the shard>``."""

    def __init__(self, urls: list[str], starts: list[int], labels: list[int]) -> None:
        super().__init__(labels)
        self.urls, self.starts = urls, starts

    def name(self, i: int) -> str:
        s = _shard_of(self.starts, i)
        return f"{self.urls[s]}#{i - self.starts[s]}"


def _shard_of(starts: list[int], i: int) -> int:
    return bisect.bisect_right(starts, i) - 1


class ShardImages(FileImages):
    """The samples of a shard set as a dataset: ``items``, ``classes``, ``read(i)`` (the image's
    encoded bytes) and everything :class:`~mimco.data.files.FileImages` builds on them (decoding,
    ``transform``, the cache, the GPU decode, subsets)."""

    def __init__(self, desc: dict[str, Any], channels: int = 3, transform: Callable | None = None, subset: int = 0,
                 shuffle_buffer: int = 0, verbose: bool = True) -> None:
        shards = desc["shardlist"]
        labels: list[int] = [c for s in shards for c in s["labels"]]
        self.offsets = torch.tensor([o for s in shards for o in s["offsets"]], dtype=torch.int64)
        self.nbytes = torch.tensor([n for s in shards for n in s["sizes"]], dtype=torch.int64)
        self.classes = list(desc.get("mimco", {}).get("classes", []))
        self.urls = [s["url"] for s in shards]
        self._number = {u: k for k, u in enumerate(self.urls)}
        self.lengths = [s["nsamples"] for s in shards]
        starts = [0, *itertools.accumulate(self.lengths[:-1])]
        labelled = any(c >= 0 for c in labels)
        if not labelled:
            labels = [-1] * len(labels)
        items: Sequence = ShardItems(self.urls, starts, labels)
        outside = [i for i, c in enumerate(labels) if c >= len(self.classes)]
        if outside:
            name, c = items[outside[0]]
            raise MimcoError(f"sample {name} has label {c}, outside the index's {len(self.classes)} classes; write "
                             "the shards again with `mimco shards` or fix the index's classes")
        unlabelled = sum(c < 0 for c in labels) if labelled else 0
        if unlabelled:
            items = [items[i] for i, c in enumerate(labels) if c >= 0]
            if verbose:
                print(f"mimco: {unlabelled} of {len(labels)} samples in the shards have no label (.cls); left out of "
                      "this labelled split", file=sys.stderr, flush=True)
        if not len(items):
            raise MimcoError("the shards hold no samples" + (" with a label" if labelled else ""))
        self.starts, self.shuffle_buffer = starts, shuffle_buffer
        self.items, self.sizes = subset_of(items, [], subset, 0)
        self.channels, self.transform = channels, transform
        self._open: dict[str, Any] = {}
        if verbose:  # one line per shard missing or shorter than its index says: its samples read as unreadable
            for s in shards:
                want = s.get("filesize")
                size = getattr(stat_or_none(s["url"]), "st_size", -1)
                if isinstance(want, int) and size != want:
                    what = "is missing" if size < 0 else f"is {size} bytes, its index says {want}"
                    print(f"mimco: shard {s['url']} {what}: its {s['nsamples']} samples will count as unreadable "
                          "(data.max_bad_fraction)", file=sys.stderr, flush=True)

    def __getstate__(self) -> dict[str, Any]:  # loader workers open their own shards
        return {**self.__dict__, "_open": {}}

    def _fd(self, url: str) -> int | None:
        """An open descriptor of shard ``url`` (None: it cannot be opened), the most recent
        :data:`OPEN_SHARDS` kept."""
        fd = self._open.pop(url, -1)
        if fd == -1:
            if len(self._open) >= OPEN_SHARDS:
                old = self._open.pop(next(iter(self._open)))
                if old is not None:
                    os.close(old)
            fd = None
            with contextlib.suppress(OSError):
                fd = os.open(url, os.O_RDONLY)
        self._open[url] = fd  # most recently used last
        return fd

    def read(self, i: int) -> bytes | None:
        url, _, j = self.items[i][0].rpartition("#")
        k = self.starts[self._number[url]] + int(j)
        offset, size = int(self.offsets[k]), int(self.nbytes[k])
        fd = self._fd(url)
        if fd is None or offset < 0:
            return None
        with contextlib.suppress(OSError):
            data = os.pread(fd, size, offset)
            return data if len(data) == size else None  # short: a truncated shard
        return None

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor | None:
        """The order of the whole split in ``epoch`` with ``data.shuffle_buffer=N`` (the shards in a seeded
        order, the samples shuffled within windows of N); None: a uniform shuffle, as an image folder."""
        if not self.shuffle_buffer or len(self.items) != sum(self.lengths):
            return None
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        runs = [torch.arange(self.starts[s], self.starts[s] + self.lengths[s])
                for s in torch.randperm(len(self.lengths), generator=g).tolist()]
        seq = torch.cat(runs)
        for w in range(0, len(seq), self.shuffle_buffer):
            part = seq[w : w + self.shuffle_buffer]
            seq[w : w + self.shuffle_buffer] = part[torch.randperm(len(part), generator=g)]
        return seq


# --- writing -------------------------------------------------------------------------------------

#: formats PIL names -> the extension a sample's image gets
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "PPM": ".ppm"}
PROGRESS = ".mimco-shards-progress.json"


def parse_size(text: str) -> int:
    """``1G``, ``500M``, ``2000000`` -> bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise MimcoError(f"--shard-size {text}: give bytes, e.g. 1G, 500M or 1000000") from None
    if n < 1:
        raise MimcoError(f"--shard-size {text} must be positive")
    return int(n)


def _encoded(dataset: Any, i: int) -> tuple[bytes, str] | None:
    """(encoded bytes, extension) of image ``i``: a file's own bytes (not decoded or encoded again)
    when its header reads as an image, an in-memory image as PNG; None when unreadable."""
    from torchvision.transforms.functional import to_pil_image

    if isinstance(dataset, FileImages):
        if (data := dataset.read(i)) is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return (data, _EXT[fmt]) if fmt in _EXT else None
    buf = io.BytesIO()
    to_pil_image(dataset.images[i]).save(buf, format="PNG")
    return buf.getvalue(), ".png"


def write_shards(dataset: Any, out: Path, source: str, classes: list[str], shard_size: int = 2**30,
                 prefix: str = "shard", progress: bool = True) -> dict[str, Any]:
    """Write ``dataset`` (a :class:`FileImages` or an in-memory ``ImageArray``) as tar shards of
    about ``shard_size`` bytes in ``out``, and their ``index.json`` (returned). Each shard is renamed
    into place whole; an interrupted write continues from its last whole shard (a progress file)."""
    try:
        from webdataset import TarWriter
    except ImportError:
        raise MimcoError("mimco shards needs webdataset: pip install 'mimco[shards]'") from None
    if (out / INDEX).exists():
        raise MimcoError(f"--out {out} holds shards already ({INDEX}); choose another folder (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    fingerprint = {"source": source, "images": n, "shard_size": shard_size, "prefix": prefix}
    state: dict[str, Any] = {"fingerprint": fingerprint, "shards": [], "next": 0, "unreadable": 0}
    progress_file = out / PROGRESS
    if progress_file.exists():
        try:
            state = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            raise MimcoError(f"{progress_file} cannot be read; delete {out} and write the shards again") from None
        if state.get("fingerprint") != fingerprint:
            raise MimcoError(f"--out {out} holds an unfinished write of another source or shard size "
                             f"({state.get('fingerprint')}); choose another folder (or delete it)")
        print(f"mimco: continuing the write in {out} from image {state['next']} ({len(state['shards'])} shards "
              "written)", file=sys.stderr, flush=True)
    elif any(out.iterdir()):
        raise MimcoError(f"--out {out} is not empty; choose a new folder so nothing is overwritten")
    for stale in out.glob(".*.tar.tmp"):
        stale.unlink()
    bar = tqdm(total=n, initial=state["next"], unit="img", desc="shards", disable=not progress, dynamic_ncols=True)
    i = state["next"]
    while i < n:
        name = f"{prefix}-{len(state['shards']):06d}.tar"
        tmp = out / f".{name}.tmp"
        got: list[int] = []
        with open(tmp, "wb") as f:
            with TarWriter(f, encoder=False, mtime=0) as writer:  # a fixed time: the same source, the same bytes
                while i < n and f.tell() < shard_size:
                    if (enc := _encoded(dataset, i)) is None:
                        state["unreadable"] += 1
                    else:
                        label = int(dataset.items[i][1] if isinstance(dataset, FileImages) else dataset.labels[i])
                        writer.write({"__key__": f"{i:09d}", enc[1][1:]: enc[0], "cls": str(label).encode()})
                        got.append(label)
                    i += 1
                    bar.update(1)
            f.flush()
            os.fsync(f.fileno())
        if got:
            held = members(str(tmp))  # where each image landed: a read is then one pread
            os.replace(tmp, out / name)
            state["shards"].append({"url": name, "nsamples": len(got), "filesize": (out / name).stat().st_size,
                                    "labels": got, "offsets": held["offsets"], "sizes": held["sizes"]})
        else:
            tmp.unlink()
        state["next"] = i
        atomic_json(progress_file, state)
    bar.close()
    if not state["shards"]:
        raise MimcoError("no readable image in the source; nothing written")
    index = {"__kind__": KIND, "wids_version": 1, "name": source, "shardlist": state["shards"],
             "mimco": {"version": 1, "classes": classes, "unreadable": state["unreadable"]}}
    atomic_json(out / INDEX, index)
    progress_file.unlink()
    return index
