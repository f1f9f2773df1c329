"""qdrift.calib: one accumulator behind calibrate() and the two-pass PairedTrace; the sampler registry."""

import functools
import importlib
import inspect
import sys

import numpy as np
import pytest
import torch

import qdrift
from qdrift.calib import PairedAccumulator, PairedTrace, calibration_from_pairs
from qdrift.samplers import REGISTRY, SAMPLERS, sampler_info, sampler_names

SIG = qdrift.get_sigmas_karras(6, 0.05, 10.0)


def fp_model(x, sigma, **kw):
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def q_model(x, sigma, **kw):  # a systematic, state-dependent error: correlated along the trajectory
    return fp_model(x, sigma) * 1.05 + 0.05 * torch.sin(x)


def noise(batch, seed):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * SIG[0]


def test_two_pass_trace_equals_calibrate_including_cross_step_sums():
    trace = PairedTrace()
    for seed in (0, 1):
        trace.fp_sampler()(fp_model, noise(4, seed), SIG, disable=True)
    for seed in (0, 1):
        trace.q_sampler()(q_model, noise(4, seed), SIG, disable=True)
    two_pass = trace.calibration()
    direct = qdrift.calibrate(fp_model, q_model, torch.cat([noise(4, 0), noise(4, 1)]), SIG, batch_size=4, disable=True)
    assert two_pass.meta["K"] == direct.meta["K"] == 8
    assert torch.allclose(two_pass.V, direct.V, rtol=1e-4, atol=1e-9)
    assert two_pass.trajectory is not None  # v2's cross-step statistics reach every host
    for name, value in direct.trajectory.tensors().items():
        assert torch.allclose(two_pass.trajectory.tensors()[name], value, rtol=1e-4, atol=1e-6), name
    rho_trace, rho_direct = two_pass.error_correlation(gain=True), direct.error_correlation(gain=True)
    assert torch.allclose(rho_trace, rho_direct, atol=1e-3)
    assert float(rho_direct[2, 3].mean()) > 0.5  # the planted error is strongly correlated between steps


def test_accumulator_merge_equals_one_pass_and_checks_shapes():
    x = torch.randn(6, 5, 2, 4, 4, dtype=torch.float64)
    d = torch.randn_like(x)
    e = d + 0.1 * torch.randn_like(x)
    one = PairedAccumulator(trim=None)
    one.add(x, d, e)
    a, b = PairedAccumulator(trim=None), PairedAccumulator(trim=None)
    a.add(x[:, :2], d[:, :2], e[:, :2])
    b.add(x[:, 2:], d[:, 2:], e[:, 2:])
    both = a.merge(b)
    assert both.count == one.count == 5
    for name, value in one.moments.tensors().items():
        assert torch.allclose(both.moments.tensors()[name], value), name
    for name, value in one.sums.tensors().items():
        assert torch.allclose(both.sums.tensors()[name], value), name
    with pytest.raises(ValueError, match="one shape"):
        one.add(x, d[:, :1], e)
    with pytest.raises(ValueError, match="earlier ones"):
        one.add(x[:3], d[:3], e[:3])
    with pytest.raises(ValueError, match=r"calibration_from_pairs: batch 0, step 0 of 6 .*D_fp has shape"):
        calibration_from_pairs(SIG, [list(x[:, :, :1].float())[:6]], [list(d.float())[:6]], [list(e.float())[:6]])


def _nan_below(level):
    """A full-precision model whose output turns NaN once sigma drops below ``level``."""

    def model(x, sigma, **kw):
        out = fp_model(x, sigma)
        return out * float("nan") if float(sigma[0]) < level else out

    return model


def _one_channel(x, sigma, **kw):
    return fp_model(x, sigma)[:, :1]


def test_two_pass_model_outputs_are_checked_at_the_call_that_got_them():
    """A wrong-shape or NaN output is refused in the pass that got it (pass, step, sigma), as the core samplers
    do, instead of a garbage Calibration or a NaN image handed back to the host."""
    trace = PairedTrace()
    with pytest.raises(ValueError, match=r"full-precision pass\): at step 0 of 6 \(sigma=10\), the model returned "
                                         r"a tensor of dtype torch.float32 and shape \(4, 1, 8, 8\)"):
        trace.fp_sampler()(_one_channel, noise(4, 0), SIG, disable=True)
    with pytest.raises(ValueError, match=r"full-precision pass\): at step 3 of 6 \(sigma=[0-9.]+\), the model "
                                         r"returned NaN or inf"):
        trace.fp_sampler()(_nan_below(float(SIG[2])), noise(4, 0), SIG, disable=True)
    assert trace.runs == []
    trace.fp_sampler()(fp_model, noise(4, 0), SIG, disable=True)
    with pytest.raises(ValueError, match=r"quantized pass\): at step 0 of 6 \(sigma=10\), the model returned .*"
                                         r"shape \(4, 1, 8, 8\)"):
        trace.q_sampler()(_one_channel, noise(4, 0), SIG, disable=True)
    with pytest.raises(ValueError, match=r"quantized pass\): at step 0 of 6 \(sigma=10\), the model returned NaN"):
        trace.q_sampler()(lambda x, s, **k: x * float("nan"), noise(4, 0), SIG, disable=True)
    assert trace.replayed == 0  # nothing garbage was kept; a good replay still works and gives the plain result
    trace.q_sampler()(q_model, noise(4, 0), SIG, disable=True)
    clean = PairedTrace()
    clean.fp_sampler()(fp_model, noise(4, 0), SIG, disable=True)
    clean.q_sampler()(q_model, noise(4, 0), SIG, disable=True)
    assert torch.equal(trace.calibration().V, clean.calibration().V)


def test_recorded_pairs_must_share_one_shape_be_floating_and_finite_at_every_step():
    x = [noise(2, 0) / (1 + k) for k in range(6)]
    fp = [fp_model(t, SIG[k:k + 1]) for k, t in enumerate(x)]
    trace = PairedTrace()
    with pytest.raises(ValueError, match=r"add_run: step 0 of 6 \(sigma=10\): D_fp has shape \(2, 1, 8, 8\), "
                                         r"expected \(2, 3, 8, 8\)"):
        trace.add_run(SIG, x, [t[:, :1] for t in fp], x[-1])
    with pytest.raises(ValueError, match=r"add_run: step 2 of 6 .*: x holds NaN or inf"):
        trace.add_run(SIG, x[:2] + [x[2] * float("nan")] + x[3:], fp, x[-1])
    with pytest.raises(ValueError, match=r"add_run: step 4 of 6 .*: x has shape \(1, 3, 8, 8\)"):
        trace.add_run(SIG, x[:4] + [x[4][:1]] + x[5:], fp, x[-1])
    with pytest.raises(ValueError, match=r"add_run: step 1 of 6 .*: D_fp must be a floating-point tensor"):
        trace.add_run(SIG, x, [fp[0], fp[1].long()] + fp[2:], x[-1])
    assert trace.runs == [] and trace.sigmas is None
    run = trace.add_run(SIG, x, fp, x[-1])
    with pytest.raises(ValueError, match=r"set_q: run 0, step 0 of 6 \(sigma=10\): D_q has shape \(2, 1, 8, 8\)"):
        trace.set_q(run, [t[:, :1] for t in fp])
    with pytest.raises(ValueError, match=r"set_q: run 0, step 5 of 6 .*: D_q holds NaN or inf"):
        trace.set_q(run, fp[:5] + [fp[5] * float("inf")])
    assert trace.replayed == 0
    q = [t * 1.05 for t in fp]
    with pytest.raises(ValueError, match=r"calibration_from_pairs: batch 1, step 3 of 6 .*: D_q holds NaN or inf"):
        calibration_from_pairs(SIG, [x, x], [fp, fp], [q, q[:3] + [q[3] * float("nan")] + q[4:]])
    with pytest.raises(ValueError, match=r"calibration_from_pairs: batch 0, step 2 of 6 .*: D_q has shape"):
        calibration_from_pairs(SIG, [x], [fp], [q[:2] + [q[2][:1]] + q[3:]])
    with pytest.raises(ValueError, match=r"calibration_from_pairs: batch 0, step 0 of 6 .*: x must be a "
                                         r"floating-point tensor, got a tensor of dtype torch.int64"):
        calibration_from_pairs(SIG, [[t.long() for t in x]], [fp], [q])
    trace.set_q(run, q)
    assert torch.equal(trace.calibration().V, calibration_from_pairs(SIG, [x], [fp], [q]).V)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([10.0, float("nan"), 1.0, 0.0], "sigmas must be finite"),
        ([float("inf"), 1.0, 0.0], "sigmas must be finite"),
        ([2.0, 1.0, 1.0, 0.0], "sigmas must be strictly decreasing"),
        ([2.0, 1.0, 0.0, 0.0], "sigmas must be strictly decreasing"),
        ([2.0, 1.0, -1.0], "sigmas must be >= 0"),
    ],
)
def test_a_bad_schedule_is_refused_at_the_first_pass_before_the_model_runs(sigmas, message):
    sig = torch.tensor(sigmas)
    calls = []

    def model(x, sigma, **kw):
        calls.append(float(sigma[0]))
        return fp_model(x, sigma)

    trace = PairedTrace()
    with pytest.raises(ValueError, match=r"full-precision pass\): " + message):
        trace.fp_sampler()(model, noise(2, 0), sig, disable=True)
    assert calls == [] and trace.sigmas is None and trace.runs == []
    steps = len(sigmas) - 1
    x = [noise(2, k) for k in range(steps)]
    with pytest.raises(ValueError, match="add_run: " + message):
        trace.add_run(sig, x, x, x[0])
    with pytest.raises(ValueError, match="calibration_from_pairs: " + message):
        calibration_from_pairs(sig, [x], [x], [x])
    trace.fp_sampler()(model, noise(2, 0), SIG, disable=True)  # the replay's schedule is checked first, too
    with pytest.raises(ValueError, match=r"quantized pass\): " + message):
        trace.q_sampler()(model, noise(2, 0), sig, disable=True)


def test_calibration_from_pairs_conditional_must_be_a_flag():
    x = [noise(2, 0) / (1 + k) for k in range(6)]
    fp = [fp_model(t, SIG[k:k + 1]) for k, t in enumerate(x)]
    q = [t * 1.05 + 0.01 * torch.sin(t) for t in fp]
    for bad in ("no", 0, None, torch.tensor([False])):
        with pytest.raises(ValueError, match="calibration_from_pairs: conditional must be True or False"):
            calibration_from_pairs(SIG, [x], [fp], [q], conditional=bad)
    plain = calibration_from_pairs(SIG, [x], [fp], [q], conditional=False)
    assert plain.conditional is False
    for same in (np.bool_(False), torch.tensor(False)):
        other = calibration_from_pairs(SIG, [x], [fp], [q], conditional=same)
        assert other.conditional is False and torch.equal(other.V, plain.V)
    trace = PairedTrace()
    trace.add_run(SIG, x, fp, x[-1])
    trace.set_q(0, q)
    with pytest.raises(ValueError, match="conditional must be True or False"):
        trace.calibration(conditional="no")


def test_old_host_module_path_still_works_with_a_warning():
    sys.modules.pop("qdrift.hosts.paired", None)
    with pytest.warns(DeprecationWarning, match="qdrift.calib.trace"):
        old = importlib.import_module("qdrift.hosts.paired")
    assert old.PairedTrace is PairedTrace and old.calibration_from_pairs is calibration_from_pairs
    from qdrift.hosts import PairedTrace as host_trace

    assert host_trace is PairedTrace


def test_one_sampler_registry():
    assert list(SAMPLERS) == list(REGISTRY) and all(SAMPLERS[n] is REGISTRY[n].fn for n in REGISTRY)
    assert sampler_names(stochastic=True) == ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]
    assert sampler_names(brownian=True) == ["dpmpp_2m_sde", "dpmpp_3m_sde"]
    assert sampler_names(multistep=True) == ["lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
    for name, info in REGISTRY.items():
        # the flags say what the function's signature takes
        params = set(inspect.signature(info.fn).parameters)
        assert ("correction" in params) == info.stochastic and "flow" in params, name
        assert ("form" in params) == info.multistep, name
        assert sampler_info(name) is info and sampler_info(info.fn) is info
        assert sampler_info(functools.partial(info.fn, V=None)) is info
    from qdrift.hosts import SAMPLER_LABELS, STOCHASTIC_SAMPLERS

    assert SAMPLER_LABELS["dpmpp_2m_sde"] == "DPM++ 2M SDE Q-Drift"
    assert STOCHASTIC_SAMPLERS == tuple(sampler_names(stochastic=True))
    with pytest.raises(ValueError, match="unknown qdrift sampler 'ddim'.*'euler'"):
        sampler_info("ddim")
    with pytest.raises(ValueError, match="unknown qdrift sampler"):
        sampler_info(print)
    with pytest.raises(ValueError, match="unknown flag"):
        sampler_names(ode=True)


def _saved_trace(path):
    trace = PairedTrace()
    trace.fp_sampler()(fp_model, noise(2, 0), SIG, disable=True)
    trace.save(path)
    return path


def _rewrite(src, dst, tensors_edit=None, header_edit=None):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["qdrift"])
    if tensors_edit is not None:
        tensors_edit(tensors)
    if header_edit is not None:
        header_edit(header)
    save_file(tensors, str(dst), metadata={"qdrift": json.dumps(header)})
    return dst


@pytest.mark.parametrize("tensors_edit,header_edit,match", [
    (lambda t: t.__setitem__("run0.final", t["run0.final"] * float("nan")), None, "'run0.final' is not finite"),
    (lambda t: t.__setitem__("run0.final", t["run0.final"][:1]), None, "inconsistent shapes"),
    (lambda t: t.__setitem__("run0.fp", t["run0.fp"].to(torch.int32)), None, "'run0.fp' is not finite floating"),
    (None, lambda h: h.__setitem__("runs", "abc"), "not a count"),
    (None, lambda h: h.__setitem__("runs", -1), "not a count"),
    (None, lambda h: h.__setitem__("runs", True), "not a count"),
    (None, lambda h: h.__setitem__("meta", "x"), "'meta' of type str"),
    (None, lambda h: h.__setitem__("meta", [1]), "'meta' of type list"),
    (None, lambda h: h.__setitem__("format_version", True), "format_version True"),
    (None, lambda h: h.__setitem__("format_version", -3), "format_version -3"),
])
def test_a_trace_file_is_checked_where_it_is_read(tmp_path, tensors_edit, header_edit, match):
    """A host keeps the first pass's trace on disk between its passes: a tampered or damaged file is refused with a
    message naming what is wrong (before, a NaN ``final`` came back as the quantized pass's image, and a negative run
    count dropped the recorded run silently)."""
    from qdrift.calib import PairedTraceError

    good = _saved_trace(tmp_path / "good.safetensors")
    assert len(PairedTrace.load(good).runs) == 1
    bad = _rewrite(good, tmp_path / "bad.safetensors", tensors_edit, header_edit)
    with pytest.raises(PairedTraceError, match=match):
        PairedTrace.load(bad)


def test_trace_paths_that_are_not_files_are_refused_clearly(tmp_path):
    from qdrift.calib import PairedTraceError

    with pytest.raises(PairedTraceError, match="is a directory"):
        PairedTrace.load(tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        PairedTrace.load(3)
    with pytest.raises(FileNotFoundError, match="PairedTrace.save: cannot write .*no such directory"):
        _saved_trace(tmp_path / "missing" / "t.safetensors")


def test_calibration_from_pairs_refuses_a_band_count_the_grid_cannot_hold():
    """A band count that leaves a radial band of the recorded latents' grid empty is refused with the band check's
    message (it used to surface as a malformed band_shares metadata error); a count the grid holds works."""
    sig = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    xs = [[torch.randn(2, 1, 2, 2, generator=g) for _ in range(2)]]
    qs = [[x + 0.1 * torch.randn(x.shape, generator=g) for x in xs[0]]]
    with pytest.raises(ValueError, match=r"calibration_from_pairs: bands=4 leaves 1 of its 4 radial frequency bands "
                                         r"without any FFT bin of x's 2x2 spatial grid .* expected bands <= 2"):
        calibration_from_pairs(sig, xs, xs, qs, bands=4)
    assert calibration_from_pairs(sig, xs, xs, qs, bands=2).bands == 2
    flat = [[x.flatten(2)[..., 0] for x in xs[0]]]  # [B, C]: no spatial axes
    with pytest.raises(ValueError, match=r"calibration_from_pairs: bands=2 needs samples with spatial axes"):
        calibration_from_pairs(sig, flat, flat, flat, bands=2)
    with pytest.raises(ValueError, match=r"calibration_from_pairs: bands must be \"auto\" or an integer >= 1 .*2.0"):
        calibration_from_pairs(sig, xs, xs, qs, bands=2.0)
