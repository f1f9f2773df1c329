"""Q-Drift samplers: one function per k-diffusion sampler, same contract, ``V`` fourth.

:data:`REGISTRY` is the one table of what each sampler is (function, display label, whether it injects noise,
draws it from a Brownian tree, reuses earlier outputs, and how it treats flow models). Hosts, baselines,
benchmarks and error messages read it; nothing else lists the samplers.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List

from .dpmpp import sample_dpmpp_2m_qdrift, sample_dpmpp_2m_sde_qdrift, sample_dpmpp_3m_sde_qdrift
from .euler import sample_euler_ancestral_qdrift, sample_euler_qdrift, sample_heun_qdrift
from .lms import sample_lms_qdrift


@dataclass(frozen=True)
class SamplerInfo:
    """One qdrift sampler.

    Attributes:
        name: short name, k-diffusion's without ``sample_`` (``"dpmpp_2m"``).
        fn: the qdrift sampler function.
        label: the name hosts show, without the " Q-Drift" suffix (``"DPM++ 2M"``).
        stochastic: injects fresh noise (ancestral / SDE): takes ``eta``, ``s_noise``, ``noise_sampler`` and
            ``correction="noise"``; on a flow model (``flow``) it injects noise in the flow form.
        brownian: hosts draw its noise from a Brownian tree (the SDE solvers); on a flow model it steps in
            half-log-SNR, so its schedule must start below ``t = 1`` (:func:`qdrift.hosts.flow_sde_sigmas`).
        multistep: reuses earlier steps' outputs; takes ``form="quadrature"`` (the authors' DPM-Solver++ rule).
        flow: runs on flow-matching models (SD3, FLUX; :class:`qdrift.adapters.FlowDenoiser`). Every qdrift
            sampler does, and takes ``flow`` (None: the model's ``is_flow``): deterministic ones integrate the
            flow ODE in ``t``, stochastic ones inject noise in the flow form, and v2 drifts along the score.
    """

    name: str
    fn: Callable
    label: str
    stochastic: bool = False
    brownian: bool = False
    multistep: bool = False
    flow: bool = True


REGISTRY: Dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("euler", sample_euler_qdrift, "Euler"),
        SamplerInfo("euler_ancestral", sample_euler_ancestral_qdrift, "Euler a", stochastic=True),
        SamplerInfo("heun", sample_heun_qdrift, "Heun"),
        SamplerInfo("lms", sample_lms_qdrift, "LMS", multistep=True),
        SamplerInfo("dpmpp_2m", sample_dpmpp_2m_qdrift, "DPM++ 2M", multistep=True),
        SamplerInfo("dpmpp_2m_sde", sample_dpmpp_2m_sde_qdrift, "DPM++ 2M SDE", stochastic=True, brownian=True,
                    multistep=True),
        SamplerInfo("dpmpp_3m_sde", sample_dpmpp_3m_sde_qdrift, "DPM++ 3M SDE", stochastic=True, brownian=True,
                    multistep=True),
    )
}
"""Short sampler name -> :class:`SamplerInfo`, in the order hosts list them."""

SAMPLERS: Dict[str, Callable] = {name: info.fn for name, info in REGISTRY.items()}
"""Short sampler name (k-diffusion's, without ``sample_``) -> qdrift sampler function."""


def sampler_info(sampler) -> SamplerInfo:
    """The :class:`SamplerInfo` of a short name or a qdrift sampler function (also wrapped or partial).

    Raises:
        ValueError: for anything else, listing the samplers there are.
    """
    if isinstance(sampler, str) and sampler in REGISTRY:
        return REGISTRY[sampler]
    seen = 0
    while callable(sampler) and seen < 8:  # through functools.wraps / functools.partial layers
        for info in REGISTRY.values():
            if sampler is info.fn:
                return info
        sampler = getattr(sampler, "__wrapped__", None) or getattr(sampler, "func", None)
        seen += 1
    raise ValueError(
        f"unknown qdrift sampler {sampler!r}; choose one of {', '.join(map(repr, REGISTRY))} (or pass the function)"
    )


def sampler_names(**flags: bool) -> List[str]:
    """Short names of the samplers whose :class:`SamplerInfo` flags match, e.g. ``sampler_names(stochastic=True)``."""
    unknown = set(flags) - {"stochastic", "brownian", "multistep", "flow"}
    if unknown:
        raise ValueError(f"sampler_names: unknown flag(s) {sorted(unknown)}; use stochastic, brownian, multistep, flow")
    return [n for n, info in REGISTRY.items() if all(getattr(info, k) == bool(v) for k, v in flags.items())]


__all__ = ["REGISTRY", "SAMPLERS", "SamplerInfo", "sampler_info", "sampler_names"] + sorted(
    fn.__name__ for fn in SAMPLERS.values()
)
