"""Deprecated: the two-pass paired calibration moved to :mod:`qdrift.calib.trace` (import it from ``qdrift.calib``)."""

import warnings

from ..calib.trace import TRACE_FORMAT, TRACE_VERSION, PairedTrace, PairedTraceError, calibration_from_pairs

warnings.warn(
    "qdrift.hosts.paired moved to qdrift.calib.trace: import PairedTrace, PairedTraceError and calibration_from_pairs "
    "from qdrift.calib",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["PairedTrace", "PairedTraceError", "calibration_from_pairs", "TRACE_FORMAT", "TRACE_VERSION"]
