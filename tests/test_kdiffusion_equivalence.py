"""With V=None or an all-zero V every qdrift sampler reproduces the real k-diffusion sampler."""

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData

DATA = GaussianData([0.3, -1.0, 0.5], [1.0, 0.5, 2.0])


def _nonlinear_model(x, sigma, **kw):
    """A denoiser that is not linear in x, so multistep weights and orders actually matter."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return DATA.denoiser(x, sigma) + 0.1 * torch.tanh(x) / (1 + s)


CASES = [
    ("euler", {}),
    ("euler", {"s_churn": 1.0}),
    ("euler", {"s_churn": 1.0, "s_tmax": 5.0}),  # churn window: noise still drawn on every step
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("heun", {}),
    ("heun", {"s_churn": 2.0}),
    ("heun", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0}),
    ("lms", {}),
    ("lms", {"order": 2}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
]
NEEDS_NOISE_SAMPLER = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}


@pytest.mark.parametrize("name,knobs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
@pytest.mark.parametrize("v_kind", ["none", "zeros", "zeros_noise_mode"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_kdiffusion(kdiff, name, knobs, v_kind, dtype):
    if v_kind == "zeros_noise_mode" and name not in NEEDS_NOISE_SAMPLER:
        pytest.skip("correction='noise' exists only on ancestral/SDE samplers")
    sigmas = qdrift.get_sigmas_karras(12, 0.02, 20.0).to(dtype)
    x0 = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20.0).to(dtype)
    V = None if v_kind == "none" else torch.zeros(len(sigmas) - 1, 3)
    outs = []
    for fn in (getattr(kdiff, f"sample_{name}"), qdrift.SAMPLERS[name]):
        kw = dict(knobs)
        if v_kind == "zeros_noise_mode" and fn is qdrift.SAMPLERS[name]:
            kw["correction"] = "noise"
        if name in NEEDS_NOISE_SAMPLER:
            kw["noise_sampler"] = kdiff.BrownianTreeNoiseSampler(x0, sigmas[-2], sigmas[0], seed=7)
        torch.manual_seed(3)  # churn noise comes from the global RNG in k-diffusion's Euler/Heun
        args = (_nonlinear_model, x0.clone(), sigmas)
        outs.append(fn(*args, disable=True, **kw) if fn.__module__.startswith("k_diffusion") else fn(*args, V, disable=True, **kw))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]), (outs[0] - outs[1]).abs().max()


def test_callback_keys_match(kdiff):
    sigmas = qdrift.get_sigmas_karras(5, 0.1, 10.0).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 10
    seen = {"k": [], "q": []}
    kdiff.sample_dpmpp_2m(DATA.denoiser, x, sigmas, callback=lambda d: seen["k"].append(d), disable=True)
    qdrift.sample_dpmpp_2m_qdrift(DATA.denoiser, x, sigmas, callback=lambda d: seen["q"].append(d), disable=True)
    assert len(seen["k"]) == len(seen["q"]) == 5
    for a, b in zip(seen["k"], seen["q"]):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and torch.equal(a["denoised"], b["denoised"])


def test_brownian_tree_matches_kdiffusion(kdiff):
    x = torch.zeros(3, 2, 4)
    ours = qdrift.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=5)
    theirs = kdiff.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=5)
    for a, b in [(10.0, 5.0), (5.0, 1.0), (1.0, 0.1)]:
        assert torch.equal(ours(torch.tensor(a), torch.tensor(b)), theirs(torch.tensor(a), torch.tensor(b)))
    batched = qdrift.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=[1, 2, 3])
    assert batched(torch.tensor(2.0), torch.tensor(1.0)).shape == x.shape


def test_brownian_tree_takes_a_float64_level_just_outside_its_float32_span_quietly(kdiff):
    """A tree built on float32 levels, queried with the float64 schedule: torchsde finds the top level outside
    the tree's span, warns and clamps; qdrift clamps first: the same increment as k-diffusion's, no warning."""
    import warnings

    x = torch.zeros(2, 3)
    top = torch.tensor(14.6146430969238, dtype=torch.float64)
    ours = qdrift.BrownianTreeNoiseSampler(x, torch.tensor(0.03), top.float(), seed=1)
    theirs = kdiff.BrownianTreeNoiseSampler(x, torch.tensor(0.03), top.float(), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = ours(top, torch.tensor(5.0, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = theirs(top, torch.tensor(5.0, dtype=torch.float64))
    assert torch.equal(a, b)


def test_schedules_match_kdiffusion(kdiff):
    assert torch.equal(qdrift.get_sigmas_karras(10, 0.03, 14.6), kdiff.get_sigmas_karras(10, 0.03, 14.6))
    assert torch.equal(qdrift.get_sigmas_exponential(7, 0.1, 5.0), kdiff.get_sigmas_exponential(7, 0.1, 5.0))
