"""Frequency-resolved Q-Drift v2 (``calibrate(..., bands=NB)``): the error model, the sample and the correction
per channel and radial frequency band.

The exact answer: on stationary Gaussian fields whose power is constant on each band
(:class:`qdrift.bench.gaussian.SpectralGaussianData`, image-like: power falling with frequency), the bands are
independent, so the per-band surrogate is exact while one coefficient per channel is not. A planted high-pass
(speckle) error, as coarse activations give, adds variance to the upper bands only: one ``c`` per channel then
takes variance out of the low band, which had none to lose (over-smoothing); per band each band's excess goes.
"""

import warnings
from dataclasses import replace

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser, SpeckleErrorDenoiser, SpectralGaussianData
from qdrift.correction import band_components, band_shares, filter_bands, frequency_bands
from qdrift.samplers import REGISTRY

DATA = SpectralGaussianData([4.0, 1.0, 0.1, 0.01], (16, 16))
CAL_SIGMAS = qdrift.get_sigmas_karras(40, 0.002, 80.0).double()
SIGMAS = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def Speckle(seed):  # noqa: N802 (reads as the error model)
    return SpeckleErrorDenoiser(DATA, fresh=0.5, kept=0.5, seed=seed)


def _band_var(y):
    return band_components(y, 4).var((0, 2, 3))


def _run(name, model, x, V=None, **opts):
    if REGISTRY[name].stochastic:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qdrift.SAMPLERS[name](model, x.clone(), SIGMAS, V, disable=True, **opts)


def test_band_components_partition_each_channel_and_its_energy():
    x = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    u = band_components(x, 4).unflatten(1, (2, 4))
    assert torch.allclose(u.sum(2), x, atol=1e-12)
    assert torch.allclose((u**2).sum((2, 3, 4)), (x**2).sum((2, 3)), atol=1e-10)  # Parseval per band
    assert torch.allclose(u[:, :, 1:].mean((3, 4)), torch.zeros(3, 2, 3, dtype=torch.float64), atol=1e-12)
    shares = band_shares((8, 6), 4)
    assert torch.isclose(shares.sum(), torch.tensor(1.0, dtype=torch.float64)) and bool((shares > 0).all())
    gain = torch.tensor([[1.0, 2.0, 0.0, 0.5], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(filter_bands(x, gain), (u * gain[None, :, :, None, None]).sum(2), atol=1e-12)
    assert torch.allclose(filter_bands(x, gain[None].expand(3, 2, 4)), filter_bands(x, gain))
    with pytest.raises(ValueError, match="spatial axes"):
        band_components(torch.randn(4, 2), 2)


def test_a_gain_equal_across_the_bands_is_applied_exactly_without_the_fft():
    x = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    per_channel = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(filter_bands(x, per_channel), x * torch.tensor([0.7, 1.0], dtype=torch.float64)[:, None, None])
    assert torch.equal(filter_bands(x, torch.ones(1, 4, dtype=torch.float64)), x)  # identical models: exactly x
    per_sample = per_channel[None].repeat(3, 1, 1)
    per_sample[1] *= 2.0
    expect = x * per_sample[..., 0][..., None, None]
    assert torch.equal(filter_bands(x, per_sample), expect)
    # the same values through the FFT: equal up to its rounding (one unequal band sends the call there)
    u = band_components(x, 4).unflatten(1, (2, 4))
    assert torch.allclose((u * per_sample[:, :, :, None, None]).sum(2), expect, atol=1e-12)
    uneven = per_channel.clone()
    uneven[0, 3] = 0.5
    assert torch.allclose(filter_bands(x, uneven), (u * uneven[None, :, :, None, None]).sum(2), atol=1e-12)
    # float32 samples come back in the compute dtype on both paths
    assert filter_bands(x.float(), per_channel).dtype == filter_bands(x.float(), uneven).dtype
    # the band map is built once per grid and count
    assert frequency_bands((8, 6), 4) is frequency_bands([8, 6], 4)


def test_banded_statistics_add_up_to_the_channel_statistics():
    x = DATA.prior(6, 80.0, generator=_gen(5))
    cal = qdrift.calibrate(DATA, Speckle(7), x, CAL_SIGMAS, disable=True, trim=None, bands=4)
    assert cal.bands == 4 and cal.banded.channels == 4 and cal.banded.meta["band_units"] == 4
    assert "bands=4" in repr(cal)
    # untrimmed Var(delta) per channel is the sum of its bands' (only band 0 has a mean)
    per_band = cal.with_options(conditional=False).banded.V.double()
    assert torch.allclose(per_band.sum(1), cal.with_options(conditional=False).V[:, 0].double(), rtol=1e-4)
    # the speckle's variance sits in the upper bands, the data's in the lower
    assert bool((per_band[:, 2] > 5 * per_band[:, 0]).all())
    var_x = cal.banded.trajectory.state_variance()
    assert bool((var_x[-1, 0] > var_x[-1, 3]).all())
    # the per-channel statistics are those of a calibration without bands
    plain = qdrift.calibrate(DATA, Speckle(7), x, CAL_SIGMAS, disable=True, trim=None, bands=1)
    assert torch.equal(plain.V, cal.V) and plain.banded is None and plain.bands == 1
    # scalar reduction pools channels per band (one channel here: unchanged)
    assert torch.allclose(cal.with_options(reduce="scalar").banded.V, cal.banded.V)


def test_scalar_reduction_pools_channels_within_each_band():
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64) * 10
    two = lambda x, s, **_: x * 0.1  # noqa: E731
    noisy = lambda x, s, **_: x * 0.1 + torch.randn(x.shape, generator=_gen(1), dtype=x.dtype) * torch.tensor([0.1, 1.0]).reshape(1, 2, 1, 1).double()  # noqa: E731
    cal = qdrift.calibrate(two, noisy, x, torch.tensor([10.0, 5.0, 0.0], dtype=torch.float64), disable=True, bands=2)
    per = cal.banded.V.reshape(2, 2, 2)  # [S, C, NB]
    pooled = cal.with_options(reduce="scalar").banded.V.reshape(2, 2, 2)
    assert torch.allclose(pooled[:, 0], pooled[:, 1])  # the same per band for both channels
    assert bool(((pooled[:, 0] - per.amin(1)) > 0).all()) and bool(((per.amax(1) - pooled[:, 0]) > 0).all())


def test_banded_v2_removes_each_bands_excess_where_one_c_per_channel_over_smooths():
    cal = qdrift.calibrate(DATA, Speckle(7), DATA.prior(16, 80.0, generator=_gen(5)), CAL_SIGMAS, disable=True,
                           bands=4)
    x = DATA.prior(600, 80.0, generator=_gen(0))
    fp, q = _band_var(_run("euler", DATA, x)), _band_var(_run("euler", Speckle(1), x))
    excess = q - fp
    assert bool((excess[1:] > 0.5 * fp[1:]).all())  # a clear excess in the upper bands
    left = {label: (_band_var(_run("euler", Speckle(1), x, c, method="v2")) - fp) / excess
            for label, c in (("bands", cal), ("channel", replace(cal, banded=None)))}
    assert bool((left["bands"].abs() < 0.25).all()), left["bands"]
    # one c per channel: the low band (little excess) loses far more than its excess, below the FP variance
    assert float(left["channel"][0]) < -1.0, left["channel"]


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_banded_v2_runs_every_kind_of_sampler_and_removes_most_excess(name):
    planted = dict(var=0.05, persistent=0.05)
    cal = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, **planted), DATA.prior(8, 80.0, generator=_gen(5)),
                           CAL_SIGMAS, disable=True, bands=4)
    x = DATA.prior(400, 80.0, generator=_gen(0))
    fp = _band_var(_run(name, DATA, x))
    q = _band_var(_run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x))
    corr = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, cal, method="v2")
    assert bool(torch.isfinite(corr).all())
    removed = 1 - float((_band_var(corr) - fp).sum() / (q - fp).sum())
    assert 0.5 < removed < 1.2, removed
    if REGISTRY[name].stochastic and "correction" in qdrift.SAMPLERS[name].__code__.co_varnames:
        noise = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, cal, method="v2", correction="noise")
        assert bool(torch.isfinite(noise).all())


def test_banded_calibration_file_round_trip_merge_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    cal = qdrift.calibrate(DATA, Speckle(7), DATA.prior(3, 80.0, generator=_gen(5)), CAL_SIGMAS, disable=True,
                           bands=3)
    path = tmp_path / "b.safetensors"
    cal.save(path)
    back = qdrift.load_calibration(path)
    assert back.bands == 3
    for f, v in cal.banded.moments.tensors().items():
        assert torch.equal(getattr(back.banded.moments, f), v), f
    for f, v in cal.banded.trajectory.tensors().items():
        assert torch.equal(getattr(back.banded.trajectory, f), v), f
    merged = cal.merge(back)
    assert merged.bands == 3 and merged.meta["K"] == 6
    assert replace(cal, banded=None).merge(back).banded is None  # only one has bands: per channel only
    # the same sample with and without the file round trip
    x = DATA.prior(8, 80.0, generator=_gen(2))
    assert torch.equal(_run("euler", Speckle(1), x, cal), _run("euler", Speckle(1), x, back))
    # band tensors without the header field (or the reverse) are refused
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("band_")} | {"band_n": tensors["band_n"]},
              str(broken), metadata=meta)
    with pytest.raises(qdrift.CalibrationFileError, match="band"):
        qdrift.load_calibration(broken)
    with pytest.raises(ValueError, match='bands must be "auto" or an integer >= 1'):
        qdrift.calibrate(DATA, Speckle(7), DATA.prior(2, 80.0, generator=_gen(5)), CAL_SIGMAS, disable=True, bands=0)
    with pytest.raises(ValueError, match="spatial axes"):
        qdrift.calibrate(DATA, DATA, torch.randn(2, 1) * 80, CAL_SIGMAS, disable=True, bands=2)
    with pytest.raises(ValueError, match=r"band_units'\] must be an integer >= 2 that divides"):
        replace(cal, banded=qdrift.Calibration(cal.sigmas, cal.moments, meta={"band_units": 3}))
    with pytest.raises(ValueError, match="banded must be a Calibration"):
        replace(cal, banded=qdrift.Calibration(cal.sigmas, cal.moments))


def test_paper_method_ignores_the_bands_bit_for_bit():
    cal = qdrift.calibrate(DATA, Speckle(7), DATA.prior(3, 80.0, generator=_gen(5)), CAL_SIGMAS, disable=True,
                           bands=4)
    x = DATA.prior(8, 80.0, generator=_gen(2))
    assert torch.equal(_run("euler", Speckle(1), x, cal, method="paper"),
                       _run("euler", Speckle(1), x, replace(cal, banded=None), method="paper"))
    assert frequency_bands((16, 16), 4).max() == 3


def test_banded_gain_is_not_found_where_there_is_none_and_is_where_there_is():
    """A band's positions are not independent values (a band-limited field is smooth): the gain's significance
    test counts the band's FFT bins, so pure noise shows (almost) no gain and a planted gain is found."""
    x = DATA.prior(5, 80.0, generator=_gen(5))
    noise = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, var=0.1, seed=7), x, CAL_SIGMAS, disable=True, bands=4)
    shares = noise.banded.meta["band_shares"]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-12
    k = noise.banded.error_model(noise.sigmas, gain=True)["k"]
    assert int((k != 0).sum()) <= 0.02 * k.numel(), int((k != 0).sum())
    gained = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, var=0.01, gain=0.3, seed=7), x, CAL_SIGMAS,
                              disable=True, bands=4)
    k = gained.banded.error_model(gained.sigmas, gain=True)["k"]
    assert float(k[:20].mean()) > 0.2  # the noisier half of the schedule, where d_fp varies


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_banded_v2_takes_an_empty_batch(name):
    """B = 0 runs as without bands (an empty FFT used to fail inside the backend)."""
    x = DATA.prior(3, 80.0, generator=_gen(0))
    cal = qdrift.calibrate(DATA, Speckle(1), x, CAL_SIGMAS[::4], disable=True, bands=4)
    out = _run(name, lambda x, sigma, **kw: x * 0, x[:0], cal)  # (the spectral data's own denoiser takes FFTs too)
    assert out.shape == (0,) + tuple(x.shape[1:])


def test_merge_keeps_band_statistics_only_when_they_pool_and_says_when_it_drops_them():
    """A banded calibration merged with a plain one, one of another band count, or one made on another grid size
    used to lose (or mix) its band statistics silently."""
    x = DATA.prior(2, 80.0, generator=_gen(0))
    sig = CAL_SIGMAS[::8]

    def cal(bands, xs=x):
        return qdrift.calibrate(DATA, Speckle(1), xs, sig, disable=True, bands=bands)

    b4 = cal(4)
    data8 = SpectralGaussianData([4.0, 1.0, 0.1, 0.01], (8, 8))
    small = qdrift.calibrate(data8, SpeckleErrorDenoiser(data8, fresh=0.5, kept=0.5, seed=1), x[..., :8, :8], sig,
                             disable=True, bands=4)
    for other, match in ((cal(1), "only one of the two calibrations has frequency-band"),
                         (cal(2), r"different band counts \(4 vs 2\)"), (small, "different spatial sizes")):
        with pytest.warns(UserWarning, match=match):
            assert b4.merge(other).bands == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert b4.merge(cal(4)).bands == 4


# --- calibrate's input checks made before any model call (bands, extra_args) and tune_strength's strengths ---

class _Counting:
    """A toy denoiser pair member that counts its calls."""

    def __init__(self, scale=1.0):
        self.calls, self.scale = 0, scale

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) * self.scale


TOY_SIGMAS = qdrift.get_sigmas_karras(4, 0.1, 10.0)


def _supported(spatial):
    """The band counts whose every band holds an FFT bin, by brute force over every count up to the bins."""
    n = torch.Size(spatial).numel()
    return [b for b in range(1, n + 1) if bool((band_shares(spatial, b) > 0).all())]


@pytest.mark.parametrize("spatial,bands,match", [
    ((4, 4), 100, r"bands=100 leaves 94 of its 100 radial frequency bands without any FFT bin of x's 4x4 spatial "
                  r"grid .*; expected bands <= 5, the largest count a 4x4 grid supports"),
    ((4, 4), 6, r"bands=6 .* 4x4 .*expected bands <= 5"),
    ((1, 1), 2, r"bands=2 leaves 1 of its 2 .* 1x1 spatial grid .*expected bands <= 1"),
    ((8, 8), 10, r"bands=10 .* 8x8 .*11 is the largest a 8x8 grid supports, but not every count below it works "
                 r"\(10 does not; the nearest below that does is 9\)"),
])
def test_calibrate_refuses_a_band_count_with_an_empty_band_before_any_model_call(spatial, bands, match):
    """bands=100 on a 4x4 latent (or 2 on 1x1) used to run every model call and then fail inside Calibration
    ("meta['band_shares'] must be a list of 100 numbers in (0, 1]")."""
    fp, q = _Counting(), _Counting(1.05)
    x = torch.randn((2, 3) + spatial, generator=_gen(0)) * 10
    with pytest.raises(ValueError, match=match):
        qdrift.calibrate(fp, q, x, TOY_SIGMAS, bands=bands, disable=True)
    assert fp.calls == q.calls == 0
    cal = qdrift.calibrate(fp, q, x, TOY_SIGMAS, bands=max(_supported(spatial)), disable=True)
    assert cal.bands == max(_supported(spatial))  # the largest count named in the message works


@pytest.mark.parametrize("spatial", [(1, 1), (1, 5), (3, 3), (4, 4), (2, 8), (5, 7), (8, 8), (16, 16), (4, 4, 4),
                                     (7,)])
def test_the_largest_supported_band_count_is_the_brute_force_one(spatial):
    from qdrift.calib.run import _band_limit

    assert _band_limit(spatial) == max(_supported(spatial))


def test_calibrate_refuses_an_extra_args_tensor_it_cannot_split_before_any_model_call():
    """A conditioning tensor of leading size 2 with K = 3 noises used to reach both batches whole, and the error
    then blamed model_fp's output shape."""
    fp, q = _Counting(), _Counting(1.05)
    x = torch.randn(3, 3, 4, 4, generator=_gen(1)) * 10
    with pytest.raises(ValueError, match=r"extra_args\['cond'\] has shape \(2,\), whose leading size 2 is neither "
                                         r"K=3 .* nor 1 .*; expected a leading size of K or 1"):
        qdrift.calibrate(fp, q, x, TOY_SIGMAS, {"cond": torch.ones(2)}, batch_size=2, disable=True)
    assert fp.calls == q.calls == 0
    for cond in (torch.ones(3), torch.ones(1, 5), torch.tensor(2.0), [1, 2]):  # split, shared, 0-d, not a tensor
        qdrift.calibrate(fp, q, x, TOY_SIGMAS, {"cond": cond}, batch_size=2, disable=True)
    qdrift.calibrate(fp, q, x, TOY_SIGMAS, {"cond": torch.ones(2)}, batch_size=None, disable=True)  # one batch: whole


@pytest.mark.parametrize("args,match", [
    ({1: 1.0}, r"calibrate: extra_args keys must be strings .*got 1 \(int\)"),
    ({"sigma": 1.0}, r"calibrate: extra_args must not hold 'sigma': the model is called as D\(x, sigma"),
    ({"x": 1.0}, r"calibrate: extra_args must not hold 'x'"),
])
def test_calibrate_refuses_extra_args_keys_that_cannot_be_keywords(args, match):
    fp, q = _Counting(), _Counting(1.05)
    x = torch.randn(2, 3, 4, 4, generator=_gen(2)) * 10
    with pytest.raises(ValueError, match=match):
        qdrift.calibrate(fp, q, x, TOY_SIGMAS, args, disable=True)
    with pytest.raises(ValueError, match=match.replace("extra_args", "the extra_args of batch 0", 1)):
        qdrift.calibrate(fp, q, [(x, args)], TOY_SIGMAS, disable=True)
    assert fp.calls == q.calls == 0


def test_tune_strength_takes_any_iterable_of_real_numbers_and_refuses_only_bad_values():
    """np.array([0, .5, 1]), a tensor, range(3) and [np.int64(1)] used to be refused as "strengths must be finite
    numbers >= 0"; a repeated strength was run twice and its MSE summed twice."""
    np = pytest.importorskip("numpy")
    fp, q = _Counting(), _Counting(1.05)
    x = torch.randn(2, 3, 4, 4, generator=_gen(3)) * 10
    cal = qdrift.calibrate(fp, q, x, TOY_SIGMAS, disable=True)

    def tune(strengths):
        return qdrift.tune_strength(cal, fp, q, x, TOY_SIGMAS, strengths=strengths)

    reference = tune([0.0, 0.5, 1.0]).mse
    for strengths in (np.array([0, 0.5, 1]), torch.tensor([0.0, 0.5, 1.0]), (v for v in (0, 0.5, 1.0)),
                      [np.int64(0), np.float32(0.5), torch.tensor(1.0)], [0, 0.5, 1, 1.0, np.int64(1)]):
        assert tune(strengths).mse == reference
    assert list(tune(range(3)).mse) == [0.0, 1.0, 2.0]
    assert list(tune(np.float64(0.5)).mse) == list(tune(torch.tensor(0.5)).mse) == [0.5]
    for bad in ([-1], [float("nan")], np.array([0.5, np.inf]), [True], torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError, match="tune_strength: strengths must be finite numbers >= 0, got"):
            tune(bad)
    for bad in ("0.5", None):
        with pytest.raises(ValueError, match="tune_strength: strengths must be a number or an iterable of numbers"):
            tune(bad)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_a_banded_calibration_solves_the_same_steps_on_any_grid_that_holds_its_bands(name):
    """Every statistic of a band was measured on the calibration's grid, the noise a sampler injects included (at
    that grid's shares): the surrogate, which never looks at the sample, solves the same c on every grid."""
    white = GaussianData([0.3, -0.5], [1.0, 0.7])
    cal = qdrift.calibrate(white, PlantedErrorDenoiser(white, var=0.05, seed=1),
                           white.prior(4, 80.0, spatial=(16, 16), generator=_gen(0)), CAL_SIGMAS, disable=True)
    assert cal.bands == 4  # "auto" on a 16x16 grid
    cs = {}
    for grid in [(16, 16), (24, 40), (9, 7)]:
        with qdrift.plan.recording() as plans:
            _run(name, PlantedErrorDenoiser(white, var=0.05, seed=2), white.prior(3, 80.0, spatial=grid,
                 generator=_gen(1)), cal)
        cs[grid] = torch.stack([step["c"] for step in plans[0].trace])
        assert cs[grid].shape[-1] == 8  # (channel, band) units
    assert torch.equal(cs[(24, 40)], cs[(16, 16)]) and torch.equal(cs[(9, 7)], cs[(16, 16)])


def test_samples_without_a_grid_for_the_bands_use_the_per_channel_statistics():
    white = GaussianData([0.3, -0.5], [1.0, 0.7])
    cal = qdrift.calibrate(white, PlantedErrorDenoiser(white, var=0.05, seed=1),
                           white.prior(4, 80.0, spatial=(16, 16), generator=_gen(0)), CAL_SIGMAS, disable=True)
    x = white.prior(200, 80.0, generator=_gen(1))
    flat = _run("euler", PlantedErrorDenoiser(white, var=0.05, seed=2), x, cal)  # [N, C]: one band, no warning
    per_channel = _run("euler", PlantedErrorDenoiser(white, var=0.05, seed=2), x, replace(cal, banded=None))
    assert torch.equal(flat, per_channel)
    with pytest.warns(UserWarning, match=r"1x1 grid leaves 3 of the calibration's 4 frequency bands without an FFT"):
        one = qdrift.sample_euler_qdrift(PlantedErrorDenoiser(white, var=0.05, seed=2), x[..., None, None].clone(),
                                         SIGMAS, cal, disable=True)
    assert torch.equal(one[..., 0, 0], per_channel)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_a_banded_calibration_of_identical_models_corrects_as_the_per_channel_one_bit_for_bit(name):
    """No error: every gain is 1 and every c is 0 in every band, which the correction applies per channel, without an
    FFT (whose rounding would otherwise show); both round like the plain sampler up to v2's output arithmetic."""
    white = GaussianData([0.3, -0.5], [1.0, 0.7])
    cal = qdrift.calibrate(white, white, white.prior(3, 80.0, spatial=(8, 8), generator=_gen(0)), CAL_SIGMAS,
                           disable=True)
    assert cal.bands == 4 and float(cal.V.abs().max()) == 0.0
    x = white.prior(4, 80.0, spatial=(8, 8), generator=_gen(1))
    banded = _run(name, white, x, cal)
    assert torch.equal(banded, _run(name, white, x, replace(cal, banded=None)))
    assert torch.allclose(banded, _run(name, white, x), rtol=0, atol=1e-12)


def test_lower_noise_per_band_takes_each_units_share_of_the_noise_and_scale_noise_applies_it():
    from qdrift.correction import lower_noise, scale_noise

    shares = band_shares((8, 6), 4).repeat(2)  # two channels
    q = torch.tensor([0.0, 0.1, 0.0, 5.0, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    factor, left = lower_noise(2.0, q, shares)
    budget = 4.0 * shares
    assert torch.equal(factor[q == 0], torch.ones(int((q == 0).sum()), dtype=torch.float64))  # exactly 1: no change
    assert torch.allclose(factor**2 * budget, (budget - q).clamp(min=0))
    assert torch.allclose(left, (q - budget).clamp(min=0)) and float(left[3]) > 0 and float(factor[3]) == 0.0
    # the sampler's noise: each band of each channel scaled by its factor (variance by its square)
    noise = torch.randn(2000, 2, 8, 6, generator=_gen(4), dtype=torch.float64)
    lowered = scale_noise(noise, factor.reshape(2, 4))
    ratio = band_components(lowered, 4).var((0, 2, 3)) / band_components(noise, 4).var((0, 2, 3))
    assert torch.allclose(ratio, factor**2, atol=1e-12)
    assert scale_noise(noise, torch.ones(2, 4, dtype=torch.float64)).equal(noise)  # no FFT where nothing is lowered
    assert scale_noise(noise, None) is noise


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_banded_v2_lowers_each_band_of_the_noise_by_that_bands_excess(name):
    """A speckle error adds variance to the upper bands only. Where a stochastic sampler's drift cannot take all of
    it, v2 lowers the fresh noise that follows: per band, so the low band, which had nothing to lose, keeps its
    noise (lowered per channel, white, it lost its share of the upper bands' excess)."""
    cal = qdrift.calibrate(DATA, Speckle(7), DATA.prior(16, 80.0, generator=_gen(5)), CAL_SIGMAS, disable=True,
                           bands=4)
    x = DATA.prior(600, 80.0, generator=_gen(0))
    fp, q = _band_var(_run(name, DATA, x)), _band_var(_run(name, Speckle(1), x))
    left = (_band_var(_run(name, Speckle(1), x, cal, method="v2")) - fp) / (q - fp)
    # per band: 0.01 of the low band's (small) excess left for both; lowered per channel -0.30 and -0.95 (below FP)
    assert abs(float(left[0])) < 0.15, left
    assert bool((left[1:] > -0.1).all()) and bool((left[1:] < 0.6).all()), left
