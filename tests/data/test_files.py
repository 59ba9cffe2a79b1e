"""The file list of an image folder: written once, read by every later start, listed again when the
tree changes, and always the same items as a walk of the folder."""

from __future__ import annotations

import errno
import json
import os
import random
import time
from pathlib import Path

import pytest

from mimco.data import files
from mimco.data.files import IMG_EXTENSIONS, LIST_NAME, FileImages


def fresh_walk(base: Path, labelled: bool) -> tuple[list[str], list[tuple[Path, int]]]:
    """The folder read as FileImages read it before it kept a list: Path.rglob and a stat per file."""
    def under(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())

    if not labelled:
        return [], [(p, -1) for p in under(base)]
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    return classes, [(p, c) for c, name in enumerate(classes) for p in under(base / name)]


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    for c in range(classes):
        for i in range(per_class):
            touch(root / f"c{c}" / f"{i}.jpg", b"x" * (i + 1))
    return root


def age(root: Path, seconds: float = 100.0) -> None:
    """Every folder's time set ``seconds`` back: a tree that has not changed for a while (a list of a
    tree changed within files.RACY_NS of it is not trusted by the next start)."""
    t = time.time_ns() - int(seconds * 1e9)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        os.utime(d, ns=(t, t))


@pytest.fixture
def walks(monkeypatch):
    """The number of folders read (os.scandir calls) since the test began."""
    count = [0]
    real = os.scandir

    def counting(path=".", *a, **k):
        count[0] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", counting)
    return count


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_items_equal_a_fresh_walk_on_an_awkward_tree(tmp_path, walks):
    root, outside = tmp_path / "data", tmp_path / "outside"
    for rel in ("a/1.jpg", "a/c.JPG", "a/sub/x.png", "a/sub-b.png", "a-b/0.jpeg", "a/.hidden.png", "b/z.webp",
                "b/deep/er/y.gif", ".cache/h.png", "top.png", "a/readme.txt", "a/.jpg", "a/dot.", "a/d.jpg/in.png"):
        touch(root / rel)
    touch(outside / "o.png")
    touch(outside / "sub" / "p.png")
    (root / "linked").symlink_to(outside)  # a class folder behind a link: read as a class, not as a folder
    (root / "a" / "inner").symlink_to(outside)  # a folder link inside a class: never entered
    (root / "b" / "file-link.png").symlink_to(root / "top.png")
    (root / "b" / "broken.jpg").symlink_to(root / "nothing.jpg")
    (root / ".hidden-class").mkdir()
    touch(root / ".hidden-class" / "q.png")
    age(root)
    age(outside)
    for labelled in (True, False):
        classes, items = fresh_walk(root, labelled)
        assert len(items) == (12 if labelled else 13)
        for _ in range(2):  # listed (labelled) or read from the list, then read from the list
            walks[0] = 0
            ds = FileImages(str(root), labelled=labelled)
            assert ds.items == items and ds.classes == classes
            assert ds.sizes == [p.stat().st_size for p, _ in items]
        assert walks[0] == 0
    assert json.loads((root / LIST_NAME).read_text())["classes"] == ["a", "a-b", "b", "linked"]
    sub = FileImages(str(root), labelled=True, subset=5, seed=3)
    assert sub.items == random.Random(3).sample(fresh_walk(root, True)[1], 5)  # the subset drawn as before


def test_the_list_is_written_once_and_read_by_later_starts(tmp_path, walks, capfd, monkeypatch):
    monkeypatch.setattr(files, "SAY_FILES", 10)  # said from 10 files on (10,000 outside the tests)
    root = tree(tmp_path / "data")
    age(root)
    walks[0] = 0
    first = FileImages(str(root), labelled=True)
    assert walks[0] == 4  # the root and its 3 class folders
    err = capfd.readouterr().err
    assert f"listed 12 images under {root}" in err and f"the list is {root / LIST_NAME} (next to the images)" in err
    expected = fresh_walk(root, False)[1]
    walks[0] = 0
    again = FileImages(str(root), labelled=True)
    assert walks[0] == 0 and again.items == first.items and again.classes == first.classes
    assert FileImages(str(root), labelled=False).items == expected and walks[0] == 0
    assert capfd.readouterr().err == ""


def test_a_changed_tree_is_listed_again(tmp_path, walks, capfd):
    root = tree(tmp_path / "data")
    age(root)
    FileImages(str(root), labelled=True)
    touch(root / "c1" / "new.jpg")  # a file added to a class folder
    walks[0] = 0
    ds = FileImages(str(root), labelled=True)
    assert walks[0] > 0 and ds.items == fresh_walk(root, True)[1] and (root / "c1" / "new.jpg", 1) in ds.items
    assert (f"mimco: the image tree at {root} changed (1 of 4 folders modified since it was listed); listing it "
            "again") in capfd.readouterr().err

    age(root, 50)
    FileImages(str(root), labelled=True)  # listed again (every folder's time moved)
    capfd.readouterr()
    walks[0] = 0
    FileImages(str(root), labelled=True)
    assert walks[0] == 0 and capfd.readouterr().err == ""
    touch(root / "c9" / "0.png")  # a new class folder
    ds = FileImages(str(root), labelled=True)
    assert walks[0] > 0 and ds.classes == ["c0", "c1", "c2", "c9"] and ds.items == fresh_walk(root, True)[1]
    assert "changed (1 of 4 folders modified since it was listed)" in capfd.readouterr().err

    age(root, 20)
    FileImages(str(root), labelled=True)
    (root / "c2" / "0.jpg").unlink()  # a file removed
    ds = FileImages(str(root), labelled=True)
    assert ds.items == fresh_walk(root, True)[1] and "changed (1 of 5" in capfd.readouterr().err


def test_a_tree_listed_while_it_changes_is_not_trusted(tmp_path, walks, capfd):
    root = tree(tmp_path / "data")  # just written: within files.RACY_NS of its listing
    FileImages(str(root), labelled=True)
    expected = fresh_walk(root, True)[1]
    walks[0] = 0
    assert FileImages(str(root), labelled=True).items == expected
    assert walks[0] > 0 and capfd.readouterr().err == ""  # listed again, without a word: nothing changed since
    age(root)
    FileImages(str(root), labelled=True)
    walks[0] = 0
    FileImages(str(root), labelled=True)
    assert walks[0] == 0


def test_a_read_only_data_folder_keeps_its_list_in_the_cache_folder(tmp_path, walks, monkeypatch, capfd):
    root = tree(tmp_path / "data")
    age(root)
    real_open = open

    def read_only(path, mode="r", *a, **k):  # the data folder on a read-only file system
        if any(m in mode for m in "wax+") and Path(path).is_relative_to(root):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(files, "open", read_only, raising=False)
    first = FileImages(str(root), labelled=True)
    cached = files.list_places(root)[1]
    assert cached.parent == tmp_path / "user-cache" / "mimco" / "filelists" and cached.is_file()
    assert sorted(root.iterdir()) == [root / f"c{c}" for c in range(3)]  # nothing written there, not even a part
    assert f"the list is {cached} (the data folder is read-only)" in capfd.readouterr().err
    walks[0] = 0
    assert FileImages(str(root), labelled=True).items == first.items and walks[0] == 0
    touch(root / "c0" / "late.png")
    assert (root / "c0" / "late.png", 0) in FileImages(str(root), labelled=True).items
    assert "changed (1 of 4 folders" in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "not json", "wrong shape", "wrong types"])
def test_a_damaged_list_is_listed_again(tmp_path, walks, capfd, damage):
    root = tree(tmp_path / "data")
    age(root)
    items = FileImages(str(root), labelled=True).items
    path = root / LIST_NAME
    text = path.read_text()
    listing = json.loads(text)
    bad = {"truncated": text[: len(text) // 2], "not json": "\x00\x01binary",
           "wrong shape": json.dumps([1, 2, 3]),
           "wrong types": json.dumps({**listing, "files": [1] * len(listing["files"])})}[damage]
    st = path.stat()
    path.write_text(bad)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # its time still matches the root's
    capfd.readouterr()
    walks[0] = 0
    assert FileImages(str(root), labelled=True).items == items and walks[0] > 0
    assert f"mimco: the file list {path} cannot be read (" in capfd.readouterr().err
    assert json.loads(path.read_text())["files"] == listing["files"]  # written again


def test_other_local_processes_read_the_list_of_local_rank_0(tmp_path, walks, monkeypatch, capfd):
    root = tree(tmp_path / "data")
    FileImages(str(root), labelled=True)  # local rank 0 of this start: its list is not trusted by the next start
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    expected = fresh_walk(root, True)[1]
    walks[0] = 0
    assert FileImages(str(root), labelled=True).items == expected
    assert walks[0] == 0  # written for this start (this node and job): taken as it is

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a later start: local rank 0 has not listed it yet
    monkeypatch.setattr(files, "WAIT_S", 0.3)
    capfd.readouterr()
    assert FileImages(str(root), labelled=True).items == expected and walks[0] > 0
    assert f"no file list of {root} appeared in 0 s; listing it in this process" in capfd.readouterr().err


def test_two_nodes_listing_a_shared_folder_at_once_leave_a_trusted_list(tmp_path, walks, monkeypatch):
    """On a shared file system every node's local rank 0 may list the tree at one start. Node A's
    list lands (its rename moves the root's time) while node B still walks; B's list, written over
    it, is still trusted by the next start, and B's other processes take A's or B's list as it is:
    both were written for this start."""
    root = tree(tmp_path / "data")
    age(root)
    expected = fresh_walk(root, True)[1]
    monkeypatch.setenv("MASTER_ADDR", "head")
    seen_by_b = files._walk(root)  # node B walks first ...
    monkeypatch.setattr(files.socket, "gethostname", lambda: "node-a")
    FileImages(str(root), labelled=True)  # ... node A's list lands meanwhile ...
    monkeypatch.setattr(files.socket, "gethostname", lambda: "node-b")
    assert files._write(root, seen_by_b) == root / LIST_NAME  # ... and B's over it
    walks[0] = 0
    assert FileImages(str(root), labelled=True).items == expected and walks[0] == 0  # the next start reads it

    listing = json.loads((root / LIST_NAME).read_text())
    (root / LIST_NAME).write_text(json.dumps({**listing, "dirs": {**listing["dirs"], "c0": 1}}))  # stale, of this job
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(files, "WAIT_S", 5.0)
    monkeypatch.setattr(files.socket, "gethostname", lambda: "node-c")
    assert FileImages(str(root), labelled=True).items == expected and walks[0] == 0
