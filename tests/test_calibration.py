"""Calibration: recovery of a planted V, streaming/merging, distributed, interpolation, file format."""

import json
import os

import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData, PlantedErrorDenoiser
from qdrift.calib import CalibrationFileError, PairedMoments, batch_moments

DATA = GaussianData([0.5, -1.0, 0.0], [1.0, 0.5, 2.0])
SIGMAS = qdrift.get_sigmas_karras(12, 0.01, 40.0).double()


def _noise(k, seed=0, spatial=(16, 16)):
    return DATA.prior(k, float(SIGMAS[0]), spatial=spatial, generator=torch.Generator().manual_seed(seed))


def test_recovers_planted_variance():
    """Pure planted noise: Var(delta) is v at every step; Var(delta | d_hat) matches the closed form at step 0."""
    v = torch.tensor([0.05, 0.2, 0.1], dtype=torch.float64)
    q = PlantedErrorDenoiser(DATA, var=v, seed=3)
    x = _noise(40)
    uncond = qdrift.calibrate(DATA, q, x, SIGMAS, conditional=False, trim=None, disable=True)
    assert torch.allclose(uncond.V.double(), v.expand(12, 3), rtol=0.05)
    cond = uncond.with_options(conditional=True)
    expected0 = q.conditional_variance(float(SIGMAS[0]))  # x_0 is drawn from the exact marginal
    assert torch.allclose(cond.V[0].double(), expected0, rtol=0.05)
    assert bool((cond.V <= uncond.V + 1e-6).all())


def test_recovers_conditional_variance_with_gain():
    """A gain error is mostly predictable from d_hat: the conditional V is far below Var(delta)."""
    q = PlantedErrorDenoiser(DATA, var=0.02, gain=0.3, seed=4)
    cal = qdrift.calibrate(DATA, q, _noise(40), SIGMAS, trim=None, disable=True)
    sigma0 = float(SIGMAS[0])
    assert torch.allclose(cal.V[0].double(), q.conditional_variance(sigma0), rtol=0.08)
    assert torch.allclose(cal.moments.var_delta[0], q.unconditional_variance(sigma0), rtol=0.08)
    assert bool((cal.V[0].double() < 0.5 * q.unconditional_variance(sigma0)).all())


def test_scalar_reduce_pools_channels():
    q = PlantedErrorDenoiser(DATA, var=[0.05, 0.2, 0.1], seed=3)
    cal = qdrift.calibrate(DATA, q, _noise(10), SIGMAS, reduce="scalar", conditional=False, trim=None, disable=True)
    assert cal.V.shape == (12, 3)
    assert torch.equal(cal.V[:, 0], cal.V[:, 1])
    assert torch.allclose(cal.V[:, 0].double(), torch.full((12,), 0.35 / 3, dtype=torch.float64), rtol=0.05)


def test_trim_drops_outliers():
    a = torch.randn(4, 2, 50, 50, dtype=torch.float64)
    b = a + 0.1 * torch.randn_like(a)
    b[0, 0, 0, 0] += 1000.0  # one wild pair
    kept = batch_moments(a, b, trim=4.0)
    raw = batch_moments(a, b, trim=None)
    assert float(kept.var_delta[0, 0]) < 0.02 < float(raw.var_delta[0, 0])
    assert kept.n[0, 0] < raw.n[0, 0] and kept.n[0, 1] <= raw.n[0, 1]


def test_merge_equals_one_run():
    q = PlantedErrorDenoiser(DATA, var=0.1, seed=0)
    x = _noise(8)
    whole = qdrift.calibrate(DATA, _Reseeding(q), x, SIGMAS, batch_size=4, disable=True)
    first = qdrift.calibrate(DATA, _Reseeding(q), x[:4], SIGMAS, disable=True)
    second = qdrift.calibrate(DATA, _Reseeding(q, start=1), x[4:], SIGMAS, disable=True)
    merged = first.merge(second)
    for k, v in whole.moments.tensors().items():
        assert torch.allclose(v, merged.moments.tensors()[k], rtol=1e-12, atol=1e-12), k
    assert merged.meta["K"] == 8


def test_trimmed_statistics_do_not_depend_on_batching():
    """Trimming is per sample, so any split of the same samples gives the same statistics."""

    def quantized(x, sigma, **kw):  # deterministic small errors plus one wild pixel that trimming drops
        err = 0.01 * torch.sin(7 * x)
        err[..., 0, 0] += 5.0
        return DATA.denoiser(x, sigma) + err

    x = _noise(8, spatial=(6, 6))
    one = qdrift.calibrate(DATA, quantized, x, SIGMAS, batch_size=None, disable=True)
    singles = qdrift.calibrate(DATA, quantized, x, SIGMAS, batch_size=1, disable=True)
    halves = qdrift.calibrate(DATA, quantized, x[:5], SIGMAS, disable=True).merge(
        qdrift.calibrate(DATA, quantized, x[5:], SIGMAS, disable=True))
    untrimmed = qdrift.calibrate(DATA, quantized, x, SIGMAS, trim=None, disable=True)
    for other in (singles, halves):
        for k, v in one.moments.tensors().items():
            assert torch.allclose(v, other.moments.tensors()[k], rtol=1e-10, atol=1e-12), k
    assert bool((one.moments.n < untrimmed.moments.n).any())  # trimming did drop something


def test_merge_rejects_mismatched_calibrations():
    x = _noise(2, spatial=(4, 4))
    a = qdrift.calibrate(DATA, DATA, x, SIGMAS, disable=True)
    b = qdrift.calibrate(DATA, DATA, x, SIGMAS, trim=None, disable=True)
    with pytest.raises(ValueError, match="trim"):
        a.merge(b)
    assert (a == b) is False and a in [a]  # identity comparison, no tensor truth-value error


class _Reseeding:
    """The planted model with a fixed seed per batch, so the same batch gets the same noise in any run."""

    def __init__(self, q, start=0):
        self.q, self.batch, self.steps = q, start, 0

    def __call__(self, x, sigma, **kw):
        if self.steps % len(SIGMAS[:-1]) == 0:
            self.q.generator.manual_seed(1000 + self.batch)
            self.batch += 1
        self.steps += 1
        return self.q(x, sigma)


def test_streaming_iterable_equals_tensor_and_splits_extra_args():
    calls = []

    def fp(x, sigma, label=None):
        calls.append(label.clone())
        return DATA.denoiser(x, sigma) + 0.01 * label.reshape(-1, 1, 1, 1)

    def q(x, sigma, label=None):
        return DATA.denoiser(x, sigma) + 0.02 * label.reshape(-1, 1, 1, 1)

    x = _noise(6, spatial=(4, 4))
    labels = torch.arange(6.0)
    a = qdrift.calibrate(fp, q, x, SIGMAS, {"label": labels}, batch_size=2, disable=True)
    assert torch.equal(calls[0], labels[:2])
    batches = ((x[i:i + 2], {"label": labels[i:i + 2]}) for i in range(0, 6, 2))
    b = qdrift.calibrate(fp, q, batches, SIGMAS, disable=True)
    assert torch.equal(a.V, b.V) and a.meta["K"] == b.meta["K"] == 6


def test_at_interpolates_in_log_sigma_and_clamps():
    cal = _toy_calibration()
    assert torch.allclose(cal.at(cal.sigmas), cal.V)
    s = cal.sigmas
    mid = (s[3].log() * 0.25 + s[4].log() * 0.75).exp()
    expected = cal.V[3] * 0.25 + cal.V[4] * 0.75
    assert torch.allclose(cal.at(mid[None])[0], expected, rtol=1e-5)
    assert torch.equal(cal.at(torch.tensor([1e6, 0.0])), torch.stack([cal.V[0], cal.V[-1]]))
    # one calibration serves any step count
    other = qdrift.get_sigmas_karras(37, 0.005, 100.0)
    assert cal.at(other[:-1]).shape == (37, 3)


@pytest.mark.parametrize("levels", [[-1.0], [float("nan")], torch.tensor([1.0 + 1j]), torch.tensor([True]),
                                    torch.ones(2, 2), None])
def test_reading_a_calibration_at_levels_that_are_not_noise_levels_is_refused(levels):
    """A negative level used to read silently as the last one; NaN gave NaN tables from moments_at and
    error_model; a complex query lost its imaginary part with only a torch warning."""
    cal = _toy_calibration()
    for read in (cal.at, cal.moments_at, lambda s: cal.error_model(s, gain=True)):
        with pytest.raises(ValueError, match="sigmas must be"):
            read(levels)


def _toy_calibration():
    q = PlantedErrorDenoiser(DATA, var=0.1, gain=0.1, seed=0)
    return qdrift.calibrate(DATA, q, _noise(4, spatial=(8, 8)), SIGMAS, disable=True)


def test_sampler_accepts_calibration_at_any_schedule():
    cal = _toy_calibration()
    x = DATA.prior(32, 80.0, generator=torch.Generator().manual_seed(1))
    sigmas = qdrift.get_sigmas_karras(25, 0.002, 80.0).double()
    out = qdrift.sample_euler_qdrift(DATA, x, sigmas, cal, disable=True, method="paper")
    ref = qdrift.sample_euler_qdrift(DATA, x, sigmas, cal.at(sigmas[:-1]), disable=True)
    assert torch.equal(out, ref)


def test_save_load_roundtrip(tmp_path):
    cal = _toy_calibration().with_options(reduce="scalar")
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    back = qdrift.load_calibration(path)
    assert torch.equal(back.V, cal.V) and torch.equal(back.sigmas, cal.sigmas)
    assert back.reduce == "scalar" and back.conditional is True
    assert back.meta["K"] == 4 and back.meta["qdrift_version"] == qdrift.__version__
    assert len(back.meta["schedule"]) == len(SIGMAS)


def test_file_is_safetensors_not_pickle(tmp_path):
    path = tmp_path / "cal.safetensors"
    _toy_calibration().save(path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert "qdrift" in header["__metadata__"] and not raw.startswith(b"\x80")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_metadata", "wrong_format", "newer", "nan", "shape",
                                    "meta_list", "version_bool", "empty_counts", "correlation_above_one"])
def test_load_rejects_bad_files(tmp_path, damage):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    good = tmp_path / "good.safetensors"
    cal = _toy_calibration()
    cal.save(good)
    tensors = {"sigmas": cal.sigmas, **cal.moments.tensors()}
    header = {"format": "qdrift.calibration", "format_version": 1, "reduce": "channel", "conditional": True, "meta": {}}
    if damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[:-40])
    elif damage == "no_metadata":
        save_file(tensors, str(path))
    elif damage == "wrong_format":
        save_file(tensors, str(path), metadata={"qdrift": json.dumps({**header, "format": "other"})})
    elif damage == "newer":
        save_file(tensors, str(path), metadata={"qdrift": json.dumps({**header, "format_version": 99})})
    elif damage == "nan":
        tensors["m2_q"] = tensors["m2_q"].clone()
        tensors["m2_q"][0, 0] = float("nan")
        save_file(tensors, str(path), metadata={"qdrift": json.dumps(header)})
    elif damage == "shape":
        tensors["n"] = tensors["n"][:, :2].contiguous()
        save_file(tensors, str(path), metadata={"qdrift": json.dumps(header)})
    elif damage == "meta_list":
        save_file(tensors, str(path), metadata={"qdrift": json.dumps({**header, "meta": [1, 2]})})
    elif damage == "version_bool":
        save_file(tensors, str(path), metadata={"qdrift": json.dumps({**header, "format_version": True})})
    elif damage == "empty_counts":
        tensors["n"] = torch.zeros_like(tensors["n"])
        save_file(tensors, str(path), metadata={"qdrift": json.dumps(header)})
    elif damage == "correlation_above_one":
        tensors["c_fq"] = (tensors["m2_fp"] * tensors["m2_q"]).sqrt() * 2 + 1
        save_file(tensors, str(path), metadata={"qdrift": json.dumps(header)})
    with pytest.raises(CalibrationFileError):
        qdrift.load_calibration(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        qdrift.load_calibration(tmp_path / "nope.safetensors")


def test_calibrate_rejects_bad_input():
    x = _noise(2, spatial=(4, 4))
    with pytest.raises(ValueError, match="reduce"):
        qdrift.calibrate(DATA, DATA, x, SIGMAS, reduce="pixel", disable=True)
    with pytest.raises(ValueError, match="shaped like x"):
        qdrift.calibrate(DATA, lambda x, s: x[:, :1], x, SIGMAS, disable=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        qdrift.calibrate(DATA, DATA, x, SIGMAS.flip(0), disable=True)
    calls = []
    with pytest.raises(ValueError, match="strictly decreasing"):  # checked before any model call
        qdrift.calibrate(lambda x, s: calls.append(1) or x, DATA, x, torch.tensor([20.0, 20.0, 5.0, 0.0]), disable=True)
    assert calls == []
    with pytest.raises(ValueError, match="no samples"):
        qdrift.calibrate(DATA, DATA, x[:0], SIGMAS, disable=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        qdrift.calibrate(DATA, lambda x, s: x * float("nan"), x, SIGMAS, disable=True)
    with pytest.raises(ValueError, match="iterable"):
        qdrift.calibrate(DATA, DATA, [1, 2], SIGMAS, disable=True)
    with pytest.raises(ValueError, match="trim"):
        qdrift.calibrate(DATA, DATA, x, SIGMAS, trim=-1, disable=True)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.complex64])
def test_calibrate_refuses_a_non_floating_output(dtype):
    """As the samplers do: an int output used to be accepted, a bool one failed inside the subtraction."""
    x = _noise(2, spatial=(4, 4))
    with pytest.raises(ValueError, match=rf"model_q must return a floating-point.*{dtype}.*step 0"):
        qdrift.calibrate(DATA, lambda x, s: DATA(x, s).to(dtype), x, SIGMAS, disable=True)


def test_calibrate_refuses_statistics_that_overflow(tmp_path):
    """Finite outputs too large to square in float64 used to give an all-NaN V (and a file load refuses)."""
    x = _noise(2, spatial=(4, 4)).double()
    with pytest.raises(ValueError, match="holds NaN or inf.*too large"):
        qdrift.calibrate(DATA, lambda x, s: DATA(x, s) * 1e200, x, SIGMAS, disable=True)


def test_pooled_moments_equal_moments_of_pooled_data():
    a = torch.randn(3, 4, 10, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0]).reshape(1, 4, 1)
    b = a * 1.1 + torch.randn_like(a) * 0.3
    pooled = batch_moments(a, b, trim=None).pooled()
    flat = batch_moments(a.transpose(0, 1).reshape(1, 1, -1), b.transpose(0, 1).reshape(1, 1, -1), trim=None)
    for k, v in pooled.tensors().items():
        assert torch.allclose(v, flat.tensors()[k], rtol=1e-10), k


def test_paired_moments_validation():
    with pytest.raises(ValueError):
        PairedMoments.zeros(3, 2).merge(PairedMoments.zeros(2, 2))
