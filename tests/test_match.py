"""Moment matching (method="matched", qdrift.match_moments): each step's drift measured on the sampler itself.

On the analytic Gaussian the full-precision and planted-error samplers' final laws are known in closed form, so
how much of the excess final variance (and of a planted mean shift) the matched run removes on fresh noise is
checked against exact answers; the tables must survive the file format and reject misuse clearly.
"""

import warnings

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser
from qdrift.samplers import REGISTRY

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
CAL_SIGMAS = qdrift.get_sigmas_karras(40, 0.002, 80.0).double()
SIGMAS = qdrift.get_sigmas_karras(20, 0.002, 80.0).double()


def _prior(n, seed, spatial=()):
    return DATA.prior(n, 80.0, spatial=spatial, generator=torch.Generator().manual_seed(seed))


def _run(name, model, x, sigmas, V=None, **opts):
    if REGISTRY[name].stochastic:
        opts["noise_sampler"] = qdrift.default_noise_sampler(x, seed=3)
    return qdrift.SAMPLERS[name](model, x.clone(), sigmas, V, disable=True, **opts)


def _matched(name, sigmas=SIGMAS, **planted):
    cal = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, **planted), _prior(5, 5, (16, 16)), CAL_SIGMAS,
                           disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qdrift.match_moments(cal, DATA, PlantedErrorDenoiser(DATA, seed=9, **planted), _prior(5, 6, (16, 16)),
                                    sigmas, name)


def _final(name, cal, n=20000, method="matched", **planted):
    x = _prior(n, 0)
    fp = _run(name, DATA, x, SIGMAS)
    q = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, SIGMAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corr = _run(name, PlantedErrorDenoiser(DATA, seed=1, **planted), x, SIGMAS, cal, method=method)
    return fp, q, corr


def _removed(fp, q, corr):
    return 1 - float((corr.var(0) - fp.var(0)).sum()) / float((q.var(0) - fp.var(0)).sum())


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("error", ["independent", "correlated"])
def test_matched_removes_the_excess_variance_on_fresh_noise(name, error):
    planted = {"var": 0.1} if error == "independent" else {"var": 0.05, "persistent": 0.05}
    cal = _matched(name, **planted)
    assert cal.meta["match"]["sampler"] == name and cal.matched["V"].shape == (20, 3)
    removed = _removed(*_final(name, cal, **planted))
    assert 0.8 < removed < 1.15, removed
    # the paper's rule, for contrast, leaves a clear part of it (long steps, correlated errors)
    if name in ("euler", "euler_ancestral"):
        assert _removed(*_final(name, cal, method="paper", **planted)) < 0.75


def test_matched_mean_removes_a_bias_and_strength_zero_is_the_plain_sampler():
    planted = {"var": 0.02, "bias": 0.3}
    cal = _matched("euler", **planted)
    fp, q, corr = _final("euler", cal, **planted)
    gap_q = (q.mean(0) - fp.mean(0)).abs().sum()
    gap_corr = (corr.mean(0) - fp.mean(0)).abs().sum()
    assert float(gap_corr) < 0.2 * float(gap_q), (gap_q, gap_corr)
    x = _prior(64, 1)
    model = lambda: PlantedErrorDenoiser(DATA, seed=1, **planted)  # noqa: E731 (a fresh error stream per run)
    assert torch.equal(_run("euler", model(), x, SIGMAS, cal, strength=0.0), _run("euler", model(), x, SIGMAS))
    # variance only: no shift
    cal_var = qdrift.match_moments(cal, DATA, PlantedErrorDenoiser(DATA, seed=9, **planted), _prior(5, 6, (16, 16)),
                                   SIGMAS, "euler", mean=False)
    assert float(cal_var.matched["shift"].abs().max()) == 0.0


def test_matched_tables_file_round_trip_merge_and_errors(tmp_path):
    cal = _matched("euler", var=0.1)
    cal.save(tmp_path / "m.safetensors")
    back = qdrift.load_calibration(tmp_path / "m.safetensors")
    for k in ("sigmas", "V", "shift"):
        assert torch.equal(back.matched[k], cal.matched[k]), k
    assert back.meta["match"]["gain"] is True
    merged = cal.merge(back)
    assert torch.allclose(merged.matched["V"], cal.matched["V"])
    # a calibration with tables samples with them by default; without, method="matched" is refused
    x = _prior(16, 2)
    model = PlantedErrorDenoiser(DATA, seed=1, var=0.1)
    assert torch.equal(_run("euler", PlantedErrorDenoiser(DATA, seed=1, var=0.1), x, SIGMAS, cal),
                       _run("euler", PlantedErrorDenoiser(DATA, seed=1, var=0.1), x, SIGMAS, cal, method="matched"))
    plain = qdrift.calibrate(DATA, model, _prior(2, 5, (4, 4)), CAL_SIGMAS, disable=True)
    with pytest.raises(ValueError, match="method='matched' needs a Calibration with moment-matching tables"):
        _run("euler", model, x, SIGMAS, plain, method="matched")
    with pytest.warns(UserWarning, match="measured with the 'euler' sampler"):
        _run("heun", model, x, SIGMAS, cal)
    with pytest.raises(ValueError, match="unknown qdrift sampler 'ddim'"):
        qdrift.match_moments(cal, DATA, model, _prior(2, 5, (4, 4)), SIGMAS, "ddim")
    with pytest.raises(ValueError, match="channels"):
        qdrift.match_moments(cal, DATA, model, torch.randn(2, 2, 4, 4), SIGMAS, "euler")
    with pytest.raises(ValueError, match="may not set 'V'"):
        qdrift.match_moments(cal, DATA, model, _prior(2, 5, (4, 4)), SIGMAS, "euler", sampler_kwargs={"V": None})
    with pytest.raises(ValueError, match="matched\\['V'\\] must be finite"):
        qdrift.Calibration(cal.sigmas, cal.moments, matched={**cal.matched, "V": cal.matched["V"][:3]})


class HighFrequencyError:
    """The exact denoiser plus spatially high-pass error (noise minus its 3x3 blur): speckle, as coarse
    activations give; it adds variance mostly to the upper frequency bands."""

    data = GaussianData([0.0], [1.0])

    def __init__(self, seed, amp=0.5):
        self.g, self.amp = torch.Generator().manual_seed(seed), amp

    def __call__(self, x, sigma, **_):
        z = torch.randn(x.shape, generator=self.g, dtype=x.dtype)
        blur = torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.data.denoiser(x, sigma) - s * self.amp * (z - blur)


def test_frequency_bands_match_the_spectrum_where_one_c_per_channel_cannot():
    from qdrift.correction import frequency_bands, scale_increment, scale_increment_bands

    data = HighFrequencyError.data
    prior = lambda n, seed: data.prior(n, 80.0, spatial=(16, 16), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    cal = qdrift.calibrate(data, HighFrequencyError(1), prior(4, 5), CAL_SIGMAS, disable=True)
    per_channel = qdrift.match_moments(cal, data, HighFrequencyError(2), prior(8, 6), SIGMAS, "euler")
    banded = qdrift.match_moments(cal, data, HighFrequencyError(2), prior(8, 6), SIGMAS, "euler", bands=4)
    assert banded.matched["V"].shape == (20, 1, 4) and banded.meta["match"]["bands"] == 4
    band = frequency_bands((16, 16), 4)

    def power(y):  # [4] power per band of the centered samples
        s = torch.fft.fftn(y - y.mean(), dim=(2, 3)).abs() ** 2
        return torch.zeros(4, dtype=torch.float64).index_add_(0, band.reshape(-1), s.sum((0, 1)).reshape(-1))

    x = prior(200, 0)
    fp = power(qdrift.sample_euler_qdrift(data, x, SIGMAS, disable=True))
    q = power(qdrift.sample_euler_qdrift(HighFrequencyError(3), x, SIGMAS, disable=True))
    removed = {}
    for label, cal_ in (("channel", per_channel), ("bands", banded)):
        c = power(qdrift.sample_euler_qdrift(HighFrequencyError(3), x, SIGMAS, cal_, disable=True))
        removed[label] = (1 - (c - fp) / (q - fp)).tolist()
    assert all(0.75 < r < 1.25 for r in removed["bands"][1:]), removed  # every band with a clear excess
    assert removed["channel"][1] > 1.3, removed  # one c per channel over-smooths the low frequencies
    # one band is the per-channel rule; the FFT round trip costs rounding only
    x0, xb, c = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.2, 0.3])
    assert torch.allclose(scale_increment(xb, xb - x0, c), scale_increment_bands(xb, xb - x0, c[:, None]), atol=1e-6)
    with pytest.raises(ValueError, match="bands must be a positive integer"):
        frequency_bands((4, 4), 0)
    with pytest.raises(ValueError, match="need spatial axes"):
        qdrift.match_moments(cal, data, HighFrequencyError(2), torch.randn(4, 1), SIGMAS, "euler", bands=2)


def test_merge_keeps_matching_tables_and_their_description_together():
    """The tables and ``meta["match"]`` (which sampler they were measured with) travel together through a merge:
    before, a merge of tables measured with two samplers dropped the tables silently and kept the description, and a
    merge onto an unmatched calibration kept the tables without it (so sampling with another sampler did not warn)."""
    euler, heun = _matched("euler", var=0.1), _matched("heun", var=0.1)
    plain = qdrift.calibrate(DATA, PlantedErrorDenoiser(DATA, seed=7, var=0.1), _prior(5, 5, (16, 16)), CAL_SIGMAS,
                             disable=True)
    with pytest.warns(UserWarning, match="moment-matching tables were measured differently.*'euler' vs 'heun'"):
        mixed = euler.merge(heun)
    assert mixed.matched is None and "match" not in mixed.meta
    onto = plain.merge(euler)
    assert onto.matched is not None and onto.meta["match"]["sampler"] == "euler"
    same = euler.merge(euler)
    assert same.meta["match"]["K"] == 2 * euler.meta["match"]["K"]
    assert torch.allclose(same.matched["V"], euler.matched["V"])
