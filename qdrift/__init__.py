"""qdrift: quantization-aware sampling for diffusion models (Q-Drift, arXiv 2603.18095).

k-diffusion-style samplers that take any denoiser callable and a calibrated quantization-error variance
``V``, a calibration routine comparing a full-precision and a quantized model step by step, and adapters
that present eps, v, flow and x0 networks as k-diffusion denoisers.
"""

from ._utils import (
    BrownianTreeNoiseSampler,
    append_dims,
    default_noise_sampler,
    get_ancestral_step,
    get_sigmas_exponential,
    get_sigmas_karras,
    to_d,
)
from ._version import __version__
from .adapters import get_sigmas_flow
from .calib import (
    Calibration,
    CalibrationFileError,
    CalibrationFileNotFoundError,
    PairedMoments,
    calibrate,
    check_correction,
    load_calibration,
    tune_strength,
    match_moments,
    size_drift,
)
from .samplers import (
    SAMPLERS,
    sample_dpmpp_2m_qdrift,
    sample_dpmpp_2m_sde_qdrift,
    sample_dpmpp_3m_sde_qdrift,
    sample_euler_ancestral_qdrift,
    sample_euler_qdrift,
    sample_heun_qdrift,
    sample_lms_qdrift,
)
from .validation import DriftClippedWarning

__all__ = [
    "__version__",
    "SAMPLERS",
    "sample_euler_qdrift",
    "sample_euler_ancestral_qdrift",
    "sample_heun_qdrift",
    "sample_lms_qdrift",
    "sample_dpmpp_2m_qdrift",
    "sample_dpmpp_2m_sde_qdrift",
    "sample_dpmpp_3m_sde_qdrift",
    "calibrate",
    "Calibration",
    "CalibrationFileError",
    "CalibrationFileNotFoundError",
    "PairedMoments",
    "load_calibration",
    "match_moments",
    "check_correction",
    "tune_strength",
    "size_drift",
    "DriftClippedWarning",
    "to_d",
    "append_dims",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_flow",
    "get_ancestral_step",
    "default_noise_sampler",
    "BrownianTreeNoiseSampler",
]
