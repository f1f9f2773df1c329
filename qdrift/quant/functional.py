"""Fake-quantization primitives (quantize then dequantize, in floating point).

Every function returns a tensor of the input's shape and dtype whose values lie on the quantization grid
described in its docstring. Rounding is round-half-to-even (``torch.round``), as in integer kernels. Activation
quantizers round through :func:`round_ste`: the same values, with a straight-through gradient (identity inside the
clamp range), so that block reconstruction (:mod:`qdrift.quant.reconstruct`) can backpropagate through them.
"""

from __future__ import annotations

import torch

__all__ = [
    "signed_qmax",
    "quantize_symmetric",
    "quantize_symmetric_groups",
    "quantize_unsigned_groups",
    "quantize_asymmetric",
    "ema_range",
    "round_ste",
]

_EPS = 1e-12


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` (bitwise the same values) with a straight-through gradient ``d round(x) / dx = 1``.

    Twice differentiable (its backward is the identity), as the GAC meta-gradient needs.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)
    return _RoundSTE.apply(x)


def signed_qmax(bits: int) -> int:
    """Largest level of a symmetric signed integer grid: ``2**(bits-1) - 1``.

    int8 -> 127, int4 -> 7, int3 -> 3, int2 -> 1 (ternary {-1, 0, 1}).

    Raises:
        ValueError: if ``bits`` is not an integer in [2, 16].
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_group(group: int, name: str = "group_size") -> None:
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"{name} must be a positive integer, got {group!r}")


def _grouped(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """View the last dim of ``x`` as ``[..., n_groups, group]``, zero-padding a partial last group."""
    n = x.shape[-1]
    pad = (-n) % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group), n


def quantize_symmetric(x: torch.Tensor, bits: int, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization with one scale per slice.

    ``scale = max|x| / qmax`` over the reduced dims (``qmax = 2**(bits-1) - 1``), ``q = clamp(round(x / scale),
    -qmax, qmax)``, returns ``q * scale``. An all-zero slice stays zero.

    Args:
        x: any shape.
        bits: weight bits (2..16).
        dim: dims reduced to find ``max|x|`` (one scale per remaining index); ``None`` = one scale per tensor.
            For a weight ``[out, in, ...]`` per output channel use ``dim=tuple(range(1, x.ndim))``.

    Returns:
        Tensor of ``x.shape``.
    """
    qmax = signed_qmax(bits)
    if dim is None:
        amax = x.abs().amax()
    else:
        amax = x.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp_min(_EPS) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def quantize_symmetric_groups(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric fake quantization in groups of ``group_size`` consecutive entries of the last dim.

    Used for SVDQuant weights (rows of ``[out, in]``, groups of input channels) and for signed per-token
    activations (``[tokens, channels]``). Each group gets ``scale = max|x_g| / qmax``. A last group shorter than
    ``group_size`` is its own group.

    Args:
        x: ``[..., n]``.
        bits: 2..16 (``qmax = 2**(bits-1) - 1``: int4 -> 7, int3 -> 3).
        group_size: entries per group along the last dim.

    Returns:
        Tensor of ``x.shape``.
    """
    _check_group(group_size)
    qmax = signed_qmax(bits)
    g, n = _grouped(x, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / qmax
    q = torch.clamp(round_ste(g / scale), -qmax, qmax) * scale
    return q.reshape(*x.shape[:-1], -1)[..., :n]


def quantize_unsigned_groups(x: torch.Tensor, bits: int, group_size: int, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Unsigned fake quantization of ``x + shift`` in groups of the last dim, shifted back afterwards.

    SVDQuant quantizes inputs that follow SiLU/GELU as unsigned integers after shifting them to be non-negative:
    ``u = clamp(x + shift, min=0)``, ``scale = max(u_g) / (2**bits - 1)``, ``q = round(u / scale)``, returns
    ``q * scale - shift``. Values below ``-shift`` are clipped to ``-shift``.

    Args:
        x: ``[..., n]``.
        bits: 2..16 (uint4 -> levels 0..15).
        group_size: entries per group along the last dim.
        shift: scalar or ``[n]`` (broadcast over the last dim), >= 0.

    Returns:
        Tensor of ``x.shape``.
    """
    _check_group(group_size)
    signed_qmax(bits)  # validates bits
    levels = 2**bits - 1
    u = torch.clamp(x + shift, min=0.0)
    g, n = _grouped(u, group_size)
    scale = g.amax(dim=-1, keepdim=True).clamp_min(_EPS) / levels
    q = torch.clamp(round_ste(g / scale), 0, levels) * scale
    return q.reshape(*x.shape[:-1], -1)[..., :n] - shift


def quantize_asymmetric(x: torch.Tensor, bits: int, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
    """Asymmetric (affine) fake quantization with a fixed range ``[lo, hi]`` (static activations, MixDQ).

    The range is first widened to include 0 (so that zero is exact), then ``scale = (hi - lo) / (2**bits - 1)``,
    ``zero_point = round(-lo / scale)``, ``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``, returns
    ``(q - zero_point) * scale``.

    Args:
        x: any shape.
        bits: 2..16.
        lo, hi: range (scalars or 0-d tensors), ``lo <= hi``.

    Returns:
        Tensor of ``x.shape``.
    """
    signed_qmax(bits)
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device).clamp(max=0.0)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device).clamp(min=0.0)
    if bool(hi_t < lo_t):
        raise ValueError(f"need lo <= hi, got lo={float(lo_t)}, hi={float(hi_t)}")
    levels = 2**bits - 1
    scale = (hi_t - lo_t).clamp_min(_EPS) / levels
    zero_point = torch.round(-lo_t / scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def ema_range(batches_min: list[float], batches_max: list[float], momentum: float = 0.95) -> tuple[float, float]:
    """Exponential moving average of per-batch min/max (MixDQ static activation ranges).

    ``r_1 = b_1``, ``r_k = momentum * r_{k-1} + (1 - momentum) * b_k``.

    Args:
        batches_min, batches_max: per-batch minima and maxima, in order (same non-zero length).
        momentum: EMA momentum in [0, 1).

    Returns:
        ``(lo, hi)``.
    """
    if len(batches_min) != len(batches_max) or not batches_min:
        raise ValueError("need the same non-zero number of batch minima and maxima")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    lo, hi = float(batches_min[0]), float(batches_max[0])
    for a, b in zip(batches_min[1:], batches_max[1:]):
        lo = momentum * lo + (1 - momentum) * float(a)
        hi = momentum * hi + (1 - momentum) * float(b)
    return lo, hi
