"""Small shared helpers in the k-diffusion idiom: schedules, ``to_d``, noise samplers.

The core never imports k-diffusion; these helpers reproduce its conventions so that a qdrift sampler
with ``V=None`` gives the same result as the k-diffusion sampler of the same name.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .validation import _integer, _real, check_knobs, real_arg

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
    """The noise schedule of Karras et al. (2022), Eq. 5: ``n`` levels plus a final 0 (``[n + 1]``).

    Raises:
        ValueError: unless ``n`` is a positive integer, ``0 < sigma_min <= sigma_max < inf`` (equal only for
            ``n = 1``) and ``rho`` a finite number > 0, or if the levels overflow, underflow or repeat in float32.
    """
    who = "get_sigmas_karras"
    n = _check_schedule_args(who, n, sigma_min, sigma_max)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho < math.inf:
        raise ValueError(f"{who}: rho must be a finite number > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, n)
    try:
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
    except OverflowError:  # a Python float power past 1.8e308 (a tiny rho)
        raise ValueError(_levels_error(who, "overflow float64", n, sigma_min, sigma_max, rho=rho)) from None
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(_check_levels(who, sigmas, n, sigma_min, sigma_max, rho=rho)).to(device)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """A schedule uniform in log-sigma: ``n`` levels plus a final 0 (``[n + 1]``).

    Raises:
        ValueError: as :func:`get_sigmas_karras` (without rho).
    """
    who = "get_sigmas_exponential"
    n = _check_schedule_args(who, n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(_check_levels(who, sigmas, n, sigma_min, sigma_max))


def _check_schedule_args(who: str, n, sigma_min, sigma_max) -> int:
    """``n`` as an int once ``n`` (a positive integer), ``sigma_min`` and ``sigma_max`` (real numbers with
    ``0 < sigma_min <= sigma_max < inf``, equal only for one level) are checked."""
    count = _integer(n)
    if count is None or count < 1:
        raise ValueError(f"{who}: n must be a positive integer (the number of levels), got {n!r}")
    lo, hi = real_arg(who, "sigma_min", sigma_min), real_arg(who, "sigma_max", sigma_max)
    if not (0 < lo <= hi < math.inf):
        raise ValueError(
            f"{who}: need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
        )
    if lo == hi and count > 1:
        raise ValueError(
            f"{who}: sigma_min == sigma_max ({sigma_min!r}) would repeat one level {count} times, which no sampler "
            "accepts (levels must strictly decrease); need sigma_min < sigma_max, or n=1"
        )
    return count


def _levels_error(who: str, what: str, n, sigma_min, sigma_max, **more) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in dict(n=n, sigma_min=sigma_min, sigma_max=sigma_max, **more).items())
    return f"{who}: the levels {what} with {args}; choose arguments whose levels stay finite, > 0 and distinct"


def _check_levels(who: str, sigmas: torch.Tensor, n, sigma_min, sigma_max, **more) -> torch.Tensor:
    """``sigmas`` (the levels before the final 0) unchanged if finite, > 0 and strictly decreasing; else a
    ``ValueError`` naming the arguments (each valid alone, together they overflow, underflow or round)."""
    what = None
    if not bool(torch.isfinite(sigmas).all()):
        what = f"overflow {sigmas.dtype} (inf or NaN)"
    elif not bool((sigmas > 0).all()):
        what = f"underflow to 0 in {sigmas.dtype}"
    elif bool((sigmas[1:] >= sigmas[:-1]).any()):
        what = f"round to repeated values in {sigmas.dtype}"
    if what is not None:
        raise ValueError(_levels_error(who, what, n, sigma_min, sigma_max, **more))
    return sigmas


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Splits an ancestral step into a deterministic step to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)`` (k-diffusion's convention, its values unchanged).

    Args:
        sigma_from, sigma_to: the step's levels (numbers or 0-d tensors), ``0 <= sigma_to <= sigma_from``.
        eta: ancestral noise amount, a finite number >= 0; unless it is 0, ``sigma_from`` must be > 0.

    Raises:
        ValueError: for levels out of that order or not real, or a bad ``eta``, naming the values.
    """
    _check_step("get_ancestral_step", ("sigma_from", sigma_from), ("sigma_to", sigma_to), eta)
    return _ve_step(sigma_from, sigma_to, eta)


def _ve_step(sigma_from, sigma_to, eta):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _check_step(who: str, start, end, eta, flow: bool = False) -> None:
    """Refuses a step that does not go down in noise (``0 <= to <= from``), one that divides by ``from = 0``
    (any flow step, a VE step with ``eta != 0``) and, on a flow, one that ends at ``t >= 1`` (its signal
    ``1 - t`` is 0 there: the step's scale divides by it)."""
    check_knobs(who, eta=eta)
    what = "a real number or a 0-d tensor"
    (a_name, a), (b_name, b) = ((name, real_arg(who, name, value, what)) for name, value in (start, end))
    if not 0 <= b <= a:
        raise ValueError(f"{who}: a step goes down in noise: need 0 <= {b_name} <= {a_name}, got {a_name}={a!r}, "
                         f"{b_name}={b!r}")
    if a == 0 and (flow or eta):
        raise ValueError(f"{who}: {a_name} must be > 0 (the step divides by it), got {a_name}={a!r}, {b_name}={b!r}")
    if flow and b >= 1:
        raise ValueError(f"{who}: a flow step must end below t = 1 (its signal 1 - t is 0 there), got {a_name}={a!r}, "
                         f"{b_name}={b!r}")


def get_ancestral_step_flow(t_from, t_to, eta: float = 1.0):
    """The ancestral step of a rectified flow ``x_t = (1 - t) x0 + t eps`` (ComfyUI's "RF" convention).

    Derivation. A deterministic step from ``t_from`` to a lower ``t_down`` leaves ``x_down ~ (1 - t_down) x0 +
    t_down eps'``: the signal is scaled by ``1 - t_down``, not 1 as in the VE form ``x = x0 + sigma eps``, so
    fresh noise cannot simply be added. Scaling by ``(1 - t_to) / (1 - t_down)`` gives the right signal
    ``(1 - t_to) x0`` with noise std ``t_down (1 - t_to) / (1 - t_down)``; independent noise of std
    ``sigma_up = sqrt(t_to^2 - t_down^2 (1 - t_to)^2 / (1 - t_down)^2)`` brings the noise to ``t_to``. ComfyUI
    chooses ``t_down = t_to (1 + (t_to / t_from - 1) eta)`` (linear in eta: ``t_to`` at eta 0, ``t_to^2 / t_from``
    at eta 1), taken here too so strength 0 matches its ``sample_euler_ancestral_RF``.

    ``t_down >= 0`` needs ``eta <= t_from / (t_from - t_to)``: a larger eta would integrate past t = 0 (ComfyUI
    does not clamp it either), and is refused.

    Returns:
        ``(t_down, sigma_up, scale)``: step deterministically to ``t_down``, multiply by ``scale``, add
        ``sigma_up`` times standard noise.

    Raises:
        ValueError: unless ``0 <= t_to <= t_from``, ``t_from > 0``, ``t_to < 1`` and ``t_down >= 0``.
    """
    who = "get_ancestral_step_flow"
    _check_step(who, ("t_from", t_from), ("t_to", t_to), eta, flow=True)
    t_down, sigma_up, scale = _flow_step(t_from, t_to, eta)
    if t_down < 0:
        a, b = _real(t_from), _real(t_to)
        raise ValueError(
            f"{who}: eta={eta!r} takes the flow step from t={a:.6g} to t={b:.6g} past t = 0 (t_down="
            f"{_real(t_down):.6g}); this step allows eta <= t_from / (t_from - t_to) = {a / (a - b):.6g}"
        )
    return t_down, sigma_up, scale


def _flow_step(t_from, t_to, eta):
    t_down = t_to * (1 + (t_to / t_from - 1) * eta)
    scale = (1 - t_to) / (1 - t_down)
    up2 = t_to**2 - (t_down * scale) ** 2
    return t_down, (up2 if up2 > 0 else up2 * 0) ** 0.5, scale


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0, flow: bool = False):
    """``(sigma_down, sigma_up, scale)`` of an ancestral step in either state form, unchecked: a sampler checks
    its levels at entry, :func:`get_ancestral_step` and :func:`get_ancestral_step_flow` check each call.

    VE (``x = x0 + sigma eps``): k-diffusion's :func:`get_ancestral_step` and ``scale = 1.0`` (a no-op factor,
    exact in floating point). Rectified flow: :func:`get_ancestral_step_flow`.
    """
    if flow:
        return _flow_step(sigma_from, sigma_to, eta)
    return (*_ve_step(sigma_from, sigma_to, eta), 1.0)


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
        seed: if given, an integer in ``[-2**63, 2**64)`` (what ``torch.Generator.manual_seed`` takes): a private
            generator seeded with it is used (no global RNG side effects); if None, the global RNG is used,
            exactly like k-diffusion's default.

    Raises:
        ValueError: for a seed that is not such an integer (a float, a string, a bool), naming it.
    """
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    value = _integer(seed)
    if value is None or not -(2**63) <= value < 2**64:
        raise ValueError(f"default_noise_sampler: seed must be None or an integer in [-2**63, 2**64), got {seed!r:.80}")
    generator = torch.Generator(device=x.device).manual_seed(value)
    return lambda sigma, sigma_next: torch.randn(
        x.shape, dtype=x.dtype, device=x.device, generator=generator
    )


_F32_EPS = 2.0**-23
"""float32's relative spacing at 1: the rounding a level may carry between a float32 and a float64 schedule."""


def _tree_seed(seed) -> int:
    """One Brownian tree's seed as an int, refused unless an integer >= 0 (torchsde's entropy)."""
    value = _integer(seed)
    if value is None or value < 0:
        raise ValueError(
            f"BrownianTreeNoiseSampler: seed must be None, an integer >= 0 or a list of them (one per batch item), "
            f"got {seed!r:.80} ({type(seed).__name__})"
        )
    return value


class _BatchedBrownianTree:
    """One ``torchsde.BrownianTree`` per seed; stacks their increments along the batch axis."""

    def __init__(self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, seed, **kwargs):
        import torchsde  # deferred: only the SDE samplers need it

        t0, t1, self.sign = self._sort(t0, t1)
        w0 = kwargs.pop("w0", torch.zeros_like(x))
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, Sequence) and not isinstance(seed, (str, bytes))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler: got {len(seed)} seeds for a batch of {x.shape[0]}")
            w0 = w0[0]
        seed = [_tree_seed(s) for s in (seed if self.batched else [seed])]
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

    def covers(self, t0, t1) -> bool:
        """Whether both times lie in the trees' span, within torchsde's resolution ``tol`` (its span is rounded
        to it) plus float32 rounding of the levels (a tree built on float32 levels, queried in float64)."""
        lo, hi = self._span
        slack = self.tol + _F32_EPS * max(abs(lo), abs(hi))
        return all(lo - slack <= float(t) <= hi + slack for t in (t0, t1))

    def __call__(self, t0, t1):
        t0, t1, sign = self._sort(t0, t1)
        # torchsde clamps a query outside the tree's span (with a warning); a float64 schedule queried against a
        # tree built on float32 levels lands a rounding error outside it: clamp here, the result is the same
        # (a query further out is refused by BrownianTreeNoiseSampler, see covers).
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
        sigma_min: low end of the valid interval, a real number (or 0-d tensor) >= 0; the SDE samplers use the
            schedule's smallest positive level, as k-diffusion does.
        sigma_max: high end of the valid interval, finite and >= ``sigma_min`` (equal for a one-level schedule).
        seed: an integer >= 0, a list of ``B`` of them (one tree per batch item), or None (drawn from the global
            RNG, as k-diffusion does).
        transform: maps sigma to the tree's internal time.

    Raises:
        ValueError: for a bad range or seed at construction; for a query outside ``[sigma_min, sigma_max]``
            (beyond rounding), whose increment the tree does not hold (torchsde would clamp the query and return
            too little or no noise), naming the queried levels and the range.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        who, what = "BrownianTreeNoiseSampler", "a real number or a 0-d tensor"
        self.sigma_min = real_arg(who, "sigma_min", sigma_min, what)
        self.sigma_max = real_arg(who, "sigma_max", sigma_max, what)
        if not 0 <= self.sigma_min <= self.sigma_max < math.inf:
            raise ValueError(f"BrownianTreeNoiseSampler: need 0 <= sigma_min <= sigma_max < inf, got "
                             f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}")
        self.transform = transform
        t0 = self.transform(torch.as_tensor(sigma_min))
        t1 = self.transform(torch.as_tensor(sigma_max))
        if not (math.isfinite(float(t0)) and math.isfinite(float(t1))):
            raise ValueError(f"BrownianTreeNoiseSampler: transform maps [sigma_min, sigma_max] = [{self.sigma_min!r}, "
                             f"{self.sigma_max!r}] to [{float(t0)!r}, {float(t1)!r}]; expected finite times")
        self.tree = _BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        if not self.tree.covers(t0, t1):
            raise ValueError(
                f"BrownianTreeNoiseSampler: queried sigma={float(sigma)!r}, sigma_next={float(sigma_next)!r} outside "
                f"the tree's range [sigma_min, sigma_max] = [{self.sigma_min!r}, {self.sigma_max!r}] (torchsde would clamp "
                "it: too little or no noise); build it over the schedule's positive levels, sigmas[sigmas > 0].min() and sigmas.max()"
            )
        if float((t1 - t0).abs()) <= self.tree.tol:
            # Below the trees' resolution torchsde recurses without end (k-diffusion's sampler too): the
            # increment of so short an interval is drawn on its own (standard normal, reproducible per seed).
            return self.tree.fresh()
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()
