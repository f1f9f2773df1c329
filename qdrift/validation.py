"""Input checks for every public entry point: what is valid is said here, once.

A sampler validates at entry (:func:`check_knobs`, and :func:`setup <qdrift.samplers._common.setup>` which
calls :func:`prepare_sigmas`, :func:`validate_sampler_inputs` and :func:`resolve_v`), then runs its loop with
the model wrapped in :class:`CheckedModel`, which checks each model output once (shape, dtype, device,
finite) and returns it unchanged. Every refusal is a ``ValueError`` that names the entry point, the bad
value and what was expected.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .correction import compute_dtype

__all__ = [
    "check_choice",
    "check_knobs",
    "prepare_sigmas",
    "validate_sampler_inputs",
    "resolve_v",
    "CheckedModel",
    "all_finite",
    "clip_drift",
    "DriftClippedWarning",
    "MAX_DRIFT",
]

MAX_DRIFT = 1.0
"""Largest drift coefficient ``c`` a step may use: above it the correction would more than double the step."""

MIN_SIGMA = 1e-10
"""Smallest positive noise level a schedule may hold (below it a level is 0 for any network)."""

FLOW_T_SLACK = 1e-5
"""Rounding slack above flow time 1 that a flow schedule's first level may have (a shifted schedule's first
value may round to 1 + 1 ulp); the same slack as :class:`qdrift.adapters.FlowDenoiser` allows."""


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def flag(value) -> Optional[bool]:
    """``value`` as a Python bool if it is a boolean (``bool``, ``numpy.bool_`` or a 0-d bool tensor), else None
    (a truthy string or a number is not a flag)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        return bool(value) if value.ndim == 0 and value.dtype == torch.bool else None
    if isinstance(value, np.bool_):
        return bool(value)
    return None


def flag_arg(who: str, name: str, value) -> bool:
    """``value`` as a Python bool (``bool``, ``numpy.bool_`` or a 0-d bool tensor: :func:`flag`), else a
    ``ValueError`` naming ``who`` and the option (a truthy ``"no"`` or 1 is not a flag)."""
    out = flag(value)
    if out is None:
        raise ValueError(f"{who}: {name} must be True or False, got {value!r}")
    return out


def real_arg(who: str, name: str, value, what: str = "a real number") -> float:
    """``value`` as a float (:func:`_real`: a real number, numpy scalar or 0-d tensor, not a bool), else a
    ``ValueError`` naming ``who``, the argument and what it got."""
    out = _real(value)
    if out is None:
        raise ValueError(f"{who}: {name} must be {what}, got {value!r:.80} ({type(value).__name__})")
    return out


def _integer(value) -> Optional[int]:
    """``value`` as an int if it is an integer (not a bool; numpy integers and a 0-d integer tensor count), else
    None."""
    if isinstance(value, torch.Tensor):
        ok = value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        return int(value) if ok else None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def _real(value) -> Optional[float]:
    """``value`` as a float if it is a real number (not a bool; a 0-d real tensor counts), else None."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _finite_nonneg(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v) and v >= 0


def _nonneg(v: Optional[float]) -> bool:
    return v is not None and v >= 0  # NaN fails the comparison; +inf passes


_KNOBS = {
    # name: (test on the value, what is expected)
    "eta": (lambda v: _finite_nonneg(_real(v)), "a finite number >= 0"),
    "s_noise": (lambda v: _finite_nonneg(_real(v)), "a finite number >= 0"),
    "s_churn": (lambda v: _finite_nonneg(_real(v)), "a finite number >= 0"),
    "s_tmin": (lambda v: _nonneg(_real(v)), "a number >= 0 (inf allowed, NaN not)"),
    "s_tmax": (lambda v: _nonneg(_real(v)), "a number >= 0 (inf allowed, NaN not)"),
    "strength": (lambda v: _finite_nonneg(_real(v)), "a finite number >= 0"),
    "order": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "noise_sampler": (lambda v: v is None or callable(v), "None or a callable (sigma, sigma_next) -> noise"),
    "callback": (lambda v: v is None or callable(v), "None or a callable taking a dict"),
}


def check_knobs(entry: str, **knobs) -> None:
    """Checks a sampler's keyword options by one rule per name (the same rule in every sampler).

    Args:
        entry: the sampler's name, for the message.
        **knobs: option values by name: ``eta, s_noise, s_churn, strength`` (finite, >= 0), ``s_tmin,
            s_tmax`` (>= 0, inf allowed), ``order`` (integer >= 1), ``noise_sampler, callback`` (callable
            or None).

    Raises:
        ValueError: naming the option, its value and what was expected.
    """
    for name, value in knobs.items():
        test, expected = _KNOBS[name]
        if not test(value):
            raise ValueError(f"{entry}: {name} must be {expected}, got {value!r}")


_HALF = (torch.float16, torch.bfloat16)


def prepare_sigmas(sigmas, x: torch.Tensor, sampler: str):
    """The schedule in a dtype and on a device the samplers can use, or ``sigmas`` unchanged if it is.

    A half-precision schedule (float16 / bfloat16) is widened to float32 (its values are kept exactly;
    scipy and torchsde cannot use half types) and a schedule on another device than ``x`` is moved to x's
    device. Anything else is returned as is, for :func:`validate_sampler_inputs` to judge.
    """
    if not isinstance(sigmas, torch.Tensor) or not isinstance(x, torch.Tensor):
        return sigmas
    if sigmas.dtype in _HALF:
        sigmas = sigmas.float()
    if sigmas.device != x.device:
        if sigmas.device.type == "meta":
            raise ValueError(f"{sampler}: sigmas are on the meta device (no values); pass a real schedule")
        sigmas = sigmas.to(x.device)
    return sigmas


def validate_sampler_inputs(x: torch.Tensor, sigmas: torch.Tensor, sampler: str) -> None:
    """Checks a sampler's ``x`` and ``sigmas`` once, at entry.

    Args:
        x: initial sample ``[B, C, ...]``, floating point, finite.
        sigmas: 1-D schedule ``[steps + 1]``, finite, >= 0 and strictly decreasing.
        sampler: the sampler's name, for the message.

    Raises:
        ValueError: naming the bad value and what was expected.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{sampler}: x must be a floating-point torch.Tensor, got {_describe(x)}")
    if x.ndim < 2:
        raise ValueError(f"{sampler}: x must have shape [batch, channels, ...], got shape {tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError(f"{sampler}: x is on the meta device (no values)")
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"{sampler}: sigmas must be a 1-D torch.Tensor, got {_describe(sigmas)}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"{sampler}: sigmas must be 1-D with at least 2 values (steps + 1), got shape {tuple(sigmas.shape)}"
        )
    if not sigmas.is_floating_point():
        raise ValueError(f"{sampler}: sigmas must be floating point, got dtype {sigmas.dtype}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"{sampler}: sigmas must be finite, got {sigmas.tolist()}")
    if bool((sigmas < 0).any()):
        raise ValueError(f"{sampler}: sigmas must be >= 0, got {sigmas.tolist()}")
    if bool(((sigmas > 0) & (sigmas < MIN_SIGMA)).any()):
        raise ValueError(
            f"{sampler}: a positive noise level must be >= {MIN_SIGMA:g} (below it a level is 0 for any network, "
            f"and its square underflows; end the schedule with 0 instead), got {sigmas.tolist()}"
        )
    if bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError(
            f"{sampler}: sigmas must be strictly decreasing (sampling goes from noise to data; a repeated level "
            f"makes a zero-length step), got {sigmas.tolist()}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{sampler}: x contains NaN or inf")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def resolve_v(V, sigmas: torch.Tensor, x: torch.Tensor, sampler: str, strength: float = 1.0) -> Optional[torch.Tensor]:
    """Turns the user's ``V`` into a ``[steps, C]`` (or ``[steps, 1]``) table on x's device.

    Args:
        V: None; an object with ``.at(sigmas)`` (a :class:`qdrift.Calibration`), looked up at
            ``sigmas[:-1]``, which must have x's channel count; or a tensor ``[steps, C]``, ``[steps, 1]`` or
            ``[steps]`` aligned with the steps (only the last two broadcast over channels).
        sigmas: the schedule ``[steps + 1]``.
        x: the sample ``[B, C, ...]`` (channel count, device, dtype).
        sampler: the sampler's name, for messages.
        strength: multiplier on V (``>= 0``; 1 is the paper's correction, 0 turns it off).

    Returns:
        None if ``V`` is None, else a finite, non-negative table in :func:`compute_dtype` of x.

    Raises:
        ValueError: if V's shape does not match the schedule or channels, a calibration was made for another
            channel count, or V is negative/non-finite.
    """
    check_knobs(sampler, strength=strength)
    if V is None:
        return None
    steps = sigmas.numel() - 1
    channels = x.shape[1]
    if hasattr(V, "at") and not isinstance(V, torch.Tensor):
        cal_channels = getattr(V, "channels", None)
        V = V.at(sigmas[:-1])
        cal_channels = V.shape[-1] if cal_channels is None and isinstance(V, torch.Tensor) else cal_channels
        if cal_channels != channels:
            raise ValueError(
                f"{sampler}: the calibration has {cal_channels} channel(s) but x has {channels}: it belongs to "
                "another model or latent format (calibrate this model; a plain 1-D or [steps, 1] tensor V is the "
                "way to apply one value to every channel)"
            )
    if not isinstance(V, torch.Tensor):
        try:
            V = torch.as_tensor(V)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{sampler}: V must be None, a Calibration or a tensor [steps, C] / [steps]; got {type(V).__name__}"
            ) from None
    if V.ndim == 1:
        V = V[:, None]
    if V.ndim != 2 or V.shape[0] != steps or V.shape[1] not in (1, channels):
        raise ValueError(
            f"{sampler}: V must have shape [{steps}, {channels}], [{steps}, 1] or [{steps}] for {steps} steps and "
            f"{channels} channels, got {tuple(V.shape)}"
        )
    if V.is_complex() or V.dtype == torch.bool:
        raise ValueError(f"{sampler}: V must be real, got dtype {V.dtype}")
    V = V.to(device=x.device, dtype=compute_dtype(x))
    if not bool(torch.isfinite(V).all()) or bool((V < 0).any()):
        raise ValueError(f"{sampler}: V must be finite and >= 0 (a variance), got min {float(V.min())}")
    return V * strength if strength != 1 else V


class CheckedModel:
    """The model as a sampler calls it: each output is checked once and returned unchanged.

    Checks per call: a floating-point tensor on x's device with exactly x's shape (an output that merely
    broadcasts is refused), and finite. The finiteness test is one sum reduction (NaN or inf anywhere makes
    the sum non-finite; a sum that overflows is re-checked element-wise before refusing).

    Args:
        model: the denoiser ``D(x, sigma, **extra_args) -> x0``.
        sampler: the sampler's name, for messages.
        sig: the schedule as floats ``[steps + 1]``, to name the step of a bad call.
    """

    def __init__(self, model: Callable, sampler: str, sig: List[float]):
        if not callable(model):
            raise ValueError(f"{sampler}: model must be a callable D(x, sigma, **extra_args), got {_describe(model)}")
        self.model = model
        self.sampler = sampler
        self.sig = sig

    def __call__(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        out = self.model(x, sigma, **extra_args)
        self.check(out, x, sigma)
        return out

    def check(self, out, x: torch.Tensor, sigma) -> None:
        """Raises ``ValueError`` unless ``out`` is a finite floating-point tensor of x's shape on x's device."""
        if (
            not isinstance(out, torch.Tensor)
            or out.shape != x.shape
            or not out.is_floating_point()
            or out.device != x.device
        ):
            where = f" on {out.device}" if isinstance(out, torch.Tensor) else ""
            raise ValueError(f"{self._where(sigma)} the model returned {_describe(out)}{where}{self._expected(x)}")
        if not all_finite(out):
            cause = "" if all_finite(x) else " (its input x already held NaN/inf: an overflow or a bad noise sampler)"
            raise ValueError(f"{self._where(sigma)} the model returned NaN or inf{cause}")

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's result, checked finite (NaN never leaves a sampler without an error)."""
        if not all_finite(x):
            raise ValueError(
                f"{self.sampler}: the result holds NaN or inf although every model output was finite: an overflow "
                f"in {x.dtype} or a noise sampler returning NaN/inf"
            )
        return x

    def _expected(self, x: torch.Tensor) -> str:
        return f"; expected a floating-point tensor of x's shape {tuple(x.shape)} on {x.device}"

    def _where(self, sigma) -> str:
        """``"sampler: at step i of n (sigma=...),"`` for the call at noise level ``sigma``."""
        s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) and sigma.numel() else float(sigma)
        levels = self.sig[:-1]
        # The first level at or below sigma: the step itself, or the step a churned sigma_hat was raised from
        # (within half precision's rounding: a float16 sigma can lie 5e-4 above its level).
        step = next((j for j, level in enumerate(levels) if level <= s * (1 + 1e-3)), len(levels) - 1)
        return f"{self.sampler}: at step {step} of {len(levels)} (sigma={s:.6g}),"


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite; one reduction, exact re-check only if the sum overflows."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


class DriftClippedWarning(UserWarning):
    """A step's drift coefficient exceeded :data:`MAX_DRIFT` and was clipped (see :func:`clip_drift`)."""


def clip_drift(c: torch.Tensor) -> torch.Tensor:
    """Clips the drift coefficient ``c`` at :data:`MAX_DRIFT`, with one warning (policy: warn once, clip).

    ``c > 1`` means the correction would more than double the step's deterministic increment: V is then far
    larger than the first-order correction is meant for, almost certainly a calibration of another model or
    latent format, or a very coarse quantization under the ``"quadrature"`` form, or a too-large ``strength``.
    The warning (a :class:`DriftClippedWarning`) is shown once per process by Python's default filter; make
    it an error with ``warnings.simplefilter("error", qdrift.DriftClippedWarning)``.

    Args:
        c: per-channel coefficient ``[C]``.

    Returns:
        ``c`` itself when every value is at most 1, else ``c.clamp(max=1)``.
    """
    if c.numel() == 0 or not float(c.max()) > MAX_DRIFT:
        return c
    warnings.warn(
        "Q-Drift: a drift coefficient c > 1 (the correction would more than double a step) was clipped to 1. V is "
        "far larger than the correction is meant for: a calibration of another model or latent format, a very "
        "coarse quantization with form='quadrature', or too large a strength",
        DriftClippedWarning,
    )
    return c.clamp(max=MAX_DRIFT)


def check_extra_args(who: str, extra_args, label: str = "extra_args") -> None:
    """Refuses ``extra_args`` that cannot be passed as ``D(x, sigma, **extra_args)``: not a dict or None, a key that
    is not a string, or the keys ``x`` and ``sigma`` (the call passes those itself)."""
    if extra_args is not None and not isinstance(extra_args, dict):
        raise ValueError(f"{who}: {label} must be a dict or None, got {type(extra_args).__name__}")
    for key in extra_args or {}:
        if not isinstance(key, str):
            raise ValueError(f"{who}: {label} keys must be strings (the model's keyword argument names), got "
                             f"{key!r} ({type(key).__name__})")
        if key in ("x", "sigma"):
            raise ValueError(f"{who}: {label} must not hold {key!r}: the model is called as "
                             f"D(x, sigma, **extra_args), which passes x and sigma itself")
