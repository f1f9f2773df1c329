"""Fashion-MNIST loader (idx files from the Debian package ``dataset-fashion-mnist``; no download).

Install with ``apt-get install dataset-fashion-mnist`` (files in ``/usr/share/datasets/fashion-mnist``), or point
the environment variable ``QDRIFT_FASHION_MNIST`` (or the ``root`` argument) at a folder holding the four
``*-idx?-ubyte[.gz]`` files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASSES", "NUM_CLASSES", "DEFAULT_ROOT", "load_fashion_mnist", "to_model_range", "to_uint8", "data_root"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASSES)
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Folder of the idx files: ``root``, else ``$QDRIFT_FASHION_MNIST``, else the Debian package's folder."""
    return Path(root or os.environ.get("QDRIFT_FASHION_MNIST") or DEFAULT_ROOT)


def _read(folder: Path, stem: str, magic: int, offset: int) -> np.ndarray:
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = folder / name
        if path.is_file():
            with opener(path, "rb") as fh:
                raw = fh.read()
            break
    else:
        raise FileNotFoundError(f"{stem}[.gz] not found in {folder}; install the Debian package "
                                f"dataset-fashion-mnist or set QDRIFT_FASHION_MNIST")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{folder / stem}: bad idx magic number {found}, expected {magic}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder of the idx files (see :func:`data_root`).

    Returns:
        ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Raises:
        ValueError: unknown split or malformed files. FileNotFoundError: files missing.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = data_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = _read(folder, img_stem, 2051, 16)  # idx3: magic, count, rows, cols
    labels = _read(folder, lbl_stem, 2049, 8)  # idx1: magic, count
    if images.size != labels.size * 28 * 28:
        raise ValueError(f"{folder}: {images.size} image bytes do not match {labels.size} labels of 28x28")
    if labels.max() >= NUM_CLASSES:
        raise ValueError(f"{folder}: label {labels.max()} out of range")
    return (torch.from_numpy(images.reshape(-1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64)))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> float32 ``[N, 1, 28, 28]`` in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = images.float() / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] (any shape) -> uint8 in [0, 255] (clipped, rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
