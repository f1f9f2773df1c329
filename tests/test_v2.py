"""Q-Drift v2 (method="v2", the default with a Calibration): exact balance, cross-step errors, gain and bias.

The analytic Gaussian has an exact denoiser and a planted "quantized" error whose law is known, so how much of the
quantized sampler's excess final variance a correction removes is measured against exact answers.
"""

import warnings

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser
from qdrift.calib.stats import _TRAJ_FIELDS, TrajectorySums
from qdrift.correction import balance_coefficient

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
CAL_SIGMAS = qdrift.get_sigmas_karras(40, 0.002, 80.0).double()


def _calibration(K=5, seed=7, **planted):
    x = DATA.prior(K, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(5))
    return qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=seed, **planted), x, CAL_SIGMAS, disable=True)


def _run(name, model, x, sigmas, V=None, **opts):
    if name in STOCHASTIC:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x, seed=3)
    return qdrift.SAMPLERS[name](model, x.clone(), sigmas, V, disable=True, **opts)


def _removed(name, cal, steps=20, n=20000, **planted):
    """Share of the excess final variance (quantized over FP) that the correction removes."""
    x = DATA.prior(n, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(steps, 0.002, 80.0).double()
    fp = _run(name, DATA, x, sigmas).var(0)
    q = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, sigmas).var(0)
    out = {}
    for method in ("paper", "v2"):
        corr = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, sigmas, cal, method=method).var(0)
        out[method] = 1 - float((corr - fp).sum()) / float((q - fp).sum())
    return out


@pytest.fixture(scope="module")
def independent_cal():
    return _calibration(var=0.1)


@pytest.fixture(scope="module")
def correlated_cal():
    return _calibration(var=0.2, persistent=0.2)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_v2_removes_the_independent_excess_at_20_steps(name, independent_cal):
    """The paper's first-order rule under-corrects long steps (Euler ~60 %, Euler a ~40 %); v2 is within 10 %."""
    removed = _removed(name, independent_cal, var=0.1)
    assert 0.9 < removed["v2"] < 1.1, removed


def test_v2_on_3m_sde_beats_the_paper(independent_cal):
    removed = _removed("dpmpp_3m_sde", independent_cal, var=0.1)
    assert removed["v2"] > removed["paper"] + 0.2, removed


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "lms", "dpmpp_2m_sde"])
def test_v2_removes_most_of_a_correlated_excess(name, correlated_cal):
    """Half the error kept along each trajectory: the paper's rule removes under 25 %, v2 over 80 %."""
    removed = _removed(name, correlated_cal, var=0.2, persistent=0.2)
    assert removed["paper"] < 0.25, removed
    assert removed["v2"] > 0.8, removed


def test_v2_on_3m_sde_removes_most_of_a_correlated_excess(correlated_cal):
    """The third-order extrapolation amplifies a step's errors: scaling the whole step (as the drift did before
    session 11) removed 37 % here, the first-order part over 70 %."""
    removed = _removed("dpmpp_3m_sde", correlated_cal, var=0.2, persistent=0.2)
    assert removed["v2"] > 0.7, removed


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_the_sde_drift_alone_balances_a_large_fresh_error(name):
    """With ``correction="drift"`` and a large fresh error, scaling the whole DPM++ SDE step cannot balance it (the
    extrapolated errors grow with the drift: 40 % / -24 % removed before session 11); the first-order part can."""
    cal = _calibration(var=0.4)
    x = DATA.prior(20000, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()
    fp = _run(name, DATA, x, sigmas).var(0)
    q = _run(name, PlantedErrorDenoiser(DATA, seed=1, var=0.4), x, sigmas).var(0)
    corr = _run(name, PlantedErrorDenoiser(DATA, seed=1, var=0.4), x, sigmas, cal, correction="drift").var(0)
    removed = 1 - float((corr - fp).sum()) / float((q - fp).sum())
    assert 0.7 < removed < 1.2, removed


def test_gain_and_bias_are_removed():
    """d_hat = 1.25 d + 0.2 + noise: the sample's mean and variance return to the FP sampler's with v2 only."""
    planted = dict(var=0.05, gain=0.25, bias=0.2)
    cal = _calibration(**planted)
    x = DATA.prior(20000, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()
    fp = qdrift.sample_euler_qdrift(DATA, x, sigmas, disable=True)
    q = PlantedErrorDenoiser(DATA, seed=1, **planted)
    paper = qdrift.sample_euler_qdrift(q, x, sigmas, cal, disable=True, method="paper")
    v2 = qdrift.sample_euler_qdrift(PlantedErrorDenoiser(DATA, seed=1, **planted), x, sigmas, cal, disable=True)
    mean_err = lambda out: float((out.mean(0) - fp.mean(0)).abs().max())  # noqa: E731
    var_err = lambda out: float((out.var(0) / fp.var(0) - 1).abs().max())  # noqa: E731
    assert mean_err(v2) < 0.05 < mean_err(paper)
    assert var_err(v2) < 0.05 < var_err(paper)


def test_calibration_default_is_v2_and_tensor_default_is_paper(independent_cal):
    x = DATA.prior(64, 80.0, generator=torch.Generator().manual_seed(1))
    sigmas = qdrift.get_sigmas_karras(12, 0.002, 80.0).double()
    q = lambda: PlantedErrorDenoiser(DATA, var=0.1, seed=2)  # noqa: E731
    default = qdrift.sample_euler_qdrift(q(), x, sigmas, independent_cal, disable=True)
    v2 = qdrift.sample_euler_qdrift(q(), x, sigmas, independent_cal, disable=True, method="v2")
    paper = qdrift.sample_euler_qdrift(q(), x, sigmas, independent_cal, disable=True, method="paper")
    assert torch.equal(default, v2) and not torch.equal(default, paper)
    table = independent_cal.at(sigmas[:-1])
    assert torch.equal(qdrift.sample_euler_qdrift(q(), x, sigmas, table, disable=True), paper)


@pytest.mark.parametrize("name", sorted(qdrift.SAMPLERS))
def test_v2_at_strength_zero_is_the_plain_sampler(name, independent_cal):
    x = DATA.prior(16, 80.0, generator=torch.Generator().manual_seed(1))
    sigmas = qdrift.get_sigmas_karras(8, 0.002, 80.0).double()
    plain = _run(name, DATA, x, sigmas)
    assert torch.equal(_run(name, DATA, x, sigmas, independent_cal, strength=0.0), plain)


@pytest.mark.parametrize("name", sorted(qdrift.SAMPLERS))
def test_every_sampler_runs_every_method(name, correlated_cal):
    x = DATA.prior(16, 80.0, generator=torch.Generator().manual_seed(1)).float()
    sigmas = qdrift.get_sigmas_karras(6, 0.002, 80.0)
    for method in ("paper", "exact", "correlated", "v2"):
        out = _run(name, PlantedErrorDenoiser(DATA, var=0.2, persistent=0.2, seed=4), x, sigmas, correlated_cal,
                   method=method)
        assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())


def test_bad_method_and_quadrature_outside_the_paper_are_refused(independent_cal):
    x = DATA.prior(4, 80.0, generator=torch.Generator().manual_seed(1))
    sigmas = qdrift.get_sigmas_karras(4, 0.002, 80.0).double()
    with pytest.raises(ValueError, match="method must be one of"):
        qdrift.sample_euler_qdrift(DATA, x, sigmas, independent_cal, disable=True, method="v3")
    with pytest.raises(ValueError, match="method='paper'"):
        qdrift.sample_dpmpp_2m_qdrift(DATA, x, sigmas, independent_cal, disable=True, form="quadrature", method="v2")
    # form="quadrature" is the paper's rule: without a method it selects it.
    out = qdrift.sample_dpmpp_2m_qdrift(DATA, x, sigmas, independent_cal, disable=True, form="quadrature")
    ref = qdrift.sample_dpmpp_2m_qdrift(DATA, x, sigmas, independent_cal, disable=True, form="quadrature",
                                        method="paper")
    assert torch.equal(out, ref)


def test_balance_coefficient_roots_vertex_and_bound():
    # 1 + 2 (-3) c + 2 c^2 = 0: roots (3 -+ sqrt(7)) / 2; the one nearest 0 is taken.
    c = balance_coefficient(torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([2.0]), max_c=1.0)
    assert torch.allclose(c, torch.tensor([(3 - 7**0.5) / 2]))
    # No real root: the vertex -lin / quad.
    c = balance_coefficient(torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([1.0]), max_c=2.0)
    assert torch.allclose(c, torch.tensor([1.0]))
    # Linear only, and the bound.
    assert torch.allclose(balance_coefficient(torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([0.0])),
                          torch.tensor([0.25]))
    assert float(balance_coefficient(torch.tensor([100.0]), torch.tensor([-1.0]), torch.tensor([0.0]),
                                     max_c=0.5)) == 0.5


def test_trajectory_sums_merge_and_pool_like_one_pass():
    gen = torch.Generator().manual_seed(0)
    x, d, q = (torch.randn(3, 6, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    whole = TrajectorySums.of_batch(x, d, q)
    parts = TrajectorySums.of_batch(x[:, :2], d[:, :2], q[:, :2]).merge(TrajectorySums.of_batch(x[:, 2:], d[:, 2:], q[:, 2:]))
    for name, value in whole.tensors().items():
        assert torch.allclose(value, parts.tensors()[name]), name
    # The cross-step covariance of delta is the plain covariance over samples and positions.
    e = (q - d).transpose(1, 2).reshape(3, 2, -1)
    expected = torch.stack([torch.cov(e[:, c], correction=0) for c in range(2)], -1)
    assert torch.allclose(whole.residual_covariance(torch.zeros(3, 2, dtype=torch.float64)), expected)


def test_calibration_keeps_cross_step_correlation(correlated_cal):
    """Half the error persists along the trajectory: the calibrated correlation between steps is about 1/2."""
    rho = correlated_cal.error_correlation(gain=True)
    off = rho[~torch.eye(rho.shape[0], dtype=torch.bool)]
    assert abs(float(off.mean()) - 0.5) < 0.05


def test_file_round_trip_keeps_the_trajectory_and_old_files_fall_back(tmp_path, independent_cal):
    path = tmp_path / "cal.qdrift.safetensors"
    independent_cal.save(path)
    loaded = qdrift.load_calibration(path)
    for name, value in independent_cal.trajectory.tensors().items():
        assert torch.equal(loaded.trajectory.tensors()[name], value)
    x = DATA.prior(32, 80.0, generator=torch.Generator().manual_seed(1))
    sigmas = qdrift.get_sigmas_karras(10, 0.002, 80.0).double()
    q = lambda: PlantedErrorDenoiser(DATA, var=0.1, seed=2)  # noqa: E731
    assert torch.equal(qdrift.sample_euler_qdrift(q(), x, sigmas, loaded, disable=True),
                       qdrift.sample_euler_qdrift(q(), x, sigmas, independent_cal, disable=True))
    # A calibration without trajectory sums (format 1, or a host's paired trace) still corrects, independently,
    # and says so once.
    old = type(independent_cal)(independent_cal.sigmas, independent_cal.moments, meta=dict(independent_cal.meta))
    from qdrift.plan import DriftPlan

    DriftPlan._warned_old = False
    with pytest.warns(UserWarning, match="no cross-step statistics"):
        out = qdrift.sample_euler_qdrift(q(), x, sigmas, old, disable=True)
    assert bool(torch.isfinite(out).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qdrift.sample_euler_qdrift(q(), x, sigmas, old, disable=True)  # once only


def _flow_velocity(x, t, noise=0.0, gen=None):
    """The exact velocity of DATA as a rectified flow (x = (1 - t) x0 + t eps), plus planted noise of variance
    ``noise``."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    mu, sd = (v.reshape((1, -1) + (1,) * (x.ndim - 2)) for v in (DATA.mean, DATA.std))
    a = 1 - t
    x0 = mu + a * sd**2 * (x - a * mu) / (a**2 * sd**2 + t**2)  # E[x0 | x_t]
    v = (x - a * x0) / t.clamp(min=1e-6) - x0
    return v if not noise else v + noise**0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def _flow_quantized(seed):
    from qdrift.adapters import FlowDenoiser

    gen = torch.Generator().manual_seed(seed)
    return FlowDenoiser(lambda x, t: _flow_velocity(x, t, 0.1, gen))


@pytest.fixture(scope="module")
def flow_runs():
    """FP, uncorrected and v2 (along the score, and along the whole step) flow Euler 20 runs, with v2's traces."""
    from qdrift.adapters import FlowDenoiser
    from qdrift.plan import recording

    fp_model = FlowDenoiser(_flow_velocity)
    sigmas = torch.linspace(1, 0, 21).double()
    x = torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cal_x = torch.randn(5, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cal = qdrift.calibrate(fp_model, _flow_quantized(7), cal_x, sigmas, disable=True)
    out = {"fp": qdrift.sample_euler_qdrift(fp_model, x.clone(), sigmas, disable=True),
           "q": qdrift.sample_euler_qdrift(_flow_quantized(1), x.clone(), sigmas, disable=True),
           "paper": qdrift.sample_euler_qdrift(_flow_quantized(1), x.clone(), sigmas, cal, disable=True,
                                               method="paper")}
    for key, flow in (("v2", None), ("v2 whole step", False)):  # None: the FlowDenoiser's is_flow
        with recording() as plans:
            out[key] = qdrift.sample_euler_qdrift(_flow_quantized(1), x.clone(), sigmas, cal, disable=True, flow=flow)
        out[key + " c"] = torch.stack([t["c"] for t in plans[0].trace])
    return out


def test_v2_on_a_flow_model(flow_runs):
    """Rectified flow (sigma = t, x = (1 - t) x0 + t eps) with planted velocity noise: the FP denoiser's slope
    exceeds 1 at low t (x0 = x / (1 - t)); v2 removes most of the excess, the paper's heuristic does not."""
    fp = flow_runs["fp"].var(0)
    excess = float((flow_runs["q"].var(0) - fp).sum())
    left = {m: float((flow_runs[m].var(0) - fp).sum()) for m in ("paper", "v2")}
    assert abs(left["v2"]) < 0.3 * excess, (excess, left)
    assert left["paper"] > 0.5 * excess, (excess, left)


def test_a_flow_drifts_along_the_score(flow_runs):
    """A flow's step grows the signal as it removes noise; where a channel's variance is stationary (data std 1 at
    t = 1/2, 0.5 at t = 1/3) the step barely changes it, and a balance along the whole step can remove the error's
    excess only with c near -1: the channel frozen at its noise level, its samples moved away from FP's. Along the
    score (the drift of Karras' SDE in the scaled coordinates) the step always removes noise: no such c, and the
    samples no farther from FP's than the uncorrected ones."""
    assert float(flow_runs["v2 whole step c"].min()) < -0.5  # the failure this guards against
    assert float(flow_runs["v2 c"].min()) > -0.1, flow_runs["v2 c"].min()
    mse = {k: ((flow_runs[k] - flow_runs["fp"]) ** 2).mean(0) for k in ("q", "v2", "v2 whole step")}
    assert bool((mse["v2"] <= 1.05 * mse["q"]).all()), mse
    assert bool((mse["v2 whole step"] > 1.3 * mse["q"]).any()), mse


def test_the_score_direction_of_a_flow_step():
    """``x + k eps_hat`` with ``eps_hat = (x - (1 - t) D) / t`` and ``k`` the step's change of the noise coefficient:
    from the Euler step ``x + h (x - D) / t`` (``k = h``) and from any single-evaluation step ``A x + B d`` (the DPM++
    SDE solvers' first-order part on a flow: ``k = A t + B - t``); a first-order part of several evaluations, of
    another evaluation or without ``d`` is left as it is."""
    from qdrift.plan import DriftPlan

    gen = torch.Generator().manual_seed(0)
    x, denoised = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    t, t_next = 0.6, 0.45
    h = t_next - t
    d = (x - denoised) / t
    eps_hat = (x - (1 - t) * denoised) / t
    for a_coef, b_coef in ((1.0, h), (0.7, -0.05), (0.55, 0.02)):
        first = a_coef * x + b_coef * d
        k = a_coef * t + b_coef - t  # noise after the step: (A t + B) eps_hat, signal A (1 - t) - B
        score, terms = DriftPlan._score_direction(3, x, first, ((3.0, a_coef, b_coef),), t)
        assert torch.allclose(score, x + k * eps_hat, atol=1e-12)
        assert terms == ((3.0, 1.0 + k, k * (1 - t)),)
    euler = x + h * d
    assert torch.allclose(DriftPlan._score_direction(3, x, euler, ((3.0, 1.0, h),), t)[0],
                          (1 - t) * euler + t_next * x, atol=1e-12)
    for other in (((2.0, 1.0, h),), ((3.0, 1.0, h), (2.0, 0.0, 0.1)), ((3.0, 1.0, 0.0),)):
        assert DriftPlan._score_direction(3, x, euler, other, t) is None



def test_a_first_order_step_to_zero_takes_no_drift_in_a_noisy_run():
    """On the analytic flow with a correlated error the balance of every sampler's last step (t = 0.05 -> 0) asks to
    hold the step back (c = -1: the sample returned at t = 0.05 with its noise, which the variance cannot tell from
    the error it replaces). In a run that injects noise (Euler a, the DPM++ SDE solvers) a first-order step to 0 now
    returns the model's denoised output as the plain sampler does, instead of keeping part of the injected noise in
    the final sample; a deterministic run may still hold its last step back (on the bench DiT that is worth FID), and
    so may LMS's whole four-output extrapolation."""
    from qdrift.bench.analytic import FLOW, FLOW_SDE_START, planted
    from qdrift.plan import recording

    sigmas = torch.linspace(1, 0, 21).double()
    gen = torch.Generator().manual_seed(0)
    x = FLOW.prior(2000, generator=gen)
    cal = qdrift.calibrate(FLOW, planted("correlated", 0.2, 1, data=FLOW), FLOW.prior(5, spatial=(16,), generator=gen),
                           sigmas, disable=True)
    for name in ("euler", "euler_ancestral", "dpmpp_2m", "heun", "lms", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        sig = sigmas.clone()
        if name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
            sig[0] = FLOW_SDE_START
        kw = {"noise_sampler": qdrift.default_noise_sampler(x, seed=3)} if name in STOCHASTIC else {}
        last = []
        with recording() as plans, warnings.catch_warnings():
            warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
            out = qdrift.SAMPLERS[name](planted("correlated", 0.2, 2, data=FLOW), x.clone(), sig, cal, disable=True,
                                        callback=lambda d: last.append(d["denoised"]), **kw)
        step = plans[0].trace[-1]
        assert step["sigma_eff"] == 0.0 and bool((step["excess"] > 0).all()), (name, step)
        if name in STOCHASTIC:
            assert step["c"].tolist() == [0.0] * 3, (name, step["c"])
            assert torch.allclose(out, last[-1], atol=1e-12), name  # the last evaluation's denoised output
        else:
            assert float(step["c"].max()) < -0.04, (name, step["c"])
            assert (name == "lms") != bool(step.get("first_order", torch.ones(3, dtype=torch.bool)).all()), name

def test_the_trace_says_what_excess_the_balance_left():
    """``excess_after`` is the surrogate's corrected variance over FP's after each step (and its noise): about 0
    where the balance is reached, and at the end of an Euler ancestral run on the correlated error, where the
    bounded late steps leave excess, it predicts the excess the samples really end with."""
    from qdrift.plan import recording

    cal = _calibration(var=0.2, persistent=0.2)
    x = DATA.prior(20000, 80.0, generator=torch.Generator().manual_seed(0))
    sigmas = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()
    fp = _run("euler_ancestral", DATA, x, sigmas).var(0)
    with recording() as plans, warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        out = _run("euler_ancestral", PlantedErrorDenoiser(DATA, seed=1, var=0.2, persistent=0.2), x, sigmas, cal,
                   method="v2").var(0)
    trace = plans[0].trace
    assert all(float(t["excess_after"].abs().max()) < 1e-9 for t in trace[:6])  # balanced while it can be
    final, measured = float(trace[-1]["excess_after"].sum()), float((out - fp).sum())
    assert final > 1.0 and abs(final - measured) < 0.15 * final, (final, measured)


# -- the plan's cache: a run's solved steps depend on the calibration, schedule and sampler, never on x -------
def _planted():
    """A fresh planted-error model (it draws its errors from its own generator as it is called)."""
    return PlantedErrorDenoiser(DATA, var=0.2, persistent=0.2, seed=1)


def _fresh(cal):
    """The same statistics in a new Calibration object (no cached plan work)."""
    import copy

    return copy.copy(cal)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_3m_sde"])
def test_cached_plan_replays_bit_for_bit(name, correlated_cal, monkeypatch):
    """A second run with the same calibration and schedule replays the solved steps: equal bit for bit to a run
    that solves them (another x too), and to a run that hits the cache for a prefix and then solves the rest."""
    from qdrift.plan import DriftPlan

    builds = []
    build = DriftPlan._build
    monkeypatch.setattr(DriftPlan, "_build", lambda self: builds.append(1) or build(self))
    sigmas = qdrift.get_sigmas_karras(12, 0.002, 80.0).double()
    x = DATA.prior(64, 80.0, spatial=(4, 4), generator=torch.Generator().manual_seed(0))
    cal = _fresh(correlated_cal)
    first = _run(name, _planted(), x, sigmas, cal)
    assert len(builds) == 1
    assert torch.equal(_run(name, _planted(), x, sigmas, cal), first)
    assert len(builds) == 1  # the second run solved nothing
    other_x = x.flip(0)
    assert torch.equal(_run(name, _planted(), other_x, sigmas, cal), _run(name, _planted(), other_x, sigmas, _fresh(cal)))
    # Same first levels, then another schedule: cached steps, then the surrogate rebuilt from the run's history.
    longer = torch.cat([sigmas[:6], qdrift.get_sigmas_karras(9, 0.002, float(sigmas[6])).double()])
    builds.clear()
    assert torch.equal(_run(name, _planted(), x, longer, cal), _run(name, _planted(), x, longer, _fresh(cal)))
    assert len(builds) == 2  # one rebuild after the shared steps, one fresh run
    assert not torch.equal(_run(name, _planted(), x, sigmas, cal, strength=0.5), first)


def test_cached_plan_follows_a_calibration_changed_in_place(correlated_cal):
    """Changing a calibration's tensors in place (or replacing one) invalidates what was cached for it."""
    sigmas = qdrift.get_sigmas_karras(10, 0.002, 80.0).double()
    x = DATA.prior(32, 80.0, generator=torch.Generator().manual_seed(0))
    cal = _fresh(correlated_cal)
    cal.moments = type(cal.moments)(**{k: v.clone() for k, v in cal.moments.tensors().items()})
    before = _run("euler", _planted(), x, sigmas, cal)
    cal.moments.m2_q.mul_(1.5)  # a larger quantized-output variance: a larger V
    changed = _run("euler", _planted(), x, sigmas, cal)
    assert not torch.equal(changed, before)
    assert torch.equal(changed, _run("euler", _planted(), x, sigmas, _fresh(cal)))
    cal.reduce = "scalar"
    assert torch.equal(_run("euler", _planted(), x, sigmas, cal), _run("euler", _planted(), x, sigmas, _fresh(cal)))


def test_cached_plan_still_warns_when_clipped(correlated_cal):
    """A clipped step warns on every run, also when its solution comes from the cache."""
    sigmas = qdrift.get_sigmas_karras(10, 0.002, 80.0).double()
    x = DATA.prior(8, 80.0, generator=torch.Generator().manual_seed(0))
    cal = _fresh(correlated_cal)
    for _ in range(2):
        with pytest.warns(qdrift.DriftClippedWarning):
            _run("euler", _planted(), x, sigmas, cal, strength=400.0)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_v2_never_scales_a_step_past_noise_level_zero(name, correlated_cal):
    """A step scaled by (1 + c) is a step to sigma + (1 + c)(sigma_eff - sigma): v2's c stops where that reaches 0
    (past it the step would put noise back), so a few long steps (a turbo schedule) cannot overshoot."""
    from qdrift.plan import recording

    sigmas = torch.tensor([80.0, 3.0, 0.45, 0.03, 0.0], dtype=torch.float64)
    x = DATA.prior(64, 80.0, generator=torch.Generator().manual_seed(0))
    with recording() as plans, warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        _run(name, _planted(), x, sigmas, correlated_cal, strength=4.0)
    trace = plans[0].trace
    assert len(trace) == 4
    for t in trace:
        bound = t["sigma_eff"] / (t["sigma"] - t["sigma_eff"])
        assert float(t["c"].max()) <= bound + 1e-12, t
    assert float(trace[-1]["c"].max()) <= 0.0


class _Binary:
    """Exact denoiser of data x0 = +-1 (equally likely, independent per position), VE: D = tanh(x / sigma^2)."""

    def __call__(self, x, sigma, **kwargs):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.tanh(x / s**2)


class _ContrastError:
    """The binary denoiser with a planted error in the denoised output: D_q = (1 + g) D + c + noise."""

    def __init__(self, g=0.15, c=-0.05, std=0.02, seed=0):
        self.g, self.c, self.std, self.gen = g, c, std, torch.Generator().manual_seed(seed)

    def __call__(self, x, sigma, **kwargs):
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return (1 + self.g) * _Binary()(x, sigma) + self.c + self.std * noise


def _binary_prior(n, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 2, (n, 1, 8, 8), generator=gen).double() * 2 - 1
    return x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


def test_the_state_term_recovers_a_contrast_error_and_old_statistics_fall_back():
    """A contrast error of the denoised output, ``D_q = 1.15 D + c``, is ``delta = 0.15 (d - x / sigma) - c /
    sigma`` in ``d``: the error model finds ``k = 0.15, j = -0.15`` where the data determine them, and v2 with it
    brings the non-Gaussian sample's mean and variance back; without the state cross sums (statistics of format 2)
    the model is the former ``delta = k d + b`` and does not."""
    sigmas = qdrift.get_sigmas_karras(20, 0.02, 10.0).double()
    cal = qdrift.calibrate(_Binary(), _ContrastError(), _binary_prior(16, 10.0, 1), sigmas, disable=True)
    em = cal.error_model(cal.sigmas, gain=True)
    mid = (cal.sigmas > 0.3) & (cal.sigmas < 3.0)
    assert torch.allclose(em["j"][mid], torch.full_like(em["j"][mid], -0.15), atol=0.03), em["j"][:, 0]
    assert torch.allclose(em["k"][mid], torch.full_like(em["k"][mid], 0.15), atol=0.03), em["k"][:, 0]
    t = cal.trajectory
    old = type(cal)(cal.sigmas, cal.moments, meta=dict(cal.meta), trajectory=TrajectorySums(
        **{f: getattr(t, f) for f in _TRAJ_FIELDS}))
    assert float(old.error_model(old.sigmas, gain=True)["j"].abs().max()) == 0.0
    x = _binary_prior(4000, 10.0, 2)
    fp = qdrift.sample_euler_qdrift(_Binary(), x, sigmas, disable=True)
    plain = qdrift.sample_euler_qdrift(_ContrastError(seed=3), x, sigmas, disable=True)
    new = qdrift.sample_euler_qdrift(_ContrastError(seed=3), x, sigmas, cal, disable=True)
    former = qdrift.sample_euler_qdrift(_ContrastError(seed=3), x, sigmas, old, disable=True)
    mse = lambda out: float(((out - fp) ** 2).mean())  # noqa: E731
    var_err = lambda out: abs(float(out.var() / fp.var()) - 1)  # noqa: E731
    assert mse(new) < 0.25 * mse(plain) and mse(new) < 0.5 * mse(former), (mse(plain), mse(former), mse(new))
    assert var_err(new) < 0.02 < var_err(plain), (var_err(plain), var_err(former), var_err(new))
    # Per frequency band: the state term acts on each band of x / sigma.
    banded = qdrift.calibrate(_Binary(), _ContrastError(), _binary_prior(16, 10.0, 1), sigmas, disable=True, bands=2)
    per_band = qdrift.sample_euler_qdrift(_ContrastError(seed=3), x, sigmas, banded, disable=True)
    assert var_err(per_band) < 0.02 and mse(per_band) < 0.5 * mse(plain), (var_err(per_band), mse(per_band))


def test_residual_covariance_with_a_state_term_is_that_of_the_explicit_residual():
    gen = torch.Generator().manual_seed(0)
    x, d, q = (torch.randn(3, 6, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sums = TrajectorySums.of_batch(x, d, q)
    k, s = torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)
    flat = lambda t: t.transpose(1, 2).reshape(3, 2, -1)  # noqa: E731  [S, C, P]
    r = flat(q - d) - k[..., None] * flat(d) - s[..., None] * flat(x)
    expected = torch.stack([torch.cov(r[:, c], correction=0) for c in range(2)], -1)
    assert torch.allclose(sums.residual_covariance(k, s), expected)
    with pytest.raises(ValueError, match="all of"):
        TrajectorySums(**{**sums.tensors(), "cross_xe": None})


class _PlantedState:
    """The binary denoiser with a planted error in ``d``: ``delta = K d + J x / sigma + std * noise``."""

    def __init__(self, K, J, std=0.05, seed=0):
        self.K, self.J, self.std, self.gen = K, J, std, torch.Generator().manual_seed(seed)

    def __call__(self, x, sigma, **kwargs):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        D = _Binary()(x, sigma)
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return D - s * (self.K * (x - D) / s + self.J * x / s + self.std * noise)


@pytest.mark.parametrize("K,J", [(1.4, -0.3), (0.2, 0.9), (-0.7, 0.1), (0.1, -0.2)])
def test_the_bounded_state_fit_is_the_least_squares_fit_in_the_box_and_never_worse_than_the_split(K, J):
    """Where ``d_fp`` and ``x / sigma`` are nearly collinear (high noise) and the planted gains lie outside the
    bounds (``1 + k`` in [1/2, 2], ``|j| <= 1/2``), the fitted ``(k, j)`` is the least-squares optimum within the
    bounds (checked against a grid), and the state model never leaves a larger ``V`` than the split
    ``delta = k d + b`` on the same statistics; inside the bounds the planted gains are recovered."""
    sigmas = torch.tensor([5.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    cal = qdrift.calibrate(_Binary(), _PlantedState(K, J), _binary_prior(16, 5.0, 1), sigmas, disable=True)
    em = cal.error_model(cal.sigmas, gain=True)
    t = cal.trajectory
    split = type(cal)(cal.sigmas, cal.moments, meta=dict(cal.meta), trajectory=TrajectorySums(
        **{f: getattr(t, f) for f in _TRAJ_FIELDS})).error_model(cal.sigmas, gain=True)
    mo = t.step_moments()
    s = cal.sigmas[:, None]
    sdd, suu, sdu, sed, seu, see = mo["dd"], mo["xx"] / s**2, mo["xd"] / s, mo["de"], mo["xe"] / s, mo["ee"]

    def resid(i, k, j):  # residual variance of delta - k d - j x / sigma at step i
        return (see[i, 0] - 2 * k * sed[i, 0] - 2 * j * seu[i, 0] + k**2 * sdd[i, 0] + 2 * k * j * sdu[i, 0]
                + j**2 * suu[i, 0])

    kg, jg = torch.meshgrid(torch.linspace(-0.5, 1.0, 301, dtype=torch.float64),
                            torch.linspace(-0.5, 0.5, 201, dtype=torch.float64), indexing="ij")
    state = em["j"][:, 0] != 0
    assert bool(state.any()), em
    for i in torch.nonzero(state)[:, 0].tolist():
        k, j = em["k"][i, 0], em["j"][i, 0]
        assert -0.5 <= float(k) <= 1.0 and abs(float(j)) <= 0.5
        # k = 0 where the data do not show a gain: then j is the best one alone
        best = resid(i, kg, jg).min() if k != 0 else resid(i, 0.0, jg[0]).min()
        assert float(resid(i, k, j)) <= float(best) + 1e-9 * float(see[i, 0]), (i, float(k), float(j))
        assert torch.isclose(em["V"][i, 0], resid(i, k, j) / (1 + k) ** 2)
        assert float(em["V"][i, 0]) < float(resid(i, split["k"][i, 0], 0.0) / (1 + split["k"][i, 0]) ** 2)
    for key in ("k", "b", "V"):  # where the state term is not used, the model is the split's
        assert torch.equal(em[key][~state], split[key][~state]), key
    if (K, J) == (0.1, -0.2):
        assert bool(state[1:].all())
        assert torch.allclose(em["k"][1:, 0], torch.full((2,), K, dtype=torch.float64), atol=0.02), em["k"]
        assert torch.allclose(em["j"][1:, 0], torch.full((2,), J, dtype=torch.float64), atol=0.02), em["j"]


def test_a_version_2_file_loads_without_the_state_term_and_merging_it_says_what_is_lost(tmp_path):
    """A file of format version 2 (trajectory sums without the state cross sums) loads with ``j = 0`` and the
    split ``delta = k d + b``; a version-3 file keeps the state term. Merging calibrations of which only one
    has the state cross sums (or the trajectory sums) drops them from the result, and says so."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    sigmas = qdrift.get_sigmas_karras(10, 0.02, 10.0).double()
    cal = qdrift.calibrate(_Binary(), _ContrastError(), _binary_prior(8, 10.0, 1), sigmas, disable=True, bands=1)
    path, old_path = tmp_path / "v3.qdrift.safetensors", tmp_path / "v2.qdrift.safetensors"
    cal.save(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["qdrift"])
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if not k.startswith("traj_cross_")}
    assert header["format_version"] == 3 and len(tensors) == len(keys) - 3
    save_file(tensors, str(old_path), metadata={"qdrift": json.dumps({**header, "format_version": 2})})
    new, old = qdrift.load_calibration(path), qdrift.load_calibration(old_path)
    assert old.trajectory is not None and old.trajectory.cross_xe is None
    em_new, em_old = new.error_model(new.sigmas, gain=True), old.error_model(old.sigmas, gain=True)
    assert torch.equal(em_new["j"], cal.error_model(cal.sigmas, gain=True)["j"]) and bool((em_new["j"] != 0).any())
    assert float(em_old["j"].abs().max()) == 0.0 and bool((em_old["k"] != em_new["k"]).any())
    x = _binary_prior(16, 10.0, 2)
    outs = [qdrift.sample_euler_qdrift(_ContrastError(seed=3), x, sigmas, c, disable=True) for c in (new, old)]
    assert all(bool(torch.isfinite(o).all()) for o in outs) and not torch.equal(*outs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert new.merge(new).trajectory.cross_xe is not None  # nothing lost: no warning
    with pytest.warns(UserWarning, match="only one .* state cross sums"):
        assert new.merge(old).trajectory.cross_xe is None
    bare = type(cal)(cal.sigmas, cal.moments, meta=dict(cal.meta))
    with pytest.warns(UserWarning, match="only one .* trajectory sums"):
        assert bare.merge(new).trajectory is None


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "lms"])
def test_a_last_step_to_zero_is_not_reported_as_clipped(name, independent_cal):
    """A step to level 0 takes no drift (past 0 it would put noise back), however large a ``c`` its balance asks
    for: that bound is the step's nature, so a turbo schedule with a matching calibration does not warn that the
    calibration may be wrong (the limit ``|c| <= 1`` still warns where it binds: test_cached_plan_still_warns_when_clipped)."""
    from qdrift.plan import recording

    sigmas = torch.tensor([80.0, 3.0, 0.45, 0.03, 0.0], dtype=torch.float64)
    x = DATA.prior(64, 80.0, generator=torch.Generator().manual_seed(0))
    model = PlantedErrorDenoiser(DATA, seed=1, var=0.1)
    with recording() as plans, warnings.catch_warnings():
        warnings.simplefilter("error", qdrift.DriftClippedWarning)
        _run(name, model, x, sigmas, independent_cal)
    last = plans[0].trace[-1]
    assert last["sigma_eff"] == 0.0 and torch.equal(last["c"], torch.zeros_like(last["c"]))


def test_a_clipped_run_warns_with_one_text(correlated_cal):
    """One message text for every clipped step, so Python's default filter shows it once per call site, as the
    README says (it used to name the step, and a run showed one warning per clipped step)."""
    sigmas = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()
    x = DATA.prior(8, 80.0, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run("euler", PlantedErrorDenoiser(DATA, seed=1, var=0.2, persistent=0.2), x, sigmas, _fresh(correlated_cal))
    texts = {str(w.message) for w in caught if w.category is qdrift.DriftClippedWarning}
    assert len([w for w in caught if w.category is qdrift.DriftClippedWarning]) > 1 and len(texts) == 1, texts
    assert "sample_euler_qdrift" in texts.pop()


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m"])
def test_a_large_strength_keeps_the_gain_removal_within_its_bounds(name):
    """The output's gain is removed as ``/ (1 + strength k)``; with a calibrated ``k = -1/2`` (the bound) a
    strength of 2 divided by 0 (NaN, blamed on the input) and above 2 flipped the output's sign. ``1 + k`` now
    stays within the calibration's bounds at any strength, and the correction grows with the strength."""
    def fp(x, s, **k):
        return x / (1 + s.view(-1, *[1] * (x.ndim - 1)) ** 2)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    sig = qdrift.get_sigmas_karras(5, 0.03, 10.0)
    cal = qdrift.calibrate(fp, lambda x, s, **k: 1.05 * fp(x, s) + 0.01 * torch.randn(x.shape, generator=g), x, sig,
                           disable=True)
    assert float(cal.error_model(cal.sigmas, gain=True)["k"].min()) == -0.5
    plain = qdrift.SAMPLERS[name](fp, x[:2], sig, disable=True)
    change = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        for strength in (1.0, 2.0, 3.0):
            out = qdrift.SAMPLERS[name](fp, x[:2], sig, cal, strength=strength, disable=True)
            assert bool(torch.isfinite(out).all())
            change.append(float((out - plain).abs().max()))
    assert change[0] < change[1] < change[2] < 10 * change[0], change


def test_the_analytic_flow_table():
    """``qdrift analytic --flow`` (docs/analytic_gaussian_flow_20_*.md): on the Gaussian as a rectified flow with a
    correlated velocity error, the paper's rule *adds* variance (it scales the whole flow step, which grows the
    signal), v2 along the score removes over 70 % of the excess (the issue's target for a correlated error) on every
    sampler (the DPM++ SDE solvers from t = 1 - 1e-4), and the whole-step column exists only where ``flow=False``
    changes nothing but the drift's direction (the deterministic samplers)."""
    from qdrift.bench.analytic import measure_flow

    table = measure_flow(4000, 20, 0.2, 5, "correlated")
    assert list(table) == list(qdrift.SAMPLERS)
    for name, row in table.items():
        assert row["quantized vs FP"][0] > 10, (name, row)
        assert row["paper"][0] < 0 and 70 < row["v2"][0] < 110, (name, row)
        assert ("v2, whole step" in row) == (name not in STOCHASTIC), (name, row)
