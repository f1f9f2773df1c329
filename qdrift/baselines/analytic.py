"""Deprecated: moved to :mod:`qdrift.bench.gaussian` (next to the Gaussian data and the planted model)."""

from .._moved import moved_module

__all__ = ["AnalyticCalibration", "channel_stats"]
__getattr__ = moved_module("qdrift.baselines.analytic", "qdrift.bench.gaussian", __all__)
