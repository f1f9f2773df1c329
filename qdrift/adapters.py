"""Wrap a raw network into a k-diffusion denoiser ``D(x, sigma, **extra_args) -> x0``.

Samplers never branch on parameterization: every model reaches them as a denoiser in k-diffusion's
variance-exploding form ``x = x0 + sigma * eps``. The adapters convert:

=========================  ================================  =============================================
adapter                    network predicts                  ``D(x, sigma)``
=========================  ================================  =============================================
:class:`DiscreteEpsDenoiser` eps on a discrete VP schedule     ``x - sigma * eps(c_in x, t(sigma))``
:class:`DiscreteVDenoiser`   v on a discrete VP schedule       ``c_skip x + c_out v(c_in x, t(sigma))``
:class:`ContinuousEpsDenoiser` eps, continuous sigma           as the discrete one, ``t = time_fn(sigma)``
:class:`ContinuousVDenoiser` v, continuous sigma               as the discrete one, ``t = time_fn(sigma)``
:class:`FlowDenoiser`        rectified-flow velocity            ``x - t v(x, t)`` with ``sigma = t``
:class:`X0Denoiser`          x0                                ``x0(x, time_fn(sigma))``
=========================  ================================  =============================================

with ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``
(k-diffusion ``external.py``; Salimans & Ho 2022 for v). The VP schedule's ``alphas_cumprod`` give
``sigma_t = sqrt((1 - abar_t) / abar_t)`` and ``x_ve = x_vp / sqrt(abar_t)``; for a rectified flow
``x_t = (1 - t) x0 + t eps`` the sampler state is ``x_t`` itself and ``to_d`` is the velocity, so Euler on
it is flow-matching Euler (as ComfyUI presents SD3/FLUX).

Every adapter checks the network's output before using it: a floating-point tensor of exactly x's shape, or a
``ValueError`` naming the adapter, the shape and dtype it got and x's shape (an output that merely broadcasts,
``[B, 1, ...]``, ``[1, C, ...]`` or 0-d, is refused; so is a learned-sigma network's ``2C``-channel output, whose
variance channels the caller splits off).

Options are checked at construction (``sigma_min``/``sigma_max`` real numbers with ``0 < sigma_min < sigma_max``,
``time_fn`` None or callable, ``quantize``/``scale_input`` True or False: a truthy ``"no"`` is refused), and a
custom ``time_fn``'s output is checked finite at each call, as sigma is, before the network sees it.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
from torch import nn

from ._utils import append_dims, get_sigmas_karras
from .validation import FLOW_T_SLACK, _describe, _integer, _real, flag_arg, real_arg

__all__ = [
    "DiscreteSchedule",
    "DiscreteEpsDenoiser",
    "DiscreteVDenoiser",
    "ContinuousEpsDenoiser",
    "ContinuousVDenoiser",
    "FlowDenoiser",
    "X0Denoiser",
    "get_sigmas_flow",
]


def _sigma_batch(sigma, x: torch.Tensor, name: str = "denoiser", upper: float = math.inf) -> torch.Tensor:
    """Sigma as ``[B]`` in at least float32 (a bf16 sigma cannot even hold timestep 999), checked at the boundary.

    Refuses a non-floating ``x``, and a sigma that is NaN, negative, infinite or above ``upper`` (a network
    would otherwise get NaN timesteps or an input scaled by NaN).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"{name}: x must be a floating-point tensor [batch, ...], got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    try:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: sigma must be a number or a tensor, got {type(sigma).__name__}") from None
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: sigma must be a scalar or [batch={x.shape[0]}], got shape {tuple(sigma.shape)}")
    if not bool(((sigma >= 0) & (sigma <= upper) & torch.isfinite(sigma)).all()):
        bound = "finite and >= 0" if upper == math.inf else f"in [0, {round(upper):g}] (flow time)"
        raise ValueError(f"{name}: sigma must be {bound}, got {sigma.tolist()}")
    return sigma


def _time_fn(time_fn, name: str) -> Callable:
    """The sigma -> network time map (None: sigma itself), refused at construction unless callable."""
    if time_fn is None:
        return _identity
    if not callable(time_fn):
        raise ValueError(f"{name}: time_fn must be None or a callable sigma [B] -> time, got {time_fn!r:.80} "
                         f"({type(time_fn).__name__})")
    return time_fn


def _network_time(time_fn: Callable, sigma: torch.Tensor, name: str):
    """``time_fn(sigma)``, refused if it holds NaN or inf (the network would get a NaN timestep); the identity is
    not checked again (sigma is). One check per call, like sigma's."""
    t = time_fn(sigma)
    if time_fn is _identity:
        return t
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        finite = bool(torch.isfinite(t).all())
    else:
        finite = not isinstance(t, numbers.Real) or math.isfinite(t)
    if not finite:
        got = t.tolist() if isinstance(t, torch.Tensor) else t
        raise ValueError(f"{name}: time_fn returned {got} for sigma {sigma.tolist()}; expected finite times")
    return t


def _network_output(out, x: torch.Tensor, name: str) -> torch.Tensor:
    """The network's output, refused unless a floating-point tensor of exactly x's shape; returned unchanged.

    An output that merely broadcasts (``[B, 1, ...]``, ``[1, C, ...]``, 0-d) would otherwise give a D of x's
    shape that no later check can tell from a good one. A network that also learns its variance (DiT/ADM's
    learned sigma: ``2C`` channels) is named as such; its variance channels are the caller's to split off.
    Shape and dtype only: no reduction, no change to the arithmetic.
    """
    if isinstance(out, torch.Tensor) and out.shape == x.shape and out.is_floating_point():
        return out
    hint = ""
    if (
        isinstance(out, torch.Tensor) and x.ndim >= 2 and out.ndim == x.ndim and out.shape[0] == x.shape[0]
        and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]
    ):
        c = x.shape[1]
        hint = (
            f" (its {2 * c} channels are twice x's {c}: a network that also predicts its variance, as DiT/ADM "
            f"with learned sigma do, needs the variance channels split off, e.g. wrap it to return out[:, :{c}])"
        )
    raise ValueError(
        f"{name}: the network returned {_describe(out)}; expected a floating-point tensor of x's shape "
        f"{tuple(x.shape)}{hint}"
    )


class _VEDenoiser(nn.Module):
    """Common parts of the denoisers in k-diffusion's VE form (``x = x0 + sigma eps``)."""

    def __init__(self, inner_model: Callable, sigma_min: float, sigma_max: float):
        super().__init__()
        if not callable(inner_model):
            raise ValueError(f"{type(self).__name__}: the network must be callable, got {type(inner_model).__name__}")
        who = type(self).__name__
        sigma_min, sigma_max = real_arg(who, "sigma_min", sigma_min), real_arg(who, "sigma_max", sigma_max)
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"{type(self).__name__}: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.inner_model = inner_model
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sampler's start ``latent + sigma * noise`` (``latent=None``: pure noise, ``x = sigma_max * noise``)."""
        x = noise * sigma
        return x if latent is None else latent + x

    def get_sigmas(self, n: int, rho: float = 7.0, device="cpu") -> torch.Tensor:
        """A Karras schedule over this model's range: ``[n + 1]`` ending in 0."""
        return get_sigmas_karras(n, self.sigma_min, self.sigma_max, rho=rho, device=device)


class DiscreteSchedule(nn.Module):
    """A discrete VP schedule from ``alphas_cumprod`` with sigma <-> timestep maps (both ways interpolated).

    Args:
        alphas_cumprod: ``abar_t`` ``[T]``, decreasing in t, in (0, 1) (1 is rejected: sigma = 0 has no log-sigma).
        quantize: round timesteps to integers (for networks that only accept integer t).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, quantize: bool = False):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("DiscreteSchedule: alphas_cumprod must be 1-D, length >= 2, values in (0, 1)")
        sigmas = ((1 - ac) / ac).sqrt()
        if bool((sigmas[1:] <= sigmas[:-1]).any()):
            raise ValueError("DiscreteSchedule: alphas_cumprod must be strictly decreasing")
        # Plain float64 attributes, not buffers: `.half()` on a wrapper must not round the schedule.
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.quantize = flag_arg("DiscreteSchedule", "quantize", quantize)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: Optional[bool] = None) -> torch.Tensor:
        """Fractional timestep of ``sigma`` (linear in log-sigma between grid points; clamped to [0, T-1])."""
        quantize = self.quantize if quantize is None else flag_arg("DiscreteSchedule.sigma_to_t", "quantize", quantize)
        if not bool(((sigma >= 0) & (sigma < math.inf)).all()):
            raise ValueError(f"DiscreteSchedule.sigma_to_t: sigma must be finite and >= 0, got {sigma.tolist()}")
        grid = self.log_sigmas.to(sigma.device)
        ls = sigma.to(torch.float64).log()
        hi = torch.searchsorted(grid, ls.contiguous()).clamp(1, len(grid) - 1)
        lo = hi - 1
        w = ((ls - grid[lo]) / (grid[hi] - grid[lo])).clamp(0, 1)
        t = lo.to(torch.float64) + w
        # float32 timesteps (int64 when quantized) whatever the sample's dtype, as k-diffusion does.
        return t.round().long() if quantize else t.to(torch.promote_types(sigma.dtype, torch.float32))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep, interpolated in log-sigma."""
        grid = self.log_sigmas.to(t.device)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"DiscreteSchedule.t_to_sigma: t must be finite, got {t.tolist()}")
        tt = t.to(torch.float64).clamp(0, len(grid) - 1)
        lo = tt.floor().long().clamp(max=len(grid) - 2)
        w = tt - lo
        log_sigma = (1 - w) * grid[lo] + w * grid[lo + 1]
        return log_sigma.exp().to(torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32)


class DiscreteEpsDenoiser(_VEDenoiser):
    """An eps-prediction network on a discrete VP schedule (Stable Diffusion 1.x/2.x-base, SDXL).

    Args:
        inner_model: ``net(x_vp [B, C, ...], t [B], **extra) -> eps``.
        alphas_cumprod: the training schedule's ``abar_t`` ``[T]``.
        quantize: pass integer timesteps to the network.
    """

    def __init__(self, inner_model: Callable, alphas_cumprod: torch.Tensor, quantize: bool = False):
        schedule = DiscreteSchedule(alphas_cumprod, flag_arg(type(self).__name__, "quantize", quantize))
        super().__init__(inner_model, schedule.sigma_min, schedule.sigma_max)
        self.schedule = schedule

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.t_to_sigma(t)

    def _scalings(self, sigma, x):
        sigma = append_dims(sigma, x.ndim)
        return sigma, 1 / (sigma**2 + 1) ** 0.5

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        sigma = _sigma_batch(sigma, x, type(self).__name__)
        s, c_in = self._scalings(sigma, x)
        eps = self.inner_model((x * c_in).to(x.dtype), self.sigma_to_t(sigma), **extra_args)
        eps = _network_output(eps, x, type(self).__name__)
        return (x - eps * s).to(x.dtype)


class DiscreteVDenoiser(DiscreteEpsDenoiser):
    """A v-prediction network on a discrete VP schedule (SD 2.x-v): ``v = sqrt(abar) eps - sqrt(1-abar) x0``."""

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        sigma = _sigma_batch(sigma, x, type(self).__name__)
        s, c_in = self._scalings(sigma, x)
        v = self.inner_model((x * c_in).to(x.dtype), self.sigma_to_t(sigma), **extra_args)
        v = _network_output(v, x, type(self).__name__)
        return (x / (s**2 + 1) - v * s / (s**2 + 1) ** 0.5).to(x.dtype)


_T_SLACK = FLOW_T_SLACK  # flow time may exceed 1 by rounding this much
"""Rounding slack above flow time 1 (a shifted schedule's first value may round to 1 + 1 ulp)."""


def _identity(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


class ContinuousEpsDenoiser(_VEDenoiser):
    """An eps network on continuous noise levels (VP input scaling ``c_in = 1/sqrt(sigma^2+1)`` by default).

    Args:
        inner_model: ``net(c_in x, time_fn(sigma), **extra) -> eps``.
        sigma_min, sigma_max: the trained range.
        time_fn: maps sigma ``[B]`` to the network's time input (default: sigma itself).
        scale_input: apply ``c_in`` (VP networks) or not (VE networks see ``x`` itself).
    """

    def __init__(self, inner_model, sigma_min: float, sigma_max: float, time_fn=None, scale_input: bool = True):
        super().__init__(inner_model, sigma_min, sigma_max)
        self.time_fn = _time_fn(time_fn, type(self).__name__)
        self.scale_input = flag_arg(type(self).__name__, "scale_input", scale_input)

    def _net(self, x, sigma, extra_args):
        s = append_dims(sigma, x.ndim)
        c_in = 1 / (s**2 + 1) ** 0.5 if self.scale_input else 1.0
        t = _network_time(self.time_fn, sigma, type(self).__name__)
        out = self.inner_model((x * c_in).to(x.dtype), t, **extra_args)
        return s, _network_output(out, x, type(self).__name__)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        s, eps = self._net(x, _sigma_batch(sigma, x, type(self).__name__), extra_args)
        return (x - eps * s).to(x.dtype)


class ContinuousVDenoiser(ContinuousEpsDenoiser):
    """A v network on continuous noise levels: ``D = c_skip x + c_out v(c_in x, time_fn(sigma))``."""

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        s, v = self._net(x, _sigma_batch(sigma, x, type(self).__name__), extra_args)
        return (x / (s**2 + 1) - v * s / (s**2 + 1) ** 0.5).to(x.dtype)


class X0Denoiser(_VEDenoiser):
    """A network that predicts x0 directly from ``(x, time_fn(sigma))``."""

    def __init__(self, inner_model, sigma_min: float, sigma_max: float, time_fn=None):
        super().__init__(inner_model, sigma_min, sigma_max)
        self.time_fn = _time_fn(time_fn, type(self).__name__)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        t = _network_time(self.time_fn, _sigma_batch(sigma, x, type(self).__name__), type(self).__name__)
        x0 = self.inner_model(x, t, **extra_args)
        return _network_output(x0, x, type(self).__name__)


def get_sigmas_flow(n: int, shift: float = 1.0, device="cpu") -> torch.Tensor:
    """Flow-matching times ``[n + 1]`` from 1 to 0, uniform then shifted: ``t' = s t / (1 + (s - 1) t)``.

    Raises:
        ValueError: unless ``n`` is a positive integer and ``shift`` a real number in ``[0.01, 100]`` (ComfyUI's
            shift widgets reach 100; below 0.01 float32 cancellation moves the first time off 1, e.g. 0.987 at
            1e-6 and inf at 1e-8), or if the times round to repeated values (a large shift with many steps).
    """
    count = _integer(n)
    if count is None or count < 1:
        raise ValueError(f"get_sigmas_flow: n must be a positive integer, got {n!r}")
    if _real(shift) is None or not 0.01 <= _real(shift) <= 100:
        raise ValueError(f"get_sigmas_flow: shift must be a real number in [0.01, 100] (float32 cannot hold the "
                         f"shifted times outside it), got {shift!r}")
    t = torch.linspace(1, 0, count + 1, device=device)
    sigmas = shift * t / (1 + (shift - 1) * t)
    if bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError(f"get_sigmas_flow: with n={n!r} and shift={shift!r} the times round to repeated values in "
                         f"{sigmas.dtype}; use fewer steps or a shift nearer 1")
    return sigmas


class FlowDenoiser(nn.Module):
    """A rectified-flow velocity network presented as a denoiser (sigma = flow time t).

    With ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``, ``D(x, t) = x - t v``, so ``to_d`` returns the
    velocity and every qdrift sampler integrates the flow ODE in t; Euler is the paper's flow-matching Euler.
    ``V`` is then the variance of the velocity error.

    Args:
        inner_model: ``net(x_t [B, C, ...], t * time_scale [B], **extra) -> v``.
        time_scale: 1 for networks taking t in [0, 1] (FLUX), 1000 for SD3-style timesteps.
        shift: default time shift for :meth:`get_sigmas`.
    """

    sigma_min = 0.0
    sigma_max = 1.0
    is_flow = True  # the ancestral / SDE samplers then inject noise in the flow form (their ``flow`` option)

    def __init__(self, inner_model: Callable, time_scale: float = 1.0, shift: float = 1.0):
        super().__init__()
        if not callable(inner_model):
            raise ValueError(f"FlowDenoiser: the network must be callable, got {type(inner_model).__name__}")
        for label, value in (("time_scale", time_scale), ("shift", shift)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"FlowDenoiser: {label} must be a finite number > 0, got {value!r}")
        self.inner_model = inner_model
        self.time_scale = float(time_scale)
        self.shift = float(shift)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        t = _sigma_batch(sigma, x, "FlowDenoiser", upper=1.0 + _T_SLACK)  # flow time lives in [0, 1]
        v = _network_output(self.inner_model(x, t * self.time_scale, **extra_args), x, type(self).__name__)
        return (x - v * append_dims(t, x.ndim)).to(x.dtype)

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flow's start ``t noise + (1 - t) latent`` (pure noise at t = 1)."""
        x = noise * sigma
        return x if latent is None else x + latent * (1 - sigma)

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        """``n`` flow steps from t = 1 to 0 with this model's shift."""
        return get_sigmas_flow(n, self.shift, device=device)
