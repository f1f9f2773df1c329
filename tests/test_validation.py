"""Input validation, dtypes, and property tests over every sampler (one parametrized table)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdrift
from qdrift.analytic import GaussianData

DATA = GaussianData([0.2, -0.3], [1.0, 0.7])
NAMES = list(qdrift.SAMPLERS)


def _call(name, x, sigmas, V=None, **kw):
    return qdrift.SAMPLERS[name](DATA, x, sigmas, V, disable=True, **kw)


def _inputs(steps=6, dtype=torch.float32):
    sigmas = qdrift.get_sigmas_karras(steps, 0.05, 10.0)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype) * 10
    return x, sigmas


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad_sigmas,match",
    [
        (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
        (torch.tensor([10.0, 10.0, 5.0, 0.0]), "strictly decreasing"),
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([float("nan"), 0.0]), "finite"),
        (torch.tensor([1.0, -0.5]), ">= 0"),
        (torch.tensor([1.0, 0.0, 0.0]), "strictly decreasing"),
    ],
)
def test_bad_sigmas(name, bad_sigmas, match):
    x, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        _call(name, x, bad_sigmas)


@pytest.mark.parametrize("name", NAMES)
def test_bad_v_and_options(name):
    x, sigmas = _inputs()
    with pytest.raises(ValueError, match="shape"):
        _call(name, x, sigmas, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="shape"):
        _call(name, x, sigmas, torch.zeros(6, 3))
    with pytest.raises(ValueError, match=">= 0"):
        _call(name, x, sigmas, -torch.ones(6, 2))
    with pytest.raises(ValueError, match="finite"):
        _call(name, x, sigmas, torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="strength"):
        _call(name, x, sigmas, torch.zeros(6), strength=-1.0)
    with pytest.raises(ValueError, match="V must be"):
        _call(name, x, sigmas, "0.1")
    with pytest.raises(ValueError, match="x must"):
        _call(name, x[0, 0, 0], sigmas)
    with pytest.raises(ValueError, match="floating-point"):
        _call(name, x.long(), sigmas)
    with pytest.raises(ValueError, match="extra_args"):
        qdrift.SAMPLERS[name](DATA, x, sigmas, None, [1], disable=True)


@pytest.mark.parametrize("name", ["lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_bad_form(name):
    x, sigmas = _inputs()
    with pytest.raises(ValueError, match="first_order"):
        _call(name, x, sigmas, form="second")


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_bad_correction(name):
    x, sigmas = _inputs()
    with pytest.raises(ValueError, match="'drift', 'noise'"):
        _call(name, x, sigmas, correction="both")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(name, dtype):
    """Half-precision inputs work: V is applied in float32 and the result keeps x's dtype."""
    x, sigmas = _inputs(dtype=dtype)
    kw = {"noise_sampler": qdrift.default_noise_sampler(x, seed=0)} if name in {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"} else {}

    def model(x, sigma):
        return DATA.denoiser(x.float(), sigma.float()).to(x.dtype)

    out = qdrift.SAMPLERS[name](model, x, sigmas, torch.full((6, 2), 0.1, dtype=torch.float64), disable=True, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_scalar_v_and_channel_v_agree_when_equal(name):
    x, sigmas = _inputs(dtype=torch.float64)
    kw = lambda: {"noise_sampler": qdrift.default_noise_sampler(x, seed=0)} if name in {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"} else {}  # noqa: E731
    a = _call(name, x, sigmas, torch.full((6,), 0.2), **kw())
    b = _call(name, x, sigmas, torch.full((6, 2), 0.2), **kw())
    assert torch.equal(a, b)


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 8))
    levels = sorted(draw(st.lists(st.floats(0.01, 50.0), min_size=n, max_size=n, unique=True)), reverse=True)
    end_in_zero = draw(st.booleans())
    return torch.tensor(levels + ([0.0] if end_in_zero or n == 1 else []), dtype=torch.float64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), sigmas=schedules(), v=st.floats(0.0, 2.0), batch=st.integers(1, 3),
       spatial=st.sampled_from([(), (3,), (2, 2)]), form=st.sampled_from(["first_order", "quadrature"]))
def test_never_nan_and_shape_preserved(name, sigmas, v, batch, spatial, form):
    x = torch.randn((batch, 2) + spatial, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * float(sigmas[0])
    kw = {}
    if name in {"lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"}:
        kw["form"] = form
    if name in {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}:
        kw["noise_sampler"] = qdrift.default_noise_sampler(x, seed=1)
    V = torch.full((len(sigmas) - 1, 2), v)
    out = qdrift.SAMPLERS[name](DATA, x, sigmas, V, disable=True, **kw)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 10), channels=st.integers(1, 4), wrong=st.integers(-3, 3))
def test_v_shape_validation_property(steps, channels, wrong):
    x = torch.zeros(1, channels, 2)
    sigmas = torch.linspace(5.0, 0.0, steps + 1)
    V = torch.zeros(max(steps + wrong, 1), channels)
    if V.shape[0] == steps:
        qdrift.sample_euler_qdrift(lambda x, s: x * 0, x, sigmas, V, disable=True)
    else:
        with pytest.raises(ValueError, match=f"\\[{steps}, {channels}\\]"):
            qdrift.sample_euler_qdrift(lambda x, s: x * 0, x, sigmas, V, disable=True)


def test_schedule_helpers_validate():
    with pytest.raises(ValueError):
        qdrift.get_sigmas_karras(0, 0.1, 1.0)
    with pytest.raises(ValueError):
        qdrift.get_sigmas_exponential(5, 2.0, 1.0)


def test_progress_bar_and_callback_run():
    x, sigmas = _inputs()
    seen = []
    qdrift.sample_heun_qdrift(DATA, x, sigmas, torch.zeros(6), callback=lambda d: seen.append(d["i"]), disable=True)
    assert seen == list(range(6))


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_on_flow_models(name):
    """They inject noise in the flow form (tests/test_flow_stochastic.py); the SDE ones need t_0 < 1 there."""
    from qdrift.adapters import FlowDenoiser

    x = torch.randn(2, 2, 3)
    if name == "euler_ancestral":
        out = qdrift.SAMPLERS[name](FlowDenoiser(lambda x, t: x), x, torch.tensor([1.0, 0.5, 0.0]), disable=True)
        assert torch.isfinite(out).all()
    else:
        with pytest.raises(ValueError, match="below t = 1"):
            qdrift.SAMPLERS[name](FlowDenoiser(lambda x, t: x), x, torch.tensor([1.0, 0.5, 0.0]), disable=True)