"""Weight-only formats computed by their own libraries: GGUF (gguf-py), bitsandbytes NF4/FP4, optimum-quanto.

Each library's tests skip when it is not installed. What is checked: the dequantized weights lie on the format's
grid (distinct values per block, the format's error bound), the scheme reaches the eligible tensors and leaves the
excluded ones bit-exact, the dequantized copy computes what the library's own quantized module computes.
"""

import pytest
import torch
from torch import nn

from qdrift.quant import FORMAT_SCHEMES, format_summary, gguf_plan, quantize
from qdrift.quant import formats as F


class Net(nn.Module):
    """Bench-like names: a conditioning path, 3x3 and 1x1 convs, Linear layers with rows not a multiple of 64."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64))  # not used in forward
        self.label_emb = nn.Embedding(11, 128)
        self.conv_in = nn.Conv2d(1, 48, 3, padding=1)
        self.conv1 = nn.Conv2d(48, 48, 3, padding=1)
        self.skip = nn.Conv2d(48, 48, 1)
        self.norm = nn.GroupNorm(8, 48)
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 256)
        self.fc3 = nn.Linear(256, 48)
        self.odd = nn.Linear(49, 40)  # 1,960 values: quantizable by size, rows of 49 are not a multiple of 32
        self.final = nn.Linear(48, 64)

    def forward(self, x):  # x [B, 1, 8, 8]
        h = self.conv_in(x)
        h = self.skip(h) + self.conv1(self.norm(h))
        t = h.mean((2, 3))
        t = self.fc3(torch.nn.functional.gelu(self.fc2(self.fc1(t))))
        return self.final(t) + self.odd(torch.cat([t, t[:, :1]], 1)).sum(1, keepdim=True)


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def blocks(t, size):
    return t.detach().reshape(-1, size)


# ----------------------------------------------------------------------------------------------------------------
# GGUF


def test_gguf_plan_follows_comfyui_gguf_rules():
    assert gguf_plan("down.0.conv1.bias", (32,)) == ("F32", None)  # 1-D
    assert gguf_plan("conv_in.weight", (32, 1, 3, 3)) == ("F32", None)  # 288 <= 1024 values
    assert gguf_plan("fc.weight", (32, 32)) == ("F32", None)  # exactly 1024
    assert gguf_plan("time_embed.0.weight", (128, 32)) == ("F16", None)
    assert gguf_plan("label_emb.weight", (11, 128)) == ("F16", None)
    assert gguf_plan("final.linear.weight", (16, 160)) == ("F16", None)
    assert gguf_plan("patch_embed.weight", (160, 1, 4, 4)) == ("F16", None)
    assert gguf_plan("blocks.0.ada.weight", (960, 160)) == ("quant", (600, 256))  # rows of 256
    assert gguf_plan("blocks.0.ada.weight", (960, 160), reshape=False) == ("quant", (960, 160))
    assert gguf_plan("down.0.conv1.weight", (32, 32, 3, 3)) == ("quant", (36, 256))  # 3x3 kernel flattened
    assert gguf_plan("down.0.conv1.weight", (32, 32, 3, 3), reshape=False) == ("quant", (32, 32, 3, 3))
    assert gguf_plan("odd.weight", (40, 33)) == ("quant", (40, 33))  # 1,320 values: not a multiple of 256
    assert gguf_plan("mlp.weight", (64, 512)) == ("quant", (64, 512))  # rows already a multiple of 256


# bits, error bound per block as a fraction of max|block|. Q8_0: scale d = amax/127, round to nearest -> d/2.
# Q4_0/Q5_0: d = (the signed extreme) / -2^(b-1) and levels -2^(b-1)..2^(b-1)-1, so values near the opposite
# extreme clip to (2^(b-1) - 1) d: error up to d = amax/2^(b-1). Q4_1/Q5_1: d = range/(2^b - 1) -> d/2 <= amax/(2^b - 1).
GGUF_GRID = {"gguf-q8_0": (8, 1 / 254), "gguf-q5_0": (5, 1 / 16), "gguf-q5_1": (5, 1 / 31),
             "gguf-q4_0": (4, 1 / 8), "gguf-q4_1": (4, 1 / 15)}


@pytest.mark.parametrize("scheme", sorted(GGUF_GRID))
def test_gguf_weights_on_the_format_grid(scheme):
    pytest.importorskip("gguf")
    bits, bound = GGUF_GRID[scheme]
    net = make_net()
    q = quantize(net, scheme)
    rep = q.qdrift_quant["tensors"]
    qtype = scheme.split("-")[1].upper()
    for name in ("conv1.weight", "skip.weight", "fc2.weight", "fc3.weight", "fc1.weight"):
        assert rep[name]["type"] == qtype, name
        w = net.get_parameter(name).detach().half().float()  # llama.cpp quantizes the converter's F16 file
        wq = q.get_parameter(name).detach()
        wb, qb = blocks(w, 32), blocks(wq, 32)  # blocks of 32 consecutive values of the stored (flattened) rows
        distinct = max(len(torch.unique(b)) for b in qb)
        assert distinct <= 2 ** bits, (name, distinct)
        amax = wb.abs().amax(1, keepdim=True)
        # Q*_1 stores min and scale in f16: allow f16 rounding of the grid on top of the half-step bound
        assert ((qb - wb).abs() <= bound * amax * 1.01 + 2e-3 * amax).all(), name
        assert not torch.equal(wq, w)
    if bits <= 5:
        assert 1e-4 < format_summary(q)["weight_rel_err"] < 0.05


def test_gguf_keeps_excluded_tensors_and_falls_back_on_odd_rows():
    pytest.importorskip("gguf")
    net = make_net()
    q = quantize(net, "gguf-q4_0")
    rep = q.qdrift_quant["tensors"]
    for name, p in net.named_parameters():
        qp = q.get_parameter(name)
        if p.ndim == 1 or p.numel() <= 1024:  # biases, norms, conv_in, small Linear: F32, bit-exact
            assert rep[name]["type"] == "F32" and torch.equal(qp, p), name
    for name in ("time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "final.weight"):
        assert rep[name] == {**rep[name], "type": "F16", "reason": "keep"}
        assert torch.equal(q.get_parameter(name), net.get_parameter(name).half().float())
    assert rep["odd.weight"]["type"] == "F16" and rep["odd.weight"]["reason"].startswith("row not a multiple")
    assert torch.equal(q.odd.weight, net.odd.weight.half().float())
    assert rep["conv1.weight"]["stored_shape"] == (81, 256)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y, yq = net(x), q(x)
    assert 0 < float((yq - y).pow(2).mean() / y.pow(2).mean()) < 0.05
    for name, p in net.named_parameters():  # the original is untouched
        assert torch.equal(p, make_net().get_parameter(name))


def test_gguf_without_reshape_leaves_3x3_kernels_in_f16():
    pytest.importorskip("gguf")
    q = quantize(make_net(), "gguf-q8_0", reshape=False)
    rep = q.qdrift_quant["tensors"]
    assert rep["conv1.weight"]["type"] == "F16"  # rows of 3 values: not a multiple of 32
    assert rep["skip.weight"]["type"] == "F16"  # rows of 1
    assert rep["fc2.weight"]["type"] == "Q8_0"  # rows of 96


def test_k_quants_are_not_offered():
    assert not any("_k" in s for s in FORMAT_SCHEMES)
    with pytest.raises(ValueError, match="gguf-q4_0"):
        quantize(make_net(), "gguf-q4_k")


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_bnb_weights_are_the_nearest_code_times_block_absmax(scheme):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(scheme, device="cpu").float()
    net = make_net()
    q = quantize(net, scheme)
    rep = q.qdrift_quant["tensors"]
    for name in ("fc1.weight", "fc2.weight", "odd.weight"):  # rows of 48, 96, 49: not multiples of 64
        assert rep[name]["type"] == scheme.upper()
        w = net.get_parameter(name).detach().reshape(-1)
        w = torch.nn.functional.pad(w, (0, (-w.numel()) % 64)).reshape(-1, 64)
        wq = q.get_parameter(name).detach().reshape(-1)
        wq = torch.nn.functional.pad(wq, (0, (-wq.numel()) % 64)).reshape(-1, 64)
        amax = w.abs().amax(1, keepdim=True)
        x, xq = w / amax, wq / amax
        assert (xq[..., None] - code).abs().amin(-1).max() < 1e-5, name  # on the code
        nearest = (x[..., None] - code).abs().amin(-1)
        assert ((x - xq).abs() <= nearest + 1e-5).all(), name  # and the nearest code point


def test_bnb_quantizes_linear_only_unless_conv():
    pytest.importorskip("bitsandbytes")
    net = make_net()
    lin = quantize(net, "nf4")
    both = quantize(net, "nf4", conv=True)
    for name in ("conv1.weight", "skip.weight", "conv_in.weight"):
        assert torch.equal(lin.get_parameter(name), net.get_parameter(name))
        assert lin.qdrift_quant["tensors"][name]["type"] == "F32"
        assert both.qdrift_quant["tensors"][name]["type"] == "NF4"
        assert not torch.equal(both.get_parameter(name), net.get_parameter(name))
    assert torch.equal(lin.norm.weight, net.norm.weight) and torch.equal(lin.fc1.bias, net.fc1.bias)
    assert torch.equal(lin.label_emb.weight, net.label_emb.weight)  # an Embedding, not a Linear
    assert not torch.equal(lin.time_embed[0].weight, net.time_embed[0].weight)
    skipped = quantize(net, "nf4", skip=(r"^time_embed$",))
    assert torch.equal(skipped.time_embed[0].weight, net.time_embed[0].weight)


# ----------------------------------------------------------------------------------------------------------------
# optimum-quanto


def test_quanto_int8_per_output_channel_grid():
    pytest.importorskip("optimum.quanto")
    net = make_net()
    q = quantize(net, "quanto-int8")
    w, wq = net.fc2.weight.detach(), q.fc2.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127
    k = wq / scale
    assert (k - k.round()).abs().max() < 1e-3 and k.abs().max() <= 127 + 1e-3
    assert ((wq - w).abs() <= scale / 2 * 1.001 + 1e-7).all()


def test_quanto_int4_groups_and_matches_quantos_own_module():
    quanto = pytest.importorskip("optimum.quanto")
    net = make_net()
    q = quantize(net, "quanto-int4")
    rep = q.qdrift_quant["tensors"]
    assert rep["fc3.weight"]["group_size"] == 128  # rows of 256: two groups of 128
    assert "group_size" not in rep["fc2.weight"]  # rows of 96 <= 128: one group per output channel
    for name, size in (("fc3.weight", 128), ("fc2.weight", 96)):
        qb = blocks(q.get_parameter(name), size)
        for b in qb:
            levels = torch.unique(b)
            assert len(levels) <= 16
            step = (levels[1:] - levels[:-1]).min()
            ratio = (levels - levels[0]) / step
            assert (ratio - ratio.round()).abs().max() < 1e-2 and ratio.max() <= 15 + 1e-2  # an affine 4-bit grid
    ref = nn.Sequential(make_net().fc3)
    quanto.quantize(ref, weights=quanto.qint4)
    quanto.freeze(ref)
    x = torch.randn(5, 256)  # fc3: Linear(256, 48)
    with torch.no_grad():
        assert torch.allclose(ref(x), q.fc3(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(net.fc3(x), q.fc3(x), atol=1e-4)


def test_quanto_linear_only_unless_conv():
    pytest.importorskip("optimum.quanto")
    net = make_net()
    lin = quantize(net, "quanto-int4")
    assert torch.equal(lin.conv1.weight, net.conv1.weight)
    assert not torch.equal(quantize(net, "quanto-int4", conv=True).conv1.weight, net.conv1.weight)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def test_missing_library_and_bad_options(monkeypatch):
    monkeypatch.setattr(F, "format_available", lambda scheme: False)
    with pytest.raises(ImportError, match=r'pip install "qdrift\[gguf\]"'):
        quantize(make_net(), "gguf-q4_0")
    with pytest.raises(ImportError, match=r"qdrift\[bnb\]"):
        quantize(make_net(), "nf4")
    with pytest.raises(ImportError, match=r"qdrift\[quanto\]"):
        quantize(make_net(), "quanto-int4")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown options for nf4.*blocksize"):
        quantize(make_net(), "nf4", rank=3)
    with pytest.raises(ValueError, match="calib_data"):
        quantize(make_net(), "w4a4")


def test_format_summary_counts_parameters():
    pytest.importorskip("gguf")
    net = make_net()
    s = format_summary(quantize(net, "gguf-q8_0"))
    assert s["total_params"] == sum(p.numel() for p in net.parameters())
    assert s["quantized_params"] == sum(net.get_parameter(n).numel()
                                        for n in ("conv1.weight", "skip.weight", "fc1.weight", "fc2.weight", "fc3.weight"))
    assert s["types"]["Q8_0"] == s["quantized_params"] and 0 < s["weight_rel_err"] < 1e-3
    with pytest.raises(ValueError, match="quantize_format"):
        format_summary(net)
