"""Q-Drift for diffusers schedulers: subclasses that rescale each step's deterministic increment.

Each class is the diffusers scheduler with one change in ``step``: after the plain step, the deterministic
increment ``delta_x`` of that step is scaled by ``(1 + c_i)`` (Q-Drift, arXiv 2603.18095, Eq. 12),

    prev_sample = plain_prev_sample + c_i * delta_x,     c_i = |sigma_eff - sigma_i| V_i / (2 sigma_i)

where ``V_i`` is the calibrated ``Var(delta | d_hat)`` at ``sigma_i`` (channel-wise, looked up with
:meth:`qdrift.Calibration.at`), and, per family:

- ``EulerDiscreteScheduler`` (VE sigma, ``x = x0 + sigma eps``): ``delta_x = dt * (x - x0_pred) / sigma``,
  ``sigma_eff = sigma_{i+1}``;
- ``EulerAncestralDiscreteScheduler``: the same with ``sigma_eff = sigma_down``; the ancestral noise is
  unchanged under the paper's method (Sec. 3.2); under the exact methods (v2) it is lowered per channel by what a
  bounded drift, or one without a root, leaves, as the core's ``sample_euler_ancestral_qdrift`` does (the noise
  the scheduler drew is ``prev_sample - sample - delta_x``, and only its scale changes);
- ``FlowMatchEulerDiscreteScheduler`` (sigma = flow time t): ``delta_x = dt * v``; the paper calls this
  case a heuristic (marginal preservation holds for probability-flow parameterizations);
- ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``: in ``y = x / alpha_t`` space the
  whole increment is scaled, ``y_next = y + (1 + c)(y_next_base - y)`` (the authors' code; paper Eq. 44-45),
  with the first-order ``c`` above in VE sigma ``sigma_t / alpha_t``.

With ``V = 0`` (or no calibration, or ``strength = 0``) every class returns exactly what the plain
scheduler returns. The V of a calibration must be in the same space as the scheduler's sigmas: VE sigma
(eps-space error) for the first, second and fourth, flow time (velocity-space error) for flow matching;
:func:`qdrift.diffusers.calibrate_pipeline` produces exactly that.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Optional, Type

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from ..correction import DEFAULT_METHOD, METHODS, first_order_coefficient, scale_increment, scale_noise
from ..validation import all_finite, check_choice, check_knobs

__all__ = [
    "QDriftEulerDiscreteScheduler",
    "QDriftEulerAncestralDiscreteScheduler",
    "QDriftFlowMatchEulerDiscreteScheduler",
    "QDriftDPMSolverMultistepScheduler",
    "qdrift_scheduler",
    "SUPPORTED_SCHEDULERS",
]


class _QDriftMixin:
    """Shared state and ``step`` override. Subclasses provide :meth:`_qdrift_increment`."""

    _qdrift_V: Any = None
    _qdrift_strength: float = 1.0
    _qdrift_channel_dim: int = 1
    _qdrift_method: Optional[str] = None
    _qdrift_plan: Any = None
    _qdrift_run: Any = None  # (the schedule tensor the plan was built on, its first step, the next step expected)
    _qdrift_plans = True  # the Euler family runs the core's DriftPlan (every method); DPM++ the paper / matched rule
    _qdrift_lowers_noise = False  # the step adds fresh noise after its deterministic part, which the plan may lower
    _qdrift_flow = False  # sigma is flow time: v2's drift is along the score (qdrift.plan.DriftPlan)

    # ---------------------------------------------------------------- configuration
    def set_calibration(
        self, calibration: Any, *, strength: float = 1.0, channel_dim: int = 1, method: Optional[str] = None
    ) -> "_QDriftMixin":
        """Attaches the Q-Drift calibration (not part of the diffusers config; set it after ``from_config``).

        Args:
            calibration: None (plain scheduler), a :class:`qdrift.Calibration` (V looked up at each step's
                sigma), or a tensor ``[num_inference_steps, C]`` / ``[num_inference_steps]`` of V per step.
            strength: multiplier on V (1 = the paper's correction, 0 = off); a Python or numpy number.
            channel_dim: the latents' channel axis, a Python or numpy integer (1 for ``[B, C, H, W]`` latents;
                -1 for packed ``[B, tokens, C]`` latents such as FLUX's).
            method: the correction (:data:`qdrift.correction.METHODS`), as for the core samplers: None takes
                ``"matched"`` for a calibration with moment-matching tables, ``"v2"`` for other calibrations
                and ``"paper"`` for a V table. The DPM-Solver++ scheduler's multistep weights are its own, so
                there the error-model methods (``exact``, ``correlated``, ``v2``) use the paper's rule and
                ``matched`` applies its tables without the output's gain and bias correction.

        Returns:
            self.

        Raises:
            ValueError: for a negative or non-finite strength, a non-integer channel_dim, a V table that is
                negative or non-finite, or a calibration of another type.
        """
        # the core samplers' rule for strength (numpy numbers accepted; bools, NaN, inf and negatives refused)
        check_knobs(f"{type(self).__name__}.set_calibration", strength=strength)
        if not isinstance(channel_dim, numbers.Integral) or isinstance(channel_dim, bool):
            raise ValueError(
                f"{type(self).__name__}.set_calibration: channel_dim must be an int, got {channel_dim!r}"
            )
        if calibration is not None and not hasattr(calibration, "at"):
            if not isinstance(calibration, torch.Tensor):
                raise ValueError(
                    f"calibration must be None, a qdrift.Calibration or a tensor of V per step, got {type(calibration).__name__}"
                )
            if calibration.ndim not in (1, 2) or not bool(torch.isfinite(calibration).all()) or bool((calibration < 0).any()):
                raise ValueError(
                    f"a V table must be [steps, C] or [steps], finite and >= 0; got shape {tuple(calibration.shape)}"
                )
        if method is not None:
            check_choice("method", method, METHODS)
            if method != "paper" and not hasattr(calibration, "error_model"):
                raise ValueError(f"method={method!r} needs a qdrift.Calibration; a V table carries only the variance")
        self._qdrift_check_config()
        self._qdrift_V = calibration
        self._qdrift_strength = float(strength)
        self._qdrift_channel_dim = int(channel_dim)
        self._qdrift_method = method
        self._qdrift_plan = self._qdrift_run = None
        return self

    def _qdrift_resolved_method(self) -> str:
        cal, method = self._qdrift_V, self._qdrift_method
        if method is None:
            method = "paper" if not hasattr(cal, "error_model") else (
                "matched" if cal.matched is not None else DEFAULT_METHOD)
        if method not in ("paper", "matched") and not self._qdrift_plans:
            return "paper"
        return method

    @property
    def qdrift_calibration(self) -> Any:
        """The attached calibration (None: plain scheduler)."""
        return self._qdrift_V

    def _qdrift_check_config(self) -> None:
        """Raises ``ValueError`` for scheduler options the correction does not cover."""

    # ---------------------------------------------------------------- V lookup
    def _qdrift_v(self, i: int, sigma: float, sample: torch.Tensor) -> torch.Tensor:
        V = self._qdrift_V
        if hasattr(V, "at"):
            v = V.at(torch.tensor([sigma], dtype=torch.float64))[0]
        else:
            steps = len(self.timesteps)
            table = V if V.ndim == 2 else V[:, None]
            if table.shape[0] != steps:
                raise ValueError(
                    f"the V table has {table.shape[0]} rows but the scheduler runs {steps} steps: give one row per step"
                )
            v = table[i]
        dim = self._qdrift_channel_dim
        try:
            channels = sample.shape[dim]
        except IndexError:
            raise ValueError(f"channel_dim={dim} is out of range for latents of shape {tuple(sample.shape)}") from None
        if hasattr(V, "at") and v.numel() != channels:  # only a plain tensor V broadcasts over channels
            raise ValueError(
                f"the calibration has {v.numel()} channel(s) but the latents have {channels} along channel_dim={dim}: "
                "it belongs to another model or latent format (calibrate with this pipeline; a plain [steps] V "
                "tensor applies one value to every channel)"
            )
        if v.numel() not in (1, channels):
            raise ValueError(
                f"the calibration has {v.numel()} channels but the latents have {channels} along channel_dim={dim} "
                f"(shape {tuple(sample.shape)}): calibrate with the same pipeline, or pass the right channel_dim"
            )
        return v.to(device=sample.device, dtype=torch.float32) * self._qdrift_strength

    # ---------------------------------------------------------------- step
    def _qdrift_increment(self, i: int, model_output, sample, out, kwargs):  # pragma: no cover - abstract
        """Returns ``(delta_x float32, sigma_i, sigma_eff)`` for step ``i`` given the plain step's output."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        # Each subclass gets a ``step`` with its diffusers base's exact signature: pipelines inspect it
        # (``prepare_extra_step_kwargs`` passes ``generator`` / ``eta`` only when they are parameters).
        super().__init_subclass__(**kwargs)
        cls.step = _step_with_signature(_diffusers_base(cls))

    def _qdrift_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs):
        """The plain scheduler's ``step`` followed by the Q-Drift rescale of its deterministic increment.

        Takes the same arguments as the wrapped scheduler's ``step`` and returns the same type (output
        object, or tuple when ``return_dict=False``).
        """
        return_dict = kwargs.pop("return_dict", True)
        if isinstance(model_output, torch.Tensor) and not all_finite(model_output):
            raise ValueError(f"{type(self).__name__}: the model output at timestep {float(timestep):g} holds NaN or inf")
        if self._qdrift_V is None or self._qdrift_strength == 0.0:
            return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = int(self.step_index)
        self._qdrift_check_call(i, kwargs)
        out = super().step(model_output, timestep, sample, return_dict=True, **kwargs)
        prev = out.prev_sample
        delta, sigma, sigma_eff = self._qdrift_increment(i, model_output, sample, out, kwargs)
        v = self._qdrift_v(i, sigma, prev)
        method = self._qdrift_resolved_method()
        if method == "paper":
            # Q-Drift: scale the deterministic increment by (1 + c_i), c_i = |sigma_eff - sigma| V_i / (2 sigma) (Eq. 12).
            c = first_order_coefficient(v, sigma, sigma_eff)
            new_prev = scale_increment(prev, delta, c, self._qdrift_channel_dim)
        else:
            new_prev = self._qdrift_plan_step(i, method, sample, prev, delta, sigma, sigma_eff)
        if not all_finite(new_prev) and all_finite(prev):  # one reduction per step; the second only on failure
            raise ValueError(
                f"{type(self).__name__}: the Q-Drift step {i} of {len(self.timesteps)} (sigma={sigma:.6g}, "
                f"timestep {float(timestep):g}, method {method!r}, strength {self._qdrift_strength:g}) gave NaN or "
                f"inf where the plain scheduler's step was finite: an overflow in {prev.dtype}, or a calibration / "
                "strength far from this model's (check the calibration, lower strength)"
            )
        out.prev_sample = new_prev
        if return_dict:
            return out
        return (new_prev,) + tuple(out.to_tuple()[1:])

    def _qdrift_check_call(self, i: int, kwargs) -> None:
        """Raises ``ValueError`` for step options the correction does not cover."""

    def _qdrift_noise_std(self, i: int) -> float:
        """Std of the fresh noise the step adds after its deterministic part (0: none)."""
        return 0.0

    def _qdrift_plan_step(self, i, method, sample, prev, delta, sigma, sigma_eff):
        """The core's :class:`qdrift.plan.DriftPlan` on this step (one plan per run, built at its first step).

        A run is the steps from the one it starts at (0 for txt2img; diffusers' begin index for img2img, or the
        index the scheduler finds from the first timestep) to the end of the schedule: its plan is built at that
        step from ``sigmas[start:]`` and the current sample, and takes the steps as ``i - start``, exactly as
        the core sampler on ``sigmas[start:]`` (see :meth:`_qdrift_run_start`).

        The plan works on ``[B, C, ...]`` states; with ``channel_dim != 1`` the latents are viewed that way.
        The output correction of methods ``v2`` / ``matched`` (the calibrated gain and bias) acts on the
        step's direction ``d = delta / (sigma_eff - sigma)`` as in the core samplers:
        ``(d - j x / sigma - b) / (1 + k)``.
        """
        from ..plan import DriftPlan

        dim = self._qdrift_channel_dim
        x = sample.to(torch.float32).movedim(dim, 1)
        inc = delta.movedim(dim, 1)
        start = self._qdrift_run_start(i)
        if self._qdrift_plan is None:
            sigmas = torch.tensor([self._qdrift_level(j) for j in range(start, len(self.timesteps) + 1)],
                                  dtype=torch.float64)
            self._qdrift_plan = DriftPlan(self._qdrift_V, sigmas, x, type(self).__name__, self._qdrift_strength, method,
                                          spatial=dim in (1, 1 - sample.ndim),  # packed latents: tokens, no grid
                                          lower_noise=self._qdrift_lowers_noise, flow=self._qdrift_flow)
        plan = self._qdrift_plan
        if self._qdrift_plans:
            inc = plan.correct_increment(inc, x, sigma, sigma_eff - sigma)
        base = x + inc
        corrected, factor = plan.step(i - start, x, base, sigma, sigma_eff, noise_std=self._qdrift_noise_std(i))
        self._qdrift_run[2] = i + 1
        # exactly 0 when c = 0 and there is no output correction (the plain scheduler, bit for bit)
        change = (corrected - base) + (inc - delta.movedim(dim, 1))
        if factor is not None and self._qdrift_lowers_noise:
            # The noise the scheduler added after its deterministic step, scaled by the plan's factor (per channel, or
            # per channel and frequency band).
            noise = prev.to(torch.float32).movedim(dim, 1) - (x + delta.movedim(dim, 1))
            change = change + (scale_noise(noise, factor).to(noise) - noise)
        return prev + change.movedim(1, dim).to(prev.dtype)

    def _qdrift_run_start(self, i: int) -> int:
        """The first step of the run that step ``i`` belongs to; drops the plan when ``i`` starts a new run.

        Step ``i`` continues the current run only if the schedule is the one the plan was built on (every
        ``set_timesteps`` makes a new ``sigmas`` tensor) and ``i`` is the step after the last one taken;
        anything else (a new ``set_timesteps``, a new begin index, a step index reset by hand) starts a new
        run at ``i``.
        """
        run = self._qdrift_run
        if self._qdrift_plan is None or run is None or run[0] is not self.sigmas or run[2] != i:
            self._qdrift_plan = None
            self._qdrift_run = run = [self.sigmas, i, i]
        return run[1]

    def _qdrift_level(self, j: int) -> float:
        """Noise level ``j`` of this run's schedule in the calibration's space (0 past the last step)."""
        return _float(self.sigmas[j]) if j < len(self.sigmas) else 0.0


def _diffusers_base(cls) -> type:
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("diffusers.") and hasattr(base, "step"):
            return base
    raise TypeError(f"{cls.__name__} must derive from a diffusers scheduler")


def _step_with_signature(base: type):
    signature = inspect.signature(base.step)

    def step(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}.step: {e}") from None
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return self._qdrift_step(**arguments)

    step.__signature__ = signature
    step.__name__ = "step"
    step.__qualname__ = f"{base.__name__}.step"
    step.__doc__ = (
        f"``{base.__name__}.step`` followed by the Q-Drift rescale of the step's deterministic increment "
        "(see the module docstring); same arguments and return type."
    )
    return step


def _float(t) -> float:
    return float(t.item() if isinstance(t, torch.Tensor) else t)


class QDriftEulerDiscreteScheduler(_QDriftMixin, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with Q-Drift (see the module docstring). ``s_churn`` must stay 0."""

    def _qdrift_check_call(self, i, kwargs):
        if float(kwargs.get("s_churn", 0.0)) > 0:
            raise ValueError("QDriftEulerDiscreteScheduler: s_churn > 0 is not supported with a calibration; use s_churn=0")

    def _qdrift_increment(self, i, model_output, sample, out, kwargs):
        sigma, sigma_next = _float(self.sigmas[i]), _float(self.sigmas[i + 1])
        x = sample.to(torch.float32)
        d = (x - out.pred_original_sample.to(torch.float32)) / sigma
        return d * (sigma_next - sigma), sigma, sigma_next


class QDriftEulerAncestralDiscreteScheduler(_QDriftMixin, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with Q-Drift: Euler to ``sigma_down`` with ``c_i``; the exact methods
    lower the noise by what a bounded drift leaves (the module docstring)."""

    _qdrift_lowers_noise = True

    def _qdrift_increment(self, i, model_output, sample, out, kwargs):
        s_from, s_to = _float(self.sigmas[i]), _float(self.sigmas[i + 1])
        s_up = math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0))
        s_down = math.sqrt(max(s_to**2 - s_up**2, 0.0))
        x = sample.to(torch.float32)
        d = (x - out.pred_original_sample.to(torch.float32)) / s_from
        return d * (s_down - s_from), s_from, s_down

    def _qdrift_noise_std(self, i):
        s_from, s_to = _float(self.sigmas[i]), _float(self.sigmas[i + 1])
        return math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0))


class QDriftFlowMatchEulerDiscreteScheduler(_QDriftMixin, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with Q-Drift in flow time (``delta_x = dt * v``; v2 drifts along the
    score, as the core samplers on a flow)."""

    _qdrift_flow = True

    def _qdrift_check_config(self):
        if getattr(self.config, "stochastic_sampling", False):
            raise ValueError("QDriftFlowMatchEulerDiscreteScheduler: stochastic_sampling=True is not supported")

    def _qdrift_check_call(self, i, kwargs):
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("QDriftFlowMatchEulerDiscreteScheduler: per_token_timesteps is not supported")
        if float(kwargs.get("s_churn", 0.0)) > 0:
            raise ValueError("QDriftFlowMatchEulerDiscreteScheduler: s_churn > 0 is not supported")

    def _qdrift_increment(self, i, model_output, sample, out, kwargs):
        sigma, sigma_next = _float(self.sigmas[i]), _float(self.sigmas[i + 1])
        return model_output.to(torch.float32) * (sigma_next - sigma), sigma, sigma_next


class QDriftDPMSolverMultistepScheduler(_QDriftMixin, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``) with Q-Drift.

    The step's whole increment is scaled in ``y = x / alpha_t`` space, ``y_next = y + (1 + c)(y_base - y)``,
    with the first-order ``c = |dsigma| V / (2 sigma)`` in VE sigma (the form the core's samplers default to),
    or the moment-matching tables (method ``"matched"``) read at those levels.
    """

    _qdrift_plans = False

    def _qdrift_level(self, j: int) -> float:
        if j >= len(self.sigmas):
            return 0.0
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[j])
        return _float(sigma) / _float(alpha) if _float(alpha) > 0 else 0.0

    def _qdrift_check_config(self):
        if self.config.algorithm_type != "dpmsolver++":
            raise ValueError(
                f"QDriftDPMSolverMultistepScheduler supports algorithm_type='dpmsolver++' only, got "
                f"{self.config.algorithm_type!r}"
            )
        if getattr(self.config, "use_flow_sigmas", False) or self.config.prediction_type == "flow_prediction":
            raise ValueError(
                "QDriftDPMSolverMultistepScheduler: flow-matching configs (use_flow_sigmas / flow_prediction) are not "
                "supported; use QDriftFlowMatchEulerDiscreteScheduler for flow models"
            )

    def _qdrift_increment(self, i, model_output, sample, out, kwargs):
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        ve, ve_next = _float(sigma_t) / _float(alpha_t), _float(sigma_s) / _float(alpha_s)
        # In x units: alpha_s (y_base - y) = prev - (alpha_s / alpha_t) x.
        delta = out.prev_sample.to(torch.float32) - (_float(alpha_s) / _float(alpha_t)) * sample.to(torch.float32)
        return delta, ve, ve_next


SUPPORTED_SCHEDULERS = {
    EulerDiscreteScheduler: QDriftEulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler: QDriftEulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler: QDriftFlowMatchEulerDiscreteScheduler,
    DPMSolverMultistepScheduler: QDriftDPMSolverMultistepScheduler,
}
"""diffusers scheduler class -> its Q-Drift subclass."""


def _qdrift_class(scheduler: Any) -> Type[_QDriftMixin]:
    cls = type(scheduler)
    if isinstance(scheduler, _QDriftMixin):
        return cls
    for base, qcls in SUPPORTED_SCHEDULERS.items():
        if cls is base:
            return qcls
    names = ", ".join(b.__name__ for b in SUPPORTED_SCHEDULERS)
    raise ValueError(f"Q-Drift supports {names}; got {cls.__name__} (convert with <Scheduler>.from_config(pipe.scheduler.config))")


def qdrift_scheduler(
    scheduler: Any, calibration: Any, *, strength: float = 1.0, channel_dim: int = 1, method: Optional[str] = None
) -> _QDriftMixin:
    """Returns a Q-Drift version of a diffusers scheduler, built from its config.

    Example::

        cal = qdrift.load_calibration("sdxl_w4a4.safetensors")
        pipe.scheduler = qdrift_scheduler(pipe.scheduler, cal)
        image = pipe(prompt).images[0]

    Args:
        scheduler: an ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
            ``FlowMatchEulerDiscreteScheduler`` or ``DPMSolverMultistepScheduler`` (dpmsolver++) instance.
        calibration: None, a :class:`qdrift.Calibration`, or a V table (see
            :meth:`QDriftEulerDiscreteScheduler.set_calibration`).
        strength: multiplier on V.
        channel_dim: the latents' channel axis (-1 for packed FLUX latents).
        method: the correction (None: as the core samplers choose; see ``set_calibration``).

    Returns:
        A new scheduler of the matching ``QDrift*`` class with the same config (the original is unchanged).

    Raises:
        ValueError: for an unsupported scheduler class or option, or a bad calibration/strength.
    """
    qcls = _qdrift_class(scheduler)
    new = qcls.from_config(scheduler.config)
    return new.set_calibration(calibration, strength=strength, channel_dim=channel_dim, method=method)
