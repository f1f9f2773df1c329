"""Image grids and a dependency-free PNG writer (zlib + struct; no Pillow)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_png", "read_png_size"]


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images ``[N, C, H, W]`` (any range) into one ``[C, H', W']`` grid with ``nrow`` images per row.

    Args:
        images: ``[N, C, H, W]``, N >= 1.
        nrow: images per row.
        pad: pixels between tiles; pad_value: their value.
    """
    if images.ndim != 4 or images.shape[0] == 0 or nrow < 1:
        raise ValueError(f"need images [N >= 1, C, H, W] and nrow >= 1, got {tuple(images.shape)}, nrow={nrow}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_png(path: str | Path, image: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write an 8-bit grayscale or RGB PNG.

    Args:
        path: output file.
        image: ``[H, W]``, ``[1, H, W]`` or ``[3, H, W]`` float in ``value_range``, or uint8 (written as is).
        value_range: the float range mapped to 0..255.

    Returns:
        The path written.
    """
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"need an image [H, W], [1, H, W] or [3, H, W], got shape {a.shape}")
    if a.dtype != np.uint8:
        lo, hi = value_range
        a = np.clip(np.round((a.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    h, w = a.shape[:2]
    color = 2 if a.ndim == 3 else 0
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def read_png_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from a PNG header."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", data[16:24])
