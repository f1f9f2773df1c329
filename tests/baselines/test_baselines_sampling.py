"""Every baseline through real qdrift samplers on the analytic Gaussian: final sample vs the exact data law.

The issue's experiment: with a planted gain (``d_hat = (1 + k) d + noise``, ``k > 0``) the quantized sample is
under-dispersed, and variance-only Q-Drift cannot fix it (its ``(1 + c)``, ``c >= 0``, lengthens steps, which
shrinks the sample further), while a gain correction can; with pure planted noise Q-Drift (and the
noise-lowering methods on stochastic samplers) moves the result back toward the full-precision sampler's.
"""

import pytest
import torch

import qdrift
from qdrift._utils import default_noise_sampler, get_sigmas_karras
from qdrift.baselines import make_baseline, ptqd_gain_bias, lookup_moments
from qdrift.bench.gaussian import AnalyticCalibration, GaussianData, PlantedErrorDenoiser, channel_stats
from qdrift.samplers import SAMPLERS

torch.set_num_threads(1)

DATA = GaussianData([0.5, -0.5], [0.5, 1.0])
SIGMAS = get_sigmas_karras(32, 0.02, 80.0).double()
N = 256  # x 2 channels x 4 x 4: variance error resolution about 1.5 %


def run(method, sampler, *, calibration="analytic", opts=None, **planted):
    """Final ``(dmean, dvar %)`` against N(mu, s^2), from the same initial noise for every method."""
    x = DATA.prior(N, float(SIGMAS[0]), spatial=(4, 4), generator=torch.Generator().manual_seed(0))
    fn = SAMPLERS[sampler]
    kwargs = {"disable": True}
    if sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        kwargs["noise_sampler"] = default_noise_sampler(x, seed=1)
    if method == "fp":
        model = DATA.denoiser
    else:
        p = PlantedErrorDenoiser(DATA, seed=7, **planted)
        cal = AnalyticCalibration(PlantedErrorDenoiser(DATA, **planted)) if calibration == "analytic" else calibration
        opts = dict(opts or {}, **({"seed": 3} if method in ("qncd", "d2dpm_stochastic") else {}))
        model = make_baseline(method, p, cal, **opts)
        kwargs.update(model.sampler_kwargs(sampler, SIGMAS))
    mean, var = channel_stats(fn(model, x, SIGMAS, **kwargs))
    return float(((mean - DATA.mean) ** 2).mean().sqrt()), float((var / DATA.std**2 - 1).mean()) * 100


GAIN = dict(gain=0.25, var=0.2**2)
NOISE = dict(var=0.5**2)
BIAS = dict(bias=[0.06, 0.02])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_gain_case_variance_only_qdrift_cannot_fix_but_gain_correction_does(sampler):
    _, fp = run("fp", sampler)
    _, none = run("none", sampler, **GAIN)
    _, qd = run("qdrift", sampler, **GAIN)
    _, ptqd = run("ptqd", sampler, **GAIN)
    _, both = run("qdrift_gain", sampler, **GAIN)
    assert none < fp - 20  # the gain makes the quantized sample under-dispersed
    assert qd <= none + 1.0  # Q-Drift only lengthens steps: no better (slightly worse)
    assert abs(ptqd - fp) < 6  # dividing out the gain restores it
    assert abs(both - fp) < 4


def test_gain_case_conditional_mean_methods_overshoot():
    """D2-DPM's E[delta | d_hat] and TAC's MSE gain shrink d_hat (Wiener), so they over-disperse here."""
    _, fp = run("fp", "euler")
    for method in ("d2dpm", "d2dpm_stochastic", "tac"):
        _, dvar = run(method, "euler", **GAIN)
        assert dvar > fp + 20, method


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_pure_noise_qdrift_and_gain_variant_restore_the_fp_marginal(sampler):
    _, fp = run("fp", sampler)
    _, none = run("none", sampler, **NOISE)
    assert none > fp + 6  # planted conditional noise over-disperses
    for method in ("qdrift", "qdrift_gain"):
        _, dvar = run(method, sampler, **NOISE)
        assert abs(dvar - fp) < 0.6 * (none - fp), method
    _, ptqd = run("ptqd", sampler, **NOISE)
    assert abs(ptqd - none) < 0.5  # no gain, no bias: PTQD leaves an ODE sampler alone


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_pure_noise_on_stochastic_samplers_noise_lowering_helps(sampler):
    _, fp = run("fp", sampler)
    _, none = run("none", sampler, **NOISE)
    assert none > fp + 6
    for method, opts in (("ptqd", {}), ("qdrift", {"correction": "noise"}), ("qdrift", {})):
        _, dvar = run(method, sampler, opts=opts, **NOISE)
        assert fp - 10 < dvar < none - 0.3 * (none - fp), (method, opts)
    # D2-DPM's conditional-mean shrinkage dominates its noise lowering: it over-disperses even more
    assert run("d2dpm", sampler, **NOISE)[1] > none


def test_bias_case_mean_is_fixed_by_mean_correcting_methods():
    fp, _ = run("fp", "heun")
    none, _ = run("none", "heun", **BIAS)
    assert none > 0.1
    for method in ("d2dpm", "d2dpm_stochastic", "ptqd", "qdrift_gain"):
        assert run(method, "heun", **BIAS)[0] < fp + 0.005, method
    for method in ("qdrift", "tac"):  # variance-only and gain-only methods leave the mean error
        assert run(method, "heun", **BIAS)[0] > 0.8 * none, method


def test_qncd_runs_with_every_sampler_and_carries_the_initial_mean():
    """QNCD's estimate also sees the sample's own mean offset (see qdrift.baselines.qncd): on an unbiased model
    it makes the mean error worse than doing nothing; measured, not a property we want."""
    fp, _ = run("fp", "euler")
    worse, _ = run("qncd", "euler")  # no planted error at all
    assert worse > fp + 0.02
    for sampler in SAMPLERS:
        m, v = run("qncd", sampler, **BIAS)
        assert m == m and v == v  # finite


def test_measured_calibration_feeds_the_baselines():
    """End to end with qdrift.calibrate: PTQD's k and b come back from measured moments."""
    planted = PlantedErrorDenoiser(DATA, seed=11, gain=0.25, bias=[0.06, 0.02], var=0.04)
    x = torch.randn(128, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * SIGMAS[0]
    cal = qdrift.calibrate(DATA.denoiser, planted, x, SIGMAS, disable=True, trim=None)
    k, b, _ = ptqd_gain_bias(lookup_moments(cal, SIGMAS[:12]))  # high and mid noise, where Var(d) is not tiny
    assert torch.allclose(k, torch.full_like(k, 0.25), atol=0.03)
    assert torch.allclose(b, torch.tensor([[0.06, 0.02]], dtype=torch.float64).expand_as(b), atol=0.02)
    _, fp = run("fp", "euler")
    _, dvar = run("qdrift_gain", "euler", calibration=cal, **GAIN)
    assert abs(dvar - fp) < 6


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_method_runs_with_every_sampler(sampler):
    """The wrapper plus its sampler options fit every qdrift sampler (shape, dtype, finite, no error); float32."""
    sigmas = get_sigmas_karras(6, 0.05, 10.0).double()
    planted = dict(gain=0.1, bias=0.02, var=0.04)
    cal = AnalyticCalibration(PlantedErrorDenoiser(DATA, **planted))
    for method in ["none", "qdrift", "d2dpm", "d2dpm_stochastic", "ptqd", "tac", "qncd", "qdrift_gain"]:
        x = DATA.prior(4, 10.0, spatial=(3, 3), generator=torch.Generator().manual_seed(0)).float()
        model = make_baseline(method, PlantedErrorDenoiser(DATA, seed=1, **planted), cal, **(
            {"interval": 2} if method == "qncd" else {}))
        kwargs = model.sampler_kwargs(sampler, sigmas)
        if sampler in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
            kwargs["noise_sampler"] = default_noise_sampler(x, seed=2)
        out = SAMPLERS[sampler](model, x, sigmas.float(), disable=True, **kwargs)
        assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all()), method
