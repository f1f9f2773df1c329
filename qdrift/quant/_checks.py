"""Argument and input checks of :mod:`qdrift.quant`'s entry points.

Every refusal is a ``ValueError`` that names the function, the argument, the bad value and what is expected.
Numbers may be Python, numpy or 0-d torch scalars (read by :mod:`qdrift.validation`'s scalar helpers, as the core
reads them); booleans are never numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..validation import _integer, _real, flag_arg


def as_int(fn: str, name: str, value: Any, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (``None``: unbounded), else ``ValueError``."""
    v = _integer(value)
    if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
        if not what:
            what = ("an integer" if lo is None and hi is None else f"an integer >= {lo}" if hi is None
                    else f"an integer <= {hi}" if lo is None else f"an integer in [{lo}, {hi}]")
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return v


def as_real(fn: str, name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
            hi_open: bool = False, what: str = "") -> float:
    """``value`` as a finite real in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``), else ``ValueError``."""
    v = _real(value)
    ok = v is not None and math.isfinite(v) and (lo is None or v >= lo) and (
        hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        if not what:
            rng = ("" if lo is None and hi is None else f" >= {lo}" if hi is None else f" <= {hi}" if lo is None
                   else f" in [{lo}, {hi}{')' if hi_open else ']'}")
            what = f"a finite number{rng}"
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return v


def as_flag(fn: str, name: str, value: Any) -> bool:
    """``value`` as a Python bool (``bool``, ``numpy.bool_`` or a 0-d bool tensor: :func:`qdrift.validation.flag`),
    else ``ValueError``."""
    return flag_arg(fn, name, value)


def as_sequence(fn: str, name: str, value: Any, what: str) -> tuple:
    """The items of a list/tuple-like ``value`` (not a string, mapping or tensor), else ``ValueError``."""
    if isinstance(value, (str, bytes, dict, torch.Tensor)) or not isinstance(value, Iterable):
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return tuple(value)


def patterns(fn: str, name: str, value: Any) -> tuple[str, ...] | list[str]:
    """Name-component regexes: one string or a sequence of strings, each a valid regular expression.

    Returns ``value`` itself when it is already a list or tuple, ``(value,)`` for a string, else a tuple.
    """
    what = "a regular expression or a list/tuple of them (() for none)"
    if isinstance(value, str):
        items: Any = (value,)
    else:
        items = as_sequence(fn, name, value, what)
    for p in items:
        if not isinstance(p, str):
            raise ValueError(f"{fn}: {name} must be {what}; {p!r} in {value!r} is not a string")
        try:
            re.compile(p, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"{fn}: {name} entry {p!r} is not a valid regular expression ({e})") from None
    return value if isinstance(value, (list, tuple)) else tuple(items)


def check_finite(fn: str, what: str, t: torch.Tensor | None, hint: str = "") -> None:
    """``ValueError`` naming ``what`` (and counting NaN / inf values) when ``t`` has a non-finite value."""
    if t is None or not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise ValueError(f"{fn}: {what} is not finite ({nan} NaN and {inf} infinite of {t.numel()} values)"
                     + (f"; {hint}" if hint else ""))


def check_layer_params(fn: str, name: str, layer: nn.Module) -> None:
    """Refuse a layer whose weight or bias holds NaN or inf (quantizing it gives NaN outputs or fails)."""
    for pname in ("weight", "bias"):
        t = getattr(layer, pname, None)
        if isinstance(t, torch.Tensor):
            check_finite(fn, f"the {pname} of layer {name!r}", t.detach(),
                         "quantization needs finite weights (was the checkpoint loaded correctly?)")
