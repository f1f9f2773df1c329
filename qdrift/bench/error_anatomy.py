"""What a quantized network's error is made of along the full-precision path, and how fast the network removes
the deviation it causes (a diagnostic of Q-Drift v2's error model; results in docs/bench_results.md).

Along the full-precision Euler path of ``K`` noises, at each step, the error ``delta = d_q - d_fp`` of the
quantized network at the full-precision state, and:

- ``model``: the share of its variance the v2 error model explains, ``k d_fp + j x / sigma + b`` fitted per
  channel by least squares (the gain, state term and bias; v2 removes this part exactly);
- ``pattern``: the share that is a fixed spatial pattern, the per-position mean over the ``K`` samples
  (debiased by the sample variance over ``K``);
- ``hf err`` / ``hf d``: the share of the energy of ``delta`` and of ``d_fp`` above radial frequency 0.25
  cycles per pixel;
- ``kappa state``: ``1 - sigma Cov(x, d) / Var(x)`` per channel (averaged), the slope of the denoiser on the
  state with which v2's surrogate propagates every deviation (``qdrift.plan.DriftPlan``);
- ``kappa err``: ``Cov(D(x + y) - D(x), y) / Var(y)`` with ``y = h delta``, the deviation one step of the
  error makes: the full-precision denoiser's slope along the error's own direction (one more call per step);
- ``keep``: ``1 + h (1 - kappa) / sigma`` with each kappa: the factor by which the step keeps a deviation
  (``< 1``: the network removes part of it).

And the plain quantized sampler's run from the same noises: its mean square difference from the full-precision
run's samples, both samples' standard deviations (excess or missing spread), and ``lifted``: of the positions where
the full-precision sample lies at or below the image range's black (-1, clipped in every bench image), the share
the quantized sample lifts above ``-1 + LIFT`` (a small zero-mean error there shows only where it is positive:
speckle on a black background, which Inception features weigh heavily and a variance per channel or band does not
locate).

    python benchmarks/error_anatomy.py --model dit --schemes w4a8,w3a4
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch

from . import runner as R
from .guidance import schedule
from .models import load_model

HIGH_FREQUENCY = 0.25  # cycles per pixel: the radial frequency above which energy counts as fine-grained
LIFT = 0.05  # above black (-1) by this much, a position of a full-precision black background counts as lifted


def _high_frequency_share(t: torch.Tensor) -> float:
    """Share of the energy of ``t`` ``[K, C, H, W]`` (each map's mean removed) above :data:`HIGH_FREQUENCY`."""
    power = torch.fft.rfft2(t - t.mean((-2, -1), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(t.shape[-2], dtype=t.dtype)[:, None]
    fx = torch.fft.rfftfreq(t.shape[-1], dtype=t.dtype)[None]
    high = (fy**2 + fx**2).sqrt() > HIGH_FREQUENCY
    return float(power[..., high].sum() / power.sum().clamp(min=1e-300))


def _model_share(delta: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> float:
    """Share of the variance of ``delta`` explained by ``k d + j u + b`` fitted per channel (least squares)."""
    explained, total = 0.0, 0.0
    for c in range(delta.shape[1]):
        e = delta[:, c].reshape(-1)
        a = torch.stack([d[:, c].reshape(-1), u[:, c].reshape(-1), torch.ones_like(e)], 1)
        fit = a @ torch.linalg.lstsq(a, e[:, None]).solution[:, 0]
        total += float(e.var(unbiased=False))
        explained += float(e.var(unbiased=False) - (e - fit).var(unbiased=False))
    return explained / max(total, 1e-300)


def _slope(dx: torch.Tensor, y: torch.Tensor) -> float:
    """``Cov(dx, y) / Var(y)`` per channel, averaged over channels."""
    dims = (0,) + tuple(range(2, y.ndim))
    yc, dc = y - y.mean(dims, keepdim=True), dx - dx.mean(dims, keepdim=True)
    return float(((dc * yc).sum(dims) / (yc * yc).sum(dims).clamp(min=1e-300)).mean())


@torch.no_grad()
def anatomy(model_fp: Callable, model_q: Callable, x: torch.Tensor, sigmas: torch.Tensor,
            extra_args: Optional[Dict] = None) -> Dict[str, object]:
    """The per-step rows and the final comparison described in the module docstring.

    ``x``: initial noise ``[K, C, H, W]`` (``K >= 2``) at ``sigmas[0]``; both models are k-diffusion denoisers
    ``D(x, sigma, **extra_args)``. Runs in float64 on the models' float32 outputs.
    """
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"anatomy: need initial noise [K >= 2, C, H, W], got shape {tuple(x.shape)}")
    extra = extra_args or {}
    sig = sigmas.double()
    k = x.shape[0]
    den = lambda model, state, s: model(state.float(), s.float().expand(k), **extra).double()  # noqa: E731
    x_fp = x.double()
    x_q = x_fp.clone()
    rows: List[Dict[str, float]] = []
    for i in range(len(sig) - 1):
        s, h = sig[i], sig[i + 1] - sig[i]
        d_fp = (x_fp - den(model_fp, x_fp, s)) / s
        if float(sig[i + 1]) > 0:
            delta = (x_fp - den(model_q, x_fp, s)) / s - d_fp
            y = h * delta
            k_state = 1 - float(s) * _slope(d_fp, x_fp)
            k_err = _slope(den(model_fp, x_fp + y, s) - (x_fp - s * d_fp), y)
            energy = float((delta**2).mean())
            pattern = float((delta.mean(0) ** 2).mean()) - float(delta.var(0).mean()) / k
            keep = lambda kappa: 1 + float(h) * (1 - kappa) / float(s)  # noqa: E731
            rows.append({"step": i, "sigma": float(s), "var": float(delta.var(unbiased=False)),
                         "model": _model_share(delta, d_fp, x_fp / s), "pattern": pattern / max(energy, 1e-300),
                         "hf err": _high_frequency_share(delta), "hf d": _high_frequency_share(d_fp),
                         "kappa state": k_state, "kappa err": k_err,
                         "keep state": keep(k_state), "keep err": keep(k_err)})
        x_q = x_q + h * (x_q - den(model_q, x_q, s)) / s
        x_fp = x_fp + h * d_fp
    black = x_fp <= -1
    lifted = float((x_q[black] > -1 + LIFT).double().mean()) if bool(black.any()) else float("nan")
    final = {"mse": float(((x_q - x_fp) ** 2).mean()), "std fp": float(x_fp.std()), "std q": float(x_q.std()),
             "black": float(black.double().mean()), "lifted": lifted}
    return {"rows": rows, "final": final}


def format_table(result: Dict[str, object]) -> str:
    cols = ["sigma", "var", "model", "pattern", "hf err", "hf d", "kappa state", "kappa err", "keep state", "keep err"]
    lines = ["| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[c]:.3g}" if c in ("sigma", "var") else f"{r[c]:.3f}"
                                                       for c in cols) + " |")
    f = result["final"]
    lines.append(f"\nplain quantized sampler: mean square difference from FP {f['mse']:.4g}; "
                 f"std FP {f['std fp']:.4f}, quantized {f['std q']:.4f}; of FP's black positions ({f['black']:.1%} "
                 f"of all) the quantized run lifts {f['lifted']:.2%} above {-1 + LIFT:g}")
    return "\n".join(lines)


def main(argv=None, load_net: Callable[[str], torch.nn.Module] = load_model) -> int:
    p = argparse.ArgumentParser(description="what the quantized bench network's error is made of, step by step")
    p.add_argument("--model", default="unet", choices=sorted(R.MODEL_SAMPLERS))
    p.add_argument("--schemes", default="w4a8,w4a4,w3a4")
    p.add_argument("--profile", default="stress", help="quantization profile (qdrift bench --quant-profile)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the bench's for the model's "
                                                            "first sampler)")
    p.add_argument("-K", type=int, default=8, help="noises (the bench's calibration seeds)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.K < 2:
        p.error("-K must be at least 2")
    torch.set_num_threads(args.threads)
    sampler = R.MODEL_SAMPLERS[args.model][0]
    schemes = [s for s in args.schemes.split(",") if s]
    cfg = R.BenchConfig(models=(args.model,), schemes=schemes, quant_profile=args.profile, progress=False, K=args.K)
    bm = R.prepare_model(args.model, cfg, schemes, lambda s: None, load_net)
    steps = args.steps or cfg.steps_for(sampler)
    sigmas = schedule(args.model, bm.fp, steps)
    x = R.initial_noise([R.CAL_SEED + k for k in range(args.K)], float(sigmas[0]))
    for scheme in schemes:
        result = anatomy(bm.fp, bm.quantized[scheme], x, sigmas, {"y": R.calib_labels(args.K)})
        print(f"\n{args.model} {scheme}, Euler {steps} steps on the bench schedule, K = {args.K}\n")
        print(format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
