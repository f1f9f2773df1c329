"""Each baseline's formulas against their exact answers on the analytic Gaussian (exact moments, no sampling)."""

import pytest
import torch

from qdrift.baselines import (
    BASELINES,
    D2DPM,
    PTQD,
    QNCD,
    TAC,
    JointMoments,
    QDriftGain,
    d2dpm_conditional,
    fit_tac_gain,
    is_stochastic_sampler,
    lookup_moments,
    make_baseline,
    ptqd_gain_bias,
    tac_gain_from_moments,
)
from qdrift._utils import get_sigmas_karras
from qdrift.bench.gaussian import AnalyticCalibration, GaussianData, PlantedErrorDenoiser

torch.set_num_threads(1)

DATA = GaussianData([0.5, -0.5], [0.5, 1.0])
SIGMAS = torch.tensor([40.0, 5.0, 1.0, 0.3, 0.05], dtype=torch.float64)


def planted(**kw):
    return PlantedErrorDenoiser(DATA, seed=5, **kw)


def exact(**kw):
    p = planted(**kw)
    return p, AnalyticCalibration(p), lookup_moments(AnalyticCalibration(p), SIGMAS)


def noisy_x(sigma: float, n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return DATA.prior(n, sigma, spatial=(3, 3), generator=gen)


# -- moments ---------------------------------------------------------------------------------------------


def test_pooled_moments_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, -2.0])
    q = 1.3 * f + torch.randn(4000, 3, generator=gen, dtype=torch.float64) * 0.4 + torch.tensor([0.1, -0.3, 0.2])

    def pop(a, b):
        return ((a - a.mean(0)) * (b - b.mean(0))).mean(0)

    m = JointMoments(f.mean(0)[None], q.mean(0)[None], pop(f, f)[None], pop(q, q)[None], pop(f, q)[None])
    p = m.pooled()
    ff, qq = f.reshape(-1), q.reshape(-1)
    assert torch.allclose(p.mean_fp, ff.mean().reshape(1, 1))
    assert torch.allclose(p.var_fp, pop(ff, ff).reshape(1, 1))
    assert torch.allclose(p.var_q, pop(qq, qq).reshape(1, 1))
    assert torch.allclose(p.cov, pop(ff, qq).reshape(1, 1))
    # the derived error moments follow from delta = q - f
    dd = q - f
    assert torch.allclose(m.var_delta[0], pop(dd, dd))
    assert torch.allclose(m.cov_delta_q[0], pop(dd, q))
    assert torch.allclose(m.cov_delta_fp[0], pop(dd, f))
    # PTQD's regression of delta on d, per channel, equals least squares on the samples (nonzero E[d] here)
    k, b, var_r = ptqd_gain_bias(m, per_channel=True, clip_negative=False)
    k_ls = pop(dd, f) / pop(f, f)
    r = dd - k_ls * f
    assert torch.allclose(k[0], k_ls)
    assert torch.allclose(b[0], r.mean(0))
    assert torch.allclose(var_r[0], pop(r, r))


def test_conditional_var_matches_planted_closed_form():
    _, cal, m = exact(gain=0.3, var=0.2)
    assert torch.allclose(m.conditional_variance().float(), cal.at(SIGMAS), rtol=1e-5)


# -- PTQD and Q-Drift + gain ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_ptqd_recovers_planted_gain_bias_and_residual(per_channel):
    _, _, m = exact(gain=0.3, bias=[0.1, -0.2], var=0.04)
    k, b, var_r = ptqd_gain_bias(m, per_channel=per_channel)
    assert torch.allclose(k, torch.full_like(k, 0.3))
    assert torch.allclose(b, torch.tensor([[0.1, -0.2]], dtype=torch.float64).expand_as(b))
    assert torch.allclose(var_r, torch.full_like(var_r, 0.04))


def test_ptqd_clips_negative_gain():
    _, _, m = exact(gain=-0.2)
    k, _, _ = ptqd_gain_bias(m)
    assert bool((k == 0).all())
    k, _, _ = ptqd_gain_bias(m, clip_negative=False)
    assert torch.allclose(k, torch.full_like(k, -0.2))


def test_ptqd_and_gain_wrappers_return_the_exact_denoiser_without_noise():
    p, cal, _ = exact(gain=0.4, bias=[0.05, -0.1])
    for wrapper in (PTQD(p, cal), QDriftGain(p, cal)):
        for sigma in (30.0, 2.0, 0.1):
            x = noisy_x(sigma)
            s = torch.full([x.shape[0]], sigma, dtype=torch.float64)
            assert torch.allclose(wrapper(x, s), DATA.denoiser(x, s), atol=1e-10)


def test_ptqd_noise_table_is_residual_over_gain_squared():
    p, cal, _ = exact(gain=0.25, var=0.09)
    table = PTQD(p, cal).noise_table(torch.cat([SIGMAS, SIGMAS.new_zeros(1)]))
    assert table.shape == (len(SIGMAS), 2)
    assert torch.allclose(table, torch.full_like(table, 0.09 / 1.25**2))


def test_qdrift_gain_table_is_conditional_variance_of_what_is_left():
    p, cal, m = exact(gain=0.25, var=0.09)
    table = QDriftGain(p, cal).drift_table(torch.cat([SIGMAS, SIGMAS.new_zeros(1)]))
    v_left = 0.09 / 1.25**2  # after dividing by 1 + k, the output is d + noise of this variance
    expected = v_left * m.var_fp / (m.var_fp + v_left)
    assert torch.allclose(table.double(), expected, rtol=1e-5)
    # plain Q-Drift's V on the same model is larger: it also counts the gain's share of the error
    assert bool((torch.as_tensor(cal.at(SIGMAS)) >= table).all())


# -- D2-DPM ------------------------------------------------------------------------------------------------


def test_d2dpm_conditional_on_pure_noise():
    _, cal, m = exact(var=0.16)
    slope, mu_delta, _, var_cond = d2dpm_conditional(m)
    assert torch.allclose(slope, 0.16 / (m.var_fp + 0.16))  # E[delta | d_hat] = slope * d_hat (Wiener)
    assert torch.allclose(mu_delta, torch.zeros_like(mu_delta))
    assert torch.allclose(var_cond.float(), cal.at(SIGMAS), rtol=1e-5)


def test_d2dpm_removes_a_pure_gain_and_bias():
    p, cal, _ = exact(gain=0.3, bias=[0.2, -0.1])
    wrapper = D2DPM(p, cal)
    x = noisy_x(1.0)
    s = torch.ones(x.shape[0], dtype=torch.float64)
    # rho is clipped at 0.9999, so the correction is exact up to about 1e-4 of the error
    assert torch.allclose(wrapper(x, s), DATA.denoiser(x, s), atol=1e-3)
    assert not torch.allclose(p(x, s), DATA.denoiser(x, s), atol=1e-2)


def test_d2dpm_stochastic_is_reproducible_and_adds_conditional_noise():
    p, cal, _ = exact(var=0.25)
    x = noisy_x(1.0, n=2000)
    s = torch.ones(x.shape[0], dtype=torch.float64)
    det, sto = D2DPM(p, cal), D2DPM(p, cal, stochastic=True, seed=3)
    p.generator.manual_seed(5)
    a = sto(x, s)
    p.generator.manual_seed(5)
    sto.reset()
    assert torch.equal(sto(x, s), a)
    p.generator.manual_seed(5)
    c = det(x, s)
    # same planted draw: the outputs differ by sigma * sigma_cond * z with z ~ N(0, 1)
    _, _, _, var_cond = d2dpm_conditional(lookup_moments(cal, torch.tensor([1.0])))
    measured = (a - c).transpose(0, 1).reshape(2, -1).var(1)
    assert torch.allclose(measured, var_cond[0], rtol=0.1)


# -- TAC -------------------------------------------------------------------------------------------------


def test_tac_gain_from_moments_is_mse_optimal():
    _, _, m = exact(gain=0.2, var=0.1)
    K = tac_gain_from_moments(m)
    assert torch.allclose(K, 1.2 * m.var_fp / (1.44 * m.var_fp + 0.1))


def test_fit_tac_gain_relative_error_inverts_a_pure_gain():
    p = planted(gain=0.5)
    sigmas = get_sigmas_karras(6, 0.1, 20.0).double()
    x = torch.randn(32, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    for lam in (0.0, 0.5, 1.0):
        gain = fit_tac_gain(DATA.denoiser, p, x, sigmas, lam=lam)
        assert gain.K.shape == (6, 2)
        assert torch.allclose(gain.K, torch.full_like(gain.K, 1 / 1.5))
    wrapper = TAC(p, gain=gain)
    xs = noisy_x(3.0)
    s = torch.full([xs.shape[0]], 3.0, dtype=torch.float64)
    assert torch.allclose(wrapper(xs, s), DATA.denoiser(xs, s), atol=1e-10)


def test_fit_tac_gain_mixes_toward_the_relative_error_optimum():
    p = planted(var=0.2)
    sigmas = get_sigmas_karras(4, 0.5, 10.0).double()
    x = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    k0 = fit_tac_gain(DATA.denoiser, planted(var=0.2), x, sigmas, lam=0.0).K
    k1 = fit_tac_gain(DATA.denoiser, planted(var=0.2), x, sigmas, lam=1.0).K
    km = fit_tac_gain(DATA.denoiser, planted(var=0.2), x, sigmas, lam=0.5).K
    assert bool((k0 < 1).all())  # MSE shrinks a noisy estimate
    lo, hi = torch.minimum(k0, k1), torch.maximum(k0, k1)
    assert bool(((km >= lo - 1e-9) & (km <= hi + 1e-9)).all())


# -- QNCD ------------------------------------------------------------------------------------------------


def test_qncd_estimate_measures_a_uniform_bias_on_the_exact_marginal():
    w = QNCD(planted(bias=0.08), interval=3, seed=0)
    gen = torch.Generator().manual_seed(2)
    for sigma in (20.0, 5.0):  # the second level is a new step: re-noise to 20 and measure
        x = DATA.prior(512, sigma, spatial=(4, 4), generator=gen)
        w(x, torch.full([512], sigma, dtype=torch.float64))
    assert w.extra_calls == 1
    assert abs(float(w.estimate.flatten()[0]) - 0.08) < 0.005


def test_qncd_one_extra_call_per_interval_and_reset_on_a_new_run():
    p = planted(bias=0.08)
    w = QNCD(p, interval=3, seed=0)
    sigmas = get_sigmas_karras(10, 0.05, 20.0).double()
    x = DATA.prior(64, 20.0, spatial=(2, 2), generator=torch.Generator().manual_seed(2))
    s_in = x.new_ones([x.shape[0]])
    for i in range(10):
        den = w(x, sigmas[i] * s_in)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - den) / sigmas[i]
    assert w.extra_calls == 3  # steps 1, 4, 7
    w(x, 20.0 * s_in)  # a higher sigma starts a new run
    assert w.extra_calls == 0 and w.estimate is None


def test_qncd_reduce_channel_sees_each_bias():
    p = planted(bias=[0.1, -0.05])
    w = QNCD(p, interval=1, reduce="channel", seed=0)
    gen = torch.Generator().manual_seed(2)
    for sigma in (20.0, 5.0):
        x = DATA.prior(512, sigma, spatial=(4, 4), generator=gen)
        w(x, torch.full([512], sigma, dtype=torch.float64))
    assert torch.allclose(w.estimate.flatten(), torch.tensor([0.1, -0.05], dtype=torch.float64), atol=0.01)


# -- registry, sampler options, validation ------------------------------------------------------------------


def test_registry_builds_every_method_and_keeps_shape():
    p, cal, _ = exact(gain=0.1, bias=0.05, var=0.04)
    x = noisy_x(2.0, n=4)
    s = torch.full([4], 2.0, dtype=torch.float64)
    assert set(BASELINES) == {"none", "qdrift", "d2dpm", "d2dpm_stochastic", "ptqd", "tac", "qncd", "qdrift_gain"}
    for name in BASELINES:
        out = make_baseline(name, p, cal)(x, s)
        assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())


def test_sampler_kwargs_per_method_and_sampler_kind():
    p, cal, _ = exact(gain=0.1, var=0.04)
    sig = torch.cat([SIGMAS, SIGMAS.new_zeros(1)])
    expect = {  # (deterministic sampler keys, stochastic sampler keys)
        "none": ((), ()),
        "qdrift": (("V",), ("V",)),
        "d2dpm": ((), ("V", "correction")),
        "d2dpm_stochastic": ((), ()),
        "ptqd": ((), ("V", "correction")),
        "tac": ((), ()),
        "qncd": ((), ()),
        "qdrift_gain": (("V",), ("V",)),
    }
    assert is_stochastic_sampler("dpmpp_2m_sde") and not is_stochastic_sampler("heun")
    for name, (det, sto) in expect.items():
        w = make_baseline(name, p, cal)
        kd, ks = w.sampler_kwargs("euler", sig), w.sampler_kwargs("euler_ancestral", sig)
        assert tuple(kd) == det and tuple(ks) == sto, name
        for kw in (kd, ks):
            if "V" in kw:
                assert kw["V"].shape == (len(SIGMAS), 2) and bool((kw["V"] >= 0).all())
            if "correction" in kw:
                assert kw["correction"] == "noise"
    assert make_baseline("qdrift_gain", p, cal, correction="noise").sampler_kwargs("dpmpp_2m_sde", sig)["correction"] == "noise"


def test_wrapper_reads_other_attributes_from_the_inner_denoiser():
    p, cal, _ = exact()
    p.sigma_min = 0.01
    assert make_baseline("ptqd", p, cal).sigma_min == 0.01
    with pytest.raises(AttributeError):
        make_baseline("ptqd", p, cal).no_such_attribute


@pytest.mark.parametrize(
    "call",
    [
        lambda p, cal: make_baseline("nope", p, cal),
        lambda p, cal: make_baseline("ptqd", p, cal, no_such_option=1),
        lambda p, cal: make_baseline("ptqd", p, None),
        lambda p, cal: make_baseline("ptqd", "not callable", cal),
        lambda p, cal: make_baseline("d2dpm", p, cal, rho_clip=0.0),
        lambda p, cal: make_baseline("qncd", p, None, interval=0),
        lambda p, cal: make_baseline("qncd", p, None, reduce="pixel"),
        lambda p, cal: make_baseline("qdrift", p, cal, correction="both"),
        lambda p, cal: make_baseline("tac", p, cal, gain=torch.ones(3, 2)),
        lambda p, cal: make_baseline("ptqd", p, cal)(torch.zeros(2, 3, 4), torch.ones(2)),  # 3 channels vs 2
        lambda p, cal: make_baseline("ptqd", p, cal)(torch.zeros(2, 2, 4), torch.ones(3)),  # sigma batch
        lambda p, cal: make_baseline("ptqd", p, cal)(torch.zeros(2), torch.ones(2)),  # no channel axis
        lambda p, cal: make_baseline("ptqd", p, cal).sampler_kwargs("no_such_sampler", torch.tensor([1.0, 0.0])),
        lambda p, cal: make_baseline("ptqd", p, cal).sampler_kwargs("euler", torch.tensor([1.0])),
        lambda p, cal: fit_tac_gain(DATA.denoiser, p, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), lam=2.0),
    ],
)
def test_bad_input_raises_value_error(call):
    p, cal, _ = exact(gain=0.1)
    with pytest.raises(ValueError):
        call(p, cal)


# -- properties ------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_pos = st.floats(0.0, 100.0, allow_nan=False)
_real = st.floats(-10.0, 10.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(vf=_pos, vq=_pos, rho=st.floats(-1.0, 1.0), mf=_real, mq=_real, d_hat=_real)
def test_corrections_stay_finite_for_any_valid_moments(vf, vq, rho, mf, mq, d_hat):
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    m = JointMoments(t(mf), t(mq), t(vf), t(vq), t(rho * (vf * vq) ** 0.5))
    slope, mu_delta, mu_hat, var_cond = d2dpm_conditional(m)
    k, b, var_r = ptqd_gain_bias(m)
    a = 1 / (1 + k)
    left = m.affine(a, -b * a).conditional_variance()
    for v in (slope, mu_delta, mu_hat, var_cond, k, b, var_r, left, m.conditional_variance(), tac_gain_from_moments(m)):
        assert bool(torch.isfinite(v).all())
    for v in (var_cond, var_r, left, m.conditional_variance()):
        assert bool((v >= 0).all())
    assert bool((k >= 0).all())
    assert bool(torch.isfinite(mu_delta + slope * (d_hat - mu_hat)).all())
