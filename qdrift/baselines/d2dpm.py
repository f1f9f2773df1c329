"""D2-DPM: dual denoising of the quantization error (Zeng et al., AAAI 2025, arXiv 2501.08180).

D2-DPM models the eps error ``delta = d_hat - d`` and the quantized output ``d_hat`` as a joint Gaussian per
(step, channel) and removes the error through its conditional law ``p(delta | d_hat)`` (the paper's
conditional-Gaussian formula for the quantization noise given the quantized output; equation numbers were not
checked offline, see ``shared/REFERENCE.md`` Sec. 2):

    mu_cond    = mu_delta + rho * (s_delta / s_hat) * (d_hat - mu_hat)        rho clipped to +-0.9999
    sigma_cond = s_delta * sqrt(1 - rho^2)

* **stochastic** dual denoising (D2-DPM "S-D2"): ``d = d_hat - (mu_cond + sigma_cond * z)``, ``z ~ N(0, I)``,
  i.e. a draw of the full-precision ``d`` from its conditional law given ``d_hat``;
* **deterministic** dual denoising ("D-D2"): ``d = d_hat - mu_cond``, and a stochastic sampler's injected noise
  variance is lowered by the conditional variance ``sigma_cond^2`` (here: the V-like table passed with
  ``correction="noise"``). On an ODE sampler only the mean part acts.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._base import CorrectedDenoiser, Denoiser, JointMoments

__all__ = ["D2DPM", "d2dpm_conditional"]


def d2dpm_conditional(m: JointMoments, rho_clip: float = 0.9999):
    """The conditional-Gaussian pieces of D2-DPM (arXiv 2501.08180, ``p(delta | d_hat)``).

    Args:
        m: paired moments ``[N, C]``.
        rho_clip: ``|rho|`` is clipped to this (the paper's 0.9999) so ``sigma_cond`` stays > 0.

    Returns:
        ``(slope, mu_delta, mu_hat, var_cond)`` each ``[N, C]`` float64, with
        ``mu_cond = mu_delta + slope * (d_hat - mu_hat)``, ``slope = rho * s_delta / s_hat``.
    """
    var_delta, var_q = m.var_delta, m.var_q
    denom = (var_delta * var_q).sqrt()
    ok = denom > 1e-12
    rho = torch.where(ok, m.cov_delta_q / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    rho = rho.clamp(-rho_clip, rho_clip)
    ratio = torch.where(var_q > 1e-12, (var_delta / var_q.clamp(min=1e-12)).sqrt(), torch.zeros_like(var_q))
    slope = rho * ratio
    var_cond = var_delta * (1.0 - rho * rho)
    return slope, m.mean_delta, m.mean_q, var_cond


class D2DPM(CorrectedDenoiser):
    """D2-DPM dual denoising as a denoiser wrapper (arXiv 2501.08180).

    Args:
        denoiser_q: quantized denoiser ``D_q(x, sigma, **extra)``.
        calibration: :class:`qdrift.Calibration` whose moments give the joint Gaussian of ``(d_hat, delta)``.
        stochastic: True for stochastic dual denoising (adds ``-sigma_cond * z``), False for deterministic.
        rho_clip: clip on ``|rho|`` (paper: 0.9999), in ``(0, 1]``.
        seed: seed of the private generator for ``z`` (stochastic only); None draws a fresh seed.

    Sampler options: the deterministic variant lowers a stochastic sampler's noise by ``sigma_cond^2``
    (:meth:`noise_table`); the stochastic variant needs nothing from the sampler.
    """

    def __init__(
        self,
        denoiser_q: Denoiser,
        calibration: Any,
        *,
        stochastic: bool = False,
        rho_clip: float = 0.9999,
        seed: Optional[int] = None,
    ):
        self.name = "d2dpm_stochastic" if stochastic else "d2dpm"
        super().__init__(denoiser_q, calibration)
        if not isinstance(rho_clip, (int, float)) or not (0.0 < rho_clip <= 1.0):
            raise ValueError(f"{self.name}: rho_clip must be in (0, 1], got {rho_clip!r}")
        self.stochastic = bool(stochastic)
        self.rho_clip = float(rho_clip)
        self.seed = seed
        self._generator: Optional[torch.Generator] = None

    def reset(self) -> None:
        """Restarts the private noise generator (same ``seed`` -> same draws)."""
        self._generator = None

    def correct_d(self, x: torch.Tensor, sigma: torch.Tensor, d_hat: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """``d_hat - mu_cond`` (deterministic) or ``d_hat - mu_cond - sigma_cond z`` (stochastic), ``[B, C, ...]``."""
        slope, mu_delta, mu_hat, var_cond = d2dpm_conditional(self._moments(sigma), self.rho_clip)
        mu_cond = self._channels(mu_delta, x) + self._channels(slope, x) * (d_hat - self._channels(mu_hat, x))
        d = d_hat - mu_cond
        if self.stochastic:
            d = d - self._channels(var_cond.sqrt(), x) * self._noise(d_hat)
        return d

    def noise_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """``sigma_cond^2`` at ``sigmas[:-1]`` ``[steps, C]`` (deterministic variant only)."""
        if self.stochastic:
            return None
        *_, var_cond = d2dpm_conditional(self._moments(sigmas[:-1]), self.rho_clip)
        return self._table(var_cond)
