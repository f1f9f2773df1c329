"""TAC-Diffusion noise-estimation reconstruction (Yao et al., ECCV 2024, arXiv 2407.03917).

TAC-Diffusion reconstructs the full-precision eps estimate from the quantized one with a per-(step, channel)
gain, ``d_corrected = K * d_hat`` ("noise estimation reconstruction"), where ``K`` has a closed form that
minimizes a loss mixing the mean-squared error and a masked relative error (the paper's rQNSR). Written out
(our reading; the paper's text was not available offline to check the equation numbers), per (step, channel):

    L(K) = (1 - lam) * E[(K d_hat - d)^2] / E[d^2] + lam * E_mask[((K d_hat - d) / d)^2]

is a convex quadratic in ``K``, minimized at

    K = ((1 - lam) E[d_hat d] / E[d^2] + lam E_mask[d_hat / d])
        / ((1 - lam) E[d_hat^2] / E[d^2] + lam E_mask[d_hat^2 / d^2])

with the mask keeping elements where ``|d| >= mask_threshold * rms(d)`` (so the ratio stays bounded). With
``lam = 0`` this is the MSE-optimal gain ``E[d_hat d] / E[d_hat^2]``, computable from a
:class:`qdrift.Calibration`'s moments; ``lam > 0`` needs ratio statistics that :func:`fit_tac_gain`
records along the full-precision trajectory.

Not implemented: TAC's input-bias correction of the latent, which needs statistics of the *quantized*
trajectory that a qdrift calibration does not record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .._utils import append_dims
from ._base import CorrectedDenoiser, Denoiser, JointMoments

__all__ = ["TAC", "TACGain", "tac_gain_from_moments", "fit_tac_gain"]


def tac_gain_from_moments(m: JointMoments) -> torch.Tensor:
    """MSE-optimal TAC gain ``K = E[d_hat d] / E[d_hat^2]`` (raw second moments) ``[N, C]`` float64."""
    e_qf = m.cov + m.mean_q * m.mean_fp
    e_qq = m.var_q + m.mean_q**2
    return torch.where(e_qq > 1e-12, e_qf / e_qq.clamp(min=1e-12), torch.ones_like(e_qq))


@dataclass(frozen=True)
class TACGain:
    """A fitted TAC gain table.

    Attributes:
        sigmas: noise levels ``[S]`` (descending, > 0).
        K: gains ``[S, C]``.
    """

    sigmas: torch.Tensor
    K: torch.Tensor

    def at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Gains at ``sigmas`` ``[N]`` -> ``[N, C]``: linear in log-sigma, clamped at the ends."""
        return _interp_log_sigma(self.sigmas, self.K, sigmas)


def _interp_log_sigma(grid: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    grid = grid.detach().to(dtype=torch.float64, device="cpu")
    values = values.detach().to(dtype=torch.float64, device="cpu")
    q = torch.as_tensor(query).detach().to(dtype=torch.float64, device="cpu").reshape(-1)
    order = torch.argsort(grid)
    lg, v = grid[order].log(), values[order]
    lq = q.clamp(min=float(grid.min()), max=float(grid.max())).log()
    if lg.numel() == 1:
        return v.expand(lq.numel(), -1).clone()
    idx = torch.searchsorted(lg, lq).clamp(1, lg.numel() - 1)
    lo, hi = idx - 1, idx
    w = ((lq - lg[lo]) / (lg[hi] - lg[lo]).clamp(min=1e-300)).clamp(0, 1)[:, None]
    return v[lo] * (1 - w) + v[hi] * w


@torch.no_grad()
def fit_tac_gain(
    model_fp: Denoiser,
    model_q: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Dict[str, Any]] = None,
    *,
    lam: float = 0.5,
    mask_threshold: float = 0.1,
) -> TACGain:
    """Fits TAC's mixed MSE / masked-relative-error gain along the full-precision Euler trajectory.

    Both models are evaluated on the same ``x_i`` of the full-precision Euler trajectory (as in qdrift's
    calibration); statistics are pooled per (step, channel) over batch and positions.

    Args:
        model_fp: full-precision denoiser ``D(x, sigma, **extra)``.
        model_q: quantized denoiser.
        x: initial noise ``[K, C, ...]``, already scaled by ``sigmas[0]``.
        sigmas: schedule ``[S + 1]`` (descending; the last may be 0).
        extra_args: passed to both models.
        lam: weight of the relative-error term in ``[0, 1]``.
        mask_threshold: relative-error elements need ``|d| >= mask_threshold * rms(d)`` (``>= 0``).

    Returns:
        :class:`TACGain` at ``sigmas[:-1]``.

    Raises:
        ValueError: on a bad ``lam``, ``mask_threshold``, ``x`` or ``sigmas``.
    """
    if not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"fit_tac_gain: lam must be in [0, 1], got {lam!r}")
    if not isinstance(mask_threshold, (int, float)) or not (mask_threshold >= 0.0):
        raise ValueError(f"fit_tac_gain: mask_threshold must be >= 0, got {mask_threshold!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"fit_tac_gain: x must be a tensor [K, C, ...], got {getattr(x, 'shape', type(x).__name__)}")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or bool((sigmas[:-1] <= 0).any()):
        raise ValueError(f"fit_tac_gain: sigmas must be 1-D, >= 2 values, all but the last > 0; got {sigmas.tolist()}")
    extra_args = {} if extra_args is None else extra_args
    dims = [0] + list(range(2, x.ndim))
    s_in = x.new_ones([x.shape[0]])
    gains = []
    for i in range(sigmas.numel() - 1):
        sigma = sigmas[i]
        s = append_dims(sigma * s_in, x.ndim)
        d = ((x - model_fp(x, sigma * s_in, **extra_args)) / s).double()
        d_hat = ((x - model_q(x, sigma * s_in, **extra_args)) / s).double()
        e_ff = (d * d).mean(dims)
        e_qf = (d_hat * d).mean(dims)
        e_qq = (d_hat * d_hat).mean(dims)
        num = (1 - lam) * e_qf / e_ff.clamp(min=1e-300)
        den = (1 - lam) * e_qq / e_ff.clamp(min=1e-300)
        if lam > 0:
            mask = d.abs() >= mask_threshold * append_dims(e_ff.sqrt(), x.ndim - 1)[None]
            count = mask.sum(dims).clamp(min=1)
            ratio = torch.where(mask, d_hat / torch.where(mask, d, torch.ones_like(d)), torch.zeros_like(d))
            num = num + lam * ratio.sum(dims) / count
            den = den + lam * (ratio * ratio).sum(dims) / count
        gains.append(torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.ones_like(den)))
        x = x + (sigmas[i + 1] - sigma) * d.to(x.dtype)  # full-precision Euler step
    return TACGain(sigmas=sigmas[:-1].detach().to(torch.float64).cpu(), K=torch.stack(gains).cpu())


class TAC(CorrectedDenoiser):
    """TAC-Diffusion gain ``K * d_hat`` as a denoiser wrapper (arXiv 2407.03917).

    Args:
        denoiser_q: quantized denoiser ``D_q(x, sigma, **extra)``.
        calibration: :class:`qdrift.Calibration`; gives the MSE-optimal gain (``lam = 0``) when ``gain`` is None.
        gain: a :class:`TACGain` from :func:`fit_tac_gain` (for ``lam > 0``); overrides the calibration.

    Sampler options: none (TAC changes only the model output).
    """

    name = "tac"

    def __init__(self, denoiser_q: Denoiser, calibration: Any = None, *, gain: Optional[TACGain] = None):
        if gain is not None and not isinstance(gain, TACGain):
            raise ValueError(f"tac: gain must be a TACGain from fit_tac_gain, got {type(gain).__name__}")
        super().__init__(denoiser_q, calibration, needs_calibration=gain is None)
        self.gain = gain

    def gain_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The gain ``K`` at noise levels ``sigma`` ``[N]`` -> ``[N, C]`` float64."""
        if self.gain is not None:
            return self.gain.at(sigma)
        return tac_gain_from_moments(self._moments(sigma))

    def correct_d(self, x: torch.Tensor, sigma: torch.Tensor, d_hat: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """``K * d_hat`` ``[B, C, ...]``."""
        return self._channels(self.gain_at(sigma), x) * d_hat
