"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` idx files.

The directory defaults to ``/usr/share/datasets/fashion-mnist`` and can be moved with the
``CQPOLICY_FASHION_MNIST`` environment variable (or the ``root`` argument).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "CQPOLICY_FASHION_MNIST"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where we look for them."""


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[:4], "big")
    if header != magic:
        raise ValueError(f"{path}: not an idx file (magic {header:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({array.size} values for shape {shape})")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None):
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` in {train, test}."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    directory = fashion_mnist_dir(root)
    image_file, label_file = (directory / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file {path} not found; install it with `{INSTALL_HINT}` "
                f"or point ${ENV_VAR} at a folder holding the idx .gz files"
            )
    images = _read_idx(image_file, 0x00000803)
    labels = _read_idx(label_file, 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels
