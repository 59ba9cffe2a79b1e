"""Pictures: t-SNE of frozen features, training curves from run CSVs, CLS attention maps, the
principal components of patch tokens, and a segmentation probe's masks beside the ground truth."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mimco.errors import MimcoError  # noqa: E402
from mimco.eval.segmentation import patch_grid, upsampled, val_batches  # noqa: E402


def tsne_figure(panels: list[tuple[str, torch.Tensor, torch.Tensor]], out: str | Path, seed: int = 0,
                class_names: list[str] | None = None) -> Path:
    """One t-SNE scatter per (title, features (N, D), labels (N,)), side by side, coloured by class."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, feats, labels) in zip(axes[0], panels):
        x = feats.float().numpy()
        emb = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3),
                   random_state=seed).fit_transform(x)
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels.numpy(), cmap="tab10", s=3, vmin=0, vmax=9)
        ax.set_title(title)
    if class_names:
        handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i)), label=n) for i,
                   n in enumerate(class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 10), fontsize=8, frameon=False)
    return _save(fig, out, bottom=0.08 if class_names else 0.0)


def read_log(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MimcoError(f"{path} has no rows yet")
    out = {}
    for k in rows[0]:
        with contextlib.suppress(TypeError, ValueError):  # a column that is not numbers
            out[k] = np.array([float(r[k]) for r in rows])
    return out


def curves_figure(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Loss terms, lr and images/s against the step, one line per run (from each run's log.csv)."""
    logs = []
    for d in run_dirs:
        p = Path(d) / "log.csv" if Path(d).is_dir() else Path(d)
        if not p.is_file():
            raise MimcoError(f"no log.csv in {d}; pass run folders written by mimco")
        logs.append((p.parent.name, read_log(p)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, log in logs:
        x = log.get("step", np.arange(len(next(iter(log.values())))))
        for key in [k for k in log if k.startswith("loss")]:
            axes[0].plot(x, log[key], label=f"{name}: {key}")
        for ax, key in zip(axes[1:], ["lr", "images_per_s"]):
            if key in log:
                ax.plot(x, log[key], label=name)
    for ax, title in zip(axes, ["loss", "learning rate", "images / s"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, out, ticks=True)


@torch.no_grad()
def cls_attention(backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention from CLS to every patch, averaged over heads: (B, H, W) summing to <= 1."""
    blk = backbone.blocks[-1]
    captured = {}
    # the block's own q/k/v projection, seen inside its forward (an FSDP unit's parameters are whole only there)
    handle = blk.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out))
    backbone.eval()
    backbone.forward_features(x)
    handle.remove()
    b, n, _ = captured["qkv"].shape
    qkv = captured["qkv"].reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1])
    attn = (q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1)  # (B, heads, N, N)
    p = backbone.num_prefix_tokens
    gh, gw = backbone.patch_embed.grid_size
    return attn[:, :, 0, p:].mean(1).reshape(b, gh, gw)


def denormalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Model inputs (B, C, H, W) on any device back to [0, 1] images for display, on the CPU."""
    c = x.shape[1]
    return x.float().cpu() * torch.tensor(std[:c]).view(1, -1, 1, 1) + torch.tensor(mean[:c]).view(1, -1, 1, 1)


def attention_figure(rows: list[tuple[str, VisionTransformer]], images: torch.Tensor, shown: torch.Tensor,
                     out: str | Path) -> Path:
    """For each (name, backbone): the CLS attention map of each image, over the image.

    ``images``: normalised model inputs (B, C, H, W); ``shown``: the same images in [0, 1] for display.
    """
    fig, axes, disp = _image_rows(shown, len(rows))
    for i, (name, model) in enumerate(rows, start=1):
        maps = torch.nn.functional.interpolate(cls_attention(model, images)[:, None], size=images.shape[-2:],
                                               mode="nearest")[:, 0].float().cpu().numpy()  # from the model's device
        for j in range(len(disp)):
            axes[i][j].imshow(disp[j].mean(-1), cmap="gray")
            axes[i][j].imshow(maps[j], cmap="inferno", alpha=0.6)
        axes[i][0].set_ylabel(name, fontsize=8)
    return _save(fig, out)


def _image_rows(shown: torch.Tensor, rows: int) -> tuple[plt.Figure, Any, np.ndarray]:
    """A figure of ``rows + 1`` rows of B panels, the first showing ``shown`` (B, C, H, W) in [0, 1];
    returns (figure, axes, the images as (B, H, W, C) numbers)."""
    disp = shown.float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()
    b = len(disp)
    fig, axes = plt.subplots(rows + 1, b, figsize=(1.6 * b, 1.7 * (rows + 1)), squeeze=False)
    for j in range(b):
        axes[0][j].imshow(disp[j].squeeze(), cmap="gray" if disp.shape[-1] == 1 else None)
    axes[0][0].set_ylabel("image", fontsize=8)
    return fig, axes, disp


@torch.no_grad()
def pca_maps(backbone: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The first three principal components of the patch tokens of images ``x`` (B, C, H, W), fitted
    on all of their tokens together, each scaled to [0, 1]: (B, h, w, 3) RGB on the patch grid."""
    from sklearn.decomposition import PCA

    backbone.eval()
    tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :].float().cpu()
    b, n, d = tokens.shape
    gh, gw = backbone.patch_embed.grid_size
    comp = PCA(n_components=3, random_state=0).fit_transform(tokens.reshape(-1, d).numpy())
    lo, hi = comp.min(0), comp.max(0)
    return ((comp - lo) / np.maximum(hi - lo, 1e-8)).reshape(b, gh, gw, 3)


def pca_figure(rows: list[tuple[str, torch.nn.Module]], images: torch.Tensor, shown: torch.Tensor,
               out: str | Path) -> Path:
    """The images, then for each (name, backbone) the first three principal components of its patch
    tokens as RGB (:func:`pca_maps`), nearest-neighbour upsampled to the image."""
    fig, axes, disp = _image_rows(shown, len(rows))
    for i, (name, model) in enumerate(rows, start=1):
        maps = pca_maps(model, images)
        for j in range(len(disp)):
            axes[i][j].imshow(maps[j], interpolation="nearest")
        axes[i][0].set_ylabel(f"{name}\nPCA 1-3", fontsize=8)
    return _save(fig, out)


@torch.no_grad()
def segmentation_figure(backbone: torch.nn.Module | None, head: torch.nn.Module, val: Any, data: Any,
                        device: torch.device, out: str | Path, layers: int = 1, patch: int = 0, n: int = 8,
                        names: list[str] | None = None) -> Path:
    """The first ``n`` validation samples: image, ground truth, the probe's prediction (upsampled to
    the mask's size); ignored pixels black."""
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for x, masks, _ in val_batches(val, data, n):
        logits = head(patch_grid(backbone, x.to(device), layers, patch).float())
        for k in range(len(masks)):
            pred = upsampled(logits[k : k + 1], masks[k].shape[-2:]).argmax(1)[0].cpu().numpy()
            rows.append((denormalize(x[k : k + 1], data.mean, data.std)[0].permute(1, 2, 0).clamp(0, 1).numpy(),
                         masks[k].numpy(), pred))
        if len(rows) >= n:
            break
    rows = rows[:n]
    k = head.conv.out_channels
    cmap = matplotlib.colormaps["tab20"].resampled(max(k, 2))

    def paint(m: np.ndarray) -> np.ndarray:
        rgb = cmap(np.clip(m, 0, k - 1) / max(k - 1, 1))[..., :3]
        rgb[m == 255] = 0
        return rgb

    fig, axes = plt.subplots(3, len(rows), figsize=(1.6 * len(rows), 5.2), squeeze=False)
    for j, (img, gt, pred) in enumerate(rows):
        axes[0][j].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[1][j].imshow(paint(gt), interpolation="nearest")
        axes[2][j].imshow(paint(pred), interpolation="nearest")
    for i, label in enumerate(["image", "ground truth", "prediction"]):
        axes[i][0].set_ylabel(label, fontsize=8)
    if names:
        handles = [plt.Line2D([], [], marker="s", ls="", color=cmap(i / max(k - 1, 1)), label=c)
                   for i, c in enumerate(names[:k])]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    return _save(fig, out, bottom=0.12 if names else 0.0)


def _save(fig: plt.Figure, out: str | Path, bottom: float = 0.0, ticks: bool = False) -> Path:
    """Write ``fig`` to ``out`` (its folder made), the panels without ticks unless ``ticks``."""
    for ax in [] if ticks else fig.axes:
        ax.set_xticks([]), ax.set_yticks([])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
