"""Continued pre-training (``model.init_from``): a method's trained encoders start from the backbone
of any file :func:`~mimco.models.formats.load_backbone` reads, its position table resampled to
the model's grid."""

from __future__ import annotations

from typing import Any

from torch import nn

from mimco.errors import MimcoError


def _shape(model: nn.Module) -> str:
    p = model.patch_embed
    return (f"width {model.embed_dim}, depth {len(model.blocks)}, patch {p.patch_size[0]}, "
            f"{p.proj.in_channels} channels")


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") if keys else "none"


def init_encoders(method: Any, path: str, encoder: str = "momentum") -> str:
    """Load the backbone in ``path`` into every encoder of ``method`` (MoCo: base and momentum;
    MimCo/SimMIM: the student) and return the one-line report: how many tensors were loaded,
    which of the model's were missing from the file (left as initialised), which of the file's
    were not used, and what was resampled. Heads and projectors stay as initialised. A file with
    no ViT, or a ViT of another shape, is a :class:`MimcoError` naming ``model.init_from``."""
    from mimco.models.formats import load_backbone

    targets: dict[str, nn.Module] = method.encoders()
    first = next(iter(targets.values()))
    grid = tuple(first.patch_embed.grid_size)
    try:
        src, state = load_backbone(path, encoder)
        if not hasattr(src, "patch_embed"):
            raise MimcoError("it holds no ViT")
        native = tuple(src.patch_embed.grid_size)
        resampled = []
        if native != grid and src.patch_embed.patch_size == first.patch_embed.patch_size:
            src, state = load_backbone(path, encoder, first.patch_embed.img_size[0])
            resampled = [f"pos_embed ({native[0]}x{native[1]} -> {grid[0]}x{grid[1]} grid)"]
    except MimcoError as e:
        raise MimcoError(f"model.init_from={path}: {e}") from None
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    missing: set[str] = set()
    unused: set[str] = set(sd)
    for target in targets.values():
        own = {k: v for k, v in target.state_dict().items() if not k.startswith("head.")}
        if (k := next((key for key in sd if key in own and own[key].shape != sd[key].shape), None)) is not None:
            raise MimcoError(f"model.init_from={path} holds a ViT ({_shape(src)}) that does not fit the model "
                             f"({_shape(target)}): {k} is {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in "
                             "the model; set model.arch / embed_dim / depth / num_heads / patch_size and data.channels "
                             "to the file's")
        target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        missing |= own.keys() - sd.keys()
        unused -= own.keys()
    return (f"mimco: model.init_from={path} ({state.format}): loaded {len(sd) - len(unused)} tensors into "
            f"{' and '.join(targets)}; missing {_short(sorted(missing))}; not used {_short(sorted(unused))}; "
            f"resampled {_short(resampled)}")
