"""Installs qdrift into the webui's Python when the extension loads, without touching its torch.

The webui runs this file with its own interpreter at start-up (``launch.run_pip`` / ``launch.is_installed``
exist in AUTOMATIC1111 1.x and Forge). qdrift is installed with ``--no-deps`` (its only heavy dependency,
torch, is the host's), then each missing light dependency alone, also with ``--no-deps``.

Where qdrift comes from, in order: the environment variable ``QDRIFT_PIP_SPEC`` (any pip requirement or path);
the qdrift source tree this extension sits in (``integrations/sd-webui`` of a qdrift checkout, linked or
copied into ``extensions/``); else the package index (``qdrift``).
"""

import os

import launch

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
# qdrift's runtime dependencies except torch (see pyproject.toml), with their own non-torch dependencies.
LIGHT_DEPENDENCIES = ["numpy", "scipy", "einops", "tqdm", "safetensors", "torchsde", "trampoline"]


def qdrift_source() -> str:
    spec = os.environ.get("QDRIFT_PIP_SPEC", "").strip()
    if spec:
        return spec
    if os.path.isfile(os.path.join(REPO, "pyproject.toml")) and os.path.isdir(os.path.join(REPO, "qdrift")):
        return f'"{REPO}"'
    return "qdrift"


if not launch.is_installed("qdrift"):
    launch.run_pip(f"install --no-deps {qdrift_source()}", "qdrift (Q-Drift samplers)")

for package in LIGHT_DEPENDENCIES:
    if not launch.is_installed(package):
        launch.run_pip(f"install --no-deps {package}", f"{package} (for Q-Drift)")
