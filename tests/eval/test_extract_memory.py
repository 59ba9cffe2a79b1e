"""``mimco extract --patch`` of a split far larger than the memory the extraction may hold, under
torchrun (2 gloo processes), through the real command line; and the benchmark of these figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import ENV, HANG, ROOT, TORCHRUN

pytestmark = pytest.mark.slow

N, DIM, TOKENS = 16000, 192, 64  # patch tokens: 16000 x 64 x 192 x 2 B = 393 MB


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resident-set high-water mark")
def test_extract_of_a_split_larger_than_the_memory_allowed_finishes(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=DIM, depth=1, num_heads=2, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "f.safetensors"
    split_bytes = N * TOKENS * DIM * 2
    worker = ROOT / "tests" / "eval" / "extract_memory_worker.py"
    cmd = [*TORCHRUN, str(worker), "extract", str(tmp_path / "w.pth"), "--patch", "--split", "train", "--batch-size",
           "64", "--out", str(out), "data.name=procedural", "data.img_size=32", f"data.procedural_size={N}",
           "train.progress=false"]
    env = {**ENV, "OUT_DIR": str(tmp_path), "MALLOC_MMAP_THRESHOLD_": str(2**17)}  # freed batches go back to the OS
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1  # the main process says it, once
    grew = [json.loads((tmp_path / f"rank{r}.json").read_text())["bytes"] for r in (0, 1)]
    limit = split_bytes // 4  # the whole split's patch tokens would be 4 times this
    assert max(grew) < limit, (grew, limit)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("patch").get_shape() == [N, TOKENS, DIM]
        assert torch.equal(f.get_tensor("index"), torch.arange(N))
        assert f.get_slice("patch").get_dtype() == "F16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no part or temporary left


def test_extract_memory_benchmark_prints_its_table(tmp_path):
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, "benchmarks/extract_memory.py", "--images", "128", "--dim", "16", "--grid",
                        "4", "--batch", "32", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    assert "| patch tokens kept, per image | 512 B (L x D x 2 B) |" in table  # 16 tokens x 16 x float16
    assert "| val | ViT-B/16 | CLS + mean + patch | 30.4 GB |" in table  # 50k x 198 x 768 x 4 B, as before
