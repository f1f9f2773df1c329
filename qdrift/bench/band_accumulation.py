"""What v2's surrogate predicts a quantized run accumulates, per radial frequency band, against what it does.

The sizing pass (:func:`qdrift.size_drift`) compares, per channel, the mean square difference from the FP run that
the undrifted, output-corrected quantized run accumulates (summed over the steps relative to the FP state's
variance) with the surrogate's prediction. This splits both into the calibration's bands (results in
docs/bench_results.md, "Session 19: the accumulation per band"):

    python benchmarks/band_accumulation.py --model unet --sampler euler --schemes w4a4,w3a4,w4a8 -n 40

``--error-slope`` adds a second prediction in which the surrogate carries the difference with the full-precision
denoiser's slope along the quantization error's own direction instead of the state's ``kappa``: per step and band
``<D_fp(x + sigma delta) - D_fp(x), sigma delta> / |sigma delta|^2`` on the calibration noises' FP Euler trajectory (one
more FP call per step, what a calibration could measure without running the sampler; session 21).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable, Dict

import torch

import qdrift
from qdrift.cli import ArgumentParser, int_at_least
from qdrift.correction import band_components

from . import runner as R
from .guidance import schedule
from .models import load_model


def band_accumulation(fp_after, q_after, trace, bands: int) -> tuple:
    """``(measured, predicted)`` per (channel, band) unit ``[C * bands]``: the mean square difference of the quantized
    states from the FP ones after each step, and the plan's predicted ``var_diff``, each over the FP state's
    variance in that channel and summed over the steps the plan predicted."""
    measured = predicted = 0.0
    for i, entry in enumerate(trace):
        if "var_diff" not in entry:
            continue
        f = band_components(fp_after[i].double(), bands)
        d = band_components(q_after[i].double(), bands) - f
        var = f.var((0, *range(2, f.ndim))).reshape(-1, bands).sum(1).repeat_interleave(bands)  # the channel's
        measured = measured + d.pow(2).mean((0, *range(2, d.ndim))) / var
        predicted = predicted + entry["var_diff"].reshape(-1) / var
    return measured, predicted


@torch.no_grad()
def error_slopes(bm, scheme: str, block, bands: int, K: int = 5) -> Dict[float, torch.Tensor]:
    """The FP denoiser's slope along the quantization error's direction, ``{sigma: [C * bands]}``, at the states of
    the FP Euler trajectory from the ``K`` calibration noises at the block's levels (see the module docstring)."""
    x = R.initial_noise([R.CAL_SEED + k for k in range(K)], float(block.sigmas[0]))
    args = {"y": R.calib_labels(K)}
    out = {}
    for i in range(len(block.sigmas) - 1):
        s = float(block.sigmas[i])
        level = torch.full((K,), s)
        fp, q = bm.fp(x, level, **args), bm.quantized[scheme](x, level, **args)
        along = fp - q  # sigma (d_q - d_fp): the step's error as a deviation of the state
        r = band_components((bm.fp(x + along, level, **args) - fp).double(), bands)
        a = band_components(along.double(), bands)
        axes = (0, *range(2, a.ndim))
        out[s] = (r * a).sum(axes).reshape(-1) / (a * a).sum(axes).reshape(-1).clamp(min=1e-300)
        x = x + (float(block.sigmas[i + 1]) - s) * (x - fp) / s
    return out


@contextmanager
def difference_slope(slopes: Dict[float, torch.Tensor]):
    """v2's surrogate inside carries the difference with ``slopes`` at the levels they hold (else its ``kappa``)."""
    before = qdrift.plan.DriftPlan._difference_kappa
    qdrift.plan.DriftPlan._difference_kappa = lambda self, sigma, kappa: slopes.get(sigma, kappa)
    try:
        yield
    finally:
        qdrift.plan.DriftPlan._difference_kappa = before


def main(argv=None, load_net: Callable[[str], torch.nn.Module] = load_model) -> int:
    p = ArgumentParser(prog="band_accumulation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unet", choices=sorted(R.MODEL_SAMPLERS))
    p.add_argument("--sampler", default=None, help="a bench sampler of the model (default: its first)")
    p.add_argument("--schemes", default="w4a4,w3a4,w4a8")
    p.add_argument("-n", type=int_at_least(2), default=40, help="held-out noises")
    p.add_argument("--bands", type=int_at_least(2), default=4, help="frequency bands of the calibration")
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--error-slope", action="store_true",
                   help="also predict with the FP denoiser's slope along the error's direction (module docstring)")
    args = p.parse_args(argv)
    sampler = args.sampler or R.MODEL_SAMPLERS[args.model][0]
    if sampler not in R.MODEL_SAMPLERS[args.model]:
        p.error(f"--sampler {sampler!r} is not a bench sampler of {args.model}: {', '.join(R.MODEL_SAMPLERS[args.model])}")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
    cfg = R.BenchConfig(models=(args.model,), schemes=schemes, quant_profile="stress", progress=False, K=5)
    bm = R.prepare_model(args.model, cfg, schemes, lambda s: None, load_net)
    steps = cfg.steps_for(sampler)
    block = R.Block(args.model, sampler, steps, schedule(args.model, bm.fp, steps))
    fn = qdrift.SAMPLERS[block.fn]
    held = R.EvalSet.for_config(R.BenchConfig(n_images=args.n, batch_size=args.n))
    x = R.initial_noise(held.seeds, float(block.sigmas[0]))

    def run(model, cal=None):
        seen = []
        out = fn(model, x.clone(), block.sigmas, cal, extra_args={"y": held.labels}, disable=True,
                 callback=lambda info: seen.append(info["x"].detach().clone()))
        return seen[1:] + [out.detach()]

    fp = run(bm.fp)
    print(f"{args.model} {sampler} ({steps} steps), K = 5, held-out n = {args.n}, {args.bands} bands; per band, low "
          "-> high, summed over the steps relative to the FP state's variance:")
    for scheme in schemes:
        cal, _ = R.calibrate_block(bm, scheme, block, 5, bands=args.bands)
        with qdrift.plan.recording() as plans, qdrift.plan.undrifted():
            q = run(bm.quantized[scheme], cal)
        measured, predicted = band_accumulation(fp, q, plans[0].trace, args.bands)
        _report(scheme, measured, predicted)
        if args.error_slope:
            slopes = error_slopes(bm, scheme, block, args.bands)
            with difference_slope(slopes):
                qdrift.plan._SOLVED.pop(cal, None)  # the solved steps kept with the calibration differ here
                with qdrift.plan.recording() as plans, qdrift.plan.undrifted():
                    run(bm.quantized[scheme], cal)
                qdrift.plan._SOLVED.pop(cal, None)
            along_error = band_accumulation(fp, q, plans[0].trace, args.bands)[1]
            _report(f"{scheme} (slope along the error)", measured, along_error)
            _slopes_along_difference(bm, block, cal, fp, q, held.labels, args.bands, slopes)
    return 0


@torch.no_grad()
def _slopes_along_difference(bm, block, cal, fp, q, labels, bands: int, slopes, levels=(5.0, 1.7, 0.5)) -> None:
    """Prints, after the steps that end nearest ``levels``, the FP denoiser's slope along the difference the quantized
    run really accumulated, ``<D_fp(x + D) - D_fp(x), D> / |D|^2`` per band, beside the surrogate's ``kappa`` and the
    slope along the fresh error (``slopes``, :func:`error_slopes`) at that level."""
    ends = [float(s) for s in block.sigmas[1:]]
    em = (cal.banded or cal).error_model(torch.tensor(ends, dtype=torch.float64), gain=True)
    for level in levels:
        i = min(range(len(ends) - 1), key=lambda j: abs(math.log(ends[j] / level)))
        s = ends[i]
        x, diff = fp[i], q[i] - fp[i]
        sv = torch.full((len(x),), s)
        r = band_components((bm.fp(x + diff, sv, y=labels) - bm.fp(x, sv, y=labels)).double(), bands)
        a = band_components(diff.double(), bands)
        axes = (0, *range(2, a.ndim))
        along = (r * a).sum(axes).reshape(-1) / (a * a).sum(axes).reshape(-1).clamp(min=1e-300)
        kappa = (1 - s * em["cov_xd"][i] / em["var_x"][i]).clamp(min=0)
        print(f"  sigma {s:.3f}: slope along the accumulated difference {' / '.join(f'{float(v):.2f}' for v in along)}"
              f"; the state's kappa {' / '.join(f'{float(v):.2f}' for v in kappa)}; along the fresh error "
              f"{' / '.join(f'{float(v):.2f}' for v in slopes[s])}", flush=True)


def _report(label: str, measured: torch.Tensor, predicted: torch.Tensor) -> None:
    ratio = measured / predicted.clamp(min=1e-300)
    fmt = lambda t: " / ".join(f"{float(v):.4f}" for v in t)  # noqa: E731
    print(f"{label}: measured {fmt(measured)}; predicted {fmt(predicted)}; ratio "
          f"{' / '.join(f'{float(v):.2f}' for v in ratio)} (all bands {float(measured.sum() / predicted.sum()):.2f})",
          flush=True)
