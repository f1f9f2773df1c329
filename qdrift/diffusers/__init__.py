"""Q-Drift for diffusers: scheduler subclasses and paired pipeline calibration.

Requires ``diffusers`` (``pip install "qdrift[diffusers]"``); the qdrift core never imports this package.

- :func:`qdrift_scheduler` turns an ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
  ``FlowMatchEulerDiscreteScheduler`` or ``DPMSolverMultistepScheduler`` (dpmsolver++) into its Q-Drift
  version driven by a :class:`qdrift.Calibration`.
- :func:`calibrate_pipeline` measures that calibration from a full-precision and a quantized pipeline.
"""

try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "qdrift.diffusers needs the 'diffusers' package: pip install diffusers (it does not replace torch)"
    ) from e

from .calibrate import calibrate_pipeline
from .schedulers import (
    SUPPORTED_SCHEDULERS,
    QDriftDPMSolverMultistepScheduler,
    QDriftEulerAncestralDiscreteScheduler,
    QDriftEulerDiscreteScheduler,
    QDriftFlowMatchEulerDiscreteScheduler,
    qdrift_scheduler,
)

__all__ = [
    "qdrift_scheduler",
    "calibrate_pipeline",
    "QDriftEulerDiscreteScheduler",
    "QDriftEulerAncestralDiscreteScheduler",
    "QDriftFlowMatchEulerDiscreteScheduler",
    "QDriftDPMSolverMultistepScheduler",
    "SUPPORTED_SCHEDULERS",
]
