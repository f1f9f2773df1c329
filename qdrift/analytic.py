"""Deprecated: moved to :mod:`qdrift.bench.gaussian` (the benchmarks' library code lives in ``qdrift/bench/``)."""

from ._moved import moved_module

__all__ = ["GaussianData", "PlantedErrorDenoiser"]
__getattr__ = moved_module("qdrift.analytic", "qdrift.bench.gaussian", __all__)
