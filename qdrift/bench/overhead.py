"""Cost of Q-Drift: sampler wall time with V vs V=None, and calibration peak memory at K=5 vs K=500.

Targets (issue "qdrift core"): wall-time ratio <= 1.02 for every sampler on a small conv net; calibration
peak memory flat in K (batches stream through mergeable statistics). Both timed columns include the per-call
model-output check (issue 12), so its cost is also printed on its own, next to the correction's.

Run:  python benchmarks/overhead.py [--repeats 7] [--steps 20]   (or make overhead; python -m qdrift.bench.overhead)
"""

from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import qdrift
from qdrift.baselines import is_stochastic_sampler


class SmallConvNet(nn.Module):
    """A denoiser-shaped conv net (about 80k parameters) with random weights: cost, not quality."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, sigma):
        c_in = (1 / (sigma**2 + 1) ** 0.5).reshape(-1, 1, 1, 1)
        s = sigma.log().reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        eps = self.net(torch.cat([x * c_in, s], 1))
        return x - sigma.reshape(-1, 1, 1, 1) * eps


def _perturbed(model: nn.Module, scale: float = 0.02) -> nn.Module:
    """A copy of ``model`` with its weights perturbed: a stand-in "quantized" network (cost, not quality)."""
    q = SmallConvNet().eval()
    q.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return q


VARIANTS = ("V", "v2 first", "v2", "v2-b4 first", "v2-b4", "matched", "matched-b4")
"""Timed corrections: the paper's rule with a tensor V, and with a Calibration method v2 (per channel, and per
channel and 4 frequency bands: FFTs of the model output and of the increment per step), matched (one c per
channel) and matched with 4 frequency bands (an FFT pair per step). v2 solves its surrogate on a run with a
calibration and schedule it has not seen ("first": a fresh copy of the calibration every run) and replays the
solved steps on later runs (the plain "v2" columns: the steady state of generating with one setting)."""


def time_samplers(repeats: int, steps: int, batch: int):
    # The random-weight stand-in's error is large for its output, so v2 clips some steps: cost, not quality.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        return _time_samplers(repeats, steps, batch)


def _time_samplers(repeats: int, steps: int, batch: int):
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    quantized = _perturbed(model)
    sigmas = qdrift.get_sigmas_karras(steps, 0.03, 14.6)
    x = torch.randn(batch, 4, 32, 32) * sigmas[0]
    V = torch.rand(steps, 4) * 0.1
    cal_x = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    cal = qdrift.calibrate(model, quantized, cal_x, sigmas, disable=True, bands=1)
    cal_b4 = qdrift.calibrate(model, quantized, cal_x, sigmas, disable=True, bands=4)
    rows = []
    for name, fn in qdrift.SAMPLERS.items():
        with torch.no_grad():
            matched = {b: qdrift.match_moments(cal, model, quantized, cal_x, sigmas, name, bands=b) for b in (1, 4)}
        options = {"none": (None, {}), "V": (V, {}), "v2": (cal, {"method": "v2"}), "v2-b4": (cal_b4, {"method": "v2"}),
                   "v2 first": (cal, {"method": "v2"}), "v2-b4 first": (cal_b4, {"method": "v2"}),
                   "matched": (matched[1], {}), "matched-b4": (matched[4], {})}
        times = {label: [] for label in options}
        for r in range(repeats + 1):
            order = list(options) if r % 2 else list(reversed(options))
            for label in order:
                v, extra = options[label]
                if label.endswith(" first"):
                    v = copy.copy(v)  # a new object: nothing solved for it yet
                kw = {"noise_sampler": qdrift.default_noise_sampler(x, seed=0)} if is_stochastic_sampler(name) else {}
                t0 = time.perf_counter()
                fn(quantized, x, sigmas, v, disable=True, **kw, **extra)
                if r:  # the first round warms up
                    times[label].append(time.perf_counter() - t0)
        # The minimum over interleaved repeats is the least disturbed by other load on the machine.
        base = min(times["none"])
        rows.append((name, base, {label: (min(times[label]) / base, (min(times[label]) - base) / steps * 1e3)
                                  for label in VARIANTS}))
    return rows


def correction_share(batch: int, reps: int = 200):
    """Per-step costs in isolation: the correction (``apply_drift`` on a sample), the model-output check
    (:class:`qdrift.validation.CheckedModel`: shape, dtype, device, one finiteness reduction) and one model call."""
    from qdrift.correction import apply_drift
    from qdrift.validation import CheckedModel

    model = SmallConvNet().eval()
    x = torch.randn(batch, 4, 32, 32)
    x_base = x * 0.9
    c = torch.rand(4) * 0.01
    sigma = torch.full((batch,), 2.0)

    def best(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        t_model = best(lambda: model(x, sigma))
        out = model(x, sigma)
    t_corr = best(lambda: apply_drift(x, x_base, c))
    checked = CheckedModel(model, "overhead", [2.0, 0.0])
    t_check = best(lambda: checked.check(out, x, sigma))
    return t_corr, t_check, t_model


def _peak_rss_child(k: int) -> int:
    """Runs a K-trajectory calibration in a fresh process; returns its peak RSS in MiB."""
    out = subprocess.run(
        [sys.executable, "-m", "qdrift.bench.overhead", "--_calibrate", str(k)], capture_output=True, text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _calibrate_child(k: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = SmallConvNet().eval()
    q = SmallConvNet().eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sigmas = qdrift.get_sigmas_karras(10, 0.03, 14.6)

    def batches():
        gen = torch.Generator().manual_seed(1)
        for _ in range(k // 5):
            yield torch.randn(5, 4, 32, 32, generator=gen) * sigmas[0]

    qdrift.calibrate(fp, q, batches(), sigmas, disable=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Q-Drift overhead: sampler wall time and calibration memory")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--_calibrate", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._calibrate:
        _calibrate_child(args._calibrate)
        return 0
    torch.set_num_threads(1)
    print(f"Sampler wall time, small conv net (4x32x32, batch {args.batch}, {args.steps} steps, fastest of {args.repeats} interleaved runs):\n")
    print("Wall time of each corrected run over the plain sampler's (V=None), and the added milliseconds per step (a "
          "cost that does not grow with the network): the paper's rule with a tensor V, and a Calibration with method "
          "v2 (per channel, and with 4 frequency bands; \"first\": a run that solves v2's surrogate, otherwise replayed), "
          "matched, and matched with 4 frequency bands.\n")
    print("| sampler | V=None (s) | " + " | ".join(f"{label}: ratio, ms/step" for label in VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    for name, base, ratios in time_samplers(args.repeats, args.steps, args.batch):
        cells = [f"{ratios[label][0]:.3f}, {ratios[label][1]:+.2f}" for label in VARIANTS]
        print(f"| {name} | {base:.3f} | " + " | ".join(cells) + " |")
    t_corr, t_check, t_model = correction_share(args.batch)
    print(f"\nPer step, in isolation: correction {t_corr * 1e6:.0f} us, model-output check {t_check * 1e6:.0f} us, "
          f"model call {t_model * 1e6:.0f} us (correction {100 * t_corr / t_model:.2f} % + check "
          f"{100 * t_check / t_model:.2f} % = {100 * (t_corr + t_check) / t_model:.2f} % of a model call; target 2 %)")
    small, large = _peak_rss_child(5), _peak_rss_child(500)
    print(f"\nCalibration peak RSS (10 steps, batches of 5): K=5: {small} MiB, K=500: {large} MiB, ratio {large / small:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
