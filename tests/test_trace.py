"""qdrift.calib: one accumulator behind calibrate() and the two-pass PairedTrace; the sampler registry."""

import functools
import importlib
import inspect
import sys

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
    with pytest.raises(ValueError, match="calibration_from_pairs: states"):
        calibration_from_pairs(SIG, [list(x[:, :, :1].float())[:6]], [list(d.float())[:6]], [list(e.float())[:6]])


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
        assert ("correction" in params) == info.stochastic == ("flow" in params), name
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
