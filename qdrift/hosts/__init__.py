"""Host-side helpers shared by the ComfyUI, Forge/A1111 and diffusers integrations.

Nothing in the core imports this package. It holds the two pieces every host needs:

- :func:`bind_sampler`: a qdrift sampler with its calibration bound, exposing the k-diffusion contract
  ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **knobs)`` and a signature that hosts
  which inspect it (A1111/Forge look for ``sigmas``, ``eta``, ``noise_sampler``...) read correctly.
- :class:`PairedTrace` (re-exported from its home, :mod:`qdrift.calib.trace`): two-pass paired calibration
  for hosts that hold one model at a time: pass 1 runs the full-precision Euler trajectory and records
  ``(x_i, D_fp(x_i))``; pass 2 evaluates the quantized model on the recorded ``x_i``;
  :meth:`PairedTrace.calibration` turns the pairs into a :class:`qdrift.Calibration`.
"""

from ._bind import (
    HOST_BANDS,
    SAMPLER_LABELS,
    STOCHASTIC_SAMPLERS,
    bind_sampler,
    check_calibration_channels,
    flow_sde_sigmas,
    host_seed,
    load_calibration_cached,
    sampler_names,
    seeded_noise_factory,
)
from ..calib.trace import PairedTrace, PairedTraceError, calibration_from_pairs  # re-exported for the hosts

__all__ = [
    "HOST_BANDS",
    "SAMPLER_LABELS",
    "STOCHASTIC_SAMPLERS",
    "bind_sampler",
    "check_calibration_channels",
    "flow_sde_sigmas",
    "host_seed",
    "load_calibration_cached",
    "sampler_names",
    "seeded_noise_factory",
    "PairedTrace",
    "PairedTraceError",
    "calibration_from_pairs",
]
