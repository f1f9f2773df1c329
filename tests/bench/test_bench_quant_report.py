"""Quantizing the bench denoisers with sampler-driven calibration (tiny untrained configs)."""

import pytest
import torch

from qdrift.bench.models import DiT, UNet
from qdrift.bench.quant_report import output_error, sampler_calibration
from qdrift.quant import SVDQuantLayer, quantize


@pytest.mark.parametrize("kind,net", [("unet", lambda: UNet(channels=8, mult=(1, 2))),
                                      ("dit", lambda: DiT(dim=32, depth=2, heads=2))])
@pytest.mark.parametrize("scheme", ["w4a4", "w4a8"])
def test_quantize_bench_denoiser(kind, net, scheme):
    torch.manual_seed(0)
    model = net().eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    q = quantize(model, scheme, sampler_calibration(kind, n=4, steps=3))
    err = output_error(kind, model, q, n=4, steps=3)
    assert 0 < err < 0.5
    if scheme == "w4a4":
        names = {n for n, m in q.named_modules() if isinstance(m, SVDQuantLayer)}
        if kind == "dit":
            assert "blocks.0.mlp.fc2" in names and not any("ada" in n or "final" in n for n in names)
            assert q.qdrift_quant["layers"]["blocks.0.mlp.fc2"]["unsigned"]  # after GELU
        else:
            assert "down.0.conv1" in names and not any("skip" in n or "sample" in n for n in names)
