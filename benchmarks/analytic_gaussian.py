"""Excess variance removed per sampler and form on the analytic Gaussian (see qdrift/analytic_bench.py)."""

import sys

from qdrift.analytic_bench import main

if __name__ == "__main__":
    sys.exit(main())
