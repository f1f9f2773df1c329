"""A minimal stand-in for the parts of ComfyUI the Q-Drift nodes touch (CI cannot reach ComfyUI's repository).

Mirrors Comfy-Org/ComfyUI a125cd84 (v0.3.64); tests/integrations/test_real_hosts.py runs the same nodes inside a
real checkout (COMFYUI_PATH). Only the call surface is mirrored (comfy/samplers.py, comfy/model_sampling.py,
comfy_api/v0_0_2):
- ``KSAMPLER(sampler_function, extra_options={}, inpaint_options={})``; its ``sample(model_wrap, sigmas,
  extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)`` sets ``extra_args["denoise_mask"]``,
  scales the noise with ``model_sampling.noise_scaling``, wraps the callback as ``callback(i, denoised, x,
  total_steps)`` and calls ``sampler_function(model_k, noise, sigmas, extra_args=extra_args,
  callback=k_callback, disable=disable_pbar, **extra_options)``, then ``inverse_noise_scaling``;
  ``model_k(x, sigma, denoise_mask=..., model_options=..., seed=...)``;
- ``CFGGuider(model_patcher)`` with ``set_conds``, ``set_cfg``, ``sample(noise, latent_image, sampler, sigmas,
  denoise_mask=None, callback=None, disable_pbar=False, seed=None)`` passing ``extra_args={"model_options":
  ..., "seed": seed}``; guidance ``uncond + (cond - uncond) * cfg`` happens before the sampler sees the output;
- ``comfy.sample.prepare_noise(latent, seed, batch_inds=None)``, ``fix_empty_latent_channels(model, latent)``;
- ``comfy.utils.ProgressBar(total).update(n)``; ``folder_paths.get_output_directory()`` and ``models_dir``;
- every ``model_sampling`` is a class named ``ModelSampling`` mixing a sampling class with a prediction class
  (``EPS``, ``V_PREDICTION``, ``CONST``...); ``BaseModel.latent_format.latent_channels``;
- ``comfy_api.v0_0_2``: ``io.ComfyNode`` (``define_schema``, classmethod ``execute``, ``fingerprint_inputs``),
  ``io.Schema``, the ``io.<Type>.Input`` / ``Output`` signatures the nodes use, ``io.Custom``, ``io.NodeOutput``,
  ``ComfyExtension`` with ``async get_node_list``; a pack's ``comfy_entrypoint`` is loaded only when it exports no
  ``NODE_CLASS_MAPPINGS`` (nodes.py ``load_custom_node``).

The toy models are analytic: an EPS-style model whose denoiser is the exact Gaussian posterior mean shifted
by the conditioning, and a flow (CONST) model presented as a denoiser with sigma = t.
"""

import math
import sys
import types

import torch


class EPS:  # prediction classes (comfy/model_sampling.py): noise scaling lives here
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        scale = torch.sqrt(1.0 + sigma**2) if max_denoise else sigma
        return noise * scale + (0 if latent_image is None else latent_image)

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    pass


class CONST:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * (0 if latent_image is None else latent_image)

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class ModelSamplingDiscrete(torch.nn.Module):
    sigma_max = torch.tensor(14.6)
    sigma_min = torch.tensor(0.03)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    sigma_max = torch.tensor(1.0)
    sigma_min = torch.tensor(0.0)


def model_sampling(prediction):
    """As ``BaseModel``'s ``model_sampling()``: a class named ``ModelSampling`` for every combination."""
    sampling = ModelSamplingDiscreteFlow if prediction is CONST else ModelSamplingDiscrete

    class ModelSampling(sampling, prediction):
        pass

    return ModelSampling()


class SD15:  # latent formats (comfy/latent_formats.py)
    latent_channels = 4


class SD3:
    latent_channels = 16


class ToyNet:
    """D(x, sigma | cond): Gaussian data N(mu, s^2) per channel, mu shifted by the conditioning; ``error``
    adds a deterministic, x-dependent "quantization" error to the output."""

    def __init__(self, flow=False, error=0.0, prediction=None, latent_format=None):
        self.model_sampling = model_sampling(prediction or (CONST if flow else EPS))
        self.latent_format = latent_format or SD15()
        self.flow = flow
        self.error = error

    def denoise(self, x, sigma, cond):
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        mu = cond.mean() * torch.ones_like(x)
        if self.flow:  # x = (1 - t) x0 + t eps with x0 ~ N(mu, 1): posterior mean of x0
            var = (1 - s) ** 2 + s**2
            D = mu + (1 - s) * (x - (1 - s) * mu) / var
        else:
            D = (x + s**2 * mu) / (1 + s**2)
        return D + self.error * torch.sin(3 * x) * s / (1 + s)


class ModelPatcher:
    def __init__(self, net):
        self.model = net
        self.model_options = {}

    def get_model_object(self, name):
        return getattr(self.model, name)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006 (mirrors ComfyUI)
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask

        class KSamplerX0Inpaint:  # ComfyUI's wrapper: `.inner_model` is the guider (model_wrap)
            inner_model = model_wrap

            def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):  # noqa: B006
                return model_wrap(x, sigma, model_options=model_options, seed=seed)

        model_k = KSamplerX0Inpaint()

        ms = model_wrap.inner_model.model_sampling
        noise = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        total_steps = len(sigmas) - 1

        def k_callback(d):
            if callback is not None:
                callback(d["i"], d["denoised"], d["x"], total_steps)

        samples = self.sampler_function(
            model_k, noise, sigmas, extra_args=extra_args, callback=k_callback, disable=disable_pbar, **self.extra_options
        )
        return ms.inverse_noise_scaling(sigmas[-1], samples)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.cfg = 1.0
        self.calls = 0

    def set_conds(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        self.calls += 1
        net = self.inner_model
        cond = net.denoise(x, timestep, self.conds["positive"][0][0])
        uncond = net.denoise(x, timestep, self.conds["negative"][0][0])
        return uncond + (cond - uncond) * self.cfg

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        self.inner_model = self.model_patcher.model
        extra_args = {"model_options": dict(self.model_options), "seed": seed}
        return sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


class ProgressBar:
    instances = []

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        self.current = value

    def update(self, value):
        self.current += value


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, generator=generator, device="cpu")


def fix_empty_latent_channels(model, latent_image, downscale_ratio_spacial=None):
    return latent_image


# ------------------------------------------------------------------ comfy_api.v0_0_2 (the V3 node schema)
class _Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **widget):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.widget = widget


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _comfytype(io_type, widget_args=()):
    """A V3 type with ``Input`` / ``Output``; ``Input`` accepts exactly the widget keywords of the real one."""
    allowed = set(widget_args)

    class Input(_Input):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **widget):
            unknown = set(widget) - allowed
            if unknown:
                raise TypeError(f"{io_type}.Input got unexpected keyword(s) {sorted(unknown)}")
            super().__init__(id, display_name, optional, tooltip, lazy, **widget)
            self.io_type = io_type

    class Output(_Output):
        pass

    Output.io_type = io_type
    return type(io_type, (), {"io_type": io_type, "Input": Input, "Output": Output})


def _build_io():
    io = types.ModuleType("comfy_api.latest.io")
    io.Model, io.Conditioning, io.Latent = _comfytype("MODEL"), _comfytype("CONDITIONING"), _comfytype("LATENT")
    io.Sigmas, io.Sampler = _comfytype("SIGMAS"), _comfytype("SAMPLER")
    io.Float = _comfytype("FLOAT", ("default", "min", "max", "step", "round", "display_mode", "socketless", "force_input"))
    io.Int = _comfytype("INT", ("default", "min", "max", "step", "control_after_generate", "display_mode", "socketless",
                                "force_input"))
    io.String = _comfytype("STRING", ("multiline", "placeholder", "default", "dynamic_prompts", "socketless", "force_input"))
    io.Boolean = _comfytype("BOOLEAN", ("default", "label_on", "label_off", "socketless", "force_input"))
    combo = _comfytype("COMBO", ("options", "default", "control_after_generate", "upload", "image_folder",
                                 "remote", "socketless"))
    io.Combo = combo
    io.Custom = lambda io_type: _comfytype(io_type)

    class Schema:
        def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                     description="", search_aliases=None, is_input_list=False, is_output_node=False,
                     is_deprecated=False, is_experimental=False, is_api_node=False, not_idempotent=False,
                     enable_expand=False):
            self.node_id, self.display_name, self.category = node_id, display_name, category
            self.inputs, self.outputs, self.description = inputs or [], outputs or [], description
            self.is_output_node = is_output_node

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args = args

        @property
        def result(self):
            return self.args if len(self.args) > 0 else None

    class ComfyNode:
        @classmethod
        def GET_SCHEMA(cls):
            return cls.define_schema()

        @classmethod
        def fingerprint_inputs(cls, **kwargs):
            return None

    io.Schema, io.NodeOutput, io.ComfyNode = Schema, NodeOutput, ComfyNode
    return io


class ComfyExtension:
    async def on_load(self):
        return None

    async def get_node_list(self):
        raise NotImplementedError


def load_custom_node(module):
    """``nodes.load_custom_node``: the classic mappings if exported, else the V3 entry point's nodes.

    Returns:
        ``(form, {node_id: node class}, {node_id: display name})``.
    """
    import asyncio
    import inspect as _inspect

    if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
        return "classic", dict(module.NODE_CLASS_MAPPINGS), dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    entry = getattr(module, "comfy_entrypoint")
    extension = asyncio.run(entry()) if _inspect.iscoroutinefunction(entry) else entry()
    assert isinstance(extension, ComfyExtension)
    node_list = asyncio.run(extension.get_node_list())
    schemas = {cls: cls.GET_SCHEMA() for cls in node_list}
    return ("v3", {sch.node_id: cls for cls, sch in schemas.items()},
            {sch.node_id: sch.display_name for sch in schemas.values() if sch.display_name is not None})


def install(output_dir, v3=False):
    """Registers the stand-in modules in ``sys.modules`` (with ``comfy_api.v0_0_2`` if ``v3``); returns them as a
    namespace."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER = KSAMPLER
    samplers.CFGGuider = CFGGuider
    sample = types.ModuleType("comfy.sample")
    sample.prepare_noise = prepare_noise
    sample.fix_empty_latent_channels = fix_empty_latent_channels
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    utils.PROGRESS_BAR_ENABLED = True
    comfy.samplers, comfy.sample, comfy.utils = samplers, sample, utils
    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(output_dir)
    fp.models_dir = str(output_dir / "models")
    mods = {"comfy": comfy, "comfy.samplers": samplers, "comfy.sample": sample, "comfy.utils": utils, "folder_paths": fp}
    if v3:
        api = types.ModuleType("comfy_api")
        api.__path__ = []
        v0_0_2 = types.ModuleType("comfy_api.v0_0_2")
        v0_0_2.io, v0_0_2.ComfyExtension = _build_io(), ComfyExtension
        api.v0_0_2 = v0_0_2
        mods.update({"comfy_api": api, "comfy_api.v0_0_2": v0_0_2})
    sys.modules.update(mods)
    return types.SimpleNamespace(**{k.replace(".", "_"): v for k, v in mods.items()})
