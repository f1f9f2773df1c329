"""The corrections on the analytic Gaussian: convergence order, and excess variance removed.

The planted "quantized" model adds fresh N(0, v) eps-noise per call (qdrift.bench.gaussian), so the
variance it injects is known; the numbers the README reports come from benchmarks/analytic_gaussian.py.
"""

import math

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}


def _run(name, model, x, sigmas, V=None, seed=11, **opts):
    if name in STOCHASTIC:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x, seed=seed)
    return qdrift.SAMPLERS[name](model, x.clone(), sigmas, V, disable=True, **opts)


def _removed(name, steps, v=0.1, n=20000, **opts):
    """Fraction of the excess final variance (quantized over FP) that the correction removes."""
    x = DATA.prior(n, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(steps, 0.002, 80.0).double()
    fp = _run(name, DATA, x, sigmas).var(0)
    q = _run(name, PlantedErrorDenoiser(DATA, var=v, seed=1), x, sigmas).var(0)
    V = torch.full((steps, 3), v)
    corr = _run(name, PlantedErrorDenoiser(DATA, var=v, seed=1), x, sigmas, V, **opts).var(0)
    return 1 - float((corr - fp).sum()) / float((q - fp).sum())


def _exact_ode(x_T, sigma_T, sigma):
    """The probability-flow ODE's exact map for the Gaussian: x(sigma) = mu + (x_T - mu) sqrt(var(sigma)/var(T))."""
    mu = DATA.mean.reshape(1, -1)
    scale = (DATA.marginal_var(sigma) / DATA.marginal_var(sigma_T)).sqrt().reshape(1, -1)
    return mu + (x_T - mu) * scale


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("lms", 2)])
def test_convergence_order(name, order):
    """Measured order on the exact ODE solution (schedule 10 -> 0.5, no final zero)."""
    x = DATA.prior(64, 10.0, generator=torch.Generator().manual_seed(0))
    target = _exact_ode(x, 10.0, 0.5)
    errs = []
    for n in (16, 32, 64):
        sigmas = torch.linspace(math.log(10.0), math.log(0.5), n + 1).exp().double()
        errs.append(float((qdrift.SAMPLERS[name](DATA, x.clone(), sigmas, disable=True) - target).abs().max()))
    measured = math.log2(errs[1] / errs[2])
    assert order - 0.35 < measured < order + 0.6, (errs, measured)


@pytest.mark.parametrize("name,opts,low,high", [
    ("euler", {}, 0.90, 1.05),
    ("heun", {}, 0.92, 1.08),
    ("lms", {}, 0.90, 1.08),
    ("dpmpp_2m", {}, 0.93, 1.07),
    ("dpmpp_2m_sde", {}, 0.80, 1.02),
    ("dpmpp_3m_sde", {}, 0.80, 1.02),
    ("euler_ancestral", {}, 0.75, 1.0),
])
def test_drift_removes_excess_variance(name, opts, low, high):
    assert low < _removed(name, 120, **opts) < high


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_noise_correction_removes_excess_variance(name):
    assert 0.9 < _removed(name, 200, correction="noise") < 1.1


def test_ancestral_noise_correction_is_exact_at_few_steps():
    """Lowering Euler-a's own noise by dsigma^2 V removes the planted variance even at 20 steps."""
    assert 0.95 < _removed("euler_ancestral", 20, n=50000, correction="noise") < 1.05


def test_dpmpp_2m_quadrature_form_overcorrects():
    """The finding behind the default: the authors' quadrature c overshoots; the first-order form does not."""
    first = _removed("dpmpp_2m", 50, form="first_order")
    quad = _removed("dpmpp_2m", 50, form="quadrature")
    assert 0.9 < first < 1.1
    assert quad > 2.0


def test_zero_strength_and_zero_v_are_no_correction():
    x = DATA.prior(100, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(10, 0.002, 80.0).double()
    base = qdrift.sample_euler_qdrift(DATA, x, sigmas, disable=True)
    V = torch.full((10, 3), 0.3)
    assert torch.equal(qdrift.sample_euler_qdrift(DATA, x, sigmas, V, strength=0.0, disable=True), base)
    corrected = qdrift.sample_euler_qdrift(DATA, x, sigmas, V, disable=True)
    assert corrected.var(0).sum() < base.var(0).sum()  # the drift contracts
    double = qdrift.sample_euler_qdrift(DATA, x, sigmas, V, strength=2.0, disable=True)
    assert double.var(0).sum() < corrected.var(0).sum()


def test_per_channel_v_only_touches_its_channel():
    x = DATA.prior(50, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(8, 0.01, 80.0).double()
    V = torch.zeros(8, 3)
    V[:, 1] = 0.5
    base = qdrift.sample_dpmpp_2m_qdrift(DATA, x, sigmas, disable=True)
    out = qdrift.sample_dpmpp_2m_qdrift(DATA, x, sigmas, V, disable=True)
    assert torch.equal(out[:, [0, 2]], base[:, [0, 2]])
    assert not torch.allclose(out[:, 1], base[:, 1])


def test_euler_coefficient_is_the_papers():
    """One Euler step by hand: x + dsigma (1 + |dsigma| V / (2 sigma)) d (paper Eq. 12)."""
    x = torch.randn(3, 3, dtype=torch.float64) * 5
    sigmas = torch.tensor([5.0, 3.0], dtype=torch.float64)
    V = torch.tensor([[0.1, 0.2, 0.3]])
    d = qdrift.to_d(x, sigmas[0], DATA.denoiser(x, sigmas[0]))
    c = 2.0 * V[0].double() / (2 * 5.0)
    expected = x + (-2.0) * (1 + c) * d
    out = qdrift.sample_euler_qdrift(DATA, x, sigmas, V, disable=True)
    assert torch.allclose(out, expected, atol=1e-12)


def test_flow_euler_is_euler_in_t():
    """A flow model through FlowDenoiser: Euler steps are x + (t_next - t)(1 + c) v."""
    from qdrift.adapters import FlowDenoiser

    vel = lambda x, t: 0.5 * x + 1.0  # noqa: E731
    model = FlowDenoiser(vel)
    x = torch.randn(2, 2, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    V = torch.tensor([0.2, 0.1])
    out = qdrift.sample_euler_qdrift(model, x, sigmas, V, disable=True)
    ref = x.clone()
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        dt = t_next - t
        ref = ref + dt * (1 + abs(dt) * V[i] / (2 * t)) * vel(ref, t)
    assert torch.allclose(out, ref, atol=1e-12)
