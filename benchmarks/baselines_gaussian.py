"""Peer baselines vs Q-Drift on an analytic Gaussian with planted errors (the code: qdrift/bench/baselines_gaussian.py).

    OMP_NUM_THREADS=1 python benchmarks/baselines_gaussian.py [--n 512]
"""

import sys

from qdrift.bench.baselines_gaussian import main

if __name__ == "__main__":
    sys.exit(main())
