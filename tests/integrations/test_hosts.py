"""qdrift.hosts: the bound-sampler and two-pass calibration helpers every host integration uses."""

import inspect

import numpy as np
import pytest
import torch

import qdrift
from qdrift.hosts import PairedTrace, PairedTraceError, bind_sampler, calibration_from_pairs, load_calibration_cached

SIG = qdrift.get_sigmas_karras(6, 0.05, 10.0)


def gauss_denoiser(x, sigma, **kw):
    s = sigma.view(-1, 1, 1, 1)
    return x / (1 + s**2)


def noisy_denoiser(std, seed=0):
    """Adds an independent eps-space error of variance std^2: D_q = D - sigma * e."""
    g = torch.Generator().manual_seed(1000 + seed)  # independent of the starting noise's stream

    def D(x, sigma, **kw):
        s = sigma.view(-1, 1, 1, 1)
        return gauss_denoiser(x, sigma) - s * std * torch.randn(x.shape, generator=g)

    return D


def x0(batch=8, seed=1):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * SIG[0]


def test_bind_sampler_contract_and_errors():
    fn = bind_sampler("dpmpp_2m", None, form="first_order")
    assert inspect.signature(fn) == inspect.signature(qdrift.sample_dpmpp_2m_qdrift)
    out = fn(gauss_denoiser, x0(2), SIG, disable=True)
    assert torch.equal(out, qdrift.sample_dpmpp_2m_qdrift(gauss_denoiser, x0(2), SIG, disable=True))
    V = torch.full((6, 3), 0.2)
    # V bound, V passed positionally, V passed by keyword (ComfyUI's extra_options) all agree
    ref = qdrift.sample_euler_qdrift(gauss_denoiser, x0(2), SIG, V, disable=True)
    assert torch.equal(bind_sampler("euler", V)(gauss_denoiser, x0(2), SIG, disable=True), ref)
    assert torch.equal(bind_sampler("euler")(gauss_denoiser, x0(2), SIG, V, disable=True), ref)
    assert torch.equal(bind_sampler("euler")(gauss_denoiser, x0(2), SIG, V=V, disable=True), ref)
    assert not torch.allclose(ref, qdrift.sample_euler_qdrift(gauss_denoiser, x0(2), SIG, disable=True))
    # a resolver is asked at call time, with the model and extra_args
    seen = []
    fn = bind_sampler("euler", resolve=lambda model, extra: (seen.append(extra) or V, 1.0))
    assert torch.equal(fn(gauss_denoiser, x0(2), SIG, extra_args={"k": 1}, disable=True), ref) and seen == [{"k": 1}]
    with pytest.raises(ValueError, match="unknown qdrift sampler 'ddim'"):
        bind_sampler("ddim")
    with pytest.raises(ValueError, match="takes no option"):
        bind_sampler("euler", eta=1.0)
    with pytest.raises(ValueError, match="resolve must be callable"):
        bind_sampler("euler", resolve=3)


def record_and_replay(std=0.1, batches=(8,)):
    trace = PairedTrace(meta={"case": "test"})
    for b, n in enumerate(batches):
        trace.fp_sampler()(gauss_denoiser, x0(n, seed=b), SIG, disable=True)
    for b, n in enumerate(batches):
        out = trace.q_sampler()(noisy_denoiser(std, seed=b), x0(n, seed=b), SIG, disable=True)
        assert torch.allclose(out, trace.runs[b]["final"])  # the host gets the full-precision result
    return trace


def test_two_pass_recovers_planted_variance():
    trace = record_and_replay(std=0.1, batches=(16, 16))
    cal = trace.calibration(trim=None)
    assert cal.meta["K"] == 32 and cal.meta["case"] == "test"
    # Var(delta | d_hat) = v var_fp / (var_fp + v) for an independent error of variance v = 0.01
    var_fp = cal.moments.var_fp.mean(1)
    expected = 0.01 * var_fp / (var_fp + 0.01)
    assert torch.allclose(cal.V.mean(1).double(), expected, rtol=0.15)
    unconditional = trace.calibration(trim=None, conditional=False)
    assert bool((unconditional.V >= cal.V - 1e-7).all())
    assert trace.calibration(reduce="scalar").V.unique(dim=1).shape[1] == 1


def test_two_pass_equals_core_calibrate():
    trace = record_and_replay(std=0.0)
    fp = trace.runs[0]["fp"]
    q_model = lambda x, s, **k: gauss_denoiser(x, s) + 0.05 * torch.sin(x)  # noqa: E731
    trace.reset_replay()
    trace.q_sampler()(q_model, x0(8, seed=0), SIG, disable=True)
    ref = qdrift.calibrate(gauss_denoiser, q_model, x0(8, seed=0), SIG, disable=True)
    assert torch.allclose(trace.calibration().V, ref.V, rtol=1e-4, atol=1e-9)
    assert torch.equal(trace.runs[0]["fp"], fp)


def test_trace_save_load_round_trip(tmp_path):
    trace = PairedTrace(meta={"seed": 3})
    trace.fp_sampler()(gauss_denoiser, x0(4), SIG, disable=True)
    trace.save(tmp_path / "t.safetensors")
    loaded = PairedTrace.load(tmp_path / "t.safetensors")
    assert loaded.meta == {"seed": 3} and loaded.steps == 6 and loaded.replayed == 0
    assert torch.equal(loaded.runs[0]["x"], trace.runs[0]["x"]) and torch.equal(loaded.sigmas, trace.sigmas)
    loaded.q_sampler()(noisy_denoiser(0.1), x0(4), SIG, disable=True)
    loaded.save(tmp_path / "t2.safetensors")
    again = PairedTrace.load(tmp_path / "t2.safetensors")
    assert again.complete and torch.equal(again.calibration().V, loaded.calibration().V)


def test_pass_mismatches_are_clear_errors(tmp_path):
    trace = PairedTrace()
    with pytest.raises(PairedTraceError, match="no paired data"):
        trace.calibration()
    with pytest.raises(PairedTraceError, match="already replayed"):
        trace.q_sampler()(gauss_denoiser, x0(4), SIG, disable=True)
    trace.fp_sampler()(gauss_denoiser, x0(4), SIG, disable=True)
    with pytest.raises(PairedTraceError, match="different schedule"):
        trace.q_sampler()(gauss_denoiser, x0(4), qdrift.get_sigmas_karras(5, 0.05, 10.0), disable=True)
    with pytest.raises(PairedTraceError, match="batch shape"):
        trace.q_sampler()(gauss_denoiser, x0(2), SIG, disable=True)
    with pytest.raises(PairedTraceError, match="same seed"):
        trace.q_sampler()(gauss_denoiser, x0(4, seed=9), SIG, disable=True)
    with pytest.raises(FileNotFoundError):
        PairedTrace.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(PairedTraceError, match="not a readable"):
        PairedTrace.load(tmp_path / "junk.safetensors")
    cal = record_and_replay().calibration()
    cal.save(tmp_path / "cal.safetensors")
    with pytest.raises(PairedTraceError, match="not a qdrift paired trace"):
        PairedTrace.load(tmp_path / "cal.safetensors")
    with pytest.raises(ValueError, match="same number"):
        calibration_from_pairs(SIG, [], [], [])
    with pytest.raises(ValueError, match="reduce"):
        calibration_from_pairs(SIG, [[x0()]], [[x0()]], [[x0()]], reduce="pooled")


def test_load_calibration_cached(tmp_path):
    cal = record_and_replay().calibration()
    path = tmp_path / "c.safetensors"
    cal.save(path)
    a = load_calibration_cached(str(path))
    assert load_calibration_cached(str(path)) is a  # cached
    record_and_replay(std=0.3).calibration().save(path)
    import os

    os.utime(path, ns=(1, 1))
    assert load_calibration_cached(str(path)) is not a
    with pytest.raises(FileNotFoundError, match="not found"):
        load_calibration_cached(str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="non-empty"):
        load_calibration_cached("")


def test_seeds_are_read_modulo_2_64_by_every_sampler():
    """A host seed is any 64-bit integer: the SDE samplers' Brownian noise took no negative seed while Euler a did;
    now every sampler reads it modulo 2**64 (torch's own rule), so -1 is 2**64 - 1 for all of them."""
    from qdrift.hosts import seeded_noise_factory

    x = x0(2)
    for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        factory = seeded_noise_factory(name)
        a = factory(x, SIG, {"seed": -5})(SIG[1], SIG[2])
        b = factory(x, SIG, {"seed": 2**64 - 5})(SIG[1], SIG[2])
        assert torch.equal(a, b), name
        c = factory(x, SIG, {"seed": np.int64(4)})(SIG[1], SIG[2])  # numpy integers are integers
        assert torch.equal(c, factory(x, SIG, {"seed": 4})(SIG[1], SIG[2])), name
        for bad in ("abc", 1.5, 2.0, True, "7"):
            with pytest.raises(ValueError, match=f"seeded_noise_factory\\('{name}'\\): the seed must be an integer"):
                factory(x, SIG, {"seed": bad})
        with pytest.raises(ValueError, match="extra_args must be a dict or None, got str"):
            factory(x, SIG, "abc")
    # through a bound sampler, as ComfyUI's KSAMPLER reaches it
    fn = bind_sampler("dpmpp_2m_sde", noise_sampler_factory=seeded_noise_factory("dpmpp_2m_sde"))
    out = fn(gauss_denoiser, x, SIG, extra_args={"seed": -1}, disable=True)
    assert torch.equal(out, fn(gauss_denoiser, x, SIG, extra_args={"seed": 2**64 - 1}, disable=True))


def test_bind_sampler_checks_its_callables_and_extra_args():
    with pytest.raises(ValueError, match="noise_sampler_factory must be None or a callable"):
        bind_sampler("euler_ancestral", noise_sampler_factory=5)
    for bad, got in ((None, "got None"), ((None,), "got a 1-tuple"), ((None, 1.0, 2), "got a 3-tuple")):
        fn = bind_sampler("euler", resolve=lambda model, extra, bad=bad: bad)
        with pytest.raises(ValueError, match=rf"bind_sampler\('euler'\): resolve\(model, extra_args\) must return a pair \(V, strength\), {got}"):
            fn(gauss_denoiser, x0(2), SIG, disable=True)
    fn = bind_sampler("euler_ancestral", noise_sampler_factory=lambda x, s, e: None)
    with pytest.raises(ValueError, match="sample_euler_ancestral_qdrift: extra_args must be a dict or None, got str"):
        fn(gauss_denoiser, x0(2), SIG, extra_args="abc", disable=True)


def test_directory_and_one_channel_calibrations_are_refused_naming_the_file(tmp_path):
    from qdrift.hosts import check_calibration_channels

    with pytest.raises(qdrift.CalibrationFileError, match="is a directory"):
        load_calibration_cached(str(tmp_path))
    one = qdrift.calibrate(gauss_denoiser, noisy_denoiser(0.1), x0(4)[:, :1], SIG, disable=True)
    assert one.channels == 1
    # the samplers refuse a 1-channel Calibration on a 3-channel latent: the host check refuses it first, naming it
    with pytest.raises(ValueError, match="belongs to another model"):
        qdrift.sample_euler_qdrift(gauss_denoiser, x0(2), SIG, one, disable=True)
    with pytest.raises(ValueError, match=r"Q-Drift: the calibration one\.safetensors was measured on a 1-channel latent, but the model has 3"):
        check_calibration_channels(one, 3, source="one.safetensors")
    check_calibration_channels(one, 1, source="one.safetensors")  # its own channel count passes
    with pytest.raises(ValueError, match="channels must be an integer >= 1, got 'abc'"):
        check_calibration_channels(one, "abc", source="one.safetensors")


def test_flow_sde_sigmas_names_bad_input():
    """A list or a 2-D schedule used to fail with a bare torch or attribute error."""
    from qdrift.hosts import flow_sde_sigmas

    for bad in ([1.0, 0.5, 0.0], torch.ones(2, 3)):
        with pytest.raises(ValueError, match="flow_sde_sigmas: sigmas must be a 1-D tensor"):
            flow_sde_sigmas(bad)
    with pytest.raises(ValueError, match="start must be a finite number > 0"):
        flow_sde_sigmas(torch.tensor([1.0, 0.5, 0.0]), float("nan"))
    assert float(flow_sde_sigmas(torch.tensor([1.0, 0.5, 0.0]))[0]) == pytest.approx(1 - 1e-4)
