"""A minimal stand-in for the parts of Forge / AUTOMATIC1111 the Q-Drift extension touches.

CI cannot reach the webuis' repositories (and they clone more and pull CUDA torch at launch). Only the
registration and call surface is mirrored, from lllyasviel/stable-diffusion-webui-forge dfdcbab6
(modules/sd_samplers.py, sd_samplers_common.py, sd_samplers_kdiffusion.py, processing.py, api/api.py), which
follows AUTOMATIC1111/stable-diffusion-webui 1.6+; tests/integrations/test_real_hosts.py runs the extension
inside a real checkout (WEBUI_PATH):

- ``SamplerData(name, constructor, aliases, options)``; ``sd_samplers.all_samplers`` / ``all_samplers_map`` /
  ``set_samplers()``; Forge adds ``add_sampler(data)`` (``forge=True`` here);
- ``KDiffusionSampler(funcname, sd_model, options=None)`` with ``func = funcname`` when callable;
  ``initialize(p)`` sets ``model_wrap_cfg.p`` and passes ``eta`` only if it is a parameter of the function;
  ``sample()`` passes ``n`` / ``sigma_min`` / ``sigma_max`` / ``sigmas`` only if they are parameters
  (``inspect.signature(self.func).parameters``), a ``noise_sampler`` when ``options["brownian_noise"]``, and
  calls ``func(model_wrap_cfg, x, extra_args={cond, image_cond, uncond, cond_scale, s_min_uncond},
  disable=False, callback=..., **kw)``;
- ``sd_samplers_kdiffusion.sampler_extra_params`` (Forge's table): ``KDiffusionSampler.__init__`` looks the knobs
  up with ``sampler_extra_params.get(funcname, [])`` (``funcname`` is what the entry passed: a name or a
  function), and ``Sampler.initialize`` passes ``p.s_churn``... for those knobs only, if they are parameters;
- ``sd_samplers.get_sampler_and_scheduler`` (memoized): ``all_samplers_map.get(name, first sampler)``, by name
  only, silently falling back; ``create_sampler`` looks the entry up in ``all_samplers_map`` at generation
  time; ``api.validate_sampler_name``;
- ``processing.create_infotext``: ``Sampler: <p.sampler_name>`` and ``p.extra_generation_params``;
  ``Processed.js()`` (the API's ``info``) holds ``extra_generation_params`` and ``infotexts``, not ``comments``;
- ``k_diffusion.sampling.torch`` is replaced per generation by an object whose ``randn_like`` draws the
  seeded per-step noise;
- ``scripts.Script`` / ``scripts.AlwaysVisible``, ``script_callbacks.on_ui_settings`` / ``on_app_started``, ``shared.opts.add_option``
  / ``shared.OptionInfo``, ``paths.models_path``, ``processing.process_images(p)``; ``launch.is_installed`` /
  ``launch.run_pip``; and the few gradio components the scripts build.
"""

import functools
import inspect
import json
import sys
import types
from collections import namedtuple

import torch

import qdrift

MODULES = (
    "modules", "modules.sd_samplers", "modules.sd_samplers_common", "modules.sd_samplers_kdiffusion", "modules.scripts",
    "modules.script_callbacks", "modules.shared", "modules.processing", "modules.paths", "gradio", "launch",
)


# ---------------------------------------------------------------- the model: exact Gaussian denoiser + CFG
class ToyModel:
    """D(x, sigma | cond) for data N(mu, 1) with mu = mean of the conditioning; ``error`` plants a
    deterministic x-dependent 'quantization' error."""

    def __init__(self, error=0.0):
        self.error = error
        self.sigmas = qdrift.get_sigmas_karras(1000, 0.03, 14.6).flip(0)[1:]  # ascending, like model_wrap.sigmas

    def denoise(self, x, sigma, cond):
        s = sigma.view(-1, 1, 1, 1)
        D = (x + s**2 * cond.mean()) / (1 + s**2)
        return D + self.error * torch.sin(3 * x) * s / (1 + s)


class CFGDenoiser:
    def __init__(self, model):
        self.model = model
        self.p = None
        self.calls = 0

    def __call__(self, x, sigma, cond, uncond, cond_scale, image_cond=None, s_min_uncond=0.0):
        self.calls += 1
        c = self.model.denoise(x, sigma, cond)
        u = self.model.denoise(x, sigma, uncond)
        return u + (c - u) * cond_scale


SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


SAMPLER_EXTRA_PARAMS = {  # Forge dfdcbab6 modules/sd_samplers_kdiffusion.py
    "sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_fast": ["s_noise"],
    "sample_dpm_2_ancestral": ["s_noise"],
    "sample_dpmpp_2s_ancestral": ["s_noise"],
    "sample_dpmpp_sde": ["s_noise"],
    "sample_dpmpp_2m_sde": ["s_noise"],
    "sample_dpmpp_3m_sde": ["s_noise"],
}


class KDiffusionSampler:
    sampler_extra_params = None  # set to the host's table by Host

    def __init__(self, funcname, sd_model, options=None):
        self.funcname = funcname
        self.extra_params = self.sampler_extra_params.get(funcname, [])
        self.func = funcname if callable(funcname) else getattr(sys.modules["k_diffusion.sampling"], funcname)
        self.model_wrap_cfg = CFGDenoiser(sd_model)
        self.config = None
        self.options = options or {}
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = 0.0, 0.0, float("inf"), 1.0

    def initialize(self, p):
        self.model_wrap_cfg.p = p
        kw = {}
        parameters = inspect.signature(self.func).parameters
        for name in self.extra_params:
            if hasattr(p, name) and name in parameters:
                kw[name] = getattr(p, name)
        if "eta" in parameters:
            kw["eta"] = p.eta if p.eta is not None else 1.0
        labels = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
        for name, label in labels.items():  # the settings' values, recorded in the infotext when not default
            if name in kw and getattr(p, name) != getattr(self, name):
                p.extra_generation_params[label] = getattr(p, name)
        return kw

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        m = self.model_wrap_cfg.model
        sched = self.config.options.get("scheduler") if p.scheduler == "Automatic" else p.scheduler
        if sched == "exponential":
            sigmas = qdrift.get_sigmas_exponential(steps, float(m.sigmas[0]), float(m.sigmas[-1]))
        else:
            sigmas = qdrift.get_sigmas_karras(steps, float(m.sigmas[0]), float(m.sigmas[-1]))
        if self.config.options.get("discard_next_to_last_sigma", False):
            sigmas = qdrift.get_sigmas_karras(steps + 1, float(m.sigmas[0]), float(m.sigmas[-1]))
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        x = x * sigmas[0]
        kw = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "n" in parameters:
            kw["n"] = steps
        if "sigma_min" in parameters:
            kw["sigma_min"], kw["sigma_max"] = float(m.sigmas[0]), float(m.sigmas[-1])
        if "sigmas" in parameters:
            kw["sigmas"] = sigmas
        if self.config.options.get("brownian_noise", False):
            kw["noise_sampler"] = qdrift.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=p.seed)
        if self.config.options.get("solver_type", None) == "heun":
            kw["solver_type"] = "heun"
        extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                      "cond_scale": p.cfg_scale, "s_min_uncond": 0.0}
        return self.func(self.model_wrap_cfg, x, extra_args=extra_args, disable=False, callback=lambda d: None, **kw)


class TorchHijack:
    """``k_diffusion.sampling.torch`` during a generation: ``randn_like`` draws from the seeds' generator."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed + 10_000)
        self.draws = 0

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        self.draws += 1
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


class Processing:
    """The processing object ``p`` (the fields the extension reads)."""

    def __init__(self, **kw):
        self.prompt, self.negative_prompt = "a cat", ""
        self.seed, self.subseed, self.subseed_strength = 42, -1, 0.0
        self.steps, self.cfg_scale, self.width, self.height = 6, 3.0, 48, 48
        self.batch_size, self.n_iter = 2, 1
        self.sampler_name, self.scheduler, self.eta = "Euler", "Automatic", None
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = 0.0, 0.0, float("inf"), 1.0
        self.enable_hr = False
        self.extra_generation_params = {}
        self.__dict__.update(kw)


def create_infotext(p):
    """``processing.create_infotext``: ``Sampler`` is ``p.sampler_name``; extension fields follow."""
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "Schedule type": p.scheduler, "CFG scale": p.cfg_scale,
              "Seed": p.seed}
    params.update(p.extra_generation_params)
    return ", ".join(f"{k}: {json.dumps(v) if isinstance(v, str) and (',' in v or ':' in v) else v}"
                     for k, v in params.items() if v is not None)


def parse_infotext(text):
    """The ``{key: value}`` of an infotext line (``infotext_utils.parse_generation_parameters``, simplified)."""
    out = {}
    for part in __import__("re").findall(r'\s*([\w .-]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', text):
        key, value = part
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


class Processed:
    def __init__(self, p, latents, seed, infotexts):
        self.images = latents
        self.seed = seed
        self.comments = ""
        self.sampler_name = p.sampler_name
        self.extra_generation_params = p.extra_generation_params
        self.infotexts = infotexts

    def js(self):
        """The API's ``info``: no ``comments`` in it."""
        return json.dumps({"seed": self.seed, "sampler_name": self.sampler_name,
                           "extra_generation_params": self.extra_generation_params, "infotexts": self.infotexts},
                          default=lambda o: None)


class Host:
    """Holds the stand-in module objects and the loaded model."""

    def __init__(self, tmp_path, forge):
        self.tmp_path = tmp_path
        self.forge = forge
        self.model = ToyModel()
        self.settings_callbacks = []
        self.app_started_callbacks = []
        self.always_on = []  # (script, args) whose process(p, *args) runs in every generation
        self.pip = []
        self.installed = set()
        self.modules = self._build()

    def _build(self):
        host = self
        modules = types.ModuleType("modules")
        sd_samplers = types.ModuleType("modules.sd_samplers")
        extra_params = {k: list(v) for k, v in SAMPLER_EXTRA_PARAMS.items()}  # this host's table
        K = type("KDiffusionSampler", (KDiffusionSampler,), {"sampler_extra_params": extra_params})
        sd_samplers.all_samplers = [
            SamplerData("Euler", lambda model: K("sample_euler", model), ["k_euler"], {}),
            SamplerData("Euler a", lambda model: K("sample_euler_ancestral", model), ["k_euler_a"], {"uses_ensd": True}),
            SamplerData("DPM++ 2M SDE", lambda model: K("sample_dpmpp_2m_sde", model), ["k_dpmpp_2m_sde"],
                        {"scheduler": "exponential", "brownian_noise": True}),
        ]
        sd_samplers.all_samplers_map = {x.name: x for x in sd_samplers.all_samplers}
        sd_samplers.set_samplers_calls = 0

        def set_samplers():
            sd_samplers.set_samplers_calls += 1
            sd_samplers.samplers = list(sd_samplers.all_samplers)

        sd_samplers.set_samplers = set_samplers

        @functools.cache
        def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
            default = sd_samplers.all_samplers[0]
            return sd_samplers.all_samplers_map.get(sampler_name or default.name, default).name, scheduler_name

        sd_samplers.get_sampler_and_scheduler = get_sampler_and_scheduler
        if self.forge:
            def add_sampler(sampler):
                if sampler.name not in [x.name for x in sd_samplers.all_samplers]:
                    sd_samplers.all_samplers.append(sampler)
                    sd_samplers.all_samplers_map = {x.name: x for x in sd_samplers.all_samplers}
                    set_samplers()

            sd_samplers.add_sampler = add_sampler
        common = types.ModuleType("modules.sd_samplers_common")
        common.SamplerData = SamplerData
        kdiff = types.ModuleType("modules.sd_samplers_kdiffusion")
        kdiff.sampler_extra_params = extra_params
        kdiff.KDiffusionSampler = K
        scripts = types.ModuleType("modules.scripts")

        class Script:
            def title(self):
                raise NotImplementedError

        scripts.Script = Script
        scripts.AlwaysVisible = object()
        callbacks = types.ModuleType("modules.script_callbacks")
        callbacks.on_ui_settings = lambda fn: host.settings_callbacks.append(fn)
        callbacks.on_app_started = lambda fn: host.app_started_callbacks.append(fn)
        shared = types.ModuleType("modules.shared")

        class OptionInfo:
            def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
                self.default, self.label, self.component, self.component_args, self.section = default, label, component, component_args, section

        class Options:
            def __init__(self):
                self.data_labels = {}

            def add_option(self, key, info):
                self.data_labels[key] = info
                if not hasattr(self, key):
                    setattr(self, key, info.default)

        shared.OptionInfo = OptionInfo
        shared.opts = Options()
        processing = types.ModuleType("modules.processing")
        processing.process_images = self.process_images
        paths = types.ModuleType("modules.paths")
        paths.models_path = str(self.tmp_path / "models")
        gradio = types.ModuleType("gradio")

        class Component:
            def __init__(self, *args, **kw):
                self.args, self.kw = args, kw

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        for name in ("Slider", "Radio", "Textbox", "Markdown", "Accordion", "Row", "Column", "Checkbox", "Dropdown"):
            setattr(gradio, name, type(name, (Component,), {}))
        launch = types.ModuleType("launch")
        launch.is_installed = lambda pkg: pkg in host.installed
        launch.run_pip = lambda command, desc=None, live=False: host.pip.append(command)
        for name, mod in (("sd_samplers", sd_samplers), ("sd_samplers_common", common), ("sd_samplers_kdiffusion", kdiff),
                          ("scripts", scripts), ("script_callbacks", callbacks), ("shared", shared),
                          ("processing", processing), ("paths", paths)):
            setattr(modules, name, mod)
        return {"modules": modules, "modules.sd_samplers": sd_samplers, "modules.sd_samplers_common": common,
                "modules.sd_samplers_kdiffusion": kdiff, "modules.scripts": scripts,
                "modules.script_callbacks": callbacks, "modules.shared": shared, "modules.processing": processing,
                "modules.paths": paths, "gradio": gradio, "launch": launch}

    def __getattr__(self, name):
        mods = self.__dict__.get("modules", {})
        if name in ("sd_samplers", "shared", "scripts", "processing"):
            return mods[f"modules.{name}"]
        raise AttributeError(name)

    def install(self):
        self.saved = {k: sys.modules.get(k) for k in MODULES}
        sys.modules.update(self.modules)

    def uninstall(self):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

    def process_images(self, p):
        """txt2img: the always-on scripts' ``process``, then for each batch seeded noise, the chosen sampler (looked
        up at generation time, ``create_sampler``), the hijacked k-diffusion torch; then the infotexts."""
        for script, args in self.always_on:
            script.process(p, *args)
        config = self.sd_samplers.all_samplers_map[p.sampler_name]
        kds = sys.modules["k_diffusion.sampling"]
        saved_torch = kds.torch
        p.all_seeds = [p.seed + i for i in range(p.batch_size * p.n_iter)]
        cond = torch.full((p.batch_size, 3, 8), 1.0)
        uncond = torch.zeros_like(cond)
        outs = []
        try:
            for it in range(p.n_iter):
                seeds = p.all_seeds[it * p.batch_size:(it + 1) * p.batch_size]
                channels = getattr(p, "latent_channels", 4)
                x = torch.stack([torch.randn(channels, p.height // 8, p.width // 8,
                                             generator=torch.Generator().manual_seed(s)) for s in seeds])
                kds.torch = self.hijack = TorchHijack(seeds[0])
                sampler = config.constructor(self.model)
                sampler.config = config
                outs.append(sampler.sample(p, x, cond, uncond))
        finally:
            kds.torch = saved_torch
        return Processed(p, torch.cat(outs), p.seed, [create_infotext(p)] * (p.batch_size * p.n_iter))

    def api_txt2img(self, sampler_name, **fields):
        """``POST /sdapi/v1/txt2img``: the name through ``get_sampler_and_scheduler`` and ``validate_sampler_name``;
        returns ``(p, info)`` with ``info`` = ``Processed.js()`` parsed."""
        name, _ = self.sd_samplers.get_sampler_and_scheduler(sampler_name, "Automatic")
        if name not in self.sd_samplers.all_samplers_map:
            raise ValueError("Sampler not found")
        p = Processing(sampler_name=name, **fields)
        return p, json.loads(self.process_images(p).js())
