"""A qdrift sampler with its calibration bound, in the shape host applications call."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import stat
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .._utils import BrownianTreeNoiseSampler, default_noise_sampler
from ..calib.calibration import Calibration, load_calibration
from ..calib.run import AUTO_BANDS
from ..samplers import REGISTRY, SAMPLERS, sampler_info, sampler_names
from ..validation import _integer

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
"""Samplers that inject noise: their noise formulas depend on the state form (hosts pass ``flow=True`` for flow
models, SD3 and FLUX, to every sampler: v2's drift direction depends on it too) and :func:`flow_sde_sigmas` for the
SDE ones."""

# Samplers whose noise k-diffusion hosts draw from a Brownian tree (SDE samplers).
BROWNIAN = frozenset(sampler_names(brownian=True))

HOST_BANDS = AUTO_BANDS
"""The radial frequency bands the hosts' in-app calibrations use by default (ComfyUI's Q-Drift Calibrate, the webui
script, ``qdrift.diffusers.calibrate_pipeline``): :data:`qdrift.calib.run.AUTO_BANDS`, the count that
:func:`qdrift.calibrate`'s ``bands="auto"`` takes where the grid holds it (the hosts' option is a number; a latent
grid too small for it is refused with the largest count it supports)."""

_UNSET = object()

NoiseFactory = Callable[[torch.Tensor, torch.Tensor, Dict[str, Any]], Optional[Callable]]
Resolver = Callable[[Any, Dict[str, Any]], Tuple[Any, float]]


def _check_name(name: str) -> Callable:
    if not isinstance(name, str):
        raise ValueError(f"a qdrift sampler is named by its short name, one of {', '.join(map(repr, SAMPLERS))}; got {name!r}")
    return sampler_info(name).fn


def _knobs(fn: Callable) -> Dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


SEED_RANGE = 2**64
"""Seeds are taken modulo ``2**64`` (:func:`host_seed`): torch's own rule for ``Generator.manual_seed``."""


def host_seed(seed: Any, who: str = "seeded_noise_factory") -> int:
    """A host's seed as the non-negative integer the noise samplers are seeded with: ``seed % 2**64``.

    Hosts allow any 64-bit seed, signed or not (ComfyUI's widget goes up to ``2**64 - 1``; an API caller may send
    -1). torch's ``Generator.manual_seed`` already reads a negative seed modulo ``2**64``, but torchsde's Brownian
    tree (the SDE samplers' noise) refuses negative entropy; mapping every seed by the same rule keeps each seed that
    worked before unchanged (``0 <= seed < 2**64`` as it is, a negative one as torch reads it) and gives every
    sampler, Brownian or not, the same noise stream for the same seed.

    Args:
        seed: an integer (``int``, a numpy integer, or a 0-d integer tensor).
        who: the function or node, for the message.

    Raises:
        ValueError: for anything else (a float such as 1.5, a string, a bool), naming the value.
    """
    value = _integer(seed)
    if value is None:
        raise ValueError(f"{who}: the seed must be an integer (any 64-bit value; it is used modulo 2**64), got {seed!r:.80}")
    return value % SEED_RANGE


def _check_extra_args(who: str, extra_args: Any) -> Dict[str, Any]:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, dict):
        raise ValueError(f"{who}: extra_args must be a dict or None, got {type(extra_args).__name__}")
    return extra_args


def seeded_noise_factory(name: str) -> NoiseFactory:
    """A noise-sampler factory seeded from ``extra_args["seed"]`` (ComfyUI puts the node's seed there).

    SDE samplers get a :class:`qdrift.BrownianTreeNoiseSampler` over the schedule's positive range, the others
    :func:`qdrift.default_noise_sampler`; with no seed in ``extra_args`` the sampler's own default is kept. Every
    sampler reads the seed the same way, modulo ``2**64`` (:func:`host_seed`): a negative seed such as -1 works for
    the SDE samplers too (as ``2**64 - 1``), and any seed in ``[0, 2**64)`` is used as it is.

    Args:
        name: short qdrift sampler name.

    Returns:
        ``factory(x, sigmas, extra_args) -> noise_sampler or None``; it raises ``ValueError`` for a seed that is
        not an integer (a float, a string) and for ``extra_args`` that is not a dict.
    """
    _check_name(name)
    who = f"seeded_noise_factory({name!r})"

    def factory(x: torch.Tensor, sigmas: torch.Tensor, extra_args: Dict[str, Any]):
        seed = _check_extra_args(who, extra_args).get("seed")
        if seed is None:
            return None
        seed = host_seed(seed, who)
        if name in BROWNIAN:
            positive = sigmas[sigmas > 0]
            if positive.numel() == 0:
                return None
            return BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=seed)
        return default_noise_sampler(x, seed=seed)

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
            hosts whose calibration choice lives in settings); overrides ``V`` and ``strength``. Anything but a
            pair is refused (``ValueError``) at that call.
        noise_sampler_factory: optional ``factory(x, sigmas, extra_args) -> noise_sampler or None`` used
            when the sampler takes a ``noise_sampler`` and the caller passed none.
        **options: keyword-only knobs of that sampler (``eta``, ``form``, ``correction``, ...).

    Returns:
        The bound sampler function.

    Raises:
        ValueError: for an unknown sampler name, a knob the sampler does not take, or a ``resolve`` or
            ``noise_sampler_factory`` that is not callable. At call time: ``extra_args`` that is not a dict or
            None, and a resolver that does not return ``(V, strength)``.
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
    if noise_sampler_factory is not None and not callable(noise_sampler_factory):
        raise ValueError(
            "noise_sampler_factory must be None or a callable factory(x, sigmas, extra_args) -> noise_sampler, got "
            f"{type(noise_sampler_factory).__name__}"
        )
    takes_noise = "noise_sampler" in knobs

    def sampler(model, x, sigmas, V_=_UNSET, extra_args=None, callback=None, disable=None, **kw):
        extra = _check_extra_args(fn.__name__, extra_args)
        if resolve is not None:
            resolved = resolve(model, extra)
            if not isinstance(resolved, (tuple, list)) or len(resolved) != 2:
                got = f"a {len(resolved)}-tuple" if isinstance(resolved, (tuple, list)) else repr(resolved)[:80]
                raise ValueError(
                    f"bind_sampler({name!r}): resolve(model, extra_args) must return a pair (V, strength), got {got}"
                )
            v, s = resolved
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
            merged["noise_sampler"] = noise_sampler_factory(x, sigmas, extra)
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
        qdrift.CalibrationFileError: (a ``ValueError``) if it is not a valid qdrift calibration, or the path is a
            directory (or another non-regular file), as :func:`qdrift.load_calibration` says.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"calibration path must be a non-empty string, got {path!r}")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise FileNotFoundError(f"Q-Drift calibration file not found: {full}") from None
    except (OSError, ValueError):
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        refuse_non_file(full)
    key = (st.st_mtime, st.st_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(full)
        if hit is not None and hit[0] == key:
            return hit[1]
    cal = load_calibration(full)
    with _CACHE_LOCK:
        _CACHE[full] = (key, cal)
    return cal


def refuse_non_file(path: str) -> None:
    """For a path that exists but is not a regular file (a directory...): the core's refusal.

    Raises:
        qdrift.CalibrationFileError: from :func:`qdrift.load_calibration`, naming the path and what it is
            (``"... is a directory, not a regular file"``).
    """
    load_calibration(path)  # refuses anything but a regular file, naming what it is
    raise FileNotFoundError(f"Q-Drift calibration file not found: {path}")  # pragma: no cover (a race)


def first_non_file(paths) -> Optional[str]:
    """The first of ``paths`` that exists but is not a regular file (a directory...), or None."""
    return next((p for p in paths if os.path.exists(p) and not os.path.isfile(p)), None)


def check_calibration_channels(calibration: Any, channels: int, *, source: str, model: str = "the model", host: str = "Q-Drift") -> None:
    """Refuses a calibration measured on a latent with another channel count, before sampling starts.

    A 1-channel calibration on a multi-channel latent is refused too: the samplers refuse every calibration whose
    channel count is not x's (only a plain 1-D or ``[steps, 1]`` tensor V is applied to every channel), and this
    check names the file.

    Args:
        calibration: a :class:`qdrift.Calibration` (or anything with ``channels``); None passes.
        channels: the latent channel count of the model about to be sampled (an integer >= 1).
        source: where the calibration came from (its file name), for the message.
        model: how to name the model (e.g. ``"the model (latent format SD15)"``).
        host: the message prefix (the node's or extension's name).

    Raises:
        ValueError: naming the file, its channel count and the model's.
    """
    have = getattr(calibration, "channels", None)
    if calibration is None or have is None:
        return
    if not isinstance(channels, numbers.Integral) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"check_calibration_channels: channels must be an integer >= 1, got {channels!r:.80}")
    if have == int(channels):
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
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise ValueError(f"flow_sde_sigmas: sigmas must be a 1-D tensor, got "
                         f"{tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    if start is not None and not (isinstance(start, numbers.Real) and not isinstance(start, bool)
                                  and 0 < start < math.inf):
        raise ValueError(f"flow_sde_sigmas: start must be a finite number > 0, got {start!r}")
    if sigmas.numel() < 2 or float(sigmas[0]) < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = 1 - 1e-4 if start is None else start
    return sigmas
