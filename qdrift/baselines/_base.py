"""Shared machinery for the peer baselines: moment look-up, the wrapper base class, sampler options.

Every baseline is a *denoiser wrapper*: it wraps the quantized k-diffusion denoiser ``D_q(x, sigma, **extra)``,
converts its output to the eps / velocity estimate ``d_hat = (x - D_q) / sigma``, corrects ``d_hat`` with
statistics looked up by sigma in a :class:`qdrift.Calibration`, and returns ``D = x - sigma * d_corrected``.
So it works with every qdrift (and k-diffusion) sampler. Methods that also lower a stochastic sampler's
injected noise, or that run Q-Drift on what is left, give the sampler a V table through
:meth:`CorrectedDenoiser.sampler_kwargs`.

Moments convention (``Calibration.moments_at``; all ``[N, C]``): ``mean_fp, mean_q, var_fp, var_q`` of the
full-precision ``d`` and the quantized ``d_hat`` and their covariance ``cov`` = Cov(d, d_hat), pooled over the
batch and spatial positions per channel along the full-precision trajectory. The error is
``delta = d_hat - d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch

from .._utils import append_dims
from ..calib.stats import DeltaMoments, PairedMoments

__all__ = ["JointMoments", "lookup_moments", "CorrectedDenoiser", "is_stochastic_sampler"]

Denoiser = Callable[..., torch.Tensor]

_MOMENT_KEYS = ("mean_fp", "mean_q", "var_fp", "var_q", "cov")


@dataclass(frozen=True)
class JointMoments(DeltaMoments):
    """Moments of the pair ``(d, d_hat)`` at ``N`` noise levels and ``C`` channels (all ``[N, C]``, float64).

    The error moments (``mean_delta``, ``var_delta``, ``cov_delta_q``, ``conditional_variance()``) come from the
    core's :class:`qdrift.calib.stats.DeltaMoments`.

    Attributes:
        mean_fp: ``E[d]`` of the full-precision model.
        mean_q: ``E[d_hat]`` of the quantized model.
        var_fp: ``Var(d)``.
        var_q: ``Var(d_hat)``.
        cov: ``Cov(d, d_hat)``.
    """

    mean_fp: torch.Tensor
    mean_q: torch.Tensor
    var_fp: torch.Tensor
    var_q: torch.Tensor
    cov: torch.Tensor

    def affine(self, a: torch.Tensor, c: torch.Tensor) -> "JointMoments":
        """Moments of ``(d, a * d_hat + c)``: what is left after an affine output correction.

        Args:
            a: gain ``[N, C]`` (or broadcastable).
            c: offset ``[N, C]`` (or broadcastable).
        """
        return JointMoments(
            mean_fp=self.mean_fp,
            mean_q=a * self.mean_q + c,
            var_fp=self.var_fp,
            var_q=a * a * self.var_q,
            cov=a * self.cov,
        )

    def pooled(self) -> "JointMoments":
        """Moments pooled over channels ``[N, 1]`` (law of total variance; channels hold equal counts).

        The core's :meth:`PairedMoments.pooled` with one unit of count per channel.
        """
        p = PairedMoments(
            n=torch.ones_like(self.mean_fp), mean_fp=self.mean_fp, mean_q=self.mean_q,
            m2_fp=self.var_fp, m2_q=self.var_q, c_fq=self.cov,
        ).pooled()
        return JointMoments(mean_fp=p.mean_fp, mean_q=p.mean_q, var_fp=p.var_fp, var_q=p.var_q, cov=p.cov)


def lookup_moments(calibration: Any, sigmas: torch.Tensor) -> JointMoments:
    """Looks up the calibration's paired moments at ``sigmas`` (``Calibration.moments_at``).

    Args:
        calibration: an object with ``moments_at(sigmas) -> dict`` holding ``mean_fp, mean_q, var_fp, var_q,
            cov``, each ``[N, C]`` (a :class:`qdrift.Calibration`).
        sigmas: noise levels ``[N]`` (> 0).

    Returns:
        :class:`JointMoments` in float64 on the CPU.

    Raises:
        ValueError: if the calibration lacks ``moments_at`` or returns something of the wrong shape.
    """
    if not hasattr(calibration, "moments_at"):
        raise ValueError(
            f"calibration must be a qdrift.Calibration (an object with moments_at(sigmas)), got {type(calibration).__name__}"
        )
    sig = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    raw = calibration.moments_at(sig)
    missing = [k for k in _MOMENT_KEYS if k not in raw]
    if missing:
        raise ValueError(f"calibration.moments_at returned no {', '.join(missing)}; needs keys {', '.join(_MOMENT_KEYS)}")
    out = {}
    for key in _MOMENT_KEYS:
        t = torch.as_tensor(raw[key]).detach().to(device="cpu", dtype=torch.float64)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != sig.numel():
            raise ValueError(
                f"calibration.moments_at: {key} must have shape [{sig.numel()}, C], got {tuple(t.shape)}"
            )
        out[key] = t
    return JointMoments(**out)


def is_stochastic_sampler(sampler: Union[str, Callable]) -> bool:
    """True when ``sampler`` injects noise and accepts ``correction="noise"`` (ancestral / SDE samplers).

    Args:
        sampler: a qdrift sampler function or its short name (:data:`qdrift.samplers.REGISTRY`).

    Raises:
        ValueError: for anything that is not a qdrift sampler.
    """
    from ..samplers import sampler_info  # the baselines depend on the core, never the other way round

    return sampler_info(sampler).stochastic


def _check_positive_schedule(sigmas: torch.Tensor, who: str) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{who}: sigmas must be 1-D with at least 2 values (steps + 1), got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas[:-1] <= 0).any()):
        raise ValueError(f"{who}: sigmas[:-1] must be finite and > 0, got {sigmas.tolist()}")
    return sigmas


class CorrectedDenoiser:
    """Base class: a k-diffusion denoiser that corrects a quantized denoiser's eps / velocity estimate.

    Subclasses implement :meth:`correct_d`; they may override :meth:`noise_table` (a V-like table
    ``[steps, C]`` that a stochastic sampler subtracts from its injected noise variance, ``correction="noise"``)
    and :meth:`drift_table` (a V table for Q-Drift's drift, ``correction="drift"``).

    Args:
        denoiser_q: the quantized denoiser ``D_q(x, sigma, **extra) -> x0`` (``x [B, C, ...]``, ``sigma [B]``).
        calibration: a :class:`qdrift.Calibration` (or any object with ``moments_at``); may be None for
            methods that need none.

    Attributes other than the ones defined here (``sigma_min``, ``sigma_max``, ...) are read from
    ``denoiser_q``, so the wrapper can stand in for it in host code.
    """

    name: str = "corrected"

    def __init__(self, denoiser_q: Denoiser, calibration: Any = None, *, needs_calibration: bool = True):
        if not callable(denoiser_q):
            raise ValueError(f"{self.name}: denoiser_q must be callable D(x, sigma, **extra), got {type(denoiser_q).__name__}")
        if needs_calibration and not hasattr(calibration, "moments_at"):
            raise ValueError(
                f"{self.name}: needs a qdrift.Calibration (with moments_at), got {type(calibration).__name__}"
            )
        self.inner = denoiser_q
        self.calibration = calibration

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` from a private generator seeded with ``self.seed``
        (fresh entropy if None), re-made when the device changes; never the global RNG."""
        generator = getattr(self, "_generator", None)
        if generator is None or generator.device != like.device:
            generator = torch.Generator(device=like.device)
            if getattr(self, "seed", None) is None:
                generator.seed()
            else:
                generator.manual_seed(int(self.seed))
            self._generator = generator
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)

    def __getattr__(self, attr: str):
        inner = self.__dict__.get("inner")
        if inner is None or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(inner, attr)

    # -- the correction -------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], **extra) -> torch.Tensor:
        """Evaluates ``D_q`` and returns the corrected denoised estimate ``x - sigma * d_corrected``.

        Args:
            x: noisy sample ``[B, C, ...]``.
            sigma: noise level ``[B]`` (or a scalar).
            **extra: passed to ``denoiser_q`` unchanged.

        Returns:
            Corrected denoised estimate ``[B, C, ...]``, x's dtype.
        """
        sigma_b = self._batch_sigma(x, sigma)
        self._check_channels(x, sigma_b)
        denoised = self.inner(x, sigma_b, **extra)
        if bool((sigma_b == 0).any()):
            return denoised  # d is undefined at sigma = 0; k-diffusion never evaluates there
        s = append_dims(sigma_b.to(x.dtype), x.ndim)
        d_hat = (x - denoised) / s
        d = self.correct_d(x, sigma_b, d_hat, extra)
        return x - s * d

    def correct_d(self, x: torch.Tensor, sigma: torch.Tensor, d_hat: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """Returns the corrected eps / velocity estimate ``[B, C, ...]`` (identity here)."""
        return d_hat

    def reset(self) -> None:
        """Forgets per-run state (runtime estimates, step counters); call between sampling runs."""

    # -- what the sampler gets ------------------------------------------------------------------------

    def noise_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """V-like table ``[steps, C]`` for a stochastic sampler's ``correction="noise"``, or None."""
        return None

    def drift_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """V table ``[steps, C]`` for Q-Drift's drift (any sampler), or None."""
        return None

    def sampler_kwargs(self, sampler: Union[str, Callable], sigmas: torch.Tensor) -> Dict[str, Any]:
        """Keyword arguments that complete this method on ``sampler``.

        A stochastic sampler (one with a ``correction`` option) gets ``{"V": noise_table, "correction":
        "noise"}`` when the method lowers the injected noise; otherwise, if the method runs Q-Drift on
        what is left, ``{"V": drift_table}``; else nothing.

        Args:
            sampler: a qdrift sampler function or its short name in ``qdrift.SAMPLERS``.
            sigmas: the schedule ``[steps + 1]`` the sampler will run.

        Returns:
            A dict to splat into the sampler call (may be empty).
        """
        sigmas = _check_positive_schedule(sigmas, self.name)
        if is_stochastic_sampler(sampler):
            noise = self.noise_table(sigmas)
            if noise is not None:
                return {"V": noise, "correction": "noise"}
        drift = self.drift_table(sigmas)
        return {} if drift is None else {"V": drift}

    # -- helpers --------------------------------------------------------------------------------------

    def _moments(self, sigma: torch.Tensor) -> JointMoments:
        return lookup_moments(self.calibration, sigma)

    def _check_channels(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Raises before the model runs if the calibration's channel count cannot broadcast over ``x``."""
        if not hasattr(self.calibration, "moments_at"):
            return
        if self.__dict__.get("_cal_channels") is None:
            self._cal_channels = lookup_moments(self.calibration, sigma[:1]).mean_fp.shape[1]
        if self._cal_channels not in (1, x.shape[1]):
            raise ValueError(
                f"{self.name}: calibration has {self._cal_channels} channels but x has {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )

    def _channels(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` (C = 1 or x's channels) float64 -> broadcastable over ``x`` ``[B, C, ...]`` in x's dtype."""
        if t.shape[-1] not in (1, x.shape[1]):
            raise ValueError(
                f"{self.name}: calibration has {t.shape[-1]} channels but x has {x.shape[1]} (shape {tuple(x.shape)})"
            )
        return append_dims(t.to(device=x.device, dtype=x.dtype), x.ndim)

    def _table(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[steps, C]`` float32 table (finite, >= 0) for the sampler's V."""
        return t.clamp(min=0.0).to(torch.float32)

    def _batch_sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"{self.name}: x must be a tensor [B, C, ...], got {getattr(x, 'shape', type(x).__name__)}")
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: sigma must be a scalar or [B={x.shape[0]}], got shape {tuple(sigma.shape)}")
        return sigma
