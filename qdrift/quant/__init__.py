"""Post-training quantization for benchmarking quantization-aware samplers.

``quantize(model, scheme, calib_data, **options)`` returns a deterministic fake-quantized copy of a network:
simulated ``"w4a8"`` (MixDQ-like), ``"w4a4"`` and ``"w3a4"`` (SVDQuant-like), see :mod:`qdrift.quant.ptq` for the
schemes and the adaptations made for tiny models; or weight-only formats computed by their own libraries
(``"gguf-q8_0"`` .. ``"gguf-q4_0"``, ``"nf4"``, ``"fp4"``, ``"quanto-int8"``, ``"quanto-int4"``), see
:mod:`qdrift.quant.formats`. ``quantize(..., reconstruction="brecq" | "gac")`` then learns the weights' rounding
block by block on timestep-tagged calibration samples (:class:`CalibSamples`), see :mod:`qdrift.quant.reconstruct`.
"""

from .formats import FORMAT_SCHEMES, format_available, format_summary, gguf_plan, quantize_format
from .functional import (ema_range, quantize_asymmetric, quantize_symmetric, quantize_symmetric_groups,
                         quantize_unsigned_groups, round_ste, signed_qmax)
from .layers import MixDQLayer, SVDQuantLayer
from .reconstruct import RECONSTRUCTIONS, CalibSamples, ReconConfig, record_calib_samples
from .ptq import (MIXDQ_SKIP, SCHEMES, SIMULATED_SCHEMES, SVDQUANT_SKIP, layer_error_report, mixdq_allocate_bits,
                  quantizable_layers, quantize, svdquant_layer)

__all__ = [
    "quantize", "SCHEMES", "SIMULATED_SCHEMES", "FORMAT_SCHEMES", "quantize_format", "format_available",
    "format_summary", "gguf_plan", "SVDQUANT_SKIP", "MIXDQ_SKIP", "quantizable_layers", "svdquant_layer",
    "mixdq_allocate_bits", "layer_error_report", "SVDQuantLayer", "MixDQLayer", "signed_qmax",
    "quantize_symmetric", "quantize_symmetric_groups", "quantize_unsigned_groups", "quantize_asymmetric",
    "ema_range", "round_ste", "RECONSTRUCTIONS", "CalibSamples", "ReconConfig", "record_calib_samples",
]
