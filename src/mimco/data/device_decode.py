"""``data.decode=gpu``: JPEG folders decoded and augmented on the training device (what the loader
workers and the device each do: docs/performance.md#image-folders).

The CPU path (each loader worker decodes, crops and augments one image) feeds a few hundred
images/s per worker, far below a compiled ViT-S step. An unreadable file is replaced by the next
readable one, as on the CPU path; a JPEG whose data does not decode is replaced by the batch's
previous image and counted as unreadable. On a CPU device the same code runs with libjpeg (the tests).
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor

from mimco.data.files import FileImages, decode_image

Crop = tuple[tuple[float, float], tuple[float, float]]  # (scale, ratio) of a random resized crop


class EncodedFiles(Dataset):
    """Item ``i``: ``(data, boxes, label)`` or None for an unreadable file. ``data`` is the file's
    bytes (uint8, 1-D) for a JPEG, else the decoded image (uint8 (C, H, W)); ``boxes`` (V, 4) holds
    each view's crop ``(top, left, height, width)``, drawn from the global generators (which
    :class:`~mimco.data.files.Substituting` seeds per image)."""

    def __init__(self, files: FileImages, crops: list[Crop]) -> None:
        self.files, self.crops = files, crops
        self.items = files.items  # Substituting names a file by it

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        raw = self.files.read(i)  # the encoded file (a folder's, a shard's, a Hugging Face dataset's)
        if raw is None:
            return None
        try:
            with Image.open(io.BytesIO(raw)) as im:  # the header only: size and format
                jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
                boxes = torch.tensor([RandomResizedCrop.get_params(im, list(scale), list(ratio))  # type: ignore[arg-type]
                                      for scale, ratio in self.crops])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        if jpeg:
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        else:  # not a JPEG nvJPEG takes: decoded here
            if (img := decode_image(raw, self.files.channels)) is None:
                return None
            data = pil_to_tensor(img)
        return data, boxes, self.files.items[i][1]

    @staticmethod
    def collate(batch: list[tuple[Any, tuple[int, ...]]]) -> tuple[tuple[Packed, torch.Tensor], list[int]]:
        """:class:`~mimco.data.files.Substituting` items -> ((packed data and boxes, labels (B,)), the
        unreadable files met, by index); the bytes travel as one buffer (one shared-memory block per batch)."""
        items = [b[0] for b in batch]
        flat = [x[0].reshape(-1) for x in items]
        shapes = [tuple(x[0].shape) for x in items]
        packed = Packed(torch.cat(flat), [len(f) for f in flat], shapes, torch.stack([x[1] for x in items]))
        return (packed, torch.tensor([x[2] for x in items])), [j for b in batch for j in b[1]]


class Packed(NamedTuple):
    """A batch of :class:`EncodedFiles` items: every item's bytes back to back in ``buffer``, with
    their ``lengths`` and ``shapes`` ((n,) for a JPEG's bytes, (C, H, W) for a decoded image), and
    the crop ``boxes`` (B, V, 4)."""

    buffer: torch.Tensor
    lengths: list[int]
    shapes: list[tuple[int, ...]]
    boxes: torch.Tensor

    def items(self) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(self.buffer.split(self.lengths), self.shapes)]


class DeviceViews(nn.Module):
    """Decode a batch of :class:`EncodedFiles` items on ``device``, crop and resize each view,
    then apply ``views.from_crops`` (a batched view transform built with ``crop=False``).
    Returns (the views, JPEGs that failed to decode)."""

    def __init__(self, views: nn.Module, img_size: int, channels: int, device: torch.device) -> None:
        super().__init__()
        self.views, self.size, self.channels, self.device = views, img_size, channels, device

    def decode(self, data: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Each item as uint8 (C, H, W) on the device, C = ``channels`` (JPEGs decoded in that mode,
        other files already converted by the worker); a JPEG that fails to decode becomes the
        previous good image (the first good one for the first)."""
        mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
        jpegs = [i for i, x in enumerate(data) if x.ndim == 1]
        out: list[torch.Tensor | None] = [x.to(self.device, non_blocking=True) if x.ndim == 3 else None for x in data]
        if jpegs:
            with _decode_stream(self.device) as hand_over:
                try:
                    decoded = decode_jpeg([data[i] for i in jpegs], mode=mode, device=self.device)
                except RuntimeError:  # one bad file fails the batched call: decode one by one
                    decoded = [_decode_one(data[i], mode, self.device) for i in jpegs]
                hand_over(decoded)
            for i, x in zip(jpegs, decoded):
                out[i] = x
        if not (good := [x for x in out if x is not None]):
            raise RuntimeError("no image of the batch could be decoded")
        filled = itertools.accumulate(out, lambda last, x: last if x is None else x, initial=good[0])
        return list(filled)[1:], len(out) - len(good)

    def crop(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) float in [0, 1]: image b cut at ``boxes[b]`` and resized to S (bilinear, antialiased)."""
        s = self.size
        rows = []
        for img, (t, left, h, w) in zip(images, boxes.tolist()):
            patch = img[None, :, t : t + h, left : left + w].float().div_(255.0)
            rows.append(F.interpolate(patch, size=(s, s), mode="bilinear", antialias=True, align_corners=False))
        return torch.cat(rows).clamp_(0.0, 1.0)

    @torch.no_grad()
    def forward(self, batch: Packed) -> tuple[list[torch.Tensor], int]:
        images, bad = self.decode(batch.items())
        crops = [self.crop(images, batch.boxes[:, v]) for v in range(batch.boxes.shape[1])]
        return self.views.from_crops(crops), bad


@contextlib.contextmanager
def _decode_stream(device: torch.device) -> Iterator[Callable[[list[torch.Tensor | None]], None]]:
    """``with _decode_stream(device) as hand_over``: the body decodes on a side stream of its own;
    ``hand_over(outputs)`` makes them safe to use (and free) on the caller's stream.

    Why: ``decode_jpeg(device="cuda")`` allocates its outputs on the *current* stream but nvJPEG
    writes them on a stream of torchvision's that never waits on the current one. On the training
    stream the caching allocator may hand the decode a block freed by a tensor that queued kernels
    of the previous step still read, and the decode would overwrite it under them. On a side
    stream the outputs come from blocks only earlier decodes used; ``record_stream`` keeps each
    from reuse until the training stream's kernels that read it finish. No host synchronisation.
    """
    if device.type != "cuda":
        yield lambda outputs: None
        return
    caller = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device.index, torch.cuda.Stream(device))
    side.wait_stream(caller)  # the bytes' host-to-device copies, queued work, in order

    def hand_over(outputs: list[torch.Tensor | None]) -> None:
        for x in outputs:
            if x is not None:
                x.record_stream(caller)

    try:
        with torch.cuda.stream(side):
            yield hand_over
    finally:
        caller.wait_stream(side)


_SIDE_STREAMS: dict[int | None, Any] = {}  # one side stream per device, for the whole process


def _decode_one(data: torch.Tensor, mode: ImageReadMode, device: torch.device) -> torch.Tensor | None:
    with contextlib.suppress(RuntimeError):
        return decode_jpeg(data, mode=mode, device=device)
    return None

