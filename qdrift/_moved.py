"""Shim support for modules that moved: the old import path keeps working and warns, naming the new one."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Sequence


def moved_module(old: str, new: str, names: Sequence[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the shim ``old``: each of ``names`` comes from ``new`` with a DeprecationWarning.

    The new module is imported only when a name is used, so importing the shim costs nothing.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated; import {name} from {new} instead", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
