"""Quick start on the analytic Gaussian: calibrate a "quantized" model, sample with and without Q-Drift.

The data is per-channel Gaussian, so the exact denoiser and the exact final variance are known. The
"quantized" model is the exact one plus fresh eps-noise (what quantization error looks like to a sampler).

    python examples/quickstart_gaussian.py
"""

import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser

torch.manual_seed(0)
data = GaussianData(mean=[0.5, -1.0, 0.0], std=[1.0, 0.5, 2.0])
model_fp = data.denoiser                                    # full precision: the exact denoiser
model_q = PlantedErrorDenoiser(data, var=0.1, seed=1)       # "quantized": eps + N(0, 0.1) per call

# 1. Calibrate from K = 5 paired runs (16x16 "latents", 3 channels) on a 40-step schedule.
calib_sigmas = qdrift.get_sigmas_karras(40, 0.002, 80.0).double()
x_cal = torch.randn(5, 3, 16, 16, dtype=torch.float64) * calib_sigmas[0]
cal = qdrift.calibrate(model_fp, model_q, x_cal, calib_sigmas, disable=True)
print(cal)
print("V at the first, middle and last calibrated sigma:\n", cal.V[[0, 20, -1]])

# 2. Sample 50k points with another schedule (60 steps): the calibration is interpolated in log-sigma.
sigmas = qdrift.get_sigmas_karras(60, 0.002, 80.0).double()
x_T = data.prior(50_000, 80.0, generator=torch.Generator().manual_seed(2))
runs = {
    "full precision": qdrift.sample_dpmpp_2m_qdrift(model_fp, x_T, sigmas, disable=True),
    "quantized": qdrift.sample_dpmpp_2m_qdrift(model_q, x_T, sigmas, disable=True),
    "quantized + Q-Drift": qdrift.sample_dpmpp_2m_qdrift(model_q, x_T, sigmas, cal, disable=True),
}
print(f"\n{'':22s} final variance per channel   (exact: {data.std.pow(2).tolist()})")
for name, x in runs.items():
    print(f"{name:22s} {[round(v, 3) for v in x.var(0).tolist()]}")
fp, q, qd = (runs[k].var(0).sum() for k in runs)
print(f"\nexcess variance over full precision removed by Q-Drift: {100 * (1 - (qd - fp) / (q - fp)):.0f} %")
