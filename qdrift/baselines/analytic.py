"""Exact paired moments for the analytic Gaussian problem of :mod:`qdrift.analytic` (a Calibration stand-in).

For data ``N(mu_c, s_c^2)`` and the planted model ``d_hat = (1 + k) d + b + sqrt(var) z``
(:class:`qdrift.analytic.PlantedErrorDenoiser`), along the exact marginal ``d`` has mean 0 and variance
``v = sigma^2 / (s^2 + sigma^2)``, so the moments a calibration estimates are known in closed form:

    mean_fp = 0,  var_fp = v,  mean_q = b,  var_q = (1 + k)^2 v + var,  cov = Cov(d, d_hat) = (1 + k) v

Tests and the Gaussian benchmark use this to check each baseline's formulas against their exact answer.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..analytic import PlantedErrorDenoiser

__all__ = ["AnalyticCalibration", "channel_stats"]


class AnalyticCalibration:
    """Exact ``moments_at`` / ``at`` of a planted-error model on the exact marginals.

    Args:
        planted: the :class:`qdrift.analytic.PlantedErrorDenoiser`.
    """

    def __init__(self, planted: PlantedErrorDenoiser):
        if not isinstance(planted, PlantedErrorDenoiser):
            raise ValueError(f"AnalyticCalibration needs a PlantedErrorDenoiser, got {type(planted).__name__}")
        self.planted = planted

    def moments_at(self, sigmas: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Moments ``[N, C]`` float64 with keys ``mean_fp, mean_q, var_fp, var_q, cov``."""
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
        """``V = Var(delta | d_hat)`` ``[N, C]`` float32."""
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
