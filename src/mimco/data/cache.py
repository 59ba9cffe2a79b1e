"""``data.cache``: decode an image folder once into memory, then train at in-memory speed.

Loader workers decode every image every epoch; for a folder that fits in memory that decoding is
most of a small model's step. Cached, the folder becomes a uint8 tensor (N, C, S, S) and training
takes the batched-view path of the in-memory datasets (the same augmentation recipe, run on whole
batches, optionally on the GPU).

Each image is resized so its short side is S (``data.cache_size``, default ``data.img_size``) and
centre-cropped to S x S, once: random crops then come from that square, as they do for the
in-memory datasets. Unreadable files are left out and counted (the run stops past
``data.max_bad_fraction``), like the per-image path.

Under torchrun the cache is built once per node: local rank 0 decodes into a shared-memory file
(``/dev/shm``) that the node's other processes map, so a node with 8 processes holds one copy, not 8,
and the memory check counts that one copy (agreed by every process).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mimco import distributed as dist
from mimco.data.files import FileImages, collate_skip_bad, worker_ignores_stop
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
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_memory(need: int, n: int, size: int, device: torch.device | None = None) -> None:
    """Refuse a cache that would take more than half the node's free memory, on every process
    together. The cache is built once per node and shared by its processes, so one copy is
    counted, whatever LOCAL_WORLD_SIZE is; the verdict is all-reduced (max), so a node that cannot
    hold it stops the whole run in one line instead of leaving the others waiting."""
    free = available_bytes()
    here = bool(free and need > free // 2)
    refuse = here
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
    worker count). Refuses a folder that would take more than half the free memory. Under torchrun
    with several processes on a node (``device``: the group's, for the one collective), the node's
    local rank 0 decodes into a shared-memory file that the others map: one copy and one decode per
    node, not one per process."""
    n, c = len(files), files.channels
    need = n * c * size * size
    local_rank, local_world = dist.local_processes()
    shared = dist.is_dist() and local_world > 1
    path = _shared_path(files, size, need) if shared else None
    if path is not None and local_rank == 0:
        _remove(path)  # a crashed run's leftovers, before anyone can look for them (the check below is collective)
    check_memory(need, n, size, device)
    t0 = time.perf_counter()
    if path is None:
        images = torch.empty(n, c, size, size, dtype=torch.uint8)
        labels, kept, bad = _decode_into(images, files, size, num_workers)
        _check_bad(bad, n, max_bad_fraction)
        images, labels = images[:kept], labels[:kept]
        if _grey(images):
            images = images[:,
                            :1].clone()  # a grey folder: one channel kept (expanded on access), a third of the memory
    elif local_rank == 0:
        images, labels, kept, bad = _build_shared(path, files, size, num_workers, max_bad_fraction, need, local_world)
    else:
        images, labels, kept, bad = _map_shared(path, n, c, size, need, local_rank)
    if verbose:
        skipped = f"; skipped {bad} unreadable files" if bad else ""
        how = f", shared by the {local_world} processes of this node" if path is not None else ""
        print(f"mimco: cached {kept} images at {size} px ({images.numel() / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s "
              f"with {num_workers} workers{skipped}{how}", file=sys.stderr, flush=True)
    return images, labels


def _decode_into(images: torch.Tensor, files: FileImages, size: int, num_workers: int) -> tuple[torch.Tensor, int, int]:
    """Decode every readable image into ``images`` (N, C, S, S) in file order: (labels (N,), kept, unreadable)."""
    labels = torch.empty(len(files), dtype=torch.long)
    kept, bad = 0, 0
    # its own generator: iterating must not draw from the global one, which the models' initialisation uses next
    loader = DataLoader(_Square(files, size), batch_size=256, num_workers=num_workers, collate_fn=collate_skip_bad,
                        worker_init_fn=worker_ignores_stop,
                        generator=torch.Generator())
    for batch, n_bad in loader:
        bad += n_bad
        if batch is not None:
            x, y = batch
            images[kept : kept + len(x)], labels[kept : kept + len(x)] = x, y
            kept += len(x)
    return labels[:kept].clone(), kept, bad


def _check_bad(bad: int, n: int, max_bad_fraction: float) -> None:
    if bad > max_bad_fraction * n:
        raise MimcoError(f"{bad} of {n} images could not be read (more than data.max_bad_fraction={max_bad_fraction}); "
                         "remove the corrupt files or raise data.max_bad_fraction")


def _grey(images: torch.Tensor) -> bool:
    return images.shape[1] == 3 and torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def _room(folder: Path) -> int:
    """Bytes free for an unprivileged writer in ``folder`` (0 when it is not a writable folder)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize if os.access(folder, os.W_OK) else 0


def _shared_path(files: FileImages, size: int, need: int) -> Path:
    """The node's cache file, named by the folder, the size and this torchrun job (its rendezvous
    address, port and restart count), so two runs never meet: in /dev/shm (memory) when it has the
    room, else in the temporary folder (a file the processes map, through the page cache). A
    container's small /dev/shm (64 MiB by default in Docker) would otherwise kill the decode with
    SIGBUS when the mapped file outgrows it."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    job = [os.environ.get(k, "") for k in keys]
    first, last = files.items[0][0], files.items[-1][0]
    key = hashlib.sha1(repr((str(first), str(last), len(files), files.channels, size, job)).encode()).hexdigest()[:16]
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if _room(base) > need + (64 << 20):
            return base / f"mimco-cache-{key}"
    raise MimcoError(f"data.cache=true shares its {need / 2**30:.1f} GiB among this node's processes through a file, "
                     f"but neither /dev/shm ({_room(Path('/dev/shm')) / 2**30:.1f} GiB free) nor "
                     f"{tempfile.gettempdir()} "
                     f"({_room(Path(tempfile.gettempdir())) / 2**30:.1f} GiB free) has room; give the container more "
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
        labels, kept, bad = _decode_into(images, files, size, num_workers)
        _check_bad(bad, n, max_bad_fraction)
        grey = _grey(images[:kept])
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
    images = images[:kept]
    return (images[:, :1] if grey else images), labels, kept, bad


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
