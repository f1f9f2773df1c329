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

import functools
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "compute_dtype",
    "channel_view",
    "drift_coefficient",
    "first_order_coefficient",
    "quadrature_coefficient",
    "injected_variance",
    "quadrature_variance",
    "apply_drift",
    "scale_increment",
    "frequency_bands",
    "scale_increment_bands",
    "band_components",
    "band_shares",
    "filter_bands",
    "lower_noise",
    "scale_noise",
    "METHODS",
    "DEFAULT_METHOD",
    "balance_coefficient",
    "between_evaluations",
]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the correction is computed in: float32 for half types, else ``x.dtype``."""
    return torch.promote_types(x.dtype, torch.float32)


def channel_view(v: torch.Tensor, x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Reshapes a per-channel vector ``[C]`` (or ``[1]``) to broadcast over ``x`` along ``channel_dim``
    (``[B, C, ...]`` by default; diffusers' packed latents keep channels last)."""
    shape = [1] * x.ndim
    shape[channel_dim] = -1
    return v.reshape(shape)


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


def injected_variance(weights: Sequence[float], vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Q = sum_j w_j^2 V_j``: the variance a step injects through its weights ``w_j`` on the outputs ``d_j``.

    Errors at different evaluations are taken as independent (the paper's assumption, Eq. 44). Euler:
    ``w = [dsigma]``; Heun: both outputs weighted ``dsigma / 2``; LMS: its coefficients ``a_ij`` on
    ``d_{i-j}``; DPM-Solver++: see :func:`quadrature_variance`.

    Args:
        weights: the step's coefficients on ``d_i, d_{i-1}, ...`` (x units per unit of d).
        vs: the V rows ``[C]`` of those outputs, same order.
    """
    q = torch.zeros_like(vs[0])
    for w, v in zip(weights, vs):
        q = q + float(w) ** 2 * v
    return q


def quadrature_variance(weights: Sequence[float], sigmas: Sequence, vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Q = sum_j (w_j sigma_j)^2 V_j``: variance a step injects through its weights on denoised outputs.

    A denoised output is ``D_j = x_j - sigma_j d_j``, so an error of variance ``V_j`` in ``d_j`` is an error
    of variance ``sigma_j^2 V_j`` in ``D_j`` (:func:`injected_variance` with weights ``w_j sigma_j``).

    Args:
        weights: the step's coefficients on ``D_i, D_{i-1}, ...`` (same order as ``sigmas`` and ``vs``).
        sigmas: the noise levels those outputs were evaluated at.
        vs: their V rows ``[C]``.
    """
    return injected_variance([float(w) * float(s) for w, s in zip(weights, sigmas)], vs)


def quadrature_coefficient(q: torch.Tensor, sigma, sigma_eff) -> torch.Tensor:
    """The authors' DPM-Solver++ rule ``c = Q / |sigma^2 - sigma_eff^2|`` (paper Eq. 45, authors' code)."""
    gap = float(abs(sigma**2 - sigma_eff**2))
    if gap == 0.0:
        return torch.zeros_like(q)
    return q / gap


def apply_drift(x: torch.Tensor, x_base: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    """Scales a step's deterministic increment by ``(1 + c)``: ``x_base + c (x_base - x)``.

    Args:
        x: sample before the step ``[B, C, ...]``.
        x_base: the uncorrected sampler's result of the deterministic part ``[B, C, ...]``.
        c: per-channel coefficient ``[C]`` or ``[1]``, or None for no correction.
    """
    return x_base if c is None else scale_increment(x_base, x_base - x, c)


def scale_increment(
    x_base: torch.Tensor, increment: torch.Tensor, c: Optional[torch.Tensor], channel_dim: int = 1
) -> torch.Tensor:
    """``x_base + c * increment``: the step whose deterministic increment is ``increment`` scaled by ``(1 + c)``.

    Written so that ``c = 0`` returns ``x_base`` bit for bit. ``c`` ``[C]`` is applied per channel (along
    ``channel_dim``) in :func:`compute_dtype`; the result has x_base's dtype.
    """
    if c is None:
        return x_base
    ct = compute_dtype(x_base)
    step = increment.to(ct) * channel_view(c, x_base, channel_dim)
    return x_base + step.to(x_base.dtype)


def frequency_bands(spatial: Sequence[int], bands: int, device=None) -> torch.Tensor:
    """Radial frequency band of every FFT bin of a ``spatial`` grid (``torch.fft.fftn`` layout), ``[*spatial]``.

    ``bands`` equal-width rings in normalized radial frequency ``|f| = sqrt(sum_k f_k^2)`` (``f_k`` in cycles
    per sample, ``[-1/2, 1/2]``) from 0 to the grid's largest ``|f|``; band 0 holds the zero frequency. Being
    in normalized frequency, a band means the same scale of detail at every resolution. The map is computed once
    per (grid, count, device) and shared: treat it as read-only.
    """
    if not isinstance(bands, int) or isinstance(bands, bool) or bands < 1:
        raise ValueError(f"bands must be a positive integer, got {bands!r}")
    if bands > 1 and not spatial:
        raise ValueError("frequency bands need spatial axes: a sample with no spatial axes has one band")
    return _band_map(tuple(int(n) for n in spatial), bands, None if device is None else torch.device(device))


@functools.lru_cache(maxsize=64)
def _band_map(spatial: tuple, bands: int, device) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64) for n in spatial], indexing="ij")
    radius = torch.zeros(spatial, dtype=torch.float64)
    for g in grids:
        radius = radius + g * g
    radius = radius.sqrt()
    top = float(radius.max()) if radius.numel() else 0.0
    band = (radius / top * bands).floor().long() if top > 0 else torch.zeros_like(radius, dtype=torch.long)
    return band.clamp(max=bands - 1).to(device) if device is not None else band.clamp(max=bands - 1)


def scale_increment_bands(x_base: torch.Tensor, increment: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x_base + c(f) * increment`` with ``c`` per channel and radial frequency band ``[C, NB]``.

    The increment is split into :func:`frequency_bands` over the spatial axes (an FFT), each band scaled by
    its ``(1 + c)``, and brought back; with one band it equals :func:`scale_increment`. Computed in
    :func:`compute_dtype` (an FFT does not take half precision); the result has x_base's dtype.
    """
    return x_base + filter_bands(increment, c).to(x_base.dtype)


def filter_bands(t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, C, *spatial]`` with each channel's radial frequency band ``b`` multiplied by ``gain[c, b]``.

    ``gain`` ``[C, NB]`` (or ``[1, NB]``, or per sample ``[B, C, NB]``); bands as :func:`frequency_bands`. The masks are symmetric under
    ``f -> -f``, so a real input gives a real output. A host (CPU) ``gain`` equal across each channel's bands is
    applied without the FFT, exactly. Returned in :func:`compute_dtype`.
    """
    ct = compute_dtype(t)
    dims = tuple(range(2, t.ndim))
    if gain.device.type == "cpu" and bool((gain == gain[..., :1]).all()):
        # One gain per channel (every gain 1 where two models agree): the FFT would only add its rounding.
        g = gain[..., 0].to(device=t.device, dtype=ct)
        g = g[None] if g.ndim == 1 else g  # [1 or B, C or 1]
        return t.to(ct) * g.reshape(g.shape + (1,) * len(dims))
    band = frequency_bands(t.shape[2:], gain.shape[-1], device=t.device)
    g = gain.to(device=t.device, dtype=ct)[..., band]  # [(B,) C, *spatial]
    if t.numel() == 0:  # an empty batch (some FFT backends refuse an empty transform)
        return t.to(ct) * g
    return torch.fft.ifftn(torch.fft.fftn(t.to(ct), dim=dims) * g, dim=dims).real


def band_components(t: torch.Tensor, bands: int) -> torch.Tensor:
    """Splits ``t`` ``[B, C, *spatial]`` into its radial frequency bands, ``[B, C * bands, *spatial]``.

    Unit ``c * bands + b`` is channel ``c`` restricted to band ``b`` (:func:`frequency_bands`). The bands
    are orthogonal: for every sample the units of one channel sum to it, and (Parseval) their spatial
    sums of squares add up to its own, so per-channel variances are sums of per-unit ones; only band 0
    carries the spatial mean. For stationary Gaussian data the units are independent, so a per-channel
    statistic or correction applied per unit is exact. Computed in float64.
    """
    if t.ndim < 3:
        raise ValueError(f"frequency bands need spatial axes: got a tensor of shape {tuple(t.shape)}")
    dims = tuple(range(2, t.ndim))
    band = frequency_bands(t.shape[2:], bands, device=t.device)
    spectrum = torch.fft.fftn(t.detach().to(torch.float64), dim=dims)
    parts = [torch.fft.ifftn(spectrum * (band == b), dim=dims).real for b in range(bands)]
    return torch.stack(parts, 2).flatten(1, 2)


def band_shares(spatial: Sequence[int], bands: int) -> torch.Tensor:
    """The share of a white field's variance in each radial band of a ``spatial`` grid ``[NB]`` float64
    (the share of FFT bins in the band)."""
    band = frequency_bands(spatial, bands)
    return torch.bincount(band.reshape(-1), minlength=bands).to(torch.float64) / band.numel()


def lower_noise(noise_std, q: torch.Tensor, shares: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lowers a sampler's injected noise by the variance quantization injects.

    The new std is ``sqrt(max(noise_std^2 - Q, 0))``, returned as a factor on the sampler's own noise,
    ``sqrt(max(1 - Q / noise_std^2, 0))`` (exactly 1 when ``Q = 0``, so the sampler's noise expression is
    kept bit for bit); what cannot be absorbed, ``max(Q - noise_std^2, 0)``, is returned for the drift.
    Per frequency band (``shares``): white noise puts the share ``shares[u]`` of its variance in unit ``u``, so
    each unit's budget is ``noise_std^2 shares[u]`` and its factor lowers that band of the noise alone
    (:func:`scale_noise` applies it).

    Args:
        noise_std: the sampler's own injected noise std (scalar, x units).
        q: quantization variance per channel ``[C]``, or per (channel, band) unit ``[C * NB]`` with ``shares``.
        shares: each unit's share of white noise's variance ``[C * NB]`` (None: per channel).

    Returns:
        ``(factor, leftover_q)``, each shaped as ``q``.
    """
    budget = float(noise_std) ** 2
    if budget == 0.0:
        return torch.ones_like(q), q
    if shares is not None:
        budget = budget * shares.to(q)
    new_var = budget - q
    return (new_var / budget).clamp(min=0).sqrt(), (-new_var).clamp(min=0)


def scale_noise(noise: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
    """A sampler's own noise ``[B, C, *spatial]`` lowered by :func:`lower_noise`'s factor: per channel ``[C]``, or per
    channel and frequency band ``[C, NB]`` (:func:`filter_bands`; a factor equal across a channel's bands needs no
    FFT). None: the noise as it is."""
    if factor is None:
        return noise
    if factor.ndim == 2:
        return filter_bands(noise, factor).to(noise.dtype)
    return noise * channel_view(factor, noise).to(noise.dtype)


# --------------------------------------------------------------------------------------------------------
# Q-Drift v2: moment matching on a linear-Gaussian surrogate of the run (beyond the paper).
# --------------------------------------------------------------------------------------------------------

METHODS = ("paper", "exact", "correlated", "v2", "matched")
"""``paper``: the paper's first-order rule for fresh errors (arXiv 2603.18095, Eq. 12), bit for bit.
``exact``: each step's c from the variance balance solved exactly for the sampler as it runs (multistep
reuse, long steps, the final step, injected noise), errors fresh at every evaluation (:class:`DriftPlan`).
``correlated``: ``exact`` with the calibrated correlation of the error between evaluations of a trajectory.
``v2``: gain and bias removed from the model output first (PTQD-style), then ``correlated`` on the residual.
``matched``: each step's c (and a per-channel mean shift) measured by moment matching
(:func:`qdrift.calib.match_moments`): the quantized sampler, run from the full-precision run's initial noise,
is corrected so its per-channel variance and mean follow the full-precision run's, step by step; needs a
calibration that carries those tables."""

DEFAULT_METHOD = "v2"

def balance_coefficient(const: torch.Tensor, lin: torch.Tensor, quad: torch.Tensor,
                        max_c: float = float("inf")) -> torch.Tensor:
    """The root nearest 0 of ``const + 2 lin c + quad c^2`` per channel (the variance balance of a step).

    Without a real root the vertex ``-lin / quad`` (the ``c`` that comes closest); within ``+-max_c``.
    """
    safe = torch.where(quad > 0, quad, torch.ones_like(quad))
    disc = lin * lin - quad * const
    root = disc.clamp(min=0).sqrt()
    c1, c2 = (-lin - root) / safe, (-lin + root) / safe
    c = torch.where(c1.abs() <= c2.abs(), c1, c2)
    c = torch.where(disc >= 0, c, -lin / safe)
    linear = torch.where(lin != 0, -const / (2 * lin).where(lin != 0, torch.ones_like(lin)), torch.zeros_like(lin))
    c = torch.where(quad > 0, c, linear)
    return c.clamp(-max_c, max_c)


def between_evaluations(rho: torch.Tensor) -> torch.Tensor:
    """The correlation of errors of two *different* evaluations at calibrated levels ``[S, S, C]``.

    Off the diagonal it is the calibrated correlation. On it (two evaluations at the same level on
    different inputs, e.g. Heun's second call and the next step's first) it is the mean of the neighbouring
    levels' correlation, not the trivial 1 of an evaluation with itself.
    """
    s = rho.shape[0]
    out = rho.clone()
    if s == 1:
        out[0, 0] = 0.0
        return out
    idx = torch.arange(s)
    up = rho[idx[:-1], idx[1:]]  # rho(i, i+1) [S-1, C]
    diag = torch.zeros(s, rho.shape[-1], dtype=rho.dtype)
    count = torch.zeros(s, 1, dtype=rho.dtype)
    diag[:-1] += up
    diag[1:] += up
    count[:-1] += 1
    count[1:] += 1
    out[idx, idx] = diag / count
    return out
