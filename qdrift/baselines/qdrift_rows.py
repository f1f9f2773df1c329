"""Reference rows and the combined method: uncorrected, plain Q-Drift, and Q-Drift + gain.

* ``none``: the quantized denoiser as is.
* ``qdrift``: variance-only Q-Drift (arXiv 2603.18095, Eq. 12): the model output is untouched and the sampler
  scales its increments by ``(1 + c)`` with ``V = Var(delta | d_hat)`` from the calibration.
* ``qdrift_gain``: PTQD-style gain and bias correction of the output, ``d' = (d_hat - b) / (1 + k_t)``
  (see :mod:`qdrift.baselines.ptqd`), then Q-Drift on what is left. The remaining error
  ``delta' = d' - d`` has the moments of the affine map ``a d_hat + c`` (``a = 1 / (1 + k)``, ``c = -b / (1 + k)``),
  so its conditional variance is

      V' = Var(delta') - Cov(delta', d')^2 / Var(d'),   Var(d') = a^2 Var(d_hat),
      Var(delta') = a^2 Var(d_hat) + Var(d) - 2 a Cov(d, d_hat),  Cov(delta', d') = a^2 Var(d_hat) - a Cov(d, d_hat)

  Variance-only Q-Drift can only narrow the sample (``c >= 0`` lengthens the steps, which contracts it more);
  when the error has a gain (``d_hat = (1 + k) d + noise`` with ``k > 0``) the quantized sample is already
  under-dispersed and only the gain part can fix it (see the README, "Peer baselines").
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._base import CorrectedDenoiser, Denoiser
from .ptqd import ptqd_gain_bias

__all__ = ["Uncorrected", "QDrift", "QDriftGain"]

_CORRECTIONS = ("drift", "noise")


def _check_correction(name: str, correction: str) -> str:
    if correction not in _CORRECTIONS:
        raise ValueError(f"{name}: correction must be one of {', '.join(repr(c) for c in _CORRECTIONS)}; got {correction!r}")
    return correction


class Uncorrected(CorrectedDenoiser):
    """The quantized denoiser unchanged (the reference row); ``calibration`` is ignored."""

    name = "none"

    def __init__(self, denoiser_q: Denoiser, calibration: Any = None):
        super().__init__(denoiser_q, calibration, needs_calibration=False)


class QDrift(CorrectedDenoiser):
    """Variance-only Q-Drift (arXiv 2603.18095): output untouched, V handed to the sampler.

    Args:
        denoiser_q: quantized denoiser.
        calibration: :class:`qdrift.Calibration`; its ``at(sigmas)`` gives V (its own reduce / conditional
            settings), else V is the conditional variance of its moments.
        correction: on stochastic samplers, ``"drift"`` (the paper) or ``"noise"`` (lower the injected noise).
    """

    name = "qdrift"

    def __init__(self, denoiser_q: Denoiser, calibration: Any, *, correction: str = "drift"):
        super().__init__(denoiser_q, calibration)
        self.correction = _check_correction(self.name, correction)

    def drift_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """Q-Drift's V at ``sigmas[:-1]`` ``[steps, C]``."""
        if hasattr(self.calibration, "at"):
            return self._table(torch.as_tensor(self.calibration.at(sigmas[:-1])).detach().cpu().double())
        return self._table(self._moments(sigmas[:-1]).conditional_variance())

    def noise_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        return self.drift_table(sigmas) if self.correction == "noise" else None


class QDriftGain(CorrectedDenoiser):
    """PTQD-style gain / bias correction of the output, then Q-Drift on the remaining conditional variance.

    Args:
        denoiser_q: quantized denoiser.
        calibration: :class:`qdrift.Calibration` (moments give ``k_t``, ``b`` and the remaining ``V'``).
        per_channel: fit the gain per channel instead of one ``k_t`` per step.
        clip_negative: set negative gains to 0 (PTQD's rule).
        correction: on stochastic samplers, ``"drift"`` (Q-Drift) or ``"noise"`` (lower the injected noise by V').
    """

    name = "qdrift_gain"

    def __init__(
        self,
        denoiser_q: Denoiser,
        calibration: Any,
        *,
        per_channel: bool = False,
        clip_negative: bool = True,
        correction: str = "drift",
    ):
        super().__init__(denoiser_q, calibration)
        self.per_channel = bool(per_channel)
        self.clip_negative = bool(clip_negative)
        self.correction = _check_correction(self.name, correction)

    def _fit(self, sigma: torch.Tensor):
        m = self._moments(sigma)
        k, b, _ = ptqd_gain_bias(m, per_channel=self.per_channel, clip_negative=self.clip_negative)
        return m, k, b

    def correct_d(self, x: torch.Tensor, sigma: torch.Tensor, d_hat: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """``(d_hat - b) / (1 + k_t)`` ``[B, C, ...]``."""
        _, k, b = self._fit(sigma)
        return (d_hat - self._channels(b, x)) / (1.0 + self._channels(k, x))

    def drift_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        """``V' = Var(delta' | d')`` of the gain-corrected output at ``sigmas[:-1]`` ``[steps, C]``."""
        m, k, b = self._fit(sigmas[:-1])
        a = 1.0 / (1.0 + k)
        return self._table(m.affine(a, -b * a).conditional_variance())

    def noise_table(self, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
        return self.drift_table(sigmas) if self.correction == "noise" else None
