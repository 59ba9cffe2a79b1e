"""The evaluation commands under torchrun (2 gloo processes, CPU) against one process: the same
numbers, one printout and one results row, the scoring done once (on the main process); and
``mimco extract --patch`` streaming a split far larger than the memory it may hold."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mimco.cli.main import main
from tests.helpers import ENV, HANG, ROOT, TORCHRUN, seg_folder

pytestmark = pytest.mark.slow

DATA = ["data.name=procedural", "data.img_size=16", "data.procedural_size=256", "train.progress=false"]


def commands(ckpt: Path, out: Path, seg: Path) -> list[list[str]]:
    """One of each evaluation command (and the few-label and --full paths), writing under ``out``."""
    segdata = ["data.name=segfolder", f"data.root={seg}", "seg.num_classes=3", "data.img_size=20",
               "data.num_workers=0"]
    c = str(ckpt)
    return [["knn", c, "--k", "5", "20", "--out", f"{out}/knn", *DATA],
            ["knn", c, "--per-class", "4", "--label-seeds", "2", "--k", "5", "--out", f"{out}/knn_few", *DATA],
            ["linprobe", c, "--epochs", "4", "--batch-size", "64", "--out", f"{out}/lin", *DATA],
            ["linprobe", c, "--full", "--epochs", "1", "--batch-size", "64", "--out", f"{out}/lin_full", *DATA],
            ["eval", c, "--out", f"{out}/eval", *DATA],
            ["segprobe", c, "--epochs", "2", "--batch-size", "8", "--out", f"{out}/seg", *segdata],
            ["extract", c, "--patch", "--batch-size", "50", "--out", f"{out}/f.safetensors", *DATA],
            ["extract", c, "--split", "train", "--batch-size", "50", "--out", f"{out}/f.npz", *DATA],
            ["plot", "tsne", c, "--n", "64", "--out", f"{out}/tsne.png", *DATA]]


def _metrics(folder: Path) -> dict:
    rows = (folder / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1, f"{folder}: {len(rows)} rows"
    return {k: v for k, v in json.loads(rows[0])["metrics"].items() if not k.endswith("seconds")}


def test_every_command_under_torchrun_gives_one_process_numbers_once(tmp_path, capsys, teacher_ckpt):
    seg = seg_folder(tmp_path / "segdata")
    alone, printed = tmp_path / "alone", []
    for argv in commands(teacher_ckpt, alone, seg):
        assert main(argv) == 0, argv
        printed.append(capsys.readouterr().out)
    two = tmp_path / "two"
    listed = tmp_path / "commands.json"
    listed.write_text(json.dumps(commands(teacher_ckpt, two, seg)))
    worker = ROOT / "tests" / "eval" / "eval_worker.py"
    res = subprocess.run([*TORCHRUN, str(worker), str(listed)], env={**ENV, "OUT_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for main_run, other, alone_out in zip(*ranks, printed):
        name = " ".join(main_run["argv"][:2])
        assert main_run["code"] == other["code"] == 0, name
        assert other["stdout"] == "" and main_run["stdout"], name  # printed once, by the main process
        assert not any(other["calls"].values()), (name, other["calls"])  # no scoring on the other process
        if main_run["argv"][0] in ("knn", "linprobe", "eval"):
            assert sum(main_run["calls"].values()) >= 1, name
        if main_run["argv"][0] == "eval":
            def timeless(out: str) -> dict:
                return {k: v for k, v in json.loads(out).items() if not k.endswith("seconds")}
            assert timeless(main_run["stdout"]) == timeless(alone_out)
    for folder in ("knn", "knn_few", "lin", "lin_full", "eval", "seg"):
        assert _metrics(two / folder) == _metrics(alone / folder), folder
    assert ranks[0][5]["calls"]["seg_head"] == 1
    a, b = load_file(str(alone / "f.safetensors")), load_file(str(two / "f.safetensors"))
    assert a.keys() == b.keys() == {"cls", "mean", "patch", "labels", "index"}
    assert b["patch"].dtype == torch.float16 and torch.equal(b["index"], torch.arange(len(b["index"])))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k
    a, b = np.load(alone / "f.npz"), np.load(two / "f.npz")
    assert sorted(a.files) == sorted(b.files) and len(b["cls"]) == 256
    assert (a["labels"] == b["labels"]).all() and np.allclose(a["cls"], b["cls"], atol=1e-5)
    assert (two / "tsne.png").stat().st_size > 1000
    assert not list(two.glob(".*"))  # no temporary file or part left behind
