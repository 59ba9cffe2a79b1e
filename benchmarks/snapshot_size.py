"""Disk use of a run checkpoint (``last.pt``, and each ``epoch_XXXX.pt`` snapshot, which is a copy of
it) for ViT-S/16 and ViT-B/16: stage 1 (MoCo v3: both encoders, projector, predictor, AdamW's two
moments) and stage 2 (MimCo: the student, its heads, the frozen teacher, AdamW's moments), each
written after one optimiser step as the engine writes it. Prints a table.

    python benchmarks/snapshot_size.py                 # ViT-S/16 and ViT-B/16
    python benchmarks/snapshot_size.py --arch vit_small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CHECKPOINT = "last.pt"


def checkpoint_bytes(stage: str, arch: str, folder: Path, teacher: Path | None) -> tuple[int, int]:
    """(bytes of last.pt, trained parameters) after one step of ``stage`` at ``arch``, 224 px."""
    from mimco.config import PretrainConfig, TeacherStageConfig, load_config, to_dict
    from mimco.engine.optim import build_optimizer
    from mimco.engine.rng import all_rng_states
    from mimco.methods import get_method
    from mimco.methods.base import backbone_prefixes
    from mimco.runs import save_checkpoint
    over = [f"model.arch={arch}", "data.name=procedural", "data.img_size=224", "optim.batch_size=2"]
    if stage == "teacher":
        cfg = load_config(TeacherStageConfig, "vit_small_teacher", over)
    else:
        cfg = load_config(PretrainConfig, "vit_small_pretrain", [*over, f"teacher.checkpoint={teacher}"])
    method = get_method(cfg.method, stage).build(cfg, torch.device("cpu"))
    method.total_steps = 10
    opt = build_optimizer(method, cfg.optim)
    x = torch.rand(2, 3, 224, 224)
    views = [x, x.flip(-1)] if stage == "teacher" else [x]
    loss, _ = method(views, 0, 0)
    loss.backward()
    opt.step()
    run = folder / stage
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run, stage, 1, 10, method.state_dict(), backbone_prefixes(method), opt.state_dict(), {},
                    all_rng_states(), to_dict(cfg))
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return (run / CHECKPOINT).stat().st_size, trained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["vit_small", "vit_base"], choices=["vit_small", "vit_base"])
    return p


def main() -> None:
    a = build_parser().parse_args()
    torch.manual_seed(0)
    print("| model | stage | trained parameters | last.pt = one snapshot |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.arch:
            folder = Path(tmp) / arch
            size, trained = checkpoint_bytes("teacher", arch, folder, None)
            print(f"| {arch} /16 | teacher (MoCo v3) | {trained / 1e6:.1f} M | {size / 2**20:.0f} MiB |", flush=True)
            size, trained = checkpoint_bytes("pretrain", arch, folder, folder / "teacher" / CHECKPOINT)
            print(f"| {arch} /16 | pretrain (MimCo, its teacher inside) | {trained / 1e6:.1f} M | "
                  f"{size / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
