"""Calibration: paired statistics of the quantization error, and the Calibration file format."""

from .calibration import (
    Calibration,
    CalibrationFileError,
    CalibrationFileNotFoundError,
    interpolate_log_sigma,
    load_calibration,
)
from .run import calibrate
from .stats import PairedMoments, batch_moments, gather_moments

__all__ = [
    "Calibration",
    "CalibrationFileError",
    "CalibrationFileNotFoundError",
    "PairedMoments",
    "batch_moments",
    "calibrate",
    "gather_moments",
    "interpolate_log_sigma",
    "load_calibration",
]
