"""Opt-in: the integrations inside real hosts (how to run: docs/real_hosts.md).

The stand-ins (comfy_standin.py, webui_standin.py) stay what CI runs; this module checks against the hosts
themselves. Each part is skipped unless pointed to its host.

ComfyUI (``COMFYUI_PATH``: a checkout; run with a Python that can import it, i.e. its requirements without
torch/torchvision, plus qdrift and pytest):

- the node pack loads through ComfyUI's own ``nodes.load_custom_node`` (the V3 form where ``comfy_api.v0_0_2``
  exists) and its nodes run through ComfyUI's own node executor (``execution._async_map_node_over_list``);
- a tiny SD1.5-class UNet and a tiny SD3 MMDiT are built through ComfyUI's own classes (``supported_models``,
  ``model_base``, ``ModelPatcher``) with random weights, plus a copy rounded to 4 bits per tensor;
- Q-Drift Calibrate measures a calibration; Q-Drift Sampler at strength 0 is compared with ComfyUI's built-in
  sampler of the same name (``comfy.samplers.sampler_object``) through ``comfy.sample.sample_custom`` (what
  SamplerCustom runs), and at strength 1 must differ;
- on SD3, the ancestral/SDE samplers in the flow form against ComfyUI's RF forms (close);
- the refusals: EPS against V_PREDICTION, and a 4-channel calibration on the 16-channel SD3.

Where torchvision cannot be imported (no CPU build here) a bare ``torchvision`` module is registered so that
ComfyUI's model modules import; the models built here never call it.

Forge / A1111 (``WEBUI_URL``: a webui started with ``--api``, the qdrift extension and the test-only
``tests/integrations/webui_latent_probe`` extension linked into its ``extensions/``, on this machine;
``WEBUI_CKPT_FP`` / ``WEBUI_CKPT_Q``: the names of an SD1.5 checkpoint and its quantized copy there):

- the 'Q-Drift calibrate' script's two passes through the HTTP API (infotext ``Sampler: Euler``, the written
  path in ``info``);
- every Q-Drift sampler at strength 0 (set in Settings, the panel left at its defaults) against the built-in of
  the same name, compared on the sampled latents (bit-exact), and at strength 1 (must differ); with
  ``s_churn`` / ``s_noise`` set; the ``qdrift_*`` aliases; a 16-channel calibration on the 4-channel model.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "integrations" / "comfyui"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

WEBUI_URL = os.environ.get("WEBUI_URL")

# At strength 0 the node must equal ComfyUI's own sampler bit for bit, except where ComfyUI computes the step in
# another algebraic form (half-log-SNR for the DPM++ SDE samplers): "close" there.
EXACT = ("euler", "euler_ancestral", "heun", "lms", "dpmpp_2m")
CLOSE = ("dpmpp_2m_sde", "dpmpp_3m_sde")
CLOSE_RTOL = 1e-5


def _bare_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installable or importable here
        for name in ("torchvision", "torchvision.transforms"):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI imported headless on CPU, with the node pack loaded the way ComfyUI loads custom nodes."""
    if not COMFYUI_PATH:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout (docs/real_hosts.md)")
    _bare_torchvision()
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    import execution
    import folder_paths
    import nodes

    out = tmp_path_factory.mktemp("comfy_output")
    folder_paths.set_output_directory(str(out))
    custom = tmp_path_factory.mktemp("custom_nodes")
    (custom / "qdrift").symlink_to(NODE_DIR, target_is_directory=True)  # linked, as the README says
    loaded = asyncio.run(nodes.load_custom_node(str(custom / "qdrift")))
    assert loaded, "ComfyUI did not load the Q-Drift node pack (see its log above)"
    return types.SimpleNamespace(nodes=nodes, execution=execution, samplers=comfy.samplers, sample=comfy.sample,
                                 supported_models=comfy.supported_models, model_base=comfy.model_base,
                                 model_patcher=comfy.model_patcher, out=out)


def run_node(comfy, node_id, **inputs):
    """Runs a node through ComfyUI's own executor; returns its outputs as a tuple."""
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
    results = asyncio.run(comfy.execution._async_map_node_over_list(
        "qdrift-test", node_id, cls(), {k: [v] for k, v in inputs.items()}, cls.FUNCTION))
    result = results[0]
    return tuple(result.args) if hasattr(result, "args") else tuple(result)


def _init_weights(model, seed):
    """ComfyUI's layers skip weight init; fill them with a fixed random draw (fan-in scaled)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
        for _, b in model.diffusion_model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def _rounded_4bit(model):
    """A copy with every weight matrix rounded to a symmetric 4-bit grid per tensor (the 'quantized' load)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for p in q.diffusion_model.parameters():
            if p.ndim >= 2:
                scale = p.abs().max() / 7
                p.copy_((p / scale).round().clamp(-8, 7) * scale)
    return q


def _patcher(comfy, model):
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_sd15(comfy, model_type="EPS"):
    config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 2, "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    model_config = comfy.supported_models.SD15(config)
    model = comfy.model_base.BaseModel(model_config, model_type=getattr(comfy.model_base.ModelType, model_type),
                                       device="cpu")
    _init_weights(model, 0)
    conds = ([[torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)), {}]], [[torch.zeros(1, 8, 64), {}]])
    return model, conds, torch.zeros(1, 4, 8, 8)


def tiny_sd3(comfy):
    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "pos_embed_scaling_factor": None,
        "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}},
    }
    model = comfy.supported_models.SD3(config).get_model({}, device="cpu")
    _init_weights(model, 0)
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    negative = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    return model, (positive, negative), torch.zeros(1, 16, 8, 8)


def _calibrated(comfy, tiny, scheduler, prefix, size_drift=None):
    """A tiny real model, its 4-bit copy, a 6-step schedule and the Q-Drift Calibrate node's result on them (with
    ``size_drift``: the pack's ``calibrate`` called with it, under the node)."""
    model, conds, latent = tiny(comfy)
    fp, q = _patcher(comfy, model), _patcher(comfy, _rounded_4bit(model))
    sigmas = comfy.samplers.calculate_sigmas(fp.get_model_object("model_sampling"), scheduler, 6)
    args = dict(model_fp=fp, model_q=q, positive=conds[0], negative=conds[1], latent_image={"samples": latent},
                sigmas=sigmas, cfg=3.0, seed=5, K=2, reduce="channel", filename_prefix=prefix)
    if size_drift is None:
        cal, path = run_node(comfy, "QDriftCalibrate", **args)
    else:
        (pack_nodes,) = [m for name, m in sys.modules.items() if name.endswith(".nodes") and hasattr(m, "node_sizing")]
        cal, path = pack_nodes.calibrate(**args, size_drift=size_drift)
    return types.SimpleNamespace(fp=fp, q=q, conds=conds, latent=latent, sigmas=sigmas, cal=cal, path=path)


@pytest.fixture(scope="module")
def sd15(comfy):
    return _calibrated(comfy, tiny_sd15, "karras", "qdrift/sd15")


@pytest.fixture(scope="module")
def sd3(comfy):
    return _calibrated(comfy, tiny_sd3, "simple", "qdrift/sd3")


def sample(comfy, case, sampler, seed=11):
    """What SamplerCustom runs: seeded noise, then ``comfy.sample.sample_custom`` on the quantized model."""
    noise = comfy.sample.prepare_noise(case.latent, seed)
    return comfy.sample.sample_custom(case.q, noise, 3.0, sampler, case.sigmas, case.conds[0], case.conds[1],
                                      case.latent, disable_pbar=True, seed=seed)


def qdrift_sampler(comfy, name, case, strength):
    (sampler,) = run_node(comfy, "QDriftSampler", sampler_name=name, calibration_file=case.path,
                          reduce="as calibrated", strength=strength)
    return sampler


def test_the_calibrate_node_sizes_the_drift_in_the_real_host(comfy, sd15, sd3):
    """The node's third pass (on by default) ran through ComfyUI's guider on the tiny real SD1.5, and the file keeps
    its sizing; on the flow SD3 (CONST) the ticked box skips it (the sizing measured worse on flow models), and
    size_drift=True runs it there too."""
    import qdrift

    assert "drift_scale" not in qdrift.load_calibration(sd3.path).meta
    forced = _calibrated(comfy, tiny_sd3, "simple", "qdrift/sd3_sized", size_drift=True)
    for case in (sd15, forced):
        info = qdrift.load_calibration(case.path).meta["drift_scale"]
        assert info["K"] == 2 and info["sampler"] == "euler" and info["steps"] == 6, info
        assert all(v >= 0 for v in info["measured"]) and any(v > 0 for v in info["predicted"]), info
        assert case.cal.drift_scale is not None and bool(torch.isfinite(case.cal.drift_scale).all())
    assert torch.equal(forced.cal.V, sd3.cal.V)
    node = comfy.nodes.NODE_CLASS_MAPPINGS["QDriftCalibrate"]
    if importlib.util.find_spec("comfy_api.v0_0_2") is not None:
        optional = node.GET_NODE_INFO_V1()["input"].get("optional", {})
    else:
        optional = node.INPUT_TYPES().get("optional", {})
    assert optional["size_drift"][0] == "BOOLEAN" and optional["size_drift"][1]["default"] is True
    assert optional["bands"][0] == "INT" and optional["bands"][1]["default"] == 4


def test_the_calibrate_node_calibrates_per_band_in_the_real_host(comfy, sd15):
    """The optional bands input through ComfyUI's executor: the file carries the banded statistics, and the Q-Drift
    Sampler samples with them."""
    import qdrift

    cal, path = run_node(comfy, "QDriftCalibrate", model_fp=sd15.fp, model_q=sd15.q, positive=sd15.conds[0],
                         negative=sd15.conds[1], latent_image={"samples": sd15.latent}, sigmas=sd15.sigmas, cfg=3.0,
                         seed=5, K=2, reduce="channel", filename_prefix="qdrift/sd15_bands", size_drift=False, bands=2)
    assert cal.bands == 2 and qdrift.load_calibration(path).bands == 2 and torch.equal(cal.V, sd15.cal.V)
    banded = types.SimpleNamespace(**{**vars(sd15), "path": path})
    out = sample(comfy, banded, qdrift_sampler(comfy, "euler", banded, 1.0))
    assert torch.isfinite(out).all() and not torch.equal(out, sample(comfy, sd15, qdrift_sampler(comfy, "euler", sd15, 1.0)))


def test_pack_loads_in_the_v3_form_where_comfy_api_has_it(comfy):
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["QDriftSampler"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["QDriftSampler"] == "Q-Drift Sampler"
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["QDriftCalibrate"] == "Q-Drift Calibrate"
    if importlib.util.find_spec("comfy_api.v0_0_2") is not None:
        from comfy_api.v0_0_2 import io

        assert issubclass(cls, io.ComfyNode)
        info = cls.GET_NODE_INFO_V1()  # what ComfyUI's /object_info serves the front end
        assert info["display_name"] == "Q-Drift Sampler" and "sampler_name" in info["input"]["required"]


def test_calibration_records_the_prediction_type(comfy, sd15, sd3):
    import qdrift

    for case, kind, channels in ((sd15, "EPS", 4), (sd3, "CONST", 16)):
        loaded = qdrift.load_calibration(case.path)
        assert loaded.meta["prediction_type"] == kind and loaded.channels == channels
        assert bool((loaded.V > 0).any()) and bool(torch.isfinite(loaded.V).all())


@pytest.mark.parametrize("name", EXACT + CLOSE)
def test_sd15_strength_zero_is_comfyuis_sampler(comfy, sd15, name):
    ours = sample(comfy, sd15, qdrift_sampler(comfy, name, sd15, 0.0))
    host = sample(comfy, sd15, comfy.samplers.sampler_object(name))
    if name in EXACT:
        assert torch.equal(ours, host), float((ours - host).abs().max())
    else:
        assert torch.allclose(ours, host, rtol=CLOSE_RTOL, atol=CLOSE_RTOL * float(host.abs().max()))
    corrected = sample(comfy, sd15, qdrift_sampler(comfy, name, sd15, 1.0))
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, host)


@pytest.mark.parametrize("name", ("euler", "heun", "lms", "dpmpp_2m"))
def test_sd3_flow_strength_zero_is_comfyuis_sampler(comfy, sd3, name):
    ours = sample(comfy, sd3, qdrift_sampler(comfy, name, sd3, 0.0))
    host = sample(comfy, sd3, comfy.samplers.sampler_object(name))
    assert torch.equal(ours, host), float((ours - host).abs().max())
    from qdrift.plan import recording

    with recording() as plans:  # the node tells the sampler it samples a flow: v2 drifts along the score
        corrected = sample(comfy, sd3, qdrift_sampler(comfy, name, sd3, 1.0))
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, host)
    assert plans and all(plan.flow for plan in plans)


@pytest.mark.parametrize("name", ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"))
def test_sd3_flow_stochastic_samplers_are_close_to_comfyuis_rf_forms(comfy, sd3, name):
    """ComfyUI runs flow models with its RF ancestral step and its SDE steps in half-log-SNR form; the node's flow
    form follows the same derivation (qdrift._utils.get_ancestral_step_flow, sample_dpmpp_2m_sde_qdrift) with its
    own arithmetic: close, not bit-exact."""
    ours = sample(comfy, sd3, qdrift_sampler(comfy, name, sd3, 0.0))
    host = sample(comfy, sd3, comfy.samplers.sampler_object(name))
    assert torch.allclose(ours, host, rtol=CLOSE_RTOL, atol=CLOSE_RTOL * float(host.abs().max())), \
        float((ours - host).abs().max())
    corrected = sample(comfy, sd3, qdrift_sampler(comfy, name, sd3, 1.0))
    assert torch.isfinite(corrected).all() and not torch.allclose(corrected, host, atol=1e-4)


def test_eps_against_v_prediction_is_refused(comfy, sd15):
    v_model, _, _ = tiny_sd15(comfy, model_type="V_PREDICTION")
    with pytest.raises(ValueError, match=r"different prediction types \(EPS vs V_PREDICTION\)"):
        run_node(comfy, "QDriftCalibrate", model_fp=sd15.fp, model_q=_patcher(comfy, v_model), positive=sd15.conds[0],
                 negative=sd15.conds[1], latent_image={"samples": sd15.latent}, sigmas=sd15.sigmas, cfg=3.0, seed=5,
                 K=1, reduce="channel", filename_prefix="qdrift/never")


def test_sd15_calibration_on_sd3_names_file_and_channels(comfy, sd15, sd3):
    sampler = qdrift_sampler(comfy, "euler", sd15, 1.0)
    with pytest.raises(ValueError) as err:
        sample(comfy, sd3, sampler)
    msg = str(err.value)
    assert os.path.basename(sd15.path) in msg and "4-channel" in msg and "16 latent channels" in msg, msg
    assert "SD3" in msg, msg


# ------------------------------------------------------------------------------------------ Forge / A1111
WEBUI_LABELS = {"Euler": "Euler Q-Drift", "Euler a": "Euler a Q-Drift", "Heun": "Heun Q-Drift", "LMS": "LMS Q-Drift",
                "DPM++ 2M": "DPM++ 2M Q-Drift", "DPM++ 2M SDE": "DPM++ 2M SDE Q-Drift",
                "DPM++ 3M SDE": "DPM++ 3M SDE Q-Drift"}


class Webui:
    """A running webui's API: txt2img on a fixed small job; returns the sampled latents and the parsed info."""

    def __init__(self, url):
        self.url = url.rstrip("/") + "/sdapi/v1/"
        self.fp = os.environ.get("WEBUI_CKPT_FP", "random_sd15")
        self.q = os.environ.get("WEBUI_CKPT_Q", "random_sd15_q4")

    def post(self, path, body):
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=1800) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, "body": e.read().decode(errors="replace")}

    def txt2img(self, sampler, ckpt=None, settings=None, **fields):
        import json

        body = {"prompt": "a cat", "negative_prompt": "", "seed": 1234, "steps": 6, "cfg_scale": 3.0, "width": 64,
                "height": 64, "batch_size": 1, "n_iter": 1, "sampler_name": sampler, "scheduler": "Automatic",
                "override_settings": dict({"sd_model_checkpoint": ckpt or self.q, "s_churn": 0.0, "s_noise": 1.0},
                                          **(settings or {})),
                "override_settings_restore_afterwards": False}
        body.update(fields)
        r = self.post("txt2img", body)
        if "images" not in r:
            return None, r
        info = json.loads(r["info"])
        return torch.load(info["extra_generation_params"]["Probe latent"], weights_only=True), info


@pytest.fixture(scope="module")
def webui_host(tmp_path_factory):
    if not WEBUI_URL:
        pytest.skip("set WEBUI_URL to a running webui with the qdrift and latent-probe extensions (docs/real_hosts.md)")
    host = Webui(WEBUI_URL)
    args = ["trace.safetensors", "qdrift_real_host_test.safetensors", "channel"]
    _, info1 = host.txt2img("Euler", host.fp, script_name="Q-Drift calibrate", script_args=[
        "1: record full precision"] + args, batch_size=2)
    _, info2 = host.txt2img("Euler", host.q, script_name="Q-Drift calibrate", script_args=[
        "2: replay quantized and save"] + args, batch_size=2)
    host.passes = (info1, info2)
    host.calibration = info2["extra_generation_params"]["Q-Drift calibration written"]
    host.settings = {"qdrift_calibration": host.calibration, "qdrift_strength": 0.0}
    return host


def test_webui_calibration_passes_are_plain_euler(webui_host):
    for info, phase in zip(webui_host.passes, ("1: record full precision", "2: replay quantized and save")):
        assert info["sampler_name"] == "Euler" and "Sampler: Euler," in info["infotexts"][0]
        assert info["extra_generation_params"]["Q-Drift calibration pass"] == phase
        assert "Q-Drift strength" not in info["extra_generation_params"]
    assert os.path.isfile(webui_host.calibration)


@pytest.mark.parametrize("builtin", list(WEBUI_LABELS))
def test_webui_strength_zero_is_the_builtin(webui_host, builtin):
    host_latent, _ = webui_host.txt2img(builtin)
    ours, info = webui_host.txt2img(WEBUI_LABELS[builtin], settings=webui_host.settings)
    assert info["sampler_name"] == WEBUI_LABELS[builtin] and "Q-Drift strength: 0.0" in info["infotexts"][0]
    assert torch.equal(ours, host_latent), float((ours - host_latent).abs().max())
    on, _ = webui_host.txt2img(WEBUI_LABELS[builtin], settings=dict(webui_host.settings, qdrift_strength=1.0))
    assert not torch.equal(on, host_latent)


@pytest.mark.parametrize("builtin,setting", [("Euler", {"s_churn": 0.5}), ("DPM++ 2M SDE", {"s_noise": 0.5})])
def test_webui_sampler_settings_reach_the_qdrift_samplers(webui_host, builtin, setting):
    host_latent, _ = webui_host.txt2img(builtin, settings=setting)
    ours, _ = webui_host.txt2img(WEBUI_LABELS[builtin], settings=dict(webui_host.settings, **setting))
    default, _ = webui_host.txt2img(builtin)
    assert torch.equal(ours, host_latent) and not torch.equal(default, host_latent)


def test_webui_aliases_select_the_samplers(webui_host):
    for name, label in (("qdrift_euler", "Euler Q-Drift"), ("qdrift_dpmpp_2m_sde", "DPM++ 2M SDE Q-Drift")):
        _, info = webui_host.txt2img(name, settings=webui_host.settings)
        assert info["sampler_name"] == label


def test_webui_channel_mismatch_names_file_and_channels(webui_host, tmp_path):
    import qdrift

    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    D = lambda x, s, **k: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    bad = qdrift.calibrate(D, lambda x, s, **k: D(x, s) + 0.01 * torch.sin(x), x * 14.6,
                           qdrift.get_sigmas_karras(6, 0.03, 14.6), disable=True)
    path = str(tmp_path / "cal16.safetensors")
    bad.save(path)
    _, err = webui_host.txt2img("Euler Q-Drift", settings={"qdrift_calibration": path, "qdrift_strength": 1.0})
    assert "http_error" in err and path in err["body"] and "16-channel" in err["body"], err
    assert "4 latent channels" in err["body"], err
