"""Q-Drift custom nodes for ComfyUI.

Install: copy or link this folder to ``ComfyUI/custom_nodes/qdrift`` and install qdrift into ComfyUI's Python
(``python -m pip install -r requirements.txt`` in this folder). See the "Host integrations" section of the qdrift README.
"""

try:
    import qdrift  # noqa: F401
except ImportError as e:  # ComfyUI logs this and skips the node pack
    raise ImportError(
        "Q-Drift nodes need the 'qdrift' package in ComfyUI's Python environment: run "
        "'python -m pip install qdrift' with the Python that runs ComfyUI (it does not change torch)"
    ) from e

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
