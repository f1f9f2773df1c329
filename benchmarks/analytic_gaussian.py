"""Excess variance removed per sampler and form on the analytic Gaussian (the code: qdrift/bench/analytic.py).

    python benchmarks/analytic_gaussian.py [--n 200000] [--steps 20]     (the same as: qdrift analytic)
"""

import sys

from qdrift.bench.analytic import main

if __name__ == "__main__":
    sys.exit(main())
