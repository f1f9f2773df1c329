"""Would a look-ahead help v2 where its step-by-step balance leaves excess? (analytic Gaussian)

v2 balances each step greedily: the step's drift (and the fresh noise after it) brings the surrogate's corrected
state back to the full-precision state's variance. Where later steps cannot remove the error they add (Euler
ancestral's last steps go nearly to 0, so their drift is bounded, and their fresh noise is already lowered to
nothing), the run ends with excess: on the correlated analytic error at 20 steps v2 removes 69 % with Euler
ancestral (README, "Analytic-Gaussian results"). A look-ahead would aim earlier steps *below* the
full-precision variance by what the later ones leave.

This check tries it on the surrogate itself, by shooting: run v2 with a deficit ``T`` per unit (every step from
``start`` on aims ``T`` below the full-precision variance, :meth:`qdrift.plan.DriftPlan._deficit`), read the
surrogate's predicted final excess (the last step's ``excess_after`` in the trace), add it to ``T`` and run
again. If the look-ahead could work, the predicted final excess would fall with ``T`` and the measured share
of the excess removed would rise. Each row also gives the measured share and the mean square difference from
the full-precision samples.

    python benchmarks/lookahead_check.py [--sampler euler_ancestral] [--steps 20] [--starts 1,5,8] [--trace]
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

import qdrift
from qdrift import plan as _plan
from qdrift.cli import ArgumentParser, int_at_least, number

from .analytic import DATA, ERRORS, draws, planted, run


@contextmanager
def deficit(cal, T: torch.Tensor, start: int):
    """v2 runs inside aim every step from ``start`` on ``T`` ``[units]`` below the full-precision variance."""
    before = _plan.DriftPlan._deficit
    _plan.DriftPlan._deficit = lambda self, i: T if i >= start else 0.0
    _plan._SOLVED.pop(cal, None)  # solved steps are kept per calibration: these differ
    try:
        yield
    finally:
        _plan.DriftPlan._deficit = before
        _plan._SOLVED.pop(cal, None)


def shoot(name, x_T, sigmas, cal, model, seed, start, iterations, fp, q):
    """Rows ``(T, predicted final excess, removed %, mean square difference)`` of the shooting iterations, and
    the first run's trace. ``model()`` gives a fresh planted model (it draws its fresh error from its own
    generator, so every run sees the same draws)."""
    excess = float((q.var(0) - fp.var(0)).sum())
    T = torch.zeros(cal.channels, dtype=torch.float64)
    rows, first = [], None
    for _ in range(iterations):
        with deficit(cal, T.clone(), start), qdrift.plan.recording() as plans:
            out = run(name, x_T, sigmas, model(), cal, seed, method="v2")
        trace = plans[0].trace
        first = first or trace
        final = trace[-1]["excess_after"]
        rows.append((float(T.sum()), float(final.sum()), 100.0 * (1 - float((out.var(0) - fp.var(0)).sum()) / excess),
                     float(((out - fp) ** 2).mean(0).sum())))
        T = T + final
    return rows, first


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sampler", default="euler_ancestral", help="a qdrift sampler (default euler_ancestral)")
    p.add_argument("--steps", type=int_at_least(2), default=20)
    p.add_argument("--error", choices=ERRORS, default="correlated")
    p.add_argument("--v", type=number(0.0, strict=True), default=0.4, help="planted error variance (the README's 0.4)")
    p.add_argument("--n", type=int_at_least(2), default=50_000)
    p.add_argument("--K", type=int_at_least(1), default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--starts", default="1,5,8", help="comma-separated first steps of the deficit")
    p.add_argument("--iterations", type=int_at_least(1), default=4)
    p.add_argument("--trace", action="store_true", help="also print the greedy run's steps")
    a = p.parse_args(argv)
    if a.sampler not in qdrift.SAMPLERS:
        p.error(f"--sampler: unknown {a.sampler!r}; one of {', '.join(qdrift.SAMPLERS)}")
    try:
        starts = [int(s) for s in a.starts.split(",")]
    except ValueError:
        p.error(f"--starts: comma-separated step indices expected, got {a.starts!r}")
    t0 = time.perf_counter()
    # the same draws as `qdrift analytic` (one band): its v2 column is the first row
    x_T, sigmas, cal, _ = draws(a.n, a.steps, a.v, a.K, a.error, a.seed)

    def model():
        return planted(a.error, a.v, a.seed + 3)

    fp = run(a.sampler, x_T, sigmas, DATA, None, a.seed + 2)
    q = run(a.sampler, x_T, sigmas, model(), None, a.seed + 2)
    print(f"{a.sampler}, {a.steps} Karras steps, {a.error} error v={a.v:g}, n={a.n}: plain quantized mean square "
          f"difference from FP {float(((q - fp) ** 2).mean(0).sum()):.4f}")
    print("| first step of the deficit | deficit T (sum over channels) | predicted final excess | excess removed | "
          "mean square difference from FP |")
    print("|---:|---:|---:|---:|---:|")
    trace = None
    for start in starts:
        rows, first = shoot(a.sampler, x_T, sigmas, cal, model, a.seed + 2, start, a.iterations, fp, q)
        trace = trace or first
        for T, final, removed, msd in rows:
            print(f"| {start} | {T:.3f} | {final:.3f} | {removed:.1f} % | {msd:.4f} |")
    if a.trace:
        print("\ngreedy v2 (T = 0), per step: sigma -> sigma_eff, c per channel, predicted excess after the step")
        for t in trace:
            print(f"{t['step']:3d} {t['sigma']:9.4f} -> {t['sigma_eff']:8.4f}  c {[round(float(c), 3) for c in t['c']]}"
                  f"  excess after {float(t['excess_after'].sum()):.4f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
