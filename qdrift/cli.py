"""The ``qdrift`` command line: ``qdrift analytic`` (analytic-Gaussian table), ``qdrift bench`` (models).

Subcommands are imported only when used, so ``import qdrift`` stays light.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "analytic": ("qdrift.analytic_bench", "excess variance removed per sampler on the analytic Gaussian"),
    "bench": ("qdrift.bench.cli", "FP vs quantized vs Q-Drift on the built-in models (Table 1 in miniature)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qdrift COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n`qdrift COMMAND --help` shows a command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qdrift: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ImportError as e:
        print(f"qdrift {name}: not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
