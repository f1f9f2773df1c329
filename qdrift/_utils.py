"""Small shared helpers in the k-diffusion idiom: schedules, ``to_d``, noise samplers.

The core never imports k-diffusion; these helpers reproduce its conventions so that a qdrift sampler
with ``V=None`` gives the same result as the k-diffusion sampler of the same name.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "append_dims",
    "append_zero",
    "to_d",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_ancestral_step",
    "get_ancestral_step_flow",
    "ancestral_step",
    "half_log_snr",
    "signal_scale",
    "default_noise_sampler",
    "BrownianTreeNoiseSampler",
]


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Appends trailing singleton dimensions to ``x`` until it has ``target_dims`` dimensions.

    Args:
        x: tensor of any shape ``[*s]``.
        target_dims: the wanted number of dimensions, ``>= x.ndim``.

    Returns:
        A view of ``x`` with shape ``[*s, 1, ..., 1]``.
    """
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Appends a final 0 to a 1-D schedule."""
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Converts a denoiser output to the Karras ODE derivative ``d = (x - D) / sigma``.

    For an eps or v model this is the eps estimate; for a flow model presented as a denoiser
    (``D = x - t v``) it is the velocity.

    Args:
        x: current sample ``[B, C, ...]``.
        sigma: noise level, scalar or ``[B]``.
        denoised: denoiser output ``[B, C, ...]``.
    """
    sigma = torch.as_tensor(sigma, device=x.device)
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """The noise schedule of Karras et al. (2022), Eq. 5: ``n`` levels plus a final 0 (``[n + 1]``)."""
    _check_schedule_args(n, sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho < math.inf:
        raise ValueError(f"schedule: rho must be a finite number > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """A schedule uniform in log-sigma: ``n`` levels plus a final 0 (``[n + 1]``)."""
    _check_schedule_args(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def _check_schedule_args(n: int, sigma_min: float, sigma_max: float) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or int(n) != n or n < 1:
        raise ValueError(f"schedule: n must be a positive integer, got {n!r}")
    if not (0 < sigma_min <= sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(
            f"schedule: need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
        )


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Splits an ancestral step into a deterministic step to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)`` (k-diffusion's convention).
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def get_ancestral_step_flow(t_from, t_to, eta: float = 1.0):
    """The ancestral step of a rectified flow ``x_t = (1 - t) x0 + t eps`` (ComfyUI's "RF" convention).

    Derivation. A deterministic step from ``t_from`` to a lower ``t_down`` leaves ``x_down ~ (1 - t_down) x0 +
    t_down eps'``: the signal is scaled by ``1 - t_down``, not 1 as in the VE form ``x = x0 + sigma eps``, so
    fresh noise cannot simply be added. Scaling by ``(1 - t_to) / (1 - t_down)`` gives the right signal
    ``(1 - t_to) x0`` with noise std ``t_down (1 - t_to) / (1 - t_down)``; independent noise of std
    ``sigma_up = sqrt(t_to^2 - t_down^2 (1 - t_to)^2 / (1 - t_down)^2)`` brings the noise to ``t_to``. ComfyUI
    chooses ``t_down = t_to (1 + (t_to / t_from - 1) eta)`` (linear in eta: ``t_to`` at eta 0, ``t_to^2 / t_from``
    at eta 1), taken here too so strength 0 matches its ``sample_euler_ancestral_RF``.

    Returns:
        ``(t_down, sigma_up, scale)``: step deterministically to ``t_down``, multiply by ``scale``, add
        ``sigma_up`` times standard noise.
    """
    t_down = t_to * (1 + (t_to / t_from - 1) * eta)
    scale = (1 - t_to) / (1 - t_down)
    up2 = t_to**2 - (t_down * scale) ** 2
    return t_down, (up2 if up2 > 0 else up2 * 0) ** 0.5, scale


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0, flow: bool = False):
    """``(sigma_down, sigma_up, scale)`` of an ancestral step in either state form.

    VE (``x = x0 + sigma eps``): k-diffusion's :func:`get_ancestral_step` and ``scale = 1.0`` (a no-op factor,
    exact in floating point). Rectified flow: :func:`get_ancestral_step_flow`.
    """
    if flow:
        return get_ancestral_step_flow(sigma_from, sigma_to, eta)
    return (*get_ancestral_step(sigma_from, sigma_to, eta), 1.0)


def half_log_snr(sigma, flow: bool = False):
    """``lambda = log(alpha / sigma)`` of the state ``x = alpha x0 + sigma eps`` (DPM-Solver's time variable).

    VE (k-diffusion): ``alpha = 1``, ``lambda = -log sigma``. Rectified flow (sigma = t): ``alpha = 1 - t``,
    ``lambda = log((1 - t) / t)``. Tensors (``[]`` or ``[B]``) or Python floats.
    """
    if isinstance(sigma, torch.Tensor):
        return sigma.logit().neg() if flow else sigma.log().neg()
    return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)


def signal_scale(sigma, flow: bool = False):
    """``alpha``, the data's coefficient in the state: ``1.0`` (VE, a no-op factor) or ``1 - t`` (flow)."""
    return 1 - sigma if flow else 1.0


def default_noise_sampler(x: torch.Tensor, seed: Optional[int] = None) -> NoiseSampler:
    """Standard normal noise shaped like ``x``.

    Args:
        x: template tensor (shape, dtype, device).
        seed: if given, a private ``torch.Generator`` seeded with it is used (no global RNG side
            effects); if None, the global RNG is used, exactly like k-diffusion's default.
    """
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(
        x.shape, dtype=x.dtype, device=x.device, generator=generator
    )


class _BatchedBrownianTree:
    """One ``torchsde.BrownianTree`` per seed; stacks their increments along the batch axis."""

    def __init__(self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, seed, **kwargs):
        import torchsde  # deferred: only the SDE samplers need it

        t0, t1, self.sign = self._sort(t0, t1)
        w0 = kwargs.pop("w0", torch.zeros_like(x))
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, Sequence)
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler: got {len(seed)} seeds for a batch of {x.shape[0]}")
            w0 = w0[0]
        else:
            seed = [seed]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seed]
        # The span torchsde compares queries against (it keeps its own rounded copy of t0 and t1; a torchsde
        # without those attributes falls back to the given levels).
        interval = getattr(self.trees[0], "_interval", None)
        self._span = (float(getattr(interval, "_start", t0)), float(getattr(interval, "_end", t1)))
        self.tol = float(kwargs.get("tol", 1e-6))  # torchsde's default resolution
        self._shape, self._dtype, self._device = tuple(x.shape), x.dtype, x.device
        self._generators = [torch.Generator().manual_seed(int(s) % 2**63) for s in seed]

    def fresh(self) -> torch.Tensor:
        """Standard normal noise of the template's shape (per seed, along the batch axis when batched)."""
        if self.batched:
            noise = torch.stack([torch.randn(self._shape[1:], generator=g, dtype=torch.float64) for g in self._generators])
        else:
            noise = torch.randn(self._shape, generator=self._generators[0], dtype=torch.float64)
        return noise.to(device=self._device, dtype=self._dtype)

    @staticmethod
    def _sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self._sort(t0, t1)
        # torchsde clamps a query outside the tree's span (with a warning); a float64 schedule queried against a
        # tree built on float32 levels lands a rounding error outside it: clamp here, the result is the same.
        lo, hi = self._span
        t0, t1 = min(max(float(t0), lo), hi), min(max(float(t1), lo), hi)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """Noise from a Brownian tree (torchsde): the same sample path whatever the step sizes.

    ``sampler(sigma, sigma_next)`` returns the Brownian increment over ``[sigma_next, sigma]`` divided by
    its standard deviation, so it is standard normal; repeated calls over nested intervals are
    consistent, which keeps SDE samplers convergent as the step count grows.

    Args:
        x: template tensor ``[B, ...]`` (shape, device, dtype).
        sigma_min: low end of the valid interval (> 0).
        sigma_max: high end of the valid interval.
        seed: an int, a list of ``B`` ints (one tree per batch item), or None (drawn from the global RNG,
            as k-diffusion does).
        transform: maps sigma to the tree's internal time.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        self.transform = transform
        t0 = self.transform(torch.as_tensor(sigma_min))
        t1 = self.transform(torch.as_tensor(sigma_max))
        self.tree = _BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        if float((t1 - t0).abs()) <= self.tree.tol:
            # Below the trees' resolution torchsde recurses without end (k-diffusion's sampler too): the
            # increment of so short an interval is drawn on its own (standard normal, reproducible per seed).
            return self.tree.fresh()
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()
