"""Deprecated: moved to :mod:`qdrift.bench.analytic` (``qdrift analytic`` runs it)."""

from ._moved import moved_module

__all__ = ["main", "measure", "to_markdown", "planted", "columns", "run", "DATA", "METHODS", "ERRORS", "SIGMA_MIN",
           "SIGMA_MAX", "STOCHASTIC", "MULTISTEP"]
__getattr__ = moved_module("qdrift.analytic_bench", "qdrift.bench.analytic", __all__)

if __name__ == "__main__":
    import sys

    sys.exit(__getattr__("main")())
