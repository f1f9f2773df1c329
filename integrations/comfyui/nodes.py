"""ComfyUI nodes for Q-Drift: "Q-Drift Calibrate" and "Q-Drift Sampler".

The work (:func:`calibrate`, :func:`get_sampler`) and the input tables live here; two node forms read them: the
classic one (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` classes in ``NODE_CLASS_MAPPINGS``, below) and
the V3 schema (``nodes_v3.py``, used when ComfyUI has ``comfy_api.v0_0_2``). ComfyUI's sampling objects used: ``comfy.samplers.KSAMPLER(sampler_function,
extra_options)``, which calls ``sampler_function(model_k, noise, sigmas, extra_args=..., callback=...,
disable=..., **extra_options)``; ``comfy.samplers.CFGGuider`` (guidance applied before the sampler sees the
denoised output); ``comfy.sample.prepare_noise``; and ``comfy.utils.ProgressBar``. Checked against
Comfy-Org/ComfyUI a125cd84 (v0.3.64), also run inside it (tests/integrations/test_real_hosts.py).

Flow models (SD3, FLUX): ComfyUI presents them to samplers as denoisers with sigma = flow time, which is what the
qdrift samplers and calibration expect; every sampler is told it samples a flow (v2's drift is then along the
score, and the ancestral/SDE samplers inject noise in the flow form).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import os
from typing import Any, Dict, Optional, Tuple

import torch

import comfy.sample
import comfy.samplers
import comfy.utils

import qdrift
from qdrift.calib.run import check_bands
from qdrift.calib.size import host_sizes
from qdrift.hosts import (
    HOST_BANDS,
    SAMPLER_LABELS,
    STOCHASTIC_SAMPLERS,
    PairedTrace,
    bind_sampler,
    check_calibration_channels,
    flow_sde_sigmas,
    load_calibration_cached,
    sampler_names,
    seeded_noise_factory,
)

from qdrift.hosts._bind import BROWNIAN as SDE_SAMPLERS  # the DPM++ SDE samplers (log-SNR steps, Brownian noise)
from qdrift.hosts._bind import first_non_file, host_seed, refuse_non_file
from qdrift.samplers._common import CORRECTIONS as CORE_CORRECTIONS, FORMS as CORE_FORMS
from qdrift.validation import _real, check_knobs, flag

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
CORRECTIONS = ["auto", "drift", "noise"]  # auto: the sampler's own default (qdrift.samplers.dpmpp.sde_correction)


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
        ValueError: for an empty name, or one that is not a string.
        qdrift.CalibrationFileError: (a ``ValueError``) if no file matched but a path searched is a directory (or
            another non-regular file), naming it.
        FileNotFoundError: naming every place that was searched.
    """
    if name is not None and not isinstance(name, str):
        raise ValueError(f"Q-Drift Sampler: calibration_file must be a file name (a string), got {name!r:.80}")
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
    other = first_non_file(tried)
    if other is not None:
        refuse_non_file(other)
    raise FileNotFoundError("Q-Drift calibration file not found; looked for: " + ", ".join(tried))


def prediction_type(model) -> str:
    """The model's prediction type (``EPS``, ``V_PREDICTION``, ``EDM``, ``CONST``, ``X0``, ...).

    ComfyUI builds every ``model_sampling`` as a class named ``ModelSampling`` that mixes a sampling class
    (``ModelSamplingDiscrete``, ``ModelSamplingDiscreteFlow``... all ``torch.nn.Module``) with a prediction class
    (comfy/model_sampling.py); the prediction class is the first class of its MRO that is not a module.

    Args:
        model: a ComfyUI ``ModelPatcher`` (MODEL), or a ``BaseModel``.

    Returns:
        The prediction class's name, or ``"unknown"`` when the model carries no ``model_sampling``.
    """
    try:
        sampling = model.get_model_object("model_sampling")
    except Exception:  # an unusual patcher, or a BaseModel
        inner = getattr(model, "model", model)
        sampling = getattr(inner, "model_sampling", None)
    if sampling is None:
        return "unknown"
    for cls in type(sampling).__mro__:
        if cls is object or issubclass(cls, torch.nn.Module) or cls.__name__.startswith("ModelSampling"):
            continue
        return cls.__name__
    return type(sampling).__name__


def _latent_channels(model) -> Optional[int]:
    """``latent_format.latent_channels`` of a MODEL (ComfyUI's ``BaseModel.latent_format``), if it has one."""
    inner = getattr(model, "model", model)
    return getattr(getattr(inner, "latent_format", None), "latent_channels", None)


# --------------------------------------------------------------------------------------------- node inputs
# One table per node, read by the classic INPUT_TYPES and by the V3 schema (nodes_v3.py).
CALIBRATE_INPUTS = [
    ("model_fp", "MODEL", {"tooltip": "The full-precision model."}),
    ("model_q", "MODEL", {"tooltip": "The quantized load of the same checkpoint (GGUF, NF4, SVDQuant...)."}),
    ("positive", "CONDITIONING", {}),
    ("negative", "CONDITIONING", {}),
    ("latent_image", "LATENT", {"tooltip": "Sets the latent size; its first item is repeated K times."}),
    ("sigmas", "SIGMAS", {"tooltip": "The calibration schedule (e.g. BasicScheduler)."}),
    ("cfg", "FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
    ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
    ("K", "INT", {"default": 5, "min": 1, "max": 4096, "tooltip": "Number of calibration trajectories."}),
    ("reduce", REDUCE_CHOICES, {"default": "channel"}),
    ("filename_prefix", "STRING", {"default": "qdrift/calibration"}),
]
CALIBRATE_OPTIONAL_INPUTS = [
    ("bands", "INT", {"default": HOST_BANDS, "min": 1, "max": 16, "tooltip": "Also calibrate per radial spatial-frequency band of each latent channel (1: per channel only). With bands the Q-Drift v2 correction is solved per channel and band: it removes a fine-grained error's speckle that one coefficient per channel cannot locate, and keeps the fine detail one coefficient would smooth (4 bands on the bench's flow LMS: 48-58 % of the distance to the full-precision images removed, one band 15-16 %)."}),
    ("size_drift", "BOOLEAN", {"default": True, "tooltip": "A third pass (two quantized sampling runs per trajectory: plain and output-corrected) that sizes the Q-Drift v2 output correction and drift to what the quantized sampler really accumulates (qdrift.size_drift); kept only where the K runs can tell it from the calibrated one. Skipped on flow models (SD3, FLUX), where it measured worse."}),
]
SAMPLER_INPUTS = [
    ("sampler_name", sampler_names(), {"default": "euler"}),
    ("calibration_file", "STRING", {"default": "", "tooltip": "A .safetensors file from Q-Drift Calibrate: absolute, or relative to output/ or models/qdrift/. Ignored when a calibration is connected."}),
    ("reduce", SAMPLER_REDUCE_CHOICES, {"default": "as calibrated", "tooltip": "channel: a V per latent channel; scalar: one pooled V per step (the paper's main setting)."}),
    ("strength", "FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Multiplier on V (0 = the plain sampler, equal to ComfyUI's own)."}),
]
SAMPLER_OPTIONAL_INPUTS = [
    ("calibration", CALIBRATION_TYPE, {}),
    ("eta", "FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Ancestral/SDE noise amount."}),
    ("s_noise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
    ("form", FORMS, {"default": "first_order", "tooltip": "DPM++ samplers: first-order c or the authors' quadrature c."}),
    ("correction", CORRECTIONS, {"default": "auto", "tooltip": "Ancestral/SDE samplers: Q-Drift drift, or lower the injected noise first (auto: noise first for the DPM++ SDE samplers with Q-Drift v2, the drift otherwise)."}),
]
CALIBRATE_DESCRIPTION = "Measures Q-Drift's per-step quantization-error variance V and writes a qdrift calibration file."
SAMPLER_DESCRIPTION = "A qdrift sampler (Euler, Euler a, Heun, LMS, DPM++ 2M / 2M SDE / 3M SDE) corrected with a Q-Drift calibration."
DISPLAY_NAMES = {"QDriftCalibrate": "Q-Drift Calibrate", "QDriftSampler": "Q-Drift Sampler"}

# Where ComfyUI's own sampler of the same name differs from k-diffusion's, the option that follows ComfyUI
# (so that strength 0 is ComfyUI's sampler): its sample_lms returns the denoised output on the step to 0.
HOST_OPTIONS: Dict[str, Dict[str, Any]] = {"lms": {"final_denoise": True}}


def _classic(table) -> Dict[str, tuple]:
    return {name: (kind, dict(opts)) for name, kind, opts in table}


# ------------------------------------------------------------------------------------------------ the work
def calibrate(model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce, filename_prefix,
              size_drift="auto", bands=HOST_BANDS):
    """Q-Drift Calibrate: runs the passes and writes ``<output>/<filename_prefix>_NNNNN.safetensors``.

    Pass 1 samples the full-precision MODEL with Euler through ComfyUI's own CFG guider and records every state
    and guided denoised output; pass 2 evaluates the quantized MODEL on the same states. With ``size_drift``
    (True, False, or ``"auto"``: every model but a flow model, where it measured worse,
    :func:`qdrift.calib.size.host_sizes`; the node's ticked box), pass 3 samples the quantized MODEL with qdrift
    Euler from the same noises, plain and with v2's output
    correction (no drift), and sizes v2's output correction and drift by what they accumulate against pass 1 (:meth:`qdrift.calib.PairedTrace.size_sampler`).
    K trajectories start from K noises drawn from ``seed``. The file records both models' prediction type. With
    ``bands > 1`` the calibration also keeps its statistics per radial frequency band of each channel
    (:func:`qdrift.calibrate`'s ``bands``), which v2 then corrects per band.

    Returns:
        ``(calibration, path)``.

    Raises:
        ValueError: before any pass runs, for an empty schedule, a latent_image that is not a LATENT holding at least
            one latent, K not an integer >= 1, cfg not a finite number, a seed not an integer, an unknown reduce,
            size_drift not True, False or "auto", bands not an integer >= 1 or leaving a band of the latent's grid
            empty,
            models with different prediction types (EPS / V_PREDICTION / CONST ...), or a filename prefix outside
            the output folder or without a file name.
    """
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("Q-Drift Calibrate: sigmas must hold at least 2 values (steps + 1); connect a scheduler")
    if not isinstance(K, numbers.Integral) or isinstance(K, bool) or K < 1:
        raise ValueError(f"Q-Drift Calibrate: K (the number of trajectories) must be an integer >= 1, got {K!r:.80}")
    cfg_value = _real(cfg)
    if cfg_value is None or not math.isfinite(cfg_value):
        raise ValueError(f"Q-Drift Calibrate: cfg must be a finite number, got {cfg!r:.80}")
    host_seed(seed, "Q-Drift Calibrate")
    latent = latent_image.get("samples") if isinstance(latent_image, dict) else None
    if not isinstance(latent, torch.Tensor) or latent.ndim < 2:
        if isinstance(latent, torch.Tensor):
            got = f"'samples' of shape {tuple(latent.shape)}"
        elif isinstance(latent_image, dict):
            got = f"a dict with keys {sorted(map(str, latent_image))} and 'samples' {type(latent).__name__}"
        elif isinstance(latent_image, torch.Tensor):
            got = f"a bare tensor of shape {tuple(latent_image.shape)}"
        else:
            got = f"a {type(latent_image).__name__}"
        raise ValueError(
            "Q-Drift Calibrate: latent_image must be a LATENT (a dict whose 'samples' is a tensor [batch, channels, "
            f"...], e.g. from Empty Latent Image), got {got}"
        )
    if latent.shape[0] < 1:
        raise ValueError(
            f"Q-Drift Calibrate: latent_image holds no latent (batch size 0, shape {tuple(latent.shape)}); its first "
            "item sets the calibration's latent size"
        )
    if reduce not in REDUCE_CHOICES:
        raise ValueError(f"Q-Drift Calibrate: reduce must be one of {REDUCE_CHOICES}, got {reduce!r}")
    host_sizes("Q-Drift Calibrate", size_drift, False)
    bands = check_bands("Q-Drift Calibrate", bands, latent.shape[2:])
    _prefix(filename_prefix)
    if model_fp is model_q:
        LOG.warning("Q-Drift Calibrate: the two MODEL inputs are the same object; V will be 0")
    kind_fp, kind_q = prediction_type(model_fp), prediction_type(model_q)
    if kind_fp != kind_q:
        raise ValueError(
            f"Q-Drift Calibrate: the models have different prediction types ({kind_fp} vs {kind_q}); "
            "load the same checkpoint twice (full precision and quantized)"
        )
    channels_fp, channels_q = _latent_channels(model_fp), _latent_channels(model_q)
    if None not in (channels_fp, channels_q) and channels_fp != channels_q:
        raise ValueError(
            f"Q-Drift Calibrate: the models have different latent channel counts ({channels_fp} vs {channels_q}); "
            "load the same checkpoint twice (full precision and quantized)"
        )
    if hasattr(comfy.sample, "fix_empty_latent_channels"):
        latent = comfy.sample.fix_empty_latent_channels(model_fp, latent)
    latent = latent[:1].repeat((int(K),) + (1,) * (latent.ndim - 1))
    noise = comfy.sample.prepare_noise(latent, int(seed))
    steps = sigmas.numel() - 1
    sizes = host_sizes("Q-Drift Calibrate", size_drift, kind_fp == "CONST")
    if size_drift == "auto" and not sizes:
        LOG.info("Q-Drift Calibrate: not sizing the correction on a flow model (CONST), where it measured worse")
    pbar = comfy.utils.ProgressBar((3 if sizes else 2) * steps)
    callback = lambda i, denoised, x, total: pbar.update(1)  # noqa: E731 (ComfyUI's callback signature)
    trace = PairedTrace(meta={"host": "comfyui", "cfg": float(cfg), "seed": int(seed), "prediction_type": kind_fp})

    def run(model, sampler_function):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.sample(
            noise, latent, comfy.samplers.KSAMPLER(sampler_function), sigmas,
            denoise_mask=None, callback=callback, disable_pbar=True, seed=int(seed),
        )

    run(model_fp, trace.fp_sampler())
    run(model_q, trace.q_sampler())
    cal = trace.calibration(reduce=reduce, bands=bands)
    if sizes:
        run(model_q, trace.size_sampler(cal))
        cal = trace.sized()
        raw, se = cal.drift_scale_estimate()
        LOG.info("Q-Drift Calibrate: drift sized by the measured accumulation: factor %s (raw %s +- %s)",
                 [round(v, 3) for v in cal.drift_scale.tolist()], [round(v, 3) for v in raw.tolist()],
                 [round(v, 3) for v in se.tolist()])
    path = _next_path(filename_prefix)
    cal.save(path)
    cal.source_file = path  # named in the Q-Drift Sampler's messages when connected directly
    LOG.info("Q-Drift Calibrate: wrote %s (%s)", path, cal)
    return (cal, path)


def _prefix(prefix: Optional[str]) -> str:
    """The checked filename prefix (empty: ``qdrift/calibration``)."""
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"Q-Drift Calibrate: filename_prefix must be a string, got {prefix!r:.80}")
    prefix = (prefix or "qdrift/calibration").strip().replace("\\", "/")
    if os.path.isabs(prefix) or ".." in prefix.split("/"):
        raise ValueError(f"Q-Drift Calibrate: filename_prefix must be relative to the output folder, got {prefix!r}")
    if prefix.split("/")[-1] in ("", "."):
        raise ValueError(
            f"Q-Drift Calibrate: filename_prefix must end in a file name (e.g. 'qdrift/calibration'), got {prefix!r}"
        )
    return prefix


def _next_path(prefix: str) -> str:
    prefix = _prefix(prefix)
    base = os.path.join(_output_dir(), prefix)
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    n = 1
    while os.path.exists(f"{base}_{n:05d}.safetensors"):
        n += 1
    return f"{base}_{n:05d}.safetensors"


def _base_model(model_k):
    """The ``BaseModel`` behind the sampler's model (``model.inner_model.inner_model``, as ComfyUI's own samplers
    reach ``model_sampling``): KSamplerX0Inpaint -> guider -> BaseModel."""
    guider = getattr(model_k, "inner_model", None)
    return getattr(guider, "inner_model", None)


def node_sizing(size_drift):
    """The Calibrate node's ticked ``size_drift`` box as :func:`calibrate`'s argument: ``"auto"`` (not on a flow
    model), else the value as given (unticked: False; anything else is refused there)."""
    return "auto" if flag(size_drift) else size_drift


def _is_flow_model(model_k) -> bool:
    """True for a rectified-flow (prediction type CONST: SD3, FLUX) model."""
    base = _base_model(model_k)
    return base is not None and prediction_type(base) == "CONST"


def _flow_start(base, sigmas):
    """The first sigma ComfyUI's own SDE samplers use on a flow model (``offset_first_sigma_for_snr``: the model's
    ``percent_to_sigma(1e-4)`` in place of t >= 1), so strength 0 stays close to them."""
    sampling = getattr(base, "model_sampling", None)
    try:
        from comfy.k_diffusion.sampling import offset_first_sigma_for_snr

        return flow_sde_sigmas(sigmas, float(offset_first_sigma_for_snr(sigmas, sampling)[0]))
    except (ImportError, AttributeError, TypeError):  # older ComfyUI, or a stripped one
        to_sigma = getattr(sampling, "percent_to_sigma", None)
        return flow_sde_sigmas(sigmas, float(to_sigma(1e-4)) if to_sigma is not None else None)


def _guard(sampler_name: str, fn, calibration, source: str):
    """The sampler as ComfyUI runs it: checks the calibration against the model being sampled first.

    A calibration measured on another latent (4-channel SD1.5 vs 16-channel SD3...) is refused naming the file,
    its channels and the model's latent format. Every sampler gets ``flow=True`` on flow models (prediction type
    CONST: v2 then drifts along the score, and the ancestral/SDE samplers switch to the RF formulas as ComfyUI's
    do), and the SDE ones ComfyUI's offset first sigma with their Brownian noise laid over the schedule as given,
    as ComfyUI's own do.
    """
    noise_factory = seeded_noise_factory(sampler_name)

    @functools.wraps(fn)
    def guarded(model, x, sigmas, *args, **kwargs):
        base = _base_model(model)
        latent_format = getattr(base, "latent_format", None)
        channels = getattr(latent_format, "latent_channels", None) or x.shape[1]
        fmt = f" (latent format {type(latent_format).__name__})" if latent_format is not None else ""
        check_calibration_channels(calibration, channels, source=source, model=f"the model{fmt}", host="Q-Drift Sampler")
        kwargs["flow"] = _is_flow_model(model)  # the noise formulas' state form, and the drift's direction
        if sampler_name in STOCHASTIC_SAMPLERS:
            if kwargs["flow"] and sampler_name in SDE_SAMPLERS:
                if kwargs.get("noise_sampler") is None:
                    kwargs["noise_sampler"] = noise_factory(x, sigmas, kwargs.get("extra_args") or {})
                sigmas = _flow_start(base, sigmas)
        return fn(model, x, sigmas, *args, **kwargs)

    return guarded


def build_sampler(
    sampler_name: str,
    calibration: Optional[qdrift.Calibration],
    *,
    strength: float = 1.0,
    reduce: str = "as calibrated",
    source: Optional[str] = None,
    **knobs: Any,
):
    """The ``comfy.samplers.KSAMPLER`` for a qdrift sampler with a calibration (used by the node).

    Knobs the chosen sampler does not take (``eta`` for Euler, ``form`` for Euler a...) are dropped; the
    options in :data:`HOST_OPTIONS` make strength 0 equal ComfyUI's own sampler of the same name. Every value is
    checked here, whether the sampler takes it or not: strength, ``eta`` and ``s_noise`` finite numbers >= 0
    (numpy numbers included), ``form`` and ``correction`` one of the core's choices (``correction`` also
    ``"auto"``).
    """
    if sampler_name not in sampler_names():
        raise ValueError(f"Q-Drift Sampler: unknown sampler {sampler_name!r}; choose one of {sampler_names()}")
    if reduce not in SAMPLER_REDUCE_CHOICES:
        raise ValueError(f"Q-Drift Sampler: reduce must be one of {SAMPLER_REDUCE_CHOICES}, got {reduce!r}")
    value = _real(strength)
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"Q-Drift Sampler: strength must be a finite number >= 0, got {strength!r}")
    strength = value
    check_knobs("Q-Drift Sampler", **{k: knobs[k] for k in ("eta", "s_noise") if k in knobs})
    for key, choices in (("form", CORE_FORMS), ("correction", ("auto",) + tuple(CORE_CORRECTIONS))):
        if key in knobs and (not isinstance(knobs[key], str) or knobs[key] not in choices):
            raise ValueError(f"Q-Drift Sampler: {key} must be one of {list(choices)}, got {knobs[key]!r:.80}")
    if source is None:
        source = getattr(calibration, "source_file", None) or "(connected input)"
    if calibration is not None and reduce != "as calibrated":
        calibration = calibration.with_options(reduce=reduce)
    fn = _guard(
        sampler_name,
        bind_sampler(sampler_name, noise_sampler_factory=seeded_noise_factory(sampler_name)),
        calibration,
        source,
    )
    accepted = set(inspect.signature(qdrift.SAMPLERS[sampler_name]).parameters)
    extra = {k: v for k, v in knobs.items() if k in accepted and not (k == "correction" and v == "auto")}
    extra.update(HOST_OPTIONS.get(sampler_name, {}))
    extra.update({"V": calibration, "strength": float(strength)})
    return comfy.samplers.KSAMPLER(fn, extra)


def get_sampler(sampler_name, calibration_file, reduce, strength, calibration=None, **knobs):
    """Q-Drift Sampler: the KSAMPLER for the chosen sampler with the connected or named calibration.

    Raises:
        FileNotFoundError: if the named calibration file is not found (the message lists where it looked).
        ValueError: for a bad sampler name, reduce, strength or calibration input.
    """
    source = None
    if calibration is None:
        source = resolve_calibration_path(calibration_file)
        calibration = load_calibration_cached(source)
    elif not isinstance(calibration, qdrift.Calibration):
        raise ValueError(f"Q-Drift Sampler: the calibration input is a {type(calibration).__name__}, not a qdrift Calibration")
    return build_sampler(sampler_name, calibration, strength=strength, reduce=reduce, source=source, **knobs)


def calibration_fingerprint(calibration_file="", **_ignored) -> str:
    """Changes when the named calibration file on disk changes (ComfyUI caches node outputs)."""
    try:
        path = resolve_calibration_path(calibration_file)
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"
    except (OSError, ValueError):
        return ""


# ------------------------------------------------------------------------------------- classic node classes
class QDriftCalibrate:
    """Paired calibration through ComfyUI's own CFG guider (pairs taken after CFG); see :func:`calibrate`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _classic(CALIBRATE_INPUTS), "optional": _classic(CALIBRATE_OPTIONAL_INPUTS)}

    RETURN_TYPES = (CALIBRATION_TYPE, "STRING")
    RETURN_NAMES = ("calibration", "path")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = CALIBRATE_DESCRIPTION

    def calibrate(self, model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce, filename_prefix,
                  size_drift=True, bands=HOST_BANDS):
        return calibrate(model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce, filename_prefix,
                         node_sizing(size_drift), bands)

    _next_path = staticmethod(_next_path)


class QDriftSampler:
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced running a qdrift sampler with a calibration."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _classic(SAMPLER_INPUTS), "optional": _classic(SAMPLER_OPTIONAL_INPUTS)}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = SAMPLER_DESCRIPTION

    @classmethod
    def IS_CHANGED(cls, sampler_name="", calibration_file="", reduce="", strength=1.0, calibration=None, **knobs):
        """Re-runs the node when the calibration file on disk changes (ComfyUI caches node outputs)."""
        return calibration_fingerprint(calibration_file)

    def get_sampler(self, sampler_name, calibration_file, reduce, strength, calibration=None, **knobs) -> Tuple[Any]:
        return (get_sampler(sampler_name, calibration_file, reduce, strength, calibration, **knobs),)


NODE_CLASS_MAPPINGS: Dict[str, type] = {
    "QDriftCalibrate": QDriftCalibrate,
    "QDriftSampler": QDriftSampler,
}
NODE_DISPLAY_NAME_MAPPINGS: Dict[str, str] = dict(DISPLAY_NAMES)
"""Display names; the sampler choice lists every qdrift sampler (labels: ``qdrift.hosts.SAMPLER_LABELS``)."""

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "QDriftCalibrate",
    "QDriftSampler",
    "build_sampler",
    "calibrate",
    "get_sampler",
    "prediction_type",
    "SAMPLER_LABELS",
]
