"""Full fine-tuning with the MAE/BEiT recipe, built from timm's pieces: layer-wise lr decay,
AdamW, per-iteration warm-up + cosine, RandAugment, mixup/cutmix with label smoothing, random
erasing, drop path, mean-pooled patch tokens + fc_norm (or CLS). Runs as one more method of the
shared training engine; evaluates every epoch; keeps ``last.pt`` (resumable) and ``best.safetensors``."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import Dataset

from mimco.config import FinetuneConfig
from mimco.data.build import BatchStream, ImageArray, load_dataset
from mimco.data.subsets import labelled_subset
from mimco import distributed as dist
from mimco.engine.rng import seed_process
from mimco.engine.trainer import Trainer, accumulation
from mimco.errors import MimcoError
from mimco.io import save_weights
from mimco.runs import write_summary
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
def evaluate_classifier(model: nn.Module, dataset: Any, cfg: FinetuneConfig, device: torch.device,
                        batch_size: int = 256) -> dict[str, float]:
    """Top-1 / top-5 (percent) on a labelled split. Distributed: each process scores every
    world-th image and the counts are summed; every process runs the same number of forward
    passes (FSDP's forward is a collective)."""
    was = model.training
    model.eval()
    r, w = dist.rank(), dist.world_size()
    idx = torch.arange(r, len(dataset), w)
    batches = dist.all_reduce_(torch.tensor(math.ceil(len(idx) / batch_size), device=device), "max")
    counts = torch.zeros(3, device=device)  # correct top-1, correct top-5, images
    done = 0
    for x, y in eval_batches(dataset, cfg.data, batch_size, device, indices=idx):
        top = model(x).topk(min(5, model.num_classes), dim=1).indices
        y = y.to(device)
        counts[0] += (top[:, 0] == y).sum()
        counts[1] += (top == y[:, None]).any(1).sum()
        counts[2] += len(y)
        done += 1
    x0 = torch.zeros(1, cfg.data.channels, cfg.data.img_size, cfg.data.img_size, device=device)
    for _ in range(int(batches) - done):  # unreadable test files left this process short: keep in step
        model(x0)
    c1, c5, n = dist.all_reduce_(counts).tolist()
    model.train(was)
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}


def _num_classes(train: Any) -> int:
    if isinstance(train, ImageArray):
        return int(train.labels.max()) + 1
    return len(train.classes)


class Finetune(nn.Module):
    """Fine-tuning as a method of the shared training engine (:class:`~mimco.engine.trainer.Trainer`):
    a timm classifier, mixup/cutmix, the (soft-target or label-smoothing) cross-entropy, layer-wise
    lr decay groups, and an evaluation on the test split at the end of every epoch that keeps
    ``best.safetensors``. The best top-1/top-5/epoch live in a buffer, so they resume with the model.
    """

    total_steps = 1
    metric_keys = ("top1", "top5", "best_top1")

    def __init__(self, model: VisionTransformer, cfg: FinetuneConfig, num_classes: int, test: Any, run_dir: Path) -> None:
        super().__init__()
        a = cfg.aug
        self.model, self.cfg, self.test, self.run_dir = model, cfg, test, run_dir
        mix = a.mixup > 0 or a.cutmix > 0
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                           num_classes=num_classes) if mix else None
        self.criterion = SoftTargetCrossEntropy() if mix else LabelSmoothingCrossEntropy(a.label_smoothing)
        self.register_buffer("best", torch.tensor([-1.0, -1.0, 0.0]))  # top-1, top-5, epoch

    def forward(self, views: list[torch.Tensor], step: int,
                first_index: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [images (B, C, S, S), labels (B,)] -> (loss, {})."""
        x, y = views
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.criterion(self.model(x), y), {}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return layer_decay_groups(self.model, weight_decay, self.cfg.classifier.layer_decay)

    def backbone(self) -> VisionTransformer:
        return self.model

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def on_epoch_end(self, epoch: float) -> dict[str, float]:
        """Evaluate (every process), keep the best weights (rank 0 writes), print one line."""
        device = self.best.device
        m = evaluate_classifier(self.model, self.test, self.cfg, device)
        if m["top1"] > float(self.best[0]):
            self.best.copy_(torch.tensor([m["top1"], m["top5"], epoch], device=device))
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.is_main():
                save_weights(state, self.run_dir / "best.safetensors", {"epoch": f"{epoch:g}"})
        if dist.is_main():
            print(f"[finetune] epoch {epoch:g}: top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  "
                  f"(best {float(self.best[0]):.2f})", file=sys.stderr, flush=True)
        return {"top1": round(m["top1"], 2), "top5": round(m["top5"], 2), "best_top1": round(float(self.best[0]), 2)}


def train_transform(cfg: FinetuneConfig) -> Any:
    """timm's training transform for fine-tuning (RandAugment, random erasing; per image)."""
    d, a = cfg.data, cfg.aug
    return create_transform(d.img_size, is_training=True, scale=(a.min_scale, 1.0), ratio=tuple(a.ratio),
                            hflip=a.flip_prob, auto_augment=a.auto_augment or None, interpolation="bicubic",
                            re_prob=a.reprob, re_mode="pixel", mean=tuple(d.mean[: d.channels]),
                            std=tuple(d.std[: d.channels]), color_jitter=0.0 if a.auto_augment else a.color_jitter)


def finetune_stream(cfg: FinetuneConfig, device: torch.device) -> tuple[BatchStream, Any, int]:
    """(the training batches of this process, the test split, the number of classes)."""
    d = cfg.data
    if d.name == "folder":
        raise MimcoError("fine-tuning needs labels: use data.name=imagefolder (class sub-folders), not folder")
    train = load_dataset(d, train=True, transform=train_transform(cfg) if d.name == "imagefolder" else None)
    if d.labels_per_class or d.labels_fraction:  # few labels: the same balanced subset the probes' --per-class draws
        train = labelled_subset(train, d.labels_per_class, d.labels_fraction, d.label_seed,
                                "data.labels_per_class" if d.labels_per_class else "data.labels_fraction")
        if len(train) < cfg.optim.batch_size:
            raise MimcoError(f"optim.batch_size={cfg.optim.batch_size} exceeds the {len(train)} labelled training images; "
                             f"set optim.batch_size to at most {len(train)}")
    train_ds: Dataset = train if d.name == "imagefolder" else ArrayImages(train, train_transform(cfg))
    test = load_dataset(d, train=False)
    if test is None:
        raise MimcoError(f"{d.root} has no val/ split to evaluate on; lay the data out as train/ and val/ class folders")
    stream = BatchStream(train_ds, cfg.optim.batch_size, cfg.train.seed, device, None, d.num_workers,
                         d.max_bad_fraction, dist.rank(), dist.world_size(), labels=True)
    return stream, test, _num_classes(train)


def finetune(backbone: VisionTransformer, cfg: FinetuneConfig, run_dir: Path, device: torch.device,
             resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune on the shared engine (DDP/FSDP under torchrun, bf16/fp16, accumulation, clean
    SIGTERM stop, NaN stop, resume) and evaluate every epoch; writes log.csv, last.pt,
    best.safetensors and (rank 0) summary.json."""
    stream, test, num_classes = finetune_stream(cfg, device)
    a = cfg.aug
    micro = stream.local // accumulation(stream.local, cfg.optim.accum_steps, cfg.optim.micro_batch)
    if (a.mixup > 0 or a.cutmix > 0) and micro % 2:
        raise MimcoError(f"mixup/cutmix pair the images of a batch, but each process's micro-batch holds {micro}; "
                         "use an even optim.batch_size per process, or aug.mixup=0 aug.cutmix=0")
    model = build_classifier(backbone, num_classes, cfg.classifier.pool, cfg.classifier.drop_path_rate)
    method = Finetune(model, cfg, num_classes, test, run_dir).to(device)
    seed_process(cfg.train.seed * 1000 + dist.rank() + 1)  # per-process augmentation, mixup and drop path
    out = Trainer(method, cfg, stream, run_dir, "finetune", device, resume).fit()
    best = method.best.tolist()
    summary = {"epochs": round(out["step"] / stream.steps_per_epoch, 4), "top1": out.get("top1", round(best[0], 2)),
               "top5": out.get("top5", round(best[1], 2)), "best_top1": round(best[0], 2),
               "best_epoch": best[2], "step": out["step"], "total_steps": out["total_steps"],
               "loss": out.get("loss"), "train_seconds": out["train_seconds"]}
    if "stopped_by" in out:
        summary["stopped_by"] = out["stopped_by"]
    if dist.is_main():
        write_summary(run_dir, summary)
    return summary
