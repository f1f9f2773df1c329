"""One analytic x0 expressed in every parameterization gives the same denoiser D."""

import math

import pytest
import torch

import qdrift
from qdrift import adapters
from qdrift.bench.gaussian import GaussianData

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)  # Stable Diffusion's scaled-linear schedule


def _x_and_sigma():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    sigma = torch.tensor([0.05, 0.7, 1.9, 6.0, 14.0], dtype=torch.float64)
    return x, sigma


def _sig(sigma, x):
    return sigma.reshape(-1, 1, 1, 1)


def test_discrete_eps_and_v_match_exact_denoiser():
    x, sigma = _x_and_sigma()
    schedule = adapters.DiscreteSchedule(ALPHAS_CUMPROD)

    def sigma_of(t):
        return schedule.t_to_sigma(t).double()

    def eps_net(x_vp, t):
        s = _sig(sigma_of(t), x_vp)
        x_ve = x_vp * (1 + s**2) ** 0.5
        return (x_ve - DATA.denoiser(x_ve, sigma_of(t))) / s

    def v_net(x_vp, t):
        s = _sig(sigma_of(t), x_vp)
        x_ve = x_vp * (1 + s**2) ** 0.5
        x0 = DATA.denoiser(x_ve, sigma_of(t))
        eps = (x_ve - x0) / s
        alpha, sig_vp = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5
        return alpha * eps - sig_vp * x0

    exact = DATA.denoiser(x, sigma)
    eps_model = adapters.DiscreteEpsDenoiser(eps_net, ALPHAS_CUMPROD)
    v_model = adapters.DiscreteVDenoiser(v_net, ALPHAS_CUMPROD)
    assert torch.allclose(eps_model(x, sigma), exact, atol=1e-5)
    assert torch.allclose(v_model(x, sigma), exact, atol=1e-5)


def test_sigma_timestep_roundtrip():
    schedule = adapters.DiscreteSchedule(ALPHAS_CUMPROD)
    t = torch.tensor([0.0, 10.0, 499.5, 998.25, 999.0], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-6)
    grid = schedule.sigmas.double()
    assert torch.allclose(schedule.sigma_to_t(grid[[0, 500, 999]]), torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64), atol=1e-4)
    quantized = adapters.DiscreteSchedule(ALPHAS_CUMPROD, quantize=True)
    assert float(quantized.sigma_to_t(schedule.t_to_sigma(torch.tensor([10.4], dtype=torch.float64)))[0]) == 10.0
    assert math.isclose(schedule.sigma_max, float(((1 - ALPHAS_CUMPROD[-1]) / ALPHAS_CUMPROD[-1]) ** 0.5), rel_tol=1e-6)


def test_continuous_eps_v_and_x0_match_exact_denoiser():
    x, sigma = _x_and_sigma()
    exact = DATA.denoiser(x, sigma)

    def eps_net(x_in, s):  # VP input scaling, conditioned on sigma itself
        x_ve = x_in * (1 + _sig(s, x_in) ** 2) ** 0.5
        return (x_ve - DATA.denoiser(x_ve, s)) / _sig(s, x_in)

    def v_net(x_in, log_s):
        s = log_s.exp()
        x_ve = x_in * (1 + _sig(s, x_in) ** 2) ** 0.5
        x0 = DATA.denoiser(x_ve, s)
        ss = _sig(s, x_in)
        return (x_ve - x0) / ss / (1 + ss**2) ** 0.5 - ss / (1 + ss**2) ** 0.5 * x0

    assert torch.allclose(adapters.ContinuousEpsDenoiser(eps_net, 0.01, 80.0)(x, sigma), exact, atol=1e-10)
    assert torch.allclose(adapters.ContinuousVDenoiser(v_net, 0.01, 80.0, time_fn=torch.log)(x, sigma), exact, atol=1e-10)
    assert torch.allclose(adapters.X0Denoiser(DATA.denoiser, 0.01, 80.0)(x, sigma), exact, atol=1e-12)


def test_flow_velocity_matches_exact_denoiser():
    """x_t = (1 - t) x0 + t eps is the VE state x / (1 - t) at sigma = t / (1 - t)."""
    x_ve, sigma = _x_and_sigma()
    t = sigma / (1 + sigma)
    x_t = x_ve * _sig(1 - t, x_ve)

    def velocity(x_in, tt):
        s = tt / (1 - tt)
        x0 = DATA.denoiser(x_in / _sig(1 - tt, x_in), s)
        return (x_in - x0) / _sig(tt, x_in)  # v = eps - x0 = (x_t - x0) / t

    flow = adapters.FlowDenoiser(velocity)
    assert torch.allclose(flow(x_t, t), DATA.denoiser(x_ve, sigma), atol=1e-10)
    scaled = adapters.FlowDenoiser(lambda x_in, tt: velocity(x_in, tt / 1000), time_scale=1000.0)
    assert torch.allclose(scaled(x_t, t), DATA.denoiser(x_ve, sigma), atol=1e-10)


def test_noise_scaling_and_schedules():
    noise = torch.ones(1, 2, 2, 2)
    latent = torch.full_like(noise, 3.0)
    ve = adapters.X0Denoiser(DATA.denoiser, 0.01, 80.0)
    assert torch.equal(ve.noise_scaling(80.0, noise), noise * 80)
    assert torch.equal(ve.noise_scaling(2.0, noise, latent), latent + 2 * noise)
    flow = adapters.FlowDenoiser(lambda x, t: x, shift=3.0)
    assert torch.equal(flow.noise_scaling(1.0, noise), noise)
    assert torch.allclose(flow.noise_scaling(0.25, noise, latent), 0.25 * noise + 0.75 * latent)
    s = flow.get_sigmas(4)
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    assert ve.get_sigmas(5)[0].item() == pytest.approx(80.0)


def test_adapters_reject_bad_input():
    with pytest.raises(ValueError):
        adapters.DiscreteEpsDenoiser(lambda x, t: x, torch.tensor([0.5, 0.9]))  # increasing
    with pytest.raises(ValueError):
        adapters.FlowDenoiser("not callable")
    flow = adapters.FlowDenoiser(lambda x, t: x)
    with pytest.raises(ValueError, match="sigma"):
        flow(torch.zeros(2, 1, 2), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents_keep_exact_timesteps(dtype):
    """A bf16 latent must not round the timestep (999 would become 1000 in bf16)."""
    seen = []

    def net(x_in, t):
        seen.append(t)
        assert x_in.dtype == dtype
        return torch.zeros_like(x_in)

    schedule = adapters.DiscreteSchedule(ALPHAS_CUMPROD)
    x = torch.zeros(2, 4, 2, 2, dtype=dtype)
    sigma = schedule.t_to_sigma(torch.tensor([999.0, 300.7], dtype=torch.float64))
    model = adapters.DiscreteEpsDenoiser(net, ALPHAS_CUMPROD)
    out = model(x, sigma)
    assert out.dtype == dtype
    assert torch.allclose(seen[-1].double(), torch.tensor([999.0, 300.7], dtype=torch.float64), atol=1e-3)
    quantized = adapters.DiscreteEpsDenoiser(net, ALPHAS_CUMPROD, quantize=True).half()  # .half() must not round the grid
    quantized(x, sigma)
    assert seen[-1].tolist() == [999, 301]


def _recording_net(seen):
    def net(x, t, **kw):
        seen.append(t)
        return torch.zeros_like(x)

    return net


@pytest.mark.parametrize("make", [
    lambda net: adapters.DiscreteEpsDenoiser(net, ALPHAS_CUMPROD),
    lambda net: adapters.DiscreteVDenoiser(net, ALPHAS_CUMPROD, quantize=True),
    lambda net: adapters.ContinuousEpsDenoiser(net, 0.01, 80.0),
    lambda net: adapters.ContinuousVDenoiser(net, 0.01, 80.0),
    lambda net: adapters.X0Denoiser(net, 0.01, 80.0),
], ids=["discrete_eps", "discrete_v", "continuous_eps", "continuous_v", "x0"])
@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), float("inf"), [1.0, float("nan"), 2.0]])
def test_ve_adapters_refuse_bad_sigma_before_calling_the_network(make, bad):
    """A negative or NaN sigma used to reach the network as a NaN timestep."""
    seen = []
    denoiser = make(_recording_net(seen))
    x = torch.randn(3, 2, 4)
    sigma = torch.tensor(bad) if isinstance(bad, list) else bad
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        denoiser(x, sigma)
    assert not seen


@pytest.mark.parametrize("t", [1.5, 1.001, -0.1, float("nan"), float("inf")])
def test_flow_adapter_refuses_time_outside_unit_interval(t):
    seen = []
    with pytest.raises(ValueError, match=r"FlowDenoiser: sigma must be in \[0, 1"):
        adapters.FlowDenoiser(_recording_net(seen))(torch.randn(2, 2, 3), t)
    assert not seen


def test_flow_adapter_accepts_the_unit_interval_with_rounding_slack():
    seen = []
    flow = adapters.FlowDenoiser(_recording_net(seen), time_scale=1000.0)
    for t in (0.0, 0.5, 1.0, 1.0 + 1e-7):
        assert torch.isfinite(flow(torch.randn(2, 2, 3), t)).all()
    for t, shift in ((1.0, 0.1), (1.0, 3.0)):
        assert float(adapters.get_sigmas_flow(10, shift)[0]) <= 1.0 + 1e-6


@pytest.mark.parametrize("kwargs", [{"time_scale": float("nan")}, {"time_scale": 0.0}, {"shift": -1.0},
                                    {"shift": float("inf")}, {"time_scale": "1"}])
def test_flow_adapter_options_are_checked(kwargs):
    with pytest.raises(ValueError, match="FlowDenoiser"):
        adapters.FlowDenoiser(lambda x, t: x, **kwargs)


def test_schedule_maps_and_other_bad_adapter_inputs():
    schedule = adapters.DiscreteSchedule(ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="sigma_to_t"):
        schedule.sigma_to_t(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="t_to_sigma"):
        schedule.t_to_sigma(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="shift"):
        adapters.get_sigmas_flow(5, float("inf"))
    with pytest.raises(ValueError, match="sigma_min"):
        adapters.ContinuousEpsDenoiser(lambda x, t: x, 0.01, float("inf"))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        adapters.ContinuousEpsDenoiser(lambda x, t: x, 0.01, 80.0)(torch.ones(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="sigma must be a number"):
        adapters.ContinuousEpsDenoiser(lambda x, t: x, 0.01, 80.0)(torch.ones(2, 3), "1.0")


# --- the network's output: exactly x's shape, floating point (nothing that merely broadcasts) ---

OUTPUT_ADAPTERS = {
    "DiscreteEpsDenoiser": lambda net: adapters.DiscreteEpsDenoiser(net, ALPHAS_CUMPROD),
    "DiscreteVDenoiser": lambda net: adapters.DiscreteVDenoiser(net, ALPHAS_CUMPROD, quantize=True),
    "ContinuousEpsDenoiser": lambda net: adapters.ContinuousEpsDenoiser(net, 0.01, 80.0),
    "ContinuousVDenoiser": lambda net: adapters.ContinuousVDenoiser(net, 0.01, 80.0, scale_input=False),
    "X0Denoiser": lambda net: adapters.X0Denoiser(net, 0.01, 80.0),
    "FlowDenoiser": lambda net: adapters.FlowDenoiser(net, time_scale=1000.0),
}

BAD_OUTPUTS = {  # what the network returns for x [2, 3, 4, 4] -> (shape, dtype) named in the message
    "one_channel": (lambda x: x[:, :1], (2, 1, 4, 4), torch.float32),
    "one_item": (lambda x: x[:1], (1, 3, 4, 4), torch.float32),
    "zero_dim": (lambda x: x.new_tensor(0.5), (), torch.float32),
    "learned_sigma": (lambda x: torch.cat([x, x], 1), (2, 6, 4, 4), torch.float32),
    "int64": (lambda x: x.round().long(), (2, 3, 4, 4), torch.int64),
}


@pytest.mark.parametrize("name", list(OUTPUT_ADAPTERS))
@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
def test_adapters_refuse_a_network_output_that_is_not_x_shaped_floating(name, bad):
    """A [B, 1, ...], [1, C, ...] or 0-d output used to broadcast into a D of x's shape (and pass every later
    check); a learned-sigma 2C output was a raw torch broadcasting error; X0Denoiser passed an int64 output on."""
    make_out, shape, dtype = BAD_OUTPUTS[bad]
    denoiser = OUTPUT_ADAPTERS[name](lambda x, t: make_out(x))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as info:
        denoiser(x, torch.tensor([0.5, 0.5]))
    msg = str(info.value)
    assert msg.startswith(f"{name}: the network returned"), msg
    assert f"dtype {dtype}" in msg and f"shape {shape}" in msg, msg
    assert "expected a floating-point tensor of x's shape (2, 3, 4, 4)" in msg, msg
    if bad == "learned_sigma":
        assert "variance" in msg and "out[:, :3]" in msg, msg
    else:
        assert "variance" not in msg, msg


@pytest.mark.parametrize("name", list(OUTPUT_ADAPTERS))
def test_adapters_refuse_a_network_output_that_is_not_a_tensor(name):
    denoiser = OUTPUT_ADAPTERS[name](lambda x, t: (x,))  # e.g. a diffusers-style tuple
    with pytest.raises(ValueError, match=f"^{name}: the network returned tuple; expected a floating-point tensor"):
        denoiser(torch.randn(2, 3, 4), 0.5)


def test_learned_sigma_hint_names_the_channel_axis_only():
    """2C along another axis (or 2B items) is a plain shape error, without the learned-sigma advice."""
    x = torch.randn(2, 3, 4, 4)
    for make_out in (lambda x: torch.cat([x, x], 2), lambda x: torch.cat([x, x], 0)):
        with pytest.raises(ValueError, match="DiscreteEpsDenoiser: the network returned") as info:
            adapters.DiscreteEpsDenoiser(lambda x, t: make_out(x), ALPHAS_CUMPROD)(x, 1.0)
        assert "variance" not in str(info.value)


def test_a_sampler_run_with_a_broadcasting_network_is_refused():
    """The reviewer's repro: a full sampler run with a [B, 1, H, W] eps network used to succeed."""
    import qdrift

    denoiser = adapters.DiscreteEpsDenoiser(lambda x, t: x[:, :1], ALPHAS_CUMPROD)
    x = torch.randn(2, 3, 4, 4) * denoiser.sigma_max
    with pytest.raises(ValueError, match=r"DiscreteEpsDenoiser: the network returned .*shape \(2, 1, 4, 4\)"):
        qdrift.sample_euler_qdrift(denoiser, x, denoiser.get_sigmas(3), disable=True)


@pytest.mark.parametrize("name", list(OUTPUT_ADAPTERS))
def test_adapters_accept_an_x_shaped_output_of_another_floating_dtype(name):
    """The check is shape and floating-ness only: a float32 output for a float16 x (autocast) still passes,
    and X0Denoiser hands the network's output on unchanged."""
    seen = []

    def net(x, t):
        seen.append(torch.zeros(x.shape, dtype=torch.float32))
        return seen[-1]

    x = torch.randn(2, 3, 4).half()
    out = OUTPUT_ADAPTERS[name](net)(x, 0.5)
    assert out.shape == x.shape
    if name == "X0Denoiser":
        assert out is seen[-1]
    else:
        assert out.dtype == x.dtype


# --- adapter options: checked at construction; a custom time_fn's output at each call ---

@pytest.mark.parametrize("make,match", [
    (lambda: adapters.ContinuousEpsDenoiser(_recording_net([]), 0.1, 10.0, time_fn=3),
     r"ContinuousEpsDenoiser: time_fn must be None or a callable sigma \[B\] -> time, got 3 \(int\)"),
    (lambda: adapters.X0Denoiser(_recording_net([]), 0.1, 10.0, time_fn="sqrt"),
     r"X0Denoiser: time_fn must be None or a callable .*got 'sqrt' \(str\)"),
    (lambda: adapters.ContinuousEpsDenoiser(_recording_net([]), "0.1", 10.0),
     r"ContinuousEpsDenoiser: sigma_min must be a real number, got '0.1' \(str\)"),
    (lambda: adapters.ContinuousVDenoiser(_recording_net([]), 0.1, True),
     r"ContinuousVDenoiser: sigma_max must be a real number, got True \(bool\)"),
    (lambda: adapters.X0Denoiser(_recording_net([]), None, 10.0),
     r"X0Denoiser: sigma_min must be a real number, got None"),
    (lambda: adapters.DiscreteEpsDenoiser(_recording_net([]), ALPHAS_CUMPROD, quantize="no"),
     "DiscreteEpsDenoiser: quantize must be True or False, got 'no'"),
    (lambda: adapters.DiscreteVDenoiser(_recording_net([]), ALPHAS_CUMPROD, quantize=1),
     "DiscreteVDenoiser: quantize must be True or False, got 1"),
    (lambda: adapters.DiscreteSchedule(ALPHAS_CUMPROD, quantize="False"),
     "DiscreteSchedule: quantize must be True or False, got 'False'"),
    (lambda: adapters.DiscreteSchedule(ALPHAS_CUMPROD).sigma_to_t(torch.ones(2), quantize="yes"),
     "DiscreteSchedule.sigma_to_t: quantize must be True or False, got 'yes'"),
    (lambda: adapters.ContinuousVDenoiser(_recording_net([]), 0.1, 10.0, scale_input="no"),
     "ContinuousVDenoiser: scale_input must be True or False, got 'no'"),
], ids=["time_fn_int", "time_fn_str", "sigma_min_str", "sigma_max_bool", "sigma_min_none", "quantize_str",
        "quantize_int", "schedule_quantize", "sigma_to_t_quantize", "scale_input_str"])
def test_adapter_options_are_refused_at_construction(make, match):
    """time_fn=3 used to fail at the first call ("'int' object is not callable"), sigma_min="0.1" with a bare
    TypeError from the comparison, and quantize="no" / scale_input="no" were taken as true."""
    with pytest.raises(ValueError, match=match):
        make()


def test_adapter_options_accept_numpy_and_tensor_values():
    np = pytest.importorskip("numpy")
    model = adapters.ContinuousEpsDenoiser(_recording_net([]), np.float32(0.1), torch.tensor(10.0),
                                           scale_input=np.bool_(False))
    assert (model.sigma_min, model.scale_input) == (pytest.approx(0.1), False)
    assert adapters.DiscreteEpsDenoiser(_recording_net([]), ALPHAS_CUMPROD, quantize=np.bool_(True)).schedule.quantize


@pytest.mark.parametrize("make", [
    lambda net, fn: adapters.ContinuousEpsDenoiser(net, 0.01, 80.0, time_fn=fn),
    lambda net, fn: adapters.ContinuousVDenoiser(net, 0.01, 80.0, time_fn=fn),
    lambda net, fn: adapters.X0Denoiser(net, 0.01, 80.0, time_fn=fn),
], ids=["continuous_eps", "continuous_v", "x0"])
def test_a_time_fn_that_returns_nan_or_inf_is_refused_before_the_network(make):
    """A time_fn that returns NaN (here log(0) = -inf, and 0 * inf = NaN) used to pass it on to the network."""
    seen = []
    x = torch.randn(2, 3, 4)
    for fn, sigma in ((lambda s: s.log(), torch.tensor([1.0, 0.0])), (lambda s: s * float("inf"), 0.0)):
        with pytest.raises(ValueError, match=r"time_fn returned \[.*\] for sigma \[.*\]; expected finite times"):
            make(_recording_net(seen), fn)(x, sigma)
    assert not seen
    make(_recording_net(seen), lambda s: 250.0 * s.log1p())(x, torch.tensor([1.0, 0.0]))  # a finite map passes
    assert torch.equal(seen[-1], 250.0 * torch.tensor([1.0, 0.0]).log1p())


def test_get_sigmas_flow_refuses_what_float32_cannot_hold():
    """get_sigmas_flow(None) / shift="2" were bare TypeErrors, True was n=1, shift=1e-8 gave inf first, 1e-6 0.987."""
    for n in (None, True, 2.0, 0):
        with pytest.raises(ValueError, match=r"get_sigmas_flow: n must be a positive integer"):
            qdrift.get_sigmas_flow(n)
    for shift in ("2", 1e-8, 1e-6, 1e3, float("nan"), True):
        with pytest.raises(ValueError, match=r"get_sigmas_flow: shift must be a real number in \[0.01, 100\]"):
            qdrift.get_sigmas_flow(4, shift)
    for shift in (0.01, 1.0, 3.0, 100.0):
        t = qdrift.get_sigmas_flow(50, shift)
        assert abs(float(t[0]) - 1) <= 1e-5 and float(t[-1]) == 0 and bool((t[1:] < t[:-1]).all())
