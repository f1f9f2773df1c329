"""What a quantized bench network's error is made of along the full-precision path, and how fast the network
removes the deviation it causes (the code: qdrift/bench/error_anatomy.py; results in docs/bench_results.md).

    python benchmarks/error_anatomy.py --model dit --schemes w4a8,w3a4
"""

from qdrift.bench.error_anatomy import main

if __name__ == "__main__":
    main()
