"""How much of the quantization-induced excess variance each sampler's correction removes (analytic Gaussian).

Data: per channel N(mu_c, s_c^2) with an exact denoiser. "Quantized" model: the exact eps estimate plus a planted
error (:class:`qdrift.bench.gaussian.PlantedErrorDenoiser`): ``--error independent`` is fresh N(0, v) noise at
every call (the paper's error model); ``--error correlated`` is half of it fresh and half a per-trajectory field
kept along the trajectory (a real network's errors at successive steps are strongly correlated). Every variant
of a sampler starts from the same noise and uses the same sampler noise (common random numbers), so differences
are the correction's.

    excess removed = 1 - (Var_corrected - Var_fp) / (Var_quantized - Var_fp)      (summed over channels)

100 % means the corrected quantized sampler ends with exactly the full-precision sampler's variance;
above 100 % it over-corrects (the sample ends under-dispersed).

Variants: ``paper (oracle V)`` is the paper's rule with the planted per-call variance; every other column uses
``qdrift.calibrate`` (K trajectories of 16x16 "latents"), with the method named: ``paper`` (first order,
conditional V = Var(delta | d_hat), the paper's statistic), ``exact``, ``correlated``, ``v2`` (the library
default for a calibration without matching tables) and ``matched`` (``qdrift.match_moments`` on each sampler's
own schedule from K further noises) of ``qdrift.correction.METHODS``; multistep samplers also with the authors' ``form="quadrature"``,
stochastic samplers also with ``correction="noise"`` and v2 with each correction (the column ``v2`` is the
sampler's default: noise first for the DPM++ SDE samplers, the drift for Euler a).

``--flow``: the same data as a rectified flow (:class:`qdrift.bench.gaussian.FlowGaussianData`), the error
planted in the velocity; columns paper and v2, and v2 along the whole flow step (before session 15) with the
mean square difference from FP's samples, which the variance alone does not show (:func:`measure_flow`).

Run:  qdrift analytic [--n 200000] [--steps 20] [--error independent|correlated|persistent] [--samplers a,b]
      [--eta E] [--flow] [--markdown out.md]
      (or python benchmarks/analytic_gaussian.py, the same)
"""

from __future__ import annotations

import os
import sys
import time

import torch

import qdrift
from qdrift.samplers import sampler_names
from qdrift.cli import ArgumentParser, int_at_least, number

from ..correction import band_components
from .gaussian import FlowGaussianData, GaussianData, PlantedErrorDenoiser, SpeckleErrorDenoiser, SpectralGaussianData

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
STOCHASTIC = set(sampler_names(stochastic=True))  # euler_ancestral and the SDEs
MULTISTEP = set(sampler_names(multistep=True))
METHODS = ("paper", "exact", "correlated", "v2", "matched")
ERRORS = ("independent", "correlated", "persistent", "speckle")
SPECTRAL = SpectralGaussianData([4.0, 1.0, 0.1, 0.01], (16, 16))  # image-like: power falls with frequency
BANDS = 4


FLOW = FlowGaussianData(DATA)
FLOW_SDE_START = 1 - 1e-4  # the DPM++ SDE solvers' first t on a flow (half-log-SNR is -inf at 1; ComfyUI's offset)


def planted(kind: str, v: float, seed: int, data=DATA) -> PlantedErrorDenoiser:
    """The planted "quantized" model: total per-call error variance ``v`` (in ``d`` units: eps, or a flow's
    velocity), fresh at every call (``independent``), half fresh and half kept along each trajectory
    (``correlated``) or all kept (``persistent``)."""
    if kind == "independent":
        return PlantedErrorDenoiser(data, var=v, seed=seed)
    if kind == "persistent":
        return PlantedErrorDenoiser(data, var=0.0, persistent=v, seed=seed)
    return PlantedErrorDenoiser(data, var=v / 2, persistent=v / 2, seed=seed)


def columns(name):
    """(label, V source, sampler options) of the corrected runs of one sampler."""
    out = [("paper (oracle V)", "oracle", {"method": "paper"})]
    out += [(m, "cal", {"method": m}) for m in METHODS]
    if name in MULTISTEP:
        out.append(("paper, quadrature", "cal", {"method": "paper", "form": "quadrature"}))
    if name in STOCHASTIC:
        out += [("paper, noise", "cal", {"method": "paper", "correction": "noise"}),
                ("v2, drift", "cal", {"method": "v2", "correction": "drift"}),
                ("v2, noise", "cal", {"method": "v2", "correction": "noise"})]
    return out


def run(name, x_T, sigmas, model, V, seed, **opts):
    fn = qdrift.SAMPLERS[name]
    if name in STOCHASTIC:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x_T, seed=seed)
    return fn(model, x_T.clone(), sigmas, V, disable=True, **opts)


def draws(n: int, steps: int, v: float, K: int, error: str, seed: int, bands: int = 1):
    """``(x_T, sigmas, calibration, generator)`` of :func:`measure`: the samples' initial noise, the Karras schedule
    and the calibration (once, Euler FP trajectories of K noises on a finer schedule, reused at every sampler's
    sigmas); the generator goes on to the matching noises."""
    gen = torch.Generator().manual_seed(seed)
    x_T = DATA.prior(n, SIGMA_MAX, spatial=(16, 16) if bands > 1 else (), generator=gen)
    sigmas = qdrift.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
    cal_x = DATA.prior(K, SIGMA_MAX, spatial=(16, 16), generator=gen)
    cal = qdrift.calibrate(DATA, planted(error, v, seed + 1), cal_x,
                           qdrift.get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX).double(), disable=True, bands=bands)
    return x_T, sigmas, cal, gen


def measure(n: int, steps: int, v: float, K: int, error: str = "independent", seed: int = 0, bands: int = 1,
            samplers=None, eta=None):
    """Returns ``{sampler: {column label: excess removed %}}`` and the final variances vs FP (``bands``: the
    calibration's frequency bands, used by the exact methods; ``samplers``: the qdrift samplers to run, default
    all; ``eta``: the stochastic samplers' noise amount, default theirs)."""
    noisy = {} if eta is None else {"eta": float(eta)}
    x_T, sigmas, cal, gen = draws(n, steps, v, K, error, seed, bands)
    oracle = torch.full((steps, DATA.channels), v)
    match_x = DATA.prior(K, SIGMA_MAX, spatial=(16, 16), generator=gen)
    table = {}
    for name in samplers or qdrift.SAMPLERS:
        knobs = noisy if name in STOCHASTIC else {}
        # moment matching runs the sampler itself (this schedule), from K more calibration noises
        matched = qdrift.match_moments(cal, DATA, planted(error, v, seed + 4), match_x, sigmas, name, seed=seed + 5,
                                       sampler_kwargs=knobs or None)
        fp = run(name, x_T, sigmas, DATA, None, seed + 2, **knobs).var(0)
        q = run(name, x_T, sigmas, planted(error, v, seed + 3), None, seed + 2, **knobs).var(0)
        excess = float((q - fp).sum())
        row = {"quantized vs FP": 100.0 * float(((q / fp) - 1).mean())}
        for label, source, opts in columns(name):
            V = oracle if source == "oracle" else (matched if opts.get("method") == "matched" else cal)
            corr = run(name, x_T, sigmas, planted(error, v, seed + 3), V, seed + 2, **opts, **knobs).var(0)
            row[label] = 100.0 * (1 - float((corr - fp).sum()) / excess)
        if bands > 1:  # the same calibration without its bands: what the bands themselves change
            per_channel = qdrift.Calibration(cal.sigmas, cal.moments, cal.reduce, cal.conditional, cal.meta,
                                             trajectory=cal.trajectory)
            corr = run(name, x_T, sigmas, planted(error, v, seed + 3), per_channel, seed + 2, method="v2",
                       **knobs).var(0)
            row["v2, one c per channel"] = 100.0 * (1 - float((corr - fp).sum()) / excess)
        table[name] = row
    return table


def measure_flow(n: int, steps: int, v: float, K: int, error: str = "independent", seed: int = 0, samplers=None):
    """The same data as a rectified flow (:data:`FLOW`, uniform ``t`` from 1 to 0), the error planted in the
    velocity. Returns ``{sampler: {column: (excess removed %, mean square difference from FP's samples over the
    quantized run's)}}``; the column ``v2, whole step`` runs v2 with ``flow=False`` (the drift along the whole
    flow step, as before session 15; deterministic samplers only: a stochastic one's noise form changes too)."""
    gen = torch.Generator().manual_seed(seed)
    x_T = FLOW.prior(n, generator=gen)
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    cal = qdrift.calibrate(FLOW, planted(error, v, seed + 1, FLOW), FLOW.prior(K, spatial=(16, 16), generator=gen),
                           torch.linspace(1, 0, 41, dtype=torch.float64), disable=True, bands=1)
    cols = [("paper (oracle V)", torch.full((steps, DATA.channels), v), {"method": "paper"}),
            ("paper", cal, {"method": "paper"}), ("v2", cal, {"method": "v2"}),
            ("v2, whole step", cal, {"method": "v2", "flow": False})]
    table = {}
    brownian = set(sampler_names(brownian=True))
    for name in samplers or qdrift.SAMPLERS:
        sig = sigmas
        if name in brownian:  # they start below t = 1 (the same noise: at 1 - 1e-4 it is the marginal to 1e-4)
            sig = sigmas.clone()
            sig[0] = FLOW_SDE_START
        fp = run(name, x_T, sig, FLOW, None, seed + 2)
        q = run(name, x_T, sig, planted(error, v, seed + 3, FLOW), None, seed + 2)
        excess, mse_q = float((q.var(0) - fp.var(0)).sum()), float(((q - fp) ** 2).mean())
        row = {"quantized vs FP": (100.0 * float((q.var(0) / fp.var(0) - 1).mean()), 1.0)}
        for label, V, opts in cols:
            if opts.get("flow") is False and name in STOCHASTIC:
                continue
            corr = run(name, x_T, sig, planted(error, v, seed + 3, FLOW), V, seed + 2, **opts)
            row[label] = (100.0 * (1 - float((corr.var(0) - fp.var(0)).sum()) / excess),
                          float(((corr - fp) ** 2).mean()) / mse_q)
        table[name] = row
    return table


def flow_markdown(table, args) -> str:
    labels = ["paper (oracle V)", "paper", "v2", "v2, whole step"]
    error = {"independent": f"fresh N(0, {args.v}) per call", "persistent": f"N(0, {args.v}) kept along each "
             "trajectory"}.get(args.error, f"N(0, {args.v / 2:g}) fresh per call plus N(0, {args.v / 2:g}) kept along "
                                           "each trajectory")
    head = (f"Analytic Gaussian as a rectified flow, {args.steps} uniform steps in t (1 -> 0), planted velocity "
            f"error: {error}; N = {args.n} samples, calibration K = {args.K}. Each cell: share of the excess final "
            "variance removed (100 % = the FP sampler's variance), and in brackets the mean square difference from "
            "the FP sampler's samples (same noise) over the uncorrected quantized run's. `v2, whole step`: v2's "
            "drift along the whole flow step (`flow=False`, before session 15), deterministic samplers only.\n\n"
            "| sampler | quantized vs FP | " + " | ".join(labels) + " |\n|---|" + "---:|" * (len(labels) + 1) + "\n")
    lines = []
    for name, row in table.items():
        cells = [f"{row['quantized vs FP'][0]:+.1f} %"]
        cells += [f"{row[k][0]:.1f} % ({row[k][1]:.2f})" if k in row else "—" for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def measure_spectral(n: int, steps: int, K: int, seed: int = 0, amp: float = 0.5):
    """Frequency-resolved v2 on stationary fields with a high-pass error (``--error speckle``).

    Data: :data:`SPECTRAL` (16x16 fields, band powers 4, 1, 0.1, 0.01); error:
    :class:`SpeckleErrorDenoiser` with fresh and kept parts of amplitude ``amp``. Returns
    ``{sampler: {column: [excess removed % per band] + [total]}}`` for the quantized run's excess
    (``quantized``, in % of FP's band variance), v2 with one ``c`` per channel and v2 with 4 bands.
    """
    gen = torch.Generator().manual_seed(seed)
    x_T = SPECTRAL.prior(n, SIGMA_MAX, generator=gen)
    sigmas = qdrift.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
    cal = qdrift.calibrate(SPECTRAL, SpeckleErrorDenoiser(SPECTRAL, amp, amp, seed + 1),
                           SPECTRAL.prior(K, SIGMA_MAX, generator=gen),
                           qdrift.get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX).double(), disable=True, bands=BANDS)
    per_channel = qdrift.Calibration(cal.sigmas, cal.moments, cal.reduce, cal.conditional, cal.meta,
                                     trajectory=cal.trajectory)

    def band_var(y):
        return band_components(y, BANDS).var((0, 2, 3))

    table = {}
    for name in qdrift.SAMPLERS:
        model = lambda: SpeckleErrorDenoiser(SPECTRAL, amp, amp, seed + 3)  # noqa: E731 (the same error stream)
        fp = band_var(run(name, x_T, sigmas, SPECTRAL, None, seed + 2))
        q = band_var(run(name, x_T, sigmas, model(), None, seed + 2))
        row = {"quantized": (100.0 * (q / fp - 1)).tolist() + [100.0 * float(q.sum() / fp.sum() - 1)]}
        for label, V in (("v2, per channel", per_channel), (f"v2, {BANDS} bands", cal)):
            corr = band_var(run(name, x_T, sigmas, model(), V, seed + 2, method="v2"))
            removed = 100.0 * (1 - (corr - fp) / (q - fp))
            row[label] = removed.tolist() + [100.0 * (1 - float((corr - fp).sum() / (q - fp).sum()))]
        table[name] = row
    return table


def spectral_markdown(table, args) -> str:
    labels = list(next(iter(table.values())))
    head = (f"Analytic stationary fields (16x16, power per radial band 4 / 1 / 0.1 / 0.01), {args.steps} Karras "
            f"steps, planted speckle error (high-pass noise, half fresh per call, half kept along each "
            f"trajectory); N = {args.n} samples, calibration K = {args.K} with {BANDS} bands. Per band (low -> "
            "high) and in total: the quantized sampler's excess variance in % of FP's, then the share of that "
            "excess v2 removes (100 % = FP's variance; above 100 % the band ends smoother than FP's).\n\n"
            "| sampler | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels) + "\n")
    cell = lambda v: " / ".join(f"{x:.0f}" for x in v[:-1]) + f" (total {v[-1]:.0f}) %"  # noqa: E731
    return head + "\n".join(f"| {name} | " + " | ".join(cell(row[k]) for k in labels) + " |"
                             for name, row in table.items()) + "\n"


def to_markdown(table, args) -> str:
    labels = ["paper (oracle V)"] + list(METHODS) + ["paper, quadrature", "paper, noise", "v2, drift", "v2, noise"]
    if args.bands > 1:
        labels.append("v2, one c per channel")
    error = {"independent": f"fresh N(0, {args.v}) eps-noise per call",
             "persistent": f"N(0, {args.v}) kept along each trajectory"}.get(
        args.error, f"N(0, {args.v / 2:g}) fresh per call plus N(0, {args.v / 2:g}) kept along each trajectory")
    if args.eta is not None:
        error += f"; stochastic samplers at eta = {args.eta:g}"
    head = (f"Analytic Gaussian, {args.steps} Karras steps ({SIGMA_MAX} -> {SIGMA_MIN}), planted error: {error}; "
            f"N = {args.n} samples" + (f" of 16x16 fields" if args.bands > 1 else "") + f", calibration K = {args.K}"
            + (f" with {args.bands} frequency bands" if args.bands > 1 else "") + ". Share of the excess final variance removed "
            "(100 % = the FP sampler's variance); first column: the quantized sampler's final variance vs FP.\n\n"
            "| sampler | quantized vs FP | " + " | ".join(labels) + " |\n"
            "|---|" + "---:|" * (len(labels) + 1) + "\n")
    lines = []
    for name, row in table.items():
        cells = [f"{row['quantized vs FP']:+.1f} %"] + [f"{row[k]:.1f} %" if k in row else "" for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="qdrift analytic", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int_at_least(2), default=200_000, help="samples per run (>= 2: a variance needs two)")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="sampler steps")
    p.add_argument("--v", type=number(0.0, strict=True), default=0.1, help="planted eps-noise variance (> 0)")
    p.add_argument("--K", type=int_at_least(1), default=5, help="calibration trajectories (16x16 spatial each)")
    p.add_argument("--error", choices=ERRORS, default="independent",
                   help="planted error: fresh per call (the paper's model), half kept along each trajectory, all "
                        "kept, or speckle: image-like stationary fields with a high-pass error, v2 per channel vs "
                        "per frequency band (--n is then the number of 16x16 fields)")
    p.add_argument("--samplers", help="comma-separated qdrift samplers to run (default: all)")
    p.add_argument("--eta", type=number(0.0), default=None,
                   help="noise amount of the stochastic samplers (default: each sampler's own)")
    p.add_argument("--bands", type=int_at_least(1), default=1,
                   help="frequency bands of the calibration (the exact methods use them; > 1 samples 16x16 fields: "
                        "--n is then their number)")
    p.add_argument("--flow", action="store_true",
                   help="the same data as a rectified flow (uniform t, error in the velocity; the DPM++ SDE solvers "
                        "from t = 1 - 1e-4): v2 along the score, and the deterministic samplers' v2 along the whole "
                        "flow step")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.markdown and not os.path.isdir(os.path.dirname(os.path.abspath(args.markdown))):
        p.error(f"--markdown: no such directory for {args.markdown!r}")
    samplers = None
    if args.samplers is not None:
        samplers = [name.strip() for name in args.samplers.split(",") if name.strip()]
        unknown = [name for name in samplers if name not in qdrift.SAMPLERS]
        if unknown or not samplers:
            p.error(f"--samplers: expected qdrift samplers from {', '.join(qdrift.SAMPLERS)}, got {args.samplers!r}")
    if args.error == "speckle" and (samplers is not None or args.eta is not None):
        p.error("--samplers and --eta apply to the independent, correlated and persistent errors, not speckle")
    if args.flow and (args.error == "speckle" or args.eta is not None or args.bands > 1):
        p.error("--flow takes the independent, correlated and persistent errors, without --eta and --bands")
    t0 = time.time()
    if args.flow:
        table = flow_markdown(measure_flow(args.n, args.steps, args.v, args.K, args.error, samplers=samplers), args)
    elif args.error == "speckle":
        table = spectral_markdown(measure_spectral(args.n, args.steps, args.K), args)
    else:
        table = to_markdown(measure(args.n, args.steps, args.v, args.K, args.error, bands=args.bands,
                                    samplers=samplers, eta=args.eta), args)
    print(table)
    print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
