"""Moment matching: measure each step's drift on the sampler itself (Q-Drift v2, method ``"matched"``).

The error-model methods (``paper``, ``exact``, ``correlated``, ``v2``) predict from paired statistics how much
variance the quantized model's errors add and size ``c`` for it. That prediction rests on a model of the
error (Gaussian, linear in the state, its correlation between steps as calibrated on the full-precision
trajectory). Moment matching measures instead: from the same initial noise (and the same sampler noise) it
runs the sampler once with the full-precision model and once with the quantized one, and at every step
chooses the quantized run's ``c`` -- and, with ``mean=True``, a per-channel shift -- so that the corrected
state's per-channel variance and mean equal the full-precision run's at the same step:

    Var(x_base + c inc) = Var(x_fp)   <=>   [Var(x_base) - Var(x_fp)] + 2 c Cov(x_base, inc) + c^2 Var(inc) = 0

(``x_base`` the quantized run's plain step, ``inc = x_base - x`` its increment; the root nearest 0,
:func:`qdrift.correction.balance_coefficient`), then ``shift = E x_fp - E(x_base + c inc)``. The next step
starts from the corrected state, so every later ``c`` sees what the earlier ones did; whatever the errors'
correlation, nonlinearity or bias, the matched run follows the full-precision run's first two moments on the
calibration noises. One model call per evaluation and model (as :func:`qdrift.calibrate`); memory ``O(S C)``
beyond one batch.

The tables are stored in the calibration per unit of step length (:attr:`qdrift.Calibration.matched`), so a
run on another schedule reads them at its own levels (exact on the matched schedule, first order elsewhere).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .._utils import BrownianTreeNoiseSampler, default_noise_sampler
from ..correction import balance_coefficient, frequency_bands
from ..validation import MAX_DRIFT, flag_arg
from .calibration import Calibration
from .run import _batches

__all__ = ["match_moments"]


def _channel_stats(t: torch.Tensor) -> torch.Tensor:
    """``[C, N]`` float64 view of ``[B, C, ...]`` (channels first, batch and positions pooled)."""
    return t.detach().to(torch.float64).transpose(0, 1).reshape(t.shape[1], -1)


def _centered_spectrum(t: torch.Tensor) -> torch.Tensor:
    """FFT over the spatial axes of ``[B, C, ...]`` after removing each channel's mean over batch and positions."""
    t = t.detach().to(torch.float64)
    mean = t.transpose(0, 1).reshape(t.shape[1], -1).mean(1)
    centered = t - mean.reshape((1, -1) + (1,) * (t.ndim - 2))
    return torch.fft.fftn(centered, dim=tuple(range(2, t.ndim)))


def _band_sum(values: torch.Tensor, band: torch.Tensor, bands: int) -> torch.Tensor:
    """Sums ``[B, C, *spatial]`` over the batch and over each band's bins: ``[C, NB]``."""
    flat = values.sum(0).reshape(values.shape[1], -1)
    out = torch.zeros(values.shape[1], bands, dtype=flat.dtype)
    return out.index_add_(1, band.reshape(-1), flat)


class _Recorder:
    """Records the per-channel mean and variance (per band: power) of each step's deterministic result."""

    def __init__(self, calibration: Calibration, bands: int):
        self.calibration, self.bands = calibration, bands
        self.gain = False
        self.targets: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def match_step(self, i, x, x_base, sigma, sigma_eff):
        t = _channel_stats(x_base)
        if self.bands == 1:
            spread = t.var(1, correction=0)
        else:
            band = frequency_bands(x_base.shape[2:], self.bands)
            spread = _band_sum(_centered_spectrum(x_base).abs() ** 2, band, self.bands)
        self.targets[i] = (t.mean(1), spread)
        return None, None


class _Solver:
    """Solves each step's ``c`` (per channel, or per channel and band) and shift so the quantized run follows
    the recorded moments."""

    def __init__(self, calibration: Calibration, targets, gain: bool, mean: bool, bands: int):
        self.calibration, self.targets, self.gain, self.mean, self.bands = calibration, targets, gain, mean, bands
        self.rows: Dict[int, Tuple[float, float, torch.Tensor, torch.Tensor]] = {}

    def match_step(self, i, x, x_base, sigma, sigma_eff):
        if i not in self.targets:
            raise RuntimeError(f"match_moments: the quantized run took step {i}, the full-precision run did not")
        mean_fp, spread_fp = self.targets[i]
        xb, inc = _channel_stats(x_base), _channel_stats(x_base - x)
        mb, mi = xb.mean(1), inc.mean(1)
        if self.bands == 1:
            var_b, var_i = xb.var(1, correction=0), inc.var(1, correction=0)
            cov = ((xb - mb[:, None]) * (inc - mi[:, None])).mean(1)
        else:  # Parseval per band: powers and cross-power of the centered spectra
            band = frequency_bands(x_base.shape[2:], self.bands)
            sb, si = _centered_spectrum(x_base), _centered_spectrum(x_base - x)
            var_b = _band_sum(sb.abs() ** 2, band, self.bands)
            var_i = _band_sum(si.abs() ** 2, band, self.bands)
            cov = _band_sum((sb * si.conj()).real, band, self.bands)
        c = balance_coefficient(var_b - spread_fp, cov, var_i).clamp(-MAX_DRIFT, MAX_DRIFT)
        c0 = c if c.ndim == 1 else c[:, 0]  # the zero frequency's band carries the mean
        shift = mean_fp - (mb + c0 * mi) if self.mean else torch.zeros_like(mb)
        self.rows[i] = (sigma, sigma_eff, c, shift)
        return c, shift


def check_pass(who: str, calibration, sampler, sigmas, sampler_kwargs, seed=0):
    """The checks every pass that runs the sampler on both models makes (:func:`match_moments`,
    :func:`qdrift.calib.check_correction`, :func:`qdrift.calib.tune_strength`, :func:`qdrift.size_drift`);
    returns the sampler's :class:`qdrift.samplers.SamplerInfo`."""
    from ..samplers import sampler_info

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{who}: seed must be an integer >= 0, got {seed!r}")

    if not isinstance(calibration, Calibration):
        raise ValueError(f"{who}: calibration must be a qdrift.Calibration, got {type(calibration).__name__}")
    info = sampler_info(sampler)
    if sampler_kwargs is not None and not isinstance(sampler_kwargs, dict):
        raise ValueError(f"{who}: sampler_kwargs must be a dict or None, got {type(sampler_kwargs).__name__}")
    for reserved in ("V", "method", "strength", "noise_sampler", "extra_args", "disable"):
        if reserved in (sampler_kwargs or {}):
            raise ValueError(f"{who}: sampler_kwargs may not set {reserved!r}; the pass sets it")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"{who}: sigmas must be a 1-D tensor with at least 2 values, got {sigmas!r:.80}")
    return info


def pass_batches(who: str, calibration: Calibration, x, extra_args, batch_size):
    """``(index, batch, its extra_args)`` of a pass's input (as :func:`qdrift.calibrate` splits it), each batch
    checked to have the calibration's channel count."""
    for b, (xb, args) in enumerate(_batches(x, extra_args, batch_size, who)):
        if xb.shape[1] != calibration.channels:
            raise ValueError(f"{who}: x has {xb.shape[1]} channels; expected the calibration's {calibration.channels}")
        yield b, xb, args


def _run(info, model, x: torch.Tensor, sigmas: torch.Tensor, probe, seed: int, options: Dict[str, Any]) -> torch.Tensor:
    """One sampler run with the probe (or a V) in place of V, returning its sample; stochastic samplers get
    seeded noise (the same for every run of a batch; Brownian for the SDE solvers)."""
    if info.brownian:
        positive = sigmas[sigmas > 0]
        options = dict(options, noise_sampler=BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=seed))
    elif info.stochastic:
        options = dict(options, noise_sampler=default_noise_sampler(x, seed=seed))
    return info.fn(model, x, sigmas, probe, **options)


@torch.no_grad()
def match_moments(
    calibration: Calibration,
    model_fp: Callable,
    model_q: Callable,
    x: Any,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    mean: bool = True,
    gain: bool = True,
    bands: int = 1,
    batch_size: Optional[int] = None,
    seed: int = 0,
    sampler_kwargs: Optional[Dict[str, Any]] = None,
) -> Calibration:
    """Adds moment-matching tables (method ``"matched"``) to a calibration of the same two models.

    Args:
        calibration: a :class:`qdrift.Calibration` of ``model_q`` against ``model_fp`` (from
            :func:`qdrift.calibrate` or a :class:`qdrift.calib.PairedTrace`); its gain and bias are removed
            from the quantized output during the pass when ``gain`` is True, as method ``v2`` does.
        model_fp, model_q: the two denoisers ``D(x, sigma [B], **extra_args)``.
        x: initial noise ``[K, C, ...]`` already scaled by ``sigmas[0]`` (or an iterable of batches, as for
            :func:`qdrift.calibrate`). Each batch is matched on its own (both runs start from it), and the
            tables are averaged over batches by count: a batch should hold several samples (the default is
            one batch of all K).
        sigmas: the schedule ``[S + 1]`` to match on (the one you sample with).
        sampler: short name of the qdrift sampler (:data:`qdrift.samplers.REGISTRY`).
        extra_args: keyword arguments for both models (per-sample tensors are split with x).
        mean: also match the per-channel mean (a shift per step); False matches the variance only.
        gain: remove the calibration's gain and bias from the quantized output (method ``v2``'s output
            correction) before matching.
        bands: match per channel (1) or per channel and radial frequency band (``> 1``,
            :func:`qdrift.correction.frequency_bands`): the increment is then scaled per band through an FFT
            over the spatial axes, so excess high-frequency noise (speckle) and low-frequency drift get their
            own ``c`` (exact for stationary Gaussian data, whose bands are independent).
        batch_size: split a tensor ``x`` into batches of this size (None: one batch).
        seed: seeds the sampler noise of stochastic samplers (the same for both runs of a batch).
        sampler_kwargs: further sampler options (``eta``, ``s_noise``, ``order``, ...).

    Returns:
        A copy of ``calibration`` with :attr:`~qdrift.Calibration.matched` set and ``meta["match"]``
        describing the pass. Sampling with it uses method ``"matched"`` unless another method is asked for.

    Raises:
        ValueError: for an unknown sampler, a calibration of another channel count, or bad inputs.
    """
    info = check_pass("match_moments", calibration, sampler, sigmas, sampler_kwargs, seed)
    if not isinstance(bands, numbers.Integral) or isinstance(bands, bool) or bands < 1:
        raise ValueError(f"match_moments: bands must be a positive integer, got {bands!r}")
    bands = int(bands)
    mean, gain = flag_arg("match_moments", "mean", mean), flag_arg("match_moments", "gain", gain)
    started = time.time()
    sums: Dict[int, List] = {}
    count = 0
    for b, xb, args in pass_batches("match_moments", calibration, x, extra_args, batch_size):
        options = dict(sampler_kwargs or {}, extra_args=args, disable=True)
        if bands > 1 and xb.ndim < 3:
            raise ValueError("match_moments: frequency bands need spatial axes; x has none (use bands=1)")
        recorder = _Recorder(calibration, bands)
        _run(info, model_fp, xb, sigmas, recorder, seed + b, options)
        solver = _Solver(calibration, recorder.targets, gain, mean, bands)
        _run(info, model_q, xb, sigmas, solver, seed + b, options)
        n = xb.shape[0]
        for i, (sigma, sigma_eff, c, shift) in solver.rows.items():
            gap = abs(sigma - sigma_eff)
            v_eff = 2 * sigma * c / gap if gap > 0 else torch.zeros_like(c)
            rate = shift / gap if gap > 0 else torch.zeros_like(shift)
            if i in sums:
                sums[i][1] += n * v_eff
                sums[i][2] += n * rate
            else:
                sums[i] = [sigma, n * v_eff, n * rate]
        count += n
    if not sums:
        raise ValueError("match_moments: x held no batches")
    steps = sorted(sums, key=lambda i: -sums[i][0])
    levels = torch.tensor([sums[i][0] for i in steps], dtype=torch.float64)
    keep = torch.cat([torch.ones(1, dtype=torch.bool), levels[1:] < levels[:-1]])  # one row per level
    table_v = torch.stack([sums[i][1] / count for i in steps])[keep]
    table_shift = torch.stack([sums[i][2] / count for i in steps])[keep]
    meta = dict(calibration.meta)
    meta["match"] = {
        "sampler": info.name,
        "K": count,
        "gain": bool(gain),
        "mean": bool(mean),
        "bands": bands,
        "steps": len(sigmas) - 1,
        "schedule": sigmas.detach().double().cpu().tolist(),
        "seconds": round(time.time() - started, 3),
    }
    matched = {"sigmas": levels[keep], "V": table_v, "shift": table_shift}
    return replace(calibration, meta=meta, matched=matched)
