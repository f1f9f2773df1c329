"""quantize() and the functions it calls refuse bad arguments and non-finite weights / calibration data up front.

Every refusal is a ValueError naming the function, the argument (or the layer) and the bad value; valid calls
(numpy scalars included) are unchanged.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from qdrift.quant import format_available, mixdq_allocate_bits, quantizable_layers, quantize, svdquant_layer

NAN, INF = float("nan"), float("inf")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16)).eval()


def data(seed=1):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


def never_run(model):
    raise AssertionError("calibration ran before the options were checked")


def needs(scheme):
    if not format_available(scheme):
        pytest.skip(f"{scheme} library not installed")


BAD_OPTIONS = [
    ("w4a8", dict(weight_bits_choices=()), r"quantize: weight_bits_choices must be a non-empty .*got \(\)"),
    ("w4a8", dict(weight_bits_choices=(1, 4)), r"quantize: weight_bits_choices .*\[2, 16\].*\(1 is not\)"),
    ("w4a8", dict(sensitivity_calls=0), r"quantize: sensitivity_calls must be an integer >= 1.*got 0"),
    ("w4a8", dict(sensitivity_rows=-1), r"quantize: sensitivity_rows must be an integer >= 0.*got -1"),
    ("w4a8", dict(avg_weight_bits="4"), r"quantize: avg_weight_bits must be a finite number .*got '4'"),
    ("w4a8", dict(avg_weight_bits=NAN), r"quantize: avg_weight_bits must be a finite number .*got nan"),
    ("w4a8", dict(avg_weight_bits=1), r"quantize: avg_weight_bits .*smallest of weight_bits_choices \(2\).*got 1"),
    ("w4a8", dict(act_bits="8"), r"quantize: act_bits must be an integer in \[2, 16\], got '8'"),
    ("w4a8", dict(act_bits=8.0), r"quantize: act_bits must be an integer in \[2, 16\], got 8.0"),
    ("w4a8", dict(float_act_fraction=NAN), r"quantize: float_act_fraction must be a finite number in \[0, 1\].*nan"),
    ("w4a8", dict(ema_momentum=1.0), r"quantize: ema_momentum must be a finite number in \[0, 1\), got 1.0"),
    ("w4a8", dict(skip=None), r"quantize: skip must be a regular expression or a list/tuple of them.*got None"),
    ("w4a8", dict(skip=("[",)), r"quantize: skip entry '\[' is not a valid regular expression"),
    ("w4a4", dict(skip=None), r"quantize: skip must be .*got None"),
    ("w4a4", dict(skip=("[",)), r"quantize: skip entry '\['"),
    ("w4a4", dict(skip=[3]), r"quantize: skip must be .*3 in \[3\] is not a string"),
    ("w4a4", dict(lowrank_iters=-1), r"quantize: lowrank_iters must be an integer >= 1.*got -1"),
    ("w4a4", dict(rank=2.5), r"quantize: rank must be None or an integer >= 0.*got 2.5"),
    ("w4a4", dict(rank=True), r"quantize: rank must be None or an integer >= 0.*got True"),
    ("w4a4", dict(rank_fraction=NAN), r"quantize: rank_fraction must be a finite number in \[0, 1\], got nan"),
    ("w4a4", dict(alphas=(2.0, NAN)), r"quantize: alphas must be a sequence of smoothing exponents.*\(2.0 is not\)"),
    ("w4a4", dict(alphas=(0.5, NAN)), r"quantize: alphas must be .*\(nan is not\)"),
    ("w4a4", dict(alphas=0.5), r"quantize: alphas must be a sequence .*got 0.5"),
    ("w4a4", dict(budget=0), r"quantize: budget must be an integer >= 1.*got 0"),
    ("w3a4", dict(weight_bits=np.float64(3.0)), r"quantize: weight_bits must be an integer in \[2, 16\]"),
    ("w3a4", dict(group_size=0), r"quantize: group_size must be an integer >= 1.*got 0"),
    ("nf4", dict(skip=None), r"quantize: skip must be .*got None"),
    ("nf4", dict(skip=("[",)), r"quantize: skip entry '\['"),
    ("nf4", dict(blocksize=48), r"quantize: blocksize must be a power of two in \[32, 4096\].*got 48"),
    ("fp4", dict(conv="no"), r"quantize: conv must be True or False, got 'no'"),
    ("quanto-int8", dict(skip=None), r"quantize: skip must be .*got None"),
    ("quanto-int4", dict(conv=1), r"quantize: conv must be True or False, got 1"),
    ("gguf-q4_0", dict(keep=None), r"quantize: keep must be .*got None"),
    ("gguf-q8_0", dict(small=-1), r"quantize: small must be an integer >= 0.*got -1"),
    ("gguf-q8_0", dict(reshape="yes"), r"quantize: reshape must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("scheme, options, match", BAD_OPTIONS,
                         ids=[f"{s}-{next(iter(o))}-{o[next(iter(o))]!r}" for s, o, _ in BAD_OPTIONS])
def test_bad_options_are_refused_before_calibration(scheme, options, match):
    with pytest.raises(ValueError, match=match):
        quantize(mlp(), scheme, never_run, **options)


@pytest.mark.parametrize("scheme", [["w4a4"], ("w4a8",), {"nf4"}])
def test_non_string_scheme_is_refused(scheme):
    with pytest.raises(ValueError, match=r"quantize: unknown scheme .*; expected one of \('w4a8'"):
        quantize(mlp(), scheme, data())


def test_numpy_and_torch_scalars_give_the_python_result():
    x = data()
    # w4a4: numpy / 0-d torch integers and a numpy array of smoothing exponents
    ref = quantize(mlp(), "w4a4", x, weight_bits=3, rank=2, alphas=(0.0, 0.5, 1.0), rank_fraction=0.25)
    q = quantize(mlp(), "w4a4", x, weight_bits=np.int64(3), rank=torch.tensor(2), alphas=np.linspace(0, 1, 3),
                 rank_fraction=np.float32(0.25))
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    assert q.qdrift_quant["options"]["weight_bits"] == 3 and type(q.qdrift_quant["options"]["rank"]) is int
    # w4a8: numpy bit choices, bits and budget
    ref = quantize(mlp(), "w4a8", x, weight_bits_choices=(2, 4), act_bits=8, avg_weight_bits=3.0)
    q = quantize(mlp(), "w4a8", x, weight_bits_choices=np.array([2, 4]), act_bits=np.int32(8),
                 avg_weight_bits=np.float64(3.0))
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    assert q.qdrift_quant["options"]["weight_bits_choices"] == (2, 4)
    # documented edge values stay valid: no smoothing candidates, every row kept, rank clipped per layer
    quantize(mlp(), "w4a4", x, alphas=(), rank=1000, skip="^never$")
    quantize(mlp(), "w4a8", x, sensitivity_rows=0, skip=())


@pytest.mark.parametrize("scheme", ["w4a4", "w3a4", "w4a8", "gguf-q8_0", "gguf-q4_0", "nf4", "quanto-int8",
                                    "quanto-int4"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_weights_are_refused_naming_the_layer(scheme, value):
    if "-" in scheme or scheme == "nf4":
        needs(scheme)
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = value
    kind = "1 NaN and 0 infinite" if math.isnan(value) else "0 NaN and 1 infinite"
    where = r"parameter '2.weight' \(layer '2'\)" if scheme.startswith("gguf") else r"the weight of layer '2'"
    with pytest.raises(ValueError, match=rf"quantize: {where} is not finite \({kind} of 512 values\)"):
        quantize(model, scheme, data())


@pytest.mark.parametrize("scheme", ["w4a4", "w4a8"])
def test_non_finite_bias_is_refused(scheme):
    model = mlp()
    with torch.no_grad():
        model[0].bias[0] = -INF
    with pytest.raises(ValueError, match="quantize: the bias of layer '0' is not finite"):
        quantize(model, scheme, data())


@pytest.mark.parametrize("scheme", ["w4a4", "w3a4", "w4a8"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_calibration_data_is_refused_naming_the_layer(scheme, value):
    x = data()
    x[2, 7] = value
    with pytest.raises(ValueError, match=r"quantize: the calibration input of layer '0' is not finite .* call 2"):
        quantize(mlp(), scheme, [data(5), x, data(6)])


def test_non_finite_calibration_is_refused_even_if_the_callable_swallows_the_error():
    def swallowing(model):
        try:
            model(data() * NAN)
        except ValueError:
            pass
        model(data())

    with pytest.raises(ValueError, match="quantize: the calibration input of layer '0' is not finite"):
        quantize(mlp(), "w4a4", swallowing)


def test_w4a8_refuses_a_non_finite_full_precision_output():
    class Net(nn.Module):  # the NaN sits in a layer kept in float (norm), after every quantized layer
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(self.fc(x))

    net = Net()
    with torch.no_grad():
        net.norm.weight[0] = NAN
    with pytest.raises(ValueError, match="quantize: the full-precision model's output .* is not finite"):
        quantize(net, "w4a8", data())


@pytest.mark.parametrize("scheme", ["w4a4", "w4a8"])
def test_no_quantizable_layer_says_why(scheme):
    c1 = nn.Sequential(nn.Conv1d(4, 8, 3), nn.SiLU(), nn.Conv1d(8, 4, 3))
    with pytest.raises(ValueError, match=r"no quantizable layer: the model has no nn.Linear or nn.Conv2d layer at all "
                                         r"\(it has Conv1d x2, SiLU x1\)"):
        quantize(c1, scheme, torch.randn(2, 4, 10))
    c3 = nn.Sequential(nn.Conv3d(4, 8, 3), nn.SiLU(), nn.Conv3d(8, 4, 1))
    with pytest.raises(ValueError, match=r"has no nn.Linear or nn.Conv2d layer at all \(it has Conv3d x2, SiLU x1\)"):
        quantize(c3, scheme, torch.randn(2, 4, 5, 5, 5))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"Conv2d layers \('0'\) are all grouped or not zero-padded"):
        quantize(grouped, scheme, torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"left after the skip list: skip=\['\.\*'\] matches all 2 .*\('0', '2'\)"):
        quantize(mlp(), scheme, data(), skip=[".*"])


def test_layer_level_functions_name_themselves():
    with pytest.raises(ValueError, match=r"svdquant_layer: rank must be an integer in \[0, 4\].*got 2.5"):
        svdquant_layer(nn.Linear(4, 4), torch.randn(3, 4), rank=2.5)
    with pytest.raises(ValueError, match="svdquant_layer: lowrank_iters must be an integer >= 1.*got 0"):
        svdquant_layer(nn.Linear(4, 4), torch.randn(3, 4), lowrank_iters=0)
    with pytest.raises(ValueError, match="svdquant_layer: the calibration input x is not finite"):
        svdquant_layer(nn.Linear(4, 4), torch.full((3, 4), NAN))
    with pytest.raises(ValueError, match=r"svdquant_layer: alphas must be .*\(nan is not\)"):
        svdquant_layer(nn.Linear(4, 4), torch.randn(3, 4), alphas=(NAN,))
    with pytest.raises(ValueError, match="mixdq_allocate_bits: avg_bits must be a finite number.*got nan"):
        mixdq_allocate_bits({"a": {2: 1.0, 4: 0.5}}, {"a": 10}, NAN)
    with pytest.raises(ValueError, match="quantizable_layers: skip must be .*got None"):
        quantizable_layers(mlp(), None)
