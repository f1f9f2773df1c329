"""PTQD: correlated/uncorrelated quantization-noise correction (He et al., NeurIPS 2023, arXiv 2305.10657).

PTQD splits the eps error linearly into a part correlated with the full-precision output and a residual
(the paper's
"correlated noise" model; equation numbers were not checked offline):

    delta = k_t * d + b + r,     k_t = Cov(delta, d) / Var(d)   (negative k_t set to 0),
                                 b   = E[delta - k_t d]        per (step, channel)

Correlated-noise correction with bias correction divides it out of the output:

    d_corrected = (d_hat - b) / (1 + k_t)

which leaves the residual ``r / (1 + k_t)`` of variance ``Var(r) / (1 + k_t)^2``. PTQD's "variance schedule
calibration" lowers a stochastic sampler's injected noise variance by that amount; here that
variance is the V-like table passed to the sampler with ``correction="noise"``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._base import CorrectedDenoiser, Denoiser, JointMoments

__all__ = ["PTQD", "ptqd_gain_bias"]


def ptqd_gain_bias(m: JointMoments, *, per_channel: bool = False, clip_negative: bool = True) -> Tuple[torch.Tensor, ...]:
    """PTQD's regression of the error on the full-precision output (arXiv 2305.10657, correlated-noise model).

    Args:
        m: paired moments ``[N, C]``.
        per_channel: fit ``k`` per (step, channel); False (PTQD) fits one ``k_t`` per step, pooled over channels.
        clip_negative: set negative ``k`` to 0, as PTQD does.

    Returns:
        ``(k, b, var_r)``: gain ``[N, C or 1]``, bias ``[N, C]`` and residual variance ``Var(r)`` ``[N, C]``,
        float64.
    """
    k = (m if per_channel else m.pooled()).gain_slope()
    if clip_negative:
        k = k.clamp(min=0.0)
    b, var_r = m.gain_residual(k)
    return k, b, var_r


class PTQD(CorrectedDenoiser):
    """PTQD gain and bias correction ``(d_hat - b) / (1 + k_t)`` as a denoiser wrapper (arXiv 2305.10657).

    Args:
        denoiser_q: quantized denoiser ``D_q(x, sigma, **extra)``.
        calibration: :class:`qdrift.Calibration` (its moments give ``k_t``, ``b`` and ``Var(r)``).
        per_channel: fit the gain per channel instead of PTQD's one ``k_t`` per step.
        clip_negative: set negative gains to 0 (PTQD's rule).

    Sampler options: on a stochastic sampler the injected noise is lowered by ``Var(r) / (1 + k_t)^2``
    (:meth:`noise_table`, PTQD's variance schedule calibration).
    """

    name = "ptqd"

    def __init__(self, denoiser_q: Denoiser, calibration: Any, *, per_channel: bool = False, clip_negative: bool = True):
        super().__init__(denoiser_q, calibration)
        self.per_channel = bool(per_channel)
        self.clip_negative = bool(clip_negative)

    def _fit(self, sigma: torch.Tensor):
        m = self._moments(sigma)
        k, b, var_r = ptqd_gain_bias(m, per_channel=self.per_channel, clip_negative=self.clip_negative)
        return m, k, b, var_r

    def correct_d(self, x: torch.Tensor, sigma: torch.Tensor, d_hat: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """``(d_hat - b) / (1 + k_t)`` ``[B, C, ...]`` (PTQD correlated-noise and bias correction)."""
        _, k, b, _ = self._fit(sigma)
        return (d_hat - self._channels(b, x)) / (1.0 + self._channels(k, x))

    def noise_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """Residual variance ``Var(r) / (1 + k_t)^2`` at ``sigmas[:-1]`` ``[steps, C]`` (PTQD variance schedule calibration)."""
        _, k, _, var_r = self._fit(sigmas[:-1])
        return self._table(var_r / (1.0 + k) ** 2)
