"""The ComfyUI nodes, called the way ComfyUI calls them (stand-in host: see comfy_standin.py)."""

import importlib.util
import inspect
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

import comfy_standin
import qdrift
import qdrift.hosts
from qdrift.hosts import seeded_noise_factory

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "integrations" / "comfyui"


HOST_MODULES = ("comfy", "comfy.samplers", "comfy.sample", "comfy.utils", "folder_paths", "comfy_api", "comfy_api.v0_0_2")
PACK = "qdrift_comfyui_nodes_under_test"


def load_pack():
    """ComfyUI imports custom_nodes/<name>/__init__.py as a package named after the folder."""
    spec = importlib.util.spec_from_file_location(PACK, NODE_DIR / "__init__.py", submodule_search_locations=[str(NODE_DIR)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


def _host(tmp_path, v3):
    saved = {k: sys.modules.get(k) for k in HOST_MODULES}
    ns = comfy_standin.install(tmp_path, v3=v3)
    try:
        pack = load_pack()
        comfy_standin.ProgressBar.instances.clear()
        yield pack, ns, tmp_path
    finally:
        for k in [m for m in sys.modules if m == PACK or m.startswith(PACK + ".")]:
            del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture()
def host(tmp_path):
    """A ComfyUI without comfy_api.v0_0_2: the pack exports the classic form."""
    yield from _host(tmp_path, v3=False)


@pytest.fixture()
def host_v3(tmp_path):
    """ComfyUI v0.3.64: comfy_api.v0_0_2 is there, the pack exports the V3 entry point."""
    yield from _host(tmp_path, v3=True)


def cond(value):
    return [[torch.full((1, 3, 8), float(value)), {}]]


def models(flow=False, error=0.3, **kw):
    fp = comfy_standin.ModelPatcher(comfy_standin.ToyNet(flow=flow, **kw))
    q = comfy_standin.ModelPatcher(comfy_standin.ToyNet(flow=flow, error=error, **kw))
    return fp, q


def sigmas_for(flow):
    return torch.linspace(1.0, 0.0, 7) if flow else qdrift.get_sigmas_karras(6, 0.03, 14.6)


def calibrate(pack, fp, q, flow=False, K=3, reduce="channel", **optional):
    node = pack.NODE_CLASS_MAPPINGS["QDriftCalibrate"]()
    latent = {"samples": torch.zeros(1, 4, 6, 6)}
    return node.calibrate(fp, q, cond(1.0), cond(0.0), latent, sigmas_for(flow), 3.0, 123, K, reduce, "qdrift/test",
                          **optional)


def test_registration_surface(host):
    pack, _, _ = host
    assert set(pack.NODE_CLASS_MAPPINGS) == {"QDriftCalibrate", "QDriftSampler"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"QDriftCalibrate": "Q-Drift Calibrate", "QDriftSampler": "Q-Drift Sampler"}
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional"}
        for section in spec.values():
            for name, entry in section.items():
                kind = entry[0]
                assert isinstance(kind, (str, list)), name
                if isinstance(kind, list) and len(entry) > 1 and "default" in entry[1]:
                    assert entry[1]["default"] in kind, name
        assert callable(getattr(cls, cls.FUNCTION)) and isinstance(cls.RETURN_TYPES, tuple)
    choices = pack.NODE_CLASS_MAPPINGS["QDriftSampler"].INPUT_TYPES()["required"]["sampler_name"][0]
    assert choices == list(qdrift.SAMPLERS)


@pytest.mark.parametrize("flow", [False, True])
def test_calibrate_node_writes_a_calibration(host, flow):
    pack, _, out = host
    fp, q = models(flow)
    cal, path = calibrate(pack, fp, q, flow=flow)
    assert os.path.isfile(path) and path.startswith(str(out)) and path.endswith(".safetensors")
    loaded = qdrift.load_calibration(path)
    assert loaded.steps == 6 and loaded.channels == 4 and loaded.meta["K"] == 3 and loaded.meta["host"] == "comfyui"
    assert loaded.meta["prediction_type"] == ("CONST" if flow else "EPS")
    assert torch.allclose(loaded.V, cal.V) and bool((cal.V > 0).all())
    bar = comfy_standin.ProgressBar.instances[-1]
    passes = 2 if flow else 3  # the ticked size_drift box does not size a flow model (measured worse there)
    assert bar.total == bar.current == 6 * passes  # the passes report through ComfyUI's progress bar
    if flow:
        assert "drift_scale" not in loaded.meta
    else:
        assert loaded.meta["drift_scale"]["K"] == 3 and loaded.meta["drift_scale"]["sampler"] == "euler"
        assert torch.equal(loaded.drift_scale, cal.drift_scale)
    # a second run does not overwrite the first
    _, path2 = calibrate(pack, fp, q, flow=flow)
    assert path2 != path


def test_calibrate_sizes_a_flow_model_only_when_asked(host):
    """size_drift: the node's ticked box ("auto") skips the sizing pass on a flow model; calibrate(size_drift=True)
    still runs it there; anything but True, False or "auto" is refused before any pass."""
    pack, ns, _ = host
    fp, q = models(flow=True)
    forced, _ = sys.modules[PACK + ".nodes"].calibrate(fp, q, cond(1.0), cond(0.0), {"samples": torch.zeros(1, 4, 6, 6)},
                                          sigmas_for(True), 3.0, 123, 3, "channel", "qdrift/test", size_drift=True)
    assert forced.meta["drift_scale"]["K"] == 3 and comfy_standin.ProgressBar.instances[-1].total == 18
    auto, _ = calibrate(pack, fp, q, flow=True)
    assert "drift_scale" not in auto.meta and torch.equal(auto.V, forced.V)
    with pytest.raises(ValueError, match=r"Q-Drift Calibrate: size_drift must be True, False or 'auto', got 'yes'"):
        sys.modules[PACK + ".nodes"].calibrate(fp, q, cond(1.0), cond(0.0), {"samples": torch.zeros(1, 4, 6, 6)},
                                  sigmas_for(True), 3.0, 123, 3, "channel", "qdrift/test", size_drift="yes")


def test_calibrate_node_pairs_after_cfg_and_finds_zero_for_identical_models(host):
    pack, _, _ = host
    fp, _ = models()
    cal, _ = calibrate(pack, fp, fp)
    assert torch.equal(cal.V, torch.zeros_like(cal.V))


def test_calibration_matches_core_calibrate(host):
    """Pairs through the host's guider give the core's calibration of the same guided denoisers."""
    pack, ns, _ = host
    fp, q = models(error=0.3)
    cal, _ = calibrate(pack, fp, q, K=2)
    sig = sigmas_for(False)

    def guided(patcher):
        g = ns.comfy_samplers.CFGGuider(patcher)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        g.inner_model = patcher.model
        return lambda x, s, **kw: g(x, s)

    noise = comfy_standin.prepare_noise(torch.zeros(2, 4, 6, 6), 123)
    x0 = noise * (1 + sig[0] ** 2) ** 0.5  # sigmas[0] == sigma_max: ComfyUI's max_denoise noise scaling
    ref = qdrift.calibrate(guided(fp), guided(q), x0, sig, disable=True)
    assert torch.allclose(cal.V, ref.V, rtol=1e-3, atol=1e-7)
    # the third pass sizes the drift as qdrift.size_drift does with both guided models in hand
    sized = qdrift.size_drift(cal, guided(fp), guided(q), x0, sig, "euler")
    for key in ("measured", "measured_sq", "predicted"):
        assert cal.meta["drift_scale"][key] == pytest.approx(sized.meta["drift_scale"][key], rel=1e-3), key
    plain, _ = calibrate(pack, fp, q, K=2, size_drift=False)
    assert "drift_scale" not in plain.meta and torch.equal(plain.V, cal.V)
    assert comfy_standin.ProgressBar.instances[-1].total == 12


@pytest.mark.parametrize("name", list(qdrift.SAMPLERS))
def test_sampler_node_through_ksampler(host, name):
    pack, ns, _ = host
    fp, q = models()
    cal, path = calibrate(pack, fp, q)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    (sampler,) = node.get_sampler(name, os.path.relpath(path, host[2]), "as calibrated", 1.0)
    assert isinstance(sampler, ns.comfy_samplers.KSAMPLER)
    sig = sigmas_for(False)
    noise = comfy_standin.prepare_noise(torch.zeros(2, 4, 6, 6), 5)
    steps = []
    guider = ns.comfy_samplers.CFGGuider(q)
    guider.set_conds(cond(1.0), cond(0.0))
    guider.set_cfg(3.0)
    out = guider.sample(noise, torch.zeros_like(noise), sampler, sig, callback=lambda i, d, x, n: steps.append((i, n)), seed=9)
    assert torch.isfinite(out).all() and steps == [(i, 6) for i in range(6)]
    # the same through the core directly, with the node's seeded noise
    guider2 = ns.comfy_samplers.CFGGuider(q)
    guider2.set_conds(cond(1.0), cond(0.0))
    guider2.set_cfg(3.0)
    guider2.inner_model = q.model
    fn = qdrift.SAMPLERS[name]
    params = inspect.signature(fn).parameters
    x0 = noise * (1 + sig[0] ** 2) ** 0.5  # ComfyUI's max_denoise noise scaling
    kw = {"eta": 1.0} if "eta" in params else {}
    kw.update(pack.nodes.HOST_OPTIONS.get(name, {}))  # where ComfyUI's sampler differs from k-diffusion's
    noise_sampler = seeded_noise_factory(name)(x0, sig, {"seed": 9})
    if "noise_sampler" in params and noise_sampler is not None:
        kw["noise_sampler"] = noise_sampler
    ref = fn(lambda x, s, **k: guider2(x, s), x0, sig, cal, disable=True, **kw)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "euler_ancestral"])
def test_correction_auto_is_the_samplers_default(host, name):
    """The node's correction "auto" passes nothing (the sampler's default: noise first for the DPM++ SDE samplers
    with v2, the drift for Euler a); "drift" and "noise" are passed as given."""
    pack, ns, _ = host
    fp, q = models(error=0.3)
    cal, path = calibrate(pack, fp, q)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    noise = comfy_standin.prepare_noise(torch.zeros(2, 4, 6, 6), 5)

    def run(**knobs):
        (sampler,) = node.get_sampler(name, os.path.relpath(path, host[2]), "as calibrated", 1.0, **knobs)
        guider = ns.comfy_samplers.CFGGuider(q)
        guider.set_conds(cond(1.0), cond(0.0))
        guider.set_cfg(3.0)
        return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas_for(False), seed=9)

    auto, drift, lowered = run(correction="auto"), run(correction="drift"), run(correction="noise")
    assert torch.equal(auto, run())
    default = "noise" if name == "dpmpp_2m_sde" else "drift"
    assert torch.equal(auto, lowered if default == "noise" else drift)
    assert not torch.equal(drift, lowered)


def test_strength_zero_equals_kdiffusion_euler(host, kdiff):
    pack, ns, _ = host
    fp, q = models()
    cal, _ = calibrate(pack, fp, q)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    sig = sigmas_for(False)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 1)

    def run(sampler):
        g = ns.comfy_samplers.CFGGuider(q)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        return g.sample(noise, torch.zeros_like(noise), sampler, sig, seed=1)

    plain = run(ns.comfy_samplers.KSAMPLER(kdiff.sample_euler))
    (off,) = node.get_sampler("euler", "", "as calibrated", 0.0, calibration=cal)
    (on,) = node.get_sampler("euler", "", "as calibrated", 1.0, calibration=cal)
    assert torch.allclose(run(off), plain, atol=1e-6)
    assert not torch.allclose(run(on), plain, atol=1e-4)


def test_seeded_ancestral_noise_is_reproducible(host):
    pack, ns, _ = host
    fp, q = models()
    cal, _ = calibrate(pack, fp, q)
    (sampler,) = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]().get_sampler("euler_ancestral", "", "scalar", 1.0, calibration=cal, eta=1.0)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 1)

    def run(seed):
        g = ns.comfy_samplers.CFGGuider(q)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        return g.sample(noise, torch.zeros_like(noise), sampler, sigmas_for(False), seed=seed)

    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


def test_is_changed_follows_the_file(host):
    pack, _, out = host
    cls = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]
    assert cls.IS_CHANGED("euler", "nope", "as calibrated", 1.0) == ""
    fp, q = models()
    _, path = calibrate(pack, fp, q)
    first = cls.IS_CHANGED("euler", path, "as calibrated", 1.0)
    os.utime(path, ns=(1, 1))
    assert first and cls.IS_CHANGED("euler", path, "as calibrated", 1.0) != first


def test_clear_errors(host):
    pack, _, out = host
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    with pytest.raises(FileNotFoundError, match="missing_cal"):
        node.get_sampler("euler", "missing_cal", "as calibrated", 1.0)
    with pytest.raises(ValueError, match="no calibration file"):
        node.get_sampler("euler", "  ", "as calibrated", 1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        pack.nodes.build_sampler("ddim", None)
    with pytest.raises(ValueError, match="not a qdrift Calibration"):
        node.get_sampler("euler", "", "as calibrated", 1.0, calibration="x")
    fp, _ = models()
    flow_fp, _ = models(flow=True)
    with pytest.raises(ValueError, match=r"different prediction types \(EPS vs CONST\)"):
        calibrate(pack, fp, flow_fp)
    with pytest.raises(ValueError, match="relative to the output folder"):
        pack.NODE_CLASS_MAPPINGS["QDriftCalibrate"]._next_path("../escape")
    bad = out / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        node.get_sampler("euler", str(bad), "as calibrated", 1.0)


def _guider(ns, q, inner=False):
    """ComfyUI's CFG guider on ``q`` at scale 1 (conditional only); ``inner`` exposes the model as a denoiser."""
    g = ns.comfy_samplers.CFGGuider(q)
    g.set_conds(cond(1.0), cond(0.0))
    g.set_cfg(1.0)
    if inner:
        g.inner_model = q.model
    return g


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_flow_model_as_comfyui_presents_it(host, name):
    """SD3/FLUX: sigma = flow time, D = x - t v; the node tells the sampler it samples a flow (v2's drift is then
    along the score), and is otherwise the core sampler."""
    pack, ns, _ = host
    fp, q = models(flow=True)
    cal, _ = calibrate(pack, fp, q, flow=True)
    sig = sigmas_for(True)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 2)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()

    def run(strength):
        (sampler,) = node.get_sampler(name, "", "as calibrated", strength, calibration=cal)
        return _guider(ns, q).sample(noise, torch.zeros_like(noise), sampler, sig, seed=2)

    on, off = run(1.0), run(0.0)
    assert torch.isfinite(on).all() and not torch.allclose(on, off, atol=1e-5)
    # and it is the core sampler on the guided flow denoiser (sigma = t, noise scaled by t)
    g = _guider(ns, q, inner=True)
    ref = qdrift.SAMPLERS[name](lambda x, s, **k: g(x, s), noise * sig[0], sig, cal, disable=True, flow=True)
    assert torch.allclose(on, ref, atol=1e-5)
    ve = qdrift.SAMPLERS[name](lambda x, s, **k: g(x, s), noise * sig[0], sig, cal, disable=True)
    assert not torch.allclose(on, ve, atol=1e-5)  # the flow form's drift is not the VE one


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_run_flow_models_in_the_flow_form(host, name):
    """ComfyUI samples flow models with its RF formulas; the node passes flow=True (they used to be refused), and
    for the SDE samplers starts below t = 1 with the Brownian noise laid over the schedule as given."""
    pack, ns, _ = host
    fp, q = models(flow=True)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    cal, _ = calibrate(pack, fp, q, flow=True)
    sig = sigmas_for(True)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 2)

    def run(strength):
        (sampler,) = node.get_sampler(name, "", "as calibrated", strength, calibration=cal)
        return _guider(ns, q).sample(noise, torch.zeros_like(noise), sampler, sig, seed=2)

    on, off = run(1.0), run(0.0)
    assert torch.isfinite(on).all() and not torch.allclose(on, off, atol=1e-5)
    g = _guider(ns, q, inner=True)
    x0 = noise * sig[0]
    kw = {"flow": True, "noise_sampler": seeded_noise_factory(name)(x0, sig, {"seed": 2})}
    ref_sig = qdrift.hosts.flow_sde_sigmas(sig) if name != "euler_ancestral" else sig
    ref = qdrift.SAMPLERS[name](lambda x, s, **k: g(x, s), x0, ref_sig, cal, disable=True, **kw)
    assert torch.allclose(on, ref, atol=1e-5)
    ve = qdrift.SAMPLERS[name](lambda x, s, **k: g(x, s), x0, ref_sig, cal, disable=True,
                               **dict(kw, flow=False, noise_sampler=seeded_noise_factory(name)(x0, sig, {"seed": 2})))
    assert not torch.allclose(on, ve, atol=1e-3)  # the flow form is what the node ran


def test_prediction_types_compared_not_class_names(host):
    """ComfyUI names every model_sampling class ``ModelSampling``: an EPS model calibrated against a
    v-prediction model must be refused (the old name comparison let it through)."""
    pack, _, _ = host
    eps, _ = models()
    v_fp = comfy_standin.ModelPatcher(comfy_standin.ToyNet(prediction=comfy_standin.V_PREDICTION))
    assert type(eps.get_model_object("model_sampling")).__name__ == type(v_fp.get_model_object("model_sampling")).__name__
    assert pack.nodes.prediction_type(eps) == "EPS" and pack.nodes.prediction_type(v_fp) == "V_PREDICTION"
    with pytest.raises(ValueError, match=r"different prediction types \(EPS vs V_PREDICTION\)"):
        calibrate(pack, eps, v_fp)
    sd3 = comfy_standin.ModelPatcher(comfy_standin.ToyNet(latent_format=comfy_standin.SD3()))
    with pytest.raises(ValueError, match=r"different latent channel counts \(4 vs 16\)"):
        calibrate(pack, eps, sd3)


def test_lms_strength_zero_is_comfyuis_lms(host, kdiff):
    """ComfyUI's sample_lms (since mid-2025) returns the denoised output on the step to sigma = 0; k-diffusion's
    (and qdrift's default) take a multistep step there. The node must follow the host. Reference: k-diffusion's
    LMS up to the last positive sigma (its coefficients depend only on the sigmas so far), then x = D."""
    pack, ns, _ = host
    fp, q = models()
    cal, _ = calibrate(pack, fp, q)
    sig = sigmas_for(False)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 1)

    def guider():
        g = ns.comfy_samplers.CFGGuider(q)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        return g

    (off,) = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]().get_sampler("lms", "", "as calibrated", 0.0, calibration=cal)
    out = guider().sample(noise, torch.zeros_like(noise), off, sig, seed=1)
    g = guider()
    g.inner_model = q.model
    model = lambda x, s, **k: g(x, s)  # noqa: E731
    x = kdiff.sample_lms(model, noise * (1 + sig[0] ** 2) ** 0.5, sig[:-1], disable=True)
    ref = model(x, sig[-2] * x.new_ones([x.shape[0]]))
    assert torch.equal(out, ref)
    multistep = kdiff.sample_lms(model, noise * (1 + sig[0] ** 2) ** 0.5, sig, disable=True)
    assert not torch.allclose(out, multistep, atol=1e-4)  # the two final steps do differ on this model
    (on,) = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]().get_sampler("lms", "", "as calibrated", 1.0, calibration=cal)
    assert not torch.allclose(guider().sample(noise, torch.zeros_like(noise), on, sig, seed=1), ref, atol=1e-4)


def test_channel_mismatch_is_refused_naming_file_and_channels(host):
    """A 4-channel calibration on a 16-channel model: refused before sampling, naming the file, its channels and
    the model's latent format (it used to fail inside the sampler with a message about V's shape)."""
    pack, ns, out = host
    fp, q = models()
    _, path = calibrate(pack, fp, q)
    sd3 = comfy_standin.ModelPatcher(comfy_standin.ToyNet(latent_format=comfy_standin.SD3()))
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    noise = comfy_standin.prepare_noise(torch.zeros(1, 16, 6, 6), 1)
    for name, kw in ((os.path.basename(path)[:-12], {}), ("", {"calibration": qdrift.load_calibration(path)})):
        (sampler,) = node.get_sampler("euler", os.path.relpath(path, out) if name else "", "as calibrated", 1.0, **kw)
        g = ns.comfy_samplers.CFGGuider(sd3)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        with pytest.raises(ValueError) as err:
            g.sample(noise, torch.zeros_like(noise), sampler, sigmas_for(False), seed=1)
        msg = str(err.value)
        assert "4-channel" in msg and "16 latent channels" in msg and "SD3" in msg, msg
        if name:
            assert os.path.basename(path) in msg, msg
    # the calibration straight from the Calibrate node names the file it wrote
    cal, path2 = calibrate(pack, fp, q)
    (sampler,) = node.get_sampler("euler", "", "as calibrated", 1.0, calibration=cal)
    g = ns.comfy_samplers.CFGGuider(sd3)
    g.set_conds(cond(1.0), cond(0.0))
    g.set_cfg(3.0)
    with pytest.raises(ValueError, match=os.path.basename(path2)):
        g.sample(noise, torch.zeros_like(noise), sampler, sigmas_for(False), seed=1)


def test_missing_qdrift_message_gives_a_command_that_works(monkeypatch):
    """qdrift is not on the package index: the message must not say 'pip install qdrift' and must name the
    checkout the pack sits in; requirements.txt must not ask pip for 'qdrift' either."""
    monkeypatch.setitem(sys.modules, "qdrift", None)  # import qdrift -> ImportError
    try:
        with pytest.raises(ImportError) as err:
            load_pack()
    finally:
        sys.modules.pop(PACK, None)
    msg = str(err.value)
    assert f'python -m pip install --no-deps "{ROOT}"' in msg, msg
    assert "pip install qdrift" not in msg
    lines = [ln.strip() for ln in (NODE_DIR / "requirements.txt").read_text().splitlines()]
    assert [ln for ln in lines if ln and not ln.startswith("#")] == []


def test_v3_schema_is_exported_when_comfy_api_has_it(host_v3):
    """With comfy_api.v0_0_2 the pack exports only comfy_entrypoint (ComfyUI would prefer classic mappings if both
    were exported); the V3 nodes keep the classic ids, inputs and results."""
    pack, ns, out = host_v3
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and hasattr(pack, "comfy_entrypoint")
    form, mapping, display = comfy_standin.load_custom_node(pack)
    assert form == "v3" and set(mapping) == {"QDriftCalibrate", "QDriftSampler"}
    assert display == {"QDriftCalibrate": "Q-Drift Calibrate", "QDriftSampler": "Q-Drift Sampler"}
    classic = {"QDriftCalibrate": pack.nodes.QDriftCalibrate, "QDriftSampler": pack.nodes.QDriftSampler}
    for node_id, cls in mapping.items():
        schema = cls.GET_SCHEMA()
        spec = classic[node_id].INPUT_TYPES()
        want = [(n, "COMBO" if isinstance(k[0], list) else k[0], section == "optional")
                for section in ("required", "optional") for n, k in spec.get(section, {}).items()]
        assert [(i.id, i.io_type, i.optional) for i in schema.inputs] == want
        assert [o.io_type for o in schema.outputs] == list(classic[node_id].RETURN_TYPES)
    assert mapping["QDriftCalibrate"].GET_SCHEMA().is_output_node
    fp, q = models()
    cal, path = mapping["QDriftCalibrate"].execute(
        fp, q, cond(1.0), cond(0.0), {"samples": torch.zeros(1, 4, 6, 6)}, sigmas_for(False), 3.0, 123, 3, "channel",
        "qdrift/v3").result
    assert os.path.isfile(path) and qdrift.load_calibration(path).meta["prediction_type"] == "EPS"
    assert mapping["QDriftSampler"].fingerprint_inputs(calibration_file=path)
    (sampler,) = mapping["QDriftSampler"].execute("dpmpp_2m", path, "as calibrated", 1.0).result
    (classic_sampler,) = pack.nodes.QDriftSampler().get_sampler("dpmpp_2m", path, "as calibrated", 1.0)
    noise = comfy_standin.prepare_noise(torch.zeros(1, 4, 6, 6), 1)

    def run(s):
        g = ns.comfy_samplers.CFGGuider(q)
        g.set_conds(cond(1.0), cond(0.0))
        g.set_cfg(3.0)
        return g.sample(noise, torch.zeros_like(noise), s, sigmas_for(False), seed=1)

    assert torch.equal(run(sampler), run(classic_sampler))


def test_classic_form_without_comfy_api(host):
    pack, _, _ = host
    assert not hasattr(pack, "comfy_entrypoint")
    form, mapping, _ = comfy_standin.load_custom_node(pack)
    assert form == "classic" and set(mapping) == {"QDriftCalibrate", "QDriftSampler"}


def _sample(ns, model, sampler, seed=1, channels=4):
    g = ns.comfy_samplers.CFGGuider(model)
    g.set_conds(cond(1.0), cond(0.0))
    g.set_cfg(3.0)
    noise = comfy_standin.prepare_noise(torch.zeros(1, channels, 6, 6), 1)
    return g.sample(noise, torch.zeros_like(noise), sampler, sigmas_for(False), seed=seed)


def test_calibrate_node_refuses_bad_inputs_before_any_pass(host, monkeypatch):
    """Each used to fail with a bare KeyError / IndexError / int() / torch error, or after two full passes (cfg
    NaN), or silently (K=2.5 ran K=2, prefix 'qdrift/' wrote '_00001.safetensors')."""
    pack, _, out = host
    fp, q = models()
    node = pack.NODE_CLASS_MAPPINGS["QDriftCalibrate"]()
    ok = dict(model_fp=fp, model_q=q, positive=cond(1.0), negative=cond(0.0), latent_image={"samples": torch.zeros(1, 4, 6, 6)},
              sigmas=sigmas_for(False), cfg=3.0, seed=1, K=2, reduce="channel", filename_prefix="qdrift/t")
    cases = [
        ({"latent_image": {}}, "latent_image must be a LATENT"),
        ({"latent_image": torch.zeros(1, 4, 6, 6)}, "latent_image must be a LATENT .* got a bare tensor"),
        ({"latent_image": {"samples": torch.zeros(0, 4, 6, 6)}}, "latent_image holds no latent"),
        ({"K": "abc"}, "K .* must be an integer >= 1, got 'abc'"),
        ({"K": None}, "K .* must be an integer >= 1, got None"),
        ({"K": 2.5}, "K .* must be an integer >= 1, got 2.5"),
        ({"cfg": "7"}, "cfg must be a finite number, got '7'"),
        ({"cfg": float("nan")}, "cfg must be a finite number, got nan"),
        ({"seed": "x"}, "the seed must be an integer"),
        ({"filename_prefix": "qdrift/"}, "filename_prefix must end in a file name"),
    ]
    passes = []
    fp_sampler = pack.nodes.PairedTrace.fp_sampler
    monkeypatch.setattr(pack.nodes.PairedTrace, "fp_sampler", lambda self: passes.append(1) or fp_sampler(self))
    for change, message in cases:
        with pytest.raises(ValueError, match=f"Q-Drift Calibrate: {message}"):
            node.calibrate(**dict(ok, **change))
    assert passes == []  # refused before the first pass
    assert not list(out.rglob("*.safetensors"))
    cal, path = node.calibrate(**dict(ok, K=np.int64(2), cfg=np.float32(3.0)))  # numpy numbers are numbers
    assert cal.meta["K"] == 2 and path.endswith("qdrift/t_00001.safetensors")


def test_sampler_node_checks_its_inputs_when_built(host):
    pack, ns, out = host
    fp, q = models()
    cal, path = calibrate(pack, fp, q)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    rel = os.path.relpath(path, out)
    cases = [
        ({"strength": float("inf")}, "strength must be a finite number >= 0, got inf"),
        ({"form": "quad"}, r"form must be one of \['first_order', 'quadrature'\], got 'quad'"),
        ({"correction": "nois"}, r"correction must be one of \['auto', 'drift', 'noise'\], got 'nois'"),
        ({"eta": float("nan")}, "eta must be a finite number >= 0, got nan"),
    ]
    for change, message in cases:
        kw = dict({"strength": 1.0}, **change)
        strength = kw.pop("strength")
        with pytest.raises(ValueError, match=f"Q-Drift Sampler: {message}"):
            node.get_sampler("dpmpp_2m_sde", rel, "as calibrated", strength, **kw)
    (a,) = node.get_sampler("euler", rel, "as calibrated", np.float32(1.0))  # numpy numbers are numbers
    (b,) = node.get_sampler("euler", rel, "as calibrated", 1.0)
    assert torch.equal(_sample(ns, q, a), _sample(ns, q, b))
    cls = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]
    assert cls.IS_CHANGED(calibration_file=5) == ""
    with pytest.raises(ValueError, match="calibration_file must be a file name"):
        node.get_sampler("euler", 5, "as calibrated", 1.0)


def test_sde_samplers_take_negative_seeds_like_euler_a(host):
    """A negative seed reached the SDE samplers' Brownian tree, which refused it; every sampler now reads the seed
    modulo 2**64 (Euler a already did, through torch)."""
    pack, ns, _ = host
    fp, q = models()
    cal, _ = calibrate(pack, fp, q)
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        (sampler,) = node.get_sampler(name, "", "as calibrated", 1.0, calibration=cal)
        assert torch.equal(_sample(ns, q, sampler, seed=-1), _sample(ns, q, sampler, seed=2**64 - 1)), name
        assert not torch.equal(_sample(ns, q, sampler, seed=-1), _sample(ns, q, sampler, seed=1)), name


def test_directory_and_one_channel_calibration_files_are_named(host):
    pack, ns, out = host
    node = pack.NODE_CLASS_MAPPINGS["QDriftSampler"]()
    (out / "folder.safetensors").mkdir()
    with pytest.raises(qdrift.CalibrationFileError, match="folder.safetensors is a directory"):
        node.get_sampler("euler", "folder", "as calibrated", 1.0)
    with pytest.raises(qdrift.CalibrationFileError, match="is a directory"):
        node.get_sampler("euler", str(out), "as calibrated", 1.0)
    # a 1-channel calibration on the 4-channel model: refused naming the file (the core refused it without)
    x = torch.randn(4, 1, 6, 6) * 14.6
    one = qdrift.calibrate(lambda x, s, **k: x / (1 + s.view(-1, 1, 1, 1) ** 2),
                           lambda x, s, **k: 1.1 * x / (1 + s.view(-1, 1, 1, 1) ** 2), x, sigmas_for(False), disable=True)
    one.save(out / "one.safetensors")
    fp, q = models()
    (sampler,) = node.get_sampler("euler", "one", "as calibrated", 1.0)
    with pytest.raises(ValueError, match=r"Q-Drift Sampler: the calibration .*one\.safetensors was measured on a 1-channel latent"):
        _sample(ns, q, sampler)


def test_calibrate_node_bands(host):
    """The optional bands input (default 4) calibrates per channel and radial frequency band as
    qdrift.calibrate(bands=...) does (the node's calibration carries the banded statistics, and v2 samples with them); a count that is not an
    integer >= 1, or one that leaves a band of the latent's 6x6 grid empty, is refused before any pass runs."""
    pack, _, _ = host
    fp, q = models(error=0.3)
    cal, path = calibrate(pack, fp, q, K=2, bands=2, size_drift=False)
    assert cal.bands == 2 and qdrift.load_calibration(path).bands == 2
    plain, _ = calibrate(pack, fp, q, K=2, size_drift=False, bands=1)
    assert plain.bands == 1 and torch.equal(plain.V, cal.V)
    default, _ = calibrate(pack, fp, q, K=2, size_drift=False)  # the hosts' default, measured (qdrift.hosts.HOST_BANDS)
    assert default.bands == qdrift.hosts.HOST_BANDS == 4 and torch.equal(default.V, cal.V)
    spec = pack.NODE_CLASS_MAPPINGS["QDriftCalibrate"].INPUT_TYPES()["optional"]["bands"]
    assert spec[0] == "INT" and spec[1]["default"] == 4
    for bad, match in ((0, 'bands must be "auto" or an integer >= 1'), (2.0, 'bands must be "auto" or an integer >= 1'),
                       (True, 'bands must be "auto" or an integer >= 1'), (16, r"bands=16 leaves .* 6x6 spatial grid")):
        bars = len(comfy_standin.ProgressBar.instances)  # the passes' progress bar is made after the checks
        with pytest.raises(ValueError, match=f"Q-Drift Calibrate: {match}"):
            calibrate(pack, fp, q, K=2, bands=bad)
        assert len(comfy_standin.ProgressBar.instances) == bars
