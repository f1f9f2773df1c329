"""Fake-quantized replacements for ``nn.Linear`` and ``nn.Conv2d``.

Both layers keep everything they need as buffers (so ``state_dict`` round-trips through safetensors) and run in
floating point: quantization is simulated by snapping weights and activations to their integer grids.

Activations are quantized along the channel axis: the last dim for ``Linear`` inputs ``[..., C]``, dim 1 for
``Conv2d`` inputs ``[B, C, H, W]`` (one "token" per pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import quantize_asymmetric, quantize_symmetric_groups, quantize_unsigned_groups

__all__ = ["LayerOp", "SVDQuantLayer", "MixDQLayer"]


class LayerOp:
    """The linear map of a ``Linear`` or ``Conv2d`` layer, detached from its parameters.

    Args:
        layer: an ``nn.Linear`` or an ``nn.Conv2d`` with ``groups == 1``.
    """

    def __init__(self, layer: nn.Module) -> None:
        if isinstance(layer, nn.Linear):
            self.kind = "linear"
            self.conv_kwargs: dict = {}
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError("only Conv2d with groups=1, zero padding and numeric padding can be quantized")
            self.kind = "conv2d"
            self.conv_kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        else:
            raise ValueError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")

    @property
    def channel_dim(self) -> int:
        """Channel axis of the layer's input: -1 (Linear) or 1 (Conv2d)."""
        return -1 if self.kind == "linear" else 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, **self.conv_kwargs)

    def lowrank(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Apply ``up @ down`` (a rank-r factorization of the weight) to ``x``.

        Shapes: linear ``down [r, in]``, ``up [out, r]``; conv ``down [r, in, kh, kw]``, ``up [out, r]``.
        """
        if self.kind == "linear":
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, None, **self.conv_kwargs), up[:, :, None, None])


def channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Move the channel axis of an activation to the last position (no-op for Linear inputs)."""
    return x if channel_dim == -1 else x.movedim(channel_dim, -1)


def channels_back(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Inverse of :func:`channels_last`."""
    return x if channel_dim == -1 else x.movedim(-1, channel_dim)


def weight_columns(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as ``[out, kh*kw, in]`` rows of input channels (``[out, 1, in]`` for Linear)."""
    if weight.ndim == 2:
        return weight[:, None, :]
    o, i, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(o, kh * kw, i)


def weight_from_columns(cols: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`weight_columns`."""
    if len(shape) == 2:
        return cols[:, 0, :]
    o, i, kh, kw = shape
    return cols.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


def svdquant_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """SVDQuant weight fake quantization: symmetric, per output row, groups of ``group_size`` input channels.

    For a conv weight ``[out, in, kh, kw]`` each kernel position is a row of ``in`` channels, grouped the same way.
    """
    cols = weight_columns(weight)
    return weight_from_columns(quantize_symmetric_groups(cols, bits, group_size), weight.shape)


class SVDQuantLayer(nn.Module):
    """SVDQuant-style W4A4/W3A4 layer (REFERENCE.md section 3).

    ``y = op(Q_a(x / lambda), Q_w(R)) + op(x / lambda, L) + b`` with ``R = W diag(lambda) - L`` and
    ``L = up @ down`` a float rank-r branch that sees the smoothed, unquantized input.

    Buffers:
        smooth: ``[in]`` per-input-channel divisor lambda.
        weight_q: fake-quantized residual ``Q_w(R)``, shape of the original weight.
        lr_down: ``[r, in]`` or ``[r, in, kh, kw]``; lr_up: ``[out, r]`` (r may be 0).
        shift: ``[in]`` non-negative shift of the smoothed input for unsigned quantization (all zero = signed).
        bias: ``[out]`` or absent.

    Args:
        layer: the float ``Linear``/``Conv2d`` (read, never modified).
        smooth, weight_q, lr_down, lr_up, shift: as above.
        act_bits: activation bits (4).
        act_group: channels per activation group.
        unsigned: quantize activations as unsigned after ``+ shift`` (inputs after SiLU/GELU).
    """

    def __init__(self, layer: nn.Module, smooth: torch.Tensor, weight_q: torch.Tensor, lr_down: torch.Tensor,
                 lr_up: torch.Tensor, shift: torch.Tensor, act_bits: int, act_group: int, unsigned: bool) -> None:
        super().__init__()
        self.op = LayerOp(layer)
        self.act_bits = int(act_bits)
        self.act_group = int(act_group)
        self.unsigned = bool(unsigned)
        self.register_buffer("smooth", smooth.detach().clone())
        self.register_buffer("weight_q", weight_q.detach().clone())
        self.register_buffer("lr_down", lr_down.detach().clone())
        self.register_buffer("lr_up", lr_up.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    @property
    def rank(self) -> int:
        """Rank of the float low-rank branch."""
        return int(self.lr_down.shape[0])

    def quantize_input(self, xs: torch.Tensor) -> torch.Tensor:
        """Dynamic per-token group quantization of the smoothed input ``xs`` (channel axis as the layer's)."""
        cd = self.op.channel_dim
        t = channels_last(xs, cd)
        if self.unsigned:
            q = quantize_unsigned_groups(t, self.act_bits, self.act_group, self.shift)
        else:
            q = quantize_symmetric_groups(t, self.act_bits, self.act_group)
        return channels_back(q, cd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.op.channel_dim] = -1
        xs = x / self.smooth.view(shape)
        y = self.op(self.quantize_input(xs), self.weight_q, self.bias)
        if self.rank > 0:
            y = y + self.op.lowrank(xs, self.lr_down, self.lr_up)
        return y

    def extra_repr(self) -> str:
        return (f"{self.op.kind}, w={tuple(self.weight_q.shape)}, rank={self.rank}, a{self.act_bits}"
                f"{'u' if self.unsigned else 's'}/g{self.act_group}")


class MixDQLayer(nn.Module):
    """MixDQ-style layer: per-output-channel symmetric weights, static per-tensor asymmetric activations.

    ``y = op(Q_a(x; lo, hi), Q_w(W)) + b``; when ``act_range`` is None the input stays in float.

    Args:
        layer: the float ``Linear``/``Conv2d`` (read, never modified).
        weight_q: fake-quantized weight (same shape).
        weight_bits: bits of ``weight_q`` (recorded for reports).
        act_bits: activation bits (8).
        act_range: ``(lo, hi)`` static range, or None to keep activations in float.
    """

    def __init__(self, layer: nn.Module, weight_q: torch.Tensor, weight_bits: int, act_bits: int,
                 act_range: tuple[float, float] | None) -> None:
        super().__init__()
        self.op = LayerOp(layer)
        self.weight_bits = int(weight_bits)
        self.act_bits = int(act_bits)
        self.register_buffer("weight_q", weight_q.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        rng = torch.tensor([float("nan"), float("nan")] if act_range is None else list(act_range), dtype=torch.float64)
        self.register_buffer("act_range", rng)

    @property
    def act_float(self) -> bool:
        """True when this layer's input is kept in floating point."""
        return bool(torch.isnan(self.act_range).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_float:
            x = quantize_asymmetric(x, self.act_bits, self.act_range[0].item(), self.act_range[1].item())
        return self.op(x, self.weight_q, self.bias)

    def extra_repr(self) -> str:
        act = "float" if self.act_float else f"a{self.act_bits}"
        return f"{self.op.kind}, w={tuple(self.weight_q.shape)}, w{self.weight_bits}, {act}"
