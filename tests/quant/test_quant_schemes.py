"""quantize(): schemes, low-rank error reduction, determinism, original untouched, validation."""

import copy

import pytest
import torch
from torch import nn

from qdrift.quant import (MixDQLayer, SVDQuantLayer, layer_error_report, mixdq_allocate_bits, quantizable_layers,
                          quantize, svdquant_layer)
from qdrift.quant.functional import quantize_symmetric_groups


class Toy(nn.Module):
    """Conv + MLP toy with the naming conventions of the bench models."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 16, 3, padding=1)
        self.label_emb = nn.Embedding(3, 16)
        self.time_embed = nn.Linear(1, 16)
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.conv_out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t, y):
        h = self.conv_in(x) + (self.label_emb(y) + self.time_embed(t[:, None]))[:, :, None, None]
        h = h + self.c2(nn.functional.silu(self.c1(self.norm(h))))
        h = h.permute(0, 2, 3, 1)
        h = h + self.fc2(nn.functional.gelu(self.fc1(h)))
        return self.conv_out(h.permute(0, 3, 1, 2))


def make_toy(seed=0):
    torch.manual_seed(seed)
    return Toy().eval()


def calib(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 3, (4,), generator=g)), {})
            for _ in range(n)]


def outlier_layer_data(seed=0):
    """A linear layer fed by inputs with a few outlier channels (what smoothing + low rank are for)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(128, 96)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 128, generator=g) / 128**0.5)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 20.0
    return layer, x


@pytest.mark.parametrize("bits", [4, 3])
def test_lowrank_branch_reduces_layer_error(bits):
    layer, x = outlier_layer_data()
    _, info0 = svdquant_layer(layer, x, weight_bits=bits, rank=0)
    _, info8 = svdquant_layer(layer, x, weight_bits=bits, rank=8)
    # rank 0 is the best smoothed RTN; the low-rank branch must cut the output error several-fold
    assert info8["err"] < 0.5 * info0["err"]
    assert info8["err"] < info8["err_norank"]
    # smoothing alone already beats plain round-to-nearest on outlier channels
    assert info0["err"] < info0["err_rtn"]


def test_lowrank_conv_matches_dense_factor():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    q, info = svdquant_layer(conv, x, rank=4, alphas=(0.5,))
    # the low-rank factors applied as a conv equal the dense rank-4 weight applied as one conv
    dense = (q.lr_up @ q.lr_down.reshape(4, -1)).reshape(conv.weight.shape)
    xs = x / q.smooth.view(1, -1, 1, 1)
    torch.testing.assert_close(q.op.lowrank(xs, q.lr_down, q.lr_up), nn.functional.conv2d(xs, dense, padding=1),
                               rtol=1e-4, atol=1e-5)
    assert torch.linalg.matrix_rank(dense.reshape(12, -1), rtol=1e-4) == 4


def test_svdquant_layer_grid_matches_primitives():
    """With no smoothing candidate but identity and rank 0, the layer is exactly Q_w(W) applied to Q_a(x)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(16, 8)
    q, info = svdquant_layer(layer, x, rank=0, alphas=(), group_size=4, unsigned=False)
    assert info["alpha"] is None
    wq = quantize_symmetric_groups(layer.weight.detach(), 4, 4)
    xq = quantize_symmetric_groups(x, 4, 4)
    torch.testing.assert_close(q(x), nn.functional.linear(xq, wq, layer.bias.detach()), rtol=1e-5, atol=1e-6)


def test_unsigned_detection_after_silu_gelu():
    q = quantize(make_toy(), "w4a4", calib())
    layers = q.qdrift_quant["layers"]
    assert layers["c2"]["unsigned"] and layers["c2"]["shift"] == pytest.approx(0.2785, abs=1e-4)  # after SiLU
    assert layers["fc2"]["unsigned"] and layers["fc2"]["shift"] == pytest.approx(0.1700, abs=1e-4)  # after GELU
    assert not layers["fc1"]["unsigned"]


@pytest.mark.parametrize("scheme", ["w4a4", "w3a4", "w4a8"])
def test_quantize_copy_deterministic_original_untouched(scheme):
    model = make_toy()
    before = copy.deepcopy(model.state_dict())
    q1 = quantize(model, scheme, calib())
    q2 = quantize(model, scheme, calib())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not isinstance(m, (SVDQuantLayer, MixDQLayer)) for m in model.modules())
    args, _ = calib(1, seed=7)[0]
    with torch.no_grad():
        y_fp, y1, y2 = model(*args), q1(*args), q2(*args)
    assert torch.equal(y1, y2)
    rel = float((y1 - y_fp).pow(2).mean() / y_fp.pow(2).mean())
    assert 0 < rel < 0.5, rel  # quantized: different, but still close
    for k, v in q1.state_dict().items():
        assert torch.equal(v.nan_to_num(), q2.state_dict()[k].nan_to_num()), k


def test_skip_list_keeps_conditioning_and_io_in_float():
    q = quantize(make_toy(), "w4a4", calib())
    kinds = {n: type(m).__name__ for n, m in q.named_modules()}
    for name in ("conv_in", "conv_out", "label_emb", "time_embed", "norm"):
        assert kinds[name] not in ("SVDQuantLayer", "MixDQLayer"), name
    for name in ("c1", "c2", "fc1", "fc2"):
        assert kinds[name] == "SVDQuantLayer", name
    q8 = quantize(make_toy(), "w4a8", calib())
    assert isinstance(q8.conv_in, MixDQLayer) and not isinstance(q8.time_embed, MixDQLayer)
    assert set(quantizable_layers(make_toy(), [r".*"])) == set()


def test_w4a8_bits_average_and_float_activation_layer():
    q = quantize(make_toy(), "w4a8", calib())
    rep = q.qdrift_quant
    assert rep["mean_weight_bits"] <= 4.0 + 1e-9
    assert {v["weight_bits"] for v in rep["layers"].values()} <= {2, 4, 8}
    assert len(rep["float_act_layers"]) == 1  # 1% of 6 layers rounds up to one
    name = rep["float_act_layers"][0]
    assert q.get_submodule(name).act_float
    # the kept-in-float layer is the one with the largest activation sensitivity
    sens = {n: v["act_sensitivity"] for n, v in rep["layers"].items()}
    assert name == max(sens, key=sens.get)


def test_mixdq_allocation_prefers_sensitive_layers():
    sens = {"a": {2: 100.0, 4: 10.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}, "c": {2: 1.0, 4: 0.5, 8: 0.0}}
    sizes = {"a": 10, "b": 10, "c": 10}
    alloc = mixdq_allocate_bits(sens, sizes, 4.0)
    assert alloc == {"a": 8, "b": 2, "c": 2}
    assert mixdq_allocate_bits(sens, sizes, 8.0) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(ValueError, match="avg_bits"):
        mixdq_allocate_bits(sens, sizes, 1.0)


def test_layer_error_report_lowrank_helps_on_outlier_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layer, _ = outlier_layer_data()
            self.fc = layer

        def forward(self, x):
            return self.fc(x)

    _, x = outlier_layer_data()
    net = Net()
    with_rank = layer_error_report(quantize(net, "w4a4", [x], rank=8))
    no_rank = layer_error_report(quantize(net, "w4a4", [x], rank=0))
    assert with_rank["rel_err"] < 0.5 * no_rank["rel_err"]
    with pytest.raises(ValueError, match="w4a4 or w3a4"):
        layer_error_report(net)


def test_budget_bounds_the_svdquant_activation_sample():
    """``budget`` is honoured where it means something: the grid search's per-layer activation sample."""
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    full = quantize(net, "w4a4", [x], rank=0)
    small = quantize(net, "w4a4", [x], rank=0, budget=8 * 4)  # 4 rows of the first layer's 8 inputs
    assert small.qdrift_quant["options"]["budget"] == 32
    with torch.no_grad():
        assert not torch.equal(full(x), small(x))  # a 4-row sample picks other smoothing than 256 rows


def test_callable_and_tensor_calib_data():
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    x = torch.randn(32, 8)
    q_t = quantize(net, "w4a4", x)
    q_c = quantize(net, "w4a4", lambda m: m(x))
    with torch.no_grad():
        assert torch.equal(q_t(x), q_c(x))


def test_bad_input_raises_valueerror():
    model = make_toy()
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize(model, "w2a2", calib())
    with pytest.raises(ValueError, match="unknown options"):
        quantize(model, "w4a4", calib(), ranks=3)
    with pytest.raises(ValueError, match="budget .* applies to w4a4 and w3a4 only"):
        quantize(model, "w4a8", calib(), budget=1 << 10)
    with pytest.raises(ValueError, match="empty"):
        quantize(model, "w4a4", [])
    with pytest.raises(ValueError, match="calib_data"):
        quantize(model, "w4a4", 3)
    with pytest.raises(ValueError, match="no quantizable"):
        quantize(model, "w4a4", calib(), skip=[".*"])
    with pytest.raises(ValueError, match="rank"):
        svdquant_layer(nn.Linear(4, 4), torch.randn(3, 4), rank=5)
