"""The Q-Drift nodes in ComfyUI's V3 schema, pinned to ``comfy_api.v0_0_2`` (ComfyUI v0.3.64 and later).

Same node ids, inputs and work as the classic nodes (``nodes.py``; the input tables live there), so saved
workflows load with either form. ``__init__.py`` exports this form's ``comfy_entrypoint`` when
``comfy_api.v0_0_2`` imports, else the classic ``NODE_CLASS_MAPPINGS`` (ComfyUI prefers the classic mappings when
a pack exports both, so only one is exported).
"""

from __future__ import annotations

from typing import List

from comfy_api.v0_0_2 import ComfyExtension, io

from . import nodes

COMFY_API_VERSION = "0.0.2"

_TYPES = {
    "MODEL": io.Model,
    "CONDITIONING": io.Conditioning,
    "LATENT": io.Latent,
    "SIGMAS": io.Sigmas,
    "SAMPLER": io.Sampler,
    "FLOAT": io.Float,
    "INT": io.Int,
    "STRING": io.String,
    "BOOLEAN": io.Boolean,
}
CalibrationType = io.Custom(nodes.CALIBRATION_TYPE)


def _io_type(kind):
    return _TYPES.get(kind) or CalibrationType


def _inputs(table, optional=False) -> list:
    """V3 inputs from one of the node input tables of ``nodes.py`` (a list kind is a combo)."""
    out = []
    for name, kind, opts in table:
        if isinstance(kind, list):
            out.append(io.Combo.Input(name, options=list(kind), optional=optional, **opts))
        else:
            out.append(_io_type(kind).Input(name, optional=optional, **opts))
    return out


class QDriftCalibrate(io.ComfyNode):
    """Q-Drift Calibrate (V3): see :func:`nodes.calibrate`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QDriftCalibrate",
            display_name=nodes.DISPLAY_NAMES["QDriftCalibrate"],
            category=nodes.CATEGORY,
            description=nodes.CALIBRATE_DESCRIPTION,
            inputs=_inputs(nodes.CALIBRATE_INPUTS) + _inputs(nodes.CALIBRATE_OPTIONAL_INPUTS, optional=True),
            outputs=[CalibrationType.Output(display_name="calibration"), io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce,
                filename_prefix, size_drift=True, bands=nodes.HOST_BANDS) -> io.NodeOutput:
        cal, path = nodes.calibrate(model_fp, model_q, positive, negative, latent_image, sigmas, cfg, seed, K, reduce,
                                    filename_prefix, nodes.node_sizing(size_drift), bands)
        return io.NodeOutput(cal, path)


class QDriftSampler(io.ComfyNode):
    """Q-Drift Sampler (V3): see :func:`nodes.get_sampler`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QDriftSampler",
            display_name=nodes.DISPLAY_NAMES["QDriftSampler"],
            category=nodes.CATEGORY,
            description=nodes.SAMPLER_DESCRIPTION,
            inputs=_inputs(nodes.SAMPLER_INPUTS) + _inputs(nodes.SAMPLER_OPTIONAL_INPUTS, optional=True),
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, calibration_file="", **_ignored):
        """Re-runs the node when the named calibration file changes on disk (V1's IS_CHANGED)."""
        return nodes.calibration_fingerprint(calibration_file)

    @classmethod
    def execute(cls, sampler_name, calibration_file, reduce, strength, calibration=None, **knobs) -> io.NodeOutput:
        return io.NodeOutput(nodes.get_sampler(sampler_name, calibration_file, reduce, strength, calibration, **knobs))


class QDriftExtension(ComfyExtension):
    async def get_node_list(self) -> List[type]:
        return [QDriftCalibrate, QDriftSampler]


async def comfy_entrypoint() -> QDriftExtension:
    """ComfyUI's V3 entry point for this node pack."""
    return QDriftExtension()


__all__ = ["COMFY_API_VERSION", "QDriftCalibrate", "QDriftSampler", "QDriftExtension", "comfy_entrypoint"]
