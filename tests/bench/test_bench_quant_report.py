"""Quantizing the bench denoisers with sampler-driven calibration (tiny untrained configs)."""

import pytest
import torch

from qdrift.bench.models import DiT, UNet
from qdrift.bench.quant_report import bench_quantize, output_error, quant_options, sampler_calibration, sampler_samples
from qdrift.quant import MixDQLayer, SVDQuantLayer, quantize


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


@pytest.mark.parametrize("scheme", ["w4a4", "w3a4", "w4a8"])
def test_stress_profile_removes_float_safety_nets(scheme):
    torch.manual_seed(0)
    model = UNet(channels=8, mult=(1, 2)).eval()
    for p in model.parameters():  # an untrained U-Net's zero-initialized output conv would give 0/0 errors
        p.data.add_(0.05 * torch.randn_like(p))
    calib = sampler_calibration("unet", n=4, steps=3)
    ref = quantize(model, scheme, calib, **quant_options("reference", scheme))
    stress = quantize(model, scheme, calib, **quant_options("stress", scheme))
    if scheme == "w4a8":
        assert ref.qdrift_quant["float_act_layers"] and not stress.qdrift_quant["float_act_layers"]
        assert {m.weight_bits for m in stress.modules() if isinstance(m, MixDQLayer)} == {4}
    else:
        ref_layers = {n: m for n, m in ref.named_modules() if isinstance(m, SVDQuantLayer)}
        stress_layers = {n: m for n, m in stress.named_modules() if isinstance(m, SVDQuantLayer)}
        assert any(m.rank > 0 for m in ref_layers.values()) and all(m.rank == 0 for m in stress_layers.values())
        extra = set(stress_layers) - set(ref_layers)  # shortcuts, in/out convs and samplers quantized too
        assert "conv_in" in extra and "conv_out" in extra and any("sample" in n for n in extra)
        assert not any("emb" in n for n in stress_layers)  # the conditioning path stays in float
    assert output_error("unet", model, stress, n=4, steps=3) > output_error("unet", model, ref, n=4, steps=3)


def test_quant_options_errors_name_the_choices():
    with pytest.raises(ValueError, match="profile 'loud'.*reference.*stress"):
        quant_options("loud", "w4a4")
    with pytest.raises(ValueError, match="scheme 'w2a2'"):
        quant_options("stress", "w2a2")
    opts = quant_options("stress", "w4a4")
    opts["rank"] = 7  # a copy: the profile table is not mutated
    assert quant_options("stress", "w4a4")["rank"] == 0


@pytest.mark.parametrize("scheme,module", [("gguf-q4_0", "gguf"), ("nf4", "bitsandbytes"),
                                           ("quanto-int4", "optimum.quanto")])
def test_format_schemes_on_the_bench_unet(scheme, module):
    pytest.importorskip(module)
    torch.manual_seed(0)
    model = UNet(channels=16, mult=(1, 2)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    calib = sampler_calibration("unet", n=4, steps=3)  # ignored by the weight-only formats
    ref = quantize(model, scheme, calib, **quant_options("reference", scheme))
    stress = quantize(model, scheme, calib, **quant_options("stress", scheme))
    conv = "down.0.conv1.weight"
    if scheme == "gguf-q4_0":  # the library's own rules in both profiles: 3x3 convs are quantized
        assert quant_options("stress", scheme) == quant_options("reference", scheme) == {}
        assert stress.qdrift_quant["tensors"][conv]["type"] == "Q4_0"
        assert stress.qdrift_quant["tensors"]["time_embed.2.weight"]["type"] == "F16"  # [64, 64]: conditioning path
    else:  # diffusers quantizes nn.Linear only; the stress profile adds the convs
        assert ref.qdrift_quant["tensors"][conv]["type"] == "F32"
        assert torch.equal(ref.get_parameter(conv), model.get_parameter(conv))
        assert stress.qdrift_quant["tensors"][conv]["type"] in ("NF4", "qint4")
    err_ref, err_stress = (output_error("unet", model, q, n=4, steps=3) for q in (ref, stress))
    assert 0 < err_ref <= err_stress < 0.5 and (scheme == "gguf-q4_0") == (err_ref == err_stress)


def _perturbed_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet(channels=8, mult=(1, 2)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("scheme", ["w4a8", "w3a4"])
def test_recorded_samples_calibrate_like_the_sampler_callable(scheme):
    """--ptq brecq|gac start from exactly the round-to-nearest model of --ptq none."""
    model = _perturbed_unet()
    opts = quant_options("stress", scheme)
    a = quantize(model, scheme, sampler_calibration("unet", n=2, steps=3), **opts)
    samples = sampler_samples("unet", model, n=2, steps=3)
    assert len(samples) == 2 * 2 * 3 and samples.batch_sizes == (4, 4, 4)  # CFG doubles the batch
    assert samples.timesteps.unique().numel() == 3
    b = quantize(model, scheme, samples, **opts)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bench_quantize_ptq():
    model = _perturbed_unet()
    small = dict(calib_n=2, calib_steps=2, error_n=2)
    none = bench_quantize("unet", model, "w4a8", **small)
    assert none.qdrift_quant["ptq"] == "none" and "reconstruction" not in none.qdrift_quant
    rec = bench_quantize("unet", model, "w4a8", ptq="brecq", ptq_options={"iters": 3, "batch_size": 4}, **small)
    assert rec.qdrift_quant["reconstruction"]["method"] == "brecq"
    assert rec.qdrift_quant["output_rel_err"] > 0
    with pytest.raises(ValueError, match="unknown ptq"):
        bench_quantize("unet", model, "w4a8", ptq="adaround")
