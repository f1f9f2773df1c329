"""Input validation, dtypes, and property tests over every sampler (one parametrized table)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdrift
from qdrift.bench.gaussian import GaussianData

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
    for rho in (0, -1.0, float("nan"), float("inf"), True, "7"):  # 0 divided by zero; nan gave all-NaN levels
        with pytest.raises(ValueError, match="rho must be a finite number > 0"):
            qdrift.get_sigmas_karras(5, 0.1, 1.0, rho=rho)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        qdrift.get_sigmas_karras(True, 0.1, 1.0)
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


# -- issue 12: model outputs, calibrations, drift clipping, knobs, schedules ------------------------------------

STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
FULL_NAME = {name: fn.__name__ for name, fn in qdrift.SAMPLERS.items()}


def _run(name, model, x, sigmas, V=None, **kw):
    if name in STOCHASTIC and "noise_sampler" not in kw:
        kw["noise_sampler"] = qdrift.default_noise_sampler(x, seed=0)
    return qdrift.SAMPLERS[name](model, x, sigmas, V, disable=True, **kw)


def _bad_after(n_good, make_bad):
    """A model whose first ``n_good`` calls are the exact denoiser and whose later calls return ``make_bad(out)``."""
    calls = []

    def model(x, sigma, **kw):
        calls.append(1)
        out = DATA.denoiser(x, sigma)
        return out if len(calls) <= n_good else make_bad(out)

    return model


BAD_OUTPUTS = {
    "nan": (lambda out: out * float("nan"), "NaN or inf"),
    "inf": (lambda out: out + float("inf"), "NaN or inf"),
    "one_inf_element": (lambda out: out.index_put((torch.tensor([0]),) * out.ndim, torch.tensor(float("-inf"))),
                        "NaN or inf"),
    "batch_broadcasts": (lambda out: out[:1], r"shape \(1, 2, 4, 4\)"),
    "spatial_broadcasts": (lambda out: out[..., :1], r"shape \(3, 2, 4, 1\)"),
    "numpy": (lambda out: out.numpy(), "ndarray"),
    "none": (lambda out: None, "NoneType"),
    "integer": (lambda out: out.long(), "torch.int64"),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
def test_bad_model_output_raises_naming_sampler_step_and_sigma(name, bad):
    """A NaN/inf, broadcasting, non-tensor or integer output at a later step is refused at that step."""
    x, sigmas = _inputs()
    make_bad, what = BAD_OUTPUTS[bad]
    with pytest.raises(ValueError, match=what) as info:
        _run(name, _bad_after(2, make_bad), x, sigmas, torch.full((6,), 0.05))
    message = str(info.value)
    assert message.startswith(FULL_NAME[name] + ": at step ")
    step = int(message.split("at step ")[1].split()[0])
    sigma = float(message.split("sigma=")[1].split(")")[0])
    assert 1 <= step <= 2 and sigma == pytest.approx(float(sigmas[step]), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("step", range(6))
def test_bad_output_message_names_the_exact_step(dtype, step):
    """Also in half precision, whose rounded sigma used to name the next step."""
    x, sigmas = _inputs(dtype=dtype)
    with pytest.raises(ValueError, match=rf"sample_euler_qdrift: at step {step} of 6 \(sigma="):
        _run("euler", _bad_after(step, lambda out: out * float("nan")), x, sigmas)


@pytest.mark.parametrize("name", NAMES)
def test_checked_model_returns_the_output_object_unchanged(name):
    """The check never copies or casts: the callback sees the very tensor the model returned."""
    x, sigmas = _inputs()
    returned, seen = [], []

    def model(x, sigma):
        out = DATA.denoiser(x, sigma)
        returned.append(out)
        return out

    _run(name, model, x, sigmas, callback=lambda d: seen.append(d["denoised"]))
    assert seen and all(any(s is r for r in returned) for s in seen)


@pytest.mark.parametrize("name", NAMES)
def test_model_output_in_float32_for_half_x_is_accepted(name):
    x, sigmas = _inputs(dtype=torch.float16)
    out = _run(name, lambda x, s: DATA.denoiser(x.float(), s.float()), x, sigmas)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def one_channel_calibration():
    one = GaussianData([0.0], [1.0])
    x = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(0)) * 10
    return qdrift.calibrate(one, one, x, qdrift.get_sigmas_karras(6, 0.05, 10.0), disable=True)


@pytest.mark.parametrize("name", NAMES)
def test_calibration_of_another_channel_count_is_refused(name, one_channel_calibration):
    x, sigmas = _inputs()  # 2 channels
    with pytest.raises(ValueError, match="1 channel.*x has 2.*another model or latent format"):
        _run(name, DATA, x, sigmas, one_channel_calibration)
    three = GaussianData([0.0] * 3, [1.0] * 3)
    cal3 = qdrift.calibrate(three, three, torch.randn(2, 3, 4) * 10, sigmas, disable=True)
    with pytest.raises(ValueError, match="3 channel.*x has 2"):
        _run(name, DATA, x, sigmas, cal3)


@pytest.mark.parametrize("name", NAMES)
def test_plain_tensor_v_broadcasts_over_channels(name):
    x, sigmas = _inputs(dtype=torch.float64)
    flat = _run(name, DATA, x, sigmas, torch.full((6,), 0.1))
    assert torch.equal(flat, _run(name, DATA, x, sigmas, torch.full((6, 1), 0.1)))
    assert torch.equal(flat, _run(name, DATA, x, sigmas, torch.full((6, 2), 0.1)))


def test_drift_coefficient_above_one_is_clipped_with_a_warning():
    """Policy: c > 1 warns (DriftClippedWarning) and clips c to 1; the run equals one with V capped at c = 1."""
    x, sigmas = _inputs(dtype=torch.float64)
    sig = sigmas.double()
    gap = (sig[:-1] - sig[1:]).abs()
    v_cap = 2 * sig[:-1] / gap  # Euler: c = |dsigma| V / (2 sigma) = 1
    huge = torch.full((6,), 1e4, dtype=torch.float64)
    with pytest.warns(qdrift.DriftClippedWarning, match="clipped to 1"):
        clipped = _run("euler", DATA, x, sigmas, huge)
    assert torch.allclose(clipped, _run("euler", DATA, x, sigmas, v_cap), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(clipped).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", qdrift.DriftClippedWarning)
        _run("euler", DATA, x, sigmas, v_cap * 0.999)  # c just below 1: no warning
        with pytest.raises(qdrift.DriftClippedWarning):
            _run("euler", DATA, x, sigmas, huge)


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_clips_huge_v(name):
    x, sigmas = _inputs()
    with pytest.warns(qdrift.DriftClippedWarning):
        out = _run(name, DATA, x, sigmas, torch.full((6, 2), 1e6))
    assert out.shape == x.shape and torch.isfinite(out).all()


KNOBS = {
    "euler": ["s_churn", "s_tmin", "s_tmax", "s_noise", "noise_sampler", "callback"],
    "heun": ["s_churn", "s_tmin", "s_tmax", "s_noise", "noise_sampler", "callback"],
    "euler_ancestral": ["eta", "s_noise", "noise_sampler", "callback"],
    "lms": ["order", "callback"],
    "dpmpp_2m": ["callback"],
    "dpmpp_2m_sde": ["eta", "s_noise", "noise_sampler", "callback"],
    "dpmpp_3m_sde": ["eta", "s_noise", "noise_sampler", "callback"],
}
BAD_KNOB_VALUES = {
    "s_churn": [-1.0, float("nan"), float("inf"), "1", True, None],
    "s_tmin": [-1.0, float("nan"), "0"],
    "s_tmax": [-1.0, float("nan"), "inf"],
    "s_noise": [-0.5, float("nan"), float("inf"), "1"],
    "eta": [-1.0, float("nan"), float("inf"), "1", None],
    "order": [0, -1, 2.0, float("nan"), True, "4"],
    "noise_sampler": [1, "randn"],
    "callback": [1, "print"],
}
KNOB_CASES = [(n, k, v) for n, ks in KNOBS.items() for k in ks for v in BAD_KNOB_VALUES[k]]


@pytest.mark.parametrize("name,knob,value", KNOB_CASES, ids=[f"{n}-{k}-{v!r}" for n, k, v in KNOB_CASES])
def test_bad_knobs_are_refused_by_every_sampler(name, knob, value):
    x, sigmas = _inputs()
    calls = []
    with pytest.raises(ValueError, match=f"{FULL_NAME[name]}: {knob} must be"):
        qdrift.SAMPLERS[name](lambda x, s: calls.append(1) or x, x, sigmas, disable=True, **{knob: value})
    assert not calls  # refused at entry, before any model call


def test_knobs_accept_numpy_and_tensor_scalars_and_infinite_s_tmax():
    import numpy as np

    x, sigmas = _inputs()
    qdrift.sample_euler_qdrift(DATA, x, sigmas, s_churn=np.float32(0.5), s_tmax=float("inf"),
                               s_noise=torch.tensor(1.0), disable=True)
    qdrift.sample_lms_qdrift(DATA, x, sigmas, order=np.int64(3), disable=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_schedules_are_widened(name, half):
    """float16/bfloat16 sigmas (LMS crashed in scipy, torchsde warned) run as their exact float32 values."""
    import warnings

    x, _ = _inputs()
    sigmas = qdrift.get_sigmas_karras(6, 0.05, 10.0).to(half)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _run(name, DATA, x, sigmas)
    assert torch.equal(out, _run(name, DATA, x, sigmas.float()))


@pytest.mark.parametrize("name", NAMES)
def test_schedule_without_values_is_refused(name):
    x, sigmas = _inputs()
    with pytest.raises(ValueError, match="meta device"):
        _run(name, DATA, x, sigmas.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.parametrize("name", NAMES)
def test_schedule_on_another_device_is_moved(name):
    x, sigmas = _inputs()
    for x_dev, s_dev in (("cuda", "cpu"), ("cpu", "cuda")):
        xd = x.to(x_dev)
        out = _run(name, lambda x, s: DATA.denoiser(x, s.to(x.device)), xd, sigmas.to(s_dev))
        assert out.device == xd.device and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "x,match",
    [
        ([torch.zeros(0, 2, 4)], "batch 0 of x holds no samples"),
        ([torch.randn(2, 2, 4) * 10, torch.zeros(0, 2, 4)], "batch 1 of x holds no samples"),
        ([(torch.zeros(0, 2, 4), None)], "batch 0 of x holds no samples"),
        ([torch.zeros(3)], r"batch 0 of x holds no samples \(shape \(3,\)\)"),
        ([(torch.randn(2, 2, 4), [1])], "extra_args of batch 0 must be a dict"),
        (torch.zeros(0, 2, 4), "x holds no samples"),
        (torch.zeros(5), "x holds no samples"),
        ([], "x held no batches"),
        (iter([]), "x held no batches"),
        (3, "x must be a tensor"),
        ("abc", "x must be a tensor"),
    ],
)
def test_calibrate_refuses_empty_or_malformed_input(x, match):
    """An empty batch used to fail inside a reshape; K = 0 in any form is the documented ValueError."""
    sigmas = qdrift.get_sigmas_karras(3, 0.05, 10.0)
    with pytest.raises(ValueError, match=match):
        qdrift.calibrate(DATA, DATA, x, sigmas, disable=True)


def test_calibrate_refuses_bool_batch_size_and_widens_half_sigmas():
    x = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = qdrift.get_sigmas_karras(3, 0.05, 10.0)
    with pytest.raises(ValueError, match="batch_size"):
        qdrift.calibrate(DATA, DATA, x, sigmas, batch_size=True, disable=True)
    half = qdrift.calibrate(DATA, DATA, x, sigmas.half(), disable=True)
    assert torch.equal(half.V, qdrift.calibrate(DATA, DATA, x, sigmas.half().float(), disable=True).V)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result_across_runs_and_threads(name):
    """The promise in the README: the same inputs and seeds give bit-identical results, also run concurrently."""
    import threading

    x, sigmas = _inputs()
    V = torch.full((6, 2), 0.05)
    kw = {"s_churn": 1.0} if name in ("euler", "heun") else {}

    def once():
        noise = qdrift.default_noise_sampler(x, seed=11)
        return qdrift.SAMPLERS[name](DATA, x, sigmas, V, disable=True, noise_sampler=noise, **kw) if (
            name in STOCHASTIC or name in ("euler", "heun")) else qdrift.SAMPLERS[name](DATA, x, sigmas, V, disable=True)

    ref = once()
    results = [None] * 4

    def worker(k):
        results[k] = once()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and torch.equal(r, ref) for r in results)


@pytest.mark.parametrize("levels", [[50.0, math.nextafter(50.0, 0.0), 2.0, 1.0], [50.0, math.nextafter(50.0, 0.0), 1.0]])
def test_dpmpp_2m_after_a_step_of_nearly_zero_length_stays_finite(levels):
    """Found by the property test above (a step of one ulp): after a negligible step the 2M extrapolation's 1 / (2 r) overflowed
    (k-diffusion's arithmetic gives inf there); that step now takes the first-order update."""
    sigmas = torch.tensor(levels, dtype=torch.float64)
    x = torch.randn(1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50
    for v in (0.0, 0.5):
        out = qdrift.SAMPLERS["dpmpp_2m"](DATA, x, sigmas, torch.full((len(levels) - 1, 2), v), disable=True)
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("levels", [[50.0, math.nextafter(50.0, 0.0), 2.0, 1.0, 0.0],
                                    [50.0, 2.0, math.nextafter(2.0, 0.0), 1.0, 0.0],
                                    [80.0, 10.0, 10.0 - 1e-9, 3.0, 3.0 - 1e-12, 1.0, 0.0]])
def test_sde_multistep_after_a_step_of_nearly_zero_length_stays_finite(name, levels):
    """The 2M SDE and 3M SDE extrapolations divide by the ratio of successive log-steps too: after a negligible step
    they overflowed (NaN at the next model call), and the Brownian tree recursed without end on the interval (both as
    in k-diffusion). They now lower the order after such a step and draw the short interval's noise on their own."""
    sigmas = torch.tensor(levels, dtype=torch.float64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * levels[0]
    for v in (0.0, 0.5):
        out = qdrift.SAMPLERS[name](DATA, x, sigmas, torch.full((len(levels) - 1, 2), v), disable=True)
        assert bool(torch.isfinite(out).all())
    noise = qdrift.BrownianTreeNoiseSampler(x, torch.tensor(1.0), torch.tensor(50.0), seed=3)
    short = noise(torch.tensor(2.0), torch.tensor(math.nextafter(2.0, 0.0)))
    again = qdrift.BrownianTreeNoiseSampler(x, torch.tensor(1.0), torch.tensor(50.0), seed=3)
    assert short.shape == x.shape and torch.equal(short, again(torch.tensor(2.0), torch.tensor(math.nextafter(2.0, 0.0))))


@pytest.mark.parametrize("level", [1e-300, 1e-12])
def test_a_positive_level_too_small_to_be_a_noise_level_is_named(level):
    sigmas = torch.tensor([5.0, level, 0.0], dtype=torch.float64)
    x = torch.randn(2, 2, dtype=torch.float64) * 5
    for name in ("euler", "euler_ancestral", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match=r"positive noise level must be >= 1e-10"):
            qdrift.SAMPLERS[name](DATA, x, sigmas, disable=True)


@pytest.mark.parametrize("name", list(qdrift.SAMPLERS))
@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf")])
def test_a_bad_strength_is_refused_without_a_calibration_too(name, strength):
    """strength was checked only with a V (hypothesis found ``strength=-1`` passing with ``V=None``)."""
    x = torch.randn(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        qdrift.SAMPLERS[name](lambda x, s, **k: x * 0, x, torch.tensor([1.0, 0.0], dtype=torch.float64), None,
                              strength=strength, disable=True)


NOISY = {"euler": {"s_churn": 1.0}, "heun": {"s_churn": 1.0}, "euler_ancestral": {}, "dpmpp_2m_sde": {},
         "dpmpp_3m_sde": {}}
BAD_NOISE = {
    "0-d": lambda s, t: torch.tensor(1.0),
    "one sample for all": lambda s, t: torch.randn(1, 2, 4, 4),
    "too many": lambda s, t: torch.randn(4, 2, 4, 4),
    "None": lambda s, t: None,
    "integer": lambda s, t: torch.ones(3, 2, 4, 4, dtype=torch.long),
}


@pytest.mark.parametrize("name", sorted(NOISY))
@pytest.mark.parametrize("kind", sorted(BAD_NOISE))
def test_a_noise_draw_of_the_wrong_kind_is_refused(name, kind):
    """A draw that broadcasts used to give every sample the same noise silently; others failed inside the
    sampler's arithmetic (IndexError, a torch size mismatch) or with an opaque TypeError."""
    x, sigmas = _inputs()
    with pytest.raises(ValueError, match=r"noise_sampler\(sigma, sigma_next\) must return a floating-point tensor "
                                         r"of x's shape \(3, 2, 4, 4\)"):
        _call(name, x, sigmas, noise_sampler=BAD_NOISE[kind], **NOISY[name])


def test_calibration_options_are_checked_before_any_model_runs():
    """A truthy string used to pass for True (``conditional="no"``), ``trim=True`` and ``distributed=True``
    without a process group failed only after the whole calibration had run, and a bad seed gave a str + int
    TypeError from inside a pass."""
    x = DATA.prior(2, 10.0, spatial=(4, 4), generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(4, 0.05, 10.0)
    calls = []

    def model(x, s):
        calls.append(1)
        return DATA(x, s)

    for opts, match in (({"conditional": "no"}, "conditional must be True or False"),
                        ({"trim": True}, "trim must be None or a number >= 0"),
                        ({"trim": float("nan")}, "trim must be"),
                        ({"distributed": "yes"}, "distributed must be True, False or None"),
                        ({"distributed": True}, "needs an initialized torch.distributed process group")):
        with pytest.raises(ValueError, match=match):
            qdrift.calibrate(model, model, x, sigmas, disable=True, **opts)
    assert calls == []
    cal = qdrift.calibrate(DATA, DATA, x, sigmas, disable=True)
    with pytest.raises(ValueError, match="conditional must be True, False or None"):
        cal.with_options(conditional="no")
    for fn in (qdrift.size_drift, qdrift.check_correction, qdrift.match_moments, qdrift.tune_strength):
        for seed in ("a", None, -1, 1.5, True):
            with pytest.raises(ValueError, match="seed must be an integer >= 0"):
                fn(cal, model, model, x, sigmas, "euler", seed=seed)
    assert calls == []
    with pytest.raises(ValueError, match="mean must be True or False"):
        qdrift.match_moments(cal, model, model, x, sigmas, "euler", mean="no")
    # the batch checks name the pass that was called (they used to say "calibrate:" for every pass)
    for fn in (qdrift.size_drift, qdrift.check_correction, qdrift.match_moments, qdrift.tune_strength):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"^{name}: batch_size must be a positive integer or None, got 0"):
            fn(cal, model, model, x, sigmas, "euler", batch_size=0)
        with pytest.raises(ValueError, match=rf"^{name}: x holds no samples"):
            fn(cal, model, model, x[:0], sigmas, "euler")
        with pytest.raises(ValueError, match=rf"^{name}: extra_args\['c'\] has shape \(3,\)"):
            fn(cal, model, model, x, sigmas, "euler", {"c": torch.zeros(3)}, batch_size=1)
    assert calls == []


def test_numpy_numbers_are_accepted_where_python_ones_are():
    """``np.int64`` batch sizes and band counts, a ``np.float32`` z and rho used to be refused."""
    import numpy as np

    x = DATA.prior(4, 10.0, spatial=(8, 8), generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(np.int64(4), 0.05, 10.0, rho=np.float32(7.0))
    cal = qdrift.calibrate(DATA, DATA, x, sigmas, disable=True, batch_size=np.int64(2), bands=np.int64(2))
    assert cal.bands == 2 and cal.meta["K"] == 4
    sized = qdrift.size_drift(cal, DATA, DATA, x, sigmas, "euler", z=np.float32(2.0), seed=np.int64(3))
    assert sized.meta["drift_scale"]["z"] == 2.0


def test_flow_ancestral_refuses_an_eta_that_steps_past_t_zero():
    """ComfyUI's RF step goes to t_down = t_{i+1} (1 + (t_{i+1} / t_i - 1) eta), below 0 for a large eta (no clamp
    there either): it used to integrate past t = 0 silently; now refused at entry, before any model call."""
    from qdrift._utils import get_ancestral_step_flow

    calls = []
    model = qdrift.adapters.FlowDenoiser(lambda x, t, **k: calls.append(t) or x * 0.5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"eta=4.0 takes flow step 1 of 4 \(t=0.75 -> 0.5\) past t = 0 .* 2 for this"):
        qdrift.sample_euler_ancestral_qdrift(model, x, model.get_sigmas(4), eta=4.0, disable=True)
    assert calls == []
    out = qdrift.sample_euler_ancestral_qdrift(model, x, model.get_sigmas(4), eta=2.0, disable=True)  # t_down = 0
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=r"get_ancestral_step_flow: eta=4.0 .* past t = 0 .* eta <= t_from / \(t_from"):
        get_ancestral_step_flow(0.75, 0.5, 4.0)
    with pytest.raises(ValueError, match=r"get_ancestral_step_flow: a flow step must end below t = 1"):
        get_ancestral_step_flow(4.0, 2.0)


def test_flow_ancestral_refuses_flow_levels_above_one():
    """A flow schedule above t = 1 divided by zero (t_down = 1) or was used silently; t = 1 itself is a valid start
    for Euler ancestral (its step divides by 1 - t_down only), the SDE samplers still need t < 1."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    half = lambda x, s, **k: x * 0.5  # noqa: E731
    for levels in ([4.0, 2.0, 0.0], [1.5, 0.5, 0.0]):
        with pytest.raises(ValueError, match=r"sample_euler_ancestral_qdrift: on a flow model the schedule must start "
                                             r"at or below t = 1 .*got " + str(levels[0])):
            qdrift.sample_euler_ancestral_qdrift(half, x, torch.tensor(levels), flow=True, disable=True)
    out = qdrift.sample_euler_ancestral_qdrift(half, x, torch.tensor([1.0, 0.5, 0.0]), flow=True, disable=True)
    assert bool(torch.isfinite(out).all())
    out = qdrift.sample_euler_ancestral_qdrift(half, x, torch.tensor([1.0 + 1e-6, 0.5, 0.0]), flow=True, disable=True)
    assert bool(torch.isfinite(out).all())  # a rounding above 1, as FlowDenoiser allows
    with pytest.raises(ValueError, match=r"must start below t = 1 \(log-SNR is -inf there\)"):
        qdrift.sample_dpmpp_2m_sde_qdrift(half, x, torch.tensor([1.0, 0.5, 0.0]), flow=True, disable=True)


def test_brownian_tree_refuses_a_query_outside_its_range():
    """A query outside [sigma_min, sigma_max] used to give zero noise silently (torchsde clamps it)."""
    x = torch.zeros(2, 3)
    noise = qdrift.BrownianTreeNoiseSampler(x, 1.0, 2.0, seed=0)
    for a, b in ((10.0, 2.93), (2.0, 0.5), (3.0, 2.5), (float("nan"), 1.5)):
        with pytest.raises(ValueError, match=r"BrownianTreeNoiseSampler: queried sigma=.* outside the tree's range "
                                             r"\[sigma_min, sigma_max\] = \[1.0, 2.0\]"):
            noise(torch.tensor(a), torch.tensor(b))
    assert float(noise(torch.tensor(2.0), torch.tensor(1.0)).std()) > 0
    # The edges within torchsde's tolerance (1e-6) and float32 rounding: accepted (clamped to the same increment).
    inside = noise(torch.tensor(2.0), torch.tensor(1.0))
    edges = noise(torch.tensor(2.0 + 5e-7, dtype=torch.float64), torch.tensor(1.0 - 5e-7, dtype=torch.float64))
    assert torch.allclose(edges.float(), inside, rtol=1e-5)


def test_brownian_tree_checks_its_range_and_seed():
    x = torch.zeros(3, 2)
    for lo, hi in ((2.0, 1.0), (float("nan"), 1.0), (-1.0, 1.0), (0.1, float("inf"))):
        with pytest.raises(ValueError, match=r"BrownianTreeNoiseSampler: need 0 <= sigma_min <= sigma_max < inf"):
            qdrift.BrownianTreeNoiseSampler(x, lo, hi, seed=0)
    with pytest.raises(ValueError, match=r"sigma_min must be a real number or a 0-d tensor, got '0.1' \(str\)"):
        qdrift.BrownianTreeNoiseSampler(x, "0.1", 1.0, seed=0)
    with pytest.raises(ValueError, match=r"transform maps .* expected finite times"):
        qdrift.BrownianTreeNoiseSampler(x, 0.0, 1.0, seed=0, transform=lambda s: s.log())
    for seed in (True, 1.5, "7", -1, [1, 2.0, 3], [1, 2, "3"]):
        with pytest.raises(ValueError, match=r"BrownianTreeNoiseSampler: seed must be None, an integer >= 0 or a list"):
            qdrift.BrownianTreeNoiseSampler(x, 0.1, 1.0, seed=seed)
    with pytest.raises(ValueError, match=r"got 2 seeds for a batch of 3"):
        qdrift.BrownianTreeNoiseSampler(x, 0.1, 1.0, seed=[1, 2])
    one_level = qdrift.BrownianTreeNoiseSampler(x, torch.tensor(5.0), torch.tensor(5.0), seed=2**64 - 1)
    assert one_level.tree.covers(torch.tensor(5.0), torch.tensor(5.0))  # a one-level schedule's tree (k-diffusion)
    assert qdrift.BrownianTreeNoiseSampler(x, 0.1, 1.0, seed=[1, 2, 3])(0.5, 0.2).shape == x.shape


def test_schedule_helpers_refuse_what_they_cannot_build():
    for fn in (qdrift.get_sigmas_karras, qdrift.get_sigmas_exponential):
        who = fn.__name__
        for n in (2.0, True, "4", None):  # 2.0 used to fail inside torch.linspace with a bare TypeError
            with pytest.raises(ValueError, match=who + r": n must be a positive integer"):
                fn(n, 0.1, 10.0)
        with pytest.raises(ValueError, match=who + r": sigma_min must be a real number, got '0.1' \(str\)"):
            fn(4, "0.1", 10.0)
        with pytest.raises(ValueError, match=who + r": sigma_min == sigma_max \(2.0\) would repeat one level 4 times"):
            fn(4, 2.0, 2.0)
        assert fn(1, 2.0, 2.0).tolist() == pytest.approx([2.0, 0.0])  # one level: sigma_max
        with pytest.raises(ValueError, match=who + r": the levels overflow torch.float32 .*sigma_max=1e\+39"):
            fn(4, 0.1, 1e39)
    with pytest.raises(ValueError, match=r"get_sigmas_karras: the levels overflow float64 with .*rho=0.001"):
        qdrift.get_sigmas_karras(4, 0.1, 10.0, rho=1e-3)  # was a bare OverflowError
    with pytest.raises(ValueError, match=r"get_sigmas_karras: the levels overflow torch.float32 .*rho=0.01"):
        qdrift.get_sigmas_karras(4, 0.1, 10.0, rho=0.01)  # was all inf
    with pytest.raises(ValueError, match=r"get_sigmas_karras: the levels underflow to 0"):
        qdrift.get_sigmas_karras(4, 1e-300, 1.0)


def test_ancestral_step_helper_refuses_a_step_up_or_from_zero(kdiff):
    with pytest.raises(ValueError, match=r"get_ancestral_step: a step goes down in noise: need 0 <= sigma_to <= "
                                         r"sigma_from, got sigma_from=1.0, sigma_to=2.0"):
        qdrift.get_ancestral_step(1.0, 2.0)  # was a TypeError about complex numbers
    with pytest.raises(ValueError, match=r"get_ancestral_step: sigma_from must be > 0 .*got sigma_from=0.0"):
        qdrift.get_ancestral_step(0, 0)  # was a ZeroDivisionError
    with pytest.raises(ValueError, match=r"get_ancestral_step: eta must be a finite number >= 0, got 'a'"):
        qdrift.get_ancestral_step(2.0, 1.0, eta="a")
    with pytest.raises(ValueError, match=r"get_ancestral_step: sigma_to must be a real number"):
        qdrift.get_ancestral_step(2.0, "1")
    for a, b, eta in ((2.0, 1.0, 1.0), (14.6, 0.03, 0.5), (1.0, 1.0, 1.0), (3.0, 0.0, 1.0), (0, 0, 0.0)):
        assert qdrift.get_ancestral_step(a, b, eta) == kdiff.get_ancestral_step(a, b, eta)
        ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        ours, theirs = qdrift.get_ancestral_step(ta, tb, eta), kdiff.get_ancestral_step(ta, tb, eta)
        assert all(torch.equal(torch.as_tensor(p), torch.as_tensor(q)) for p, q in zip(ours, theirs))


def test_default_noise_sampler_refuses_a_seed_that_is_not_an_integer():
    x = torch.zeros(2, 3)
    for seed in ("a", "3", 1.5, True, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"default_noise_sampler: seed must be None or an integer in \[-2\*\*63, "
                                             r"2\*\*64\), got "):
            qdrift.default_noise_sampler(x, seed=seed)
    import numpy as np

    first = qdrift.default_noise_sampler(x, seed=np.int64(5))(1.0, 0.5)
    assert torch.equal(first, torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    assert qdrift.default_noise_sampler(x, seed=-1)(1.0, 0.5).shape == x.shape


@pytest.mark.parametrize("extra_args,match", [
    ({"sigma": 1.0}, r"extra_args must not hold 'sigma': the model is called as D\(x, sigma, \*\*extra_args\)"),
    ({"x": 1.0}, r"extra_args must not hold 'x'"),
    ({1: 1.0}, r"extra_args keys must be strings .*got 1 \(int\)"),
])
def test_sampler_extra_args_that_cannot_be_keywords_are_refused_by_name(extra_args, match):
    """With a v2 calibration a 'sigma' key failed inside the plan's wrapper ("got multiple values for argument
    'sigma'"), and a non-string key with Python's bare "keywords must be strings"."""
    model = lambda x, sigma, **kw: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="sample_euler_qdrift: " + match):
        qdrift.sample_euler_qdrift(model, x, qdrift.get_sigmas_karras(4, 0.1, 10.0), None, extra_args=extra_args)


def test_lms_final_denoise_is_a_flag():
    """``final_denoise`` takes the flags every other option takes (numpy and 0-d bool tensors too); a truthy
    string or a number is refused, naming the sampler and the option."""
    import numpy as np

    x = DATA.prior(2, 10.0, spatial=(4, 4), generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(4, 0.05, 10.0)
    ref = qdrift.sample_lms_qdrift(DATA, x, sigmas, None, final_denoise=True, disable=True)
    for flag in (np.bool_(True), torch.tensor(True)):
        assert torch.equal(qdrift.sample_lms_qdrift(DATA, x, sigmas, None, final_denoise=flag, disable=True), ref)
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match=r"sample_lms_qdrift: final_denoise must be True or False, got"):
            qdrift.sample_lms_qdrift(DATA, x, sigmas, None, final_denoise=bad, disable=True)
