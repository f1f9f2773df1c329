"""How much of the quantization-induced excess variance each sampler's correction removes (analytic Gaussian).

Data: per channel N(mu_c, s_c^2) with an exact denoiser. "Quantized" model: the exact eps estimate plus fresh
N(0, v) noise on every call (``qdrift.analytic.PlantedErrorDenoiser``). Every variant of a sampler starts from
the same noise and uses the same sampler noise (common random numbers), so differences are the correction's.

    excess removed = 1 - (Var_corrected - Var_fp) / (Var_quantized - Var_fp)      (summed over channels)

100 % means the corrected quantized sampler ends with exactly the full-precision sampler's variance;
above 100 % it over-corrects (the sample ends under-dispersed).

V variants: ``oracle`` is the planted Var(delta) = v (the variance actually injected); ``calibrated`` is
``qdrift.calibrate`` (K trajectories, conditional V = Var(delta | d_hat), the paper's statistic), which for
independent noise is smaller than v by the factor Var(d) / (Var(d) + v).

Run:  qdrift analytic [--n 200000] [--steps 20] [--markdown out.md]
      (or python benchmarks/analytic_gaussian.py, the same)
"""

from __future__ import annotations

import os
import sys
import time

import torch

import qdrift
from qdrift.analytic import GaussianData, PlantedErrorDenoiser
from qdrift.cli import ArgumentParser, int_at_least, number

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
MULTISTEP = {"lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"}


def variants(name):
    """(label, sampler options) for the corrected runs of one sampler."""
    out = [("drift", {})]
    if name in MULTISTEP:
        out = [("drift, first_order", {"form": "first_order"}), ("drift, quadrature", {"form": "quadrature"})]
    if name in STOCHASTIC:
        out.append(("noise", {"correction": "noise"}))
    return out


def run(name, x_T, sigmas, model, V, seed, **opts):
    fn = qdrift.SAMPLERS[name]
    if name in STOCHASTIC:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x_T, seed=seed)
    return fn(model, x_T.clone(), sigmas, V, disable=True, **opts)


def measure(n: int, steps: int, v: float, K: int, seed: int = 0):
    """Returns rows (sampler, variant, V source, excess removed %, final var vs FP %, vs exact %)."""
    gen = torch.Generator().manual_seed(seed)
    x_T = DATA.prior(n, SIGMA_MAX, generator=gen)
    sigmas = qdrift.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
    exact = DATA.std**2

    # Calibrate once (Euler FP trajectories on a finer schedule), reuse at every sampler's sigmas.
    planted = PlantedErrorDenoiser(DATA, var=v, seed=seed + 1)
    cal_x = DATA.prior(K, SIGMA_MAX, spatial=(16, 16), generator=gen)
    cal = qdrift.calibrate(DATA, planted, cal_x, qdrift.get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX).double(), disable=True)
    oracle = torch.full((steps, DATA.channels), v)

    rows = []
    for name in qdrift.SAMPLERS:
        s = sigmas
        fp = run(name, x_T, s, DATA, None, seed + 2).var(0)
        q = run(name, x_T, s, PlantedErrorDenoiser(DATA, var=v, seed=seed + 3), None, seed + 2).var(0)
        excess = float((q - fp).sum())
        rows.append((name, "quantized, no correction", "-", 0.0, _pct(q, fp), _pct(q, exact)))
        for label, opts in variants(name):
            for source, V in (("oracle v", oracle), (f"calibrated K={K}", cal)):
                corr = run(name, x_T, s, PlantedErrorDenoiser(DATA, var=v, seed=seed + 3), V, seed + 2, **opts).var(0)
                removed = 100.0 * (1 - float((corr - fp).sum()) / excess)
                rows.append((name, label, source, removed, _pct(corr, fp), _pct(corr, exact)))
        rows.append((name, "full precision", "-", float("nan"), 0.0, _pct(fp, exact)))
    return rows


def _pct(var, ref) -> float:
    """Mean over channels of the relative variance error, in percent."""
    return float(((var / ref) - 1).mean() * 100)


def to_markdown(rows, args) -> str:
    head = (
        f"Analytic Gaussian, {args.steps} Karras steps ({SIGMA_MAX} -> {SIGMA_MIN}), planted eps-noise v = {args.v}, "
        f"N = {args.n} samples.\n\n"
        "| sampler | variant | V | excess variance removed | final var vs FP | final var vs exact |\n"
        "|---|---|---|---:|---:|---:|\n"
    )
    lines = []
    for name, label, source, removed, vs_fp, vs_exact in rows:
        rem = "" if removed != removed else f"{removed:.1f} %"
        lines.append(f"| {name} | {label} | {source} | {rem} | {vs_fp:+.2f} % | {vs_exact:+.2f} % |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="qdrift analytic", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int_at_least(2), default=200_000, help="samples per run (>= 2: a variance needs two)")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="sampler steps")
    p.add_argument("--v", type=number(0.0, strict=True), default=0.1, help="planted eps-noise variance (> 0)")
    p.add_argument("--K", type=int_at_least(1), default=5, help="calibration trajectories (16x16 spatial each)")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.markdown and not os.path.isdir(os.path.dirname(os.path.abspath(args.markdown))):
        p.error(f"--markdown: no such directory for {args.markdown!r}")
    t0 = time.time()
    table = to_markdown(measure(args.n, args.steps, args.v, args.K), args)
    print(table)
    print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
