"""Fashion-MNIST from its standard idx(.gz) files.

Default location: where Debian's ``dataset-fashion-mnist`` package installs them. When the
files are absent and ``download`` is allowed, torchvision downloads them into ``root``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from mimco.errors import MimcoError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MimcoError(f"cannot read {path}: {e}; reinstall the dataset or point data.root elsewhere") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MimcoError(f"{path} is not an unsigned-byte idx file; reinstall the dataset")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise MimcoError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); reinstall the dataset")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    places = (d / name for d in (root, root / "FashionMNIST" / "raw") for name in (stem + ".gz", stem))
    return next((p for p in places if p.is_file()), None)


def load_fashion_mnist(root: str = "", train: bool = True, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28), labels int64 (N,))."""
    base = Path(root or DEFAULT_ROOT)
    img_stem, lbl_stem = _FILES[train]
    img_path, lbl_path = _find(base, img_stem), _find(base, lbl_stem)
    if (img_path is None or lbl_path is None) and download:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(str(base), train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise MimcoError(f"Fashion-MNIST download into {base} failed ({type(e).__name__}); "
                             "install it with `apt-get install dataset-fashion-mnist` or set data.root") from None
        img_path, lbl_path = _find(base, img_stem), _find(base, lbl_stem)
    if img_path is None or lbl_path is None:
        raise MimcoError(f"Fashion-MNIST files ({img_stem}.gz) not found in {base}; install them with "
                         "`apt-get install dataset-fashion-mnist`, set data.root=DIR, or set data.download=true")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MimcoError(f"Fashion-MNIST files in {base} do not match (images {images.shape}, labels {labels.shape})")
    return images, labels.astype(np.int64)
