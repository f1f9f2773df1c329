"""Q-Drift custom nodes for ComfyUI.

Install: link (or copy) this folder to ``ComfyUI/custom_nodes/qdrift`` and install qdrift from its source
checkout into ComfyUI's Python: ``python -m pip install --no-deps /path/to/qdrift`` (qdrift is not on the package
index; ``--no-deps`` keeps ComfyUI's torch, and ComfyUI already has qdrift's other dependencies). See the "Host
integrations" section of the qdrift README.

ComfyUI loads either node form: the V3 schema (``comfy_entrypoint``, pinned to ``comfy_api.v0_0_2``) when its
``comfy_api`` has that version, else the classic ``NODE_CLASS_MAPPINGS``. Only one is exported, because ComfyUI
prefers the classic mappings when a pack exports both.
"""

import os

HERE = os.path.dirname(os.path.realpath(__file__))


def install_command() -> str:
    """The pip command that installs qdrift for this node pack (the checkout it sits in, when it does)."""
    root = os.path.abspath(os.path.join(HERE, "..", ".."))
    is_checkout = os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "qdrift"))
    return f'python -m pip install --no-deps "{root if is_checkout else "/path/to/your/qdrift/checkout"}"'


try:
    import qdrift  # noqa: F401
except ImportError as e:  # ComfyUI logs this and skips the node pack
    raise ImportError(
        "Q-Drift nodes need the 'qdrift' package in ComfyUI's Python environment; it is not on the package index. "
        f"Install it from a qdrift source checkout with the Python that runs ComfyUI: {install_command()} "
        "(--no-deps keeps ComfyUI's torch)"
    ) from e

try:
    from comfy_api.v0_0_2 import ComfyExtension as _probe  # noqa: F401
except ImportError:  # a ComfyUI older than v0.3.6x: the classic form
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
else:
    from .nodes_v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
