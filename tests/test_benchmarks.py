"""The benchmark scripts run end to end at a toy size (their figures are not judged here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import HANG

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHON": sys.executable}


@pytest.mark.slow
def test_throughput_table(tmp_path):
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "benchmarks/throughput.py", "--arch", "vit_mini", "--img-size", "16",
                        "--patch", "4",
                        "--batch", "8", "--warmup", "0", "--reps", "1", "--precisions", "fp32", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    for w in ("supervised", "simmim", "moco", "mimco", "teacher_fwd"):
        assert f"| fp32 | {w} |" in table
    assert "MimCo step time / SimMIM step time" in table and "loader (" in table


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_path(tmp_path):
    """The GPU smoke script's paths (2 gloo processes here): each must pass, fp16 is skipped on a CPU."""
    report = tmp_path / "report"
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--jobs", "2", "--out", str(tmp_path)],
                       capture_output=True,
                       text=True, env={**ENV, "OUT": str(report)}, cwd=ROOT, timeout=7200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-2])
    assert len(out["paths"]) == 16 and list(out["paths"].values()).count("PASS") == 14
    fp16 = "pretrain: fp16 with the gradient scaler, image + same-position negatives, targets centred per position"
    assert out["paths"][fp16] == "SKIP" and out["processes"] == 2
    assert out["paths"]["pretrain: FSDP, fp16 with the gradient scaler, fused AdamW"] == "SKIP"
    assert out["paths"]["teacher: JPEG folder cached once per node (data.cache)"] == "PASS"
    assert out["paths"]["teacher: MoCo v3, FSDP (bf16 policy, BatchNorm in fp32)"] == "PASS"
    # $OUT: the whole output as it was printed, and the report rewritten after each result
    assert (report / "gpu_check.log").read_text().startswith("gpu_check on python ")
    saved = json.loads((report / "gpu_check.json").read_text())
    assert saved["paths"] == out["paths"] and saved["rows"] == out["rows"] and saved["versions"]["torch"]
    md = (report / "gpu_check.md").read_text()
    assert "| teacher: MoCo v3, bf16, eval at end | PASS |" in md and "| vit_mini 32/4 | compiled | 8 |" in md
    assert out["paths"]["pretrain: compiled (train.compile), bf16, k-NN monitor"] == "PASS"
    assert out["paths"]["pretrain: FSDP, block masks, 2 micro-batches (one reduce-scatter a step)"] == "PASS"
    assert out["paths"]["eval: knn, linprobe (lr grid), eval under torchrun, one result row each"] == "PASS"
    assert out["paths"]["teacher: JPEG folder decoded on the device (data.decode=gpu)"] == "PASS"
    assert out["paths"]["pretrain: DINOv2 teacher by name, own resolution, grid resampled, bf16"] == "PASS"
    assert out["images_per_s"] > 0 and 0 < out["mfu"] < 1 and out["gflop_per_image"] > 0
    assert "| finetune: shared engine, bf16, mixup | PASS |" in r.stdout and "| finetune: FSDP | PASS |" in r.stdout
    assert out["paths"]["segfinetune: FSDP, bf16, BatchNorm statistics all-reduced, mIoU every epoch"] == "PASS"
    assert [(row["model"], row["mode"]) for row in out["rows"]] == [("vit_mini 32/4", "eager"),
                                                                    ("vit_mini 32/4", "compiled")]
    eager, compiled = out["rows"]
    assert compiled["compile_s"] > 0 and eager["compile_s"] is None and compiled["images_per_s"] > 0
    assert compiled["gflop_per_image"] == eager["gflop_per_image"] > 0 and eager["mfu_card"] is None  # no card on a CPU
    assert out["best_batch"] == {"vit_mini": 16}  # 8, then 16: the CPU cap
    assert "| model | mode | batch | images/s |" in r.stdout and "MFU (card peak)" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_folder_cache_table(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/folder_cache.py", "--images", "128", "--steps", "4", "--batch",
                        "32", "--workers", "0", "--out", str(tmp_path)], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("| in memory (fashion_mnist) | ", "| PNG folder, per-image loader | ",
                "| PNG folder, data.cache=true | "):
        assert row in r.stdout
    assert len(list((tmp_path / "fmnist-png").rglob("*.png"))) == 128 and "batch 32), 128 images" in r.stdout
    assert "cached folder >= 90 % of in memory" in r.stdout


@pytest.mark.slow
def test_data_paths_table():
    r = subprocess.run([sys.executable, "benchmarks/data_paths.py", "--images", "8", "--img-size", "32", "--batch",
                        "4"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| decode=")]
    assert len(rows) == 4 and all(float(ln.split("|")[2].replace(",", "")) > 0 for ln in rows)


@pytest.mark.slow
def test_file_list_table(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/file_list.py", "--classes", "3", "--per-class", "4", "--runs", "1",
                        "--dir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and " s |" in ln]
    assert [ln.split(" (")[0] for ln in rows] == ["| first start, 1 process", "| a requeue, 1 process",
                                                   "| 2 processes at once, no list", "| 2 processes at once, a requeue"]
    assert "12 files (3 x 4)" in r.stdout and (tmp_path / "train" / ".mimco-files.json").is_file()


@pytest.mark.slow
def test_data_sources_table(tmp_path):
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "benchmarks/data_sources.py", "--images", "64", "--tree", "128", "--batches",
                        "1", "--runs", "1", "--img-size", "32", "--out", str(out)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    lines = table.splitlines()
    for source in ("image folder", "shards", "HF dataset"):  # one row in each table, every figure measured
        rows = [ln for ln in lines if ln.startswith(f"| {source} |") and "wids" not in ln]
        assert len(rows) == 2 and all(float(c.strip(" s")) > 0 for ln in rows for c in ln.split("|")[2:-1]), rows
    readers = [ln.split("|")[1:-1] for ln in lines if ln.split("|")[1:2] and ln.split("|")[1].strip().isdigit()]
    assert len(readers) == 2 and all(float(r[2]) > 0 and float(r[3]) > 0 and " ms (" in r[1] for r in readers)
    assert "64 JPEGs of 400x300 px" in table and "a tree of 128 files" in table


def _python_without(tmp_path: Path, *hidden: str) -> Path:
    """A Python that has every package of this one but ``hidden`` (a lent GPU image lacks kornia):
    a venv of the base interpreter whose .pth names a folder of links to this site-packages, less those."""
    import sysconfig

    here = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in here.iterdir():
        base = entry.name.split("-")[0].split(".")[0].lower()  # kornia, kornia_rs-0.2.0.dist-info, ...
        if base not in hidden:
            (farm / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "mimco-test.pth").write_text(f"{farm}\n")
    return py


@pytest.mark.slow
def test_gpu_check_without_kornia_or_wheels_says_how_to_prepare_them(tmp_path):
    """The lent machine's image: kornia missing. With no wheel folder gpu_check stops at once with one
    line naming what is missing and the command that prepares the folder; nothing is installed."""
    py = _python_without(tmp_path, "kornia", "kornia_rs")
    check = subprocess.run([str(py), "-c", "import torch, timm; import kornia"], capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'kornia'" in check.stderr  # torch and timm are there
    env = {**ENV, "PYTHON": str(py), "MIMCO_WHEELS": str(tmp_path / "no-wheels"),
           "MIMCO_SITE": str(tmp_path / "site-x")}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=HANG)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "lacks kornia>=" in lines[0] and "make device-wheels" in lines[0] and ".device-wheels" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "site-x").exists()


def test_device_env_reads_the_floors():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_env import CARRIED, missing, requirements, version_key

    floors = dict(requirements())
    assert version_key(floors["torch"]) >= (2, 11) and version_key(floors["torchvision"]) >= (0, 26)
    assert {"kornia", "timm"} <= set(floors) and set(CARRIED) >= {"kornia", "kornia_rs", "timm"}
    assert version_key("2.11.0+cu130") == (2, 11, 0) and version_key("1.0.20.dev0") == (1, 0, 20)
    assert missing() == []  # this environment meets every floor


def test_gpu_check_budget_and_report(tmp_path):
    """The global budget counts down from its start (0 = none); the report files are rewritten after
    each result, so a call cut short still holds what was measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import Budget, Report

    now = [100.0]
    b = Budget(440, clock=lambda: now[0])
    now[0] = 400.0
    assert b.left() == 140.0 and b.left(reserve=170) == -30.0
    assert Budget(0, clock=lambda: now[0]).left() == float("inf")
    rep = Report(tmp_path)
    rep.add("| a | PASS | 1 |  |", paths={"a": "PASS"})
    assert json.loads((tmp_path / "gpu_check.json").read_text())["paths"] == {"a": "PASS"}
    rep.add("| b | FAIL | 2 | x |", paths={"b": "FAIL"})
    assert json.loads((tmp_path / "gpu_check.json").read_text())["paths"] == {"a": "PASS", "b": "FAIL"}
    assert (tmp_path / "gpu_check.md").read_text().splitlines() == ["| a | PASS | 1 |  |", "| b | FAIL | 2 | x |"]


def test_gpu_check_checks_declare_what_they_assert(tmp_path):
    """A check's assertions are the names it declares, not words of its title: an unknown name is
    refused when the check is built, and each declared one reads the run folder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import EXPECTS, Check

    with pytest.raises(ValueError, match="unknown expectation"):
        Check("snapshots, eval at end", [], "run", 1, expects=("snapshots",))
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"knn_top1": 50.0}))
    assert EXPECTS["knn_at_end"](run) == "" and EXPECTS["snapshot"](run) == "no epoch_0002.pt snapshot"
    assert EXPECTS["miou"](run) == "no mIoU in summary.json" and EXPECTS["result_rows"](run).startswith("results.jsonl")


def test_gpu_check_card_peaks_and_batch_search():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import best_batch, card_peak

    assert card_peak("NVIDIA H100 80GB HBM3") == 989.0 and card_peak("NVIDIA H100 PCIe") == 756.0
    assert card_peak("NVIDIA A100-SXM4-80GB") == 312.0 and card_peak("NVIDIA A10") == 125.0
    assert card_peak("NVIDIA L40S") == 362.0 and card_peak("NVIDIA L4") == 121.0 and card_peak("NVIDIA H200") == 989.0
    assert card_peak("NVIDIA A10G") is None and card_peak("Tesla V100-SXM2-16GB") is None  # not listed: no guess
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 700  # an out-of-memory error above 700 images

    assert best_batch(fits, 128, 4096) == 512 and tried == [128, 256, 512, 1024]
    assert best_batch(lambda b: True, 128, 1000) == 512  # the cap
    assert best_batch(lambda b: False, 128, 4096) == 0  # not even the first


@pytest.mark.slow
def test_throughput_compile_column(tmp_path):
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "benchmarks/throughput.py", "--arch", "vit_mini", "--img-size", "16",
                        "--patch", "4",
                        "--batch", "8", "--warmup", "0", "--reps", "1", "--precisions", "fp32", "--workloads", "simmim",
                        "--compile", "--out", str(out)], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    assert "| compiled images/s | compiled / eager | compile s |" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| fp32 | simmim |")).strip("|").split("|")
    assert len(row) == 11 and float(row[8]) > 0 and float(row[10]) > 0


def _table(md: str) -> dict[str, dict[str, str]]:
    """{row: {column: cell}} of the first Markdown table in ``md``."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells)) for ln in lines[2:]
            if len(cells := [c.strip() for c in ln.strip("|").split("|")]) == len(head)}


@pytest.mark.slow
def test_reproduce_smoke_runs_and_resumes(tmp_path):
    cmd = [sys.executable, "benchmarks/reproduce.py", "--preset", "smoke", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "results.md").read_text()
    table = _table(md)
    assert list(table) == ["raw pixels", "random-init ViT", "MoCo v3 teacher", "MoCo v3, teacher + MimCo compute",
                           "SimMIM", "MimCo (patch + image)", "patch only", "L1 regression", "block masking"]
    assert table["MimCo (patch + image)"]["seeds"] == "2" and " ± " in table["MimCo (patch + image)"]["k-NN top-1"]
    assert table["patch only"]["seeds"] == "2" and table["L1 regression"]["seeds"] == "1"  # the "seeded" ablations
    assert "Same-image teacher patch tokens" in md and "| patch only |" in md.split("final patch loss")[1]
    assert "| L1 regression |" not in md.split("final patch loss")[1]  # no patch InfoNCE, no chance level
    few = ["k-NN 4/class", "linear 4/class", "k-NN 20/class", "linear 20/class", "fine-tune 4/class"]
    assert list(table["raw pixels"])[-6:] == ["fine-tune", *few]
    assert table["raw pixels"]["fine-tune 4/class"] == "-" and table["raw pixels"]["k-NN 4/class"] != "-"
    assert all(table["MimCo (patch + image)"][c] != "-" for c in few)
    assert all(table["patch only"][c] == "-" for c in few)  # main rows only
    cached = json.loads((tmp_path / "runs" / "mimco-s0" / "study-eval.json").read_text())
    assert {k.split("-")[0] for k in cached} == {"knn", "linear", "finetune", "few4", "few20", "finetune4"}
    for png in ("tsne.png", "curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert again.returncode == 0 and ": training in " not in again.stderr  # everything reused
    assert "[reproduce] teacher: reusing the finished run in " in again.stderr

    def numbers(out: str) -> list[str]:  # the output without the header's minutes
        return [ln for ln in out.splitlines() if " min + evaluation " not in ln]
    assert numbers(again.stdout) == numbers(r.stdout) and "training " in md.splitlines()[0]
    # a changed fine-tune recipe fine-tunes again (in a new folder) without retraining anything
    third = subprocess.run([*cmd, "finetune:optim.base_lr=3e-4"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=HANG)
    assert third.returncode == 0, third.stderr[-2000:]
    assert ": training in " in r.stderr and ": training in " not in third.stderr.replace("finetune: training in ", "")
    assert "[finetune] finetune: training in " in third.stderr and "[finetune] epoch 1:" in third.stderr
    assert len(list((tmp_path / "runs" / "mimco-s0").glob("finetune-*"))) == 4  # each recipe, from all and few labels
    # the dense study on the same folder: the main study's runs reused, image only, batch negatives and MaskDistill
    # trained
    dense = subprocess.run([*cmd, "--dense", "--seeds", "0"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=HANG)
    assert dense.returncode == 0, dense.stderr[-2000:]
    trained = sorted(ln.split("pretrain: training in ")[1] for ln in dense.stderr.splitlines() if "training in" in ln
                     and "pretrain:" in ln)
    assert [Path(t).name for t in trained] == ["batch-negatives-s0", "image-only-s0", "maskdistill-of-teacher-s0"], \
        dense.stderr[-2000:]
    table = _table((tmp_path / "results-dense.md").read_text())
    assert list(table) == ["raw pixels", "random-init ViT", "MoCo v3 teacher", "SimMIM", "MimCo (patch + image)",
                           "patch only", "image only", "batch negatives", "MaskDistill of teacher"]
    for row, cells in table.items():
        assert " ± " in cells["scenes mIoU (28px)"], (row, cells)  # 3 probe heads
        assert 0 <= float(cells["token position acc."]) <= 100, (row, cells)
        assert 0 <= float(cells["position variance share"]) <= 100, (row, cells)
        assert (cells["fine-tune mIoU"] == "-") == (row == "raw pixels"), (row, cells)  # every backbone fine-tuned
        assert (cells["k-NN top-1"] == "-") == (row in ("raw pixels", "random-init ViT")), (row, cells)
    assert "segfinetune: training in" in dense.stderr
    # the remedies study on the same folder: the teacher and MimCo reused, one remedy trained
    rem = subprocess.run([*cmd, "--seeds", "0", "--remedies", "MimCo (patch + image),negatives: same position"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert rem.returncode == 0, rem.stderr[-2000:]
    trained = [ln for ln in rem.stderr.splitlines() if ": training in " in ln]
    assert [Path(t.split("training in ")[1]).name for t in trained] == ["negatives-same-position-s0"], trained
    assert "segfinetune: training in" not in rem.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "negatives-same-position-s0" / "config.yaml").read_text())
    assert saved["loss"]["patch_negatives"] == "position"
    table = _table((tmp_path / "results-remedies.md").read_text())
    assert list(table) == ["MoCo v3 teacher", "MimCo (patch + image)", "negatives: same position"]
    for row, cells in table.items():
        assert cells["seeds"] == "1", (row, cells)
        for col in ("scenes mIoU (28px)", "scenes mIoU (training grid)"):  # 3 heads at each grid
            assert " ± " in cells[col] and 0 < float(cells[col].split(" ± ")[0]) <= 100, (row, col, cells)
        for col in ("token position acc.", "position variance share", "k-NN top-1", "linear probe top-1",
                    "k-NN 10/class", "linear 10/class"):
            assert 0 < float(cells[col].split(" ± ")[0]) <= 100, (row, col, cells)
    bad = subprocess.run([*cmd, "optim.epochs=3"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert bad.returncode != 0 and "prefix it with teacher:, student: or finetune:" in bad.stderr
    assert "Traceback" not in bad.stderr
    # a changed recipe in the same folder is refused before anything trains
    changed = subprocess.run([*cmd, "student:mask.ratio=0.5"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                             timeout=HANG)
    assert changed.returncode != 0 and "was trained with another configuration" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_reproduce_overrides_go_to_their_stage():
    from benchmarks.reproduce import PRESETS, with_overrides

    p = with_overrides(PRESETS["smoke"], ["data.root=/x", "model.depth=3", "train.precision=bf16",
                                          "student:mask.ratio=0.4", "teacher:optim.epochs=5", "finetune:aug.mixup=0"])
    assert p["data"][-2:] == ["data.root=/x", "train.precision=bf16"] and p["model"][-1] == "model.depth=3"
    assert p["student"][-1] == "mask.ratio=0.4" and p["teacher"][-1] == "optim.epochs=5"
    assert p["finetune"][-1] == "aug.mixup=0"
    assert "data.root=/x" not in PRESETS["smoke"]["data"]  # the preset itself is untouched


def test_every_preset_builds_valid_configs():
    """A typo in a preset (e.g. the gpu one, which cannot run here) fails here, not on the GPU machine:
    every run of every study of every preset loads, and every protocol takes its options."""
    import argparse

    from benchmarks.reproduce import PRESETS, REMEDY_ROWS, build_parser, study
    from mimco.config import load_config
    from mimco.pipeline import STAGE_CONFIGS, finetune_config

    for name, p in PRESETS.items():
        for flags in ([], ["--teachers"], ["--dense"], ["--remedies"]):
            args: argparse.Namespace = build_parser().parse_args(["--preset", name, *flags])
            spec, _ = study(args)  # checks every protocol's options
            for r in spec.runs.values():
                load_config(STAGE_CONFIGS[r.stage], None, [*spec.overrides, *spec.stage_overrides[r.stage],
                                                           *r.overrides])
            if flags == ["--remedies"]:
                assert [row.name for row in spec.rows][-1] == list(REMEDY_ROWS)[-1]
        fcfg = finetune_config(load_config(STAGE_CONFIGS["pretrain"], None, [*p["data"], *p["model"]]).data,
                               p["finetune"])
        assert fcfg.train.progress is False
    gpu = load_config(STAGE_CONFIGS["teacher"], None, [*PRESETS["gpu"]["data"], *PRESETS["gpu"]["model"]])
    assert gpu.data.on_device and gpu.train.precision == "bf16" and gpu.model.arch == "vit_tiny"


@pytest.mark.slow
def test_reproduce_on_an_imagefolder_by_overrides_alone(tmp_path):
    """The study's 224 px ViT-S/16 ImageFolder recipe is the gpu preset plus overrides; the same
    overrides, at toy size, run end to end here."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for c, colour in enumerate(((220, 40, 40), (40, 220, 40), (40, 40, 220))):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(colour, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "study"
    cmd = [sys.executable, "benchmarks/reproduce.py", "--preset", "smoke", "--out", str(out), "--seeds", "0",
           "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=16", "data.num_workers=0",
           "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]", "teacher:optim.batch_size=32",
           "student:optim.batch_size=32", "finetune:optim.batch_size=32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "results.md").read_text()
    table = _table(md)
    assert "imagefolder test top-1 (%), ViT 16px" in md
    assert table["MimCo (patch + image)"]["seeds"] == "1" and table["raw pixels"]["seeds"] == "1"
    assert (out / "tsne.png").is_file()
    assert yaml.safe_load((out / "runs" / "mimco-s0" / "config.yaml").read_text())["data"]["name"] == "imagefolder"


@pytest.mark.slow
def test_loss_precision_table():
    r = subprocess.run([sys.executable, "benchmarks/loss_precision.py"], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "e-" in ln]
    rows = {ln.split("|")[1].strip(): ln.split("|") for ln in lines}
    assert set(rows) == {"autocast (before)", "fp32 (now)"}
    assert rows["fp32 (now)"][2].strip() == "float32"
    assert float(rows["fp32 (now)"][3]) < float(rows["autocast (before)"][3])


def test_a_saved_run_is_reused_unless_one_of_its_keys_changed():
    from mimco.studies import _changed

    saved = {"optim": {"epochs": 2, "base_lr": 1e-3}, "method": "mimco"}
    assert not _changed(saved, {"optim": {"epochs": 2, "base_lr": 1e-3, "new_key": 0}, "method": "mimco", "eval": {}})
    assert _changed(saved, {"optim": {"epochs": 3, "base_lr": 1e-3}, "method": "mimco"})
    assert _changed(saved, {"optim": {"epochs": 2}, "method": "mimco"})  # a key it had is gone


def test_unknown_ablation_rows_are_named(tmp_path, monkeypatch):
    """Refused before any run, with the script's one-line exit (in this process: nothing to start)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce

    for flag in ("--ablations", "--seeded-ablations"):
        monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "smoke", "--out", str(tmp_path), flag,
                                          "mask 0.4,no such row"])
        with pytest.raises(SystemExit) as e:
            reproduce.main()
        assert str(e.value).startswith("error: unknown ablation row(s) ['no such row']")
        assert not any(tmp_path.iterdir())


def test_unknown_remedy_rows_are_named(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce

    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "smoke", "--out", str(tmp_path), "--remedies",
                                      "negatives: same position,no such row"])
    with pytest.raises(SystemExit) as e:
        reproduce.main()
    assert str(e.value).startswith("error: unknown remedy row(s) ['no such row']")
    assert not any(tmp_path.iterdir())


def test_device_env_plans_what_the_wheels_need(tmp_path, monkeypatch):
    """A missing requirement brings what its wheel requires and this Python lacks (kornia: kornia_rs),
    transitively; what is installed, and conditional requirements, stay out."""
    import zipfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_env

    def wheel(name, *requires):
        with zipfile.ZipFile(tmp_path / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA",
                       "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))

    wheel("kornia", "kornia_rs>=0.1.9", "numpy", "packaging", "pytest; extra == 'dev'")
    wheel("kornia_rs", "rs_helper")
    wheel("rs_helper")
    monkeypatch.setattr(device_env, "missing", lambda: ["kornia>=0.7.1"])
    monkeypatch.setattr(device_env, "installed", lambda n: None if n in ("kornia_rs", "rs_helper", "pytest") else "1")
    assert device_env.plan(tmp_path) == ["kornia>=0.7.1", "kornia_rs", "rs_helper"]
