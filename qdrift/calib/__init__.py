"""Calibration, in one home: paired statistics of the quantization error and the Calibration file format.

- :func:`calibrate`: both models in memory, evaluated step by step on the same states (Algorithm 1);
- :class:`PairedTrace`: the same in two passes (record the full-precision trajectory, then evaluate the
  quantized model on it) for two models that do not fit in memory together and for host applications;
- both feed one :class:`PairedAccumulator` (per-step moments and cross-step sums) and return a
  :class:`Calibration`;
- :func:`match_moments` adds moment-matching tables; :func:`check_correction` measures what a correction does
  to the quantized run (against the full-precision run and the plan's prediction); :func:`tune_strength` picks
  the strength whose samples come closest to the full-precision sampler's; :func:`size_drift` sizes v2's drift to
  the difference the quantized sampler really accumulates.
"""

from .calibration import (
    Calibration,
    CalibrationFileError,
    CalibrationFileNotFoundError,
    interpolate_log_sigma,
    load_calibration,
)
from .check import CorrectionCheck, StrengthTuning, check_correction, tune_strength
from .match import match_moments
from .run import calibrate
from .size import size_drift
from .stats import PairedAccumulator, PairedMoments, TrajectorySums, batch_moments, gather_moments
from .trace import PairedTrace, PairedTraceError, calibration_from_pairs

__all__ = [
    "Calibration",
    "CorrectionCheck",
    "CalibrationFileError",
    "CalibrationFileNotFoundError",
    "PairedAccumulator",
    "PairedMoments",
    "PairedTrace",
    "StrengthTuning",
    "PairedTraceError",
    "TrajectorySums",
    "calibration_from_pairs",
    "batch_moments",
    "calibrate",
    "check_correction",
    "gather_moments",
    "interpolate_log_sigma",
    "load_calibration",
    "match_moments",
    "size_drift",
    "tune_strength",
]
