"""qdrift.size_drift: v2's drift sized to the mean square difference the undrifted quantized sampler accumulates."""

import warnings

import numpy as np
import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser
from qdrift.calib import CalibrationFileError, load_calibration
from qdrift.plan import recording, undrifted

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
SIGMAS = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()
X_CAL = DATA.prior(5, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(5))


def _cal(var):
    return qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, var=var), X_CAL, SIGMAS, disable=True)


@pytest.fixture(scope="module")
def cals():
    return {v: _cal(v) for v in (0.05, 0.1, 0.2)}


def _removed(cal, name, var=0.1):
    held = DATA.prior(400, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        chk = qdrift.check_correction(cal, DATA, PlantedErrorDenoiser(DATA, seed=11, var=var), held, SIGMAS, name)
    return 1 - float(chk.excess_corr[-1].sum()) / float(chk.excess_q[-1].sum())


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral", "heun"])
@pytest.mark.parametrize("calibrated, factor", [(0.1, 1.0), (0.2, 0.5), (0.05, 2.0)])
def test_the_factor_is_the_planted_mismatch_and_the_sized_drift_removes_the_excess(cals, name, calibrated, factor):
    """The quantized model the sampler runs has fresh error variance 0.1; the calibration saw 0.2, 0.1 or 0.05
    (a surrogate that over- or under-predicts the accumulation by a known factor). The measured factor is the
    mismatch, and with it the drift removes the excess, where the unsized drift removes about twice or half of it."""
    cal = cals[calibrated]
    sized = qdrift.size_drift(cal, DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS, name)
    assert torch.allclose(sized.drift_scale, torch.full((3,), factor, dtype=torch.float64), rtol=0.1), sized.drift_scale
    info = sized.meta["drift_scale"]
    assert info["K"] == 5 and info["sampler"] == name and info["steps"] == 20 and info["seconds"] >= 0
    assert 0.85 < _removed(sized, name) < 1.15
    if factor != 1.0:
        unsized = _removed(cal, name)
        assert (unsized > 1.6) if factor < 1 else (unsized < 0.7), unsized


@pytest.mark.filterwarnings("ignore::qdrift.DriftClippedWarning")
def test_undrifted_runs_take_no_drift_and_keep_the_output_correction(cals):
    cal = cals[0.1]
    model = PlantedErrorDenoiser(DATA, seed=3, var=0.1, gain=0.1)
    x = DATA.prior(4, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(2))
    with recording() as plans, undrifted():
        out = qdrift.sample_euler_qdrift(model, x, SIGMAS, cal, disable=True)
    assert all(bool((t["c"] == 0).all()) for t in plans[0].trace) and len(plans[0].trace) == 20
    assert all("var_diff" in t for t in plans[0].trace)
    with recording() as plans:
        drifted = qdrift.sample_euler_qdrift(PlantedErrorDenoiser(DATA, seed=3, var=0.1, gain=0.1), x, SIGMAS, cal,
                                             disable=True)
    assert any(bool((t["c"] != 0).any()) for t in plans[0].trace)
    assert not torch.equal(out, drifted)
    plain = qdrift.sample_euler_qdrift(PlantedErrorDenoiser(DATA, seed=3, var=0.1, gain=0.1), x, SIGMAS, disable=True)
    assert not torch.equal(out, plain)  # the output's gain is still removed


@pytest.mark.filterwarnings("ignore::qdrift.DriftClippedWarning")
def test_the_paper_method_and_other_methods_ignore_the_factor(cals):
    cal = cals[0.2]
    sized = qdrift.size_drift(cal, DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS)
    x = DATA.prior(6, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(3))
    for method in ("paper", "exact", "correlated"):
        a = qdrift.sample_euler_qdrift(DATA, x, SIGMAS, cal, method=method, disable=True)
        b = qdrift.sample_euler_qdrift(DATA, x, SIGMAS, sized, method=method, disable=True)
        assert torch.equal(a, b), method
    a = qdrift.sample_euler_qdrift(DATA, x, SIGMAS, cal, disable=True)
    b = qdrift.sample_euler_qdrift(DATA, x, SIGMAS, sized, disable=True)
    assert not torch.equal(a, b)


def test_sizing_again_replaces_the_sizing_and_is_reproducible(cals):
    model = lambda: PlantedErrorDenoiser(DATA, seed=8, var=0.1)  # noqa: E731
    once = qdrift.size_drift(cals[0.2], DATA, model(), X_CAL, SIGMAS)
    again = qdrift.size_drift(once, DATA, model(), X_CAL, SIGMAS)
    assert once.meta["drift_scale"]["measured"] == again.meta["drift_scale"]["measured"]
    assert once.meta["drift_scale"]["predicted"] == again.meta["drift_scale"]["predicted"]
    assert "drift_scale" not in cals[0.2].meta  # the input is not changed


def _deterministic_q(x, sigma, **kwargs):
    """A quantized stand-in whose error is a fixed function of the state (the same for any batch split)."""
    return DATA(x, sigma, **kwargs) + 0.05 * torch.sin(3 * x)


def test_batches_pool_like_one_batch(cals):
    one = qdrift.size_drift(cals[0.2], DATA, _deterministic_q, X_CAL, SIGMAS)
    two = qdrift.size_drift(cals[0.2], DATA, _deterministic_q, [X_CAL[:2], X_CAL[2:]], SIGMAS)
    assert two.meta["drift_scale"]["K"] == 5
    assert torch.allclose(one.drift_scale, two.drift_scale, rtol=1e-9)


def test_the_file_keeps_the_sizing_and_rejects_a_malformed_one(cals, tmp_path):
    sized = qdrift.size_drift(cals[0.2], DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS)
    sized.save(tmp_path / "c.safetensors")
    back = load_calibration(tmp_path / "c.safetensors")
    assert torch.equal(back.drift_scale, sized.drift_scale)
    x = DATA.prior(3, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(4))
    assert torch.equal(qdrift.sample_euler_qdrift(DATA, x, SIGMAS, back, disable=True),
                       qdrift.sample_euler_qdrift(DATA, x, SIGMAS, sized, disable=True))
    bad = dict(sized.meta["drift_scale"], measured=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"drift_scale.*3 finite numbers"):
        qdrift.Calibration(sized.sigmas, sized.moments, meta=dict(sized.meta, drift_scale=bad))
    # a file whose sizing was edited by hand: refused on load with the file named
    from safetensors.torch import load_file, save_file
    import json
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["qdrift"])
    header["meta"]["drift_scale"]["predicted"] = [1.0, float("inf"), 1.0]
    save_file(load_file(str(tmp_path / "c.safetensors")), str(tmp_path / "bad.safetensors"),
              metadata={"qdrift": json.dumps(header)})
    with pytest.raises(CalibrationFileError, match="bad.safetensors.*drift_scale"):
        load_calibration(tmp_path / "bad.safetensors")


def test_merge_pools_two_sizings_of_one_sampler_and_drops_others_with_a_warning(cals):
    model = lambda seed: PlantedErrorDenoiser(DATA, seed=seed, var=0.1)  # noqa: E731
    a = qdrift.size_drift(cals[0.2], DATA, model(8), X_CAL[:3], SIGMAS)
    b = qdrift.size_drift(cals[0.2], DATA, model(9), X_CAL[3:], SIGMAS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = a.merge(b)
    info, ia, ib = both.meta["drift_scale"], a.meta["drift_scale"], b.meta["drift_scale"]
    assert info["K"] == 5
    for key in ("measured", "measured_sq", "predicted"):
        assert info[key] == pytest.approx([(3 * p + 2 * q) / 5 for p, q in zip(ia[key], ib[key])])
    with pytest.warns(UserWarning, match="only one of the two calibrations was sized"):
        assert a.merge(cals[0.2]).drift_scale is None
    other = qdrift.size_drift(cals[0.2], DATA, model(9), X_CAL[3:], SIGMAS, "dpmpp_2m")
    with pytest.warns(UserWarning, match="different samplers"):
        assert a.merge(other).drift_scale is None


def test_bad_inputs_are_named(cals):
    cal, model = cals[0.1], PlantedErrorDenoiser(DATA, seed=8, var=0.1)
    with pytest.raises(ValueError, match="must be a qdrift.Calibration"):
        qdrift.size_drift(torch.ones(20, 3), DATA, model, X_CAL, SIGMAS)
    with pytest.raises(ValueError, match="unknown qdrift sampler"):
        qdrift.size_drift(cal, DATA, model, X_CAL, SIGMAS, "nope")
    with pytest.raises(ValueError, match="callback"):
        qdrift.size_drift(cal, DATA, model, X_CAL, SIGMAS, sampler_kwargs={"callback": print})
    with pytest.raises(ValueError, match="2 channels; expected the calibration's 3"):
        qdrift.size_drift(cal, DATA, model, X_CAL[:, :2], SIGMAS)
    with pytest.raises(ValueError, match="held no batches"):
        qdrift.size_drift(cal, DATA, model, [], SIGMAS)
    with pytest.raises(ValueError, match="output must be True or False"):
        qdrift.size_drift(cal, DATA, model, X_CAL, SIGMAS, output="yes")


def _with_scale(cal, **info):
    return qdrift.Calibration(cal.sigmas, cal.moments, meta=dict(cal.meta, drift_scale=info), trajectory=cal.trajectory)


def test_the_factor_is_bounded_and_one_where_nothing_was_predicted(cals):
    cal = cals[0.1]
    sized = _with_scale(cal, measured=[0.5, 9.0, 0.3], predicted=[1.0, 1.0, 0.0], K=2)  # a file without the spread
    assert sized.drift_scale.tolist() == [0.5, 4.0, 1.0]
    raw, se = sized.drift_scale_estimate()
    assert raw.tolist() == [0.5, 9.0, 1.0] and se[2] == 0 and bool(se[:2].isnan().all())
    assert cal.drift_scale is None and cal.drift_scale_estimate() is None


def test_the_factor_departs_from_one_only_by_more_than_z_standard_errors(cals):
    """Five noises whose accumulations have mean m and mean square q: the standard error of the factor is
    sqrt((q - m^2) / (K - 1)) / predicted, and a factor within z of them from 1 is not applied."""
    cal = cals[0.1]
    info = dict(measured=[0.6, 1.2, 0.6], measured_sq=[0.36 + 4 * 0.01, 1.44 + 4 * 0.04, 0.36 + 4 * 0.04],
                predicted=[1.0, 1.0, 1.0], K=5)
    raw, se = _with_scale(cal, **info).drift_scale_estimate()
    assert raw.tolist() == pytest.approx([0.6, 1.2, 0.6]) and se.tolist() == pytest.approx([0.1, 0.2, 0.2])
    assert _with_scale(cal, **info).drift_scale.tolist() == pytest.approx([0.6, 1.0, 1.0])  # z = 2 by default
    assert _with_scale(cal, **info, z=1.0).drift_scale.tolist() == pytest.approx([0.6, 1.0, 0.6])
    assert _with_scale(cal, **info, z=0.0).drift_scale.tolist() == pytest.approx([0.6, 1.2, 0.6])
    one = dict(info, K=1)  # one noise: no spread, nothing can be told from 1
    assert _with_scale(cal, **one).drift_scale.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="'z' \\(a finite number >= 0\\)"):
        _with_scale(cal, **info, z=-1.0)
    with pytest.raises(ValueError, match="measured_sq"):
        _with_scale(cal, **dict(info, measured_sq=[1.0]))
    with pytest.raises(ValueError, match="z must be a finite number >= 0"):
        qdrift.size_drift(cal, DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS, z=float("nan"))


def test_a_factor_carried_by_one_noise_of_five_is_not_applied(cals):
    """The quantized stand-in errs on one of the five sizing noises only, with 9x the calibrated variance: the
    mean accumulation is about 1.8x the prediction, but as uncertain as it is large, so the surrogate stands."""
    planted = PlantedErrorDenoiser(DATA, seed=8, var=0.1)
    weight = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0], dtype=torch.float64).view(5, 1, 1, 1)

    def one_noisy_sample(x, sigma, **kwargs):
        exact = DATA(x, sigma, **kwargs)
        return exact + weight.to(x) * (planted(x, sigma, **kwargs) - exact)

    sized = qdrift.size_drift(cals[0.1], DATA, one_noisy_sample, X_CAL, SIGMAS, output=False)
    raw, se = sized.drift_scale_estimate()
    assert bool(((raw > 1.5) & (raw < 2.1)).all()) and bool(((se > 0.7 * raw) & (se < 1.3 * raw)).all()), (raw, se)
    assert sized.drift_scale.tolist() == [1.0, 1.0, 1.0]
    unguarded = qdrift.size_drift(cals[0.1], DATA, one_noisy_sample, X_CAL, SIGMAS, z=0, output=False)
    assert torch.equal(unguarded.drift_scale, unguarded.drift_scale_estimate()[0])
    assert bool(((unguarded.drift_scale > 1.4) & (unguarded.drift_scale < 2.4)).all())


def test_a_bounded_drift_leaves_its_excess_to_the_ancestral_noise():
    """Ten Euler ancestral steps from sigma 80 go nearly to 0 each (sigma_down << sigma_next), so c is bounded where
    the scaled step would pass 0 and the drift alone removed 57 % of the excess (qdrift analytic --steps 10). What
    the bound leaves, the fresh noise that follows now takes up (v2 ~100 %); a caller that cannot lower its noise
    (a diffusers scheduler: lower_noise=False) keeps the drift alone."""
    from qdrift.plan import DriftPlan

    sigmas = qdrift.get_sigmas_karras(10, 0.002, 80.0).double()
    x_cal = DATA.prior(5, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(5))
    cal = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, var=0.1), x_cal,
                           qdrift.get_sigmas_karras(40, 0.002, 80.0).double(), disable=True)
    held = DATA.prior(4000, 80.0, spatial=(1, 1), generator=torch.Generator().manual_seed(1))
    chk = qdrift.check_correction(cal, DATA, PlantedErrorDenoiser(DATA, seed=11, var=0.1), held, sigmas,
                                  "euler_ancestral", seed=3)
    removed = 1 - float(chk.excess_corr[-1].sum()) / float(chk.excess_q[-1].sum())
    assert 0.85 < removed < 1.15, chk.summary()
    factors = []
    for lower in (True, False):
        plan = DriftPlan(cal, sigmas, held[:2], "euler_ancestral", lower_noise=lower)
        x = held[:2]
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            down, up = qdrift.get_ancestral_step(s, s_next)
            x_new, factor = plan.step(i, x, x * (float(down) / s), s, float(down), noise_std=float(up))
            factors.append((lower, factor))
    assert any(f is not None and bool((f < 1).all()) for lower, f in factors if lower)
    assert all(f is None for lower, f in factors if not lower)


def _trace_passes(model_q, x, batches=1):
    """The host's two passes (record the full-precision Euler run, replay it with model_q) on x split in batches."""
    from qdrift.calib import PairedTrace

    trace = PairedTrace()
    parts = x.chunk(batches)
    for part in parts:
        trace.fp_sampler()(DATA, part, SIGMAS, disable=True)
    for part in parts:
        trace.q_sampler()(model_q, part, SIGMAS, disable=True)
    return trace, parts


def test_a_hosts_third_pass_sizes_like_size_drift():
    """PairedTrace.size_sampler: the quantized model's undrifted v2 Euler run against the recorded full-precision
    states gives the factor size_drift gives with both models in hand (the same numbers, up to the float32 the
    trace keeps), batch by batch."""
    trace, parts = _trace_passes(_deterministic_q, X_CAL, batches=2)
    cal = trace.calibration()
    sampler = trace.size_sampler(cal)
    outs = [sampler(_deterministic_q, part, SIGMAS, disable=True) for part in parts]
    sized = trace.sized()
    direct = qdrift.size_drift(cal, DATA, _deterministic_q, X_CAL, SIGMAS, "euler")
    info, ref = sized.meta["drift_scale"], direct.meta["drift_scale"]
    assert info["K"] == 5 and info["sampler"] == "euler" and info["steps"] == 20
    for key in ("measured", "measured_sq", "predicted"):
        assert info[key] == pytest.approx(ref[key], rel=1e-4), key
    for key in ref["output"]:  # the plain run of each call sizes the output correction alike
        assert info["output"][key] == pytest.approx(ref["output"][key], rel=1e-3, abs=1e-12), key
    assert sized.output_scale.tolist() == pytest.approx(direct.output_scale.tolist(), rel=1e-3)
    assert torch.equal(sized.V, cal.V) and "drift_scale" not in cal.meta
    with undrifted():
        again = qdrift.sample_euler_qdrift(_deterministic_q, parts[0], SIGMAS, cal, method="v2", disable=True)
    assert torch.allclose(outs[0], again)  # the pass returns its own (output-corrected, undrifted) sample
    # the output correction sized alone: the same measurement, the drift as calibrated
    alone = trace.size_sampler(cal, drift=False)
    for part in parts:
        alone(_deterministic_q, part, SIGMAS, disable=True)
    alone = trace.sized()
    assert alone.meta["drift_scale"]["drift"] is False and alone.drift_scale.tolist() == [1.0] * 3
    assert alone.meta["drift_scale"]["measured"] == pytest.approx(info["measured"], rel=1e-9)
    with pytest.raises(ValueError, match="drift=False sizes only the output correction, which needs output=True"):
        trace.size_sampler(cal, drift=False, output=False)
    with pytest.raises(ValueError, match="drift must be True or False, got 'yes'"):
        trace.size_sampler(cal, drift="yes")


def test_a_hosts_third_pass_finds_the_planted_mismatch_and_names_its_misuse(cals):
    from qdrift.calib import PairedTraceError

    model = PlantedErrorDenoiser(DATA, seed=8, var=0.2)  # the host's calibration saw 0.2
    trace, (x,) = _trace_passes(model, X_CAL)
    cal = trace.calibration()
    with pytest.raises(PairedTraceError, match="no sizing run yet"):
        trace.sized()
    sampler = trace.size_sampler(cal)
    with pytest.raises(PairedTraceError, match="starting noise differs"):
        sampler(model, x + 1.0, SIGMAS, disable=True)
    with pytest.raises(PairedTraceError, match="different schedule"):
        sampler(model, x, SIGMAS[::2], disable=True)
    sampler(PlantedErrorDenoiser(DATA, seed=9, var=0.1), x, SIGMAS, disable=True)  # it samples with half of it
    with pytest.warns(UserWarning, match="outputs differ between two calls"):  # a random model: no output share
        sized = trace.sized()
    assert torch.allclose(sized.drift_scale, torch.full((3,), 0.5, dtype=torch.float64), rtol=0.1)
    assert sized.output_scale is None
    with pytest.raises(PairedTraceError, match="already sized"):
        sampler(model, x, SIGMAS, disable=True)
    with pytest.raises(ValueError, match="must be a qdrift.Calibration"):
        trace.size_sampler(None)
    with pytest.raises(ValueError, match="z must be a finite number"):
        trace.size_sampler(cal, z=-1)


def test_sizing_takes_latents_without_spatial_axes(cals):
    """``[K, C]`` latents (no spatial axes) are sized like any other; the pass used to index a spatial axis."""
    flat = X_CAL[:, :, 0, 0]
    sized = qdrift.size_drift(cals[0.1], DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), flat, SIGMAS, "euler")
    assert sized.drift_scale.shape == (3,) and bool(torch.isfinite(sized.drift_scale).all())


# -- the output correction's share (size_drift(output=True)) ---------------------------------------------------
def _gain_bias_q(x, sigma, **kwargs):
    """A deterministic quantized stand-in with a planted gain and bias (d_hat = 1.1 d + 0.05): v2's output
    correction removes them exactly."""
    return PlantedErrorDenoiser(DATA, gain=0.1, bias=0.05)(x, sigma, **kwargs)


def test_the_output_share_is_one_where_the_output_correction_is_exact():
    cal = qdrift.calibrate(DATA, _gain_bias_q, X_CAL, SIGMAS, disable=True)
    sized = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS)
    raw, se = sized.output_scale_estimate()
    assert raw.tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert sized.output_scale.tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    out = sized.meta["drift_scale"]["output"]
    assert all(b > 100 * max(a + 2 * ab + b, 1e-30) for a, ab, b in zip(out["aa"], out["ab"], out["bb"]))  # b = -a
    assert qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS, output=False).output_scale is None


def _accumulated(a_scale, K=6, seed=0, scatter=0.2):
    """A sizing's sums from made-up runs: the plain run is the FP one plus ``a``, the corrected one adds
    ``b = -a / a_scale`` plus independent scatter, so the run closest to FP takes the share ``a_scale``."""
    from qdrift.calib.size import Accumulation

    gen = torch.Generator().manual_seed(seed)
    steps = 4
    acc = Accumulation("test", steps)
    fp = [torch.randn(K, 2, 5, 5, generator=gen, dtype=torch.float64) * (steps - i) for i in range(steps)]
    b = [torch.randn(K, 2, 5, 5, generator=gen, dtype=torch.float64) for _ in range(steps)]
    scatter = [scatter * torch.randn(K, 2, 5, 5, generator=gen, dtype=torch.float64) for _ in range(steps)]
    plain = [f - a_scale * bi + e for f, bi, e in zip(fp, b, scatter)]
    q = [p + bi for p, bi in zip(plain, b)]
    trace = [{"step": i, "var_diff": torch.ones(2, dtype=torch.float64)} for i in range(steps)]
    acc.add(fp, q, trace, 2, plain)
    return acc, fp, plain, q


def test_the_output_share_is_the_least_squares_share_of_the_paired_runs():
    """The raw share minimizes the sizing runs' mean square distance from FP over the scaled output correction
    (summed over steps relative to the FP state's variance); its standard error is the ratio estimator's over the
    noises; the drift is then sized to the accumulation at that share."""
    acc, fp, plain, q = _accumulated(0.4)
    cal2 = qdrift.calibrate(GaussianData([0.0, 1.0], [1.0, 0.5]), GaussianData([0.0, 1.0], [1.0, 0.5]),
                            torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 80, SIGMAS[:5],
                            disable=True)
    sized = acc.sized(cal2, "euler", 2.0)
    raw, se = sized.output_scale_estimate()
    var = torch.stack([f.transpose(0, 1).reshape(2, -1).var(1, unbiased=False) for f in fp])  # [S, C]
    per = []  # each noise's (sum over steps of <a b> / var, <b b> / var)
    for n in range(6):
        ab = sum(((plain[i] - fp[i])[n] * (q[i] - plain[i])[n]).reshape(2, -1).mean(1) / var[i] for i in range(4))
        bb = sum(((q[i] - plain[i])[n] ** 2).reshape(2, -1).mean(1) / var[i] for i in range(4))
        per.append((ab, bb))
    ab, bb = torch.stack([p[0] for p in per]), torch.stack([p[1] for p in per])
    s = -ab.mean(0) / bb.mean(0)
    assert raw.tolist() == pytest.approx(s.tolist(), rel=1e-9) and bool(((raw > 0.3) & (raw < 0.5)).all())
    u = ab + s * bb
    assert se.tolist() == pytest.approx(((u.pow(2).mean(0) / 5).sqrt() / bb.mean(0)).tolist(), rel=1e-9)
    assert torch.equal(sized.output_scale, raw)  # far more than 2 standard errors from 1
    # the drift is sized to the accumulation at that share: each noise's |a + s b|^2
    acc_s = torch.stack([sum((((plain[i] - fp[i])[n] + s.view(2, 1, 1) * (q[i] - plain[i])[n]) ** 2).reshape(2, -1).mean(1)
                             / var[i] for i in range(4)) for n in range(6)])
    measured, _ = sized.drift_scale_estimate()
    predicted = torch.tensor(sized.meta["drift_scale"]["predicted"], dtype=torch.float64)
    assert (measured * predicted).tolist() == pytest.approx(acc_s.mean(0).tolist(), rel=1e-9)
    # an overshoot the runs cannot tell from none keeps the share at 1; a share above 1 is kept at 1
    near = _accumulated(0.9, K=3, seed=1, scatter=3.0)[0].sized(cal2, "euler", 2.0)
    assert near.output_scale.tolist() == [1.0, 1.0]
    above = _accumulated(1.5, seed=2)[0].sized(cal2, "euler", 2.0)
    assert bool((above.output_scale_estimate()[0] > 1.3).all()) and above.output_scale.tolist() == [1.0, 1.0]


def test_a_model_with_random_outputs_keeps_the_share_at_one_and_says_so(cals):
    """Paired runs of a model whose outputs are random differ by the model's own noise, which would read as a
    share of 1/2 whatever the correction does (and halve the drift); the pass sees two calls disagree."""
    with pytest.warns(UserWarning, match="outputs differ between two calls on the same input"):
        sized = qdrift.size_drift(cals[0.1], DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS)
    assert sized.output_scale is None and "output" not in sized.meta["drift_scale"]
    assert torch.allclose(sized.drift_scale_estimate()[0], torch.ones(3, dtype=torch.float64), rtol=0.15)
    with pytest.warns(UserWarning, match="with drift=False nothing is: the calibration is returned unsized"):
        alone = qdrift.size_drift(cals[0.1], DATA, PlantedErrorDenoiser(DATA, seed=8, var=0.1), X_CAL, SIGMAS,
                                  drift=False)
    assert "drift_scale" not in alone.meta


def test_the_share_scales_the_output_correction_and_travels_with_the_file(tmp_path):
    cal = qdrift.calibrate(DATA, _gain_bias_q, X_CAL, SIGMAS, disable=True)
    sized = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS)
    info = sized.meta["drift_scale"]
    # a made-up sizing whose runs say the correction overshoots by 2x in every channel: share 1/2
    half = dict(info, output=dict(info["output"], ab=[-0.5 * b for b in info["output"]["bb"]],
                                  ab_ab=[0.25 * b for b in info["output"]["bb_bb"]],
                                  ab_bb=[-0.5 * b for b in info["output"]["bb_bb"]]))
    halved = qdrift.Calibration(sized.sigmas, sized.moments, meta=dict(sized.meta, drift_scale=half),
                                trajectory=sized.trajectory)
    assert halved.output_scale.tolist() == pytest.approx([0.5, 0.5, 0.5])
    x = DATA.prior(2, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(3))
    sigma = torch.full((2,), 3.0)
    from qdrift.plan import DriftPlan

    def corrected(c):
        return DriftPlan(c, SIGMAS, x, "t").wrap(_gain_bias_q)(x, sigma)

    d_hat, d_fp = (x - _gain_bias_q(x, sigma)) / 3.0, (x - DATA(x, sigma)) / 3.0
    em = cal.error_model(torch.tensor([3.0], dtype=torch.float64), gain=True)
    k, b = em["k"][0].view(1, 3, 1, 1).float(), em["b"][0].view(1, 3, 1, 1).float()
    assert torch.allclose((x - corrected(sized)) / 3.0, d_fp, atol=1e-4)  # share 1: the gain and bias removed
    assert torch.allclose((x - corrected(halved)) / 3.0, (d_hat - 0.5 * b) / (1 + 0.5 * k), atol=1e-5)
    halved.save(tmp_path / "h.safetensors")
    back = load_calibration(tmp_path / "h.safetensors")
    assert torch.equal(back.output_scale, halved.output_scale) and torch.equal(back.drift_scale, halved.drift_scale)
    with pytest.raises(ValueError, match=r"drift_scale'\]\['output'\] must be an object"):
        qdrift.Calibration(sized.sigmas, sized.moments,
                           meta=dict(sized.meta, drift_scale=dict(info, output=dict(info["output"], bb=[-1.0] * 3))))


def test_merge_pools_the_output_share_and_drops_a_sizing_only_one_side_measured_it():
    cal = qdrift.calibrate(DATA, _gain_bias_q, X_CAL, SIGMAS, disable=True)
    a = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL[:3], SIGMAS)
    b = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL[3:], SIGMAS)
    both = a.merge(b).meta["drift_scale"]["output"]
    oa, ob = a.meta["drift_scale"]["output"], b.meta["drift_scale"]["output"]
    for key in oa:
        assert both[key] == pytest.approx([(3 * p + 2 * q) / 5 for p, q in zip(oa[key], ob[key])])
    plain = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL[3:], SIGMAS, output=False)
    with pytest.warns(UserWarning, match="only one of the two sizings measured the output correction"):
        assert a.merge(plain).drift_scale is None


def test_a_hosts_sizing_runs_give_the_plain_run_with_every_run_or_none():
    from qdrift.calib import PairedTraceError
    from qdrift.plan import recording, undrifted

    trace, parts = _trace_passes(_deterministic_q, X_CAL, batches=2)
    base = trace.begin_sizing(trace.calibration())

    def runs(x, V):
        seen = []
        with recording() as plans, undrifted():
            out = qdrift.sample_euler_qdrift(_deterministic_q, x, SIGMAS, V, disable=True,
                                             callback=lambda d: seen.append(d["x"]))
        return seen + [out], (plans[-1].trace if plans else None)

    states, plan_trace = runs(parts[0], base)
    plain, _ = runs(parts[0], None)
    with pytest.raises(PairedTraceError, match="plain run needs 21 states"):
        trace.add_sized_run(states, plan_trace, plain[:-1])
    trace.add_sized_run(states, plan_trace, plain)
    states, plan_trace = runs(parts[1], base)
    with pytest.raises(PairedTraceError, match="with every sizing run of a sizing, or with none"):
        trace.add_sized_run(states, plan_trace)
    with pytest.raises(ValueError, match="output must be True or False"):
        trace.size_sampler(base, output="yes")
    # the output correction sized alone needs the plain runs: a host that gave none hears so when it asks
    base = trace.begin_sizing(trace.calibration(), drift=False)
    trace.add_sized_run(*runs(parts[0], base))
    with pytest.raises(ValueError, match="drift=False sizes only the output correction, which needs the plain"):
        trace.sized()
    with pytest.raises(ValueError, match="drift must be True or False"):
        trace.begin_sizing(trace.calibration(), drift=None)


def test_sizing_the_output_alone_keeps_the_calibrated_drift(tmp_path):
    """``size_drift(drift=False)`` measures what the full sizing does and keeps the output share, but samples with
    the drift as calibrated (factor 1); the file keeps the choice, merge pools only like with like, and a sizing
    of nothing is refused."""
    from qdrift.plan import DriftPlan

    cal = qdrift.calibrate(DATA, _gain_bias_q, X_CAL, SIGMAS, disable=True, bands=1)
    full = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS)
    alone = qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS, drift=False)
    strip = lambda info: {k: v for k, v in info.items() if k not in ("seconds", "drift")}  # noqa: E731
    assert strip(alone.meta["drift_scale"]) == strip(full.meta["drift_scale"]) and alone.meta["drift_scale"]["drift"] is False
    assert "drift" not in full.meta["drift_scale"]  # a full sizing's file is as before
    # a made-up sizing whose surrogate predicted a third of what it did: the full sizing's factor departs from 1
    info = dict(full.meta["drift_scale"], predicted=[p / 3 for p in full.meta["drift_scale"]["predicted"]])
    tripled, kept = (qdrift.Calibration(cal.sigmas, cal.moments, trajectory=cal.trajectory,
                                        meta=dict(cal.meta, drift_scale=dict(info, **flag)))
                     for flag in ({}, {"drift": False}))
    assert bool((tripled.drift_scale - 1).abs().gt(0.1).all())
    assert kept.drift_scale.tolist() == [1.0] * 3 and torch.equal(kept.drift_scale_estimate()[0],
                                                                   tripled.drift_scale_estimate()[0])
    assert torch.equal(kept.output_scale, tripled.output_scale)
    x = DATA.prior(4, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(3))
    assert DriftPlan(kept, SIGMAS, x, "t")._v_scale.tolist() == [1.0] * 3
    runs = {name: qdrift.sample_euler_qdrift(PlantedErrorDenoiser(DATA, gain=0.1, bias=0.05, var=0.05, seed=4),
                                             x.clone(), SIGMAS, c, disable=True)
            for name, c in (("tripled", tripled), ("kept", kept), ("full", full), ("alone", alone))}
    # without the drift's sizing the (made-up) factor does not matter; with it, it does
    assert torch.equal(runs["kept"], runs["alone"]) and not torch.equal(runs["tripled"], runs["full"])
    kept.save(tmp_path / "k.safetensors")
    assert load_calibration(tmp_path / "k.safetensors").meta["drift_scale"]["drift"] is False
    with pytest.warns(UserWarning, match="only one of the two sizings sized the drift"):
        assert full.merge(alone).drift_scale is None
    assert alone.merge(alone).drift_scale.tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="needs output=True"):
        qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS, drift=False, output=False)
    with pytest.raises(ValueError, match="drift must be True or False"):
        qdrift.size_drift(cal, DATA, _gain_bias_q, X_CAL, SIGMAS, drift="no")
    with pytest.raises(ValueError, match="'drift' \\(true or false\\)"):
        qdrift.Calibration(cal.sigmas, cal.moments, meta=dict(cal.meta, drift_scale=dict(info, drift="no")))
    bare = {k: v for k, v in info.items() if k != "output"}
    with pytest.raises(ValueError, match="but no 'output' statistics"):
        qdrift.Calibration(cal.sigmas, cal.moments, meta=dict(cal.meta, drift_scale=dict(bare, drift=False)))


def test_host_sizes_auto_skips_flow_models():
    """The hosts' default sizing ("auto") runs on every model but a rectified flow, where it measured worse on the
    bench; True and False (numpy and 0-d tensor flags too) are taken as given; anything else is refused."""
    from qdrift.calib.size import SIZE_FLOW_MODELS, host_sizes

    assert SIZE_FLOW_MODELS is False
    assert host_sizes("host", "auto", flow=False) is True and host_sizes("host", "auto", flow=True) is False
    for value, expected in ((True, True), (False, False), (np.bool_(True), True), (torch.tensor(False), False)):
        assert host_sizes("host", value, flow=True) is expected and host_sizes("host", value, flow=False) is expected
    for bad in ("yes", "AUTO", 1, None, 0.0):
        with pytest.raises(ValueError, match=r"host: size_drift must be True, False or 'auto', got"):
            host_sizes("host", bad, flow=False)
