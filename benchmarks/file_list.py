"""How long an image folder takes to list at each start, with and without its file list.

    python benchmarks/file_list.py                           # 1000 classes x 100 files, median of 3 runs
    python benchmarks/file_list.py --classes 100 --per-class 50 --runs 5

Builds ``--classes`` x ``--per-class`` empty ``.jpg`` files in a temporary folder (what listing
costs does not depend on the files' contents), then times building ``FileImages`` (labelled)
four ways, before (every process walks the tree: ``Path.rglob`` and a stat per file, as
``data/files.py`` did) and now (the node's local rank 0 walks once and writes
``<root>/.mimco-files.json``; every other process and every later start reads it):

- first start, one process: now the walk and the list's write;
- a requeue, one process: now the list read;
- 2 processes starting at once (local ranks 0 and 1 of one node), with no list and with one:
  the time until both hold their items.

Each process is a fresh interpreter that has imported mimco before the clock starts. The figure
is the median over ``--runs``. On a local disk the file system's caches make a walk cheap; on a
parallel file system each stat is a round trip to a server, and the walk's share grows with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def make_tree(root: Path, classes: int, per_class: int) -> None:
    """``classes`` folders of ``per_class`` empty JPEG-named files, every folder's time a minute back
    (a tree written within seconds of its listing is listed again at the next start)."""
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"n{c:08d}_{i}.JPEG").touch()
    for d in [root, *root.iterdir()]:
        age(d)


def age(d: Path) -> None:
    t = time.time_ns() - 60 * 10**9
    os.utime(d, ns=(t, t))


def no_list(root: Path) -> None:
    """The list removed, and the root's time set back again (its removal moved it)."""
    (root / ".mimco-files.json").unlink(missing_ok=True)
    age(root)


def old_walk(root: Path) -> int:
    """The listing as it was before the file list: Path.rglob, a stat per file, per class folder."""
    from mimco.data.files import IMG_EXTENSIONS

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    n = 0
    for name in classes:
        n += len(sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()))
    return n


def child(args: argparse.Namespace) -> None:
    """One process: import, say it is ready, wait for the go, list, print the seconds since the go."""
    from mimco.data.files import FileImages

    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.001)
    go = float(Path(args.go).read_text() or 0)
    n = old_walk(Path(args.root)) if args.old else len(FileImages(args.root, labelled=True))
    print(f"{time.time() - go:.6f} {n}")


def run_at_once(root: Path, processes: int, old: bool, work: Path, n: int) -> float:
    """Seconds from a common go until every one of ``processes`` fresh processes holds its items."""
    go, procs = work / "go", []
    go.unlink(missing_ok=True)
    for rank in range(processes):
        ready = work / f"ready{rank}"
        ready.unlink(missing_ok=True)
        env = {**ENV, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes), "MASTER_PORT": str(os.getpid())}
        cmd = [sys.executable, __file__, "--child", "--root", str(root), "--ready", str(ready), "--go", str(go)]
        procs.append(subprocess.Popen(cmd + (["--old"] if old else []), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True))
    while not all((work / f"ready{r}").exists() for r in range(processes)):
        time.sleep(0.01)
    tmp = work / "go.tmp"
    tmp.write_text(f"{time.time():.6f}")
    os.replace(tmp, go)
    out = [p.communicate()[0].split() for p in procs]
    if any(p.returncode for p in procs) or any(int(o[1]) != n for o in out):
        raise SystemExit(f"a listing process failed or did not find the {n} files: {out}")
    return max(float(o[0]) for o in out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--runs", type=int, default=3, help="the median of this many runs of each row")
    p.add_argument("--dir", help="build the tree here (default: a temporary folder, removed at the end)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="mimco-file-list-"))
    root = work / "train"
    n = args.classes * args.per_class
    try:
        t0 = time.perf_counter()
        make_tree(root, args.classes, args.per_class)
        print(f"built {n:,} files in {args.classes} class folders under {root} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        listed = root / ".mimco-files.json"
        rows: dict[str, list[list[float]]] = {k: [[], []] for k in ("first", "requeue", "two-first", "two-requeue")}
        for _ in range(args.runs):
            for col, old in ((0, True), (1, False)):
                no_list(root)
                rows["first"][col].append(run_at_once(root, 1, old, work, n))
                rows["requeue"][col].append(run_at_once(root, 1, old, work, n))
                no_list(root)
                rows["two-first"][col].append(run_at_once(root, 2, old, work, n))
                rows["two-requeue"][col].append(run_at_once(root, 2, old, work, n))
        size = listed.stat().st_size
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    names = {"first": "first start, 1 process (now: walk + write the list)",
             "requeue": "a requeue, 1 process (now: read the list)",
             "two-first": "2 processes at once, no list (now: local rank 0 walks, rank 1 waits)",
             "two-requeue": "2 processes at once, a requeue (now: both read the list)"}
    print(f"\n{n:,} files ({args.classes} x {args.per_class}), median of {args.runs} runs; the list: "
          f"{size / 2**20:.1f} MiB\n")
    print("| start | before: every process walks | now: the file list |")
    print("|---|---|---|")
    for key, (old, new) in rows.items():
        print(f"| {names[key]} | {statistics.median(old):.2f} s | {statistics.median(new):.2f} s |")


if __name__ == "__main__":
    main()
