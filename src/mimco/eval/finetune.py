"""Full fine-tuning with the MAE/BEiT recipe, built from timm's pieces: layer-wise lr decay,
AdamW, per-iteration warm-up + cosine, RandAugment, mixup/cutmix with label smoothing, random
erasing, drop path, mean-pooled patch tokens + fc_norm (or CLS). Evaluates every epoch; keeps
``last.pt`` (resumable) and ``best.safetensors``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimco.config import FinetuneConfig, to_dict
from mimco.data.build import ImageArray, load_dataset
from mimco.data.files import collate_skip_bad
from mimco.engine.checkpoint import atomic_save, save_weights
from mimco.engine.optim import build_scheduler, scaled_lr
from mimco.engine.trainer import CsvLog, rng_state, set_rng_state
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches
from mimco.models.export import timm_kwargs


class ArrayImages(Dataset):
    """An in-memory :class:`ImageArray` served as PIL images through a per-image transform."""

    def __init__(self, array: ImageArray, transform: Any) -> None:
        self.array, self.transform = array, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.array.batch(torch.tensor([i]))[0]
        img = Image.fromarray(x[0].numpy(), "L") if x.shape[0] == 1 else Image.fromarray(x.permute(1, 2, 0).numpy())
        return self.transform(img), int(self.array.labels[i])


def build_classifier(backbone: VisionTransformer, num_classes: int, pool: str = "avg",
                     drop_path_rate: float = 0.1) -> VisionTransformer:
    """A timm ViT classifier initialised from ``backbone``; head (and fc_norm for ``avg``) fresh (MAE)."""
    if pool not in ("avg", "token"):
        raise MimcoError(f"unknown classifier.pool '{pool}'; choose avg or token")
    kw = {**timm_kwargs(backbone), "num_classes": num_classes, "global_pool": pool, "drop_path_rate": drop_path_rate}
    model = VisionTransformer(**kw)
    state = {k: v for k, v in backbone.state_dict().items()
             if not k.startswith("head.") and not (pool == "avg" and k.startswith("norm."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if pool == "avg" else set())
    if set(missing) - fresh or unexpected:
        raise MimcoError(f"backbone does not fit the classifier: missing {sorted(set(missing) - fresh)}, unexpected {unexpected}")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    return model


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay groups: ``lr_scale = layer_decay ** (depth + 1 - layer)`` with the
    embeddings (patch, position, CLS) at layer 0, block i at i + 1 and norm/fc_norm/head at depth + 1;
    no weight decay on norms, biases and tokens."""
    return param_groups_layer_decay(model, weight_decay, model.no_weight_decay(), layer_decay=layer_decay)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Any, cfg: FinetuneConfig, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) on a labelled split."""
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in eval_batches(dataset, cfg.data, 256, device):
        top = model(x).topk(min(5, model.num_classes), dim=1).indices.cpu()
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        total += len(y)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def _num_classes(train: Any) -> int:
    if isinstance(train, ImageArray):
        return int(train.labels.max()) + 1
    return len(train.classes)


def finetune(backbone: VisionTransformer, cfg: FinetuneConfig, run_dir: Path, device: torch.device,
             resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate every epoch; writes log.csv, last.pt, best.safetensors, summary.json."""
    d, a, o = cfg.data, cfg.aug, cfg.optim
    tf = create_transform(d.img_size, is_training=True, scale=(a.min_scale, 1.0), auto_augment=a.auto_augment or None,
                          interpolation="bicubic", re_prob=a.reprob, re_mode="pixel", mean=tuple(d.mean[: d.channels]),
                          std=tuple(d.std[: d.channels]), color_jitter=0.0 if a.auto_augment else 0.4)
    if d.name in ("imagefolder",):
        train = load_dataset(d, train=True, transform=tf)
        train_ds: Dataset = train
    elif d.name == "folder":
        raise MimcoError("fine-tuning needs labels: use data.name=imagefolder (class sub-folders), not folder")
    else:
        train = load_dataset(d, train=True)
        train_ds = ArrayImages(train, tf)
    test = load_dataset(d, train=False)
    if test is None:
        raise MimcoError(f"{d.root} has no val/ split to evaluate on; lay the data out as train/ and val/ class folders")
    num_classes = _num_classes(train)
    model = build_classifier(backbone, num_classes, cfg.classifier.pool, cfg.classifier.drop_path_rate).to(device)
    if len(train_ds) < o.batch_size:
        raise MimcoError(f"optim.batch_size={o.batch_size} is larger than the dataset ({len(train_ds)} images); lower it")
    steps_per_epoch = len(train_ds) // o.batch_size
    epochs = max(1, int(math.ceil(o.epochs)))
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(layer_decay_groups(model, o.weight_decay, cfg.classifier.layer_decay), lr=scaled_lr(o),
                            betas=tuple(o.betas))
    sched = build_scheduler(opt, o, total, int(round(o.warmup_epochs * steps_per_epoch)))
    mix = a.mixup > 0 or a.cutmix > 0
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                  num_classes=num_classes) if mix else None
    criterion = SoftTargetCrossEntropy() if mix else LabelSmoothingCrossEntropy(a.label_smoothing)
    start_epoch, best = 0, {"top1": -1.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start_epoch, best = int(resume["epoch"]), resume["best"]
        set_rng_state(resume["rng"])
    log = CsvLog(run_dir / "log.csv")
    begin = time.perf_counter()
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
        order = torch.randperm(len(train_ds), generator=g)[: steps_per_epoch * o.batch_size].view(steps_per_epoch, -1)
        loader = DataLoader(train_ds, batch_sampler=order.tolist(), num_workers=d.num_workers, collate_fn=collate_skip_bad)
        t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros(())
        bar = tqdm(loader, desc=f"finetune {epoch + 1}/{epochs}", disable=not cfg.train.progress, leave=False)
        for i, (batch, _) in enumerate(bar):
            if batch is None or len(batch[1]) % 2:
                continue  # mixup pairs images: skip the rare odd batch left by unreadable files
            x, y = batch[0].to(device), batch[1].to(device)
            if mixup is not None:
                x, y = mixup(x, y)
            sched.step_update(epoch * steps_per_epoch + i)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
                loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            opt.step()
            loss_sum += loss.detach().float()
            seen += len(x)
        elapsed = time.perf_counter() - t0
        metrics = evaluate_classifier(model, test, cfg, device)
        if not math.isfinite(float(loss_sum)):
            raise MimcoError(f"fine-tuning loss is not finite in epoch {epoch + 1}; lower optim.base_lr")
        if metrics["top1"] > best["top1"]:
            best = {**metrics, "epoch": epoch + 1}
            save_weights(model.state_dict(), run_dir / "best.safetensors", {"epoch": str(epoch + 1)})
        log.write({"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": opt.param_groups[-1]["lr"],
                   "loss": float(loss_sum) / max(steps_per_epoch, 1), "top1": round(metrics["top1"], 2),
                   "top5": round(metrics["top5"], 2), "best_top1": round(best["top1"], 2),
                   "images_per_s": round(seen / elapsed, 1), "elapsed_s": round(time.perf_counter() - begin, 1)})
        atomic_save({"stage": "finetune", "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "rng": rng_state(), "best": best, "config": to_dict(cfg)},
                    run_dir / "last.pt")
        print(f"[finetune] epoch {epoch + 1}/{epochs}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
              f"(best {best['top1']:.2f})", file=sys.stderr, flush=True)
    summary = {"epochs": epochs, "top1": round(metrics.get("top1", best["top1"]), 2),
               "top5": round(metrics.get("top5", best.get("top5", 0.0)), 2), "best_top1": round(best["top1"], 2),
               "best_epoch": best.get("epoch"), "train_seconds": round(time.perf_counter() - begin, 1)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
