"""v2 on the bench DiT along the score or along the whole flow step, per sampler (the code:
qdrift/bench/flow_direction.py; results in docs/bench_results.md).

    python benchmarks/flow_direction.py --schemes w4a4,w3a4 --samplers euler,dpmpp_2m,heun,lms -n 40 [--whole-step]
"""

from qdrift.bench.flow_direction import main

if __name__ == "__main__":
    main()
