"""Simulated post-training quantization: ``quantize(model, scheme, calib_data, **options)``.

Schemes (REFERENCE.md section 3):

- ``"w4a4"`` / ``"w3a4"`` (SVDQuant-like): int4 / int3 symmetric weights per output row in groups of 64 input
  channels; dynamic per-token int4 activations in groups of 64 channels (inputs after SiLU/GELU shifted and
  quantized unsigned); per-input-channel smoothing ``lambda_j = max|X_j|^a / max|W_j|^(1-a)`` with ``a`` chosen by
  grid search on the layer's output error; a float low-rank branch ``L = SVD_r(W - Q(W - L))`` on the smoothed,
  unquantized input; embeddings, time/label projections, adaLN modulations, shortcuts, norms, in/out projections
  and up/down samplers stay in float.
- ``"w4a8"`` (MixDQ-like): symmetric per-output-channel weights with 2/4/8 bits per layer, chosen from a
  per-layer sensitivity analysis so that the parameter-weighted mean is at most 4 bits; static per-tensor
  asymmetric 8-bit activations from EMA (0.95) min/max ranges; the most sensitive 1% of activation layers
  (at least one) stay in float; the conditioning path (embeddings, time/label projections, adaLN, norms) in float.

Adaptations forced by tiny models (all overridable through options):

- Group size 64 is kept; a layer with fewer than 64 input channels gets one group per token (per-token scaling).
- Rank 32 on 3072-wide FLUX layers is ~1% of the width; 32 on SDXL's 320-1280 is 2.5-10%. Here the rank is
  ``ceil(rank_fraction * min(out, fan_in))`` with ``rank_fraction = 1/16`` (about SDXL's ratio), or ``rank=`` fixed.
- "1% of the activation layers" rounds up to one layer in a model with fewer than 100 quantized layers.
- Conv layers are quantized as their im2col matrix: activation tokens are pixels, weight groups run over input
  channels at each kernel position, the low-rank branch is a rank-r conv followed by a 1x1 conv.
- Unsigned inputs are detected from calibration data: a layer whose inputs never go below SiLU's minimum
  (-0.2785) is treated as post-activation, shifted by that bound (GELU's -0.17 when the data stays above it,
  0 for non-negative inputs).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ._checks import as_int, as_real, as_sequence, check_finite, check_layer_params, patterns
from .formats import FORMAT_SCHEMES, RECON_FORMATS, _quantize_format
from .functional import ema_range, quantize_symmetric
from .reconstruct import RECONSTRUCTIONS, CalibSamples, ReconConfig, reconstruct
from .layers import (LayerOp, MixDQLayer, SVDQuantLayer, channels_last, svdquant_weight, weight_columns,
                     weight_from_columns)

__all__ = ["quantize", "SCHEMES", "SIMULATED_SCHEMES", "SVDQUANT_SKIP", "MIXDQ_SKIP", "quantizable_layers",
           "svdquant_layer", "mixdq_allocate_bits", "layer_error_report"]

SIMULATED_SCHEMES = ("w4a8", "w4a4", "w3a4")
SCHEMES = SIMULATED_SCHEMES + FORMAT_SCHEMES  # every scheme quantize() accepts

# Regexes matched (re.search, case-insensitive) against one component of a module's dotted name.
MIXDQ_SKIP = (r"emb", r"^time", r"^label", r"norm", r"^ada", r"^t_", r"^y_")
SVDQUANT_SKIP = MIXDQ_SKIP + (r"shortcut", r"^skip", r"^conv_in$", r"^conv_out$", r"^proj_in$", r"^proj_out$",
                              r"^patch", r"^final", r"upsample", r"downsample", r"^head$")

SILU_MIN = 0.2784645427610738  # -min_x x * sigmoid(x)
GELU_MIN = 0.16997120761871338  # -min_x x * Phi(x)


# ----------------------------------------------------------------------------------------------------------------
# calibration data plumbing


def _run_calib(model: nn.Module, calib_data: Any) -> int:
    """Feed ``calib_data`` through ``model``; returns the number of forward calls made at the top level."""
    calls = 0
    if callable(calib_data) and not isinstance(calib_data, (torch.Tensor, nn.Module)):
        calib_data(model)
        return -1
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    if not isinstance(calib_data, Iterable):
        raise ValueError("quantize: calib_data must be a callable(model), a Tensor, or an iterable of Tensors / arg "
                         f"tuples / kwarg dicts; got {type(calib_data).__name__}")
    for item in calib_data:
        if isinstance(item, torch.Tensor):
            model(item)
        elif isinstance(item, dict):
            model(**item)
        elif isinstance(item, (tuple, list)):
            if len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], dict):
                model(*item[0], **item[1])
            else:
                model(*item)
        else:
            raise ValueError("quantize: calib_data items must be Tensors, tuples of args or dicts of kwargs, got "
                             f"{type(item).__name__}")
        calls += 1
    if calls == 0:
        raise ValueError("quantize: calib_data is empty")
    return calls


class _RowReservoir:
    """Deterministic, roughly uniform subsample of rows (tokens or images) seen over many batches."""

    def __init__(self, budget: int) -> None:
        self.budget = max(1, int(budget))  # elements
        self.stride = 1
        self.rows: list[torch.Tensor] = []
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        start = (-self.seen) % self.stride
        self.seen += n
        kept = rows[start::self.stride]
        if kept.shape[0]:
            self.rows.append(kept.detach().to(torch.float32).clone())
        while sum(r.numel() for r in self.rows) > self.budget and sum(r.shape[0] for r in self.rows) > 1:
            allrows = torch.cat(self.rows)
            self.rows = [allrows[::2].clone()]
            self.stride *= 2

    def get(self) -> torch.Tensor:
        return torch.cat(self.rows)


class _LayerStats:
    """Running per-layer input statistics collected by a forward pre-hook."""

    def __init__(self, op: LayerOp, budget: int, name: str = "") -> None:
        self.op = op
        self.name = name
        self.nonfinite: str | None = None  # the refusal, kept in case a calibration callable swallows it
        self.absmax: torch.Tensor | None = None  # [in]
        self.min = math.inf
        self.batch_min: list[float] = []
        self.batch_max: list[float] = []
        self.reservoir = _RowReservoir(budget)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        lo, hi = float(x.min()), float(x.max())  # min/max propagate NaN: both finite <=> every value finite
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.nonfinite = self.nonfinite or (
                f"quantize: the calibration input of layer {self.name!r} is not finite (NaN or inf; min {lo}, max "
                f"{hi}) in its call {len(self.batch_min) + 1}; calib_data must be finite, and so must what the layers "
                f"before {self.name!r} make of it")
            raise ValueError(self.nonfinite)
        t = channels_last(x, self.op.channel_dim)
        am = t.abs().reshape(-1, t.shape[-1]).amax(0).to(torch.float64)
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        self.min = min(self.min, lo)
        self.batch_min.append(lo)
        self.batch_max.append(hi)
        rows = x.reshape(-1, x.shape[-1]) if self.op.kind == "linear" else x
        self.reservoir.add(rows)


class _CallRecorder:
    """Records top-level model calls (args, kwargs), thinned deterministically to at most ``max_calls``."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max(1, int(max_calls))
        self.calls: list[tuple[tuple, dict]] = []
        self.stride = 1
        self.seen = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.seen % self.stride == 0:
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
            if len(self.calls) > self.max_calls:
                self.calls = self.calls[::2]
                self.stride *= 2
        self.seen += 1


def quantizable_layers(model: nn.Module, skip: Sequence[str]) -> dict[str, nn.Module]:
    """Names and modules of the ``Linear``/``Conv2d`` (groups=1) layers not matched by any ``skip`` pattern.

    Args:
        model: the network.
        skip: regexes matched (case-insensitive ``re.search``) against each component of the dotted name (one
            string or a sequence of strings).

    Returns:
        ``{name: module}`` in ``named_modules`` order.

    Raises:
        ValueError: ``skip`` is not a string or a sequence of valid regular expressions.
    """
    pats = [re.compile(p, re.IGNORECASE) for p in patterns("quantizable_layers", "skip", skip)]
    return {name: mod for name, mod in _eligible_layers(model).items()
            if not any(p.search(part) for part in name.split(".") for p in pats)}


def _eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``Linear`` and ``Conv2d`` (groups=1, zero numeric padding) layers, before any skip list."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            continue
        out[name] = mod
    return out


def _no_layer_message(model: nn.Module, skip: Any) -> str:
    """Why ``quantizable_layers`` found nothing: no Linear/Conv2d at all, only unsupported convs, or the skip list."""
    def listing(names: list[str]) -> str:
        return ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    eligible = _eligible_layers(model)
    if eligible:
        return (f"quantize: no quantizable Linear/Conv2d layer left after the skip list: skip={skip!r} matches all "
                f"{len(eligible)} of the model's Linear/Conv2d layers ({listing(list(eligible))})")
    linconv = [n or "<model>" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if linconv:
        return ("quantize: no quantizable Linear/Conv2d layer: the model's Conv2d layers "
                f"({listing(linconv)}) are all grouped or not zero-padded, which the simulated schemes do not quantize")
    kinds: dict[str, int] = {}
    for m in model.modules():
        if not any(True for _ in m.children()):  # leaf modules (the model itself when it has no children)
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    has = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return (f"quantize: no quantizable layer: the model has no nn.Linear or nn.Conv2d layer at all (it has {has}); "
            "the simulated schemes quantize only Linear and Conv2d layers")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _collect(model: nn.Module, layers: dict[str, nn.Module], calib_data: Any, budget: int,
             max_calls: int = 0) -> tuple[dict[str, _LayerStats], _CallRecorder | None]:
    stats = {name: _LayerStats(LayerOp(mod), budget, name) for name, mod in layers.items()}
    handles = [mod.register_forward_pre_hook(stats[name]) for name, mod in layers.items()]
    recorder = None
    if max_calls:
        recorder = _CallRecorder(max_calls)
        handles.append(model.register_forward_pre_hook(recorder, with_kwargs=True))
    try:
        with torch.no_grad():
            _run_calib(model, calib_data)
    finally:
        for h in handles:
            h.remove()
    for name, s in stats.items():
        if s.nonfinite:
            raise ValueError(s.nonfinite)
        if s.absmax is None:
            raise ValueError(f"quantize: calib_data never reached layer {name!r}")
    return stats, recorder


# ----------------------------------------------------------------------------------------------------------------
# SVDQuant


def _svdquant_args(fn: str, weight_bits: Any, act_bits: Any, group_size: Any, lowrank_iters: Any,
                   alphas: Any) -> tuple[int, int, int, int, tuple]:
    """Checked ``weight_bits, act_bits, group_size, lowrank_iters, alphas`` of the SVDQuant schemes."""
    weight_bits = as_int(fn, "weight_bits", weight_bits, 2, 16)
    act_bits = as_int(fn, "act_bits", act_bits, 2, 16)
    group_size = as_int(fn, "group_size", group_size, 1)
    lowrank_iters = as_int(fn, "lowrank_iters", lowrank_iters, 1,
                           what="an integer >= 1 (alternations of L = SVD_r(W - Q(W - L)); 1 = plain SVD of W)")
    what = "a sequence of smoothing exponents, each a finite number in [0, 1] (() tries no smoothing only)"
    checked = []
    for a in as_sequence(fn, "alphas", alphas, what):
        try:
            checked.append(as_real(fn, "alphas", a, 0, 1))
        except ValueError:
            raise ValueError(f"{fn}: alphas must be {what}; got {alphas!r} ({a!r} is not)") from None
    if not (isinstance(alphas, (list, tuple)) and all(type(a) in (int, float) for a in alphas)):
        alphas = tuple(checked)  # numpy / torch scalars as floats; a valid list or tuple is kept as given
    return weight_bits, act_bits, group_size, lowrank_iters, alphas


def _lowrank(w_cols: torch.Tensor, shape: torch.Size, rank: int, bits: int, group: int,
             iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weight_q, down, up) for a smoothed weight given as columns ``[out, k, in]``."""
    w = weight_from_columns(w_cols, shape).to(torch.float64)
    mat = w.reshape(w.shape[0], -1)
    if rank == 0:
        return svdquant_weight(w, bits, group), mat.new_zeros(0, *w.shape[1:]), mat.new_zeros(w.shape[0], 0)
    target = mat
    for _ in range(max(1, iters)):
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        lr = (u[:, :rank] * s[:rank]) @ vh[:rank]
        resid_q = svdquant_weight((mat - lr).reshape(w.shape), bits, group).reshape(mat.shape)
        target = mat - resid_q  # L = SVD_r(W - Q(W - L))
    root = s[:rank].sqrt()
    down = (root[:, None] * vh[:rank]).reshape(rank, *w.shape[1:])
    up = u[:, :rank] * root
    resid_q = svdquant_weight((mat - up @ down.reshape(rank, -1)).reshape(w.shape), bits, group)
    return resid_q, down, up


def svdquant_layer(layer: nn.Module, x: torch.Tensor, *, weight_bits: int = 4, act_bits: int = 4,
                   group_size: int = 64, rank: int = 0, lowrank_iters: int = 1,
                   alphas: Sequence[float] = tuple(i / 10 for i in range(11)),
                   absmax: torch.Tensor | None = None, unsigned: bool | None = None,
                   shift: float | None = None, input_min: float | None = None) -> tuple[SVDQuantLayer, dict]:
    """Quantize one layer SVDQuant-style, choosing the smoothing exponent by grid search on ``x``.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv2d`` (not modified).
        x: calibration inputs of the layer: ``[N, in]`` tokens (Linear) or ``[N, in, H, W]`` (Conv2d).
        weight_bits: 4 (W4A4) or 3 (W3A4).
        act_bits: activation bits.
        group_size: channels per weight/activation group (clipped to the input width).
        rank: rank of the float low-rank branch (0 disables it).
        lowrank_iters: alternations of ``L = SVD_r(W - Q(W - L))`` (1 = plain SVD of W).
        alphas: smoothing exponents tried; ``lambda_j = max|X_j|^a / max|W_j|^(1-a)``; 0 also tries no smoothing.
        absmax: ``[in]`` per-channel max|X| over all calibration data (default: from ``x``).
        unsigned: treat inputs as post-SiLU/GELU (default: detected from ``x``).
        shift: the unsigned shift before smoothing (default: detected from ``x``).
        input_min: minimum input over all calibration data, used for the detection (default: ``x.min()``).

    Returns:
        ``(quantized layer, info)`` with info keys ``alpha, rank, unsigned, shift, err, err_norank, err_rtn,
        signal`` (mean squared errors of the output on ``x``: chosen config, same without the low-rank branch,
        plain round-to-nearest without smoothing or low rank; ``signal`` is the mean square of the FP output).

    Raises:
        ValueError: a bad argument (named), or a non-finite weight, bias or ``x``.
    """
    fn = "svdquant_layer"
    op = LayerOp(layer)
    weight_bits, act_bits, group_size, lowrank_iters, alphas = _svdquant_args(
        fn, weight_bits, act_bits, group_size, lowrank_iters, alphas)
    w = layer.weight.detach().to(torch.float64)
    n_in = w.shape[1]
    group = min(group_size, n_in)
    max_rank = min(w.shape[0], w[0].numel())
    rank = as_int(fn, "rank", rank, 0, max_rank,
                  f"an integer in [0, {max_rank}] for a layer of weight shape {tuple(w.shape)}")
    check_layer_params(fn, type(layer).__name__, layer)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a Tensor of the layer's calibration inputs, got {type(x).__name__}")
    check_finite(fn, "the calibration input x", x.detach(), "calibration inputs must be finite")
    x = x.detach().to(torch.float32)  # the grid search runs in float32 (weights and SVD in float64)
    ximin = float(x.min()) if input_min is None else float(input_min)
    if unsigned is None:
        unsigned = ximin >= -SILU_MIN - 1e-4
    if shift is None:
        shift = 0.0 if ximin >= 0 else (GELU_MIN if ximin >= -GELU_MIN - 1e-4 else SILU_MIN)
    shift = float(shift) if unsigned else 0.0
    if absmax is None:
        absmax = channels_last(x, op.channel_dim).abs().reshape(-1, n_in).amax(0)
    absmax = absmax.to(torch.float64).clamp_min(1e-5)
    w_cols = weight_columns(w)
    wmax = w_cols.abs().amax(dim=(0, 1)).clamp_min(1e-5)
    bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
    with torch.no_grad():
        y_fp = op(x.double(), w, bias).float()
    signal = float(y_fp.double().pow(2).mean())

    def build(lam: torch.Tensor, r: int) -> SVDQuantLayer:
        wq, down, up = _lowrank(w_cols * lam, w.shape, r, weight_bits, group, lowrank_iters)
        return SVDQuantLayer(layer, lam, wq, down, up, torch.full_like(lam, shift) / lam, act_bits, group, unsigned)

    def err(q: SVDQuantLayer) -> float:
        with torch.no_grad():
            return float((q.float()(x) - y_fp).double().pow(2).mean())

    ones = torch.ones_like(absmax)
    candidates = [(None, ones)] + [(a, (absmax**a / wmax ** (1 - a)).clamp(1e-4, 1e4)) for a in alphas]
    best = None
    for a, lam in candidates:
        e = err(build(lam, rank))
        if best is None or e < best[0]:
            best = (e, a, lam)
    e, a, lam = best
    q = build(lam, rank).to(layer.weight.dtype)
    info = dict(alpha=a, rank=rank, unsigned=unsigned, shift=shift, err=e,
                err_norank=err(build(lam, 0)) if rank else e, err_rtn=err(build(ones, 0)), signal=signal)
    return q, info


# ----------------------------------------------------------------------------------------------------------------
# MixDQ


def mixdq_allocate_bits(sens: dict[str, dict[int, float]], sizes: dict[str, int], avg_bits: float) -> dict[str, int]:
    """Choose per-layer bits minimizing total sensitivity under a parameter-weighted mean-bits budget.

    Lagrangian relaxation (each layer picks ``argmin_b sens[b] + lam * size * b``; the smallest ``lam`` within
    budget is found by bisection), then a greedy pass spends any leftover budget on the best error reduction per
    extra bit. Deterministic.

    Args:
        sens: ``{layer: {bits: error}}`` (same bit choices for every layer).
        sizes: ``{layer: parameter count}``.
        avg_bits: budget on ``sum(size * bits) / sum(size)``.

    Returns:
        ``{layer: bits}``.
    """
    avg_bits = as_real("mixdq_allocate_bits", "avg_bits", avg_bits, what="a finite number (mean bits per parameter)")
    names = list(sens)
    if not names:
        return {}
    choices = sorted(next(iter(sens.values())))
    total = sum(sizes[n] for n in names)
    budget = avg_bits * total
    if min(choices) * total > budget + 1e-9:
        raise ValueError(f"avg_bits={avg_bits} is below the smallest bit choice {min(choices)}")

    def pick(lam: float) -> dict[str, int]:
        return {n: min(choices, key=lambda b: (sens[n][b] + lam * sizes[n] * b, -b)) for n in names}

    def cost(alloc: dict[str, int]) -> float:
        return sum(sizes[n] * alloc[n] for n in names)

    alloc = pick(0.0)
    if cost(alloc) > budget:
        lo, hi = 0.0, 1.0
        while cost(pick(hi)) > budget:
            hi *= 10.0
            if hi > 1e30:
                break
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if cost(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        alloc = pick(hi)
        if cost(alloc) > budget:  # degenerate sensitivities: fall back to the smallest choice
            alloc = {n: min(choices) for n in names}
    while True:  # greedy fill of leftover budget
        best = None
        for n in names:
            for b in choices:
                extra = sizes[n] * (b - alloc[n])
                if b <= alloc[n] or cost(alloc) + extra > budget + 1e-9:
                    continue
                gain = (sens[n][alloc[n]] - sens[n][b]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, b)
        if best is None:
            break
        alloc[best[1]] = best[2]
    return alloc


def _slice_rows(call: tuple[tuple, dict], rows: int) -> tuple[tuple, dict]:
    """Keep ``rows`` evenly spaced batch rows of a recorded call (all tensors sharing the batch size)."""
    args, kwargs = call
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim), None)
    if first is None or rows <= 0 or first.shape[0] <= rows:
        return call
    b = first.shape[0]
    idx = torch.linspace(0, b - 1, rows).round().long()
    cut = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _replay_error(model: nn.Module, calls: list[tuple[tuple, dict]], ref: list[torch.Tensor]) -> float:
    err = 0.0
    with torch.no_grad():
        for (args, kwargs), y in zip(calls, ref):
            out = model(*args, **kwargs)
            err += float((out - y).double().pow(2).mean() / y.double().pow(2).mean().clamp_min(1e-12))
    return err / len(calls)


def _quantize_mixdq(model: nn.Module, layers: dict[str, nn.Module], stats: dict[str, _LayerStats],
                    recorder: _CallRecorder, opts: dict) -> tuple[nn.Module, dict]:
    bits_choices = tuple(opts["weight_bits_choices"])
    act_bits = opts["act_bits"]
    calls = recorder.calls
    with torch.no_grad():
        ref = [model(*a, **k) for a, k in calls]
    if not all(isinstance(r, torch.Tensor) for r in ref):
        raise ValueError("quantize: w4a8 sensitivity analysis needs a model whose forward returns a Tensor")
    if not all(bool(torch.isfinite(r).all()) for r in ref):
        raise ValueError("quantize: the full-precision model's output on the recorded calibration calls is not "
                         "finite (NaN or inf); w4a8's sensitivity analysis needs finite outputs (check the model's "
                         "parameters, also those of layers kept in float, and calib_data)")
    ranges = {n: ema_range(s.batch_min, s.batch_max, opts["ema_momentum"]) for n, s in stats.items()}
    wq = {n: {b: quantize_symmetric(m.weight.detach(), b, dim=tuple(range(1, m.weight.ndim))) for b in bits_choices}
          for n, m in layers.items()}

    work = copy.deepcopy(model)
    wsens: dict[str, dict[int, float]] = {}
    asens: dict[str, float] = {}
    for name in layers:
        orig = work.get_submodule(name)
        for b in bits_choices:  # weight sensitivity: only this layer's weight at b bits
            _set_module(work, name, MixDQLayer(orig, wq[name][b], b, act_bits, None))
            wsens.setdefault(name, {})[b] = _replay_error(work, calls, ref)
        _set_module(work, name, MixDQLayer(orig, orig.weight, 32, act_bits, ranges[name]))
        asens[name] = _replay_error(work, calls, ref)  # activation sensitivity: only this input at 8 bits
        _set_module(work, name, orig)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    alloc = mixdq_allocate_bits(wsens, sizes, opts["avg_weight_bits"])
    n_float = math.ceil(opts["float_act_fraction"] * len(layers)) if opts["float_act_fraction"] > 0 else 0
    float_acts = sorted(asens, key=lambda n: -asens[n])[:n_float]

    qmodel = copy.deepcopy(model)
    report = {}
    for name, mod in layers.items():
        rng = None if name in float_acts else ranges[name]
        _set_module(qmodel, name, MixDQLayer(mod, wq[name][alloc[name]], alloc[name], act_bits, rng))
        report[name] = dict(weight_bits=alloc[name], act_float=name in float_acts, act_range=ranges[name],
                            weight_sensitivity=wsens[name], act_sensitivity=asens[name], params=sizes[name])
    mean_bits = sum(sizes[n] * alloc[n] for n in layers) / max(1, sum(sizes.values()))
    return qmodel, dict(layers=report, mean_weight_bits=mean_bits, float_act_layers=float_acts)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _check_options(scheme: str, opts: dict) -> dict:
    """``opts`` (defaults merged with the user's options) checked up front; numpy / torch scalars converted."""
    fn = "quantize"
    opts["skip"] = patterns(fn, "skip", opts["skip"])
    if scheme == "w4a8":
        what = "a non-empty sequence of weight bit widths, each an integer in [2, 16], e.g. (2, 4, 8)"
        choices = opts["weight_bits_choices"]
        items = as_sequence(fn, "weight_bits_choices", choices, what)
        if not items:
            raise ValueError(f"{fn}: weight_bits_choices must be {what}, got {choices!r}")
        checked = []
        for b in items:
            try:
                checked.append(as_int(fn, "weight_bits_choices", b, 2, 16))
            except ValueError:
                raise ValueError(f"{fn}: weight_bits_choices must be {what}; got {choices!r} ({b!r} is not)") from None
        if not (isinstance(choices, (list, tuple)) and all(type(b) is int for b in choices)):
            opts["weight_bits_choices"] = tuple(checked)
        opts["act_bits"] = as_int(fn, "act_bits", opts["act_bits"], 2, 16)
        opts["avg_weight_bits"] = as_real(
            fn, "avg_weight_bits", opts["avg_weight_bits"], min(checked),
            what=f"a finite number >= the smallest of weight_bits_choices ({min(checked)}): the budget on the "
                 "parameter-weighted mean weight bits")
        opts["ema_momentum"] = as_real(fn, "ema_momentum", opts["ema_momentum"], 0, 1, hi_open=True)
        opts["float_act_fraction"] = as_real(fn, "float_act_fraction", opts["float_act_fraction"], 0, 1)
        opts["sensitivity_calls"] = as_int(fn, "sensitivity_calls", opts["sensitivity_calls"], 1,
                                           what="an integer >= 1 (model calls replayed for the sensitivity analysis)")
        opts["sensitivity_rows"] = as_int(fn, "sensitivity_rows", opts["sensitivity_rows"], 0,
                                          what="an integer >= 0 (batch rows kept per replayed call; 0 keeps all)")
    else:
        (opts["weight_bits"], opts["act_bits"], opts["group_size"], opts["lowrank_iters"],
         opts["alphas"]) = _svdquant_args(fn, opts["weight_bits"], opts["act_bits"], opts["group_size"],
                                          opts["lowrank_iters"], opts["alphas"])
        if opts["rank"] is not None:
            opts["rank"] = as_int(fn, "rank", opts["rank"], 0, what="None or an integer >= 0 (clipped to each "
                                  "layer's min(out, fan_in))")
        opts["rank_fraction"] = as_real(fn, "rank_fraction", opts["rank_fraction"], 0, 1)
        opts["budget"] = as_int(fn, "budget", opts["budget"], 1,
                                what="an integer >= 1 (activation elements kept per layer for the grid search)")
    return opts


_DEFAULTS = {
    "w4a8": dict(avg_weight_bits=4.0, weight_bits_choices=(2, 4, 8), act_bits=8, ema_momentum=0.95,
                 float_act_fraction=0.01, sensitivity_calls=4, sensitivity_rows=8, skip=MIXDQ_SKIP, budget=1),
    "w4a4": dict(weight_bits=4, act_bits=4, group_size=64, rank=None, rank_fraction=1 / 16, lowrank_iters=2,
                 alphas=tuple(i / 10 for i in range(11)), skip=SVDQUANT_SKIP, budget=1 << 18),
}
_DEFAULTS["w3a4"] = dict(_DEFAULTS["w4a4"], weight_bits=3)


def quantize(model: nn.Module, scheme: str, calib_data: Any = None, *, reconstruction: str | None = None,
             reconstruction_options: Any = None, **options: Any) -> nn.Module:
    """Return a fake-quantized deep copy of ``model`` (the original is untouched). Deterministic.

    The weight-only formats of :mod:`qdrift.quant.formats` (``"gguf-q4_0"``, ``"nf4"``, ``"quanto-int4"``, ...;
    :data:`qdrift.quant.formats.FORMAT_SCHEMES`) are computed by the formats' own libraries, need no
    calibration data (``calib_data`` is ignored) and take the options of
    :func:`qdrift.quant.formats.quantize_format`. The rest of this docstring is about the simulated schemes.

    Args:
        model: any ``nn.Module``; its ``Linear`` and ``Conv2d`` (groups=1) layers not matched by ``skip`` are
            replaced by :class:`SVDQuantLayer` (w4a4, w3a4) or :class:`MixDQLayer` (w4a8).
        scheme: ``"w4a8"`` (MixDQ-like), ``"w4a4"`` or ``"w3a4"`` (SVDQuant-like), or a format scheme.
        calib_data: what drives the calibration forward passes: a callable ``f(model)`` that runs the model
            (e.g. a sampler loop), a Tensor (one call ``model(x)``), or an iterable whose items are Tensors,
            tuples of positional args, ``((args...), {kwargs})`` pairs, or kwarg dicts.
        reconstruction: ``None`` (round to nearest), ``"brecq"`` (block-wise AdaRound reconstruction) or ``"gac"``
            (BRECQ with gradient-aligned calibration sample weights, arXiv 2602.01289); see
            :mod:`qdrift.quant.reconstruct`. Needs ``calib_data`` as a :class:`qdrift.quant.CalibSamples`
            (timestep-tagged inputs from full-precision sampler trajectories, e.g. from
            :func:`qdrift.quant.record_calib_samples`), which then also drives the scheme's own calibration.
        reconstruction_options: a :class:`qdrift.quant.ReconConfig` or a dict of its fields (iters, batch_size,
            lr, seed, progress, groups, gac_steps, ...).
        **options: scheme settings (defaults in brackets). Numbers may be Python, numpy or 0-d torch scalars;
            bit widths are integers in [2, 16].
            Common: ``skip`` [scheme list] regexes of name components to keep in float (a string or a sequence
            of strings; ``()`` keeps nothing in float).
            w4a4/w3a4: ``weight_bits`` [4/3], ``act_bits`` [4], ``group_size`` [64], ``rank`` [None: use
            ``rank_fraction``; clipped to each layer's ``min(out, fan_in)``], ``rank_fraction`` [1/16] in [0, 1],
            ``lowrank_iters`` [2] >= 1, ``alphas`` [0, 0.1, ..., 1] smoothing exponents in [0, 1],
            ``budget`` [2**18] activation elements kept per layer (evenly over the calibration calls) for the
            SVDQuant grid search (w4a8 keeps only activation ranges, so it rejects ``budget``).
            w4a8: ``avg_weight_bits`` [4.0] (at least the smallest choice), ``weight_bits_choices`` [(2, 4, 8)],
            ``act_bits`` [8], ``ema_momentum`` [0.95] in [0, 1), ``float_act_fraction`` [0.01] in [0, 1],
            ``sensitivity_calls`` [4] (>= 1) recorded model calls replayed for the sensitivity analysis,
            ``sensitivity_rows`` [8] batch rows kept per replayed call (evenly spaced; 0 keeps every row; tensors
            whose first dim equals the first argument's batch size are sliced).

    Returns:
        The quantized copy, in eval mode, with a ``qdrift_quant`` dict attribute: ``scheme``, ``options`` and a
        per-layer report (for w4a4/w3a4: chosen alpha, rank, unsigned, and output MSE with and without the
        low-rank branch; for w4a8: bits, float activations, sensitivities); with a reconstruction also
        ``reconstruction`` (:func:`qdrift.quant.reconstruct.reconstruct`'s report).

    Raises:
        ValueError: unknown scheme or option; a bad option value (checked before any calibration; the message
            names the option, the value and what is expected); empty calibration data; no quantizable layer (the
            message says whether the model has no Linear/Conv2d layer at all or the skip list matched them all);
            NaN or inf in a quantized layer's weight or bias, or in a quantized layer's calibration input (named);
            format schemes: see :func:`qdrift.quant.formats.quantize_format`.
        ImportError: a format scheme whose library is not installed.
    """
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if reconstruction is not None:
        if not isinstance(reconstruction, str) or reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"quantize: unknown reconstruction {reconstruction!r}; expected None or one of "
                             f"{RECONSTRUCTIONS}")
        if not isinstance(calib_data, CalibSamples):
            raise ValueError(f"quantize: reconstruction={reconstruction!r} needs calib_data as "
                             "qdrift.quant.CalibSamples (timestep-tagged inputs recorded from full-precision sampler "
                             "trajectories, e.g. record_calib_samples(model, run)), got "
                             f"{type(calib_data).__name__}")
        if scheme in FORMAT_SCHEMES and scheme not in RECON_FORMATS:
            raise ValueError(f"quantize: reconstruction is not supported for scheme {scheme!r} (its grid is not read "
                             f"back from its library); it is for {', '.join(SIMULATED_SCHEMES + RECON_FORMATS)}")
        recon_cfg = ReconConfig.from_options(reconstruction_options)
        qmodel = quantize(model, scheme, calib_data, **options)
        was_training = model.training
        model.eval()
        try:
            qmodel.qdrift_quant["reconstruction"] = reconstruct(qmodel, model, calib_data, reconstruction, recon_cfg)
        finally:
            model.train(was_training)
        return qmodel
    if reconstruction_options is not None:
        raise ValueError("quantize: reconstruction_options given without a reconstruction ('brecq' or 'gac')")
    if scheme in FORMAT_SCHEMES:
        return _quantize_format(model, scheme, options, "quantize")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize: model must be an nn.Module, got {type(model).__name__}")
    if scheme == "w4a8" and "budget" in options:
        raise ValueError("quantize: budget (activation elements kept per layer for the SVDQuant grid search) applies "
                         "to w4a4 and w3a4 only; w4a8 keeps only per-layer activation ranges")
    unknown = set(options) - set(_DEFAULTS[scheme])
    if unknown:
        raise ValueError(f"quantize: unknown options for {scheme}: {sorted(unknown)}; "
                         f"valid: {sorted(_DEFAULTS[scheme])}")
    if calib_data is None:
        raise ValueError(f"quantize: scheme {scheme!r} needs calib_data (a callable running the model, a Tensor, or an "
                         "iterable)")
    opts = _check_options(scheme, dict(_DEFAULTS[scheme], **options))

    was_training = model.training
    model.eval()
    try:
        layers = quantizable_layers(model, opts["skip"])
        if not layers:
            raise ValueError(_no_layer_message(model, opts["skip"]))
        for name, mod in layers.items():
            check_layer_params("quantize", name, mod)
        if scheme == "w4a8":
            stats, recorder = _collect(model, layers, calib_data, 1, max_calls=opts["sensitivity_calls"])
            recorder.calls = [_slice_rows(c, opts["sensitivity_rows"]) for c in recorder.calls]
            qmodel, report = _quantize_mixdq(model, layers, stats, recorder, opts)
        else:
            stats, _ = _collect(model, layers, calib_data, opts["budget"])
            qmodel = copy.deepcopy(model)
            report = {}
            for name, mod in layers.items():
                w = mod.weight
                max_rank = min(w.shape[0], w[0].numel())
                rank = opts["rank"] if opts["rank"] is not None else math.ceil(opts["rank_fraction"] * max_rank)
                rank = min(int(rank), max_rank)
                s = stats[name]
                q, info = svdquant_layer(mod, s.reservoir.get(), weight_bits=opts["weight_bits"],
                                         act_bits=opts["act_bits"], group_size=opts["group_size"], rank=rank,
                                         lowrank_iters=opts["lowrank_iters"], alphas=opts["alphas"],
                                         absmax=s.absmax, input_min=s.min)
                _set_module(qmodel, name, q)
                report[name] = info
            report = dict(layers=report)
    finally:
        model.train(was_training)
    qmodel.eval()
    qmodel.qdrift_quant = dict(scheme=scheme, options={k: v for k, v in opts.items()}, **report)
    return qmodel


def layer_error_report(qmodel: nn.Module) -> dict[str, float]:
    """Summarize an SVDQuant report: mean relative output MSE with/without low rank and of plain RTN.

    Args:
        qmodel: a model returned by :func:`quantize` with scheme w4a4 or w3a4.

    Returns:
        ``{"rel_err": ..., "rel_err_norank": ..., "rel_err_rtn": ...}`` averaged over layers (MSE / mean square
        of the FP output).
    """
    rep = getattr(qmodel, "qdrift_quant", None)
    if rep is None or rep["scheme"] == "w4a8":
        raise ValueError("layer_error_report needs a model quantized with w4a4 or w3a4")
    layers = rep["layers"].values()
    mean = lambda key: sum(i[key] / max(i["signal"], 1e-12) for i in layers) / len(layers)  # noqa: E731
    return {"rel_err": mean("err"), "rel_err_norank": mean("err_norank"), "rel_err_rtn": mean("err_rtn")}
