"""Installs (or refreshes) qdrift in the webui's Python when the extension loads, without touching its torch.

The webui runs this file with its own interpreter at start-up (``launch.run_pip`` / ``launch.is_installed``
exist in AUTOMATIC1111 1.x and Forge). qdrift is installed with ``--no-deps`` (its only heavy dependency,
torch, is the host's), then each missing light dependency alone, also with ``--no-deps``.

qdrift is not on the package index. Where it comes from, in order:

1. the environment variable ``QDRIFT_PIP_SPEC`` (any pip requirement or path), installed when qdrift is missing;
2. the qdrift source this extension ships: ``qdrift-src/`` next to this file, written by ``bundle.py`` when the
   extension is copied (``python integrations/sd-webui/bundle.py <webui>/extensions/qdrift``);
3. the qdrift checkout this extension sits in (``integrations/sd-webui`` linked into ``extensions/``).

For 2 and 3 the installed qdrift is replaced whenever its version differs from the source's, so updating the
checkout (or bundling again) and restarting the webui refreshes it. With none of them, it says what to do.
"""

import importlib.metadata
import os
import re

import launch

HERE = os.path.dirname(os.path.realpath(__file__))
# qdrift's runtime dependencies except torch (see pyproject.toml), with their own non-torch dependencies.
LIGHT_DEPENDENCIES = ["numpy", "scipy", "einops", "tqdm", "safetensors", "torchsde", "trampoline"]


def source_dirs():
    """The qdrift sources this extension can install from: the bundled copy, then the enclosing checkout."""
    return [os.path.join(HERE, "qdrift-src"), os.path.abspath(os.path.join(HERE, "..", ".."))]


def source_version(root):
    """``__version__`` of a qdrift source tree, or None when ``root`` is not one."""
    path = os.path.join(root, "qdrift", "_version.py")
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read())
    return match.group(1) if match else None


def installed_version():
    try:
        return importlib.metadata.version("qdrift")
    except importlib.metadata.PackageNotFoundError:
        return None


def install_qdrift():
    installed = installed_version()
    spec = os.environ.get("QDRIFT_PIP_SPEC", "").strip()
    if spec:
        if installed is None:
            launch.run_pip(f"install --no-deps {spec}", "qdrift (Q-Drift samplers)")
        return
    for root in source_dirs():
        version = source_version(root)
        if version is None:
            continue
        if installed != version:
            refresh = "" if installed is None else "--force-reinstall "
            launch.run_pip(f'install --no-deps {refresh}"{root}"', f"qdrift {version} (Q-Drift samplers)")
        return
    if installed is None:
        print(
            "Q-Drift: qdrift is not installed and this copy of the extension has no qdrift source (qdrift is not on "
            "the package index). Link integrations/sd-webui of a qdrift checkout into extensions/ instead of copying "
            "it, or copy it with 'python integrations/sd-webui/bundle.py <webui>/extensions/qdrift', or set "
            "QDRIFT_PIP_SPEC to a qdrift checkout path, or run: python -m pip install --no-deps /path/to/qdrift"
        )


install_qdrift()

for package in LIGHT_DEPENDENCIES:
    if not launch.is_installed(package):
        launch.run_pip(f"install --no-deps {package}", f"{package} (for Q-Drift)")
