"""Analytic Gaussian data with an exact denoiser, a planted-error "quantized" version of it, and its exact moments.

Per channel ``x0 ~ N(mu_c, s_c^2)``; at noise level sigma the exact denoiser is
``D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``, ``d = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2)``
and ``Var(d) = sigma^2 / (s^2 + sigma^2)``. The probability-flow ODE maps ``x_sigma`` linearly, so every
marginal is known exactly.

For the planted model ``d_hat = (1 + k) d + b + sqrt(var) z`` (:class:`PlantedErrorDenoiser`), along the exact
marginal ``d`` has mean 0 and variance ``v = sigma^2 / (s^2 + sigma^2)``, so the moments a calibration estimates
are known in closed form (:class:`AnalyticCalibration`, a Calibration stand-in)::

    mean_fp = 0,  var_fp = v,  mean_q = b,  var_q = (1 + k)^2 v + var,  cov = Cov(d, d_hat) = (1 + k) v

Used by the tests, the examples and the Gaussian benchmarks (:mod:`qdrift.bench.analytic`,
:mod:`qdrift.bench.baselines_gaussian`). Imports torch only.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

__all__ = ["GaussianData", "FlowGaussianData", "SpectralGaussianData", "SpeckleErrorDenoiser", "PlantedErrorDenoiser", "AnalyticCalibration", "channel_stats"]


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def _sigma_view(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.reshape((-1,) + (1,) * (x.ndim - 1)) if sigma.ndim else sigma


class GaussianData:
    """Per-channel Gaussian data ``N(mean_c, std_c^2)``.

    Args:
        mean: ``[C]`` channel means.
        std: ``[C]`` channel standard deviations (> 0).
    """

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if self.mean.shape != self.std.shape or not bool((self.std > 0).all()):
            raise ValueError("GaussianData: mean and std must have the same length and std must be > 0")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def denoiser(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        """The exact denoiser ``E[x0 | x]`` ``[B, C, ...]``."""
        s2, mu = _view(self.std**2, x), _view(self.mean, x)
        sig2 = _sigma_view(sigma, x) ** 2
        return (s2 * x + sig2 * mu) / (s2 + sig2)

    __call__ = denoiser

    def d_variance(self, sigma: float) -> torch.Tensor:
        """``Var(d)`` at sigma on the exact marginal ``[C]``: ``sigma^2 / (s^2 + sigma^2)``."""
        return sigma**2 / (self.std**2 + sigma**2)

    def marginal_var(self, sigma: float) -> torch.Tensor:
        """Variance of ``x_sigma`` ``[C]``: ``s^2 + sigma^2``."""
        return self.std**2 + sigma**2

    def prior(self, n: int, sigma_max: float, *, spatial=(), generator: Optional[torch.Generator] = None,
              dtype=torch.float64) -> torch.Tensor:
        """``[n, C, *spatial]`` samples of the exact marginal at ``sigma_max`` (mean mu, var s^2 + sigma^2)."""
        z = torch.randn((n, self.channels) + tuple(spatial), generator=generator, dtype=dtype)
        return _view(self.mean, z) + z * _view(self.marginal_var(sigma_max).sqrt(), z)

    def sample(self, n: int, *, spatial=(), generator: Optional[torch.Generator] = None, dtype=torch.float64):
        """``[n, C, *spatial]`` samples of the data."""
        return self.prior(n, 0.0, spatial=spatial, generator=generator, dtype=dtype)


class FlowGaussianData:
    """:class:`GaussianData` as a rectified flow: ``sigma`` is flow time ``t`` and ``x_t = (1 - t) x0 + t eps``.

    The exact denoiser is ``E[x0 | x_t] = mu + a s^2 (x - a mu) / (a^2 s^2 + t^2)`` with ``a = 1 - t`` (finite at
    ``t = 1``, where it is ``mu``); ``is_flow`` tells the samplers the state form. :class:`PlantedErrorDenoiser`
    on it plants its error in the flow's ``d`` (the velocity ``eps_hat - x0_hat``).
    """

    is_flow = True

    def __init__(self, data: GaussianData):
        self.data = data

    @property
    def channels(self) -> int:
        return self.data.channels

    def denoiser(self, x: torch.Tensor, t, **_) -> torch.Tensor:
        s2, mu = _view(self.data.std**2, x), _view(self.data.mean, x)
        t = _sigma_view(t, x)
        a = 1 - t
        return mu + a * s2 * (x - a * mu) / (a**2 * s2 + t**2)

    __call__ = denoiser

    def prior(self, n: int, *, spatial=(), generator: Optional[torch.Generator] = None,
              dtype=torch.float64) -> torch.Tensor:
        """``[n, C, *spatial]`` samples at ``t = 1``: standard normal noise."""
        return torch.randn((n, self.channels) + tuple(spatial), generator=generator, dtype=dtype)


class SpectralGaussianData:
    """Zero-mean stationary Gaussian fields whose power is constant on each radial frequency band.

    ``x0 = F^-1(sqrt(P) F z)`` with ``z`` white, ``P`` equal to ``band_var[b]`` on band ``b``
    (:func:`qdrift.correction.frequency_bands` of the grid): image-like when it falls with frequency. The exact
    denoiser is ``F^-1(P / (P + sigma^2) F x)``, bin by bin. Unlike :class:`GaussianData` (white data), a
    per-channel correction is not exact here, a per-band one is. Duck-types :class:`GaussianData` for
    :class:`PlantedErrorDenoiser` (one channel).

    Args:
        band_var: power per band ``[NB]`` (the variance a band would have if it held every bin).
        spatial: the grid, e.g. ``(16, 16)``.
    """

    channels = 1

    def __init__(self, band_var, spatial):
        from ..correction import frequency_bands

        self.band_var = torch.as_tensor(band_var, dtype=torch.float64)
        self.spatial = tuple(spatial)
        self.power = self.band_var[frequency_bands(self.spatial, len(self.band_var))]  # [*spatial]
        self._dims = tuple(range(-len(self.spatial), 0))

    def _filter(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.fftn(x.to(torch.float64), dim=self._dims)
        return torch.fft.ifftn(spec * gain, dim=self._dims).real.to(x.dtype)

    def denoiser(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        sig2 = _sigma_view(sigma, x).to(torch.float64) ** 2
        return self._filter(x, self.power / (self.power + sig2))

    __call__ = denoiser

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None, dtype=torch.float64) -> torch.Tensor:
        """``n`` clean fields ``[n, 1, *spatial]``."""
        z = torch.randn((n, 1) + self.spatial, generator=generator, dtype=torch.float64)
        return self._filter(z, self.power.sqrt()).to(dtype)

    def prior(self, n: int, sigma_max: float, *, generator: Optional[torch.Generator] = None,
              dtype=torch.float64) -> torch.Tensor:
        """``n`` draws of the noised marginal at ``sigma_max``."""
        x0 = self.sample(n, generator=generator)
        return (x0 + sigma_max * torch.randn(x0.shape, generator=generator, dtype=torch.float64)).to(dtype)


class SpeckleErrorDenoiser:
    """A stand-in for a coarsely quantized network: the exact denoiser plus a spatially high-pass error.

    The eps error is ``fresh * hp(z) + kept * hp(w)`` with ``hp(z) = z - blur3x3(z)`` (speckle, as coarse
    activations give): ``z`` fresh at every call, ``w`` drawn once per trajectory and kept along it (a call at a
    higher noise level than the previous one starts a new trajectory). It adds variance to the upper frequency
    bands only.

    Args:
        data: the data whose exact denoiser is corrupted (``denoiser(x, sigma)``), e.g. :class:`SpectralGaussianData`.
        fresh, kept: amplitudes of the fresh and kept parts.
        seed: seed of the private generator.
    """

    def __init__(self, data, fresh: float = 0.5, kept: float = 0.5, seed: int = 0):
        self.data, self.fresh, self.kept = data, float(fresh), float(kept)
        self.generator = torch.Generator().manual_seed(seed)
        self._field, self._last_sigma = None, None

    def _speckle(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, generator=self.generator, dtype=torch.float64).to(x)
        return z - torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False)

    def __call__(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        level = float(torch.as_tensor(sigma).reshape(-1)[0])
        if self._field is None or self._field.shape != x.shape or level > self._last_sigma:
            self._field = self._speckle(x)
        self._last_sigma = level
        error = self.fresh * self._speckle(x) + self.kept * self._field
        return self.data.denoiser(x, sigma) - _sigma_view(sigma, x) * error


class PlantedErrorDenoiser:
    """A stand-in for a quantized model: ``d_hat = (1 + gain) d + bias + sqrt(var) z + sqrt(persistent) w``.

    ``z`` is fresh at every call; ``w`` is a field drawn once per trajectory (per sample and position) and
    kept along it, as a real quantized network's error on nearby inputs is: errors at different steps of
    one trajectory are then correlated (``persistent / (var + persistent)``). A call at a higher noise level
    than the previous one starts a new trajectory. With ``persistent = 0`` the error ``delta = d_hat - d``
    has a known joint law with ``d_hat`` on the exact marginal, so the calibration target is known in closed
    form (:meth:`conditional_variance`).

    Args:
        data: the :class:`GaussianData` (or :class:`FlowGaussianData`) whose exact denoiser is corrupted.
        var: planted fresh-noise variance per channel ``[C]`` or scalar (eps units).
        gain: multiplicative error ``k`` (scalar or ``[C]``).
        bias: additive error ``b`` (scalar or ``[C]``).
        seed: seed of the private generator for ``z`` and ``w``.
        persistent: variance of the per-trajectory field ``w`` (scalar or ``[C]``).
    """

    def __init__(self, data: GaussianData, var=0.0, gain=0.0, bias=0.0, seed: int = 0, persistent=0.0):
        self.data = data
        self.is_flow = bool(getattr(data, "is_flow", False))  # a FlowGaussianData: the error is in the velocity
        c = data.channels
        self.var = torch.as_tensor(var, dtype=torch.float64).expand(c).clone()
        self.gain = torch.as_tensor(gain, dtype=torch.float64).expand(c).clone()
        self.bias = torch.as_tensor(bias, dtype=torch.float64).expand(c).clone()
        self.persistent = torch.as_tensor(persistent, dtype=torch.float64).expand(c).clone()
        if bool((self.var < 0).any()) or bool((self.persistent < 0).any()):
            raise ValueError("PlantedErrorDenoiser: var and persistent must be >= 0")
        self.generator = torch.Generator().manual_seed(seed)
        self._field, self._last_sigma = None, None

    def __call__(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        den = self.data.denoiser(x, sigma)
        sig = _sigma_view(sigma, x)
        d = (x - den) / sig
        z = torch.randn(x.shape, generator=self.generator, dtype=torch.float64).to(x)
        d_hat = d * (1 + _view(self.gain, x)) + _view(self.bias, x) + z * _view(self.var.sqrt(), x)
        if bool((self.persistent > 0).any()):
            level = float(torch.as_tensor(sigma).reshape(-1)[0])
            if self._field is None or self._field.shape != x.shape or level > self._last_sigma:
                self._field = torch.randn(x.shape, generator=self.generator, dtype=torch.float64)
            self._last_sigma = level
            d_hat = d_hat + self._field.to(x) * _view(self.persistent.sqrt(), x)
        return x - sig * d_hat

    def unconditional_variance(self, sigma: float) -> torch.Tensor:
        """``Var(delta)`` on the exact marginal ``[C]``: ``k^2 Var(d) + var``."""
        return self.gain**2 * self.data.d_variance(sigma) + self.var

    def conditional_variance(self, sigma: float) -> torch.Tensor:
        """``Var(delta | d_hat)`` on the exact marginal ``[C]`` (linear-Gaussian, exact here)."""
        vd = self.data.d_variance(sigma)
        k, v = self.gain, self.var
        var_delta = k**2 * vd + v
        cov = k * (1 + k) * vd + v
        var_hat = (1 + k) ** 2 * vd + v
        return (var_delta - cov**2 / var_hat).clamp(min=0)


class AnalyticCalibration:
    """Exact ``moments_at`` / ``at`` of a planted-error model on the exact marginals.

    Args:
        planted: the :class:`PlantedErrorDenoiser` (its ``persistent`` field is not modelled).
    """

    def __init__(self, planted: PlantedErrorDenoiser):
        if not isinstance(planted, PlantedErrorDenoiser):
            raise ValueError(f"AnalyticCalibration needs a PlantedErrorDenoiser, got {type(planted).__name__}")
        self.planted = planted

    def moments_at(self, sigmas: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Moments ``[N, C]`` float64 with keys ``mean_fp, mean_q, var_fp, var_q, cov`` at ``sigmas [N]``."""
        p = self.planted
        sig2 = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1, 1) ** 2
        vf = sig2 / (p.data.std[None] ** 2 + sig2)
        g = 1 + p.gain[None]
        return {
            "mean_fp": torch.zeros_like(vf),
            "mean_q": p.bias[None].expand_as(vf).clone(),
            "var_fp": vf,
            "var_q": g * g * vf + p.var[None],
            "cov": g * vf,
        }

    def at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``V = Var(delta | d_hat)`` ``[N, C]`` float32 at ``sigmas [N]``."""
        m = self.moments_at(sigmas)
        var_delta = m["var_q"] + m["var_fp"] - 2 * m["cov"]
        cov_dq = m["var_q"] - m["cov"]
        safe = m["var_q"].clamp(min=1e-300)
        return (var_delta - cov_dq**2 / safe).clamp(min=0).to(torch.float32)


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sample mean and variance of ``x [B, C, ...]`` -> ``([C], [C])`` float64."""
    dims = [0] + list(range(2, x.ndim))
    x = x.double()
    return x.mean(dims), x.var(dims)
