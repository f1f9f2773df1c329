"""The :class:`Calibration` object and its file format (safetensors + JSON metadata, never pickle)."""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .._version import __version__
from ..validation import flag
from .stats import MOMENT_FIELDS, PairedMoments, TrajectorySums

__all__ = [
    "Calibration",
    "CalibrationFileError",
    "CalibrationFileNotFoundError",
    "load_calibration",
    "interpolate_log_sigma",
    "REDUCES",
]

REDUCES = ("channel", "scalar")
FORMAT = "qdrift.calibration"
FORMAT_VERSION = 3  # 2 adds the cross-step trajectory sums (tensors "traj_*"), 3 their state cross sums
# ("traj_cross_*", for the error's state gain); files of versions 1 and 2 still load
_TENSORS = ("sigmas",) + MOMENT_FIELDS
_TRAJ_PREFIX = "traj_"
_BAND_PREFIX = "band_"  # the frequency-band statistics (Calibration.banded): band_<moment>, band_traj_<sum>
MAX_GAIN_FACTOR = 2.0  # 1 + k is kept within [1 / MAX_GAIN_FACTOR, MAX_GAIN_FACTOR]
MAX_STATE_GAIN = 0.5  # |j| (the gain of the denoised output, see Calibration.error_model) is kept within this
MAX_DRIFT_SCALE = 4.0  # Calibration.drift_scale is kept within [0, MAX_DRIFT_SCALE]
DRIFT_SCALE_Z = 2.0  # Calibration.drift_scale departs from 1 only by more than this many standard errors
SIZE_THE_DRIFT = True  # what qdrift.size_drift and the hosts' sizing pass size by default: the drift as well (True)
# meta["drift_scale"]["output"]: the sizing noises' mean products of a = x_plain - x_fp and b = x_q - x_plain, then
# the means of their pairwise products (Calibration.output_scale)
OUTPUT_TERMS = ("aa", "ab", "bb", "aa_aa", "ab_ab", "bb_bb", "aa_ab", "aa_bb", "ab_bb")
_OUTPUT_SIGNED = ("ab", "aa_ab", "ab_bb")


class CalibrationFileError(ValueError):
    """A calibration file is unreadable, corrupt, or not a qdrift calibration."""


class CalibrationFileNotFoundError(CalibrationFileError, FileNotFoundError):
    """There is no calibration file at the path (both a :class:`CalibrationFileError` and a ``FileNotFoundError``)."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


# The metadata fields qdrift itself writes and reads, each with its type (hosts may add other JSON fields).
_META_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "K": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "trim": (lambda v: v is None or (_is_real(v) and v >= 0), "null or a number >= 0"),
    "trajectory": (lambda v: isinstance(v, str), "a string"),
    "model_fp": (lambda v: isinstance(v, str), "a string"),
    "model_q": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "qdrift_version": (lambda v: isinstance(v, str), "a string"),
    "schedule": (
        lambda v: isinstance(v, list) and all(_is_real(s) and math.isfinite(s) for s in v),
        "a list of finite numbers",
    ),
    "seconds": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
}


def _check_drift_scale(info: Any, channels: int) -> None:
    """Checks ``meta["drift_scale"]`` (written by :func:`qdrift.calib.size_drift`) against the channel count."""
    def per_channel(v):
        return isinstance(v, list) and len(v) == channels and all(_is_real(x) and math.isfinite(x) and x >= 0 for x in v)

    if (not isinstance(info, dict) or not per_channel(info.get("measured")) or not per_channel(info.get("predicted"))
            or not (_is_int(info.get("K")) and info["K"] >= 1)
            or not ("measured_sq" not in info or per_channel(info["measured_sq"]))
            or not ("z" not in info or (_is_real(info["z"]) and 0 <= info["z"] < math.inf))
            or not ("drift" not in info or isinstance(info["drift"], bool))):
        raise ValueError(
            "Calibration: meta['drift_scale'] must be an object with 'measured' and 'predicted' (lists of "
            f"{channels} finite numbers >= 0, one per channel), 'K' (an integer >= 1), and optionally "
            f"'measured_sq' (like 'measured'), 'z' (a finite number >= 0) and 'drift' (true or false), "
            f"got {info!r:.160}"
        )
    if info.get("drift") is False and "output" not in info:
        raise ValueError("Calibration: meta['drift_scale'] has 'drift': false (the output correction sized alone) "
                         "but no 'output' statistics")
    output = info.get("output")
    if output is not None and not (isinstance(output, dict) and all(
            isinstance(output.get(key), list) and len(output[key]) == channels
            and all(_is_real(x) and math.isfinite(x) and (key in _OUTPUT_SIGNED or x >= 0) for x in output[key])
            for key in OUTPUT_TERMS)):
        raise ValueError(
            "Calibration: meta['drift_scale']['output'] must be an object with the lists "
            f"{', '.join(OUTPUT_TERMS)} ({channels} finite numbers each, >= 0 except {', '.join(_OUTPUT_SIGNED)}), "
            f"got {output!r:.160}"
        )


def _output_terms(info: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """``meta["drift_scale"]["output"]`` as float64 tensors ``[C]`` (see :data:`OUTPUT_TERMS`)."""
    return {key: torch.tensor(info["output"][key], dtype=torch.float64) for key in OUTPUT_TERMS}


def _guarded(estimate: Tuple[torch.Tensor, torch.Tensor], z: float) -> torch.Tensor:
    """A measured factor ``(raw, standard error)`` where it differs from 1 by more than ``z`` standard errors, else 1
    (a NaN standard error, from a file that kept no spread: the raw factor)."""
    raw, se = estimate
    return torch.where(~((raw - 1).abs() <= z * se), raw, torch.ones_like(raw))


def _levels(who: str, sigmas) -> torch.Tensor:
    """Noise levels to read a calibration at: a 1-D real tensor (or sequence) of finite levels ``>= 0``."""
    try:
        query = torch.as_tensor(sigmas)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{who}: sigmas must be a 1-D tensor of noise levels, got {type(sigmas).__name__}") from None
    if query.ndim != 1 or query.is_complex() or query.dtype == torch.bool:
        raise ValueError(f"{who}: sigmas must be a 1-D real tensor, got shape {tuple(query.shape)} {query.dtype}")
    if not bool(torch.isfinite(query).all()) or bool((query < 0).any()):
        raise ValueError(f"{who}: sigmas must be finite and >= 0, got {query.tolist()!r:.80}")
    return query


def _check_band_meta(meta: Dict[str, Any], channels: int) -> None:
    """Checks ``meta["band_units"]`` and ``meta["band_shares"]`` (a band-unit calibration's, see
    :attr:`Calibration.banded`): an integer ``NB >= 2`` that divides the unit count, and ``NB`` shares in (0, 1]."""
    nb = meta.get("band_units")
    if nb is not None and (not _is_int(nb) or nb < 2 or channels % int(nb)):
        raise ValueError(f"Calibration: meta['band_units'] must be an integer >= 2 that divides the {channels} "
                         f"units (channels x bands), got {nb!r:.80}")
    shares = meta.get("band_shares")
    if shares is None:
        return
    if nb is None:
        raise ValueError("Calibration: meta['band_shares'] must be given only with meta['band_units'] (both "
                         "belong to a band-unit calibration)")
    if not isinstance(shares, list) or len(shares) != nb or not all(_is_real(v) and 0 < v <= 1 for v in shares):
        raise ValueError(f"Calibration: meta['band_shares'] must be a list of {nb} numbers in (0, 1], one per band, "
                         f"got {shares!r:.80}")


def _check_meta(meta: Dict[str, Any]) -> None:
    """Checks the type of every metadata field qdrift uses (see ``_META_FIELDS``)."""
    if not isinstance(meta, dict):
        raise ValueError(f"Calibration: meta must be a dict, got {type(meta).__name__}")
    for key, (test, expected) in _META_FIELDS.items():
        if key in meta and not test(meta[key]):
            raise ValueError(f"Calibration: meta[{key!r}] must be {expected}, got {meta[key]!r:.80}")


def _json_default(value):
    """JSON for metadata values json does not know: numpy/torch numbers as numbers, anything else as str."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return str(value)


_MATCH_KEYS = ("sigmas", "V", "shift")
_MATCH_PREFIX = "match_"


def _check_matched(matched, channels: int) -> Dict[str, torch.Tensor]:
    """Validates moment-matching tables (see :attr:`Calibration.matched`); returns them as float64 CPU tensors."""
    if not isinstance(matched, dict) or set(matched) != set(_MATCH_KEYS):
        raise ValueError(f"Calibration: matched must be a dict with keys {_MATCH_KEYS}, got {matched!r:.80}")
    out = {k: torch.as_tensor(v).detach().to(device="cpu", dtype=torch.float64) for k, v in matched.items()}
    s = out["sigmas"]
    if s.ndim != 1 or len(s) < 1 or bool((s <= 0).any()) or bool((s[1:] >= s[:-1]).any()):
        raise ValueError("Calibration: matched['sigmas'] must be 1-D, > 0 and strictly decreasing")
    for k in ("V", "shift"):
        ok = tuple(out[k].shape[:2]) == (len(s), channels) and (out[k].ndim == 2 or (k == "V" and out[k].ndim == 3))
        if not ok or not bool(torch.isfinite(out[k]).all()):
            shape = f"({len(s)}, {channels})" + (" or (.., .., bands)" if k == "V" else "")
            raise ValueError(f"Calibration: matched[{k!r}] must be finite of shape {shape}, got {tuple(out[k].shape)}")
    return out


def _band_meta(bands: int, spatial) -> Dict[str, Any]:
    """The meta of a band-unit calibration: the band count and each band's share of the FFT bins of the
    calibration's grid (its independent values per sample, used by the gain's significance test)."""
    from ..correction import band_shares

    return {"band_units": bands, "band_shares": [float(v) for v in band_shares(spatial, bands)]}


def interpolate_log_sigma(table: torch.Tensor, sigmas: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Interpolates rows of ``table`` linearly in log-sigma, clamped at the ends.

    Args:
        table: values at the calibrated levels ``[S, ...]``.
        sigmas: calibrated levels ``[S]``, positive and strictly decreasing.
        query: levels to look up ``[N]`` (any order; values outside the calibrated range, 0 included, take
            the nearest end's value).

    Returns:
        ``[N, ...]`` float64.
    """
    table = table.to(torch.float64)
    log_s = sigmas.to(torch.float64).log().flip(0)  # ascending
    rows = table.flip(0)
    q = query.detach().to(device="cpu", dtype=torch.float64)
    if len(log_s) == 1:
        return rows[[0] * len(q)]
    lq = q.clamp(min=1e-300).log().clamp(min=float(log_s[0]), max=float(log_s[-1]))
    hi = torch.searchsorted(log_s, lq).clamp(1, len(log_s) - 1)
    lo = hi - 1
    w = ((lq - log_s[lo]) / (log_s[hi] - log_s[lo])).reshape((-1,) + (1,) * (table.ndim - 1))
    return rows[lo] * (1 - w) + rows[hi] * w


@dataclass(eq=False)
class Calibration:
    """Per-step, per-channel quantization-error statistics and the Q-Drift variance ``V``.

    Attributes:
        sigmas: the noise levels evaluated ``[S]`` (float64, strictly decreasing, > 0): the calibration
            schedule without its final 0.
        moments: paired statistics of ``(d_fp, d_q)`` per (step, channel) (:class:`PairedMoments`, ``[S, C]``).
        reduce: ``"channel"`` (a V per channel) or ``"scalar"`` (one pooled V per step, repeated over
            channels: the setting of the paper's main runs).
        conditional: ``V = Var(delta | d_hat)`` if True, the "unconditional" ablation ``Var(delta)`` if False.
        meta: what was compared, the schedule, K, trim, library version (JSON-serializable); ``drift_scale``
            when :func:`qdrift.calib.size_drift` sized the calibration (see :attr:`drift_scale`).
        trajectory: cross-step sums along the calibration trajectories (:class:`TrajectorySums`), which
            Q-Drift v2 uses for correlated errors, the state variance and ``Cov(x, d)``; None for files
            written before format version 2 and for statistics collected without them.
        matched: moment-matching tables (:func:`qdrift.calib.match_moments`), or None: ``sigmas`` ``[M]``
            (the matched run's levels, strictly decreasing), ``V`` ``[M, C]`` (the effective V of each
            measured ``c``, ``2 sigma c / |sigma - sigma_eff|``; negative where the quantized run was too
            smooth; ``[M, C, NB]`` per radial frequency band, see :func:`qdrift.correction.frequency_bands`)
            and ``shift`` ``[M, C]`` (the mean shift per unit step length); ``meta["match"]`` says
            which sampler, K, and whether the output's gain and bias were removed. Method ``matched`` uses them.
        banded: the same statistics per channel and radial frequency band (``calibrate(..., bands=NB)``), or
            None: a Calibration of ``C * NB`` units (unit ``c * NB + b``, see
            :func:`qdrift.correction.band_components`) with ``meta["band_units"] = NB``. Q-Drift v2 then models
            the error and the sample per band and scales each band of the increment on its own.
    """

    sigmas: torch.Tensor
    moments: PairedMoments
    reduce: str = "channel"
    conditional: bool = True
    meta: Dict[str, Any] = field(default_factory=dict)
    trajectory: Optional[TrajectorySums] = None
    matched: Optional[Dict[str, torch.Tensor]] = None
    banded: Optional["Calibration"] = None

    def __post_init__(self) -> None:
        if self.reduce not in REDUCES:
            raise ValueError(f"Calibration: reduce must be one of {REDUCES}, got {self.reduce!r}")
        self.sigmas = torch.as_tensor(self.sigmas).detach().to(device="cpu", dtype=torch.float64)
        s = self.sigmas
        if s.ndim != 1 or len(s) < 1 or len(s) != self.moments.shape[0]:
            raise ValueError(
                f"Calibration: sigmas must be 1-D with one value per calibrated step ({self.moments.shape[0]}), "
                f"got shape {tuple(s.shape)}"
            )
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()) or bool((s[1:] >= s[:-1]).any()):
            raise ValueError(f"Calibration: sigmas must be finite, > 0 and strictly decreasing, got {s.tolist()}")
        if self.trajectory is not None and (
            not isinstance(self.trajectory, TrajectorySums) or self.trajectory.shape != self.moments.shape
        ):
            raise ValueError(
                f"Calibration: trajectory must be TrajectorySums of shape {self.moments.shape}, got "
                f"{getattr(self.trajectory, 'shape', type(self.trajectory).__name__)}"
            )
        if self.matched is not None:
            self.matched = _check_matched(self.matched, self.channels)
        _check_meta(self.meta)
        _check_band_meta(self.meta, self.channels)
        if "drift_scale" in self.meta:
            _check_drift_scale(self.meta["drift_scale"], self.channels)
        if self.banded is not None:
            b = self.banded
            units = b.channels if isinstance(b, Calibration) else 0
            nb = b.meta.get("band_units") if isinstance(b, Calibration) else None
            if (not isinstance(nb, int) or isinstance(nb, bool) or nb < 2 or units != self.channels * nb
                    or b.banded is not None or b.steps != self.steps or not torch.allclose(b.sigmas, self.sigmas)):
                raise ValueError(
                    "Calibration: banded must be a Calibration of the same levels with channels x bands units and "
                    f"meta['band_units'] = bands >= 2, got {b!r:.120}"
                )
            if b.reduce != self.reduce or b.conditional != self.conditional:
                self.banded = replace(b, reduce=self.reduce, conditional=self.conditional)

    @classmethod
    def from_accumulator(cls, sigmas: torch.Tensor, acc, reduce: str = "channel", conditional: bool = True,
                         meta: Optional[Dict[str, Any]] = None) -> "Calibration":
        """The calibration of a :class:`qdrift.calib.stats.PairedAccumulator`'s statistics at levels ``sigmas``
        ``[S]`` (its frequency-band statistics, if any, as :attr:`banded`).

        Raises ``ValueError`` if a statistic is not finite (outputs too large to square and sum in float64), so
        no calibration, and no file, is made from overflowed sums."""
        parts = [acc.moments, acc.sums] + ([] if acc.banded is None else [acc.banded.moments, acc.banded.sums])
        for part in parts:
            for name, t in ({} if part is None else part.tensors()).items():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"Calibration: the accumulated statistic {name!r} holds NaN or inf: the models' outputs are "
                        "too large to square and sum in float64 (d = (x - D) / sigma beyond about 1e150); check the "
                        "models' output scale (a latent scaling factor, an x0 model wrapped as eps)"
                    )
        banded = None
        if acc.banded is not None:
            banded = cls(sigmas, acc.banded.moments, reduce, bool(conditional), _band_meta(acc.bands, acc.spatial),
                         trajectory=acc.banded.sums)
        return cls(sigmas, acc.moments, reduce, bool(conditional), dict(meta or {}), trajectory=acc.sums,
                   banded=banded)

    @property
    def bands(self) -> int:
        """Radial frequency bands of :attr:`banded` (1 without them)."""
        return 1 if self.banded is None else int(self.banded.meta["band_units"])

    def _reduced(self):
        """``(moments, trajectory)`` as the error model reads them: as stored, or pooled over channels with
        ``reduce="scalar"`` (per frequency band, repeated over channels, for a band-unit calibration)."""
        if self.reduce != "scalar":
            return self.moments, self.trajectory
        nb = int(self.meta.get("band_units", 1))
        if nb == 1:
            return self.moments.pooled(), None if self.trajectory is None else self.trajectory.pooled()
        reps = self.moments.shape[1] // nb
        per_band = [self.moments.select((slice(None), slice(b, None, nb))).pooled() for b in range(nb)]
        m = PairedMoments(**{f: torch.cat([getattr(p, f) for p in per_band], 1).repeat(1, reps) for f in MOMENT_FIELDS})
        t = self.trajectory
        if t is not None:
            t = TrajectorySums(**{
                k: v.unflatten(-1, (reps, nb)).sum(-2).repeat(*([1] * (v.ndim - 1)), reps)
                for k, v in t.tensors().items()
            })
        return m, t

    @property
    def steps(self) -> int:
        """Number of calibrated noise levels ``S``."""
        return len(self.sigmas)

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return self.moments.shape[1]

    @property
    def drift_scale(self) -> Optional[torch.Tensor]:
        """The measured-accumulation factor on method ``v2``'s residual variance ``V``, per channel ``[C]``
        float64, or None for a calibration that :func:`qdrift.calib.size_drift` has not sized.

        The sizing pass measures, per channel, the mean square difference from the full-precision run that the
        undrifted, output-corrected quantized run accumulated on each of its noises, over what v2's surrogate
        predicted for that run (each summed over the pass's steps relative to the full-precision state's
        variance): the ratio of the noises' mean to the prediction is the raw factor, and the noises' spread
        its standard error (:meth:`drift_scale_estimate`). The factor used is the raw one where it differs
        from 1 by more than ``z`` standard errors (``meta["drift_scale"]["z"]``, default ``DRIFT_SCALE_Z``),
        and 1 (the surrogate as calibrated) where the pass's noises cannot tell it from 1; within
        ``[0, MAX_DRIFT_SCALE]``, and 1 where the surrogate predicted nothing. A file sized before the
        standard error was kept (no ``measured_sq``) uses its raw factor. A sizing of the output correction alone
        (``size_drift(drift=False)``, ``meta["drift_scale"]["drift"]`` false) keeps 1 in every channel.
        """
        estimate = self.drift_scale_estimate()
        if estimate is None:
            return None
        if self.meta["drift_scale"].get("drift", True) is False:
            return torch.ones_like(estimate[0])
        return _guarded(estimate, self._scale_z()).clamp(0, MAX_DRIFT_SCALE)

    def _scale_z(self) -> float:
        return float(self.meta["drift_scale"].get("z", DRIFT_SCALE_Z))

    @property
    def output_scale(self) -> Optional[torch.Tensor]:
        """The measured share of method ``v2``'s output correction (its gain, state term and bias) per channel
        ``[C]`` float64 within ``[0, 1]``, or None for a calibration whose sizing did not measure it
        (:func:`qdrift.calib.size_drift` with ``output=True``, the default).

        The correction is fitted step by step on the full-precision trajectory, and a network's errors at later
        steps partly answer the deviations its earlier ones made (it re-denoises them), so removing every step's
        fitted error can overshoot what the whole run accumulates. The sizing pass runs each of its noises three
        ways: full precision, plain quantized, and quantized with the whole output correction (no drift). With
        ``a = x_plain - x_fp`` and ``b = x_q - x_plain`` after every step (summed over the steps relative to the
        full-precision state's variance, as :attr:`drift_scale`), a share ``s`` of the correction leaves the run
        ``a + s b`` from the full-precision one to first order, whose mean square is least at
        ``s = -<a b> / <b b>`` (the raw share; its standard error from the noises' spread,
        :meth:`output_scale_estimate`). The share used is the raw one kept within ``[0, 1]`` where it differs
        from 1 by more than ``z`` standard errors, else 1: the correction as fitted. :attr:`drift_scale` is then
        measured at that share (``<|a + s b|^2>``).
        """
        estimate = self.output_scale_estimate()
        if estimate is None:
            return None
        return _guarded(estimate, self._scale_z()).clamp(0, 1)

    def output_scale_estimate(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The raw share of the output correction and its standard error per channel (``[C]`` float64 each), or
        None (see :attr:`output_scale`). The standard error is the ratio estimator's over the ``K`` noises
        (infinite for ``K = 1``); both are 1 and 0 where the correction moved no run."""
        info = self.meta.get("drift_scale")
        if info is None or "output" not in info:
            return None
        o = _output_terms(info)
        moved = o["bb"] > 0
        bb = torch.where(moved, o["bb"], torch.ones_like(o["bb"]))
        raw = torch.where(moved, -o["ab"] / bb, torch.ones_like(bb))
        K = int(info["K"])
        # each noise's u = ab + s bb has mean 0 at the raw share; its spread gives the share's standard error
        u2 = (o["ab_ab"] + 2 * raw * o["ab_bb"] + raw**2 * o["bb_bb"]).clamp(min=0)
        se = (u2 / (K - 1)).sqrt() / bb if K >= 2 else torch.full_like(raw, float("inf"))
        return raw, torch.where(moved, se, torch.zeros_like(se))

    def drift_scale_estimate(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The sizing pass's raw factor and its standard error per channel (``[C]`` float64 each), or None
        when not sized (see :attr:`drift_scale`). The standard error is that of a mean over the pass's ``K``
        noises (each noise's accumulation counts once: positions within a sample are not independent); it is
        infinite for ``K = 1`` and NaN for a file without ``measured_sq``. Both are 1 and 0 where the surrogate
        predicted nothing."""
        info = self.meta.get("drift_scale")
        if info is None:
            return None
        measured = torch.tensor(info["measured"], dtype=torch.float64)
        predicted = torch.tensor(info["predicted"], dtype=torch.float64)
        some = predicted > 0
        scale = predicted.where(some, torch.ones_like(predicted))
        K = int(info["K"])
        share = self.output_scale
        if share is not None:  # the accumulation at the output correction's share: |a + s b|^2 per noise
            o = _output_terms(info)
            measured = (o["aa"] + 2 * share * o["ab"] + share**2 * o["bb"]).clamp(min=0)
            square = (o["aa_aa"] + 4 * share**2 * o["ab_ab"] + share**4 * o["bb_bb"] + 4 * share * o["aa_ab"]
                      + 2 * share**2 * o["aa_bb"] + 4 * share**3 * o["ab_bb"])
            info = dict(info, measured_sq=square.tolist())
        if "measured_sq" not in info:
            spread = torch.full_like(measured, float("nan"))
        elif K < 2:
            spread = torch.full_like(measured, float("inf"))
        else:
            square = torch.tensor(info["measured_sq"], dtype=torch.float64)
            spread = ((square - measured ** 2).clamp(min=0) / (K - 1)).sqrt()  # sample std / sqrt(K)
        raw = torch.where(some, measured / scale, torch.ones_like(measured))
        se = torch.where(some, spread / scale, torch.zeros_like(spread))
        return raw, se

    @property
    def V(self) -> torch.Tensor:
        """``V`` per step and channel ``[S, C]`` float32 (pooled value repeated when ``reduce="scalar"``)."""
        m = self._reduced()[0]
        v = m.conditional_variance() if self.conditional else m.var_delta
        return v.expand(self.steps, self.channels).to(torch.float32).contiguous()

    def at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``V`` at other noise levels ``[N, C]`` float32: linear in log-sigma, clamped at the ends.

        This is how one calibration serves any step count or schedule: a level between two calibrated
        ones gets the log-sigma interpolation of their V; a level above the highest (or below the lowest,
        including 0) gets the end value.
        """
        query = _levels("Calibration.at", sigmas)
        return interpolate_log_sigma(self.V, self.sigmas, query).to(torch.float32)

    def moments_at(self, sigmas: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Interpolated moments at other noise levels, each ``[N, C]`` float64 (for baselines).

        Keys: ``mean_fp, mean_q, var_fp, var_q, cov`` (of ``d_fp`` and ``d_q``), interpolated like :meth:`at`;
        with ``reduce="scalar"`` the pooled moments repeated over channels.
        """
        query = _levels("Calibration.moments_at", sigmas)
        m = self.moments.pooled() if self.reduce == "scalar" else self.moments
        table = {
            "mean_fp": m.mean_fp,
            "mean_q": m.mean_q,
            "var_fp": m.var_fp,
            "var_q": m.var_q,
            "cov": m.cov,
        }
        return {
            k: interpolate_log_sigma(v.expand(self.steps, self.channels), self.sigmas, query) for k, v in table.items()
        }

    def error_model(self, sigmas: torch.Tensor, *, gain: bool) -> Dict[str, torch.Tensor]:
        """The error model Q-Drift v2 corrects with, at other noise levels; each value ``[N, C]`` float64.

        With ``gain=True`` the error is split as PTQD does, ``delta = k d_fp + b + r`` per (step, channel)
        (per step only with ``reduce="scalar"``), by least squares and without shrinkage:
        ``k = Cov(delta, d_fp) / Var(d_fp)``, ``b = E[delta] - k E[d_fp]``; ``k`` is kept only where it
        exceeds three standard errors of the slope (pairs counted as independent), else 0, and ``1 + k``
        within ``[1/2, 2]``. The corrected output ``(d_hat - b) / (1 + k)`` differs from ``d_fp`` by
        ``r / (1 + k)``, whose variance ``V = Var(r) / (1 + k)^2`` is left for the drift. With
        ``gain=False`` ``k = j = b = 0`` and ``V`` is this calibration's own :attr:`V`.

        The state term (statistics of format version 3). A quantized network's denoised output often has
        the wrong contrast: ``D_q - D_fp = g (D_fp - E D_fp) + ...``. In ``d = (x - D) / sigma`` that error
        is ``-g D_fp / sigma``, which ``d_fp`` alone cannot express (at high noise ``d_fp`` is nearly all
        noise; at low noise ``k`` would have to leave its bounds), and left in the residual it makes the
        error depend on the state, against the drift's model. So with the trajectory's state cross sums the
        error is fitted as ``delta = k d_fp + j x / sigma + b + r`` (the span of ``d_fp`` and
        ``D_fp / sigma``: ``j = -g``) per (step, unit) by least squares on the (untrimmed) trajectory sums,
        wherever ``|j|`` exceeds three standard errors; elsewhere the model is the split above, unchanged.
        The corrected output is then ``(d_hat - j x / sigma - b) / (1 + k)``.

        Keys: ``k``, ``j``, ``b``, ``V``; ``var_d`` (``Var(d_fp)``), ``cov_xd`` (``Cov(x, d_fp)``) and ``var_x``
        (variance of the FP trajectory's state) from the trajectory sums, or, without them, ``var_d`` from
        the moments, ``cov_xd = sigma`` (exact for a VE denoiser) and ``var_x = None``. Interpolated like
        :meth:`at`.
        """
        query = _levels("Calibration.error_model", sigmas).detach().double().cpu()
        m, t = self._reduced()
        full = (self.steps, self.channels)
        j = torch.zeros(full, dtype=torch.float64)
        if gain:
            k = m.gain_slope()
            # A gain is only kept where the data show one: |k| > 3 standard errors of the regression slope
            # (where d_fp hardly varies, at the lowest noise levels, k is not identifiable).
            # Per frequency band, a sample's positions carry only as many independent values as the band has
            # FFT bins (a band-limited field is smooth): count those.
            shares = self.meta.get("band_shares")
            share = 1.0 if shares is None else torch.tensor(shares, dtype=torch.float64).repeat(m.n.shape[1] // len(shares))
            se = (m.gain_residual(k)[1] / ((m.n * share).clamp(min=2) * m.var_fp.clamp(min=1e-300))).sqrt()
            k = torch.where(k.abs() > 3 * se, k, torch.zeros_like(k))
            k = k.clamp(1 / MAX_GAIN_FACTOR - 1, MAX_GAIN_FACTOR - 1)
            b, var_r = m.gain_residual(k)
            v = var_r / (1 + k) ** 2
            if t is not None and t.cross_xe is not None:
                k, j, b, v = _with_state_gain(t, self.sigmas[:, None], share, k, b, v)
        else:
            k = b = torch.zeros(full, dtype=torch.float64)
            v = m.conditional_variance() if self.conditional else m.var_delta
        table = {"k": k, "j": j, "b": b, "V": v}
        if t is not None:
            table.update(var_d=t.d_variance(), cov_xd=t.state_d_covariance())
            log_var_x = t.state_variance().clamp(min=1e-300).log()
        else:
            table["var_d"] = m.var_fp
        out = {key: interpolate_log_sigma(val.expand(full), self.sigmas, query) for key, val in table.items()}
        if self.trajectory is None:
            out["cov_xd"] = query[:, None].expand(len(query), self.channels).clone()
            out["var_x"] = None
        else:
            out["var_x"] = interpolate_log_sigma(log_var_x.expand(full), self.sigmas, query).exp()
        return out

    def error_correlation(self, *, gain: bool) -> Optional[torch.Tensor]:
        """Correlation of the (residual) error between calibrated steps ``[S, S, C]``, or None.

        The residual is ``delta - k d_fp - j x / sigma`` with :meth:`error_model`'s gain and state gain when
        ``gain`` is True, else ``delta``. None when the calibration has no trajectory sums (format version 1).
        """
        if self.trajectory is None:
            return None
        t = self._reduced()[1]
        k = s = torch.zeros(t.shape, dtype=torch.float64)
        if gain:
            em = self.error_model(self.sigmas, gain=True)
            k, s = em["k"][:, : t.shape[1]], em["j"][:, : t.shape[1]] / self.sigmas[:, None]
        return t.residual_correlation(k, s).expand(self.steps, self.steps, self.channels)

    def with_options(self, *, reduce: str = None, conditional: bool = None) -> "Calibration":
        """The same statistics read another way (no recalibration): other ``reduce`` or ``conditional``."""
        if conditional is not None and flag(conditional) is None:
            raise ValueError(f"Calibration.with_options: conditional must be True, False or None, got {conditional!r}")
        return replace(
            self,
            reduce=self.reduce if reduce is None else reduce,
            conditional=self.conditional if conditional is None else flag(conditional),
        )

    def merge(self, other: "Calibration") -> "Calibration":
        """Pools two calibrations of the same schedule (e.g. made on different machines)."""
        if not isinstance(other, Calibration):
            raise ValueError(f"Calibration.merge: expected a Calibration, got {type(other).__name__}")
        if other.sigmas.shape != self.sigmas.shape or not torch.allclose(other.sigmas, self.sigmas, rtol=1e-9):
            raise ValueError("Calibration.merge: the two calibrations were made on different schedules")
        if other.channels != self.channels:
            raise ValueError(f"Calibration.merge: channel counts differ ({self.channels} vs {other.channels})")
        for key in ("trim", "trajectory", "model_fp", "model_q"):
            if key in self.meta and key in other.meta and self.meta[key] != other.meta[key]:
                raise ValueError(
                    f"Calibration.merge: the calibrations differ in {key} ({self.meta[key]!r} vs {other.meta[key]!r})"
                )
        meta = dict(self.meta)
        meta["K"] = int(self.meta.get("K", 0)) + int(other.meta.get("K", 0))
        both = self.trajectory is not None and other.trajectory is not None
        trajectory = self.trajectory.merge(other.trajectory) if both else None
        lost = _merge_loss(self, other)
        if lost:
            warnings.warn(f"Calibration.merge: {lost}; the merged calibration does without them (recalibrate both "
                          "alike with this qdrift to keep them)", stacklevel=2)
        meta.pop("drift_scale", None)
        scale, scale_lost = _merge_drift_scale(self.meta.get("drift_scale"), other.meta.get("drift_scale"))
        if scale is not None:
            meta["drift_scale"] = scale
        if scale_lost:
            warnings.warn(f"Calibration.merge: {scale_lost}; the merged calibration is not sized (run "
                          "qdrift.calib.size_drift on it)", stacklevel=2)
        banded = None
        if self.banded is not None and other.banded is not None and not _band_loss(self, other):
            with warnings.catch_warnings():  # said once above, for both
                warnings.simplefilter("ignore", UserWarning)
                banded = self.banded.merge(other.banded)
        matched, match, match_lost = _merge_matched(self, other)
        meta.pop("match", None)
        if match is not None:
            meta["match"] = match
        if match_lost:
            warnings.warn(f"Calibration.merge: {match_lost}; the merged calibration has none (run "
                          "qdrift.calib.match_moments on it)", stacklevel=2)
        return replace(self, moments=self.moments.merge(other.moments), meta=meta, trajectory=trajectory,
                       matched=matched, banded=banded)

    def __repr__(self) -> str:
        return (
            f"Calibration(steps={self.steps}, channels={self.channels}, reduce={self.reduce!r}, "
            f"conditional={self.conditional}, sigma={float(self.sigmas[0]):.4g}..{float(self.sigmas[-1]):.4g}, "
            f"K={self.meta.get('K')}" + (f", bands={self.bands})" if self.banded is not None else ")")
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the calibration as safetensors with JSON metadata (loads without executing code).

        The file is written next to ``path`` and renamed into place, so a failed save leaves any previous
        file intact.

        Raises:
            OSError: (its errno subclass, e.g. ``FileNotFoundError`` for a missing directory) naming the path,
                if the file cannot be written.
            ValueError: if ``meta`` cannot be written as JSON (e.g. it refers to itself).
        """
        from safetensors.torch import save

        path = os.fspath(path)
        tensors = {"sigmas": self.sigmas.contiguous()}
        tensors.update({k: v.contiguous() for k, v in self.moments.tensors().items()})
        if self.trajectory is not None:
            tensors.update({_TRAJ_PREFIX + k: v.contiguous() for k, v in self.trajectory.tensors().items()})
        if self.matched is not None:
            tensors.update({_MATCH_PREFIX + k: v.contiguous() for k, v in self.matched.items()})
        if self.banded is not None:
            tensors.update({_BAND_PREFIX + k: v.contiguous() for k, v in self.banded.moments.tensors().items()})
            if self.banded.trajectory is not None:
                tensors.update({_BAND_PREFIX + _TRAJ_PREFIX + k: v.contiguous()
                                for k, v in self.banded.trajectory.tensors().items()})
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "qdrift_version": __version__,
            "reduce": self.reduce,
            "conditional": self.conditional,
            "meta": self.meta,
        }
        if self.banded is not None:
            header["bands"] = self.bands
            header["band_shares"] = self.banded.meta.get("band_shares")
        try:
            text = json.dumps(header, default=_json_default)
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"Calibration.save: meta cannot be written as JSON ({e})") from None
        write_atomic(path, save(tensors, metadata={"qdrift": text}), "Calibration.save")


def write_atomic(path: str, data: bytes, who: str) -> None:
    """Writes ``data`` next to ``path`` and renames it into place, so a failed write leaves any previous file
    intact; an ``OSError`` (its errno subclass) names the path and, for a missing directory, the directory."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        parent = os.path.dirname(os.path.abspath(path))
        reason = f"no such directory {parent}" if not os.path.isdir(parent) else (e.strerror or str(e))
        raise OSError(e.errno, f"{who}: cannot write {path}: {reason}") from None


def load_calibration(path: Union[str, os.PathLike]) -> Calibration:
    """Reads a calibration written by :meth:`Calibration.save`.

    Every failure to read is a :class:`CalibrationFileError` naming the file and the problem; the file is
    only parsed (safetensors tensors and JSON metadata), never executed.

    Raises:
        CalibrationFileNotFoundError: (a ``CalibrationFileError`` and a ``FileNotFoundError``) if there is no
            such file.
        CalibrationFileError: (a ``ValueError``) if the path is not a regular file (a directory, a FIFO, a
            device), the file is unreadable, corrupt, not a qdrift calibration, from a newer format, its
            metadata has fields of the wrong type, or its tensors are inconsistent.
    """
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise CalibrationFileError(f"load_calibration: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CalibrationFileNotFoundError(f"load_calibration: no such file: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise CalibrationFileError(f"load_calibration: cannot access {path!r} ({e})") from None
    if not stat.S_ISREG(mode):
        raise CalibrationFileError(f"load_calibration: {path} is {_file_kind(mode)}, not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("qdrift")
            names = set(f.keys())
            wanted = set(_TENSORS) | {k for k in names if k.startswith((_TRAJ_PREFIX, _MATCH_PREFIX, _BAND_PREFIX))}
            tensors = {k: f.get_tensor(k) for k in names & wanted}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CalibrationFileError(f"load_calibration: {path} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise CalibrationFileError(f"load_calibration: {path} has no 'qdrift' metadata: not a qdrift calibration")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; RecursionError: deep nesting
        raise CalibrationFileError(f"load_calibration: {path} has corrupt qdrift metadata ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CalibrationFileError(f"load_calibration: {path} is not a {FORMAT} file")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CalibrationFileError(
            f"load_calibration: {path} has format_version {version!r}; this qdrift ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade qdrift"
        )
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise CalibrationFileError(f"load_calibration: {path} lacks tensors {missing}")
    for k, v in tensors.items():
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise CalibrationFileError(f"load_calibration: tensor {k!r} in {path} is not finite floating point")
    if bool((tensors["n"] <= 0).any()) or bool((tensors["m2_fp"] < 0).any()) or bool((tensors["m2_q"] < 0).any()):
        raise CalibrationFileError(f"load_calibration: {path} has empty counts or negative variances")
    if tensors["c_fq"].shape == tensors["m2_fp"].shape == tensors["m2_q"].shape:
        bound = (tensors["m2_fp"] * tensors["m2_q"]).sqrt() * (1 + 1e-6) + 1e-12
        if bool((tensors["c_fq"].abs() > bound).any()):
            raise CalibrationFileError(f"load_calibration: {path} has a covariance above its Cauchy-Schwarz bound")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise CalibrationFileError(f"load_calibration: {path} has metadata 'meta' of type {type(meta).__name__}, not an object")
    if not isinstance(header.get("qdrift_version", ""), str):
        raise CalibrationFileError(f"load_calibration: {path} has qdrift_version {header['qdrift_version']!r}, not a string")
    reduce, conditional = header.get("reduce"), header.get("conditional")
    if reduce not in REDUCES or not isinstance(conditional, bool):
        raise CalibrationFileError(f"load_calibration: {path} has invalid reduce={reduce!r}/conditional={conditional!r}")
    traj = {k[len(_TRAJ_PREFIX):]: v for k, v in tensors.items() if k.startswith(_TRAJ_PREFIX)}
    matched = {k[len(_MATCH_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MATCH_PREFIX)}
    band = {k[len(_BAND_PREFIX):]: v for k, v in tensors.items() if k.startswith(_BAND_PREFIX)}
    bands = header.get("bands")
    if bool(band) != (bands is not None) or (bands is not None and (
            isinstance(bands, bool) or not isinstance(bands, int) or bands < 2)):
        raise CalibrationFileError(f"load_calibration: {path} has band tensors and a 'bands' field that disagree "
                                   f"(bands={bands!r}, {len(band)} band tensors)")
    try:
        moments = PairedMoments(**{k: tensors[k] for k in _TENSORS if k != "sigmas"})
        trajectory = TrajectorySums(**traj) if traj else None
        if trajectory is not None:
            trajectory.check_consistent()
        banded = None
        if band:
            band_traj = {k[len(_TRAJ_PREFIX):]: v for k, v in band.items() if k.startswith(_TRAJ_PREFIX)}
            band_sums = TrajectorySums(**band_traj) if band_traj else None
            if band_sums is not None:
                band_sums.check_consistent()
            band_moments = PairedMoments(**{k: v for k, v in band.items() if not k.startswith(_TRAJ_PREFIX)})
            shares = header.get("band_shares")
            if shares is not None and (not isinstance(shares, list) or len(shares) != bands
                                       or not all(_is_real(v) and 0 < v <= 1 for v in shares)):
                raise CalibrationFileError(f"load_calibration: {path} has invalid band_shares {shares!r:.80}")
            band_meta = {"band_units": bands} if shares is None else {"band_units": bands, "band_shares": shares}
            banded = Calibration(tensors["sigmas"], band_moments, reduce, conditional, band_meta,
                                 trajectory=band_sums)
        return Calibration(tensors["sigmas"], moments, reduce, conditional, dict(meta), trajectory=trajectory,
                           matched=matched or None, banded=banded)
    except TypeError as e:  # unknown or missing trajectory fields
        raise CalibrationFileError(f"load_calibration: {path} has an invalid set of trajectory tensors ({e})") from None
    except ValueError as e:
        raise CalibrationFileError(f"load_calibration: {path} is invalid: {e}") from None


def _with_state_gain(t: TrajectorySums, sigma: torch.Tensor, share, k, b, v):
    """The error model with the state term of :meth:`Calibration.error_model`: ``(k, j, b, V)`` ``[S, C]``.

    Least squares of ``delta`` on ``(d_fp, x / sigma)`` per (step, unit) from the trajectory sums, within the
    bounds ``1 + k`` in ``[1/2, 2]`` and ``|j| <= 1/2``. Where ``|j|`` of the unbounded fit does not exceed three
    standard errors the model stays ``(k, 0, b, V)`` as given (the PTQD split); where it does, ``k`` is kept only
    if it also exceeds three standard errors (else ``k = 0`` and ``j`` alone is fitted). The bounded fit is the
    exact minimum of the residual variance over the box: a convex quadratic's minimum there is the unbounded
    one when inside, else on an edge, where it is the other coefficient's one-dimensional optimum clipped to
    its bounds; every candidate is scored and the least kept. ``b`` and ``V`` follow from the sums, and the
    state model replaces the split only where it leaves a smaller ``V`` than the split's ``k`` does on the same
    sums (where ``d_fp`` and ``x / sigma`` are nearly collinear a bounded fit need not).
    """
    mo = t.step_moments()
    sdd, suu, sdu = mo["dd"], mo["xx"] / sigma**2, mo["xd"] / sigma
    sed, seu, see = mo["de"], mo["xe"] / sigma, mo["ee"]
    det = sdd * suu - sdu**2
    ok = det > 1e-12 * (sdd * suu).clamp(min=1e-300)
    safe = torch.where(ok, det, torch.ones_like(det))
    kj = (sed * suu - seu * sdu) / safe
    jj = (seu * sdd - sed * sdu) / safe
    var_r = (see - kj * sed - jj * seu).clamp(min=0)
    n = (t.n * share).clamp(min=2)
    se_k, se_j = (var_r * suu / (n * safe)).sqrt(), (var_r * sdd / (n * safe)).sqrt()
    state = ok & (jj.abs() > 3 * se_j)
    keep_k = kj.abs() > 3 * se_k

    k_lo, k_hi, j_lim = 1 / MAX_GAIN_FACTOR - 1, MAX_GAIN_FACTOR - 1, MAX_STATE_GAIN
    resid = lambda a, c: see - 2 * a * sed - 2 * c * seu + a**2 * sdd + 2 * a * c * sdu + c**2 * suu  # noqa: E731
    j_given = lambda a: ((seu - a * sdu) / suu.clamp(min=1e-300)).clamp(-j_lim, j_lim)  # noqa: E731
    k_given = lambda c: ((sed - c * sdu) / sdd.clamp(min=1e-300)).clamp(k_lo, k_hi)  # noqa: E731
    inside = (kj >= k_lo) & (kj <= k_hi) & (jj.abs() <= j_lim)
    cands = [(kj, jj, torch.where(inside, resid(kj, jj), torch.full_like(kj, float("inf"))))]
    for a in (k_lo, k_hi):
        a = torch.full_like(kj, a)
        cands.append((a, j_given(a), resid(a, j_given(a))))
    for c in (-j_lim, j_lim):
        c = torch.full_like(jj, c)
        cands.append((k_given(c), c, resid(k_given(c), c)))
    best_k, best_j, best_r = cands[0]
    for a, c, r in cands[1:]:
        better = r < best_r
        best_k, best_j, best_r = torch.where(better, a, best_k), torch.where(better, c, best_j), torch.minimum(r, best_r)
    zero = torch.zeros_like(kj)
    kj, jj = torch.where(keep_k, best_k, zero), torch.where(keep_k, best_j, j_given(zero))
    b_s = mo["e"] - kj * mo["d"] - jj * mo["x"] / sigma
    v_s = resid(kj, jj).clamp(min=0) / (1 + kj) ** 2
    state = state & (v_s < resid(k, zero) / (1 + k) ** 2)  # the split's V from the same (untrimmed) sums
    pick = lambda new, old: torch.where(state, new, old)  # noqa: E731
    return pick(kj, k), pick(jj, zero), pick(b_s, b), pick(v_s, v)


def _merge_loss(a: Calibration, b: Calibration) -> str:
    """What a merge of ``a`` and ``b`` drops because only one of them has it, in words ('' when nothing)."""
    ta, tb = a.trajectory, b.trajectory
    if (ta is None) != (tb is None):
        return ("only one of the two calibrations has the trajectory sums (format version 2: cross-step error "
                "accounting and the state term)")
    if ta is not None and (ta.cross_xe is None) != (tb.cross_xe is None):
        return "only one of the two calibrations has the state cross sums (format version 3: the state term)"
    return _band_loss(a, b)


def _band_loss(a: Calibration, b: Calibration) -> str:
    """What a merge drops of the frequency-band statistics (:attr:`Calibration.banded`), in words ('' if nothing):
    they pool only between calibrations of the same band count on grids of the same shape (the same shares)."""
    if a.banded is None and b.banded is None:
        return ""
    if (a.banded is None) != (b.banded is None):
        return "only one of the two calibrations has frequency-band statistics (calibrate(..., bands=N))"
    if a.bands != b.bands:
        return f"the two calibrations' frequency-band statistics have different band counts ({a.bands} vs {b.bands})"
    if a.banded.meta.get("band_shares") != b.banded.meta.get("band_shares"):
        return ("the two calibrations' frequency-band statistics were made on latents of different spatial sizes (the "
                "bands' shares differ)")
    return ""


def _merge_drift_scale(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The ``meta["drift_scale"]`` of two merged calibrations: the K-weighted mean of both sizing passes when
    they sized the same sampler and step count; else None, with why in words ('' when neither was sized)."""
    if a is None and b is None:
        return None, ""
    if a is None or b is None:
        return None, "only one of the two calibrations was sized (size_drift)"
    if (a.get("sampler"), a.get("steps")) != (b.get("sampler"), b.get("steps")):
        return None, (f"the two were sized on different samplers or step counts ({a.get('sampler')} "
                      f"{a.get('steps')} vs {b.get('sampler')} {b.get('steps')})")
    if ("output" in a) != ("output" in b):
        return None, "only one of the two sizings measured the output correction's share (size_drift(output=True))"
    if a.get("drift", True) != b.get("drift", True):
        return None, "only one of the two sizings sized the drift (size_drift(drift=False) sizes the output alone)"
    ka, kb = a["K"], b["K"]

    def mix(x, y, keys):
        return {key: [(ka * u + kb * v) / (ka + kb) for u, v in zip(x[key], y[key])] for key in keys}

    keys = ("measured", "predicted") + (("measured_sq",) if "measured_sq" in a and "measured_sq" in b else ())
    out = {k: v for k, v in a.items() if k != "measured_sq"}
    if "output" in a:
        out["output"] = mix(a["output"], b["output"], OUTPUT_TERMS)
    return dict(out, K=ka + kb, **mix(a, b, keys)), ""


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _merge_matched(a: Calibration, b: Calibration) -> tuple:
    """Moment-matching tables of two merged calibrations and their ``meta["match"]``, with why they were lost (or
    None): their K-weighted mean when both were matched the same way on the same levels, else those of the one that
    has them (tables and description together), else none."""
    if a.matched is None or b.matched is None:
        one = b if a.matched is None else a
        return one.matched, one.meta.get("match"), None
    ma, mb = a.meta.get("match") or {}, b.meta.get("match") or {}
    same = {k: ma.get(k) for k in ("sampler", "gain", "mean")} == {k: mb.get(k) for k in ("sampler", "gain", "mean")}
    if not same or a.matched["sigmas"].shape != b.matched["sigmas"].shape or not torch.allclose(
        a.matched["sigmas"], b.matched["sigmas"], rtol=1e-9
    ):
        return None, None, (f"their moment-matching tables were measured differently ({ma.get('sampler')!r} vs "
                            f"{mb.get('sampler')!r} sampler, or other levels or options)")
    ka, kb = float(ma.get("K", 1)), float(mb.get("K", 1))
    mix = {k: (ka * a.matched[k] + kb * b.matched[k]) / (ka + kb) for k in ("V", "shift")}
    match = dict(ma, K=ma.get("K", 1) + mb.get("K", 1))
    return {"sigmas": a.matched["sigmas"], **mix}, match, None
