"""Block reconstruction (qdrift.quant.reconstruct): AdaRound on the grid, BRECQ, GAC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdrift.quant import CalibSamples, ReconConfig, quantize, record_calib_samples
from qdrift.quant import reconstruct as R
from qdrift.quant.layers import MixDQLayer, SVDQuantLayer

STRESS = {"w4a8": dict(weight_bits_choices=(4,), float_act_fraction=0.0), "w3a4": dict(rank=0)}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)))


class Tiny(nn.Module):
    """``net(x [B, 16], t [B]) -> [B, 8]``: one block of two layers with a SiLU between (t is only a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = MLP()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def tiny_samples(n_per_t: int = 24, timesteps=(0.0, 1.0, 2.0, 3.0), seed: int = 0) -> CalibSamples:
    g = torch.Generator().manual_seed(seed)
    xs, ts = [], []
    for k, t in enumerate(timesteps):  # each timestep its own input scale and mean
        xs.append(torch.randn(n_per_t, 16, generator=g) * (1 + k) + 0.3 * k)
        ts.append(torch.full((n_per_t,), t))
    x, t = torch.cat(xs), torch.cat(ts)
    return CalibSamples((x, t), t)


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def output_mse(net: nn.Module, qnet: nn.Module, samples: CalibSamples) -> float:
    with torch.no_grad():
        return float((qnet(*samples.args) - net(*samples.args)).pow(2).mean())


def weights_q(qnet: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_q.clone() for n, m in qnet.named_modules() if isinstance(m, (MixDQLayer, SVDQuantLayer))}


FAST = dict(iters=80, batch_size=32, lr=2e-2)


@pytest.mark.parametrize("scheme", ["w4a8", "w3a4"])
def test_adaround_stays_on_grid_and_beats_round_to_nearest(scheme):
    net, samples = tiny_model(), tiny_samples()
    rtn = quantize(net, scheme, samples, **STRESS[scheme])
    rec = quantize(net, scheme, samples, reconstruction="brecq", reconstruction_options=FAST, **STRESS[scheme])
    grids = R._layer_grids(rtn, net)
    assert set(grids) == {"block.fc1", "block.fc2"}
    changed = 0
    for name, wq in weights_q(rec).items():
        _, _, lo, hi = grids[name]
        lo, hi = lo.to(wq.dtype), hi.to(wq.dtype)
        assert bool(((wq == lo) | (wq == hi)).all()), f"{name}: a learned weight is off the grid"
        changed += int((wq != weights_q(rtn)[name]).sum())
    assert changed > 0  # the rounding was learned, not copied from round-to-nearest
    if scheme == "w4a8":  # on the grid means integer multiples of the per-row scale, within [-7, 7]
        w = net.block.fc1.weight.detach().double()
        scale = w.abs().amax(1, keepdim=True) / 7
        k = weights_q(rec)["block.fc1"].double() / scale
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 7 + 1e-6
    blocks = rec.qdrift_quant["reconstruction"]["blocks"]
    assert blocks["block"]["err"] < blocks["block"]["err_rtn"]
    # w4a8's error is mostly weight rounding; w3a4's mostly its 4-bit activations, which reconstruction keeps
    assert output_mse(net, rec, samples) < (0.9 if scheme == "w4a8" else 1.0) * output_mse(net, rtn, samples)


class Wide(nn.Module):
    """Rows of 64 inputs: wide enough for GGUF's blocks of 32 and bitsandbytes' blocks of 64."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)))


@pytest.mark.parametrize("scheme,module", [("gguf-q4_0", "gguf"), ("gguf-q4_1", "gguf"), ("nf4", "bitsandbytes")])
def test_formats_learn_rounding_on_their_own_grid(scheme, module):
    pytest.importorskip(module)
    torch.manual_seed(0)
    net = Wide().eval()
    x, t = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)), torch.arange(96.0) % 4
    samples = CalibSamples((x, t), t)
    rtn = quantize(net, scheme)
    rec = quantize(net, scheme, samples, reconstruction="brecq", reconstruction_options=FAST)
    grids = R._layer_grids(rtn, net)
    assert grids  # GGUF keeps fc2 (512 values) in F32; NF4 quantizes both
    for name, (_, _, lo, hi) in grids.items():
        for q in (rtn, rec):  # the library's round-to-nearest and the learned rounding: both on the grid
            w = q.get_submodule(name).weight.double()
            assert bool((((w - lo).abs() < 1e-6) | ((w - hi).abs() < 1e-6)).all())
    assert output_mse(net, rec, samples) < output_mse(net, rtn, samples)


def test_quanto_reconstruction_raises_naming_the_supported_schemes():
    net = Wide().eval()
    samples = CalibSamples((torch.randn(8, 64), torch.arange(8.0)), torch.arange(8.0))
    with pytest.raises(ValueError, match="'quanto-int4'.*w4a8, w4a4, w3a4, gguf-q8_0.*nf4, fp4"):
        quantize(net, "quanto-int4", samples, reconstruction="brecq")


def test_gac_with_frozen_equal_weights_is_brecq():
    net, samples = tiny_model(1), tiny_samples(seed=1)
    brecq = quantize(net, "w4a8", samples, reconstruction="brecq", reconstruction_options=dict(FAST, iters=60),
                     **STRESS["w4a8"])
    gac = quantize(net, "w4a8", samples, reconstruction="gac",
                   reconstruction_options=dict(FAST, iters=60, gac_lr=0.0, gac_steps=3), **STRESS["w4a8"])
    report = gac.qdrift_quant["reconstruction"]
    assert set(report["sample_weights"]["w"]) == {1.0}
    for name, wq in weights_q(brecq).items():
        assert torch.equal(wq, weights_q(gac)[name])
    assert report["blocks"]["block"]["err"] == brecq.qdrift_quant["reconstruction"]["blocks"]["block"]["err"]
    # and the weights do move when GAC learns them
    moved = quantize(net, "w4a8", samples, reconstruction="gac",
                     reconstruction_options=dict(FAST, iters=60, gac_steps=3), **STRESS["w4a8"])
    assert len(set(moved.qdrift_quant["reconstruction"]["sample_weights"]["w"])) > 1


def _conflict_problem():
    """One linear layer and two timesteps whose error gradients point against each other (L_GM > 0 at the start).

    The float weight is (0.55, -0.45) between the grid values lo = (0, -1) and hi = (1, 0); the rounding starts at
    (0.30, -0.25), i.e. off by d = (-0.25, +0.20). Timestep 0 sees x ~ (1, 0.5): residual d.x < 0; timestep 1 sees
    x ~ (1, 2): residual > 0; x0.x1 > 0, so the two groups' gradients have a negative dot product.
    """
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.55, -0.45]]))
    x0 = torch.tensor([[1.0, 0.5]]) * (1 + 0.1 * torch.randn(20, 1, generator=g))
    x1 = torch.tensor([[1.0, 2.0]]) * (1 + 0.1 * torch.randn(20, 1, generator=g))
    x = torch.cat([x0, x1])
    target = layer(x).detach()
    lo, hi = torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    V = R.adaround_init(torch.tensor([[0.30, -0.25]]), lo, hi).requires_grad_(True)
    rounding = R._Rounding("weight", lo, hi, V)
    prob = R._BlockProblem(layer, [rounding], (x,), {}, target)
    t = torch.cat([torch.zeros(20), torch.ones(20)])
    return prob, t


def test_gradient_alignment_loss_drops_after_the_weight_update():
    prob, t = _conflict_problem()
    group = R.timestep_groups(t, 5)
    assert group.unique().tolist() == [0, 1]
    gen = torch.Generator().manual_seed(0)
    val_idx = R.validation_split(group, 0.1, gen)
    train_idx = torch.tensor([i for i in range(40) if i not in set(val_idx.tolist())])
    full = torch.arange(train_idx.numel())
    s = torch.zeros(train_idx.numel(), requires_grad=True)
    cfg = ReconConfig(gac_steps=20, gac_lr=0.1, batch_size=64, lr=0.05)  # batch >= the split: full-batch steps

    def l_gm() -> float:
        _, gm, _ = R._gac_losses(prob, s, train_idx, full, val_idx, group[val_idx], cfg.tau, cfg.lr)
        return float(gm)

    before = l_gm()
    hist = R._gac_update(prob, s, torch.optim.Adam([s], lr=cfg.gac_lr), train_idx, val_idx, group[val_idx], cfg, gen)
    after = l_gm()
    assert before > 0  # the constructed conflict: the two timesteps' gradients point apart
    assert after < before
    assert hist["l_gm_last"] < hist["l_gm_before"]
    w = R._sample_weights(s.detach(), cfg.tau)
    assert not torch.allclose(w, torch.ones_like(w))


def test_gradient_alignment_loss_formula():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    # pairs: 0, 1, 1 -> sum 2; -2 / (3 * 2) * 2
    assert float(R.gradient_alignment_loss(g)) == pytest.approx(-2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        R.gradient_alignment_loss(g[:1])


def test_reconstruction_is_deterministic_under_a_seed():
    net, samples = tiny_model(2), tiny_samples(seed=2)
    opts = dict(FAST, iters=40, gac_steps=2, seed=5)
    a = quantize(net, "w4a8", samples, reconstruction="gac", reconstruction_options=opts, **STRESS["w4a8"])
    b = quantize(net, "w4a8", samples, reconstruction="gac", reconstruction_options=opts, **STRESS["w4a8"])
    for name, wq in weights_q(a).items():
        assert torch.equal(wq, weights_q(b)[name])
    assert a.qdrift_quant["reconstruction"]["sample_weights"] == b.qdrift_quant["reconstruction"]["sample_weights"]


def test_timestep_groups_and_validation_split_are_balanced():
    t = torch.arange(10.0).repeat_interleave(20)
    group = R.timestep_groups(t, 5)
    assert torch.bincount(group).tolist() == [40] * 5
    assert R.timestep_groups(torch.tensor([3.0, 3.0, 1.0]), 5).tolist() == [1, 1, 0]
    val = R.validation_split(group, 0.05, torch.Generator().manual_seed(0))
    assert torch.bincount(group[val]).tolist() == [2] * 5


def test_record_calib_samples_tags_each_row_with_its_timestep():
    net = tiny_model()

    def run(model):
        for t in (5.0, 3.0):
            model(torch.randn(4, 16), torch.full((4,), t))
        model(torch.randn(2, 16), torch.tensor([1.0]))  # a 1-element timestep is broadcast

    samples = record_calib_samples(net, run)
    assert len(samples) == 10 and samples.batch_sizes == (4, 4, 2)
    assert samples.timesteps.tolist() == [5.0] * 4 + [3.0] * 4 + [1.0] * 2
    with pytest.raises(ValueError, match="timestep_arg"):
        record_calib_samples(net, run, timestep_arg="sigma")


def test_find_blocks_on_the_bench_unet():
    from qdrift.bench.models import build_model
    from qdrift.quant import MIXDQ_SKIP, quantizable_layers

    unet = build_model("unet")
    blocks = R.find_blocks(unet, list(quantizable_layers(unet, MIXDQ_SKIP)))
    assert blocks[0] == "conv_in" and blocks[-1] == "conv_out"
    assert "mid_attn" in blocks and "down.0" in blocks and "time_embed" not in blocks


def test_input_validation():
    net, samples = tiny_model(), tiny_samples()
    with pytest.raises(ValueError, match="unknown reconstruction 'adaquant'"):
        quantize(net, "w4a8", samples, reconstruction="adaquant")
    with pytest.raises(ValueError, match="CalibSamples"):
        quantize(net, "w4a8", [(samples.args[0], samples.args[1])], reconstruction="brecq")
    with pytest.raises(ValueError, match="unknown reconstruction options"):
        quantize(net, "w4a8", samples, reconstruction="brecq", reconstruction_options={"iterations": 5})
    with pytest.raises(ValueError, match="iters"):
        quantize(net, "w4a8", samples, reconstruction="brecq", reconstruction_options={"iters": 0})
    with pytest.raises(ValueError, match="without a reconstruction"):
        quantize(net, "w4a8", samples, reconstruction_options={"iters": 5})
    with pytest.raises(ValueError, match="1-D tensor"):
        CalibSamples((samples.args[0],), None)
    with pytest.raises(ValueError, match="1-D tensor"):
        CalibSamples((samples.args[0],), samples.timesteps[:, None])
    with pytest.raises(ValueError, match="batch dim first"):
        CalibSamples((samples.args[0][:-1],), samples.timesteps)
    with pytest.raises(ValueError, match="sum to"):
        CalibSamples(samples.args, samples.timesteps, batch_sizes=(5,))
    one_t = CalibSamples(samples.args, torch.zeros(len(samples)))
    with pytest.raises(ValueError, match="at least 2 distinct timesteps"):
        quantize(net, "w4a8", one_t, reconstruction="gac", reconstruction_options={"iters": 1})


class Attn(nn.Module):
    """Self-attention between two quantized linear layers (the GAC meta-gradient differentiates through SDPA twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("scheme", ["w4a8", "w3a4"])
def test_gac_through_attention(scheme):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attn()

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.attn(x)

    torch.manual_seed(0)
    net = Net().eval()
    t = torch.arange(40.0) % 4
    samples = CalibSamples((torch.randn(40, 6, 16), t), t)
    q = quantize(net, scheme, samples, reconstruction="gac", reconstruction_options=dict(iters=5, gac_steps=2),
                 **STRESS[scheme])
    assert "gac" in q.qdrift_quant["reconstruction"]["blocks"]["attn"]
