"""What a correction does on the bench networks, next to what its plan predicted (qdrift.check_correction).

For each scheme: calibrate on the bench's K calibration noises (as ``qdrift bench`` does), then check the
correction on those noises (in-sample) and on ``n`` evaluation noises (held out: the bench's evaluation seeds
and labels). Prints one summary line per (scheme, method, noise set) and, with ``--table``, the per-level table.

    python benchmarks/correction_check.py --model unet --sampler euler --schemes w4a8,w4a4,w3a4 -n 40
    python benchmarks/correction_check.py --model dit --methods v2 --strengths 0.5,1,1.5   # the strength curve
    python benchmarks/correction_check.py --model dit --methods v2 --size-drift   # v2 sized by qdrift.size_drift
    python benchmarks/correction_check.py --model unet --methods v2 --size-drift --size-output   # and its output alone
    python benchmarks/correction_check.py --model unet --methods correlated,v2 --output-only   # v2's parts apart

With ``--size-drift`` each scheme also prints the per-channel factor :func:`qdrift.size_drift` measures on the
calibration noises and, for comparison, on the held-out ones (raw +- its standard error -> the factor used), and
checks v2 with the calibration sized on the calibration noises (rows ``v2-sized``); ``--factor-only`` prints the
factors alone. ``--size-output`` adds rows ``v2-sized-output``: ``qdrift.size_drift(drift=False)`` on the calibration
noises, the output correction's share sized alone and the drift as calibrated. ``--output-only`` adds rows
``v2-output-only``: v2's output correction (gain, state term and bias) without its drift
(:func:`qdrift.plan.undrifted`); method ``correlated`` is the drift without the output correction.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Callable

import torch

import qdrift

from . import runner as R
from .guidance import schedule
from .models import load_model


def main(argv=None, load_net: Callable[[str], torch.nn.Module] = load_model) -> int:
    p = argparse.ArgumentParser(description="check Q-Drift's correction on the bench networks against its prediction")
    p.add_argument("--model", default="unet", choices=sorted(R.MODEL_SAMPLERS))
    p.add_argument("--sampler", default=None, help="bench sampler (default: the model's first)")
    p.add_argument("--schemes", default="w4a8,w4a4,w3a4")
    p.add_argument("--methods", default="paper,v2")
    p.add_argument("--profile", default="stress", help="quantization profile (qdrift bench --quant-profile)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bench's for the sampler)")
    p.add_argument("-K", type=int, default=5, help="calibration noises")
    p.add_argument("-n", type=int, default=40, help="held-out evaluation noises")
    p.add_argument("--bands", type=int, default=1, help="calibrate per frequency band (calibrate(..., bands=N))")
    p.add_argument("--strengths", default="1", help="comma-separated correction strengths to check (each >= 0)")
    p.add_argument("--size-drift", action="store_true",
                   help="also size v2's drift with qdrift.size_drift (on the calibration noises) and check it")
    p.add_argument("--size-output", action="store_true",
                   help="with --size-drift: also check v2 with only its output correction sized (size_drift(drift=False))")
    p.add_argument("--output-only", action="store_true",
                   help="also check v2's output correction without its drift (rows v2-output-only)")
    p.add_argument("--factor-only", action="store_true",
                   help="with --size-drift: print the factors (raw +- standard error -> used) and skip the checks")
    p.add_argument("--table", action="store_true", help="also print the per-level table (every 3rd level)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler = args.sampler or R.MODEL_SAMPLERS[args.model][0]
    if sampler not in R.MODEL_SAMPLERS[args.model]:
        p.error(f"--sampler {sampler!r} is not a bench sampler of {args.model}: {', '.join(R.MODEL_SAMPLERS[args.model])}")
    schemes = [s for s in args.schemes.split(",") if s]
    try:
        strengths = [float(v) for v in args.strengths.split(",") if v]
    except ValueError:
        p.error(f"--strengths must be comma-separated numbers, got {args.strengths!r}")
    if args.factor_only and not args.size_drift:
        p.error("--factor-only needs --size-drift")
    if args.size_output and not args.size_drift:
        p.error("--size-output needs --size-drift")
    if args.bands < 1:
        p.error(f"--bands must be >= 1, got {args.bands}")
    if not strengths or not all(0 <= v < float("inf") for v in strengths):
        p.error(f"--strengths must be finite numbers >= 0, got {args.strengths!r}")
    cfg = R.BenchConfig(models=(args.model,), schemes=schemes, quant_profile=args.profile, progress=False, K=args.K)
    bm = R.prepare_model(args.model, cfg, schemes, lambda s: None, load_net)
    steps = args.steps or cfg.steps_for(sampler)
    block = R.Block(args.model, sampler, steps, schedule(args.model, bm.fp, steps))
    cal_seeds = [R.CAL_SEED + k for k in range(args.K)]
    held = R.EvalSet.for_config(R.BenchConfig(n_images=args.n, batch_size=args.n))
    sets = {"calibration": (R.initial_noise(cal_seeds, float(block.sigmas[0])), R.calib_labels(args.K)),
            "held-out": (R.initial_noise(held.seeds, float(block.sigmas[0])), held.labels)}
    bands = "" if args.bands == 1 else f", {args.bands} frequency bands"
    print(f"{args.model} {sampler} ({steps} steps), profile {args.profile}, K = {args.K}, held-out n = {args.n}{bands}")
    for scheme in schemes:
        cal, _ = R.calibrate_block(bm, scheme, block, args.K, bands=args.bands)
        cal = cal.with_options(reduce=cfg.v_reduce[0])  # as the bench's Q-Drift rows
        runs = [(method, method, cal) for method in args.methods.split(",")]
        if args.output_only:
            runs.append(("v2-output-only", "v2", cal))
        if args.size_drift:
            sized = {name: qdrift.size_drift(cal, bm.fp, bm.quantized[scheme], x, block.sigmas, block.fn, {"y": labels},
                                             seed=R.CAL_SEED) for name, (x, labels) in sets.items()}
            factors = ", ".join(f"{name} {_factor_text(c)}" for name, c in sized.items())
            print(f"{scheme} size_drift factor (measured / predicted mean square difference of the undrifted run, "
                  f"raw +- standard error -> used): {factors}", flush=True)
            if args.factor_only:
                continue
            runs.append(("v2-sized", "v2", sized["calibration"]))
            if args.size_output:
                x, labels = sets["calibration"]
                runs.append(("v2-sized-output", "v2", qdrift.size_drift(
                    cal, bm.fp, bm.quantized[scheme], x, block.sigmas, block.fn, {"y": labels}, seed=R.CAL_SEED,
                    drift=False)))
        for label, method, use in runs:
            for strength in strengths:
                at = "" if strengths == [1.0] else f" (strength {strength:g})"
                for name, (x, labels) in sets.items():
                    undrifted = qdrift.plan.undrifted() if label == "v2-output-only" else contextlib.nullcontext()
                    with warnings.catch_warnings(), undrifted:
                        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
                        chk = qdrift.check_correction(use, bm.fp, bm.quantized[scheme], x, block.sigmas, block.fn,
                                                      {"y": labels}, method=method, strength=strength,
                                                      seed=R.CAL_SEED)
                    summary = chk.summary() if label == method else chk.summary().replace(method, label, 1)
                    print(f"{scheme} {name}{at}: {summary}", flush=True)
                    spectrum = chk.spectrum()
                    if spectrum is not None:
                        print(f"{scheme} {name}{at}: {spectrum.replace(method, label, 1)}", flush=True)
                    if args.table:
                        print(chk.table(every=3) + "\n")
    return 0


def _factor_text(cal: qdrift.Calibration) -> str:
    """A sized calibration's factor per channel: raw +- standard error -> the one sampling uses."""
    def text(estimate, used):
        raw, se = estimate
        return "[" + ", ".join(f"{r:.3f} +- {e:.3f} -> {u:.3f}" for r, e, u in zip(raw.tolist(), se.tolist(),
                                                                                  used.tolist())) + "]"

    out = text(cal.drift_scale_estimate(), cal.drift_scale)
    if cal.output_scale is not None:
        out += f", output share {text(cal.output_scale_estimate(), cal.output_scale)}"
    return out


if __name__ == "__main__":
    sys.exit(main())
