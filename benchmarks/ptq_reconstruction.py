"""Network output error of the bench models under round-to-nearest, BRECQ and GAC (the code:
qdrift/bench/ptq_reconstruction.py; results in docs/ptq_reconstruction.md).

    python benchmarks/ptq_reconstruction.py --model unet --schemes w4a8,w3a4 --iters 100 --out out/ptq_recon.json
"""

from qdrift.bench.ptq_reconstruction import main

if __name__ == "__main__":
    main()
