"""Peer sampler-side corrections for quantized diffusion models, on the same footing as Q-Drift.

Each method is a denoiser wrapper around the quantized k-diffusion denoiser ``D_q(x, sigma, **extra)`` that
reads its statistics from one :class:`qdrift.Calibration` (looked up by sigma with ``moments_at``), so one
calibration serves them all and every qdrift sampler can run them. Methods that also act on the sampler
(lowering a stochastic sampler's injected noise, or Q-Drift's drift on what is left) say so through
``wrapper.sampler_kwargs(sampler, sigmas)``::

    from qdrift.baselines import make_baseline
    den = make_baseline("ptqd", denoiser_q, calibration)
    x0 = qdrift.sample_euler_ancestral_qdrift(den, x, sigmas, **den.sampler_kwargs("euler_ancestral", sigmas))

``BASELINES`` maps a row name to a factory ``(denoiser_q, calibration, **opts) -> CorrectedDenoiser``:

============================  ======================================================================
``none``                      quantized model as is
``qdrift``                    variance-only Q-Drift (arXiv 2603.18095)
``d2dpm``                     D2-DPM deterministic dual denoising (arXiv 2501.08180)
``d2dpm_stochastic``          D2-DPM stochastic dual denoising
``ptqd``                      PTQD gain / bias correction + variance schedule (arXiv 2305.10657)
``tac``                       TAC-Diffusion per-(step, channel) gain (arXiv 2407.03917)
``qncd``                      QNCD runtime mean-noise estimate (arXiv 2403.19140); no calibration needed
``qdrift_gain``               PTQD-style gain / bias correction, then Q-Drift on the remaining variance
============================  ======================================================================

The core never imports this package.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict

from ._base import CorrectedDenoiser, JointMoments, is_stochastic_sampler, lookup_moments
from .d2dpm import D2DPM, d2dpm_conditional
from .ptqd import PTQD, ptqd_gain_bias
from .qdrift_rows import QDrift, QDriftGain, Uncorrected
from .qncd import QNCD
from .tac import TAC, TACGain, fit_tac_gain, tac_gain_from_moments

__all__ = [
    "BASELINES",
    "make_baseline",
    "CorrectedDenoiser",
    "JointMoments",
    "lookup_moments",
    "is_stochastic_sampler",
    "Uncorrected",
    "QDrift",
    "QDriftGain",
    "D2DPM",
    "d2dpm_conditional",
    "PTQD",
    "ptqd_gain_bias",
    "TAC",
    "TACGain",
    "tac_gain_from_moments",
    "fit_tac_gain",
    "QNCD",
]

BASELINES: Dict[str, Callable[..., CorrectedDenoiser]] = {
    "none": Uncorrected,
    "qdrift": QDrift,
    "d2dpm": partial(D2DPM, stochastic=False),
    "d2dpm_stochastic": partial(D2DPM, stochastic=True),
    "ptqd": PTQD,
    "tac": TAC,
    "qncd": QNCD,
    "qdrift_gain": QDriftGain,
}


def make_baseline(name: str, denoiser_q: Callable, calibration: Any = None, **opts: Any) -> CorrectedDenoiser:
    """Builds the baseline ``name`` around ``denoiser_q``.

    Args:
        name: a key of :data:`BASELINES`.
        denoiser_q: quantized denoiser ``D_q(x, sigma, **extra)``.
        calibration: a :class:`qdrift.Calibration` (ignored by ``none`` and ``qncd``).
        **opts: the method's keyword options (see its class).

    Raises:
        ValueError: for an unknown name or bad options.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(repr(n) for n in BASELINES)}; got {name!r}")
    try:
        return BASELINES[name](denoiser_q, calibration, **opts)
    except TypeError as err:  # an unknown option name
        raise ValueError(f"baseline {name!r}: {err}") from None
