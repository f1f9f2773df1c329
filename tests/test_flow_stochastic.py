"""Ancestral and SDE samplers on a rectified flow ``x_t = (1 - t) x0 + t eps`` (the ``flow`` state form).

Analytic data per channel ``x0 ~ N(mu_c, s_c^2)``: the flow marginal is ``N((1 - t) mu, (1 - t)^2 s^2 + t^2)`` and
the exact denoiser is ``D = mu + (1 - t) s^2 (x - (1 - t) mu) / ((1 - t)^2 s^2 + t^2)``. A sampler that injects
noise consistently with the flow form returns the data distribution; the VE noise formulas on the same model do
not (that contrast is checked too, so the test can fail).
"""

import pytest
import torch

import qdrift

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)
STOCHASTIC = ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]


class FlowGaussian:
    """The exact flow denoiser for per-channel Gaussian data (sigma = t), marked as a flow like FlowDenoiser."""

    is_flow = True

    def __call__(self, x, sigma, **kw):
        t = sigma.view(-1, 1, 1)
        mu, s2 = MU.view(1, -1, 1), (S**2).view(1, -1, 1)
        return mu + (1 - t) * s2 * (x - (1 - t) * mu) / ((1 - t) ** 2 * s2 + t**2)


def start(n, t0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU.view(1, -1, 1) + S.view(1, -1, 1) * torch.randn(n, 2, 1, generator=g, dtype=torch.float64)
    return (1 - t0) * x0 + t0 * torch.randn(n, 2, 1, generator=g, dtype=torch.float64)


def run(name, flow=None, n=20000, steps=60, V=None, **kw):
    t0 = 0.999
    sigmas = torch.cat([torch.linspace(t0, 0.02, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = start(n, t0)
    ns = qdrift.default_noise_sampler(x, seed=1)
    return qdrift.SAMPLERS[name](FlowGaussian(), x, sigmas, V, disable=True, noise_sampler=ns, flow=flow, **kw)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_flow_form_samples_the_data_distribution(name):
    steps = 200 if name == "euler_ancestral" else 60  # first order: 60 steps leave a 4-6% spread bias
    out = run(name, steps=steps)  # flow taken from the model's is_flow
    mean, std = out.mean(dim=(0, 2)), out.std(dim=(0, 2))
    assert torch.allclose(mean, MU, atol=0.04), (mean, MU)
    assert torch.allclose(std, S, rtol=0.04), (std, S)
    # the VE noise formulas on the same flow model get the spread wrong
    ve = run(name, flow=False, steps=steps)
    assert not torch.allclose(ve.std(dim=(0, 2)), S, rtol=0.1), ve.std(dim=(0, 2))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_flow_form_with_eta_zero_is_the_deterministic_flow_solver(name):
    """eta = 0: no noise, the ODE solution; it maps the t0-marginal onto the data (up to discretization)."""
    out = run(name, eta=0.0, n=4000, steps=80)
    assert torch.allclose(out.std(dim=(0, 2)), S, rtol=0.04) and torch.allclose(out.mean(dim=(0, 2)), MU, atol=0.04)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_flow_form_correction_is_applied_and_off_at_strength_zero(name):
    V = torch.full((60, 2), 0.05, dtype=torch.float64)
    plain = run(name, n=64)
    assert torch.equal(run(name, n=64, V=V, strength=0.0), plain)
    assert not torch.allclose(run(name, n=64, V=V), plain)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_flow_sde_schedule_must_start_below_one(name):
    x = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="below t = 1"):
        qdrift.SAMPLERS[name](FlowGaussian(), x, torch.tensor([1.0, 0.5, 0.0]), disable=True)
    with pytest.raises(ValueError, match="flow must be True, False or None"):
        qdrift.SAMPLERS[name](FlowGaussian(), x, torch.tensor([0.9, 0.5, 0.0]), disable=True, flow="yes")


def test_flow_ancestral_step_helper():
    """t_down = t_to (1 + (t_to / t_from - 1) eta); after scaling, signal (1 - t_to) and noise std t_to."""
    from qdrift._utils import get_ancestral_step_flow

    for t_from, t_to, eta in ((0.9, 0.6, 1.0), (0.5, 0.2, 0.5), (0.8, 0.8 * 0.99, 0.0)):
        t_down, up, scale = get_ancestral_step_flow(t_from, t_to, eta)
        assert abs(t_down - t_to * (1 + (t_to / t_from - 1) * eta)) < 1e-15
        assert abs(scale * (1 - t_down) - (1 - t_to)) < 1e-12
        assert abs((scale * t_down) ** 2 + up**2 - t_to**2) < 1e-12
    assert get_ancestral_step_flow(0.5, 0.0, 1.0) == (0.0, 0.0, 1.0)
