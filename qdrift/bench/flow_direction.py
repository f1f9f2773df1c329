"""v2 on the bench DiT with any qdrift sampler, along the score (``flow=True``) or, for the deterministic samplers,
along the whole flow step (``--whole-step``: ``flow=False``, the drift before session 15): the final samples' mean
square difference from FP's and their spectrum (results in docs/bench_results.md, "The flow drift along the score").

    python benchmarks/flow_direction.py --schemes w4a4,w3a4 --samplers euler,dpmpp_2m,heun,lms -n 40 [--whole-step]

The DPM++ SDE solvers start at t = 1 - 1e-4 (:func:`qdrift.hosts.flow_sde_sigmas`), with their default correction
(noise first) and with ``--correction drift``.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

import qdrift
from qdrift.cli import ArgumentParser, int_at_least
from qdrift.hosts import flow_sde_sigmas
from qdrift.samplers import sampler_names

from . import runner as R
from .guidance import schedule
from .models import load_model

def main(argv=None, load_net: Callable[[str], torch.nn.Module] = load_model) -> int:
    p = ArgumentParser(prog="flow_direction", description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="w4a4,w3a4")
    p.add_argument("--samplers", default="euler,dpmpp_2m,heun,lms")
    p.add_argument("-n", type=int_at_least(2), default=40, help="held-out noises")
    p.add_argument("--steps", type=int_at_least(2), default=20,
                   help="steps (Heun: half as many, as many model calls as the others')")
    p.add_argument("--whole-step", action="store_true", help="flow=False (deterministic samplers only)")
    p.add_argument("--correction", choices=("noise", "drift"), default=None, help="the SDE solvers' correction")
    p.add_argument("--bands", type=int_at_least(1), default=1, help="frequency bands of the calibration")
    p.add_argument("--threads", type=int_at_least(1), default=1)
    args = p.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if not samplers or any(s not in qdrift.SAMPLERS for s in samplers):
        p.error(f"--samplers: expected qdrift samplers from {', '.join(qdrift.SAMPLERS)}, got {args.samplers!r}")
    stochastic = set(sampler_names(stochastic=True))
    if args.whole_step and any(s in stochastic for s in samplers):
        p.error("--whole-step: flow=False also changes a stochastic sampler's noise form; deterministic samplers only")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
    cfg = R.BenchConfig(models=("dit",), schemes=schemes, quant_profile="stress", progress=False, K=5)
    bm = R.prepare_model("dit", cfg, schemes, lambda s: None, load_net)
    block = R.Block("dit", "flow_euler", args.steps, schedule("dit", bm.fp, args.steps))
    held = R.EvalSet.for_config(R.BenchConfig(n_images=args.n, batch_size=args.n))
    x = R.initial_noise(held.seeds, float(block.sigmas[0]))
    brownian = set(sampler_names(brownian=True))
    for scheme in schemes:
        cal, _ = R.calibrate_block(bm, scheme, block, 5, bands=args.bands)
        cal = cal.with_options(reduce="channel")
        for sampler in samplers:
            steps = args.steps // 2 if sampler == "heun" else args.steps
            sig = schedule("dit", bm.fp, steps)
            kwargs = {"flow": not args.whole_step}
            if sampler in brownian:
                sig = flow_sde_sigmas(sig)
                if args.correction is not None:
                    kwargs["correction"] = args.correction
            chk = qdrift.check_correction(cal, bm.fp, bm.quantized[scheme], x, sig, sampler, {"y": held.labels},
                                          method="v2", seed=R.CAL_SEED, sampler_kwargs=kwargs)
            c = torch.stack([t["c"].reshape(-1) for t in chk.trace])
            print(f"{scheme} {sampler} {steps} flow={kwargs['flow']} bands={args.bands}: "
                  f"mse q {float(chk.mse_q[-1].mean()):.5f} -> "
                  f"{float(chk.mse_corr[-1].mean()):.5f}; min c {float(c.min()):+.3f}; {chk.spectrum()}", flush=True)
    return 0
