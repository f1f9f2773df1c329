"""Check a correction on the two models themselves: what it does to the quantized run, next to its prediction.

Q-Drift v2 sizes each step's drift with a linear-Gaussian surrogate built from the calibration (see
:class:`qdrift.plan.DriftPlan`). Whether that surrogate describes a given network is an empirical question:
a real network's error can couple to the sample (a quantized U-Net's deviations grow with the image, a DiT's
can shrink it), have a bias whose removal interacts with the rest, or add no variance at all. This check
answers it on a few noises, at the cost of three sampler runs per batch:

- the full-precision run, the plain quantized run and the corrected quantized run start from the same noise
  (stochastic samplers get the same seeded noise in all three);
- at every model call and at the end it measures, per channel (batch and positions pooled), each quantized
  run's mean square difference from the full-precision run's state, its excess variance
  ``Var(x) - Var(x_fp)`` and its mean difference;
- next to them it puts what the run's plan predicted (:attr:`qdrift.plan.DriftPlan.trace`): the corrected
  run's mean square difference ``Var(D)`` (exact methods) at the same levels;
- for samples with spatial axes it splits the final samples' variance by radial frequency band
  (:func:`qdrift.correction.band_components`): one ``c`` per channel scales every band alike, so a correction
  can leave the channel's variance right and still take texture a band never had in excess
  (:meth:`CorrectionCheck.spectrum`).

A correction that does its job leaves the corrected run's excess variance near 0 and removes most of the plain
run's; a surrogate that fits predicts the mean square difference. Memory: the full-precision run's states of
one batch at every model call (use ``batch_size`` for large latents); the statistics over batches are sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..correction import band_components
from ..validation import _real
from .calibration import Calibration
from .match import _channel_stats, _run, check_pass, pass_batches

__all__ = ["CorrectionCheck", "StrengthTuning", "check_correction", "tune_strength"]

SPECTRUM_BANDS = 4  # CorrectionCheck.spectrum: radial frequency bands of the final samples' variance


class _Inputs:
    """A denoiser that keeps the state it is called at (per call, in order), and passes everything through."""

    def __init__(self, model: Callable):
        self.model, self.states, self.levels = model, [], []

    def __call__(self, x, sigma, **kwargs):
        self.states.append(x.detach())
        self.levels.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.model(x, sigma, **kwargs)

    def __getattr__(self, name):  # is_flow, inner_model, ... of the wrapped model
        return getattr(self.__dict__["model"], name)


class _Sums:
    """Per (call, channel) float64 sums of a run's state, its square, and its square difference from the FP run."""

    def __init__(self):
        self.n = self.x = self.x2 = self.dx = self.d2 = None

    def add(self, states: List[torch.Tensor], fp: List[torch.Tensor]) -> None:
        t = torch.stack([_channel_stats(s) for s in states])  # [E, C, N]
        f = torch.stack([_channel_stats(s) for s in fp])
        parts = (torch.full(t.shape[:2], float(t.shape[2]), dtype=torch.float64), t.sum(2), (t * t).sum(2),
                 (t - f).sum(2), ((t - f) ** 2).sum(2))
        if self.n is None:
            self.n, self.x, self.x2, self.dx, self.d2 = parts
        else:
            for name, value in zip(("n", "x", "x2", "dx", "d2"), parts):
                setattr(self, name, getattr(self, name) + value)

    def mean(self):
        return self.x / self.n

    def var(self):
        return self.x2 / self.n - self.mean() ** 2

    def mse(self):
        return self.d2 / self.n

    def mean_diff(self):
        return self.dx / self.n


@dataclass
class CorrectionCheck:
    """What a correction did on the check's noises. Per model call of the runs (rows; the last row is the
    final sample, level 0) and channel, each ``[E, C]`` float64:

    Attributes:
        levels: the noise level of each row ``[E]``.
        var_fp: the full-precision run's state variance.
        excess_q, excess_corr: ``Var(x) - Var(x_fp)`` of the plain and the corrected quantized run.
        mse_q, mse_corr: mean square difference from the full-precision run's state.
        shift_q, shift_corr: mean difference from the full-precision run's state.
        predicted_mse: the corrected run's plan's predicted mean square difference at the row's level (exact
            methods; NaN where the plan predicts nothing at that level: the paper's method, ancestral levels).
        method: the corrected run's method; trace: its plan's :attr:`~qdrift.plan.DriftPlan.trace` (last batch).
        samples: noises checked.
        band_var_fp, band_var_q, band_var_corr: the final samples' variance per channel and radial frequency band
            ``[C, NB]`` (the bands sum to the channel's variance), or None for samples without spatial axes.
    """

    levels: torch.Tensor
    var_fp: torch.Tensor
    excess_q: torch.Tensor
    excess_corr: torch.Tensor
    mse_q: torch.Tensor
    mse_corr: torch.Tensor
    shift_q: torch.Tensor
    shift_corr: torch.Tensor
    predicted_mse: torch.Tensor
    method: str
    samples: int
    trace: List[Dict[str, Any]] = field(default_factory=list, repr=False)
    band_var_fp: Optional[torch.Tensor] = None
    band_var_q: Optional[torch.Tensor] = None
    band_var_corr: Optional[torch.Tensor] = None

    def removed(self) -> torch.Tensor:
        """Share of the plain run's final excess variance the correction removed, per channel ``[C]`` (NaN
        where the plain run has none; :meth:`summary` reports the share only where the plain run's excess is
        at least 1 % of the FP variance, as a ratio of two small noisy numbers means nothing)."""
        ex = self.excess_q[-1]
        return torch.where(ex > 0, 1 - self.excess_corr[-1] / ex.where(ex > 0, torch.ones_like(ex)),
                           torch.full_like(ex, float("nan")))

    def table(self, every: int = 1) -> str:
        """A markdown table (channels averaged): per row level, FP variance, excess variance, mean square and
        mean difference of the plain and corrected runs, and the predicted mean square difference."""
        head = ("| level | Var fp | excess q | excess corr | MSE q | MSE corr | MSE predicted | shift q | shift corr |\n"
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [head]
        last = len(self.levels) - 1
        for e in range(len(self.levels)):
            if e % every and e != last:
                continue
            cells = [self.var_fp, self.excess_q, self.excess_corr, self.mse_q, self.mse_corr, self.predicted_mse,
                     self.shift_q, self.shift_corr]
            rows.append(f"| {float(self.levels[e]):.4g} | " + " | ".join(f"{float(t[e].mean()):+.4g}" for t in cells) + " |")
        return "\n".join(rows)

    def spectrum(self) -> Optional[str]:
        """One line: the final samples' variance per radial frequency band (low to high, channels pooled) of the
        plain and the corrected run over the full-precision run's, or None without spatial axes. A band below 1
        lost texture the full-precision samples have; above 1, it carries excess (speckle, grain)."""
        if self.band_var_fp is None:
            return None
        fp = self.band_var_fp.sum(0)

        def ratios(var):  # "-": a band with no variance in the FP samples (a grid too small to have its bins)
            return " ".join(f"{float(v) / float(f):.3f}" if f > 0 else "-" for v, f in zip(var.sum(0), fp))

        return (f"{self.method}, final variance per frequency band over FP's (low -> high, {len(fp)} bands): "
                f"plain {ratios(self.band_var_q)}, corrected {ratios(self.band_var_corr)}")

    def summary(self) -> str:
        """One line: the final sample's excess variance and mean square difference, plain vs corrected."""
        f = -1
        ex_q, ex_c = float(self.excess_q[f].sum()), float(self.excess_corr[f].sum())
        visible = ex_q > 0.01 * float(self.var_fp[f].sum())
        share = f"{1 - ex_c / ex_q:.0%}" if visible else "n/a: the plain run's is under 1 % of the FP variance"
        return (f"{self.method} on {self.samples} noises, final sample (channel mean): excess variance "
                f"{float(self.excess_q[f].mean()):+.4g} -> {float(self.excess_corr[f].mean()):+.4g} "
                f"(removed {share}), MSE to FP {float(self.mse_q[f].mean()):.4g} -> "
                f"{float(self.mse_corr[f].mean()):.4g} (predicted {float(self.predicted_mse[f].mean()):.4g}), mean "
                f"shift {float(self.shift_q[f].mean()):+.4g} -> {float(self.shift_corr[f].mean()):+.4g}")


@torch.no_grad()
def check_correction(
    calibration: Calibration,
    model_fp: Callable,
    model_q: Callable,
    x: Any,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    method: Optional[str] = None,
    strength: float = 1.0,
    batch_size: Optional[int] = None,
    seed: int = 0,
    sampler_kwargs: Optional[Dict[str, Any]] = None,
) -> CorrectionCheck:
    """Runs the full-precision, the plain quantized and the corrected quantized sampler from the same noises and
    measures what the correction did (see the module docstring).

    Args:
        calibration: a :class:`qdrift.Calibration` of ``model_q`` against ``model_fp``.
        model_fp, model_q: the two denoisers ``D(x, sigma [B], **extra_args)``.
        x: initial noise ``[K, C, ...]`` scaled by ``sigmas[0]``, or an iterable of batches (as
            :func:`qdrift.calibrate`). Noises other than the calibration's say how the correction generalizes.
        sigmas: the schedule ``[S + 1]``; sampler: a qdrift sampler's short name.
        extra_args: keyword arguments for both models (per-sample tensors are split with x).
        method, strength: the corrected run's (default: the calibration's default method).
        batch_size: split a tensor ``x`` into batches of this size (None: one batch).
        seed: seeds the sampler noise of stochastic samplers (the same for the three runs of a batch).
        sampler_kwargs: further sampler options (``eta``, ``s_noise``, ...).

    Raises:
        ValueError: for an unknown sampler, a calibration of another channel count, or bad inputs.
    """
    from ..plan import recording

    info = check_pass("check_correction", calibration, sampler, sigmas, sampler_kwargs, seed)
    fp_sums, q_sums, corr_sums = _Sums(), _Sums(), _Sums()
    band_sums = {label: _Sums() for label in ("fp", "q", "corr")}
    predicted: Optional[torch.Tensor] = None
    levels: List[float] = []
    trace: List[Dict[str, Any]] = []
    used = method
    count = 0
    for b, xb, args in pass_batches("check_correction", calibration, x, extra_args, batch_size):
        options = dict(sampler_kwargs or {}, extra_args=args, disable=True)
        runs = {}
        for label, model, V, extra in (("fp", model_fp, None, {}), ("q", model_q, None, {}),
                                       ("corr", model_q, calibration, {"method": method, "strength": strength})):
            probe = _Inputs(model)
            with recording() as plans:
                out = _run(info, probe, xb, sigmas, V, seed + b, dict(options, **extra))
            probe.states.append(out.detach())
            if len(probe.states) != len(runs.get("fp", probe).states):
                raise RuntimeError(f"check_correction: the {label} run called its model {len(probe.states) - 1} times, "
                                   f"the full-precision run {len(runs['fp'].states) - 1}")
            runs[label] = probe
            if label == "corr":
                plan = plans[0]
                used, trace = plan.method, plan.trace
        levels = runs["fp"].levels + [0.0]
        fp_states = runs["fp"].states
        for sums, label in ((fp_sums, "fp"), (q_sums, "q"), (corr_sums, "corr")):
            sums.add(runs[label].states, fp_states)
        if xb.ndim >= 3 and band_sums is not None:
            final = {label: band_components(probe.states[-1], SPECTRUM_BANDS) for label, probe in runs.items()}
            for label, sums in band_sums.items():
                sums.add([final[label]], [final["fp"]])
        else:
            band_sums = None
        count += xb.shape[0]
        predicted = _predicted(trace, levels, calibration.channels)
    if count == 0:
        raise ValueError("check_correction: x held no batches")
    var_fp = fp_sums.var()
    return CorrectionCheck(
        levels=torch.tensor(levels, dtype=torch.float64), var_fp=var_fp,
        excess_q=q_sums.var() - var_fp, excess_corr=corr_sums.var() - var_fp,
        mse_q=q_sums.mse(), mse_corr=corr_sums.mse(), shift_q=q_sums.mean_diff(), shift_corr=corr_sums.mean_diff(),
        predicted_mse=predicted, method=used, samples=count, trace=trace,
        **({} if band_sums is None else {f"band_var_{label}": sums.var()[0].reshape(-1, SPECTRUM_BANDS)
                                         for label, sums in band_sums.items()}),
    )


def _predicted(trace: List[Dict[str, Any]], levels: List[float], channels: int) -> torch.Tensor:
    """The plan's predicted ``Var(D)`` at each row's level ``[E, C]``: a step's prediction is for its
    deterministic result, at ``sigma_eff``; per band units are summed to their channel (bands are orthogonal)."""
    out = torch.full((len(levels), channels), float("nan"), dtype=torch.float64)
    by_level = {round(t["sigma_eff"], 12): t["var_diff"] for t in trace if "var_diff" in t}
    for e, level in enumerate(levels):
        value = by_level.get(round(level, 12))
        if value is not None:
            out[e] = value.reshape(channels, -1).sum(1)
    return out


STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""The strengths :func:`tune_strength` tries by default (0: the plain quantized sampler)."""


@dataclass
class StrengthTuning:
    """What :func:`tune_strength` measured: the mean square difference of each strength's final samples from
    the full-precision run's (pooled over samples, channels and positions), and the strength chosen."""

    strength: float
    mse: Dict[float, float]
    method: str
    samples: int

    def summary(self) -> str:
        cells = ", ".join(f"{s:g}: {m:.4g}" for s, m in self.mse.items())
        return (f"{self.method}: strength {self.strength:g} (MSE to the FP sampler's samples on {self.samples} noises "
                f"by strength: {cells})")


def _strengths(strengths) -> List[float]:
    """The strengths to try as distinct floats in the given order: one real number, or any iterable of them (a
    list, a range, a 1-D numpy array or tensor; numpy scalars and 0-d tensors count), each finite and >= 0."""
    if isinstance(strengths, (torch.Tensor, np.ndarray)) and strengths.ndim == 0:
        strengths = [strengths]
    elif _real(strengths) is not None:
        strengths = [strengths]
    elif isinstance(strengths, (str, bytes)) or not isinstance(strengths, Iterable):
        raise ValueError(f"tune_strength: strengths must be a number or an iterable of numbers >= 0, got "
                         f"{strengths!r:.80} ({type(strengths).__name__})")
    tried: List[float] = []
    for value in strengths:
        real = _real(value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value)
        if real is None or not (math.isfinite(real) and real >= 0):
            raise ValueError(f"tune_strength: strengths must be finite numbers >= 0, got {value!r:.80}")
        if real not in tried:  # a repeated strength would be run (and summed) twice
            tried.append(real)
    return tried


@torch.no_grad()
def tune_strength(
    calibration: Calibration,
    model_fp: Callable,
    model_q: Callable,
    x: Any,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    method: Optional[str] = None,
    strengths: Sequence[float] = STRENGTHS,
    batch_size: Optional[int] = None,
    seed: int = 0,
    sampler_kwargs: Optional[Dict[str, Any]] = None,
) -> StrengthTuning:
    """The correction's ``strength`` that brings the quantized sampler's samples closest to the full-precision
    sampler's, measured on a few noises.

    Q-Drift promises the full-precision sampler's distribution. Started from the same noise (and the same
    sampler noise), the corrected and the full-precision run are a coupling of the two output distributions,
    so their mean square difference bounds the squared 2-Wasserstein distance between them from above:
    ``W2^2 <= E |x_corr - x_fp|^2``. This runs the full-precision sampler once and the corrected quantized
    sampler once per strength (0 is the plain quantized sampler) on ``x`` and returns the strength of the
    smallest bound (ties: the one nearest 1). The error model's prediction is not involved: where it does not
    describe the network (a correction that moves samples away from the full-precision ones, see
    :func:`check_correction`) the measurement chooses a smaller strength, or 0.

    Use the calibration's own noises or others (held-out noises say how the choice generalizes); with a
    handful of samples the choice is one number from all their positions, not a per-step fit.

    Args:
        calibration, model_fp, model_q, x, sigmas, sampler, extra_args, method, batch_size, seed,
            sampler_kwargs: as :func:`check_correction`.
        strengths: the strengths to try (each finite and >= 0): a number or any iterable of real numbers (list,
            range, 1-D numpy array or tensor); repeats are tried once.

    Returns:
        A :class:`StrengthTuning`; pass ``result.strength`` as the samplers' ``strength``.
    """
    from ..plan import recording

    info = check_pass("tune_strength", calibration, sampler, sigmas, sampler_kwargs, seed)
    tried = _strengths(strengths)
    if not tried:
        raise ValueError("tune_strength: strengths is empty; give at least one strength to try")
    sums = dict.fromkeys(tried, 0.0)
    count, samples, used = 0, 0, method
    for b, xb, args in pass_batches("tune_strength", calibration, x, extra_args, batch_size):
        options = dict(sampler_kwargs or {}, extra_args=args, disable=True)
        fp = _run(info, model_fp, xb, sigmas, None, seed + b, options).double()
        for value in tried:
            with recording() as plans:
                out = _run(info, model_q, xb, sigmas, calibration, seed + b, dict(options, method=method, strength=value))
            used = plans[0].method
            sums[value] += float(((out.double() - fp) ** 2).sum())
        count += fp.numel()
        samples += xb.shape[0]
    if count == 0:
        raise ValueError("tune_strength: x held no batches")
    mse = {value: sums[value] / count for value in tried}
    best = min(tried, key=lambda value: (mse[value], abs(value - 1.0)))
    return StrengthTuning(best, mse, used, samples)
