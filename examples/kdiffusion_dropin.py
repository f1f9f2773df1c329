"""Drop Q-Drift into k-diffusion-style code: wrap a network, calibrate, sample, save and load.

A tiny eps-prediction conv net on an SD-like discrete VP schedule stands in for a U-Net; its "quantized"
twin is the same net with weights rounded to 4 bits per output channel. Swap in your own pair.

    python examples/kdiffusion_dropin.py
"""

import os
import tempfile

import torch
from torch import nn

import qdrift
from qdrift.adapters import DiscreteEpsDenoiser

torch.manual_seed(0)


class TinyEpsNet(nn.Module):
    def __init__(self, channels=4, width=32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, label=None):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return 0.1 * self.body(torch.cat([x, tt], 1))


def fake_quantize_weights(net, bits=4):
    """Symmetric per-output-channel weight rounding (round to nearest), a copy."""
    q = TinyEpsNet()
    q.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in q.parameters():
            if p.ndim > 1:
                scale = p.abs().amax(dim=tuple(range(1, p.ndim)), keepdim=True) / (2 ** (bits - 1) - 1)
                p.copy_((p / scale).round() * scale)
    return q


betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
alphas_cumprod = torch.cumprod(1 - betas, 0)
net = TinyEpsNet().eval()
model_fp = DiscreteEpsDenoiser(net, alphas_cumprod)                       # k-diffusion denoiser D(x, sigma)
model_q = DiscreteEpsDenoiser(fake_quantize_weights(net), alphas_cumprod)

# Calibrate once (K = 5 noises; extra_args reach both models, as in k-diffusion).
sigmas = model_fp.get_sigmas(30)
x_cal = model_fp.noise_scaling(sigmas[0], torch.randn(5, 4, 16, 16))
cal = qdrift.calibrate(model_fp, model_q, x_cal, sigmas, {"label": None}, disable=True)

path = os.path.join(tempfile.mkdtemp(), "tiny_w4.qdrift.safetensors")
cal.save(path)
cal = qdrift.load_calibration(path)                                     # safetensors: no code runs on load
print(cal, "\nsaved to", path)
print("mean V over steps and channels:", float(cal.V.mean()))

# Sample exactly as with k_diffusion.sampling.sample_*: the V argument is the only addition.
x = model_fp.noise_scaling(sigmas[0], torch.randn(2, 4, 16, 16))
for name in ("euler", "dpmpp_2m", "dpmpp_2m_sde"):
    fn = qdrift.SAMPLERS[name]
    plain = fn(model_q, x, sigmas, None, disable=True, **({"noise_sampler": qdrift.default_noise_sampler(x, seed=0)} if "sde" in name else {}))
    fixed = fn(model_q, x, sigmas, cal, disable=True, **({"noise_sampler": qdrift.default_noise_sampler(x, seed=0)} if "sde" in name else {}))
    print(f"{name:14s} mean |change| from Q-Drift: {(fixed - plain).abs().mean():.4f}   finite: {bool(fixed.isfinite().all())}")
# 20 steps instead of 30: the same calibration, interpolated.
fewer = model_fp.get_sigmas(20)
print("20-step Euler with the 30-step calibration:", qdrift.sample_euler_qdrift(model_q, x, fewer, cal, disable=True).shape)
