"""Size Q-Drift v2's drift to the error the quantized sampler really accumulates (:func:`size_drift`).

v2 sizes each step's drift with a linear-Gaussian surrogate of the run (:class:`qdrift.plan.DriftPlan`): the
residual errors of the quantized model (variance ``V``, correlated between steps as calibrated) are carried
forward by the full-precision denoiser's state slope ``kappa``, and each step's ``c`` cancels the variance the
surrogate's accumulated difference adds. A real network can remove an error-made deviation much faster than
``kappa`` says (its slope along the error's own direction is smaller than along the state's: a transformer
whose errors are fine-grained re-denoises them at the next step), and then the surrogate over-predicts the
accumulated difference and the drift over-contracts the samples.

The accumulated difference itself can be measured, and well on a few noises: from the same initial noise
(and the same sampler noise) run the full-precision sampler and the quantized sampler with v2's output
correction but no drift (``c = 0``, :func:`qdrift.plan.undrifted`), and compare, after every step, the mean
square difference of the two states with what the surrogate predicted for that very run. Both are summed over
the steps relative to the full-precision state's variance, per channel; their ratio
(:attr:`qdrift.Calibration.drift_scale`) scales ``V`` in the surrogate. The surrogate's difference is linear in
``V`` (``D`` is a linear combination of the error sources), so the scaled surrogate predicts the measured
accumulation, and each step's balance sizes the drift to it.

The mean square difference is a sum of positive terms over every position of every sample, and is far less
noisy than the samples' excess variance ``Var(x_q) - Var(x_fp)`` (a difference of two spreads whose sign can
flip between noise sets of five bench images). Still, a few noises give a noisy factor where the error is small:
on the bench DiT the raw factor measured on the 5 calibration noises and on 40 held-out ones was 0.64 / 0.77
(w3a4), 1.00 / 1.24 (w4a4), 1.28 / 0.87 (w4a8) (docs/bench_results.md, "Sizing the drift by the measured
accumulation"). So the pass also keeps each noise's accumulation: their spread gives the factor's standard
error (the noises are independent; the positions of one sample are not), and the factor is applied only where
it differs from 1 by more than ``z`` standard errors (a pretest: where the pass cannot tell the surrogate wrong,
the surrogate stands; :attr:`qdrift.Calibration.drift_scale`).

Cost: two sampler runs per batch (the full-precision and the quantized model, one call per evaluation each);
memory: the states of one batch at every step.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import torch

from .calibration import DRIFT_SCALE_Z, Calibration
from .check import _Sums
from .match import _run, check_pass, pass_batches

__all__ = ["size_drift"]  # Accumulation, check_z, unsized: for PairedTrace.size_sampler


@torch.no_grad()
def size_drift(
    calibration: Calibration,
    model_fp: Callable,
    model_q: Callable,
    x: Any,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    batch_size: Optional[int] = None,
    seed: int = 0,
    sampler_kwargs: Optional[Dict[str, Any]] = None,
    z: float = DRIFT_SCALE_Z,
) -> Calibration:
    """A copy of ``calibration`` whose v2 drift is sized to the accumulation measured on ``x`` (module docstring).

    Args:
        calibration: a :class:`qdrift.Calibration` of ``model_q`` against ``model_fp`` with the options you
            sample with (``with_options(reduce=...)``); a previous sizing is replaced.
        model_fp, model_q: the two denoisers ``D(x, sigma [B], **extra_args)``.
        x: initial noise ``[K, C, ...]`` scaled by ``sigmas[0]``, or an iterable of batches (as
            :func:`qdrift.calibrate`); the calibration's own noises serve.
        sigmas: the schedule ``[S + 1]`` (the one you sample with); sampler: a qdrift sampler's short name.
        extra_args: keyword arguments for both models (per-sample tensors are split with x).
        batch_size: split a tensor ``x`` into batches of this size (None: one batch).
        seed: seeds the sampler noise of stochastic samplers (the same for both runs of a batch).
        sampler_kwargs: further sampler options (``eta``, ``s_noise``, ...; not ``callback``).
        z: the factor departs from 1 only where it differs from 1 by more than ``z`` standard errors of its
            mean over the noises of ``x`` (kept in the file as ``meta["drift_scale"]["z"]``); 0 uses the raw
            factor everywhere.

    Returns:
        The calibration with ``meta["drift_scale"]`` set: per channel the measured sum's mean over the
        noises and the mean of its square (``measured``, ``measured_sq``) and the predicted sum
        (``predicted``), ``K``, ``z``, ``sampler``, ``steps`` and ``seconds``. Method ``v2`` (the
        default) then samples with ``V`` scaled by :attr:`~qdrift.Calibration.drift_scale`; the file format
        keeps it (:meth:`~qdrift.Calibration.save`), and :meth:`~qdrift.Calibration.merge` pools two sizings
        of the same sampler and step count.

    Raises:
        ValueError: for an unknown sampler, a calibration of another channel count, a ``callback`` in
            ``sampler_kwargs``, a ``z`` that is not a finite number >= 0, or bad inputs.
    """
    from ..plan import recording, undrifted

    check_z("size_drift", z)
    info = check_pass("size_drift", calibration, sampler, sigmas, sampler_kwargs, seed)
    if "callback" in (sampler_kwargs or {}):
        raise ValueError("size_drift: sampler_kwargs may not set 'callback'; the pass sets it")
    sizing = Accumulation("size_drift", len(sigmas) - 1)
    base = unsized(calibration)
    for b, xb, args in pass_batches("size_drift", calibration, x, extra_args, batch_size):
        after: Dict[str, List[torch.Tensor]] = {}
        for label, model, V in (("fp", model_fp, None), ("q", model_q, base)):
            seen: List[torch.Tensor] = []
            options = dict(sampler_kwargs or {}, extra_args=args, disable=True,
                           callback=lambda d, seen=seen: seen.append(d["x"].detach()))
            if V is not None:
                options["method"] = "v2"
            with recording() as plans, undrifted():
                out = _run(info, model, xb, sigmas, V, seed + b, options)
            after[label] = sizing.states_after(label, seen, out)
            if V is not None:
                trace = plans[-1].trace
        sizing.add(after["fp"], after["q"], trace, calibration.channels)
    return sizing.sized(calibration, info.name, z)


def check_z(who: str, z: Any) -> None:
    """Refuses a ``z`` (standard errors) that is not a finite number >= 0."""
    if isinstance(z, bool) or not isinstance(z, numbers.Real) or not 0 <= z < float("inf"):
        raise ValueError(f"{who}: z must be a finite number >= 0 (standard errors), got {z!r}")


def unsized(calibration: Calibration) -> Calibration:
    """The calibration without a sizing (the one a sizing pass runs with)."""
    return replace(calibration, meta={k: v for k, v in calibration.meta.items() if k != "drift_scale"})


class Accumulation:
    """What a sizing pass measures, batch by batch: each noise's mean square difference between the quantized
    and the full-precision state after every step, the full-precision state's variance, and the v2 plan's
    prediction (:func:`size_drift`; :meth:`qdrift.calib.PairedTrace.size_sampler`)."""

    def __init__(self, who: str, steps: int):
        self.who, self.steps, self.started = who, steps, time.time()
        self.fp = _Sums()
        self.per_sample: List[torch.Tensor] = []  # per batch [S, B, C]
        self.predicted: Optional[torch.Tensor] = None
        self.count = 0

    def states_after(self, label: str, seen: List[torch.Tensor], out: torch.Tensor) -> List[torch.Tensor]:
        """The state after each step, from a run's callback states (before each step) and its result."""
        if len(seen) != self.steps:
            raise RuntimeError(f"{self.who}: the {label} run reported {len(seen)} steps of {self.steps}")
        return seen[1:] + [out.detach()]

    def add(self, fp_after: List[torch.Tensor], q_after: List[torch.Tensor], trace: List[Dict[str, Any]],
            channels: int) -> None:
        """One batch: the two runs' states after each step and the undrifted v2 plan's trace."""
        self.fp.add(fp_after, fp_after)
        self.per_sample.append(torch.stack([(q.double() - f.double()).reshape(*q.shape[:2], -1).pow(2).mean(2)
                                            for q, f in zip(q_after, fp_after)]))
        self.predicted = _predicted_by_step(trace, self.steps, channels)
        self.count += fp_after[0].shape[0]

    def sized(self, calibration: Calibration, sampler: str, z: float) -> Calibration:
        """``calibration`` with ``meta["drift_scale"]`` from the batches added (see :func:`size_drift`)."""
        if self.count == 0:
            raise ValueError(f"{self.who}: x held no batches")
        var_fp = self.fp.var()
        rows = ~torch.isnan(self.predicted).any(1) & (var_fp > 0).all(1)
        if not bool(rows.any()):
            raise ValueError(f"{self.who}: the {sampler} run's v2 plan predicted no step (is the calibration's "
                             "error model empty, or the schedule a single step to 0 with no variance?)")
        # each sample's accumulation [K, C]: their mean is the measured sum, their spread its standard error
        each = (torch.cat(self.per_sample, 1)[rows] / var_fp[rows].unsqueeze(1)).sum(0)
        expected = (self.predicted[rows] / var_fp[rows]).sum(0)
        meta = dict(calibration.meta)
        meta["drift_scale"] = {
            "measured": each.mean(0).tolist(),
            "measured_sq": each.pow(2).mean(0).tolist(),
            "predicted": expected.clamp(min=0).tolist(),
            "K": self.count,
            "z": float(z),
            "sampler": sampler,
            "steps": self.steps,
            "seconds": round(time.time() - self.started, 3),
        }
        return replace(calibration, meta=meta)


def _predicted_by_step(trace: List[Dict[str, Any]], steps: int, channels: int) -> torch.Tensor:
    """The plan's predicted ``Var(D)`` after each step ``[S, C]`` (NaN for a step it predicted nothing for);
    per band units are summed to their channel (the bands are orthogonal)."""
    out = torch.full((steps, channels), float("nan"), dtype=torch.float64)
    for entry in trace:
        if "var_diff" in entry and 0 <= entry["step"] < steps:
            out[entry["step"]] = entry["var_diff"].reshape(channels, -1).sum(1)
    return out
