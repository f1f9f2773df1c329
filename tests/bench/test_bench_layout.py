"""The layout: benchmark library code in ``qdrift.bench``, old import paths as warning shims, a core that never
imports the bench, and thin scripts in ``benchmarks/``."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MOVED = [  # old module, name, new module
    ("qdrift.analytic", "GaussianData", "qdrift.bench.gaussian"),
    ("qdrift.analytic", "PlantedErrorDenoiser", "qdrift.bench.gaussian"),
    ("qdrift.baselines.analytic", "AnalyticCalibration", "qdrift.bench.gaussian"),
    ("qdrift.baselines.analytic", "channel_stats", "qdrift.bench.gaussian"),
    ("qdrift.analytic_bench", "main", "qdrift.bench.analytic"),
    ("qdrift.analytic_bench", "measure", "qdrift.bench.analytic"),
    ("qdrift.analytic_bench", "DATA", "qdrift.bench.analytic"),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_import_paths_warn_and_reexport(old, name, new):
    shim = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated; import {name} from {new}"):
        obj = getattr(shim, name)
    assert obj is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shim.nope  # noqa: B018


def test_from_import_of_an_old_path_warns():
    with pytest.warns(DeprecationWarning, match="qdrift.bench.gaussian"):
        from qdrift.analytic import GaussianData  # noqa: F401
    with pytest.warns(DeprecationWarning, match="qdrift.bench.gaussian"):
        from qdrift.baselines.analytic import AnalyticCalibration  # noqa: F401


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_core_never_imports_the_bench_and_the_gaussian_module_is_light():
    core_import = "import qdrift, qdrift.samplers, qdrift.calib, qdrift.correction, qdrift.adapters"
    core = _modules_after(core_import)
    assert not {m for m in core if m.startswith("qdrift.bench")}
    # qdrift.bench.gaussian (what the core's tests and examples use) adds nothing to the core but itself
    added = _modules_after(core_import + "\nimport qdrift.bench.gaussian") - core
    assert added == {"qdrift.bench", "qdrift.bench.gaussian"}


def test_core_sources_do_not_import_the_bench():
    core = [p for folder in ("", "samplers", "calib") for p in (ROOT / "qdrift" / folder).glob("*.py")]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("bench" in n for n in names), f"{path} imports {names}"


def test_benchmark_scripts_are_thin_callers():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        imports = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not defs and any(m.startswith("qdrift.bench.") for m in imports), path.name
