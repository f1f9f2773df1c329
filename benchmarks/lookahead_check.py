"""Would a look-ahead help v2 where its step-by-step balance leaves excess? (the code: qdrift/bench/lookahead.py;
results in docs/bench_results.md, "Session 21").

    python benchmarks/lookahead_check.py --sampler euler_ancestral --steps 20 --starts 1,5,8 --trace
"""

from qdrift.bench.lookahead import main

if __name__ == "__main__":
    raise SystemExit(main())
