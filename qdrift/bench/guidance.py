"""A benchmark network as a k-diffusion denoiser: classifier-free guidance, the core's adapter, the schedule.

Networks reach the samplers through the core's adapters (U-Net: :class:`qdrift.adapters.DiscreteEpsDenoiser` on
its ``alphas_cumprod``; DiT: :class:`qdrift.adapters.FlowDenoiser`), with classifier-free guidance inside the
network callable (:class:`GuidedNet`), so calibration pairs are taken after CFG. Used by the bench
(:mod:`qdrift.bench.runner`) and the training preview (:func:`qdrift.bench.train.sample_preview`).
"""

from __future__ import annotations

import torch
from torch import nn

from qdrift.adapters import DiscreteEpsDenoiser, FlowDenoiser, get_sigmas_flow

from .models import NULL_LABEL, vp_alphas_cumprod

__all__ = ["GuidedNet", "wrap_denoiser", "schedule"]


class GuidedNet(nn.Module):
    """Classifier-free guidance inside the network callable: ``out_u + scale * (out_c - out_u)``.

    Call: ``net(x [B, C, H, W], t [B], y [B] int) -> [B, C, H, W]`` (one batched call of the wrapped network on
    ``[x; x]`` with labels ``[y; null]``). ``scale = 1`` calls the network once, conditionally.
    """

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.net(x, t, y)
        null = torch.full_like(y, NULL_LABEL)
        out_c, out_u = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return out_u + self.scale * (out_c - out_u)


def wrap_denoiser(kind: str, net: nn.Module, cfg: float) -> nn.Module:
    """The k-diffusion denoiser ``D(x, sigma, y=labels)`` of a benchmark network, guidance included.

    Args:
        kind: ``"unet"`` (eps prediction on :func:`qdrift.bench.models.vp_alphas_cumprod`) or ``"dit"`` (flow).
        net: the network ``net(x, t, y)``; cfg: the guidance scale.
    """
    guided = GuidedNet(net, cfg)
    if kind == "unet":
        return DiscreteEpsDenoiser(guided, vp_alphas_cumprod())
    if kind == "dit":
        return FlowDenoiser(guided)
    raise ValueError(f"unknown model kind {kind!r}; expected 'unet' or 'dit'")


def schedule(kind: str, denoiser: nn.Module, steps: int) -> torch.Tensor:
    """Sampling schedule ``[steps + 1]``: Karras (rho 7) over the U-Net's VP range, uniform flow time for the DiT."""
    if kind == "unet":
        return denoiser.get_sigmas(steps).to(torch.float32)
    return get_sigmas_flow(steps).to(torch.float32)
