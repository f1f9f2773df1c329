"""Host logic of the Forge / AUTOMATIC1111 extension (``integrations/sd-webui``), kept host-module free.

The extension's scripts pass the host's modules in; everything here is testable without a webui.

How those hosts call a sampler (checked against lllyasviel/stable-diffusion-webui-forge dfdcbab6 and
AUTOMATIC1111/stable-diffusion-webui 1.6+ ``modules/sd_samplers_kdiffusion.py``): a
``SamplerData(name, constructor, aliases, options)`` entry's constructor returns
``KDiffusionSampler(func, sd_model)``; at sampling time the host calls
``func(model_wrap_cfg, x, extra_args={cond, image_cond, uncond, cond_scale, s_min_uncond}, disable=False,
callback=..., **kw)`` where ``kw`` holds ``sigmas`` (and ``n``, ``sigma_min``, ``sigma_max``, ``eta``...) only if
those names are parameters of ``inspect.signature(func)``, plus ``noise_sampler`` when the entry's options
ask for ``brownian_noise`` and ``solver_type`` for ``"heun"``. ``model_wrap_cfg.p`` is the processing object.
Seeded per-step noise comes from ``k_diffusion.sampling.torch.randn_like``, which the host replaces per
generation; the qdrift samplers receive a noise sampler that calls it, so seeds behave as for "Euler a".
"""

from __future__ import annotations

import copy
import math
import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..samplers import REGISTRY
from ..validation import _real
from ._bind import (
    BROWNIAN,
    HOST_BANDS,
    SAMPLER_LABELS,
    STOCHASTIC_SAMPLERS,
    bind_sampler,
    check_calibration_channels,
    first_non_file,
    flow_sde_sigmas,
    load_calibration_cached,
    refuse_non_file,
)

__all__ = [
    "SAMPLER_OPTIONS",
    "Settings",
    "calibration_dirs",
    "resolve_calibration_path",
    "make_sampler",
    "sampler_entries",
    "register_samplers",
    "register_aliases",
    "active_pass",
    "is_qdrift_sampler",
    "calibration_pass",
    "run_calibration_pass",
    "PHASES",
    "REDUCE_CHOICES",
    "STRENGTH_FROM_SETTINGS",
    "panel_strength",
]

# Default schedule and noise options per sampler, as the host's own entries of the same family use them.
_HOST_OPTIONS: Dict[str, Dict[str, Any]] = {
    "euler_ancestral": {"uses_ensd": True},
    "heun": {"second_order": True},
    "dpmpp_2m": {"scheduler": "karras"},
    "dpmpp_2m_sde": {"scheduler": "exponential"},
    "dpmpp_3m_sde": {"scheduler": "exponential", "discard_next_to_last_sigma": True},
}
SAMPLER_OPTIONS: Dict[str, Dict[str, Any]] = {
    name: {**_HOST_OPTIONS.get(name, {}), **({"brownian_noise": True} if info.brownian else {})}
    for name, info in REGISTRY.items()
}

REDUCE_CHOICES = ["as calibrated", "channel", "scalar"]

STRENGTH_FROM_SETTINGS = -1.0
"""The per-generation panel's strength meaning "the one in Settings" (its default)."""

_LOCAL = threading.local()

_STRENGTH_WHERE = "the strength (Settings > Q-Drift, or the Q-Drift panel / its script args in the API)"
_CALIBRATION_WHERE = "the calibration file (Settings > Q-Drift, or the Q-Drift panel / its script args in the API)"


def _strength_value(value: Any) -> Optional[float]:
    """``value`` as a float if it is a real number (numpy and 0-d tensors included) or a string holding one."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return _real(value)


def _check_strength(value: Any) -> float:
    """A strength from the settings or the panel: a finite number >= 0, else ValueError naming the setting."""
    v = _strength_value(value)
    if v is None or not math.isfinite(v) or v < 0:
        raise ValueError(f"Q-Drift: {_STRENGTH_WHERE} must be a finite number >= 0, got {value!r:.80}")
    return v


def panel_strength(value: Any) -> Optional[float]:
    """The per-generation panel's strength: None (no value, or :data:`STRENGTH_FROM_SETTINGS` or any other
    negative number: the strength in Settings) or the finite number >= 0 it sets.

    Raises:
        ValueError: for a value that is not a number (``"abc"``, ``""``, NaN), naming the setting.
    """
    if value is None:
        return None
    v = _strength_value(value)
    if v is None or v != v or v == math.inf:
        raise ValueError(
            f"Q-Drift: {_STRENGTH_WHERE} must be a finite number >= 0 (or {STRENGTH_FROM_SETTINGS:g}: the one in "
            f"Settings), got {value!r:.80}"
        )
    return v if v >= 0 else None


def _calibration_name(value: Any) -> str:
    """A calibration file name from the settings or the panel, stripped ("" for none)."""
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"Q-Drift: {_CALIBRATION_WHERE} must be a file name (a string), got {value!r:.80}")
    return os.fspath(value).strip()


class Settings:
    """Where the sampler reads its calibration: per generation (attributes the extension's panel sets on
    ``p``) first, then the webui settings (``opts``).

    Args:
        opts: the host's ``shared.opts`` (or any object with ``qdrift_calibration``, ``qdrift_strength``,
            ``qdrift_reduce`` attributes).
        models_dir: the host's models directory (``modules.paths.models_path``); relative calibration paths
            are looked up in ``<models_dir>/qdrift`` and then the working directory.
    """

    def __init__(self, opts: Any, models_dir: Optional[str] = None):
        self.opts = opts
        self.models_dir = models_dir

    def for_processing(self, p: Any) -> Tuple[str, float, str]:
        """``(calibration path as given, strength, reduce)`` for one generation.

        Raises:
            ValueError: naming the setting, for a calibration file name that is not a string or a strength that is
                not a finite number >= 0 (a numeric string such as ``"0.5"`` is read as its number).
        """
        path = _calibration_name(getattr(p, "qdrift_calibration", None) or getattr(self.opts, "qdrift_calibration", "")
                                 or "")
        strength = getattr(p, "qdrift_strength", None)
        if strength is None:
            strength = getattr(self.opts, "qdrift_strength", 1.0)
        reduce = getattr(p, "qdrift_reduce", None) or getattr(self.opts, "qdrift_reduce", "as calibrated") or "as calibrated"
        return path, _check_strength(strength), reduce


def calibration_dirs(models_dir: Optional[str]) -> List[str]:
    """Folders searched for relative calibration paths: ``<models>/qdrift`` then the working directory."""
    dirs = []
    if models_dir:
        dirs.append(os.path.join(models_dir, "qdrift"))
    dirs.append(os.getcwd())
    return dirs


def resolve_calibration_path(name: str, models_dir: Optional[str]) -> str:
    """Finds a calibration file (absolute, or relative to ``<models>/qdrift`` or the working directory).

    Raises:
        ValueError: if no file was chosen, or ``name`` is not a string.
        qdrift.CalibrationFileError: (a ``ValueError``) if no file matched but a path tried is a directory (or
            another non-regular file), naming it.
        FileNotFoundError: naming every path tried.
    """
    name = _calibration_name(name)
    if not name:
        raise ValueError(
            "Q-Drift: no calibration file chosen. Set one in Settings > Q-Drift, or in the Q-Drift panel of this "
            "tab, or make one with the 'Q-Drift calibrate' script"
        )
    name = os.path.expanduser(name)
    bases = [""] if os.path.isabs(name) else calibration_dirs(models_dir)
    tried = []
    for base in bases:
        path = os.path.join(base, name)
        for cand in (path,) if path.endswith(".safetensors") else (path, path + ".safetensors"):
            tried.append(cand)
            if os.path.isfile(cand):
                return cand
    other = first_non_file(tried)
    if other is not None:
        refuse_non_file(other)
    raise FileNotFoundError("Q-Drift calibration file not found; looked for: " + ", ".join(tried))


def active_pass() -> Optional[Callable]:
    """The calibration pass (a k-diffusion sampler) the 'Q-Drift calibrate' script installed, if any."""
    return getattr(_LOCAL, "active", None)


class calibration_pass:
    """Context manager: while active, every Q-Drift sampler runs ``sampler`` (a calibration pass) instead."""

    def __init__(self, sampler: Callable):
        self.sampler = sampler

    def __enter__(self):
        self.previous = active_pass()
        _LOCAL.active = self.sampler
        return self

    def __exit__(self, *exc):
        _LOCAL.active = self.previous
        return False


def _host_noise_factory(kdiffusion_sampling: Any) -> Callable:
    def factory(x, sigmas, extra_args):
        torch_like = getattr(kdiffusion_sampling, "torch", None) if kdiffusion_sampling is not None else None
        if torch_like is None or not hasattr(torch_like, "randn_like"):
            return None
        return lambda sigma, sigma_next: torch_like.randn_like(x)

    return factory


def is_flow_model(p: Any) -> bool:
    """True when the generation ``p`` runs a rectified-flow model (SD3, FLUX).

    A1111 (1.10+) marks SD3 checkpoints with ``p.sd_model.is_sd3``; Forge's predictor
    (``p.sd_model.forge_objects.unet.model.predictor``) is a ``PredictionFlux`` / ``PredictionDiscreteFlow`` with
    ``prediction_type == "const"``. Anything else (or a missing attribute) counts as not flow.
    """
    sd_model = getattr(p, "sd_model", None)
    if sd_model is None:
        return False
    if getattr(sd_model, "is_sd3", False) is True or getattr(sd_model, "is_flux", False) is True:
        return True
    predictor = sd_model
    for attr in ("forge_objects", "unet", "model", "predictor"):
        predictor = getattr(predictor, attr, None)
        if predictor is None:
            return False
    if getattr(predictor, "prediction_type", None) == "const":
        return True
    return any(k in cls.__name__ for cls in type(predictor).__mro__ for k in ("Flow", "Flux"))


def _checkpoint_name(p: Any) -> str:
    info = getattr(getattr(p, "sd_model", None), "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "name", None)
    return f"the loaded checkpoint ({name})" if name else "the loaded checkpoint"


def make_sampler(name: str, settings: Settings, kdiffusion_sampling: Any = None) -> Callable:
    """The function a webui ``KDiffusionSampler`` runs for the qdrift sampler ``name``.

    On flow models (:func:`is_flow_model`) every sampler gets ``flow=True``: v2's drift is then along the score, and
    the ancestral/SDE samplers inject noise in the flow form (
    Forge's own "Euler a" does the same through its RF variant, its DPM++ SDE samplers do not), the SDE ones from
    ``t = 1 - 1e-4`` when the schedule starts at 1. A calibration measured on another latent channel count is
    refused naming the file, its channels and the model's.

    It keeps the qdrift sampler's signature (so the host passes ``sigmas``, ``eta``, ``noise_sampler`` and, once
    :func:`sampler_entries` registered them, ``s_churn``...), reads the calibration for each generation from
    :class:`Settings`, draws per-step noise through the host's seeded ``k_diffusion.sampling.torch.randn_like``,
    and runs the 'Q-Drift calibrate' script's pass when one is active.

    Args:
        name: short qdrift sampler name (``"euler"``, ``"dpmpp_2m"``, ...).
        settings: where to read the calibration.
        kdiffusion_sampling: the host's ``k_diffusion.sampling`` module (for seeded noise), or None.
    """
    bound = bind_sampler(name, noise_sampler_factory=_host_noise_factory(kdiffusion_sampling))

    def sampler(model, x, sigmas, V=None, extra_args=None, callback=None, disable=None, **kw):
        p = getattr(model, "p", None)
        kw["flow"] = is_flow_model(p)  # the noise formulas' state form, and the drift's direction
        if name in STOCHASTIC_SAMPLERS:
            if kw["flow"] and name in BROWNIAN:
                sigmas = flow_sde_sigmas(sigmas)
        calib = active_pass()
        if calib is not None:
            return calib(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)
        if V is None:
            path, strength, reduce = settings.for_processing(p)
            if reduce not in REDUCE_CHOICES:
                raise ValueError(f"Q-Drift: reduce must be one of {REDUCE_CHOICES}, got {reduce!r}")
            path = resolve_calibration_path(path, settings.models_dir)
            V = load_calibration_cached(path)
            if not isinstance(x, torch.Tensor) or x.ndim < 2:
                shape = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
                raise ValueError(f"{bound.__name__}: x must be a tensor of shape [batch, channels, ...], got {shape}")
            check_calibration_channels(V, x.shape[1], source=path, model=_checkpoint_name(p))
            if reduce != "as calibrated":
                V = V.with_options(reduce=reduce)
            kw.setdefault("strength", strength)
        return bound(model, x, sigmas, V, extra_args=extra_args, callback=callback, disable=disable, **kw)

    sampler.__signature__ = bound.__signature__
    sampler.__name__ = bound.__name__
    sampler.__doc__ = bound.__doc__
    sampler.qdrift_name = name
    return sampler


def sampler_entries(
    SamplerData: Callable,
    KDiffusionSampler: Callable,
    settings: Settings,
    kdiffusion_sampling: Any = None,
    extra_params: Optional[Dict[Any, List[str]]] = None,
) -> list:
    """One host ``SamplerData`` per qdrift sampler, labelled ``"Euler Q-Drift"``, ``"DPM++ 2M Q-Drift"``...

    Args:
        SamplerData, KDiffusionSampler: the host's classes.
        settings: where the samplers read their calibration.
        kdiffusion_sampling: the host's ``k_diffusion.sampling`` (seeded noise), or None.
        extra_params: the host's ``sd_samplers_kdiffusion.sampler_extra_params``. The host passes ``s_churn``,
            ``s_tmin``, ``s_tmax``, ``s_noise`` only to functions listed there, looked up by what the entry hands
            ``KDiffusionSampler`` (here the function object); each qdrift function is listed with the knobs of
            the built-in of the same name (``sample_euler``: all four; ``sample_dpmpp_2m_sde``: ``s_noise``...).
    """
    entries = []
    for name, label in SAMPLER_LABELS.items():
        fn = make_sampler(name, settings, kdiffusion_sampling)
        if extra_params is not None and extra_params.get(f"sample_{name}"):
            extra_params[fn] = list(extra_params[f"sample_{name}"])
        options = dict(SAMPLER_OPTIONS[name], qdrift=name)
        entries.append(SamplerData(label, lambda model, fn=fn: KDiffusionSampler(fn, model), [f"qdrift_{name}"], options))
    return entries


def register_samplers(sd_samplers: Any, entries: Iterable) -> List[str]:
    """Adds the entries to the host's sampler list (Forge's ``add_sampler``, else A1111's lists + ``set_samplers``),
    then their aliases (:func:`register_aliases`).

    Returns:
        The names added (an entry whose name is already registered is skipped).
    """
    entries = list(entries)
    added = []
    existing = {x.name for x in sd_samplers.all_samplers}
    for entry in entries:
        if entry.name in existing:
            continue
        if hasattr(sd_samplers, "add_sampler"):
            sd_samplers.add_sampler(entry)
        else:
            sd_samplers.all_samplers.append(entry)
            sd_samplers.all_samplers_map[entry.name] = entry
        existing.add(entry.name)
        added.append(entry.name)
    if added and not hasattr(sd_samplers, "add_sampler") and hasattr(sd_samplers, "set_samplers"):
        sd_samplers.set_samplers()
    register_aliases(sd_samplers, entries)
    return added


def register_aliases(sd_samplers: Any, entries: Iterable) -> List[str]:
    """Makes the aliases (``qdrift_euler``...) select the samplers through the API and pasted infotext.

    Both hosts look a ``sampler_name`` up in ``all_samplers_map`` by display name only (and fall back silently to
    the first sampler); the aliases are added there as extra keys. Forge rebuilds that map whenever an extension
    calls ``add_sampler``, so the extension calls this again once the app has started. The memoized
    ``get_sampler_and_scheduler`` is cleared so no earlier fallback sticks.

    Returns:
        The aliases added.
    """
    added = []
    for entry in entries:
        for alias in entry.aliases:
            if sd_samplers.all_samplers_map.get(alias) is None:
                sd_samplers.all_samplers_map[alias] = entry
                added.append(alias)
    clear = getattr(getattr(sd_samplers, "get_sampler_and_scheduler", None), "cache_clear", None)
    if added and clear is not None:
        clear()
    return added


def is_qdrift_sampler(name: Optional[str]) -> bool:
    """True for the labels (or aliases) of the registered Q-Drift samplers (False for anything not a string)."""
    if not name or not isinstance(name, str):
        return False
    return name in SAMPLER_LABELS.values() or name.lower() in {f"qdrift_{n}" for n in SAMPLER_LABELS}


PHASES = ["1: record full precision", "2: replay quantized and save"]
"""The two passes of the 'Q-Drift calibrate' script."""

# Generation settings pass 1 stores and pass 2 restores, so both passes draw the same noise on the same schedule.
_REPLAYED_SETTINGS = ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter",
                      "scheduler", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w")


def _in_models(path: str, models_dir: Optional[str]) -> str:
    path = os.path.expanduser((path or "").strip())
    if not path:
        raise ValueError("Q-Drift calibrate: a file name is required")
    if os.path.isabs(path):
        return path
    return os.path.join(calibration_dirs(models_dir)[0], path)


def _note(processed: Any, message: str) -> None:
    print(message)
    if processed is not None and hasattr(processed, "comments"):
        processed.comments = ((processed.comments or "") + "\n" + message).strip()


class _plain_euler_entry:
    """While active, the host's "Euler" entry runs the calibration pass (a plain Euler trajectory).

    The passes must run through a qdrift function (it records or replays), yet their images are plain Euler: the
    infotext must say ``Sampler: Euler`` (pasting it back then selects Euler) and carry no Q-Drift settings. So the
    generation keeps ``sampler_name = "Euler"`` and the "Euler" entry of ``all_samplers_map`` (where both hosts'
    ``create_sampler`` looks) builds a ``KDiffusionSampler`` around the pass for the duration; it is restored after.
    """

    def __init__(self, sd_samplers: Any, KDiffusionSampler: Callable):
        self.map = sd_samplers.all_samplers_map
        self.original = self.map.get("Euler")
        if self.original is None:
            raise ValueError("Q-Drift calibrate: the webui has no 'Euler' sampler to run the calibration passes with")
        fn = make_sampler("euler", Settings(None))  # runs the active pass; never reads settings while one is
        self.entry = self.original._replace(constructor=lambda model: KDiffusionSampler(fn, model))

    def __enter__(self):
        self.map["Euler"] = self.entry
        return self

    def __exit__(self, *exc):
        self.map["Euler"] = self.original
        return False


def run_calibration_pass(
    p: Any,
    phase: str,
    trace_path: str,
    out_path: str,
    reduce: str,
    *,
    process_images: Callable[[Any], Any],
    sd_samplers: Any,
    KDiffusionSampler: Callable,
    models_dir: Optional[str] = None,
    checkpoint: Optional[str] = None,
    size_drift: Union[bool, str] = "auto",
    bands: int = HOST_BANDS,
) -> Any:
    """Runs one pass of the in-host calibration (the 'Q-Drift calibrate' script's ``run``).

    Pass 1 (full-precision checkpoint loaded): generates with plain Euler, recording the trajectory, and saves the
    trace. Pass 2 (quantized checkpoint loaded): restores pass 1's seeds and settings, evaluates the quantized
    model on the recorded states (the images stay pass 1's full-precision Euler result), and writes the
    calibration. With ``size_drift`` (``"auto"``, the default: on every model but a flow model, where it measured
    worse, :func:`qdrift.calib.size.host_sizes`), pass 2 then generates once more with the quantized model (qdrift
    Euler, same seeds, each image sampled twice: plain and with v2's output correction, no drift; those images are
    not saved) and sizes v2's output correction and drift by what they accumulate against pass 1's states
    (:meth:`qdrift.calib.PairedTrace.size_sampler`). K = batch count x batch size. Both passes' infotext says ``Sampler: Euler`` (what the images
    are) with a ``Q-Drift calibration pass`` field; pass 2 adds ``Q-Drift calibration written: <path>``, which
    the API returns in ``info`` (``extra_generation_params`` and ``infotexts``).

    Args:
        p: the host's processing object.
        phase: one of :data:`PHASES`.
        trace_path: trace file (relative paths go to ``<models>/qdrift``).
        out_path: calibration file to write in pass 2 (same rule).
        reduce: ``"channel"`` or ``"scalar"``.
        process_images: the host's ``modules.processing.process_images``.
        sd_samplers: the host's ``modules.sd_samplers`` (its "Euler" entry runs the pass).
        KDiffusionSampler: the host's ``sd_samplers_kdiffusion.KDiffusionSampler``.
        models_dir: the host's models directory.
        checkpoint: name of the loaded checkpoint, stored for the record.
        size_drift: True, False or ``"auto"`` (above).
        bands: also calibrate per radial frequency band of each latent channel (:func:`qdrift.calibrate`'s
            ``bands``; 1: per channel only; default :data:`qdrift.hosts.HOST_BANDS`), checked against pass 1's
            latents before pass 2 runs.

    Returns:
        The host's ``Processed`` result, with a note on what was written.

    Raises:
        ValueError: for an unknown phase, Hires. fix enabled, a size_drift that is not True, False or "auto", bands
            not an integer >= 1 or leaving a band of the latents' grid empty, or passes that do not match.
    """
    from ..calib.run import check_bands
    from ..calib.size import host_sizes
    from ..calib.trace import PairedTrace, PairedTraceError

    if phase not in PHASES:
        raise ValueError(f"Q-Drift calibrate: pass must be one of {PHASES}, got {phase!r}")
    if getattr(p, "enable_hr", False):
        raise ValueError("Q-Drift calibrate: turn off Hires. fix (each pass must run the sampler once per batch)")
    if getattr(p, "refiner_checkpoint", None) not in (None, "", "None"):
        raise ValueError("Q-Drift calibrate: turn off the Refiner (each pass must run the sampler once per batch)")
    if reduce not in ("channel", "scalar"):
        raise ValueError(f"Q-Drift calibrate: reduce must be 'channel' or 'scalar', got {reduce!r}")
    sizes = host_sizes("Q-Drift calibrate", size_drift, is_flow_model(p))
    trace_file = _in_models(trace_path, models_dir)
    p.sampler_name = "Euler"
    p.extra_generation_params["Q-Drift calibration pass"] = phase
    plain_euler = _plain_euler_entry(sd_samplers, KDiffusionSampler)
    if phase == PHASES[0]:
        trace = PairedTrace(meta={"host": "sd-webui", "checkpoint_fp": checkpoint})
        with calibration_pass(trace.fp_sampler()), plain_euler:
            processed = process_images(p)
        if not trace.runs:
            raise PairedTraceError("Q-Drift calibrate: the sampler never ran (was the generation interrupted?)")
        trace.meta["seeds"] = list(getattr(p, "all_seeds", []) or [getattr(processed, "seed", None)])
        trace.meta["settings"] = {k: getattr(p, k) for k in _REPLAYED_SETTINGS if hasattr(p, k)}
        os.makedirs(os.path.dirname(trace_file) or ".", exist_ok=True)
        trace.save(trace_file)
        _note(processed, f"Q-Drift: recorded {len(trace.runs)} batch(es) to {trace_file}. Load the quantized "
                         "checkpoint, choose pass 2 and press Generate again.")
        return processed
    trace = PairedTrace.load(trace_file)
    bands = check_bands("Q-Drift calibrate", bands, trace.runs[0]["x"].shape[3:])  # [steps, B, C, *spatial]
    trace.reset_replay()
    seeds = trace.meta.get("seeds") or []
    if seeds and seeds[0] is not None:
        p.seed = int(seeds[0])
    for k, v in (trace.meta.get("settings") or {}).items():
        setattr(p, k, v)
    out_file = _in_models(out_path, models_dir)
    if not out_file.endswith(".safetensors"):
        out_file += ".safetensors"
    p.extra_generation_params["Q-Drift calibration written"] = out_file
    with calibration_pass(trace.q_sampler()), plain_euler:
        processed = process_images(p)
    if not trace.complete:
        raise PairedTraceError(
            f"Q-Drift calibrate: only {trace.replayed} of {len(trace.runs)} recorded batches were replayed; keep "
            "batch count and batch size as in pass 1"
        )
    cal = trace.calibration(reduce=reduce, meta={"checkpoint_q": checkpoint}, bands=bands)
    if sizes:
        sizing = copy.copy(p)  # the same seeds and settings; its images are the sizing run's, not shown or saved
        sizing.do_not_save_samples = sizing.do_not_save_grid = True
        with calibration_pass(trace.size_sampler(cal)), plain_euler:
            process_images(sizing)
        if trace.sized_runs != len(trace.runs):
            raise PairedTraceError(
                f"Q-Drift calibrate: only {trace.sized_runs} of {len(trace.runs)} recorded batches were sized "
                "(was the generation interrupted?)"
            )
        cal = trace.sized()
    os.makedirs(os.path.dirname(out_file) or ".", exist_ok=True)
    cal.save(out_file)
    skipped = " Not sized: a flow model, where the sizing measured worse." if size_drift == "auto" and not sizes else ""
    _note(processed, f"Q-Drift: wrote {out_file} ({cal}).{skipped} Select it in Settings > Q-Drift or the Q-Drift "
                     "panel.")
    return processed
