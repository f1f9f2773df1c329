"""``calibrate``: paired full-precision / quantized runs -> per-step, per-channel statistics (Algorithm 1)."""

from __future__ import annotations

import numbers
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .._utils import to_d
from .._version import __version__
from ..correction import band_shares
from ..validation import (
    _integer,
    check_choice,
    check_extra_args,
    flag,
    flag_arg,
    prepare_sigmas,
    validate_sampler_inputs,
)
from .calibration import REDUCES, Calibration
from .stats import PairedAccumulator

__all__ = ["calibrate", "AUTO_BANDS"]

TRAJECTORIES = ("fp", "q")
Batch = Tuple[torch.Tensor, Optional[Dict[str, Any]]]


def _batches(x, extra_args, batch_size, who: str = "calibrate") -> Iterator[Batch]:
    """Yields ``(x, extra_args)`` batches from a tensor (split along dim 0) or an iterable of batches; errors name
    ``who`` (the pass that was called)."""
    check_extra_args(who, extra_args)
    if isinstance(x, torch.Tensor):
        total = x.shape[0] if x.ndim >= 2 else 0
        if total == 0:
            raise ValueError(f"{who}: x holds no samples (shape {tuple(x.shape)}); expected [K, C, ...] with K >= 1")
        size = total if batch_size is None else batch_size
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{who}: batch_size must be a positive integer or None, got {batch_size!r}")
        size = int(size)
        if size < total:
            _check_split(extra_args, total, who)
        for start in range(0, total, size):
            sl = slice(start, start + size)
            yield x[sl], _slice_args(extra_args, sl, total)
        return
    if not isinstance(x, Iterable) or isinstance(x, (str, bytes)):
        raise ValueError(f"{who}: x must be a tensor [K, C, ...] or an iterable of batches, got {type(x).__name__}")
    for b, item in enumerate(x):
        if isinstance(item, torch.Tensor):
            xb, args = item, extra_args
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            xb, args = item[0], item[1] if item[1] is not None else extra_args
        else:
            raise ValueError(
                f"{who}: each item of an iterable x must be a tensor [B, C, ...] or a pair (x, extra_args); "
                f"got {type(item).__name__}"
            )
        if xb.ndim < 2 or xb.shape[0] == 0:
            raise ValueError(
                f"{who}: batch {b} of x holds no samples (shape {tuple(xb.shape)}); expected [B, C, ...] with B >= 1"
            )
        check_extra_args(who, args, f"the extra_args of batch {b}")
        yield xb, args


def _check_split(extra_args, total: int, who: str) -> None:
    """Refuses, when x is split into batches, a tensor in extra_args that has a leading axis of neither K (split
    with x) nor 1 (shared by every batch): it would reach every batch whole, whatever the batch's size."""
    for key, v in (extra_args or {}).items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] not in (1, total):
            raise ValueError(
                f"{who}: extra_args[{key!r}] has shape {tuple(v.shape)}, whose leading size {v.shape[0]} is "
                f"neither K={total} (x's samples: split with x into batches) nor 1 (shared by every batch); "
                "expected a leading size of K or 1 (or pass batch_size=None to give it whole to one batch, or x "
                "as an iterable of (x, extra_args) batches)"
            )


AUTO_BANDS = 4
"""The most radial frequency bands ``bands="auto"`` (:func:`calibrate`'s default since session 19) calibrates with:
four, or the largest count below it whose every band holds an FFT bin of the samples' grid; one for samples without
spatial axes. Four bands measured as close to the full-precision samples as one or closer on every bench setting
(U-Net DPM++ 2M 20: 67 / 21 / 94 -> 78 / 31 / 96 % of the distance to FP's images removed; flow LMS on the DiT
16 / 15 -> 48 / 58 %; U-Net Euler 30, Euler a 4 and the DiT's flow Euler level or better: README, "Q-Drift v2"),
and cost nothing on the analytic Gaussian's white and correlated errors; the one measured cost is the DiT's flow
Euler 20 w3a4 FID gap (17 vs 24 % recovered, session 19)."""


def check_bands(who: str, bands, spatial: Sequence[int]) -> int:
    """``bands`` as an int, checked before the models run: ``"auto"`` (:data:`AUTO_BANDS`), or an integer >= 1, and
    above 1 only for samples with a ``spatial`` grid (their axes after the channel) whose every radial band holds an
    FFT bin (else its statistics and its variance share would be empty: :func:`qdrift.correction.band_shares`); a
    ``ValueError`` naming ``who``."""
    spatial = tuple(int(n) for n in spatial)
    if band_count(who, bands) == "auto":
        return _largest_full(spatial, AUTO_BANDS) if spatial else 1
    count = int(bands)
    if count == 1:
        return 1
    if not spatial:
        raise ValueError(f"{who}: bands={count} needs samples with spatial axes [B, C, H, W, ...]; these have none")
    bands = count
    shares = band_shares(spatial, bands)
    if bool((shares > 0).all()):
        return count
    grid, limit = "x".join(map(str, spatial)), _band_limit(spatial)
    message = (f"{who}: bands={bands} leaves {int((shares == 0).sum())} of its {bands} radial frequency bands "
               f"without any FFT bin of x's {grid} spatial grid (qdrift.correction.frequency_bands); ")
    if bands > limit:
        message += f"expected bands <= {limit}, the largest count a {grid} grid supports"
    else:
        below = _largest_full(spatial, bands - 1)
        message += (f"expected a count whose every band holds a bin: {limit} is the largest a {grid} grid supports, "
                    f"but not every count below it works ({bands} does not; the nearest below that does is {below})")
    raise ValueError(message)


def _largest_full(spatial: Sequence[int], most: int) -> int:
    """The largest band count up to ``most`` whose every band holds an FFT bin of a ``spatial`` grid (1 always does)."""
    return max(b for b in range(1, most + 1) if b == 1 or bool((band_shares(spatial, b) > 0).all()))


def band_count(who: str, bands) -> Union[int, str]:
    """``bands`` checked without a grid: ``"auto"``, or an integer >= 1 (returned as int); a ``ValueError`` naming
    ``who`` otherwise."""
    if isinstance(bands, str) and bands == "auto":
        return "auto"
    count = _integer(bands)
    if count is None or count < 1:
        raise ValueError(f"{who}: bands must be \"auto\" or an integer >= 1 (1: per channel only), got {bands!r:.80}")
    return count


def _band_limit(spatial) -> int:
    """The largest band count whose every radial band holds an FFT bin of a ``spatial`` grid.

    ``b`` bands all hold a bin iff the grid's distinct radii (normalized as :func:`frequency_bands
    <qdrift.correction.frequency_bands>` does) fall into ``b`` distinct bands, so no count above the number of
    distinct radii works; the counts are tried downwards and the answer is confirmed by :func:`band_shares`.
    """
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64) for n in spatial], indexing="ij")
    radius = torch.zeros(tuple(spatial), dtype=torch.float64)
    for g in grids:
        radius = radius + g * g
    radius = radius.sqrt().unique()  # sorted
    top = float(radius[-1])
    if top == 0:
        return 1
    u = radius / top
    for b in range(len(u), 1, -1):
        band = (u * b).floor().clamp(max=b - 1)
        if int((band[1:] != band[:-1]).sum()) + 1 == b and bool((band_shares(spatial, b) > 0).all()):
            return b
    return 1


def _slice_args(extra_args, sl, total):
    """Slices per-sample tensors (first dim == K) in extra_args along with x; other values pass through."""
    if not extra_args:
        return extra_args
    return {
        k: v[sl] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == total else v
        for k, v in extra_args.items()
    }


def _describe(model) -> str:
    name = getattr(model, "name", None) or type(model).__name__
    inner = getattr(model, "inner_model", None) or getattr(model, "net", None)
    return f"{name}({type(inner).__name__})" if inner is not None else str(name)


@torch.no_grad()
def calibrate(
    model_fp: Callable,
    model_q: Callable,
    x: Union[torch.Tensor, Iterable],
    sigmas: torch.Tensor,
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    reduce: str = "channel",
    conditional: bool = True,
    trim: Optional[float] = 4.0,
    disable: Optional[bool] = None,
    batch_size: Optional[int] = 8,
    trajectory: str = "fp",
    distributed: Optional[bool] = None,
    group=None,
    bands: Union[int, str] = "auto",
) -> Calibration:
    """Measures the quantization error of ``model_q`` against ``model_fp`` along sampling trajectories.

    Q-Drift Algorithm 1 (arXiv 2603.18095): from each initial noise, take the full-precision model's Euler
    steps ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_fp``; at every step evaluate both models on the same
    ``x_i`` and record the pair ``(d_fp, d_q)`` with ``d = (x - D) / sigma``. Pairs are whatever the
    callables return, so guidance (CFG) applied inside them is included. Statistics stream into
    :class:`PairedMoments` per (step, channel), pooling batch and spatial positions, so memory does not grow
    with K.

    Args:
        model_fp: full-precision denoiser ``D(x, sigma [B], **extra_args) -> x0``.
        model_q: quantized denoiser, same contract.
        x: initial noise ``[K, C, ...]`` already scaled by ``sigmas[0]``, or an iterable of batches
            (tensors or ``(x, extra_args)`` pairs) for any K at constant memory.
        sigmas: calibration schedule ``[S + 1]`` (decreasing; the last value, usually 0, is not evaluated).
        extra_args: keyword arguments for both models (string keys other than ``x`` and ``sigma``); tensors
            whose first dim equals K are split with x, others go whole to every batch: when x is split, a
            tensor's first dim must be K or 1.
        reduce: ``"channel"`` (V per channel) or ``"scalar"`` (one pooled V per step).
        conditional: ``Var(delta | d_hat)`` (True) or ``Var(delta)`` (False, the paper's ablation).
        trim: drop pairs whose delta is more than ``trim`` std from the mean of its own sample, step and
            channel (the authors trim at 4); None or 0 keeps everything. Being per sample, trimming does not
            depend on batching or on how samples are spread over processes.
        disable: disables the progress bar.
        batch_size: split a tensor ``x`` into batches of this size (default 8, so memory does not grow with
            K; None = one batch).
        trajectory: ``"fp"`` (the paper's Algorithm 1) or ``"q"`` (follow the quantized model, i.e. the
            states the quantized sampler actually visits).
        distributed: all-gather and merge the statistics over ``torch.distributed`` ranks (default: when a
            process group is initialized and has more than one rank). Each rank passes its own share of x.
        group: the process group (default: the world).
        bands: also keep the statistics per channel and radial frequency band (``bands >= 2``, needs spatial
            axes; :attr:`Calibration.banded`), for the frequency-resolved Q-Drift v2: the error model, the
            sample's own variance and the cross-step correlation per band, and each band of a step's
            increment scaled on its own. Exact for stationary Gaussian data; costs ``bands`` FFTs per
            tensor here and up to four FFTs per step when sampling. Every band must hold an FFT bin of x's spatial
            grid (a 4x4 grid supports at most 5 bands, a 1x1 grid none); a count that leaves one empty is
            refused before the models run. ``"auto"`` (the default since session 19): :data:`AUTO_BANDS` (4), or
            as many as the grid holds, and 1 for samples without spatial axes. ``1``: per channel only (the
            calibrations of earlier versions).

    Returns:
        A :class:`Calibration` with ``.sigmas = sigmas[:-1]`` and ``.V`` ``[S, C]``.

    Raises:
        ValueError: on invalid options, schedules or model outputs.
    """
    check_choice("reduce", reduce, REDUCES)
    check_choice("trajectory", trajectory, TRAJECTORIES)
    if trim is not None and (isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not trim >= 0):
        raise ValueError(f"calibrate: trim must be None or a number >= 0, got {trim!r}")
    conditional = flag_arg("calibrate", "conditional", conditional)
    if distributed is not None and flag(distributed) is None:
        raise ValueError(f"calibrate: distributed must be True, False or None, got {distributed!r}")
    distributed = None if distributed is None else flag(distributed)
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("calibrate: distributed=True needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group) before the models run")
    if not callable(model_fp) or not callable(model_q):
        raise ValueError("calibrate: model_fp and model_q must be callables D(x, sigma, **extra_args)")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise ValueError(f"calibrate: extra_args must be a dict or None, got {type(extra_args).__name__}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"calibrate: sigmas must be a 1-D tensor with at least 2 values, got {sigmas!r:.80}")
    band_count("calibrate", bands)
    acc = None
    started = time.time()
    progress = tqdm(total=None, disable=disable, desc="qdrift calibrate", unit="step")
    for xb, args in _batches(x, extra_args, batch_size):
        sigmas = prepare_sigmas(sigmas, xb, "calibrate")
        validate_sampler_inputs(xb, sigmas, "calibrate")
        # "auto" is resolved on the first batch's grid; every batch is checked before the models run
        count = check_bands("calibrate", bands if acc is None else acc.bands, xb.shape[2:])
        acc = PairedAccumulator(trim, count) if acc is None else acc
        acc.check_sample(xb)
        if acc.shape is not None and xb.shape[1] != acc.shape[1]:
            raise ValueError(f"calibrate: batches disagree on channels ({xb.shape[1]} vs {acc.shape[1]})")
        acc.add(*_run_batch(model_fp, model_q, xb, sigmas, args or {}, trajectory, progress))
    progress.close()
    if acc is None or acc.moments is None:
        raise ValueError("calibrate: x held no batches")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        distributed = distributed and torch.distributed.get_world_size(group) > 1
    if distributed:
        acc.gather(group)
    meta = {
        "model_fp": _describe(model_fp),
        "model_q": _describe(model_q),
        "K": acc.count,
        "trim": trim,
        "trajectory": trajectory,
        "schedule": sigmas.detach().double().cpu().tolist(),
        "seconds": round(time.time() - started, 3),
        "qdrift_version": __version__,
    }
    return Calibration.from_accumulator(sigmas[:-1], acc, reduce, conditional, meta)


def _run_batch(model_fp, model_q, x, sigmas, extra_args, trajectory, progress):
    """One batch of trajectories: the states and both models' ``d`` on them, each ``[S, B, C, ...]``."""
    s_in = x.new_ones([x.shape[0]])
    states, ds_fp, ds_q = [], [], []
    for i in range(len(sigmas) - 1):
        den_fp = model_fp(x, sigmas[i] * s_in, **extra_args)
        den_q = model_q(x, sigmas[i] * s_in, **extra_args)
        for label, den in (("model_fp", den_fp), ("model_q", den_q)):
            if (not isinstance(den, torch.Tensor) or den.shape != x.shape or not den.is_floating_point()
                    or den.device != x.device):
                got = (f"{tuple(den.shape)} {den.dtype} on {den.device}" if isinstance(den, torch.Tensor)
                       else type(den).__name__)
                raise ValueError(
                    f"calibrate: {label} must return a floating-point denoised tensor shaped like x "
                    f"{tuple(x.shape)} on {x.device}, got {got} at step {i} (sigma={float(sigmas[i]):.4g})"
                )
            if not bool(torch.isfinite(den).all()):
                raise ValueError(
                    f"calibrate: {label} returned NaN or inf at step {i} (sigma={float(sigmas[i]):.4g}); a "
                    "calibration from it would be meaningless"
                )
        d_fp, d_q = to_d(x, sigmas[i], den_fp), to_d(x, sigmas[i], den_q)
        states.append(x)
        ds_fp.append(d_fp)
        ds_q.append(d_q)
        # Follow the full-precision Euler trajectory (Algorithm 1), or the quantized one.
        x = x + (sigmas[i + 1] - sigmas[i]) * (d_fp if trajectory == "fp" else d_q)
        progress.update(1)
    return torch.stack(states), torch.stack(ds_fp), torch.stack(ds_q)
