"""Figures of ``qdrift bench``: labelled image grids and the calibrated ``c_i`` envelopes (the paper's Fig. 2).

Drawing uses Pillow's ``ImageDraw`` (lines, polygons, its built-in bitmap font) on an RGB array; the PNG is
written with :func:`qdrift.bench.images.save_png`. Pillow is part of the ``bench`` extra; without it the grids
are written without their row labels and the ``c_i`` plot is skipped (with a message saying so).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .images import make_grid, save_png

__all__ = ["have_pillow", "labelled_grid", "save_labelled_grid", "envelope_plot", "save_envelope_plot"]

# colors for K = 1, 5, 50, ... (light to dark)
_PALETTE = [(230, 159, 0), (86, 180, 233), (0, 114, 178), (213, 94, 0), (0, 158, 115)]


def have_pillow() -> bool:
    try:
        import PIL.ImageDraw  # noqa: F401
    except ImportError:
        return False
    return True


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def labelled_grid(rows: Sequence[Tuple[str, torch.Tensor]], scale: int = 3, pad: int = 2,
                  label_width: int = 110) -> np.ndarray:
    """One image row per ``(label, images [N, 1, H, W] in [-1, 1])``; returns uint8 ``[H', W', 3]``.

    Images are upscaled ``scale`` times (nearest) so that 28x28 tiles are visible; without Pillow the labels
    are left out. The label column is ``label_width`` pixels wide, or wider where a label needs it (a label
    never runs into the first image).
    """
    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    ncol = max(r[1].shape[0] for r in rows)
    tiles = []
    for _, imgs in rows:
        if imgs.shape[0] < ncol:  # pad short rows with white
            imgs = torch.cat([imgs, imgs.new_ones((ncol - imgs.shape[0],) + tuple(imgs.shape[1:]))])
        tiles.append(imgs)
    x = torch.cat(tiles).float().clamp(-1, 1)
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=ncol, pad=pad, pad_value=1.0)  # [C, H, W] in [-1, 1]
    g = ((grid[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    if not have_pillow():
        return np.repeat(g[:, :, None], 3, axis=2)
    from PIL import Image, ImageDraw

    h, w = g.shape
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([label_width] + [int(measure.textlength(label, font=_font())) + 12 for label, _ in rows])
    canvas = Image.new("RGB", (w + label_width, h), (255, 255, 255))
    canvas.paste(Image.fromarray(g).convert("RGB"), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    tile = x.shape[-1] + pad
    for r, (label, _) in enumerate(rows):
        draw.text((4, pad + r * tile + tile // 2 - 6), label, fill=(0, 0, 0), font=_font())
    return np.asarray(canvas)


def save_labelled_grid(path: str | Path, rows: Sequence[Tuple[str, torch.Tensor]], title: str = "",
                       **kw: Any) -> Path:
    """Write :func:`labelled_grid` (with an optional title line) as a PNG."""
    arr = labelled_grid(rows, **kw)
    if title and have_pillow():
        arr = _with_title(arr, title)
    return save_png(path, np.ascontiguousarray(np.transpose(arr, (2, 0, 1))))


def _with_title(arr: np.ndarray, title: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w, _ = arr.shape
    canvas = Image.new("RGB", (w, h + 18), (255, 255, 255))
    canvas.paste(Image.fromarray(arr), (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0), font=_font())
    return np.asarray(canvas)


def _nice_log_ticks(lo: float, hi: float) -> List[float]:
    return [10.0 ** e for e in range(int(math.floor(lo)), int(math.ceil(hi)) + 1)]


def envelope_plot(panels: Sequence[Dict[str, Any]], width: int = 460, height: int = 300) -> np.ndarray:
    """Plot min-max envelopes of ``c_i`` per step, log y axis; one panel per dict, side by side.

    Each panel: ``title``, ``series``: list of ``{"label", "lo" [S], "hi" [S], "mean" [S]}`` (drawn in order,
    first as the widest light band; an envelope with ``lo == hi`` is a line). Returns uint8 ``[H, W, 3]``.
    """
    from PIL import Image, ImageDraw

    font = _font()
    ml, mr, mt, mb = 62, 12, 26, 58
    img = Image.new("RGB", (width * len(panels), height), (255, 255, 255))
    draw = ImageDraw.Draw(img, "RGBA")
    for p, panel in enumerate(panels):
        x0 = p * width
        vals = np.concatenate([np.asarray(s[k], dtype=np.float64) for s in panel["series"] for k in ("lo", "hi")])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if vals.size == 0:
            vals = np.array([1e-6, 1e-5])
        ylo, yhi = math.log10(vals.min()) - 0.1, math.log10(vals.max()) + 0.1
        steps = len(panel["series"][0]["lo"])
        left, right, top, bottom = x0 + ml, x0 + width - mr, mt, height - mb

        def px(i: float) -> float:
            return left + (right - left) * (i / max(steps - 1, 1))

        def py(v: float) -> float:
            v = math.log10(max(v, 10 ** ylo))
            return bottom - (bottom - top) * (v - ylo) / (yhi - ylo)

        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        for t in _nice_log_ticks(ylo, yhi):
            if 10 ** ylo <= t <= 10 ** yhi:
                y = py(t)
                draw.line([left, y, right, y], fill=(225, 225, 225))
                draw.text((x0 + 4, y - 6), f"{t:.0e}", fill=(0, 0, 0), font=font)
        for i in range(0, steps, max(1, steps // 6)):
            draw.line([px(i), bottom, px(i), bottom + 4], fill=(0, 0, 0))
            draw.text((px(i) - 4, bottom + 6), str(i), fill=(0, 0, 0), font=font)
        draw.text((right - 40, bottom + 18), "step i", fill=(0, 0, 0), font=font)
        draw.text((x0 + 4, 6), panel["title"], fill=(0, 0, 0), font=font)
        for s_idx, s in enumerate(panel["series"]):
            color = _PALETTE[s_idx % len(_PALETTE)]
            lo, hi = np.asarray(s["lo"], dtype=np.float64), np.asarray(s["hi"], dtype=np.float64)
            upper = [(px(i), py(hi[i])) for i in range(steps)]
            lower = [(px(i), py(lo[i])) for i in reversed(range(steps))]
            if np.any(hi > lo * (1 + 1e-6)):
                draw.polygon(upper + lower, fill=color + (90,))
            mean = np.asarray(s.get("mean", (lo + hi) / 2), dtype=np.float64)
            draw.line([(px(i), py(mean[i])) for i in range(steps)], fill=color + (255,), width=2)
            ly = height - 30 + 0 * s_idx
            lx = left + s_idx * 125
            draw.rectangle([lx, ly, lx + 14, ly + 10], fill=color + (200,))
            draw.text((lx + 18, ly - 1), s["label"], fill=(0, 0, 0), font=font)
    return np.asarray(img.convert("RGB"))


def save_envelope_plot(path: str | Path, fig: Dict[str, Dict[str, Any]]) -> Optional[Path]:
    """Write the Fig. 2 PNG from :func:`qdrift.bench.runner.calibration_envelopes` results (one panel per model
    and channel). Returns None (and writes nothing) without Pillow."""
    if not have_pillow() or not fig:
        return None
    panels = []
    for kind, f in fig.items():
        envs = f["envelopes"]
        if not envs:
            continue
        channels = len(next(iter(envs.values()))["min"][0])
        for ch in range(channels):
            series = []
            for K, e in sorted(envs.items(), key=lambda kv: int(kv[0])):
                col = lambda t: [row[ch] for row in t]  # noqa: E731
                n_sub = e["subsets"]
                series.append(dict(label=f"K={K}: {n_sub} subset{'s' if n_sub != 1 else ''}", lo=col(e["min"]),
                                   hi=col(e["max"]), mean=col(e["mean"])))
            title = f"{kind} {f['scheme']} {f['sampler']} {f['steps']} steps, channel {ch}: c_i min-max over subsets"
            panels.append(dict(title=title, series=series))
    if not panels:
        return None
    arr = envelope_plot(panels)
    return save_png(path, np.ascontiguousarray(np.transpose(arr, (2, 0, 1))))
