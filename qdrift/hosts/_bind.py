"""A qdrift sampler with its calibration bound, in the shape host applications call."""

from __future__ import annotations

import inspect
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .._utils import BrownianTreeNoiseSampler, default_noise_sampler
from ..calib.calibration import Calibration, load_calibration
from ..samplers import REGISTRY, SAMPLERS, sampler_info, sampler_names

__all__ = [
    "SAMPLER_LABELS",
    "STOCHASTIC_SAMPLERS",
    "sampler_names",
    "bind_sampler",
    "load_calibration_cached",
    "seeded_noise_factory",
    "check_calibration_channels",
    "flow_sde_sigmas",
]

SAMPLER_LABELS: Dict[str, str] = {name: f"{info.label} Q-Drift" for name, info in REGISTRY.items()}
"""Short qdrift sampler name -> the label hosts show (A1111/Forge sampler list, ComfyUI choices)."""

STOCHASTIC_SAMPLERS = tuple(sampler_names(stochastic=True))
"""Samplers that inject noise: their noise formulas depend on the state form, so hosts pass ``flow=True`` for flow
models (SD3, FLUX) and :func:`flow_sde_sigmas` for the SDE ones."""

# Samplers whose noise k-diffusion hosts draw from a Brownian tree (SDE samplers).
BROWNIAN = frozenset(sampler_names(brownian=True))

_UNSET = object()

NoiseFactory = Callable[[torch.Tensor, torch.Tensor, Dict[str, Any]], Optional[Callable]]
Resolver = Callable[[Any, Dict[str, Any]], Tuple[Any, float]]


def _check_name(name: str) -> Callable:
    if not isinstance(name, str):
        raise ValueError(f"a qdrift sampler is named by its short name, one of {', '.join(map(repr, SAMPLERS))}; got {name!r}")
    return sampler_info(name).fn


def _knobs(fn: Callable) -> Dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def seeded_noise_factory(name: str) -> NoiseFactory:
    """A noise-sampler factory seeded from ``extra_args["seed"]`` (ComfyUI puts the node's seed there).

    SDE samplers get a :class:`qdrift.BrownianTreeNoiseSampler` over the schedule's positive range, the others
    :func:`qdrift.default_noise_sampler`; with no seed in ``extra_args`` the sampler's own default is kept.

    Args:
        name: short qdrift sampler name.

    Returns:
        ``factory(x, sigmas, extra_args) -> noise_sampler or None``.
    """
    _check_name(name)

    def factory(x: torch.Tensor, sigmas: torch.Tensor, extra_args: Dict[str, Any]):
        seed = (extra_args or {}).get("seed")
        if seed is None:
            return None
        if name in BROWNIAN:
            positive = sigmas[sigmas > 0]
            if positive.numel() == 0:
                return None
            return BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=int(seed))
        return default_noise_sampler(x, seed=int(seed))

    return factory


def bind_sampler(
    name: str,
    V: Any = None,
    *,
    strength: float = 1.0,
    resolve: Optional[Resolver] = None,
    noise_sampler_factory: Optional[NoiseFactory] = None,
    **options: Any,
) -> Callable:
    """A qdrift sampler with its calibration, strength and knobs bound.

    The result keeps the k-diffusion contract and the qdrift sampler's signature
    (``fn(model, x, sigmas, V=None, extra_args=None, callback=None, disable=None, *, knobs...)``), so hosts
    that inspect the signature (A1111/Forge pass ``sigmas``, ``eta``, ``noise_sampler``, ``solver_type`` only
    when those names are parameters) and hosts that pass extra keyword options (ComfyUI's
    ``KSAMPLER(fn, extra_options)``) both work. Values passed at call time win over bound ones.

    Args:
        name: short qdrift sampler name, a key of ``qdrift.SAMPLERS`` (``"euler"``, ``"dpmpp_2m"``, ...).
        V: the bound calibration: None, a :class:`qdrift.Calibration` or a ``[steps, C]`` / ``[steps]`` table.
        strength: multiplier on V (>= 0).
        resolve: optional ``resolve(model, extra_args) -> (V, strength)`` called at each sampling call (for
            hosts whose calibration choice lives in settings); overrides ``V`` and ``strength``.
        noise_sampler_factory: optional ``factory(x, sigmas, extra_args) -> noise_sampler or None`` used
            when the sampler takes a ``noise_sampler`` and the caller passed none.
        **options: keyword-only knobs of that sampler (``eta``, ``form``, ``correction``, ...).

    Returns:
        The bound sampler function.

    Raises:
        ValueError: for an unknown sampler name or a knob the sampler does not take.
    """
    fn = _check_name(name)
    knobs = _knobs(fn)
    unknown = sorted(set(options) - set(knobs) - {"strength"})
    if unknown:
        raise ValueError(
            f"{fn.__name__} takes no option(s) {unknown}; its options are {sorted(k for k in knobs if k != 'strength')}"
        )
    if resolve is not None and not callable(resolve):
        raise ValueError(f"resolve must be callable or None, got {type(resolve).__name__}")
    takes_noise = "noise_sampler" in knobs

    def sampler(model, x, sigmas, V_=_UNSET, extra_args=None, callback=None, disable=None, **kw):
        if resolve is not None:
            v, s = resolve(model, extra_args or {})
        else:
            v, s = V, strength
        if V_ is not _UNSET:
            v = V_
        if "V" in kw:
            v = kw.pop("V")
        merged = dict(options)
        merged.update(kw)
        merged.setdefault("strength", s)
        if takes_noise and merged.get("noise_sampler") is None and noise_sampler_factory is not None:
            merged["noise_sampler"] = noise_sampler_factory(x, sigmas, extra_args or {})
        if merged.get("noise_sampler") is None:
            merged.pop("noise_sampler", None)
        return fn(model, x, sigmas, v, extra_args=extra_args, callback=callback, disable=disable, **merged)

    sampler.__signature__ = inspect.signature(fn)
    sampler.__name__ = fn.__name__
    sampler.__qualname__ = fn.__qualname__
    sampler.__doc__ = f"{fn.__name__} with a bound calibration (see qdrift.hosts.bind_sampler).\n\n{fn.__doc__ or ''}"
    sampler.qdrift_name = name
    return sampler


_CACHE: Dict[str, Tuple[Tuple[float, int], Calibration]] = {}
_CACHE_LOCK = threading.Lock()


def load_calibration_cached(path: str) -> Calibration:
    """Loads a calibration file, re-reading it only when its modification time or size changed.

    Args:
        path: a ``.safetensors`` file written by :meth:`qdrift.Calibration.save`.

    Returns:
        The :class:`qdrift.Calibration`.

    Raises:
        FileNotFoundError: with the absolute path, if there is no such file.
        qdrift.CalibrationFileError: (a ``ValueError``) if it is not a valid qdrift calibration.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"calibration path must be a non-empty string, got {path!r}")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(full):
        raise FileNotFoundError(f"Q-Drift calibration file not found: {full}")
    st = os.stat(full)
    key = (st.st_mtime, st.st_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(full)
        if hit is not None and hit[0] == key:
            return hit[1]
    cal = load_calibration(full)
    with _CACHE_LOCK:
        _CACHE[full] = (key, cal)
    return cal


def check_calibration_channels(calibration: Any, channels: int, *, source: str, model: str = "the model", host: str = "Q-Drift") -> None:
    """Refuses a calibration measured on a latent with another channel count, before sampling starts.

    Args:
        calibration: a :class:`qdrift.Calibration` (or anything with ``channels``); None passes.
        channels: the latent channel count of the model about to be sampled.
        source: where the calibration came from (its file name), for the message.
        model: how to name the model (e.g. ``"the model (latent format SD15)"``).
        host: the message prefix (the node's or extension's name).

    Raises:
        ValueError: naming the file, its channel count and the model's.
    """
    have = getattr(calibration, "channels", None)
    if calibration is None or have is None or have in (1, int(channels)):
        return
    raise ValueError(
        f"{host}: the calibration {source} was measured on a {have}-channel latent, but {model} has {int(channels)} "
        "latent channels; calibrate this model"
    )


def flow_sde_sigmas(sigmas: torch.Tensor, start: Optional[float] = None) -> torch.Tensor:
    """A flow schedule for the SDE samplers, whose half-log-SNR is -inf at t = 1: a first sigma >= 1 is replaced
    by ``start`` (default ``1 - 1e-4``; ComfyUI uses its model's ``percent_to_sigma(1e-4)``). Other schedules are
    returned as they are.
    """
    if sigmas.numel() < 2 or float(sigmas[0]) < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = 1 - 1e-4 if start is None else start
    return sigmas
