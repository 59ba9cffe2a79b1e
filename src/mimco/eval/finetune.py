"""Full fine-tuning with the MAE/BEiT recipe from timm's pieces (layer-wise lr decay, AdamW, warm-up +
cosine, RandAugment, mixup/cutmix, label smoothing, random erasing, drop path, mean-pooled tokens +
fc_norm or CLS): the method ``finetune`` of the fine-tuning stage, scored every epoch."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mimco import distributed as dist
from mimco.config import FinetuneConfig
from mimco.data.build import BatchStream, load_dataset
from mimco.engine.trainer import accumulation
from mimco.errors import MimcoError
from mimco.eval.features import eval_batches
from mimco.io import save_weights
from mimco.methods.base import MethodDefaults
from mimco.methods.registry import register_method
from mimco.models.export import timm_kwargs


def build_classifier(backbone: VisionTransformer, num_classes: int, pool: str = "avg",
                     drop_path_rate: float = 0.1, img_size: int = 0) -> VisionTransformer:
    """A timm ViT classifier initialised from ``backbone`` at ``img_size`` (0 = the backbone's; another
    size resamples the position table, as timm does for a pre-trained model at a new resolution);
    head (and fc_norm for ``avg``) fresh (MAE); ``num_classes=0``: no head (the patch tokens' users)."""
    kw = {**timm_kwargs(backbone), "num_classes": num_classes, "global_pool": pool, "drop_path_rate": drop_path_rate}
    kw["img_size"] = img_size or kw["img_size"]
    model = VisionTransformer(**kw)
    state = {k: v for k, v in backbone.state_dict().items()
             if not k.startswith("head.") and not (pool == "avg" and k.startswith("norm."))}
    if state["pos_embed"].shape != model.pos_embed.shape:
        prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if pool == "avg" else set())
    if set(missing) - fresh or unexpected:
        raise MimcoError(f"backbone does not fit the classifier: missing {sorted(set(missing) - fresh)}, unexpected "
                         f"{unexpected}")
    if num_classes:
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
    idx = torch.arange(dist.rank(), len(dataset), dist.world_size())
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


class Finetune(MethodDefaults, nn.Module):
    """Fine-tuning as a method of the training engine: a timm classifier, mixup/cutmix, layer-wise lr
    decay, a test-split evaluation every epoch that keeps ``best.safetensors``. The best top-1 /
    top-5 / epoch live in a buffer, so they resume with the model."""

    metric_keys = ("top1", "top5", "best_top1", "best_epoch")

    def __init__(self, model: VisionTransformer, cfg: FinetuneConfig, num_classes: int, test: Any,
                 run_dir: Path) -> None:
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

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
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
        return {"top1": round(m["top1"], 2), "top5": round(m["top5"], 2), "best_top1": round(float(self.best[0]), 2),
                "best_epoch": float(self.best[2])}


@register_method("finetune", stage="finetune", views="labelled")
def build_finetune(cfg: FinetuneConfig, device: torch.device, stream: BatchStream, run_dir: Path,
                   backbone: VisionTransformer, **_: Any) -> Finetune:
    """Fine-tuning of ``backbone`` under a :class:`~mimco.config.FinetuneConfig`, on the classes of
    ``stream``'s training set, evaluated on the test split every epoch (``best.safetensors`` in
    ``run_dir``)."""
    micro = stream.local // accumulation(stream.local, cfg.optim.accum_steps, cfg.optim.micro_batch)
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and micro % 2:
        raise MimcoError(f"mixup/cutmix pair the images of a batch, but each process's micro-batch holds {micro}; "
                         "use an even optim.batch_size per process, or aug.mixup=0 aug.cutmix=0")
    chans = backbone.patch_embed.proj.in_channels
    if cfg.data.channels != chans:
        raise MimcoError(f"the backbone takes {chans}-channel images but data.channels={cfg.data.channels}; set "
                         f"data.channels={chans}")
    if (test := load_dataset(cfg.data, train=False)) is None:
        raise MimcoError(f"{cfg.data.root} has no val/ split to evaluate on; lay the data out as train/ and val/ "
                         "class folders")
    model = build_classifier(backbone, stream.num_classes, cfg.classifier.pool, cfg.classifier.drop_path_rate,
                             cfg.data.img_size)
    return Finetune(model, cfg, stream.num_classes, test, run_dir).to(device)
