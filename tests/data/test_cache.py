"""data.cache: an image folder decoded once, then trained on like an in-memory dataset."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from mimco.config import DataConfig
from mimco.data import cache
from mimco.data.build import cached
from mimco.data.files import FileImages
from mimco.data.procedural import make_shapes
from mimco.errors import MimcoError
from mimco.pipeline import run_stage
from tests.helpers import HANG, tiny_teacher_cfg


def _export(root, images):
    """Each (3, S, S) uint8 image as a lossless PNG whose sorted name keeps the array's order."""
    root.mkdir(parents=True)
    for i, x in enumerate(images):
        Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0))).save(root / f"{i:05d}.png")


def test_a_square_folder_is_cached_pixel_for_pixel(tmp_path):
    images, _ = make_shapes(40, 16, seed=0)
    _export(tmp_path / "imgs", images)
    files = FileImages(str(tmp_path / "imgs"), labelled=False)
    x, y = cache.decode_all(files, 16, num_workers=0, max_bad_fraction=0.0, verbose=False)
    assert x.dtype == torch.uint8 and x.shape == (40, 3, 16, 16) and torch.equal(x, torch.from_numpy(images))
    assert torch.equal(y, torch.full((40,), -1))
    x2, _ = cache.decode_all(files, 16, num_workers=2, max_bad_fraction=0.0, verbose=False)
    assert torch.equal(x, x2)  # the worker count changes nothing


def test_short_side_resized_then_centre_cropped(tmp_path):
    """A 64 x 32 image, black left half, white right half: the centre 16 x 16 of its 32 x 16
    resize is half black (left), half white (right), and labels follow the class folders."""
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 32:] = 255
    Image.fromarray(wide).save(tmp_path / "imgs" / "a" / "wide.png")
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "imgs" / "b" / "grey.png")
    arr = cached(FileImages(str(tmp_path / "imgs"), labelled=True), DataConfig(img_size=16, num_workers=0), False)
    assert arr.images.shape == (2, 1, 16, 16)  # every image grey: one channel kept
    x = arr.batch(torch.arange(2))
    assert x.shape == (2, 3, 16, 16)
    assert (x[0, :, :, :7] == 0).all() and (x[0, :, :, 9:] == 255).all()
    assert (x[1] == 90).all()
    assert arr.labels.tolist() == [0, 1] and len(arr) == 2


def test_unreadable_files_are_left_out_and_counted(tmp_path, capsys):
    images, _ = make_shapes(20, 16, seed=0)
    _export(tmp_path / "imgs", images)
    (tmp_path / "imgs" / "00003.png").write_bytes(b"")  # the 4th image is now unreadable
    files = FileImages(str(tmp_path / "imgs"), labelled=False)
    x, _ = cache.decode_all(files, 16, num_workers=0, max_bad_fraction=0.1)
    err = capsys.readouterr().err
    assert "mimco: cached 19 images at 16 px" in err and "skipped 1 unreadable files" in err
    assert torch.equal(x, torch.from_numpy(np.delete(images, 3, axis=0)))
    with pytest.raises(MimcoError, match="1 of 20 images could not be read"):
        cache.decode_all(files, 16, num_workers=0, max_bad_fraction=0.01)


def test_a_folder_larger_than_memory_is_refused(tmp_path, monkeypatch):
    images, _ = make_shapes(4, 16, seed=0)
    _export(tmp_path / "imgs", images)
    monkeypatch.setattr(cache, "available_bytes", lambda: 4 * 3 * 16 * 16)  # half of it is less than the folder
    with pytest.raises(MimcoError, match="data.cache=true needs .* for 4 images at 16 px .* set data.cache=false"):
        cache.decode_all(FileImages(str(tmp_path / "imgs"), labelled=False), 16, 0, 0.0)


def _losses(path):
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_cached_folder_trains_exactly_like_the_in_memory_dataset(tmp_path):
    """The procedural training set exported as PNGs and cached gives the same MoCo v3 run (views,
    losses, weights) as the in-memory procedural dataset: one batched-view path for both."""
    images, _ = make_shapes(256, 16, seed=0)  # the procedural training split of tiny runs
    _export(tmp_path / "imgs", images)
    common = ("train.max_steps=3", "train.log_every=1")
    run_stage("teacher", tiny_teacher_cfg(tmp_path, "memory", common))
    run_stage("teacher",
              tiny_teacher_cfg(tmp_path, "cached", (*common, "data.name=folder", f"data.root={tmp_path / 'imgs'}",
                                                               "data.cache=true", "data.num_workers=0")))
    a, b = _losses(tmp_path / "memory" / "log.csv"), _losses(tmp_path / "cached" / "log.csv")
    assert len(a) == 3 and a == b


@pytest.mark.slow
def test_two_processes_on_a_node_share_one_cache(tmp_path):
    """Under torchrun with 2 gloo processes the folder is decoded once (local rank 0, into a
    shared-memory file the other maps, removed once both hold it) and the run equals the
    in-memory dataset on 2 processes."""
    import glob
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    images, _ = make_shapes(256, 16, seed=0)
    _export(tmp_path / "imgs", images)
    before = set(glob.glob("/dev/shm/mimco-cache-*"))
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}:{root}", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mimco",
            "teacher",
            "data.name=procedural", "data.img_size=16", "data.procedural_size=256", "model.patch_size=4",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "optim.batch_size=32", "optim.epochs=1",
            "optim.warmup_epochs=0.25", "train.progress=false", "train.log_every=1", "train.max_steps=3",
            "eval.at_end=false", "moco.mlp_dim=64", "moco.proj_dim=32", "train.threads=1", f"train.out_dir={tmp_path}"]
    cached = subprocess.run([*base, "train.name=cached", "data.name=folder", f"data.root={tmp_path / 'imgs'}",
                             "data.cache=true", "data.num_workers=0"], capture_output=True, text=True, env=env,
                            timeout=HANG)
    assert cached.returncode == 0, cached.stderr[-3000:]
    lines = [ln for ln in cached.stderr.splitlines() if ln.startswith("mimco: cached")]
    assert len(lines) == 1 and "cached 256 images" in lines[0] and "shared by the 2 processes of this node" in lines[0]
    memory = subprocess.run([*base, "train.name=memory"], capture_output=True, text=True, env=env, timeout=HANG)
    assert memory.returncode == 0, memory.stderr[-3000:]
    assert _losses(tmp_path / "cached" / "log.csv") == _losses(tmp_path / "memory" / "log.csv")
    assert set(glob.glob("/dev/shm/mimco-cache-*")) <= before  # nothing left behind


def test_the_memory_check_counts_one_copy_per_node_and_is_agreed(monkeypatch):
    """8 processes on a node (LOCAL_WORLD_SIZE) share one cache, so the check counts one copy: a
    folder of a third of the free memory passes though 8 copies would not fit. A node that cannot
    hold it refuses for every process (the verdict is all-reduced)."""
    from mimco import distributed as dist

    need = 1000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(cache, "available_bytes", lambda: 3 * need)
    cache.check_memory(need, 10, 16, torch.device("cpu"))  # 1 copy fits in half the free memory; 8 would not
    monkeypatch.setattr(cache, "available_bytes", lambda: need)
    with pytest.raises(MimcoError, match="needs .*one copy per node.* only 0.0 GiB is free"):
        cache.check_memory(need, 10, 16, torch.device("cpu"))
    monkeypatch.setattr(cache, "available_bytes", lambda: 3 * need)
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "all_reduce_", lambda x, op="sum": x.fill_(1.0))  # another node refuses
    with pytest.raises(MimcoError, match="another node has too little free"):
        cache.check_memory(need, 10, 16, torch.device("cpu"))


def test_the_shared_file_goes_where_there_is_room(tmp_path, monkeypatch):
    """/dev/shm when it can hold the cache; else the temporary folder (a container's 64 MiB /dev/shm);
    else one line saying what to enlarge."""
    import tempfile
    from pathlib import Path

    images, _ = make_shapes(4, 16, seed=0)
    _export(tmp_path / "imgs", images)
    files = FileImages(str(tmp_path / "imgs"), labelled=False)
    room = {"/dev/shm": 10 << 30, tempfile.gettempdir(): 10 << 30}
    monkeypatch.setattr(cache, "_room", lambda folder: room.get(str(folder), 0))
    assert cache._shared_path(files, 16, 1 << 30).parent == Path("/dev/shm")
    room["/dev/shm"] = 64 << 20
    assert cache._shared_path(files, 16, 1 << 30).parent == Path(tempfile.gettempdir())
    room[tempfile.gettempdir()] = 0
    with pytest.raises(MimcoError, match="neither /dev/shm .* nor .* has room; give the container more shared memory"):
        cache._shared_path(files, 16, 1 << 30)
