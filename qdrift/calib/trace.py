"""Two-pass paired calibration: record the full-precision trajectory, then evaluate the quantized model on it.

Q-Drift's calibration (arXiv 2603.18095, Sec. 3.1) evaluates the full-precision and the quantized model on
the same states ``x_i`` of the full-precision Euler trajectory and fits the joint Gaussian of
``(d_hat, delta)`` per step. :func:`qdrift.calibrate` does it with both models in memory. When they do not fit
together (two large checkpoints), or a host application loads one checkpoint at a time and owns the guidance
(CFG), the pairs are taken in two passes, here as k-diffusion samplers:

1. **record**: :meth:`PairedTrace.fp_sampler` is a k-diffusion sampler that runs Euler with the
   full-precision (guided) denoiser and stores ``x_i`` and ``D_fp(x_i)`` per step;
2. **replay**: :meth:`PairedTrace.q_sampler` is a k-diffusion sampler that ignores its own trajectory and
   evaluates the quantized (guided) denoiser on the recorded ``x_i``, storing ``D_q(x_i)``.

Optionally, a third pass sizes Q-Drift v2's drift to the error the quantized sampler really accumulates
(:meth:`PairedTrace.size_sampler`, :meth:`PairedTrace.sized`; :func:`qdrift.size_drift` with both models in
hand): the quantized model samples Euler from the recorded runs' noises, plain and with v2's output correction
(no drift), and the states are compared with the recorded full-precision ones; the pair sizes the output
correction, the corrected run the drift.

:meth:`PairedTrace.calibration` then forms ``d = (x - D) / sigma`` for both and feeds the same accumulator
as :func:`qdrift.calibrate` (:class:`qdrift.calib.stats.PairedAccumulator`: per-(step, channel) moments with
delta outliers trimmed per sample, and the cross-step sums Q-Drift v2 needs), so a trace gives the same
calibration as ``calibrate`` on the same trajectories. Hosts (ComfyUI, Forge/A1111, diffusers) use it through
:mod:`qdrift.hosts` and :mod:`qdrift.diffusers`. A trace can be
saved between the passes (safetensors + JSON metadata, never pickle), so the passes may be two separate
generations in a host UI.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._utils import to_d
from .._version import __version__
from ..validation import CheckedModel, all_finite, flag_arg, validate_sampler_inputs
from .calibration import DRIFT_SCALE_Z, REDUCES, SIZE_THE_DRIFT, Calibration, write_atomic
from .run import check_bands
from .stats import PairedAccumulator

try:  # tqdm is a core dependency; the fallback keeps this module importable in stripped hosts
    from tqdm.auto import trange
except ImportError:  # pragma: no cover
    def trange(n, disable=None):
        return range(n)

__all__ = ["PairedTrace", "PairedTraceError", "calibration_from_pairs"]

TRACE_FORMAT = "qdrift.paired_trace"
TRACE_VERSION = 1


class PairedTraceError(ValueError):
    """The two passes do not match (schedule, batch shape, starting noise), a pass's schedule or recorded data is
    invalid, or a trace file is invalid."""


def _step_where(who: str, i: int, sig: torch.Tensor, run: str = "") -> str:
    """``"who: [run, ]step i of S (sigma=...)"`` for messages about one recorded step."""
    return f"{who}: {run}step {i} of {sig.numel() - 1} (sigma={float(sig[i]):.6g})"


def _check_step(where: str, named: Sequence[Tuple[str, Any]], shape: Optional[torch.Size], error=ValueError):
    """Checks one step's recorded tensors (``named``: ``(name, tensor)`` pairs): each a floating-point tensor of
    ``shape`` (None: the first one's), finite (:func:`qdrift.validation.all_finite`, one reduction each).

    Returns:
        The shape they share.

    Raises:
        error: naming ``where`` and the bad tensor.
    """
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"a tensor of dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise error(f"{where}: {name} must be a floating-point tensor, got {got}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise error(
                f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} (x, D_fp and D_q share one "
                "shape [B, C, ...] at every step)"
            )
        if not all_finite(t):
            raise error(f"{where}: {name} holds NaN or inf")
    return shape


def calibration_from_pairs(
    sigmas: torch.Tensor,
    xs: Sequence[Sequence[torch.Tensor]],
    denoised_fp: Sequence[Sequence[torch.Tensor]],
    denoised_q: Sequence[Sequence[torch.Tensor]],
    *,
    reduce: str = "channel",
    conditional: bool = True,
    trim: Optional[float] = 4.0,
    meta: Optional[Dict[str, Any]] = None,
    bands: Union[int, str] = "auto",
) -> Calibration:
    """Builds a :class:`qdrift.Calibration` from recorded paired denoiser outputs.

    Args:
        sigmas: the schedule ``[S + 1]`` (the calibrated levels are ``sigmas[:S]``, all > 0).
        xs: per batch, the ``S`` states ``x_i`` ``[B, C, ...]`` the models were evaluated on.
        denoised_fp: per batch, ``D_fp(x_i)`` for each step, same shapes.
        denoised_q: per batch, ``D_q(x_i)`` for each step, same shapes.
        reduce: ``"channel"`` or ``"scalar"`` (one pooled V per step).
        conditional: V = Var(delta | d_hat) (True, the paper) or Var(delta).
        trim: delta outlier trimming in standard deviations (the authors use 4); None or 0 keeps all.
        meta: extra JSON-serializable metadata stored in the calibration.
        bands: also the statistics per radial frequency band (see :func:`qdrift.calibrate`; default ``"auto"``:
            four, or as many as the grid holds; 1 without spatial axes).

    Returns:
        The calibration (``K`` in its metadata is the number of trajectories).

    Raises:
        ValueError: if the lists are empty or ragged, a step's x, D_fp and D_q are not finite floating-point
            tensors of one shape (naming the batch and step), the schedule is not finite, >= 0 and strictly
            decreasing, or an option is invalid.
    """
    who = "calibration_from_pairs"
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    conditional = flag_arg(who, "conditional", conditional)
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if sig.ndim != 1 or sig.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sig.shape)}")
    steps = sig.numel() - 1
    if not xs or len(xs) != len(denoised_fp) or len(xs) != len(denoised_q):
        raise ValueError(
            f"need the same number (>= 1) of batches of x, D_fp and D_q, got {len(xs)}, {len(denoised_fp)}, "
            f"{len(denoised_q)}"
        )
    for b, (xb, fb, qb) in enumerate(zip(xs, denoised_fp, denoised_q)):
        if not (len(xb) == len(fb) == len(qb) == steps):
            raise ValueError(
                f"batch {b}: expected {steps} steps of x, D_fp and D_q, got {len(xb)}, {len(fb)}, {len(qb)}"
            )
        shape = None
        for i in range(steps):
            shape = _check_step(_step_where(who, i, sig, f"batch {b}, "),
                                (("x", xb[i]), ("D_fp", fb[i]), ("D_q", qb[i])), shape)
    validate_sampler_inputs(xs[0][0], sig, who)  # the schedule: finite, >= 0, strictly decreasing
    acc = PairedAccumulator(trim, check_bands(who, bands, xs[0][0].shape[2:]))
    for xb, fb, qb in zip(xs, denoised_fp, denoised_q):
        x = torch.stack([t.to(torch.float64) for t in xb])
        d_fp = to_d(x, sig[:steps], torch.stack(list(fb)).to(x))
        d_q = to_d(x, sig[:steps], torch.stack(list(qb)).to(x))
        acc.add(x, d_fp, d_q, who=who)
    info = {"K": acc.count, "trim": trim, "source": "qdrift.calib.trace", "qdrift_version": __version__}
    info.update(meta or {})
    return Calibration.from_accumulator(sig[:steps].clone(), acc, reduce, conditional, info)


class PairedTrace:
    """Records a full-precision Euler pass and replays its states for the quantized model.

    Each call of :meth:`fp_sampler`'s function records one batch (a "run"); each call of :meth:`q_sampler`'s
    function replays the next recorded run, in order. All runs share one schedule.

    Attributes:
        sigmas: the schedule ``[S + 1]`` (float64, CPU) or None before the first run.
        runs: per run, a dict with ``x`` (``[S, B, C, ...]``, the states), ``fp`` (``D_fp``, same shape),
            ``q`` (``D_q`` or None until replayed) and ``final`` (``[B, C, ...]``, the FP Euler result).
        meta: free JSON-serializable metadata (seeds, prompts, checkpoint names) kept with a saved trace.
    """

    def __init__(self, meta: Optional[Dict[str, Any]] = None):
        self.sigmas: Optional[torch.Tensor] = None
        self.runs: List[Dict[str, Optional[torch.Tensor]]] = []
        self.meta: Dict[str, Any] = dict(meta or {})
        self._replayed = 0
        self._sizing: Optional[Dict[str, Any]] = None  # the third pass (size_sampler)

    # ------------------------------------------------------------------ state
    @property
    def steps(self) -> int:
        """Number of recorded steps ``S`` (0 before the first run)."""
        return 0 if self.sigmas is None else self.sigmas.numel() - 1

    @property
    def replayed(self) -> int:
        """How many runs have their quantized outputs."""
        return sum(r["q"] is not None for r in self.runs)

    @property
    def complete(self) -> bool:
        """True when every recorded run has been replayed with the quantized model."""
        return bool(self.runs) and self.replayed == len(self.runs)

    def reset_replay(self) -> None:
        """Forgets the quantized outputs, so the runs can be replayed again (e.g. with another model)."""
        for r in self.runs:
            r["q"] = None
        self._replayed = 0

    @staticmethod
    def _schedule(sigmas: torch.Tensor, who: str) -> torch.Tensor:
        """The schedule as float64 on the CPU (its values not yet checked)."""
        if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
            raise PairedTraceError(f"{who}: sigmas must be a 1-D tensor with at least 2 values")
        return sigmas.detach().to("cpu", torch.float64)

    def _check_schedule(self, sigmas: torch.Tensor, who: str, x: torch.Tensor) -> torch.Tensor:
        """Checks a pass's schedule and starting sample as the core samplers do (finite, >= 0 and strictly
        decreasing; ``x`` a finite floating-point ``[B, C, ...]``), then against the recorded schedule (the first
        pass records it)."""
        sig = self._schedule(sigmas, who)
        try:
            validate_sampler_inputs(x, sig, who)
        except ValueError as e:
            raise PairedTraceError(str(e)) from None
        if self.sigmas is None:
            self.sigmas = sig
        elif sig.shape != self.sigmas.shape or not torch.allclose(sig, self.sigmas, rtol=1e-5, atol=1e-8):
            raise PairedTraceError(
                f"{who}: this pass uses a different schedule ({sig.numel() - 1} steps, sigma {float(sig[0]):.5g}.."
                f"{float(sig[-2]):.5g}) than the recorded one ({self.steps} steps, sigma {float(self.sigmas[0]):.5g}.."
                f"{float(self.sigmas[-2]):.5g}): use the same steps, scheduler and denoise in both passes"
            )
        return sig

    # ------------------------------------------------------------------ the two passes, as k-diffusion samplers
    def fp_sampler(self):
        """A k-diffusion sampler that runs full-precision Euler and records one run per call.

        Returns:
            ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x_final``.
        """

        @torch.no_grad()
        def sample_qdrift_record_fp(model, x, sigmas, extra_args=None, callback=None, disable=None, **_unused):
            who = "Q-Drift calibration (full-precision pass)"
            sig = self._check_schedule(sigmas, who, x)
            checked = CheckedModel(model, who, sig.tolist())  # each output: x's shape, floating, device, finite
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            xs, fps = [], []
            for i in trange(len(sig) - 1, disable=disable):
                denoised = checked(x, sigmas[i] * s_in, **extra_args)
                xs.append(x.detach().to("cpu", torch.float32))
                fps.append(denoised.detach().to("cpu", torch.float32))
                if callback is not None:
                    callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
                # Full-precision Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_fp (the calibration trajectory).
                x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            x = checked.final(x)  # the host never gets a NaN image back
            self.runs.append(
                {"x": torch.stack(xs), "fp": torch.stack(fps), "q": None, "final": x.detach().to("cpu", torch.float32)}
            )
            return x

        return sample_qdrift_record_fp

    def q_sampler(self, *, atol: float = 1e-3):
        """A k-diffusion sampler that evaluates the (quantized) model on the next recorded run's states.

        Its own ``x`` must be the same starting noise as the recorded run (same seed, size and schedule);
        it returns the recorded full-precision result, so the host shows a normal image.

        Args:
            atol: tolerance (relative to the noise scale ``sigmas[0]``) for the starting-noise check.

        Returns:
            ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x_final``.
        """

        @torch.no_grad()
        def sample_qdrift_replay_q(model, x, sigmas, extra_args=None, callback=None, disable=None, **_unused):
            who = "Q-Drift calibration (quantized pass)"
            run = self._recorded_run(self._replayed, x, sigmas, who, atol, "replayed")
            checked = CheckedModel(model, who, self.sigmas.tolist())
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            qs = []
            for i in trange(self.steps, disable=disable):
                xi = run["x"][i].to(device=x.device, dtype=x.dtype)
                denoised = checked(xi, sigmas[i] * s_in, **extra_args)
                qs.append(denoised.detach().to("cpu", torch.float32))
                if callback is not None:
                    callback({"x": xi, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            run["q"] = torch.stack(qs)
            self._replayed += 1
            return run["final"].to(device=x.device, dtype=x.dtype)

        return sample_qdrift_replay_q

    def _recorded_run(self, index: int, x: torch.Tensor, sigmas: torch.Tensor, who: str, atol: float, done: str):
        """The recorded run a later pass's call ``index`` belongs to, checked against the call's schedule, batch
        shape and starting noise."""
        if index >= len(self.runs):
            raise PairedTraceError(
                f"{who}: all {len(self.runs)} recorded run(s) are already {done}; run the full-precision "
                "pass first, with the same batch count and size"
            )
        self._check_schedule(sigmas, who, x)
        run = self.runs[index]
        if tuple(run["x"].shape[1:]) != tuple(x.shape):
            raise PairedTraceError(
                f"{who}: batch shape {tuple(x.shape)} differs from the recorded {tuple(run['x'].shape[1:])}: use "
                "the same size and batch size in every pass"
            )
        scale = max(float(sigmas[0]), 1.0)
        gap = float((x.detach().to("cpu", torch.float32) - run["x"][0]).abs().max())
        if gap > atol * scale:
            raise PairedTraceError(
                f"{who}: the starting noise differs from the recorded run (max difference {gap:.3g}): use the "
                "same seed(s) in every pass"
            )
        return run

    # ------------------------------------------------------------------ the optional third pass: sizing
    def size_sampler(self, calibration: Calibration, *, z: float = DRIFT_SCALE_Z, atol: float = 1e-3,
                     output: bool = True, drift: bool = SIZE_THE_DRIFT):
        """A k-diffusion sampler for a third pass that sizes Q-Drift v2's drift (:func:`qdrift.size_drift`) on
        the recorded runs; :meth:`sized` then gives the sized calibration.

        Each call samples with the quantized (guided) model: qdrift Euler with v2's output correction and no
        drift (:func:`qdrift.plan.undrifted`), from the next recorded run's starting noise (same seed, size and
        schedule as the full-precision pass), and compares its state after every step with the recorded
        full-precision Euler state, as :func:`qdrift.size_drift` does with both models in hand. It returns its
        own sample (the output-corrected quantized image). With ``output`` each call first samples the plain
        quantized Euler run from the same noise as well (twice the model calls), which sizes the output
        correction (:attr:`qdrift.Calibration.output_scale`). The sizing is kept in memory only (not in
        :meth:`save`); calling :meth:`size_sampler` again starts a new sizing.

        Args:
            calibration: the calibration of these runs (:meth:`calibration`; the options you sample with).
            z: see :func:`qdrift.size_drift`.
            atol: tolerance for the starting-noise check (as :meth:`q_sampler`).
            output: also size the output correction (see :func:`qdrift.size_drift`).
            drift: size the drift too (see :func:`qdrift.size_drift`; False needs ``output``).

        Returns:
            ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x_final``.

        Raises:
            ValueError: for a calibration that is not a :class:`qdrift.Calibration` or a bad ``z``.
        """
        from ..plan import recording, undrifted
        from ..samplers import sample_euler_qdrift
        from .size import check_parts, repeat_first_call

        output, drift = check_parts("Q-Drift calibration (sizing pass)", output, drift)
        base = self.begin_sizing(calibration, z=z, drift=drift)
        who = "Q-Drift calibration (sizing pass)"

        @torch.no_grad()
        def sample_qdrift_size_q(model, x, sigmas, extra_args=None, callback=None, disable=None, **_unused):
            self._recorded_run(self.sized_runs, x, sigmas, who, atol, "sized")

            first: List[Dict[str, Any]] = []

            def states(V, report):
                seen: List[torch.Tensor] = []

                def record(info):
                    seen.append(info["x"].detach().to("cpu", torch.float32))
                    if not first:
                        first.append(info)
                    if report and callback is not None:
                        callback(info)

                with recording() as plans, undrifted():
                    out = sample_euler_qdrift(model, x, sigmas, V, extra_args=extra_args, callback=record,
                                              disable=disable, **({"method": "v2"} if V is not None else {}))
                return seen + [out.detach().to("cpu", torch.float32)], plans, out

            plain, repeat = None, None
            if output:
                plain = states(None, False)[0]
                repeat = repeat_first_call(model, first[0], extra_args)
            seen, plans, out = states(base, True)
            self.add_sized_run(seen, plans[-1].trace, plain, repeat=repeat)
            return out

        return sample_qdrift_size_q

    def begin_sizing(self, calibration: Calibration, *, z: float = DRIFT_SCALE_Z,
                     drift: bool = SIZE_THE_DRIFT) -> Calibration:
        """Starts a sizing of ``calibration`` on the recorded runs (for hosts that run the sizing pass outside a
        k-diffusion sampler; :meth:`size_sampler` does it for those that do): each sizing run is an Euler run of
        the quantized model with ``method="v2"`` inside :func:`qdrift.plan.undrifted` and
        :func:`qdrift.plan.recording`, from a recorded run's starting noise, given to :meth:`add_sized_run`.
        ``drift``: size the drift too (:func:`qdrift.size_drift`; False needs the plain runs in
        :meth:`add_sized_run`).

        Returns:
            The calibration to run them with (``calibration`` without a previous sizing).

        Raises:
            ValueError: for a calibration that is not a :class:`qdrift.Calibration` or a bad ``z``.
        """
        from .size import Accumulation, check_z, unsized

        who = "Q-Drift calibration (sizing pass)"
        if not isinstance(calibration, Calibration):
            raise ValueError(f"{who}: calibration must be a qdrift.Calibration, got {type(calibration).__name__}")
        check_z(who, z)
        self._sizing = {"calibration": calibration, "z": float(z), "drift": flag_arg(who, "drift", drift), "runs": 0, "plain": None,
                        "sums": Accumulation(who, self.steps)}
        return unsized(calibration)

    def add_sized_run(self, states: Sequence[torch.Tensor], plan_trace: List[Dict[str, Any]],
                      plain: Optional[Sequence[torch.Tensor]] = None,
                      repeat: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Adds the next sizing run: its states before each step and its result (``S + 1`` tensors
        ``[B, C, ...]``, the recorded run's layout) and its v2 plan's ``trace``; ``plain``: the same for the plain
        quantized Euler run from the same noise (no correction), which sizes the output correction
        (:attr:`qdrift.Calibration.output_scale`; give it for every run of a sizing or for none), with ``repeat``:
        the quantized model's output for the first step's input from two separate calls (a model whose outputs
        differ cannot be paired, and its output correction is then not sized).

        Raises:
            PairedTraceError: before :meth:`begin_sizing`, past the last recorded run, or for states that do not
                match the run (count, shape, starting noise).
        """
        sizing = self._sizing
        if sizing is None:
            raise PairedTraceError("PairedTrace.add_sized_run: call begin_sizing(calibration) first")
        who = "Q-Drift calibration (sizing pass)"
        if not states:
            raise PairedTraceError(f"{who}: no states given")
        run = self._recorded_run(sizing["runs"], states[0], self.sigmas, who, 1e-3, "sized")
        runs = {"sizing run": states} if plain is None else {"sizing run": states, "plain run": plain}
        for name, given in runs.items():
            given = list(given) if isinstance(given, (list, tuple)) else []
            shapes = sorted({tuple(getattr(t, "shape", ())) for t in given})
            if len(given) != self.steps + 1 or shapes != [tuple(run["final"].shape)] or not all(
                    isinstance(t, torch.Tensor) for t in given):
                raise PairedTraceError(
                    f"{who}: the {name} needs {self.steps + 1} states of shape {tuple(run['final'].shape)} (before "
                    f"each step, then the result), got {len(given)} of shapes {shapes!r:.120}"
                )
        if plain is not None:
            self._recorded_run(sizing["runs"], plain[0], self.sigmas, who, 1e-3, "sized")
        if sizing["runs"] and sizing["plain"] != (plain is not None):
            raise PairedTraceError(f"{who}: give the plain run's states with every sizing run of a sizing, or with none")
        sizing["plain"] = plain is not None
        if repeat is not None:
            sizing["sums"].check_repeatable(*repeat)
        cpu = lambda ts: [t.detach().to("cpu", torch.float32) for t in ts]  # noqa: E731
        fp_after = list(run["x"][1:]) + [run["final"]]
        sizing["sums"].add(fp_after, cpu(states)[1:], plan_trace, sizing["calibration"].channels,
                           None if plain is None else cpu(plain)[1:])
        sizing["runs"] += 1

    @property
    def sized_runs(self) -> int:
        """How many runs the current sizing (:meth:`size_sampler`, :meth:`begin_sizing`) has sized."""
        return 0 if self._sizing is None else self._sizing["runs"]

    def sized(self) -> Calibration:
        """The calibration given to :meth:`size_sampler` (or :meth:`begin_sizing`), with the drift sized on the
        runs made since.

        Raises:
            PairedTraceError: if no sizing run was made.
        """
        sizing = self._sizing
        if sizing is None or sizing["runs"] == 0:
            raise PairedTraceError("no sizing run yet: after the two passes, sample the quantized model with "
                                   "PairedTrace.size_sampler(calibration), then call sized()")
        return sizing["sums"].sized(sizing["calibration"], "euler", sizing["z"], drift=sizing["drift"])

    # ------------------------------------------------------------------ direct recording (diffusers)
    def add_run(self, sigmas: torch.Tensor, xs: Sequence[torch.Tensor], denoised_fp: Sequence[torch.Tensor], final: torch.Tensor) -> int:
        """Adds a recorded full-precision run (for hosts that record outside a k-diffusion sampler).

        Returns:
            The run's index.

        Raises:
            PairedTraceError: for a schedule that is not finite, >= 0 and strictly decreasing or differs from the
                recorded one, or for states, outputs and result that are not finite floating-point tensors of one
                shape (naming the step).
        """
        who = "PairedTrace.add_run"
        sig = self._schedule(sigmas, who)
        steps = sig.numel() - 1
        if len(xs) != steps or len(denoised_fp) != steps:
            raise PairedTraceError(f"{who}: expected {steps} states and outputs, got {len(xs)}, {len(denoised_fp)}")
        shape = None
        for i in range(steps):
            shape = _check_step(_step_where(who, i, sig), (("x", xs[i]), ("D_fp", denoised_fp[i])), shape,
                                PairedTraceError)
        _check_step(who, (("the result (final)", final),), shape, PairedTraceError)
        self._check_schedule(sigmas, who, xs[0])
        self.runs.append(
            {
                "x": torch.stack([t.detach().to("cpu", torch.float32) for t in xs]),
                "fp": torch.stack([t.detach().to("cpu", torch.float32) for t in denoised_fp]),
                "q": None,
                "final": final.detach().to("cpu", torch.float32),
            }
        )
        return len(self.runs) - 1

    def set_q(self, run: int, denoised_q: Sequence[torch.Tensor]) -> None:
        """Stores the quantized outputs of run ``run`` (one ``[B, C, ...]`` per step).

        Raises:
            PairedTraceError: for no such run, or outputs that are not finite floating-point tensors of the run's
                shape (naming the step).
        """
        if not 0 <= run < len(self.runs):
            raise PairedTraceError(f"PairedTrace.set_q: no run {run} (have {len(self.runs)})")
        if len(denoised_q) != self.steps:
            raise PairedTraceError(f"PairedTrace.set_q: expected {self.steps} outputs, got {len(denoised_q)}")
        shape = self.runs[run]["x"].shape[1:]
        for i in range(self.steps):
            _check_step(_step_where("PairedTrace.set_q", i, self.sigmas, f"run {run}, "), (("D_q", denoised_q[i]),),
                        shape, PairedTraceError)
        q = torch.stack([t.detach().to("cpu", torch.float32) for t in denoised_q])
        if q.shape != self.runs[run]["fp"].shape:
            raise PairedTraceError(f"PairedTrace.set_q: shape {tuple(q.shape)} != recorded {tuple(self.runs[run]['fp'].shape)}")
        self.runs[run]["q"] = q

    # ------------------------------------------------------------------ result
    def calibration(
        self,
        *,
        reduce: str = "channel",
        conditional: bool = True,
        trim: Optional[float] = 4.0,
        meta: Optional[Dict[str, Any]] = None,
        bands: Union[int, str] = "auto",
    ) -> Calibration:
        """The :class:`qdrift.Calibration` of every replayed run (``bands``: see :func:`calibration_from_pairs`).

        Raises:
            PairedTraceError: if no run was replayed yet.
        """
        done = [r for r in self.runs if r["q"] is not None]
        if not done:
            raise PairedTraceError(
                "no paired data yet: record the full-precision pass, then replay it with the quantized model"
            )
        info = dict(self.meta)
        info.update(meta or {})
        return calibration_from_pairs(
            self.sigmas,
            [list(r["x"]) for r in done],
            [list(r["fp"]) for r in done],
            [list(r["q"]) for r in done],
            reduce=reduce,
            conditional=conditional,
            trim=trim,
            meta=info,
            bands=bands,
        )

    # ------------------------------------------------------------------ file
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the trace (safetensors + JSON metadata; no pickle), next to ``path`` and renamed into place.

        Raises:
            PairedTraceError: if nothing is recorded yet.
            OSError: (its errno subclass) naming the path, if the file cannot be written.
        """
        from safetensors.torch import save

        if self.sigmas is None:
            raise PairedTraceError("PairedTrace.save: nothing recorded yet")
        tensors = {"sigmas": self.sigmas.contiguous()}
        for k, r in enumerate(self.runs):
            for f in ("x", "fp", "q", "final"):
                if r[f] is not None:
                    tensors[f"run{k}.{f}"] = r[f].contiguous()
        header = {"format": TRACE_FORMAT, "format_version": TRACE_VERSION, "runs": len(self.runs), "meta": self.meta}
        write_atomic(os.fspath(path), save(tensors, metadata={"qdrift": json.dumps(header, default=str)}),
                     "PairedTrace.save")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PairedTrace":
        """Reads a trace written by :meth:`save`.

        Raises:
            FileNotFoundError: if there is no such file.
            PairedTraceError: if it is not a valid qdrift paired trace.
        """
        from safetensors import safe_open

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"PairedTrace.load: path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        if os.path.isdir(path):
            raise PairedTraceError(f"{path} is a directory, not a qdrift paired trace file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Q-Drift trace file not found: {os.path.abspath(path)}")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("qdrift")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            header = json.loads(raw or "null")
        except Exception as e:  # corrupt header or JSON
            raise PairedTraceError(f"{path} is not a readable qdrift paired trace ({e})") from None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise PairedTraceError(f"{path} is not a qdrift paired trace (format {TRACE_FORMAT!r})")
        version = header.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= TRACE_VERSION:
            raise PairedTraceError(f"{path} has trace format_version {version!r}; this qdrift reads 1 to {TRACE_VERSION}")
        runs, meta = header.get("runs", 0), header.get("meta") or {}
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
            raise PairedTraceError(f"{path} has 'runs' = {runs!r:.40}, not a count (an integer >= 0)")
        if not isinstance(meta, dict):
            raise PairedTraceError(f"{path} has metadata 'meta' of type {type(meta).__name__}, not an object")
        for name, t in tensors.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise PairedTraceError(f"{path}: tensor {name!r} is not finite floating point")
        trace = cls(meta=meta)
        if "sigmas" not in tensors or tensors["sigmas"].ndim != 1 or len(tensors["sigmas"]) < 2:
            raise PairedTraceError(f"{path} lacks its schedule (a 1-D 'sigmas' of at least two levels)")
        trace.sigmas = tensors["sigmas"].to(torch.float64)
        for k in range(runs):
            run = {f: tensors.get(f"run{k}.{f}") for f in ("x", "fp", "q", "final")}
            if run["x"] is None or run["fp"] is None or run["final"] is None:
                raise PairedTraceError(f"{path}: run {k} is incomplete")
            x = run["x"]
            if (x.ndim < 3 or x.shape[0] != trace.steps or run["fp"].shape != x.shape
                    or run["final"].shape != x.shape[1:] or (run["q"] is not None and run["q"].shape != x.shape)):
                raise PairedTraceError(
                    f"{path}: run {k} has inconsistent shapes (x {tuple(x.shape)}, fp {tuple(run['fp'].shape)}, "
                    f"final {tuple(run['final'].shape)}; expected x and fp [{trace.steps}, B, C, ...], final [B, C, ...])"
                )
            trace.runs.append(run)
        trace._replayed = 0
        while trace._replayed < len(trace.runs) and trace.runs[trace._replayed]["q"] is not None:
            trace._replayed += 1
        return trace
