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

The output correction. v2 first removes the quantized output's fitted gain, state term and bias, step by step
on the full-precision trajectory (:meth:`qdrift.Calibration.error_model`). Each step's fit can be right and the
whole run still overshoot: the network's errors at later steps partly answer the deviations its earlier ones
made, so removing every step's error removes some twice. On the bench U-Net w4a4 (Euler 30, 40 held-out noises,
``benchmarks/correction_check.py --size-drift``) v2 turned the final mean shift from -0.028 into +0.008, removed 128 %
of the excess variance and moved the samples farther from the full-precision ones (mean square 0.0108 -> 0.0128);
sized as below (output share 0.59, drift factor 0.60) it leaves -0.005, removes 75 % and comes closer (0.0082,
predicted 0.0085). So the pass (``output=True``, the default) also runs the plain quantized
sampler from each noise: with ``a`` the plain run's difference from the full-precision run after each step and
``b`` what the output correction changes (the corrected run minus the plain one), a share ``s`` of the correction
leaves ``a + s b`` to first order, and the share that brings the run closest to the full-precision one is
``-<a b> / <b b>``, kept within [0, 1] and applied only where it differs from 1 by more than ``z`` standard errors
over the noises (:attr:`qdrift.Calibration.output_scale`). The drift is then sized to ``<|a + s b|^2>``. The
pairing needs a model whose outputs are a function of its input: a model with random outputs (two calls on the
same input disagree) keeps the share at 1, with a warning.

Which part to size. The drift factor and the output share pull apart on the bench (``docs/bench_results.md``, "Which
part of the sizing helps"): on the U-Net (Euler 30, w4a4) the factor is what brings the samples closer to FP than
uncorrected (mean square 0.0108 -> 0.0082; the share alone 0.0111), on the flow DiT (w3a4) it costs FID (13 -> 10 %
of the gap) where the share alone costs little. So both are sized by default (``SIZE_THE_DRIFT``), and
``drift=False`` sizes the share alone for a model where plain v2 checks closer (:func:`qdrift.check_correction`).

Cost: two sampler runs per batch (the full-precision and the quantized model, one call per evaluation each),
three with ``output`` (plus one quantized call); memory: the states of one batch at every step.
"""

from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import torch

from ..validation import flag, flag_arg
from .calibration import DRIFT_SCALE_Z, OUTPUT_TERMS, SIZE_THE_DRIFT, Calibration
from .check import _Sums
from .match import _run, check_pass, pass_batches

__all__ = ["size_drift", "host_sizes"]  # Accumulation, check_z, repeat_first_call, unsized: for PairedTrace.size_sampler

SIZE_FLOW_MODELS = False
"""Whether a host calibration's default sizing pass (``size_drift="auto"``) runs on a rectified-flow model (SD3,
FLUX). Measured on the bench flow DiT since the drift goes along the score (session 15): wherever the sizing changed
the correction it gave back less (Inception FID gap, n = 500: w4a4 9 -> 5 %, w3a4 25 -> 12 %) or left the samples
farther from the full-precision ones (FP4: 22 -> 18 % of the distance removed; quanto int4: -1.72 -> -1.23), and no
flow row did better with it (README, "Sizing, measured"; docs/bench_results.md, "The flow drift along the score",
"The formats people run, with v2"). On the U-Net (VE) it trades part of the recovery on a large gap for less
over-correction where there is no gap, so it stays on there."""


def host_sizes(who: str, size_drift: Any, flow: bool) -> bool:
    """Whether a host's in-app calibration runs the sizing pass: ``size_drift`` True (always), False (never) or
    ``"auto"`` (the hosts' default: every model but a rectified flow, :data:`SIZE_FLOW_MODELS`). ``flow``: the
    calibrated model is a rectified flow. Anything else is a ``ValueError`` naming ``who``."""
    if isinstance(size_drift, str) and size_drift == "auto":
        return not flow or SIZE_FLOW_MODELS
    out = flag(size_drift)
    if out is None:
        raise ValueError(f"{who}: size_drift must be True, False or 'auto', got {size_drift!r:.80}")
    return out


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
    output: bool = True,
    drift: bool = SIZE_THE_DRIFT,
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
            factor everywhere (and to the output correction's share, see ``output``).
        output: also size v2's output correction (its gain, state term and bias; module docstring, "The output
            correction"): one more run of the quantized model per batch, without any correction.
        drift: size the drift (the factor on ``V``); False sizes the output correction alone (needs ``output``)
            and the drift keeps the surrogate's ``V`` (:attr:`~qdrift.Calibration.drift_scale` is then 1; the
            measured factor is still kept, for :meth:`~qdrift.Calibration.drift_scale_estimate`). The module
            docstring, "Which part to size", has the measurements.

    Returns:
        The calibration with ``meta["drift_scale"]`` set: per channel the measured sum's mean over the
        noises and the mean of its square (``measured``, ``measured_sq``) and the predicted sum
        (``predicted``), ``K``, ``z``, ``sampler``, ``steps`` and ``seconds``; with ``output``, the statistics
        of the output correction's share (``output``; :attr:`~qdrift.Calibration.output_scale`). Method ``v2`` (the
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
    output, drift = check_parts("size_drift", output, drift)
    sizing = Accumulation("size_drift", len(sigmas) - 1)
    base = unsized(calibration)
    runs = [("fp", model_fp, None)] + ([("plain", model_q, None)] if output else []) + [("q", model_q, base)]
    for b, xb, args in pass_batches("size_drift", calibration, x, extra_args, batch_size):
        after: Dict[str, List[torch.Tensor]] = {}
        for label, model, V in runs:
            seen: List[torch.Tensor] = []
            first: List[Dict[str, Any]] = []

            def callback(d, seen=seen, first=first):
                seen.append(d["x"].detach())
                if not first:
                    first.append(d)

            options = dict(sampler_kwargs or {}, extra_args=args, disable=True, callback=callback)
            if V is not None:
                options["method"] = "v2"
            with recording() as plans, undrifted():
                out = _run(info, model, xb, sigmas, V, seed + b, options)
            after[label] = sizing.states_after(label, seen, out)
            if V is not None:
                trace = plans[-1].trace
            elif label == "plain":  # the same call again: a model whose outputs are random cannot be paired
                sizing.check_repeatable(*repeat_first_call(model_q, first[0], args))
        sizing.add(after["fp"], after["q"], trace, calibration.channels, after.get("plain"))
    return sizing.sized(calibration, info.name, z, drift=drift)


def check_parts(who: str, output: Any, drift: Any) -> tuple:
    """The sizing's parts ``(output, drift)`` as bools; refuses a flag that is not one, and a sizing of nothing
    (``drift=False`` without ``output``)."""
    output, drift = flag_arg(who, "output", output), flag_arg(who, "drift", drift)
    if not (drift or output):
        raise ValueError(f"{who}: drift=False sizes only the output correction, which needs output=True "
                         "(with both False there is nothing to size)")
    return output, drift


def repeat_first_call(model: Callable, first: Dict[str, Any], extra_args: Optional[Dict[str, Any]]):
    """The first call's output (from a sampler's first callback ``{"x", "sigma_hat", "denoised", ...}``) and the
    model's output for the same call made again, as the samplers make it (``sigma_hat * ones(B)``)."""
    x = first["x"]
    return first["denoised"], model(x, first["sigma_hat"] * x.new_ones([x.shape[0]]), **(extra_args or {}))


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
    prediction (:func:`size_drift`; :meth:`qdrift.calib.PairedTrace.size_sampler`). With the plain quantized
    run's states as well, the differences are kept split as ``a = x_plain - x_fp`` and ``b = x_q - x_plain``
    (their mean products ``a a``, ``a b``, ``b b``), which size the output correction."""

    def __init__(self, who: str, steps: int):
        self.who, self.steps, self.started = who, steps, time.time()
        self.fp = _Sums()
        self.per_sample: List[torch.Tensor] = []  # per batch [S, B, C] (or [S, B, C, 3]: aa, ab, bb)
        self.predicted: Optional[torch.Tensor] = None
        self.count = 0
        self.random = False  # the quantized model gave two outputs for one input (see check_repeatable)

    def check_repeatable(self, first: torch.Tensor, again: torch.Tensor) -> None:
        """Compares two outputs of the quantized model for the same input (the plain run's first call and a repeat
        of it). The output correction's share is measured from paired runs, which a model with random outputs
        (a planted-noise stand-in, dropout left on, stochastic rounding) does not give: the two quantized runs
        would differ by the model's own randomness, and the share would read about 1/2 whatever the correction
        does. Such a model keeps the share at 1 (:meth:`sized` warns)."""
        diff = (first.double() - again.double().to(first.device)).pow(2).mean().sqrt()
        if not bool(diff <= 1e-3 * first.double().pow(2).mean().sqrt()):  # kernels that are not bitwise repeatable
            self.random = True

    def states_after(self, label: str, seen: List[torch.Tensor], out: torch.Tensor) -> List[torch.Tensor]:
        """The state after each step, from a run's callback states (before each step) and its result."""
        if len(seen) != self.steps:
            raise RuntimeError(f"{self.who}: the {label} run reported {len(seen)} steps of {self.steps}")
        return seen[1:] + [out.detach()]

    def add(self, fp_after: List[torch.Tensor], q_after: List[torch.Tensor], trace: List[Dict[str, Any]],
            channels: int, plain_after: Optional[List[torch.Tensor]] = None) -> None:
        """One batch: the runs' states after each step (full precision, output-corrected quantized and, to size
        the output correction, plain quantized) and the undrifted v2 plan's trace."""
        if self.per_sample and (plain_after is None) != (self.per_sample[0].ndim == 3):
            raise ValueError(f"{self.who}: every sizing run must come with the plain quantized run's states, or none")
        self.fp.add(fp_after, fp_after)

        def mean_product(u, v):
            return (u * v).reshape(*u.shape[:2], -1).mean(2)

        rows = []
        for i, (q, f) in enumerate(zip(q_after, fp_after)):
            q, f = q.double(), f.double()
            if plain_after is None:
                rows.append(mean_product(q - f, q - f))
            else:
                a, b = plain_after[i].double() - f, q - plain_after[i].double()
                rows.append(torch.stack([mean_product(a, a), mean_product(a, b), mean_product(b, b)], -1))
        self.per_sample.append(torch.stack(rows))
        self.predicted = _predicted_by_step(trace, self.steps, channels)
        self.count += fp_after[0].shape[0]

    def sized(self, calibration: Calibration, sampler: str, z: float, drift: bool = True) -> Calibration:
        """``calibration`` with ``meta["drift_scale"]`` from the batches added (see :func:`size_drift`; ``drift``
        False: only the output correction is sized)."""
        if self.count == 0:
            raise ValueError(f"{self.who}: x held no batches")
        var_fp = self.fp.var()
        rows = ~torch.isnan(self.predicted).any(1) & (var_fp > 0).all(1)
        if not bool(rows.any()):
            raise ValueError(f"{self.who}: the {sampler} run's v2 plan predicted no step (is the calibration's "
                             "error model empty, or the schedule a single step to 0 with no variance?)")
        # each sample's accumulation [K, C] (or its parts [K, C, 3]): their mean is the measured sum, their
        # spread its standard error
        weight = var_fp[rows].unsqueeze(1)
        per = torch.cat(self.per_sample, 1)[rows]
        each = (per / (weight.unsqueeze(-1) if per.ndim == 4 else weight)).sum(0)
        expected = (self.predicted[rows] / var_fp[rows]).sum(0)
        meta = dict(calibration.meta)
        info = {}
        paired = per.ndim == 4
        if not drift and not paired:
            raise ValueError(f"{self.who}: drift=False sizes only the output correction, which needs the plain "
                             "quantized run's states with every sizing run (output=True)")
        if paired:  # the corrected run's own: |a + b|^2 = aa + 2 ab + bb
            parts, each = each, (each[..., 0] + 2 * each[..., 1] + each[..., 2]).clamp(min=0)
        if paired and self.random:
            rest = "the drift is" if drift else "and with drift=False nothing is: the calibration is returned unsized"
            warnings.warn(f"{self.who}: the quantized model's outputs differ between two calls on the same input, so "
                          "its plain and corrected runs cannot be paired; the output correction is not sized (share "
                          f"1), {rest}", stacklevel=3)
        elif paired:
            info["output"] = {name: parts[..., i].mean(0).tolist() for i, name in enumerate(OUTPUT_TERMS[:3])}
            for name, (i, j) in zip(OUTPUT_TERMS[3:], ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
                info["output"][name] = (parts[..., i] * parts[..., j]).mean(0).tolist()
        if not drift and "output" not in info:  # nothing was sized (the warning above says why)
            return unsized(calibration)
        meta["drift_scale"] = {
            "measured": each.mean(0).tolist(),
            "measured_sq": each.pow(2).mean(0).tolist(),
            "predicted": expected.clamp(min=0).tolist(),
            "K": self.count,
            "z": float(z),
            "sampler": sampler,
            "steps": self.steps,
            "seconds": round(time.time() - self.started, 3),
            **info,
            **({} if drift else {"drift": False}),
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
