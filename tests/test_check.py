"""qdrift.check_correction: what a correction does to the quantized run, measured against the FP run and the plan."""

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser
from qdrift.plan import recording

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
SIGMAS = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()


@pytest.fixture(scope="module")
def cal():
    x = DATA.prior(5, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(5))
    return qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, var=0.1), x, SIGMAS, disable=True)


def _noises(n=400, seed=1):
    return DATA.prior(n, 80.0, spatial=(2, 2), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "lms", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_v2_removes_the_excess_and_predicts_the_difference(name, cal):
    """Independent planted errors: v2 removes most of the excess final variance on held-out noises, and the plan's
    predicted mean square difference from the FP run is the realized one (the surrogate is exact here)."""
    chk = qdrift.check_correction(cal, DATA, PlantedErrorDenoiser(DATA, seed=11, var=0.1), _noises(), SIGMAS, name)
    assert chk.method == "v2" and chk.samples == 400
    removed = 1 - float(chk.excess_corr[-1].sum()) / float(chk.excess_q[-1].sum())
    assert removed > 0.75, chk.summary()
    ratio = float(chk.predicted_mse[-1].sum()) / float(chk.mse_corr[-1].sum())
    assert 0.85 < ratio < 1.2, chk.summary()
    assert float(chk.levels[-1]) == 0.0 and chk.levels.shape[0] == chk.excess_q.shape[0]
    assert len(chk.trace) == len(SIGMAS) - 1
    assert "removed" in chk.summary() and chk.table().count("\n") == len(chk.levels) + 1


def test_steps_that_drift_some_channels_along_the_first_order_part_and_others_along_the_whole_step():
    """A multistep step's drift scales its first-order part where that reaches the balance and the whole increment
    where only that comes closer, per channel. Errors of very different size per channel make both happen within
    one step; the plan's predicted difference from the FP run still is the realized one."""
    var = [0.02, 1.5, 0.2]
    x = DATA.prior(5, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(5))
    cal = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, var=var), x, SIGMAS, disable=True)
    chk = qdrift.check_correction(cal, DATA, PlantedErrorDenoiser(DATA, seed=11, var=var), _noises(), SIGMAS,
                                  "dpmpp_2m_sde", sampler_kwargs={"correction": "drift"})
    first_order = [t["first_order"] for t in chk.trace if "first_order" in t]
    assert len(first_order) == len(SIGMAS) - 3  # every step but the first (no history) and the last (to 0)
    assert any(bool(f.any()) and not bool(f.all()) for f in first_order)
    ratio = float(chk.predicted_mse[-1].sum()) / float(chk.mse_corr[-1].sum())
    assert 0.9 < ratio < 1.1, chk.summary()
    assert 1 - float(chk.excess_corr[-1].sum()) / float(chk.excess_q[-1].sum()) > 0.75, chk.summary()


def test_identical_models_show_nothing_to_remove(cal):
    chk = qdrift.check_correction(cal, DATA, DATA, _noises(50), SIGMAS, "euler", method="paper")
    assert torch.equal(chk.mse_q, torch.zeros_like(chk.mse_q)) and torch.equal(chk.excess_q, torch.zeros_like(chk.excess_q))
    assert torch.isnan(chk.removed()).all() and "n/a" in chk.summary()
    assert torch.isnan(chk.predicted_mse).all()  # the paper's rule predicts nothing
    assert bool((chk.mse_corr[-1] > 0).all())  # it still drifts: the calibration's V is not 0


def test_batches_pool_like_one_batch(cal):
    x = _noises(40)
    one = qdrift.check_correction(cal, DATA, DATA, x, SIGMAS, "euler")
    two = qdrift.check_correction(cal, DATA, DATA, [x[:15], x[15:]], SIGMAS, "euler")
    assert two.samples == 40
    for f in ("var_fp", "excess_q", "excess_corr", "mse_q", "mse_corr", "shift_corr"):
        assert torch.allclose(getattr(one, f), getattr(two, f), rtol=1e-9, atol=1e-9), f


def test_bad_inputs_are_named(cal):
    x = _noises(4)
    with pytest.raises(ValueError, match="must be a qdrift.Calibration"):
        qdrift.check_correction(torch.ones(20, 3), DATA, DATA, x, SIGMAS)
    with pytest.raises(ValueError, match="unknown qdrift sampler"):
        qdrift.check_correction(cal, DATA, DATA, x, SIGMAS, "euler_b")
    with pytest.raises(ValueError, match="may not set 'method'"):
        qdrift.check_correction(cal, DATA, DATA, x, SIGMAS, sampler_kwargs={"method": "v2"})
    with pytest.raises(ValueError, match="2 channels; expected the calibration's 3"):
        qdrift.check_correction(cal, DATA, DATA, torch.randn(2, 2, 4), SIGMAS)
    with pytest.raises(ValueError, match="1-D tensor"):
        qdrift.check_correction(cal, DATA, DATA, x, [80.0, 0.0])


def test_recording_collects_the_plans_of_runs_in_the_block(cal):
    x = _noises(8)
    with recording() as outer:
        qdrift.sample_euler_qdrift(DATA, x.clone(), SIGMAS, cal, disable=True)
        with recording() as inner:
            qdrift.sample_heun_qdrift(DATA, x.clone(), SIGMAS, cal.V, disable=True)
    qdrift.sample_euler_qdrift(DATA, x.clone(), SIGMAS, cal, disable=True)
    assert len(outer) == 2 and len(inner) == 1 and inner[0] is outer[1]
    v2, paper = outer
    assert v2.method == "v2" and paper.method == "paper"
    assert [t["step"] for t in v2.trace] == list(range(len(SIGMAS) - 1))
    assert {"c", "excess", "var_fp", "var_diff"} <= set(v2.trace[0]) and "excess" not in paper.trace[0]


def test_tune_strength_finds_the_coupling_bound_minimum(cal):
    """Each strength's MSE is the coupled runs' mean square difference; the choice is the smallest, 0 is the plain
    sampler, and with identical models (nothing to correct) the choice is 0."""
    x = _noises(100)
    q = PlantedErrorDenoiser(DATA, seed=11, var=0.1)
    tuned = qdrift.tune_strength(cal, DATA, q, x, SIGMAS, "euler", strengths=[0, 0.5, 1.0])
    assert tuned.method == "v2" and tuned.samples == 100 and set(tuned.mse) == {0.0, 0.5, 1.0}
    assert tuned.strength == min(tuned.mse, key=tuned.mse.get)
    fp = qdrift.sample_euler_qdrift(DATA, x.clone(), SIGMAS, disable=True).double()
    q2 = PlantedErrorDenoiser(DATA, seed=11, var=0.1)
    plain = qdrift.sample_euler_qdrift(q2, x.clone(), SIGMAS, disable=True).double()
    assert tuned.mse[0.0] == pytest.approx(float(((plain - fp) ** 2).mean()), rel=0, abs=0)
    same = qdrift.tune_strength(cal, DATA, DATA, x, SIGMAS, "euler", strengths=(0, 1))
    assert same.strength == 0.0 and same.mse[0.0] == 0.0 and same.mse[1.0] > 0
    assert "strength 0" in same.summary()


def test_tune_strength_refuses_bad_strengths(cal):
    for bad in ([], [-0.5], [float("nan")], [True], ["1"]):
        with pytest.raises(ValueError, match="strengths"):
            qdrift.tune_strength(cal, DATA, DATA, _noises(4), SIGMAS, strengths=bad)


def test_the_final_spectrum_splits_each_channels_variance_by_band(cal):
    """The bands of the final samples' variance add up to each run's channel variance (Parseval; band 0 carries the
    mean), and identical models show a flat 1 in every band."""
    chk = qdrift.check_correction(cal, DATA, PlantedErrorDenoiser(DATA, seed=11, var=0.1), _noises(60), SIGMAS,
                                  "euler", method="paper")
    assert chk.band_var_fp.shape == (3, qdrift.calib.check.SPECTRUM_BANDS)
    final_fp = chk.var_fp[-1]
    assert torch.allclose(chk.band_var_fp.sum(1), final_fp, rtol=1e-9)
    assert torch.allclose(chk.band_var_q.sum(1), final_fp + chk.excess_q[-1], rtol=1e-9)
    assert torch.allclose(chk.band_var_corr.sum(1), final_fp + chk.excess_corr[-1], rtol=1e-9)
    x = DATA.prior(20, 80.0, spatial=(8, 8), generator=torch.Generator().manual_seed(3))
    same = qdrift.check_correction(cal, DATA, DATA, x, SIGMAS, "euler")
    assert "plain 1.000 1.000 1.000 1.000, corrected" in same.spectrum()
    tiny = qdrift.check_correction(cal, DATA, DATA, _noises(20), SIGMAS, "euler")  # 2 x 2: band 1 has no bins
    assert "plain 1.000 - 1.000 1.000, corrected" in tiny.spectrum()


def test_the_final_spectrum_shows_a_model_that_loses_fine_detail(cal):
    """A quantized model whose output keeps half the amplitude of the top frequency band at every call: its final
    samples lose nearly all of that band's variance (each step pulls the state towards the halved output) and keep
    all of the others'. The channel variance alone would show a deficit and not where it sits."""
    from qdrift.correction import filter_bands

    gain = torch.tensor([[1.0, 1.0, 1.0, 0.5]])

    def blurred(x, sigma, **kwargs):
        return filter_bands(DATA(x, sigma, **kwargs), gain).to(x.dtype)

    x = DATA.prior(80, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(3))
    chk = qdrift.check_correction(cal, DATA, blurred, x, SIGMAS, "euler", method="paper")
    ratio = chk.band_var_q.sum(0) / chk.band_var_fp.sum(0)
    assert float(ratio[-1]) < 0.05, chk.spectrum()
    assert torch.allclose(ratio[:2], torch.ones(2, dtype=torch.float64), atol=0.02), chk.spectrum()
    assert "plain" in chk.spectrum() and "corrected" in chk.spectrum()


def test_samples_without_spatial_axes_have_no_spectrum(cal):
    x = DATA.prior(30, 80.0, generator=torch.Generator().manual_seed(3))
    assert x.ndim == 2
    chk = qdrift.check_correction(cal, DATA, DATA, x, SIGMAS, "euler")
    assert chk.band_var_fp is None and chk.spectrum() is None
