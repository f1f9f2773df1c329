"""Q-Drift samplers: one function per k-diffusion sampler, same contract, ``V`` fourth."""

from .dpmpp import sample_dpmpp_2m_qdrift, sample_dpmpp_2m_sde_qdrift, sample_dpmpp_3m_sde_qdrift
from .euler import sample_euler_ancestral_qdrift, sample_euler_qdrift, sample_heun_qdrift
from .lms import sample_lms_qdrift

SAMPLERS = {
    "euler": sample_euler_qdrift,
    "euler_ancestral": sample_euler_ancestral_qdrift,
    "heun": sample_heun_qdrift,
    "lms": sample_lms_qdrift,
    "dpmpp_2m": sample_dpmpp_2m_qdrift,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde_qdrift,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde_qdrift,
}
"""Short sampler name (k-diffusion's, without ``sample_``) -> qdrift sampler function."""

__all__ = ["SAMPLERS"] + sorted(fn.__name__ for fn in SAMPLERS.values())
