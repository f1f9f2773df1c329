"""What v2's surrogate predicts a quantized run accumulates, per frequency band, against what it does (the code:
qdrift/bench/band_accumulation.py; results in docs/bench_results.md).

    python benchmarks/band_accumulation.py --model unet --sampler euler --schemes w4a4,w3a4,w4a8 -n 40
"""

from qdrift.bench.band_accumulation import main

if __name__ == "__main__":
    main()
