"""What Q-Drift's correction does on the bench networks, next to its plan's prediction (the code:
qdrift/bench/correction_check.py; results in docs/bench_results.md).

    python benchmarks/correction_check.py --model unet --sampler euler --schemes w4a8,w4a4,w3a4 -n 40
"""

from qdrift.bench.correction_check import main

if __name__ == "__main__":
    main()
