"""``data.cache``: decode an image folder once into memory, then train at in-memory speed (the size S,
``data.cache_size``, and unreadable files: docs/performance.md#image-folders).

Loader workers decode every image every epoch, most of a small model's step. Cached, the folder
becomes a uint8 tensor (N, C, S, S), each image resized and centre-cropped to S x S once, that takes
the batched-view path of the in-memory datasets. Under torchrun local rank 0 of each node decodes
into a shared-memory file (``/dev/shm``) that the node's other processes map: one copy per node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mimco import distributed as dist
from mimco.data.files import BadImageCounter, FileImages, collate_skip_bad, job_key, worker_ignores_stop
from mimco.errors import MimcoError


class _Square(Dataset):
    """(uint8 (C, S, S), label) of each image of a folder, or None for an unreadable file."""

    def __init__(self, files: FileImages, size: int) -> None:
        self.files = files
        self.tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        img = self.files.load(i)
        return None if img is None else (self.tf(img), self.files.items[i][1])


def available_bytes() -> int:
    """Memory the system can still give (MemAvailable), or 0 when unknown."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def check_memory(need: int, n: int, size: int, device: torch.device | None = None) -> None:
    """Refuse a cache (one copy per node) that would take more than half the node's free memory; the
    verdict is all-reduced (max), so a node that cannot hold it stops every process in one line."""
    free = available_bytes()
    refuse = here = bool(free and need > free // 2)
    if dist.is_dist() and device is not None:
        refuse = bool(dist.all_reduce_(torch.tensor([float(here)], device=device), "max").item())
    if refuse:
        where = f"only {free / 2**30:.1f} GiB is free" if here else "another node has too little free"
        raise MimcoError(f"data.cache=true needs {need / 2**30:.1f} GiB for {n} images at {size} px (one copy per "
                         f"node) but {where}; set data.cache=false (or a smaller data.cache_size)")


def decode_all(files: FileImages, size: int, num_workers: int, max_bad_fraction: float,
               verbose: bool = True, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable image of ``files`` as uint8 (N, C, size, size), with its labels (N,); C = 1
    when every image is grey (:class:`~mimco.data.build.ImageArray` repeats it on access).
    Decoded by ``num_workers`` loader processes in file order (the result does not depend on the
    worker count); once per node under torchrun (``device``: the group's, for the one collective)."""
    n, c = len(files), files.channels
    need = n * c * size * size
    local_rank, local_world = dist.local_processes()
    path = _shared_path(files, size, need) if dist.is_dist() and local_world > 1 else None
    if path is not None and local_rank == 0:
        _remove(path)  # a crashed run's leftovers, before anyone can look for them (the check below is collective)
    check_memory(need, n, size, device)
    t0 = time.perf_counter()
    if path is None:
        images = torch.empty(n, c, size, size, dtype=torch.uint8)
        labels, kept, bad, grey = _decode_into(images, files, size, num_workers, max_bad_fraction)
        # a grey folder: one channel kept (expanded on access), a third of the memory
        images = images[:kept, :1].clone() if grey else images[:kept]
    elif local_rank == 0:
        images, labels, kept, bad = _build_shared(path, files, size, num_workers, max_bad_fraction, need, local_world)
    else:
        images, labels, kept, bad = _map_shared(path, n, c, size, need, local_rank)
    if verbose:
        skipped = f"; skipped {bad} unreadable files" if bad else ""
        how = f", shared by the {local_world} processes of this node" if path is not None else ""
        print(f"mimco: cached {kept} images at {size} px ({images.numel() / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s with {num_workers} workers{skipped}{how}", file=sys.stderr, flush=True)
    return images, labels


def _decode_into(images: torch.Tensor, files: FileImages, size: int, num_workers: int,
                 max_bad_fraction: float) -> tuple[torch.Tensor, int, int, bool]:
    """Decode every readable image into ``images`` (N, C, S, S) in file order: (labels (N,), kept,
    unreadable, whether every kept image is grey); raises past ``max_bad_fraction`` unreadable."""
    labels = torch.empty(len(files), dtype=torch.long)
    kept, bad = 0, 0
    # its own generator: iterating must not draw from the global one, which the models' initialisation uses next
    loader = DataLoader(_Square(files, size), batch_size=256, num_workers=num_workers, collate_fn=collate_skip_bad,
                        worker_init_fn=worker_ignores_stop, generator=torch.Generator())
    for batch, n_bad in loader:
        bad += n_bad
        if batch is not None:
            x, y = batch
            images[kept : kept + len(x)], labels[kept : kept + len(x)] = x, y
            kept += len(x)
    BadImageCounter(max_bad_fraction, len(files)).check(bad, len(files))
    x = images[:kept]
    grey = x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    return labels[:kept].clone(), kept, bad, grey


def _room(folder: Path) -> int:
    """Bytes free for an unprivileged writer in ``folder`` (0 when it is not a writable folder)."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free if os.access(folder, os.W_OK) else 0
    return 0


def _shared_path(files: FileImages, size: int, need: int) -> Path:
    """The node's cache file, named by the folder, the size and this torchrun job, so two runs never
    meet: in /dev/shm when it has the room, else in the temporary folder (mapped through the page
    cache): a container's small /dev/shm (64 MiB in Docker) would kill the decode with SIGBUS."""
    first, last = files.items[0][0], files.items[-1][0]
    key = hashlib.sha1(repr((str(first), str(last), len(files), files.channels, size, job_key())).encode())
    tmp = tempfile.gettempdir()
    for base in (Path("/dev/shm"), Path(tmp)):
        if _room(base) > need + (64 << 20):
            return base / f"mimco-cache-{key.hexdigest()[:16]}"
    raise MimcoError(f"data.cache=true shares its {need / 2**30:.1f} GiB among this node's processes through a file, "
                     f"but neither /dev/shm ({_room(Path('/dev/shm')) / 2**30:.1f} GiB free) nor {tmp} "
                     f"({_room(Path(tmp)) / 2**30:.1f} GiB free) has room; give the container more "
                     "shared memory (docker --shm-size), point TMPDIR at a larger disk, or set data.cache=false")


def _part(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove(path: Path) -> None:
    for p in [path, *path.parent.glob(path.name + ".*")]:
        p.unlink(missing_ok=True)


def _map(path: Path, need: int, n: int, c: int, size: int) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=need, dtype=torch.uint8).view(n, c, size, size)


def _build_shared(path: Path, files: FileImages, size: int, num_workers: int, max_bad_fraction: float, need: int,
                  local_world: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Local rank 0: decode straight into the mapped file, publish the labels and a ready mark (or the
    error), wait until every local process has mapped it, then unlink it (the mappings keep the memory)."""
    n, c = len(files), files.channels
    try:
        with open(path, "wb") as f:
            f.truncate(need)
        images = _map(path, need, n, c, size)
        labels, kept, bad, grey = _decode_into(images, files, size, num_workers, max_bad_fraction)
        torch.save({"labels": labels, "kept": kept, "bad": bad, "grey": grey}, _part(path, ".tmp"))
        os.replace(_part(path, ".tmp"), _part(path, ".meta"))
    except BaseException as e:
        _part(path, ".error").write_text(str(e) if isinstance(e, MimcoError) else f"{type(e).__name__}: {e}")
        raise
    deadline = time.monotonic() + 600
    while sum(_part(path, f".mapped{r}").exists() for r in range(1, local_world)) < local_world - 1:
        if time.monotonic() > deadline:
            break  # a process died before mapping it: leave the files, the next run removes them
        time.sleep(0.05)
    else:
        _remove(path)
    return (images[:kept, :1] if grey else images[:kept]), labels, kept, bad


def _map_shared(path: Path, n: int, c: int, size: int, need: int,
                local_rank: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Another local process: wait for local rank 0's cache (or its error), map it, say so."""
    while not _part(path, ".meta").exists():
        if _part(path, ".error").exists():
            raise MimcoError(_part(path, ".error").read_text())
        time.sleep(0.2)
    meta = torch.load(_part(path, ".meta"), weights_only=True)
    images = _map(path, need, n, c, size)[: meta["kept"]]
    _part(path, f".mapped{local_rank}").touch()
    return (images[:, :1] if meta["grey"] else images), meta["labels"], meta["kept"], meta["bad"]
