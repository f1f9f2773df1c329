"""QNCD runtime noise estimation (Chu et al., ACM MM 2024, arXiv 2403.19140).

QNCD's inter-step correction estimates the quantization noise at run time, with no calibration: every
``interval`` steps it re-noises the current sample back to the previous noise level with fresh noise ``z``,
evaluates the quantized model there, and takes the mean of ``d_hat(x_re) - z`` as the noise estimate, which
it subtracts from the model output in the following steps (the paper's "runtime noise estimation"; in the
authors' code one scalar over the whole batch, re-estimated every 10 steps). In k-diffusion's VE form,
after reaching ``sigma`` from ``sigma_prev``:

    x_re = x + sqrt(sigma_prev^2 - sigma^2) * z,    estimate = mean(d_hat(x_re, sigma_prev) - z)
    d_corrected = d_hat - estimate

For an unbiased model ``E[d_hat(x_re)] = E[eps]`` has mean about 0 over the elements, so the estimate measures
the mean error. One extra model call per interval. QNCD's intra-step embedding smoothing acts inside the
network and is out of scope here.

Caveat (measured in ``benchmarks/baselines_gaussian.py``): ``d_hat(x_re)`` also responds to any offset of the
*sample's* mean from the data mean (``d = sigma (x - mu) / (s^2 + sigma^2)`` on Gaussian data), and subtracting
that response cancels the flow's own contraction of the offset. So the random mean of the initial noise (about
``sigma_max / sqrt(numel)``) is carried to the end instead of shrinking to ``s / sqrt(numel)``; on the Gaussian
benchmark QNCD then has a larger final mean error than no correction, even with no planted error at all.
(Re-noising the denoised estimate at the current level instead does not help: a bias in ``D_q`` shows up in
``d_hat(x_re)`` with the opposite sign and the estimate cancels to about 0.)
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch

from .._utils import append_dims
from ._base import CorrectedDenoiser, Denoiser

__all__ = ["QNCD"]

_REDUCE = ("global", "sample", "channel")


class QNCD(CorrectedDenoiser):
    """QNCD runtime mean-noise correction as a stateful denoiser wrapper (arXiv 2403.19140).

    The wrapper watches the noise levels it is called with: a call at a lower sigma than the last starts a
    new step; on steps ``1, 1 + interval, 1 + 2 interval, ...`` it makes the extra re-noised call before
    the model call. Call :meth:`reset` between runs (a call at a higher sigma than the last also resets).

    Args:
        denoiser_q: quantized denoiser ``D_q(x, sigma, **extra)``.
        calibration: unused (accepted so every baseline has the same factory signature).
        interval: re-estimate every this many steps (the authors use 10), a positive int.
        reduce: ``"global"`` one scalar over the batch (QNCD), ``"sample"`` one per batch item, or
            ``"channel"`` one per channel (pooled over the batch).
        seed: seed of the private generator for the re-noising ``z``; None draws a fresh seed.

    Attributes:
        estimate: the current noise estimate (broadcastable to x) or None before the first estimate.
        extra_calls: number of extra model calls made since the last reset.
    """

    name = "qncd"

    def __init__(
        self,
        denoiser_q: Denoiser,
        calibration: Any = None,
        *,
        interval: int = 10,
        reduce: str = "global",
        seed: Optional[int] = None,
    ):
        super().__init__(denoiser_q, calibration, needs_calibration=False)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"qncd: interval must be a positive int, got {interval!r}")
        if reduce not in _REDUCE:
            raise ValueError(f"qncd: reduce must be one of {', '.join(repr(r) for r in _REDUCE)}; got {reduce!r}")
        self.interval = interval
        self.reduce = reduce
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forgets the estimate, the step counter and the generator state."""
        self.estimate: Optional[torch.Tensor] = None
        self.extra_calls = 0
        self._level: Optional[float] = None
        self._step = 0
        self._generator: Optional[torch.Generator] = None

    def _estimate_noise(self, x_re: torch.Tensor, z: torch.Tensor, level: float, extra: Dict[str, Any]) -> torch.Tensor:
        """Evaluates the model on the re-noised ``x_re`` at ``level`` and returns ``mean(d_hat(x_re) - z)``."""
        d_re = (x_re - self.inner(x_re, x_re.new_full([x_re.shape[0]], level), **extra)) / level
        self.extra_calls += 1
        err = d_re - z
        if self.reduce == "global":
            return err.mean().reshape([1] * x_re.ndim)
        if self.reduce == "sample":
            return append_dims(err.flatten(1).mean(1), x_re.ndim)
        dims = [0] + list(range(2, x_re.ndim))
        return err.mean(dims, keepdim=True)

    def __call__(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], **extra) -> torch.Tensor:
        """Runs the model (after a re-estimate on the scheduled steps) and subtracts the noise estimate.

        Args:
            x: noisy sample ``[B, C, ...]``.
            sigma: noise level ``[B]`` (or scalar); the batch is taken to share one level.
            **extra: passed to ``denoiser_q``.

        Returns:
            Corrected denoised estimate ``[B, C, ...]``.
        """
        sigma_b = self._batch_sigma(x, sigma)
        level = float(sigma_b.max())
        if self._level is not None and level > self._level:
            self.reset()  # a new sampling run
        if self._level is not None and level < self._level:
            self._step += 1
            if level > 0 and (self._step - 1) % self.interval == 0:
                # forward-noise x from this level back to the previous one and measure the mean error there
                z = self._noise(x)
                x_re = x + math.sqrt(self._level**2 - level**2) * z
                self.estimate = self._estimate_noise(x_re, z, self._level, extra)
        self._level = level
        denoised = self.inner(x, sigma_b, **extra)
        if self.estimate is None or level == 0:
            return denoised
        s = append_dims(sigma_b.to(x.dtype), x.ndim)
        return denoised + s * self.estimate.to(x.dtype)  # x - s (d_hat - est) = D_q + s est
