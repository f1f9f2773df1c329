"""A minimal stand-in for the parts of ComfyUI the Q-Drift nodes touch (ComfyUI is not installable here).

Only the call surface is mirrored, from Comfy-Org/ComfyUI commit e0d4ea77 (comfy/samplers.py):
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
- ``comfy.utils.ProgressBar(total).update(n)``; ``folder_paths.get_output_directory()`` and ``models_dir``.

The toy models are analytic: an EPS-style model whose denoiser is the exact Gaussian posterior mean shifted
by the conditioning, and a flow (CONST) model presented as a denoiser with sigma = t.
"""

import math
import sys
import types

import torch


class ModelSamplingEPS:
    sigma_max = torch.tensor(14.6)
    sigma_min = torch.tensor(0.03)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        scale = torch.sqrt(1.0 + sigma**2) if max_denoise else sigma
        return noise * scale + (0 if latent_image is None else latent_image)

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class ModelSamplingCONST(ModelSamplingEPS):
    sigma_max = torch.tensor(1.0)
    sigma_min = torch.tensor(0.0)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * (0 if latent_image is None else latent_image)


class ToyNet:
    """D(x, sigma | cond): Gaussian data N(mu, s^2) per channel, mu shifted by the conditioning; ``error``
    adds a deterministic, x-dependent "quantization" error to the output."""

    def __init__(self, flow=False, error=0.0):
        self.model_sampling = ModelSamplingCONST() if flow else ModelSamplingEPS()
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


def install(output_dir):
    """Registers the stand-in modules in ``sys.modules``; returns them as a namespace."""
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
    sys.modules.update(mods)
    return types.SimpleNamespace(**{k.replace(".", "_"): v for k, v in mods.items()})
