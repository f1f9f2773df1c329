"""The Q-Drift correction math, in one place.

Notation (k-diffusion / EDM, VE form): ``x = x0 + sigma * eps``, a denoiser ``D(x, sigma)`` returns x0,
``d = (x - D) / sigma``. A quantized model returns ``d_hat = d + delta``; calibration gives
``V = Var(delta | d_hat)`` per step and channel (Q-Drift, arXiv 2603.18095, Sec. 3).

The rule every sampler uses (paper Sec. 3.2, from Karras et al.'s generalized SDE, their Eq. 6): a step
whose deterministic part moves the sample from noise level ``sigma`` to ``sigma_eff`` and which, through its
weights on the model outputs, injects quantization variance ``Q`` (per channel, in x units) keeps the
target marginal if its deterministic increment is scaled by ``(1 + c)`` with

    c = Q / (2 * sigma * |sigma - sigma_eff|)                                     (drift matching)

To first order the increment is ``(sigma_eff - sigma) * d`` and ``Cov(x, d) = sigma`` per unit variance,
so scaling it by ``(1 + c)`` changes the variance by ``-2 c sigma |sigma - sigma_eff|``, which cancels Q.
For Euler, ``Q = dsigma^2 V`` and this is the paper's ``c = |dsigma| V / (2 sigma)`` (Eq. 12).

The authors' DPM-Solver++ form (paper Eq. 44-45 and their code) instead takes ``Q`` as the quadrature sum
``sum_j (w_j sigma_j)^2 V_j`` over the step's weights ``w_j`` on the denoised outputs and divides by
``|sigma^2 - sigma_eff^2|``; see :func:`quadrature_coefficient`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "validate_sampler_inputs",
    "resolve_v",
    "compute_dtype",
    "channel_view",
    "drift_coefficient",
    "first_order_coefficient",
    "quadrature_coefficient",
    "quadrature_variance",
    "apply_drift",
    "lower_noise",
    "check_choice",
]


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the correction is computed in: float32 for half types, else ``x.dtype``."""
    return torch.promote_types(x.dtype, torch.float32)


def resolve_v(V, sigmas: torch.Tensor, x: torch.Tensor, sampler: str, strength: float = 1.0) -> Optional[torch.Tensor]:
    """Turns the user's ``V`` into a ``[steps, C]`` (or ``[steps, 1]``) table on x's device.

    Args:
        V: None; an object with ``.at(sigmas)`` (a :class:`qdrift.Calibration`), looked up at
            ``sigmas[:-1]``; or a tensor ``[steps, C]`` or ``[steps]`` aligned with the steps.
        sigmas: the schedule ``[steps + 1]``.
        x: the sample ``[B, C, ...]`` (channel count, device, dtype).
        sampler: the sampler's name, for messages.
        strength: multiplier on V (``>= 0``; 1 is the paper's correction, 0 turns it off).

    Returns:
        None if ``V`` is None, else a finite, non-negative table in :func:`compute_dtype` of x.

    Raises:
        ValueError: if V's shape does not match the schedule or channels, or it is negative/non-finite.
    """
    if not isinstance(strength, (int, float)) or not (strength >= 0) or strength != strength or strength == float("inf"):
        raise ValueError(f"{sampler}: strength must be a finite number >= 0, got {strength!r}")
    if V is None:
        return None
    steps = sigmas.numel() - 1
    channels = x.shape[1]
    if hasattr(V, "at") and not isinstance(V, torch.Tensor):
        V = V.at(sigmas[:-1])
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
            f"{sampler}: V must have shape [{steps}, {channels}] or [{steps}] for {steps} steps and {channels} "
            f"channels, got {tuple(V.shape)}"
        )
    V = V.to(device=x.device, dtype=compute_dtype(x))
    if not bool(torch.isfinite(V).all()) or bool((V < 0).any()):
        raise ValueError(f"{sampler}: V must be finite and >= 0 (a variance), got min {float(V.min())}")
    return V * strength if strength != 1 else V


def channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshapes a per-channel vector ``[C]`` (or ``[1]``) to broadcast over ``x`` ``[B, C, ...]``."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def drift_coefficient(q: torch.Tensor, sigma, sigma_eff) -> torch.Tensor:
    """``c = Q / (2 sigma |sigma - sigma_eff|)``: the drift that cancels injected variance ``Q``.

    Args:
        q: injected quantization variance per channel ``[C]`` (x units).
        sigma: noise level the step starts from (> 0).
        sigma_eff: noise level the step's deterministic part reaches.

    Returns:
        ``c`` ``[C]``; zeros for a zero-length step.
    """
    gap = float(abs(sigma - sigma_eff))
    if gap == 0.0:
        return torch.zeros_like(q)
    return q / (2.0 * float(sigma) * gap)


def first_order_coefficient(v: torch.Tensor, sigma, sigma_eff) -> torch.Tensor:
    """The paper's Euler rule ``c = |sigma - sigma_eff| V / (2 sigma)`` (Eq. 12), any sampler's increment."""
    gap = float(abs(sigma - sigma_eff))
    return drift_coefficient(v * gap * gap, sigma, sigma_eff)


def quadrature_variance(weights: Sequence[float], sigmas: Sequence, vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Q = sum_j (w_j sigma_j)^2 V_j``: variance a step injects through its weights on denoised outputs.

    A denoised output is ``D_j = x_j - sigma_j d_j``, so an error of variance ``V_j`` in ``d_j`` is an error
    of variance ``sigma_j^2 V_j`` in ``D_j``; errors at different evaluations are taken as independent
    (the paper's assumption, Eq. 44).

    Args:
        weights: the step's coefficients on ``D_i, D_{i-1}, ...`` (same order as ``sigmas`` and ``vs``).
        sigmas: the noise levels those outputs were evaluated at.
        vs: their V rows ``[C]``.
    """
    q = torch.zeros_like(vs[0])
    for w, s, v in zip(weights, sigmas, vs):
        q = q + (float(w) * float(s)) ** 2 * v
    return q


def quadrature_coefficient(q: torch.Tensor, sigma, sigma_eff) -> torch.Tensor:
    """The authors' DPM-Solver++ rule ``c = Q / |sigma^2 - sigma_eff^2|`` (paper Eq. 45, authors' code)."""
    gap = float(abs(sigma**2 - sigma_eff**2))
    if gap == 0.0:
        return torch.zeros_like(q)
    return q / gap


def apply_drift(x: torch.Tensor, x_base: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    """Scales a step's deterministic increment by ``(1 + c)``: ``x_base + c (x_base - x)``.

    Written so that ``c = 0`` returns ``x_base`` bit for bit. ``c`` ``[C]`` is applied per channel in
    :func:`compute_dtype`; the result has x's dtype.

    Args:
        x: sample before the step ``[B, C, ...]``.
        x_base: the uncorrected sampler's result of the deterministic part ``[B, C, ...]``.
        c: per-channel coefficient ``[C]`` or ``[1]``, or None for no correction.
    """
    if c is None:
        return x_base
    ct = compute_dtype(x_base)
    step = (x_base - x).to(ct) * channel_view(c, x_base)
    return x_base + step.to(x_base.dtype)


def lower_noise(noise_std, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lowers a sampler's injected noise by the variance quantization injects.

    The new std is ``sqrt(max(noise_std^2 - Q, 0))``, returned as a factor on the sampler's own noise,
    ``sqrt(max(1 - Q / noise_std^2, 0))`` (exactly 1 when ``Q = 0``, so the sampler's noise expression is
    kept bit for bit); what cannot be absorbed, ``max(Q - noise_std^2, 0)``, is returned for the drift.

    Args:
        noise_std: the sampler's own injected noise std (scalar, x units).
        q: quantization variance per channel ``[C]``.

    Returns:
        ``(factor [C], leftover_q [C])``.
    """
    budget = float(noise_std) ** 2
    if budget == 0.0:
        return torch.ones_like(q), q
    new_var = budget - q
    return (new_var / budget).clamp(min=0).sqrt(), (-new_var).clamp(min=0)
