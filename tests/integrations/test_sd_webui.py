"""The Forge / A1111 extension, driven the way those webuis drive it (stand-in host: webui_standin.py)."""

import importlib.util
import inspect
import json
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

import qdrift
import webui_standin
from qdrift.hosts import PairedTrace, webui

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXT = ROOT / "integrations" / "sd-webui"
LABELS = ["Euler Q-Drift", "Euler a Q-Drift", "Heun Q-Drift", "LMS Q-Drift", "DPM++ 2M Q-Drift",
          "DPM++ 2M SDE Q-Drift", "DPM++ 3M SDE Q-Drift"]


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the webui loads each scripts/*.py as a standalone module
    return module


@pytest.fixture(params=["a1111", "forge"])
def host(request, tmp_path, kdiff):
    h = webui_standin.Host(tmp_path, forge=request.param == "forge")
    h.install()
    h.ext = load_script(EXT / "scripts" / "qdrift_samplers.py", "qdrift_samplers_under_test")
    h.calib_script = load_script(EXT / "scripts" / "qdrift_calibrate.py", "qdrift_calibrate_under_test")
    for fn in h.settings_callbacks:
        fn()
    yield h
    h.uninstall()


def make_calibration(host, error=0.3, name="cal.safetensors", reduce="channel", size_drift=True):
    """A real calibration of the toy model through the extension's own two passes (and the sizing run)."""
    script = host.calib_script.QDriftCalibrateScript()
    host.model = webui_standin.ToyModel()
    p = webui_standin.Processing(sampler_name="Euler")
    script.run(p, webui.PHASES[0], "trace.safetensors", name, reduce)
    host.model = webui_standin.ToyModel(error=error)
    p2 = webui_standin.Processing(sampler_name="Euler")
    processed = script.run(p2, webui.PHASES[1], "trace.safetensors", name, reduce, size_drift)
    path = host.tmp_path / "models" / "qdrift" / name
    return qdrift.load_calibration(path), path, processed


def test_samplers_registered_as_sampler_data(host):
    names = [x.name for x in host.sd_samplers.all_samplers]
    assert names[:3] == ["Euler", "Euler a", "DPM++ 2M SDE"] and names[3:] == LABELS
    assert set(LABELS) <= set(host.sd_samplers.all_samplers_map)
    assert host.sd_samplers.set_samplers_calls >= 1  # the sampler dropdown lists are rebuilt
    for entry in host.sd_samplers.all_samplers[3:]:
        assert isinstance(entry, webui_standin.SamplerData) and entry.aliases[0].startswith("qdrift_")
    # loading the script again (UI reload) adds nothing twice
    load_script(EXT / "scripts" / "qdrift_samplers.py", "again")
    assert [x.name for x in host.sd_samplers.all_samplers].count("Euler Q-Drift") == 1
    labels = {k: v.label for k, v in host.shared.opts.data_labels.items()}
    assert set(labels) == {"qdrift_calibration", "qdrift_strength", "qdrift_reduce"}


def test_signature_inspection_sees_what_the_host_passes(host):
    for entry in host.sd_samplers.all_samplers[3:]:
        params = inspect.signature(entry.constructor(host.model).func).parameters
        assert "sigmas" in params, entry.name
        assert not {"n", "sigma_min", "sigma_max", "sigma_sched"} & set(params), entry.name
        takes_eta = entry.name in ("Euler a Q-Drift", "DPM++ 2M SDE Q-Drift", "DPM++ 3M SDE Q-Drift")
        assert ("eta" in params) == takes_eta, entry.name
        if entry.options.get("brownian_noise"):
            assert "noise_sampler" in params


def test_no_calibration_chosen_is_a_clear_error(host):
    p = webui_standin.Processing(sampler_name="Euler Q-Drift")
    with pytest.raises(ValueError, match="no calibration file chosen"):
        host.processing.process_images(p)


@pytest.mark.parametrize("label", LABELS)
def test_generation_with_calibration_from_settings(host, label):
    cal, path, _ = make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"  # relative to models/qdrift
    host.model = webui_standin.ToyModel(error=0.3)
    p = webui_standin.Processing(sampler_name=label)
    out = host.processing.process_images(p).images
    assert out.shape == (2, 4, 6, 6) and torch.isfinite(out).all()
    # strength 0 gives the uncorrected sampler, and the correction changes the result
    host.shared.opts.qdrift_strength = 0.0
    plain = host.processing.process_images(webui_standin.Processing(sampler_name=label)).images
    assert not torch.allclose(out, plain, atol=1e-5)


def test_euler_matches_core_and_kdiffusion(host, kdiff):
    cal, path, _ = make_calibration(host)
    host.shared.opts.qdrift_calibration = str(path)  # absolute path
    host.model = webui_standin.ToyModel(error=0.3)
    out = host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift")).images
    # the core sampler on the same guided denoiser, schedule and noise
    p = webui_standin.Processing()
    cfg = webui_standin.CFGDenoiser(host.model)
    extra = {"cond": torch.ones(2, 3, 8), "uncond": torch.zeros(2, 3, 8), "cond_scale": p.cfg_scale}
    sig = qdrift.get_sigmas_karras(p.steps, float(host.model.sigmas[0]), float(host.model.sigmas[-1]))
    x = torch.stack([torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (42, 43)]) * sig[0]
    ref = qdrift.sample_euler_qdrift(cfg, x, sig, cal, extra_args=extra, disable=True)
    assert torch.allclose(out, ref, atol=1e-6)
    host.shared.opts.qdrift_strength = 0.0
    off = host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift")).images
    euler = host.processing.process_images(webui_standin.Processing(sampler_name="Euler")).images  # k-diffusion's
    assert torch.allclose(off, euler, atol=1e-6) and not torch.allclose(out, euler, atol=1e-4)


def test_ancestral_noise_comes_from_the_hosts_seeded_randn(host):
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal"  # .safetensors appended
    a = host.processing.process_images(webui_standin.Processing(sampler_name="Euler a Q-Drift")).images
    assert host.hijack.draws == 5  # one draw per step except the last (sigma_next = 0)
    b = host.processing.process_images(webui_standin.Processing(sampler_name="Euler a Q-Drift")).images
    c = host.processing.process_images(webui_standin.Processing(sampler_name="Euler a Q-Drift", seed=7)).images
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_per_generation_panel_overrides_settings(host):
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"
    panel = host.ext.QDriftPanel()
    assert panel.show(False) is host.scripts.AlwaysVisible
    assert len(panel.ui(False)) == 2
    p = webui_standin.Processing(sampler_name="Euler Q-Drift")
    panel.process(p, "elsewhere.safetensors", 0.5)
    assert p.qdrift_calibration == "elsewhere.safetensors" and p.qdrift_strength == 0.5
    assert p.extra_generation_params == {"Q-Drift calibration": "elsewhere.safetensors", "Q-Drift strength": 0.5}
    with pytest.raises(FileNotFoundError, match="elsewhere.safetensors"):
        host.processing.process_images(p)
    q = webui_standin.Processing(sampler_name="Euler")  # other samplers are left alone
    panel.process(q, "elsewhere.safetensors", 0.5)
    assert not hasattr(q, "qdrift_calibration") and q.extra_generation_params == {}


def test_two_pass_calibration_script(host):
    cal, path, processed = make_calibration(host)
    assert cal.steps == 6 and cal.channels == 4 and cal.meta["K"] == 2 and cal.meta["host"] == "sd-webui"
    assert bool((cal.V > 0).all()) and "wrote" in processed.comments
    # identical checkpoints in both passes: exactly no quantization error
    cal0, _, _ = make_calibration(host, error=0.0, name="zero.safetensors")
    assert torch.equal(cal0.V, torch.zeros_like(cal0.V))
    # the same statistics as the core's one-pass calibrate on the same guided denoisers
    p = webui_standin.Processing()
    extra = {"cond": torch.ones(2, 3, 8), "uncond": torch.zeros(2, 3, 8), "cond_scale": p.cfg_scale}
    m = webui_standin.ToyModel()
    sig = qdrift.get_sigmas_karras(p.steps, float(m.sigmas[0]), float(m.sigmas[-1]))
    x = torch.stack([torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (42, 43)]) * sig[0]
    ref = qdrift.calibrate(webui_standin.CFGDenoiser(m), webui_standin.CFGDenoiser(webui_standin.ToyModel(error=0.3)),
                           x, sig, extra_args=extra, disable=True)
    assert torch.allclose(cal.V, ref.V, rtol=1e-3, atol=1e-8)
    # pass 2's sizing run measures what qdrift.size_drift measures with both guided denoisers in hand
    sized = qdrift.size_drift(cal, webui_standin.CFGDenoiser(m), webui_standin.CFGDenoiser(webui_standin.ToyModel(error=0.3)),
                              x, sig, "euler", extra)
    info = cal.meta["drift_scale"]
    assert info["K"] == 2 and info["sampler"] == "euler" and info["steps"] == 6
    for key in ("measured", "measured_sq", "predicted"):
        assert info[key] == pytest.approx(sized.meta["drift_scale"][key], rel=1e-3), key
    plain, _, _ = make_calibration(host, name="plain.safetensors", size_drift=False)
    assert "drift_scale" not in plain.meta and torch.allclose(plain.V, cal.V)


def test_calibration_script_errors(host):
    script = host.calib_script.QDriftCalibrateScript()
    assert script.show(True) is False and script.show(False) is True
    with pytest.raises(ValueError, match="Hires"):
        script.run(webui_standin.Processing(enable_hr=True), webui.PHASES[0], "t.safetensors", "c.safetensors", "channel")
    with pytest.raises(ValueError, match="Refiner"):
        script.run(webui_standin.Processing(refiner_checkpoint="refiner.safetensors"), webui.PHASES[0], "t.safetensors",
                   "c.safetensors", "channel")
    with pytest.raises(FileNotFoundError, match="missing_trace"):
        script.run(webui_standin.Processing(), webui.PHASES[1], "missing_trace.safetensors", "c.safetensors", "channel")
    with pytest.raises(ValueError, match="pass must be one of"):
        script.run(webui_standin.Processing(), "3", "t.safetensors", "c.safetensors", "channel")
    # a trace replayed with another batch layout is refused
    script.run(webui_standin.Processing(), webui.PHASES[0], "t.safetensors", "c.safetensors", "channel")
    trace = PairedTrace.load(host.tmp_path / "models" / "qdrift" / "t.safetensors")
    assert len(trace.runs) == 1 and tuple(trace.runs[0]["x"].shape) == (6, 2, 4, 6, 6)
    trace.meta["settings"]["batch_size"] = 1
    trace.save(host.tmp_path / "models" / "qdrift" / "t.safetensors")
    with pytest.raises(ValueError, match="batch shape"):
        script.run(webui_standin.Processing(), webui.PHASES[1], "t.safetensors", "c.safetensors", "channel")


def _run_install(host, monkeypatch, installed=None, ext_dir=EXT):
    """Runs an extension's install.py as the webui does, with qdrift at version ``installed`` (None: absent)."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name != "qdrift":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    host.pip.clear()
    load_script(pathlib.Path(ext_dir) / "install.py", "qdrift_install_under_test")
    return list(host.pip)


def test_install_py_never_installs_torch(host, monkeypatch):
    monkeypatch.delenv("QDRIFT_PIP_SPEC", raising=False)
    pip = _run_install(host, monkeypatch)
    assert pip[0] == f'install --no-deps "{ROOT}"'  # this checkout
    assert all(cmd.startswith("install --no-deps ") for cmd in pip)
    assert not any("torch" == part or part.startswith("torch=") for cmd in pip for part in cmd.split())
    host.installed |= {"numpy", "scipy", "einops", "tqdm", "safetensors", "torchsde", "trampoline"}
    assert _run_install(host, monkeypatch, installed=qdrift.__version__) == []
    monkeypatch.setenv("QDRIFT_PIP_SPEC", "/somewhere/qdrift")
    assert _run_install(host, monkeypatch) == ["install --no-deps /somewhere/qdrift"]


def test_install_py_refreshes_a_stale_install(host, monkeypatch):
    """install.py used to skip once qdrift was importable, so updating the checkout never reached the webui."""
    monkeypatch.delenv("QDRIFT_PIP_SPEC", raising=False)
    host.installed |= {"numpy", "scipy", "einops", "tqdm", "safetensors", "torchsde", "trampoline"}
    assert _run_install(host, monkeypatch, installed="0.0.1") == [f'install --no-deps --force-reinstall "{ROOT}"']


def test_copied_extension_installs_from_its_bundle(host, monkeypatch, tmp_path, capsys):
    """A copy has no checkout around it: install.py used to fall back to the package index, where qdrift is not.
    A bundle (bundle.py) ships the source; a plain copy says what to do and asks pip for nothing that fails."""
    import shutil
    import subprocess

    monkeypatch.delenv("QDRIFT_PIP_SPEC", raising=False)
    host.installed |= {"numpy", "scipy", "einops", "tqdm", "safetensors", "torchsde", "trampoline"}
    plain = tmp_path / "webui" / "extensions" / "plain"
    shutil.copytree(EXT, plain)
    assert _run_install(host, monkeypatch, ext_dir=plain) == []
    assert "not on the package index" in capsys.readouterr().out
    bundled = tmp_path / "webui" / "extensions" / "qdrift"
    bundle = load_script(EXT / "bundle.py", "qdrift_bundle_under_test")
    assert bundle.bundle(str(bundled)) == str(bundled)
    assert (bundled / "scripts" / "qdrift_samplers.py").is_file() and (bundled / "install.py").is_file()
    src = bundled / "qdrift-src"
    assert _run_install(host, monkeypatch, ext_dir=bundled) == [f'install --no-deps "{src}"']
    assert _run_install(host, monkeypatch, installed="0.0.1", ext_dir=bundled) == [
        f'install --no-deps --force-reinstall "{src}"']
    assert _run_install(host, monkeypatch, installed=qdrift.__version__, ext_dir=bundled) == []
    with pytest.raises(ValueError, match="inside the qdrift checkout"):
        bundle.bundle(str(ROOT / "somewhere"))
    if not host.forge:
        return  # the build below does not depend on the host; once is enough
    # and pip can build what install.py points at (offline: no build isolation)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    assert [w.name for w in wheels.iterdir()] == [f"qdrift-{qdrift.__version__}-py3-none-any.whl"]


class PredictionFlux:  # the name and prediction_type of Forge's flow predictor (backend/modules/k_prediction.py)
    prediction_type = "const"


class PredictionEDM:
    prediction_type = "eps"


def _sd_model(host, flow):
    from types import SimpleNamespace

    if host.forge:
        predictor = PredictionFlux() if flow else PredictionEDM()
        return SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(
            predictor=predictor))))
    return SimpleNamespace(is_sd3=flow, is_sdxl=not flow)


def test_calibration_does_not_size_a_flow_model_unless_asked(host):
    """The script's ticked sizing box is "auto": pass 2 on a flow model (SD3/FLUX; the sizing measured worse there)
    writes the unsized calibration and says so; the core pass with size_drift=True still sizes it."""
    script = host.calib_script.QDriftCalibrateScript()
    cals = {}
    for size_drift in (True, "forced"):
        host.model = webui_standin.ToyModel()
        script.run(webui_standin.Processing(sampler_name="Euler", sd_model=_sd_model(host, flow=True)),
                   webui.PHASES[0], "trace.safetensors", "flow.safetensors", "channel")
        host.model = webui_standin.ToyModel(error=0.3)
        p2 = webui_standin.Processing(sampler_name="Euler", sd_model=_sd_model(host, flow=True))
        if size_drift is True:
            processed = script.run(p2, webui.PHASES[1], "trace.safetensors", "flow.safetensors", "channel", True)
            assert "Not sized: a flow model" in processed.comments
        else:
            mod = host.calib_script
            webui.run_calibration_pass(p2, webui.PHASES[1], "trace.safetensors", "flow.safetensors", "channel",
                                       process_images=mod.processing.process_images, sd_samplers=mod.sd_samplers,
                                       KDiffusionSampler=mod.KDiffusionSampler, models_dir=mod.MODELS_DIR,
                                       size_drift=True)
        cals[size_drift] = qdrift.load_calibration(host.tmp_path / "models" / "qdrift" / "flow.safetensors")
    assert "drift_scale" not in cals[True].meta and cals["forced"].meta["drift_scale"]["K"] == 2
    assert torch.allclose(cals[True].V, cals["forced"].V)
    with pytest.raises(ValueError, match=r"Q-Drift calibrate: size_drift must be True, False or 'auto', got 'on'"):
        webui.run_calibration_pass(p2, webui.PHASES[1], "trace.safetensors", "x.safetensors", "channel",
                                   process_images=None, sd_samplers=None, KDiffusionSampler=None, size_drift="on")


def test_calibration_script_bands(host):
    """The script's bands choice reaches the calibration (per channel and radial frequency band, as
    qdrift.calibrate(bands=...)); a bad count is refused at pass 2 before the quantized model runs."""
    script = host.calib_script.QDriftCalibrateScript()
    host.model = webui_standin.ToyModel()
    script.run(webui_standin.Processing(sampler_name="Euler"), webui.PHASES[0], "trace.safetensors", "b.safetensors",
               "channel")
    host.model = webui_standin.ToyModel(error=0.3)
    for bad, match in ((0, 'bands must be "auto" or an integer >= 1'), ("4", 'bands must be "auto" or an integer >= 1'),
                       (16, r"bands=16 leaves .* spatial grid")):
        with pytest.raises(ValueError, match=f"Q-Drift calibrate: {match}"):
            script.run(webui_standin.Processing(sampler_name="Euler"), webui.PHASES[1], "trace.safetensors",
                       "b.safetensors", "channel", False, bad)
    assert not (host.tmp_path / "models" / "qdrift" / "b.safetensors").exists()
    script.run(webui_standin.Processing(sampler_name="Euler"), webui.PHASES[1], "trace.safetensors", "b.safetensors",
               "channel", False, 2)
    cal = qdrift.load_calibration(host.tmp_path / "models" / "qdrift" / "b.safetensors")
    assert cal.bands == 2 and "drift_scale" not in cal.meta


@pytest.mark.parametrize("label", LABELS)
def test_flow_models_get_the_flow_form(host, label):
    """On a flow model every sampler runs with flow=True (the ancestral/SDE ones used to be refused): the result
    changes with the model's form (the noise formulas of the stochastic ones, and v2's drift, along the score on
    a flow, for all)."""
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"
    host.model = webui_standin.ToyModel(error=0.3)
    runs = {}
    host.model.sigmas = host.model.sigmas.clamp(max=0.95)  # a schedule a flow can have (t < 1), for both runs
    for flow in (True, False):
        p = webui_standin.Processing(sampler_name=label, sd_model=_sd_model(host, flow=flow))
        runs[flow] = host.processing.process_images(p).images
        assert torch.isfinite(runs[flow]).all()
    assert not torch.allclose(runs[True], runs[False], atol=1e-4)


def test_flow_sde_from_t_one_starts_below_it(host):
    """Forge's flow schedules start at t = 1, where the SDE samplers' log-SNR is -inf: they start at 1 - 1e-4."""
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"
    host.model = webui_standin.ToyModel(error=0.3)
    host.model.sigmas = torch.linspace(0.01, 1.0, 1000)
    p = webui_standin.Processing(sampler_name="DPM++ 2M SDE Q-Drift", sd_model=_sd_model(host, flow=True))
    assert torch.isfinite(host.processing.process_images(p).images).all()


def test_is_flow_model_reads_only_what_is_there():
    from types import SimpleNamespace

    assert not webui.is_flow_model(None) and not webui.is_flow_model(SimpleNamespace())
    assert not webui.is_flow_model(SimpleNamespace(sd_model=SimpleNamespace(forge_objects=None)))
    assert webui.is_flow_model(SimpleNamespace(sd_model=SimpleNamespace(is_flux=True)))

    class PredictionDiscreteFlow:
        pass

    deep = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(
        predictor=PredictionDiscreteFlow()))))
    assert webui.is_flow_model(SimpleNamespace(sd_model=deep))


def _strength_zero(host):
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"
    host.shared.opts.qdrift_strength = 0.0
    host.model = webui_standin.ToyModel(error=0.3)


@pytest.mark.parametrize("builtin,label,setting", [
    ("Euler", "Euler Q-Drift", {"s_churn": 0.5}),
    ("Euler", "Euler Q-Drift", {"s_churn": 2.0, "s_tmin": 1.0, "s_tmax": 5.0, "s_noise": 0.7}),
    ("DPM++ 2M SDE", "DPM++ 2M SDE Q-Drift", {"s_noise": 0.5}),
])
def test_sampler_settings_reach_the_qdrift_samplers(host, builtin, label, setting):
    """The host passes s_churn / s_tmin / s_tmax / s_noise only to functions in sampler_extra_params: at strength 0
    a Q-Drift sampler must equal the built-in with the same settings (they used to be dropped)."""
    _strength_zero(host)
    runs = {}
    for name in (builtin, label):
        p = webui_standin.Processing(sampler_name=name, **setting)
        runs[name] = (host.processing.process_images(p).images, p.extra_generation_params)
    assert torch.allclose(runs[label][0], runs[builtin][0], atol=1e-5, rtol=1e-5)
    default = host.processing.process_images(webui_standin.Processing(sampler_name=label)).images
    assert (default - runs[label][0]).abs().max() > 1e-2  # the setting does change the result
    sigma_fields = {k: v for k, v in runs[builtin][1].items() if k.startswith("Sigma")}
    assert sigma_fields and {k: runs[label][1][k] for k in sigma_fields} == sigma_fields  # infotext records them


def test_aliases_select_the_samplers_through_the_api(host):
    """Both hosts look sampler_name up by display name only and silently fall back to the first sampler."""
    _strength_zero(host)
    p, info = host.api_txt2img("qdrift_dpmpp_2m")
    assert p.sampler_name == "DPM++ 2M Q-Drift" and info["sampler_name"] == "DPM++ 2M Q-Drift"
    assert host.api_txt2img("DPM++ 2M Q-Drift")[0].sampler_name == "DPM++ 2M Q-Drift"  # the display name too
    if host.forge:  # another extension adding a sampler rebuilds the map; the app-start hook adds them again
        host.sd_samplers.add_sampler(webui_standin.SamplerData("Other", None, [], {}))
        host.sd_samplers.get_sampler_and_scheduler.cache_clear()
        assert host.api_txt2img("qdrift_euler")[0].sampler_name == "Euler"  # the host's silent fallback
        for fn in host.app_started_callbacks:
            fn(None, None)
    assert host.api_txt2img("qdrift_euler")[0].sampler_name == "Euler Q-Drift"


def test_calibration_passes_are_plain_euler_in_the_infotext(host):
    """The passes' images are plain Euler: their infotext must say so (pasting it back selects Euler) and carry
    none of the settings' Q-Drift fields; pass 2 names the file it wrote in the API's info."""
    host.always_on.append((host.ext.QDriftPanel(), ("", None)))
    host.shared.opts.qdrift_calibration = "some_other.safetensors"  # set, but not what the passes use
    euler_entry = host.sd_samplers.all_samplers_map["Euler"]
    script = host.calib_script.QDriftCalibrateScript()
    p1 = webui_standin.Processing(sampler_name="Euler Q-Drift")
    first = script.run(p1, webui.PHASES[0], "trace.safetensors", "cal.safetensors", "channel")
    euler = host.processing.process_images(webui_standin.Processing(sampler_name="Euler")).images  # built-in, fp
    host.model = webui_standin.ToyModel(error=0.3)
    second = script.run(webui_standin.Processing(), webui.PHASES[1], "trace.safetensors", "cal.safetensors", "channel")
    written = str(host.tmp_path / "models" / "qdrift" / "cal.safetensors")
    for processed, phase in ((first, webui.PHASES[0]), (second, webui.PHASES[1])):
        info = json.loads(processed.js())
        fields = webui_standin.parse_infotext(info["infotexts"][0])
        assert fields["Sampler"] == "Euler" and info["sampler_name"] == "Euler", fields
        assert fields["Q-Drift calibration pass"] == phase
        assert "Q-Drift calibration" not in fields and "Q-Drift strength" not in fields, fields
    info = json.loads(second.js())
    assert info["extra_generation_params"]["Q-Drift calibration written"] == written
    assert webui_standin.parse_infotext(info["infotexts"][0])["Q-Drift calibration written"] == written
    assert host.sd_samplers.all_samplers_map["Euler"] is euler_entry  # the host's Euler is back
    # both passes' images are the built-in Euler's on the full-precision model
    assert torch.allclose(first.images, euler, atol=1e-6) and torch.allclose(second.images, euler, atol=1e-6)
    assert bool((qdrift.load_calibration(written).V > 0).all())


def test_channel_mismatch_names_file_and_channels(host):
    make_calibration(host)
    host.shared.opts.qdrift_calibration = "cal.safetensors"
    p = webui_standin.Processing(sampler_name="Euler Q-Drift", latent_channels=16)
    with pytest.raises(ValueError) as err:
        host.processing.process_images(p)
    msg = str(err.value)
    assert str(host.tmp_path / "models" / "qdrift" / "cal.safetensors") in msg, msg
    assert "4-channel" in msg and "16 latent channels" in msg, msg


def test_panel_defaults_leave_the_settings_strength(host):
    """The webui hands the panel's initial values to every generation (the API's too when it gives no args): the
    slider's default must not override Settings > Q-Drift strength (found running inside Forge dfdcbab6)."""
    panel = host.ext.QDriftPanel()
    calibration, strength = panel.ui(False)  # built at start-up, with Settings' strength still at its default
    _strength_zero(host)  # then Settings > Q-Drift strength set to 0
    host.always_on.append((panel, (calibration.kw["value"], strength.kw["value"])))
    p = webui_standin.Processing(sampler_name="Euler Q-Drift")
    off = host.processing.process_images(p).images
    assert not hasattr(p, "qdrift_strength") and p.extra_generation_params["Q-Drift strength"] == 0.0
    euler = host.processing.process_images(webui_standin.Processing(sampler_name="Euler")).images
    assert torch.allclose(off, euler, atol=1e-6)
    host.always_on[-1] = (panel, ("", 1.0))  # a per-generation strength still wins
    on = host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift")).images
    assert not torch.allclose(on, euler, atol=1e-4)


def _toy_calibration(path, channels=4):
    """A quick core calibration of the toy denoiser on a ``channels``-channel latent, saved at ``path``."""
    x = torch.randn(4, channels, 6, 6, generator=torch.Generator().manual_seed(0)) * 10
    sig = qdrift.get_sigmas_karras(6, 0.03, 10.0)
    D = lambda x, s, **k: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    cal = qdrift.calibrate(D, lambda x, s, **k: 1.1 * D(x, s), x, sig, disable=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    return cal


@pytest.mark.parametrize("strength", [None, "", "abc", float("nan"), -1.0, True])
def test_bad_strength_setting_is_named(host, strength):
    """Settings > Q-Drift strength that is not a finite number >= 0 used to fail with a bare float() error."""
    host.shared.opts.qdrift_calibration = "cal"
    host.shared.opts.qdrift_strength = strength
    with pytest.raises(ValueError, match=r"Q-Drift: the strength \(Settings > Q-Drift, .*\) must be a finite number >= 0"):
        host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift"))


def test_panel_script_args_from_the_api_are_checked(host):
    """The API hands the panel's script args as given: a non-number strength or a non-string file is named."""
    panel = host.ext.QDriftPanel()
    for args, message in (((" ", "abc"), r"the strength .* must be a finite number >= 0 \(or -1: the one in Settings\), got 'abc'"),
                          (("", ""), r"the strength .* got ''"),
                          ((5, 1.0), r"the calibration file must be a file name \(a string\), got 5")):
        with pytest.raises(ValueError, match=message):
            panel.process(webui_standin.Processing(sampler_name="Euler Q-Drift"), *args)
    p = webui_standin.Processing(sampler_name="Euler Q-Drift")
    panel.process(p, "cal", "0.5")  # a number given as text is still its number
    assert p.qdrift_strength == 0.5 and p.extra_generation_params["Q-Drift strength"] == 0.5
    host.shared.opts.qdrift_calibration = 5
    with pytest.raises(ValueError, match=r"the calibration file \(Settings > Q-Drift, .*\) must be a file name \(a string\), got 5"):
        host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift"))
    with pytest.raises(ValueError, match="must be a file name"):
        webui.resolve_calibration_path(5, str(host.tmp_path / "models"))
    assert webui.is_qdrift_sampler(5) is False and webui.is_qdrift_sampler("qdrift_euler") is True


def test_directory_and_one_channel_calibrations_are_named(host):
    models = host.tmp_path / "models"
    (models / "qdrift" / "folder").mkdir(parents=True)
    host.shared.opts.qdrift_calibration = "folder"
    with pytest.raises(qdrift.CalibrationFileError, match="folder is a directory"):
        host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift"))
    # a 1-channel calibration on the 4-channel checkpoint: refused naming the file (the core refused it without)
    _toy_calibration(models / "qdrift" / "one.safetensors", channels=1)
    host.shared.opts.qdrift_calibration = "one"
    with pytest.raises(ValueError, match=r"Q-Drift: the calibration .*one\.safetensors was measured on a 1-channel latent, but the loaded checkpoint has 4"):
        host.processing.process_images(webui_standin.Processing(sampler_name="Euler Q-Drift"))


def test_make_sampler_names_a_latent_without_channels(tmp_path):
    _toy_calibration(tmp_path / "qdrift" / "c4.safetensors")
    settings = webui.Settings(SimpleNamespace(qdrift_calibration="c4"), str(tmp_path))
    fn = webui.make_sampler("euler", settings)
    sig = qdrift.get_sigmas_karras(6, 0.03, 10.0)
    D = lambda x, s, **k: x / (1 + s.view(-1, *[1] * (x.ndim - 1)) ** 2)  # noqa: E731
    assert fn(D, torch.randn(1, 4, 4, 4) * 10, sig, disable=True).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"sample_euler_qdrift: x must be a tensor of shape \[batch, channels, \.\.\.\], got shape \(4,\)"):
        fn(D, torch.randn(4), sig, disable=True)
