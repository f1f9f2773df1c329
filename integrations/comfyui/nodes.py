"""ComfyUI nodes for Q-Drift: "Q-Drift Calibrate" and "Q-Drift Sampler".

Written against ComfyUI's custom-node interface (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` classes in
``NODE_CLASS_MAPPINGS``) and its sampling objects: ``comfy.samplers.KSAMPLER(sampler_function,
extra_options)``, which calls ``sampler_function(model_k, noise, sigmas, extra_args=..., callback=...,
disable=..., **extra_options)``; ``comfy.samplers.CFGGuider`` (guidance applied before the sampler sees the
denoised output); ``comfy.sample.prepare_noise``; and ``comfy.utils.ProgressBar``. Checked against
Comfy-Org/ComfyUI commit e0d4ea77 (comfy/samplers.py).

Flow models (SD3, FLUX) need nothing special: ComfyUI presents them to samplers as denoisers with
sigma = flow time, which is what the qdrift samplers and calibration expect.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

import comfy.sample
import comfy.samplers
import comfy.utils

import qdrift
from qdrift.hosts import (
    SAMPLER_LABELS,
    STOCHASTIC_SAMPLERS,
    PairedTrace,
    bind_sampler,
    load_calibration_cached,
    sampler_names,
    seeded_noise_factory,
)

try:  # ComfyUI's path registry; absent only in stripped test environments
    import folder_paths
except ImportError:  # pragma: no cover
    folder_paths = None

LOG = logging.getLogger("qdrift.comfyui")

CALIBRATION_TYPE = "QDRIFT_CALIBRATION"
CATEGORY = "sampling/custom_sampling/qdrift"
REDUCE_CHOICES = ["channel", "scalar"]
SAMPLER_REDUCE_CHOICES = ["as calibrated", "channel", "scalar"]
FORMS = ["first_order", "quadrature"]
CORRECTIONS = ["drift", "noise"]


def _output_dir() -> str:
    if folder_paths is not None:
        return folder_paths.get_output_directory()
    return os.path.abspath("output")


def _search_dirs():
    dirs = [_output_dir()]
    if folder_paths is not None:
        dirs.append(os.path.join(folder_paths.models_dir, "qdrift"))
    return dirs


def resolve_calibration_path(name: str) -> str:
    """Finds a calibration file: an absolute path, or a path relative to ComfyUI's output directory or
    ``models/qdrift``; ``.safetensors`` is appended when missing.

    Raises:
        ValueError: for an empty name.
        FileNotFoundError: naming every place that was searched.
    """
    name = (name or "").strip()
    if not name:
        raise ValueError("Q-Drift: no calibration file given (connect a calibration or type a file name)")
    candidates = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in _search_dirs()]
    tried = []
    for c in candidates:
        for path in (c, c + ".safetensors") if not c.endswith(".safetensors") else (c,):
            tried.append(path)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError("Q-Drift calibration file not found; looked for: " + ", ".join(tried))


def _model_sampling_name(model) -> str:
    try:
        return type(model.get_model_object("model_sampling")).__name__
    except Exception:  # a stand-in or an unusual patcher
        return type(getattr(getattr(model, "model", None), "model_sampling", None)).__name__


class QDriftCalibrate:
    """Paired calibration through ComfyUI's own CFG guider (pairs taken after CFG).

    Pass 1 samples the full-precision MODEL with Euler and records every state and denoised output; pass 2
    evaluates the quantized MODEL on the same states. K trajectories start from K noises drawn from ``seed``.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_fp": ("MODEL", {"tooltip": "The full-precision model."}),
                "model_q": ("MODEL", {"tooltip": "The quantized load of the same checkpoint (GGUF, NF4, SVDQuant...)."}),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT", {"tooltip": "Sets the latent size; its first item is repeated K times."}),
                "sigmas": ("SIGMAS", {"tooltip": "The calibration schedule (e.g. BasicScheduler)."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "K": ("INT", {"default": 5, "min": 1, "max": 4096, "tooltip": "Number of calibration trajectories."}),
                "reduce": (REDUCE_CHOICES, {"default": "channel"}),
                "filename_prefix": ("STRING", {"default": "qdrift/calibration"}),
            }
        }

    RETURN_TYPES = (CALIBRATION_TYPE, "STRING")
    RETURN_NAMES = ("calibration", "path")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Measures Q-Drift's per-step quantization-error variance V and writes a qdrift calibration file."

    def calibrate(self, model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce, filename_prefix):
        """Runs the two passes and writes ``<output>/<filename_prefix>_NNNNN.safetensors``.

        Returns:
            ``(calibration, path)``.

        Raises:
            ValueError: for an empty schedule, K < 1, an unknown reduce, models with different noise
                parameterizations, or a filename prefix outside the output folder.
        """
        if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("Q-Drift Calibrate: sigmas must hold at least 2 values (steps + 1); connect a scheduler")
        if int(K) < 1:
            raise ValueError(f"Q-Drift Calibrate: K must be >= 1, got {K}")
        if reduce not in REDUCE_CHOICES:
            raise ValueError(f"Q-Drift Calibrate: reduce must be one of {REDUCE_CHOICES}, got {reduce!r}")
        if model_fp is model_q:
            LOG.warning("Q-Drift Calibrate: the two MODEL inputs are the same object; V will be 0")
        kind_fp, kind_q = _model_sampling_name(model_fp), _model_sampling_name(model_q)
        if kind_fp != kind_q:
            raise ValueError(
                f"Q-Drift Calibrate: the models use different noise parameterizations ({kind_fp} vs {kind_q}); "
                "load the same checkpoint twice (full precision and quantized)"
            )
        latent = latent_image["samples"]
        if hasattr(comfy.sample, "fix_empty_latent_channels"):
            latent = comfy.sample.fix_empty_latent_channels(model_fp, latent)
        latent = latent[:1].repeat((int(K),) + (1,) * (latent.ndim - 1))
        noise = comfy.sample.prepare_noise(latent, int(seed))
        steps = sigmas.numel() - 1
        pbar = comfy.utils.ProgressBar(2 * steps)
        callback = lambda i, denoised, x, total: pbar.update(1)  # noqa: E731 (ComfyUI's callback signature)
        trace = PairedTrace(meta={"host": "comfyui", "cfg": float(cfg), "seed": int(seed), "model_sampling": kind_fp})
        for model, sampler_function in ((model_fp, trace.fp_sampler()), (model_q, trace.q_sampler())):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(cfg)
            guider.sample(
                noise, latent, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                denoise_mask=None, callback=callback, disable_pbar=True, seed=int(seed),
            )
        cal = trace.calibration(reduce=reduce)
        path = self._next_path(filename_prefix)
        cal.save(path)
        LOG.info("Q-Drift Calibrate: wrote %s (%s)", path, cal)
        return (cal, path)

    @staticmethod
    def _next_path(prefix: str) -> str:
        prefix = (prefix or "qdrift/calibration").strip().replace("\\", "/")
        if os.path.isabs(prefix) or ".." in prefix.split("/"):
            raise ValueError(f"Q-Drift Calibrate: filename_prefix must be relative to the output folder, got {prefix!r}")
        base = os.path.join(_output_dir(), prefix)
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        n = 1
        while os.path.exists(f"{base}_{n:05d}.safetensors"):
            n += 1
        return f"{base}_{n:05d}.safetensors"


def _is_flow_model(model_k) -> bool:
    """True for a rectified-flow (``model_sampling`` CONST: SD3, FLUX) model, found the way ComfyUI's own
    samplers find it (``model.inner_model.inner_model.model_sampling``)."""
    guider = getattr(model_k, "inner_model", None)
    sampling = getattr(getattr(guider, "inner_model", None), "model_sampling", None)
    return sampling is not None and any(c.__name__.endswith("CONST") for c in type(sampling).__mro__)


def _refuse_flow_for_stochastic(sampler_name: str, fn):
    """The ancestral/SDE noise formulas assume ``x = x0 + sigma eps``; ComfyUI switches to separate "RF"
    samplers for flow models, which qdrift does not have: say so instead of sampling wrongly."""
    if sampler_name not in STOCHASTIC_SAMPLERS:
        return fn

    @functools.wraps(fn)
    def guarded(model, x, sigmas, *args, **kwargs):
        if _is_flow_model(model):
            raise ValueError(
                f"Q-Drift Sampler: {sampler_name} injects noise in the x = x0 + sigma * eps form, but this is a "
                "flow model (SD3/FLUX); choose euler, heun, lms or dpmpp_2m"
            )
        return fn(model, x, sigmas, *args, **kwargs)

    return guarded


def build_sampler(
    sampler_name: str,
    calibration: Optional[qdrift.Calibration],
    *,
    strength: float = 1.0,
    reduce: str = "as calibrated",
    **knobs: Any,
):
    """The ``comfy.samplers.KSAMPLER`` for a qdrift sampler with a calibration (used by the node).

    Knobs the chosen sampler does not take (``eta`` for Euler, ``form`` for Euler a...) are dropped.
    """
    if sampler_name not in sampler_names():
        raise ValueError(f"Q-Drift Sampler: unknown sampler {sampler_name!r}; choose one of {sampler_names()}")
    if reduce not in SAMPLER_REDUCE_CHOICES:
        raise ValueError(f"Q-Drift Sampler: reduce must be one of {SAMPLER_REDUCE_CHOICES}, got {reduce!r}")
    if not isinstance(strength, (int, float)) or strength < 0 or strength != strength:
        raise ValueError(f"Q-Drift Sampler: strength must be a number >= 0, got {strength!r}")
    if calibration is not None and reduce != "as calibrated":
        calibration = calibration.with_options(reduce=reduce)
    fn = _refuse_flow_for_stochastic(
        sampler_name, bind_sampler(sampler_name, noise_sampler_factory=seeded_noise_factory(sampler_name))
    )
    accepted = set(inspect.signature(qdrift.SAMPLERS[sampler_name]).parameters)
    extra = {k: v for k, v in knobs.items() if k in accepted}
    extra.update({"V": calibration, "strength": float(strength)})
    return comfy.samplers.KSAMPLER(fn, extra)


class QDriftSampler:
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced running a qdrift sampler with a calibration."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sampler_name": (sampler_names(), {"default": "euler"}),
                "calibration_file": ("STRING", {"default": "", "tooltip": "A .safetensors file from Q-Drift Calibrate: absolute, or relative to output/ or models/qdrift/. Ignored when a calibration is connected."}),
                "reduce": (SAMPLER_REDUCE_CHOICES, {"default": "as calibrated", "tooltip": "channel: a V per latent channel; scalar: one pooled V per step (the paper's main setting)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Multiplier on V (0 = the plain sampler)."}),
            },
            "optional": {
                "calibration": (CALIBRATION_TYPE,),
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Ancestral/SDE noise amount."}),
                "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
                "form": (FORMS, {"default": "first_order", "tooltip": "DPM++ samplers: first-order c or the authors' quadrature c."}),
                "correction": (CORRECTIONS, {"default": "drift", "tooltip": "Ancestral/SDE samplers: Q-Drift drift, or lower the injected noise."}),
            },
        }

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = "A qdrift sampler (Euler, Euler a, Heun, LMS, DPM++ 2M / 2M SDE / 3M SDE) corrected with a Q-Drift calibration."

    @classmethod
    def IS_CHANGED(cls, sampler_name="", calibration_file="", reduce="", strength=1.0, calibration=None, **knobs):
        """Re-runs the node when the calibration file on disk changes (ComfyUI caches node outputs)."""
        try:
            path = resolve_calibration_path(calibration_file)
            st = os.stat(path)
            return f"{path}:{st.st_mtime_ns}:{st.st_size}"
        except (OSError, ValueError):
            return ""

    def get_sampler(self, sampler_name, calibration_file, reduce, strength, calibration=None, **knobs) -> Tuple[Any]:
        """Returns ``(KSAMPLER,)`` for the chosen sampler with the connected or named calibration.

        Raises:
            FileNotFoundError: if the named calibration file is not found (the message lists where it looked).
            ValueError: for a bad sampler name, reduce, strength or calibration input.
        """
        if calibration is None:
            calibration = load_calibration_cached(resolve_calibration_path(calibration_file))
        elif not isinstance(calibration, qdrift.Calibration):
            raise ValueError(f"Q-Drift Sampler: the calibration input is a {type(calibration).__name__}, not a qdrift Calibration")
        return (build_sampler(sampler_name, calibration, strength=strength, reduce=reduce, **knobs),)


NODE_CLASS_MAPPINGS: Dict[str, type] = {
    "QDriftCalibrate": QDriftCalibrate,
    "QDriftSampler": QDriftSampler,
}
NODE_DISPLAY_NAME_MAPPINGS: Dict[str, str] = {
    "QDriftCalibrate": "Q-Drift Calibrate",
    "QDriftSampler": "Q-Drift Sampler",
}
"""Display names; the sampler choice lists every qdrift sampler (labels: ``qdrift.hosts.SAMPLER_LABELS``)."""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "QDriftCalibrate", "QDriftSampler", "build_sampler", "SAMPLER_LABELS"]
