"""Peer baselines vs Q-Drift on an analytic Gaussian with planted quantization errors.

Data per channel is N(mu_c, s_c^2) (exact denoiser known); the "quantized" model is the exact one with an
eps-space error planted: pure conditional noise, a bias, or a gain ``d_hat = (1 + k) d + noise``. Every
method in ``qdrift.baselines.BASELINES`` (plus the full-precision model, ``fp``) runs on every sampler from
the same initial noise; the table gives the final sample's error against the exact data distribution:
``dmean`` = RMS over channels of ``mean_c - mu_c``; ``dvar`` = mean over channels of ``var_c / s_c^2 - 1`` (%,
signed: negative = under-dispersed).

    OMP_NUM_THREADS=1 python benchmarks/baselines_gaussian.py            # the table in the README ("Peer baselines")
    OMP_NUM_THREADS=1 python benchmarks/baselines_gaussian.py --n 512    # a quick look

(``benchmarks/baselines_gaussian.py`` calls :func:`main` here, as does ``python -m qdrift.bench.baselines_gaussian``.)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Sequence

import torch

from qdrift._utils import default_noise_sampler, get_sigmas_karras
from qdrift.baselines import BASELINES, is_stochastic_sampler, make_baseline
from qdrift.samplers import SAMPLERS

from .gaussian import AnalyticCalibration, GaussianData, PlantedErrorDenoiser, channel_stats

CASES: Dict[str, dict] = {
    "noise": dict(var=0.5**2),
    "bias": dict(bias=[0.06, 0.02]),
    "gain": dict(gain=0.25, var=0.2**2),
}
CASE_TEXT = {
    "noise": "pure conditional noise, d_hat = d + 0.5 z",
    "bias": "bias, d_hat = d + b, b = (0.06, 0.02)",
    "gain": "gain, d_hat = 1.25 d + 0.2 z",
}
DEFAULT_SAMPLERS = ("euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde")


DATA = GaussianData([0.5, -0.5], [0.5, 1.0])


def calibration_for(case: str, sigmas: torch.Tensor, kind: str, k: int, shape):
    """The one calibration every method reads: ``qdrift.calibrate`` on the planted model, or its exact moments."""
    planted = PlantedErrorDenoiser(DATA, seed=99, **CASES[case])
    if kind == "analytic":
        return AnalyticCalibration(planted)
    from qdrift.calib import calibrate

    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((k,) + tuple(shape), generator=gen, dtype=torch.float64) * sigmas[0]
    return calibrate(DATA.denoiser, planted, x, sigmas, disable=True, bands=1)


def run_one(method: str, sampler: str, case: str, calibration, *, n: int, shape, sigmas, seed: int = 0):
    """Final per-channel errors ``(dmean, dvar%)`` of one (method, sampler, case).

    Every run starts from the same noise (``seed``) on the exact marginal at ``sigmas[0]``, so the ``fp`` row
    shows only the sampler's discretization error and rows differ only by the method.
    """
    planted = PlantedErrorDenoiser(DATA, seed=seed + 7, **CASES[case])
    gen = torch.Generator().manual_seed(seed)
    x = DATA.prior(n, float(sigmas[0]), spatial=tuple(shape[1:]), generator=gen)
    fn = SAMPLERS[sampler]
    kwargs = {"disable": True}
    if is_stochastic_sampler(sampler):
        kwargs["noise_sampler"] = default_noise_sampler(x, seed=seed + 1)
    if method == "fp":
        model = DATA.denoiser
    else:
        opts = {"seed": seed + 3} if method in ("qncd", "d2dpm_stochastic") else {}
        model = make_baseline(method, planted, calibration, **opts)
        kwargs.update(model.sampler_kwargs(sampler, sigmas))
    out = fn(model, x, sigmas, **kwargs)
    mean, var = channel_stats(out)
    dmean = float(((mean - DATA.mean) ** 2).mean().sqrt())
    dvar = float((var / DATA.std**2 - 1).mean()) * 100
    return dmean, dvar


def markdown(case: str, rows: Dict[str, List[tuple]], samplers: Sequence[str]) -> str:
    head = "| method | " + " | ".join(samplers) + " |"
    sep = "|---|" + "---|" * len(samplers)
    lines = [f"**{case}** ({CASE_TEXT[case]}); cells: dmean / dvar%", "", head, sep]
    for method, cells in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{m:.3f} / {v:+.1f}" for m, v in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="samples per run (each 2 x 4 x 4)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--sigma-max", type=float, default=80.0)
    ap.add_argument("--sigma-min", type=float, default=0.02)
    ap.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--calibration", choices=("measured", "analytic"), default="measured",
                    help="measured: qdrift.calibrate on the planted model (K runs); analytic: exact moments")
    ap.add_argument("--k-cal", type=int, default=256, help="calibration runs for --calibration measured")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    samplers = [s for s in args.samplers.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    for name in samplers:
        if name not in SAMPLERS:
            raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    sigmas = get_sigmas_karras(args.steps, args.sigma_min, args.sigma_max).double()
    shape = (2, 4, 4)
    methods = ["fp"] + list(BASELINES)
    t0 = time.time()
    print(f"Gaussian data mu=(0.5, -0.5), s=(0.5, 1.0); {args.n} samples of {shape}; Karras {args.steps} steps "
          f"[{args.sigma_min}, {args.sigma_max}]; calibration: {args.calibration}"
          + (f" (K={args.k_cal})" if args.calibration == "measured" else "") + "\n")
    for case in cases:
        cal = calibration_for(case, sigmas, args.calibration, args.k_cal, shape)
        rows = {m: [run_one(m, s, case, cal, n=args.n, shape=shape, sigmas=sigmas) for s in samplers] for m in methods}
        print(markdown(case, rows, samplers) + "\n")
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
