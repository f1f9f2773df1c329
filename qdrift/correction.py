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
    "compute_dtype",
    "channel_view",
    "drift_coefficient",
    "first_order_coefficient",
    "quadrature_coefficient",
    "quadrature_variance",
    "apply_drift",
    "lower_noise",
]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the correction is computed in: float32 for half types, else ``x.dtype``."""
    return torch.promote_types(x.dtype, torch.float32)


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
