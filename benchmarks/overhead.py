"""Cost of Q-Drift: sampler wall time with V vs V=None, calibration memory (the code: qdrift/bench/overhead.py).

    python benchmarks/overhead.py [--repeats 7] [--steps 20]
"""

import sys

from qdrift.bench.overhead import main

if __name__ == "__main__":
    sys.exit(main())
