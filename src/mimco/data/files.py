"""Image files on disk: class sub-folders (ImageFolder) or a flat folder of unlabelled images.

In training, an unreadable image is replaced by the next readable one (:class:`Substituting`:
deterministic, so every process keeps its full batch) and counted; a run stops when more than
``max_bad_fraction`` of the images read were bad. Evaluation skips them.

The tree is listed once per node and kept for later starts (docs/training.md#image-folders-at-scale).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from mimco import distributed as dist
from mimco.errors import MimcoError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

#: the file list of an image folder, next to its images (``<root>/.mimco-files.json``)
LIST_NAME = ".mimco-files.json"
LIST_VERSION = 1
#: a folder changed this close to its listing (file system time) is not trusted by the next start:
#: its time may not move again when a file is added within the same clock tick
RACY_NS = 2_000_000_000
#: how long a process other than its node's local rank 0 waits for the list before listing itself
WAIT_S = 3600.0
#: a listing of this many files or more says where its list went (smaller ones only when it is not
#: next to the images)
SAY_FILES = 10_000


def _is(entry: os.DirEntry, test: str) -> bool:
    with contextlib.suppress(OSError):
        return bool(getattr(entry, test)())
    return False


def stat_or_none(path: str | Path) -> os.stat_result | None:
    with contextlib.suppress(OSError):
        return os.stat(path)
    return None


def _walk(base: Path) -> dict[str, Any]:
    """Every image file under ``base`` (one pass of ``os.scandir``): the listing that
    :func:`_items` turns into a dataset's items, with the modification time of every folder read,
    each taken before the folder is read. Folders behind symbolic links are not entered, except
    class folders (``base``'s own sub-folders), whose files only the labelled view reads."""
    files: list[tuple[tuple[str, ...], int]] = []
    dirs: dict[str, int] = {}
    classes: list[str] = []
    linked: list[str] = []  # linked class folders

    def scan(rel: tuple[str, ...]) -> None:
        d = os.path.join(base, *rel)
        try:
            dirs["/".join(rel)] = os.stat(d).st_mtime_ns
            with os.scandir(d) as it:
                entries = list(it)
        except PermissionError:  # as Path.rglob: an unreadable folder holds nothing
            return
        for e in entries:
            if _is(e, "is_dir"):
                if top_class := (not rel and not e.name.startswith(".")):
                    classes.append(e.name)
                if e.is_symlink():
                    if not top_class:
                        continue
                    linked.append(e.name)
                scan((*rel, e.name))
            elif os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS and _is(e, "is_file"):
                with contextlib.suppress(OSError):
                    files.append(((*rel, e.name), e.stat().st_size))

    scan(())
    files.sort()  # the order of sorted(Path, ...): part by part
    return {"version": LIST_VERSION, "root": os.path.abspath(base), "classes": sorted(classes),
            "linked": sorted(linked), "dirs": dirs, "files": ["/".join(p) for p, _ in files],
            "sizes": [s for _, s in files], "listed_at": time.time(), "job": job_key()}


class NamedItems(Sequence, abc.ABC):
    """``(name, label)`` of each item, the name made on access by :meth:`name` (a million strings
    take a while to make); the items of shards and of a Hugging Face dataset."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    @abc.abstractmethod
    def name(self, i: int) -> str:
        """The name of item ``i``."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: Any) -> Any:
        i = range(len(self))[i]  # negative and out-of-range indices, and slices, as a list's
        return [self[j] for j in i] if isinstance(i, range) else (self.name(i), self.labels[i])


class FileItems(NamedItems):
    """``(path, label)`` of each image, the path made on access from the list's relative one (a
    million ``Path`` objects take seconds to make); equal to the list of the same pairs."""

    def __init__(self, base: Path, files: list[str], labels: list[int]) -> None:
        super().__init__(labels)
        self.base, self.files = base, files

    def name(self, i: int) -> Path:  # type: ignore[override]
        return self.base / self.files[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def _items(base: Path, listing: dict[str, Any], labelled: bool) -> tuple[FileItems, list[int], list[str]]:
    """(items, their file sizes, class names) of ``listing``: the labelled view holds the files of
    the class folders (label: the folder's index among them); the unlabelled one every file, except
    those behind a linked class folder."""
    classes = listing["classes"] if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    skip = set(listing["linked"])
    if not labelled and not skip:
        return FileItems(base, listing["files"], [-1] * len(listing["files"])), listing["sizes"], classes
    files, labels, sizes = [], [], []
    for rel, size in zip(listing["files"], listing["sizes"]):
        top, sep, _ = rel.partition("/")
        label = (index.get(top) if sep else None) if labelled else (None if sep and top in skip else -1)
        if label is not None:  # None: left out
            files.append(rel)
            labels.append(label)
            sizes.append(size)
    return FileItems(base, files, labels), sizes, classes


def job_key() -> str:
    """This torchrun job and start (address, port, run id, restart), the same on every node: what
    is written under it (a file list, a node's shared cache) was written for this start."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    return repr([os.environ.get(k, "") for k in keys])


def list_places(base: Path) -> list[Path]:
    """Where the file list of ``base`` is kept, in the order tried: next to the images, else (a
    read-only data folder) in the user's cache folder, else in the temporary folder."""
    key = hashlib.sha1(os.path.abspath(base).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimco" / "filelists"
    return [base / LIST_NAME, cache / f"{key}.json", Path(tempfile.gettempdir()) / f"mimco-filelists-{os.getuid()}"
            / f"{key}.json"]


def _read(base: Path, path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the listing at ``path``, "") when it still describes the tree, else (the listing or None,
    why not: "" when there is none, "racy" when it was written while the tree was changing)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            listing = json.loads(f.read())
        dirs: dict[str, int] = listing["dirs"]
        if (listing["version"] != LIST_VERSION or len(listing["files"]) != len(listing["sizes"])
                or not all(isinstance(r, str) and isinstance(m, int) for r, m in dirs.items())
                or not all(isinstance(x, str) for k in ("files", "classes", "linked") for x in listing[k])
                or not all(isinstance(x, int) for x in listing["sizes"])):
            raise ValueError("not a mimco file list of this version")
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"the file list {path} cannot be read ({type(e).__name__})"
    if -1 in dirs.values():
        return listing, "racy"
    # the list next to the images moved the root's time when it was written: the root's time is
    # then carried as the list's own
    own = path == base / LIST_NAME
    changed = sum(getattr(stat_or_none(base / rel), "st_mtime_ns", None)
                  != (st.st_mtime_ns if not rel and own else mtime) for rel, mtime in dirs.items())
    why = f"the image tree at {base} changed ({changed} of {len(dirs)} folders modified since it was listed)"
    return listing, why if changed else ""


def _write(base: Path, listing: dict[str, Any]) -> Path | None:
    """Write ``listing`` atomically (temporary file, then rename) to the first place of
    :func:`list_places` that takes it. Returns the path, or None."""
    for path in list_places(base):
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            before = os.stat(base).st_mtime_ns  # the root's time: moved since the walk began?
            # a list already there (another node's, on a shared file system)
            other = getattr(stat_or_none(path), "st_mtime_ns", None)
            with open(tmp, "w") as f:
                fs_now = min(os.fstat(f.fileno()).st_mtime_ns, time.time_ns())
                racy = {rel for rel, m in listing["dirs"].items() if m >= fs_now - RACY_NS}
                out = {**listing, "dirs": {rel: -1 if rel in racy else m for rel, m in listing["dirs"].items()}}
                json.dump(out, f, separators=(",", ":"))
                f.flush()
                os.replace(tmp, path)
                if path == base / LIST_NAME:  # its rename moved the root's time: carried as the list's own
                    root = os.stat(base)
                    # the root moved since the walk only by another node's list rename (a shared file
                    # system): that list carries the root's time as its own
                    trusted = "" not in racy and (before == listing["dirs"][""] or other == before)
                    os.utime(f.fileno(), ns=(root.st_atime_ns, root.st_mtime_ns if trusted else 0))
            return path
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return None


def _listing(base: Path) -> dict[str, Any]:
    """The listing of ``base``: read from its file list while that still describes the tree, else
    walked (by each node's local rank 0, which writes the list for the others and for later starts)."""
    local_rank, local_world = dist.local_processes()
    if local_rank != 0 and local_world > 1:
        return _wait_for_list(base)
    why = ""
    for path in list_places(base):
        listing, reason = _read(base, path)
        if listing is not None and not reason:
            return listing
        why = why or (reason if reason != "racy" else "")
    if why:
        print(f"mimco: {why}; listing it again", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    listing = _walk(base)
    path = _write(base, listing)
    places = list_places(base)
    where = ("next to the images", "the data folder is read-only",
             "neither the data folder nor the cache folder is writable")[places.index(path)] if path else ""
    if path == places[0] and len(listing["files"]) < SAY_FILES:
        return listing
    print(f"mimco: listed {len(listing['files'])} images under {base} in {time.perf_counter() - t0:.1f} s; "
          + (f"the list is {path} ({where}), read by every process and every later start" if path else
             "the list could not be written anywhere: every start lists the tree again"), file=sys.stderr, flush=True)
    return listing


def _wait_for_list(base: Path) -> dict[str, Any]:
    """Another process of the node: the list its local rank 0 writes (or finds), once it appears
    and still describes the tree or was written for this start; after :data:`WAIT_S`, its own walk."""
    job, deadline, seen = job_key(), time.monotonic() + WAIT_S, {}
    while time.monotonic() < deadline:
        for path in list_places(base):
            st = stat_or_none(path)
            if st is None or seen.get(path) == (st.st_ino, st.st_mtime_ns, st.st_size):
                continue
            seen[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
            listing, reason = _read(base, path)
            if listing is not None and (not reason or listing.get("job") == job):
                return listing
        time.sleep(0.05)
    print(f"mimco: no file list of {base} appeared in {WAIT_S:.0f} s; listing it in this process", file=sys.stderr,
          flush=True)
    return _walk(base)


def subset_of(items: Sequence, sizes: list[int], subset: int, seed: int) -> tuple[Sequence, list[int]]:
    """``data.subset``: ``subset`` items drawn at random (seeded), or all of them (0, or more than there are)."""
    if subset and subset < len(items):
        chosen = random.Random(seed).sample(range(len(items)), subset)
        return [items[i] for i in chosen], [sizes[i] for i in chosen] if sizes else []
    return items, sizes


def read_file(path: str | Path) -> bytes | None:
    with contextlib.suppress(OSError):
        return Path(path).read_bytes()
    return None


def decode_image(data: bytes, channels: int) -> Image.Image | None:
    """Encoded image bytes -> a PIL image (RGB, or L for ``channels=1``; 16-bit grey to 8 bits), or
    None when they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I"):  # 16-bit grey -> 8-bit
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class FileImages(Dataset):
    """Images under ``root``; labelled by class sub-folder when ``labelled`` (else label -1).
    ``__getitem__`` returns ``(transform(image), label)`` or ``None`` for an unreadable file."""

    def __init__(self, root: str, labelled: bool, channels: int = 3, transform: Callable | None = None,
                 subset: int = 0, seed: int = 0) -> None:
        base = Path(root)
        if not root or not base.is_dir():
            raise MimcoError(f"data.root '{root}' is not a folder; set data.root=/path/to/images")
        items, sizes, self.classes = _items(base, _listing(base), labelled)
        if labelled and not self.classes:
            raise MimcoError(f"no class sub-folders in {base}; for a flat folder of unlabelled images use "
                             "data.name=folder")
        if not items:
            raise MimcoError(f"no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) found under {base}; check data.root")
        items, sizes = subset_of(items, sizes, subset, seed)
        self.items, self.sizes, self.channels, self.transform = items, sizes, channels, transform

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> bytes | None:
        """Image ``i``'s encoded bytes (the file), or None when it cannot be read. Other sources of
        encoded images (shards, Hugging Face datasets) override this and keep the rest."""
        return read_file(self.items[i][0])

    def load(self, i: int) -> Image.Image | None:
        """Image ``i`` decoded (RGB, or L for ``channels=1``), or None when it cannot be read."""
        data = self.read(i)
        return None if data is None else decode_image(data, self.channels)

    def __getitem__(self, i: int) -> Any:
        if (img := self.load(i)) is None:
            return None
        return (self.transform(img) if self.transform else img), self.items[i][1]


#: how long a loader worker outlives a SIGTERM or SIGINT it was sent (the main process, sent the same
#: signal, finishes its step and checkpoints well within this, then shuts its workers down)
WORKER_GRACE_S = 300


def _worker_stop(_signum: int, _frame: Any) -> None:
    if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # the first one: end at the latest after the grace
        signal.setitimer(signal.ITIMER_REAL, WORKER_GRACE_S)


def worker_ignores_stop(_worker_id: int) -> None:
    """``worker_init_fn`` of every image loader: its workers outlive a SIGTERM or SIGINT by
    :data:`WORKER_GRACE_S`. Slurm (and Ctrl-C) signal every process; a worker killed by it would end
    the run ("DataLoader worker ... exited unexpectedly") before the main process could finish its
    step and checkpoint. The main process shuts its workers down when done (``BatchStream.close``)."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _worker_stop)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def collate_skip_bad(batch: list[Any]) -> tuple[Any, int]:
    """Collate the readable samples; returns (collated or None, number of unreadable ones)."""
    good = [b for b in batch if b is not None]
    return (default_collate(good) if good else None), len(batch) - len(good)


class Substituting(Dataset):
    """Training view of a per-image dataset. Key ``epoch * N + i`` gives ``(sample i, the indices of
    the unreadable files tried)``: an unreadable file is replaced by the next readable one (the same
    choice on every process and epoch), so a batch never shrinks; the image's augmentation is drawn
    from generators seeded by (``seed``, epoch, i) alone, whatever the worker, worker count or resume."""

    MAX_TRIES = 64

    def __init__(self, images: Any, seed: int = 0) -> None:
        self.images, self.seed = images, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[Any, tuple[int, ...]]:
        n = len(self.images)
        epoch, i = divmod(key, n)
        for k in range(min(self.MAX_TRIES, n)):
            with _seeded(((self.seed * 100_003 + epoch) * n + i) % 2**63):
                item = self.images[(i + k) % n]
            if item is not None:
                return item, tuple((i + j) % n for j in range(k))
        raise MimcoError(f"{self.MAX_TRIES} consecutive images from {self.images.items[i][0]} on cannot be read; "
                         "remove the corrupt files")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU) generators seeded with ``seed`` inside, restored after."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def collate_substituted(batch: list[tuple[Any, tuple[int, ...]]]) -> tuple[Any, list[int]]:
    """Collate :class:`Substituting` items: (collated samples, the unreadable files met, by index)."""
    return default_collate([b[0] for b in batch]), [j for b in batch for j in b[1]]


class BadImageCounter:
    """Counts unreadable images among those read (a rate: a file read in two epochs counts twice),
    and which files were unreadable (``files``, dataset indices; each once). ``check`` (given the
    counts of every process, so that all processes stop together) raises past ``max_fraction``."""

    def __init__(self, max_fraction: float, dataset_size: int) -> None:
        self.max_fraction, self.min_seen = max_fraction, min(dataset_size, 200)
        self.bad = self.seen = 0
        self.files: set[int] = set()
        self.undecodable = 0  # files read whose JPEG data failed to decode on the device (data.decode=gpu)

    def update(self, read: int, files: Sequence[int] = (), undecodable: int = 0) -> None:
        """``read`` images read, among them the unreadable ``files`` (by index) and ``undecodable`` ones."""
        self.bad += len(files) + undecodable
        self.seen += read
        self.files.update(files)
        self.undecodable += undecodable

    def check(self, bad: int, seen: int) -> None:
        """Raise when ``bad`` of ``seen`` images (summed over processes) is past the limit."""
        if seen >= self.min_seen and bad > self.max_fraction * seen:
            raise MimcoError(f"{bad} of {seen} images could not be read (more than data.max_bad_fraction="
                             f"{self.max_fraction}); remove the corrupt files or raise data.max_bad_fraction")
