"""The ``qdrift`` command line: ``qdrift analytic`` (analytic-Gaussian table), ``qdrift bench`` (models).

Subcommands are imported only when used, so ``import qdrift`` stays light. Every command answers bad
arguments the same way: one line ``PROG: error: MESSAGE`` on stderr and exit status 2 (:class:`ArgumentParser`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from typing import Callable, List, NoReturn, Optional

__all__ = ["main", "ArgumentParser", "int_at_least", "number"]

COMMANDS = {
    "analytic": ("qdrift.bench.analytic", "excess variance removed per sampler on the analytic Gaussian"),
    "bench": ("qdrift.bench.cli", "FP vs quantized vs Q-Drift on the built-in models (Table 1 in miniature)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def number(lo: float = -math.inf, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= lo`` (``> lo`` with ``strict``)."""
    bound = f"{'>' if strict else '>='} {lo:g}" if lo > -math.inf else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lo or (strict and value == lo):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}".rstrip() + f", got {text!r}")
        return value

    parse.__name__ = f"number {bound}".rstrip()
    return parse


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: qdrift COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n`qdrift COMMAND --help` shows a command's options.")
        return 0
    if not argv:
        print(f"qdrift: error: missing command; choose one of: {', '.join(COMMANDS)} (see qdrift --help)", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qdrift: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ImportError as e:
        print(f"qdrift {name}: not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
