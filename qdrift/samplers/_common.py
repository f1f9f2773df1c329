"""What every qdrift sampler shares: entry checks, V lookup, and the one correction call."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..correction import (
    apply_drift,
    channel_view,
    check_choice,
    drift_coefficient,
    lower_noise,
    quadrature_coefficient,
    resolve_v,
    validate_sampler_inputs,
)

FORMS = ("first_order", "quadrature")
CORRECTIONS = ("drift", "noise")


def setup(
    name: str, x: torch.Tensor, sigmas: torch.Tensor, V, extra_args: Optional[dict], strength: float
) -> Tuple[Optional[torch.Tensor], Dict, torch.Tensor, List[float]]:
    """Validates inputs and returns ``(V table [steps, C] or None, extra_args, s_in [B], sigmas as floats)``.

    The float copy of the schedule (made once, on the host) feeds the correction's scalar math so the
    loop makes no device round trips.
    """
    validate_sampler_inputs(x, sigmas, name)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise ValueError(f"{name}: extra_args must be a dict or None, got {type(extra_args).__name__}")
    table = resolve_v(V, sigmas, x, name, strength)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    return table, extra_args, s_in, sigmas.detach().double().cpu().tolist()


def check_form(form: str, correction: Optional[str] = None) -> None:
    """Checks the ``form`` and ``correction`` options of a sampler."""
    check_choice("form", form, FORMS)
    if correction is not None:
        check_choice("correction", correction, CORRECTIONS)


def correct(
    x: torch.Tensor,
    x_base: torch.Tensor,
    q: Optional[torch.Tensor],
    sigma: float,
    sigma_eff: float,
    *,
    quadrature: bool = False,
    noise_std: Optional[float] = None,
    correction: str = "drift",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Applies the correction for one step (the only place a sampler changes its update).

    Args:
        x: sample before the step ``[B, C, ...]``.
        x_base: the plain sampler's deterministic result ``[B, C, ...]``.
        q: quantization variance this step injects ``[C]`` (None: no correction).
        sigma: noise level the step starts from.
        sigma_eff: level the deterministic part reaches (``sigma_next``; ``sigma_down`` for ancestral steps).
        quadrature: use the authors' denominator ``|sigma^2 - sigma_eff^2|`` instead of drift matching.
        noise_std: the sampler's own injected noise std for this step (stochastic samplers).
        correction: ``"drift"`` (Q-Drift) or ``"noise"`` (lower the injected noise by ``q`` first; any
            leftover is corrected by drift).

    Returns:
        ``(x after the deterministic part, per-channel factor [C] on the sampler's own noise, or None)``.
    """
    if q is None:
        return x_base, None
    factor = None
    if correction == "noise" and noise_std is not None:
        factor, q = lower_noise(noise_std, q)
    rule = quadrature_coefficient if quadrature else drift_coefficient
    return apply_drift(x, x_base, rule(q, sigma, sigma_eff)), factor


def scale_noise(noise: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
    """The sampler's own noise, times a per-channel factor ``[C]`` when the noise is being lowered."""
    return noise if factor is None else noise * channel_view(factor, noise).to(noise.dtype)


def resolve_flow(model, flow: Optional[bool], name: str) -> bool:
    """The state form a stochastic sampler injects noise for: ``flow`` when given, else the model's ``is_flow``
    (:class:`qdrift.adapters.FlowDenoiser` sets it). Hosts pass ``flow`` (ComfyUI: prediction type CONST)."""
    if flow is None:
        return bool(getattr(model, "is_flow", False))
    if not isinstance(flow, bool):
        raise ValueError(f"{name}: flow must be True, False or None (from the model), got {flow!r}")
    return flow


def first_order_q(table: Optional[torch.Tensor], i: int, sigma: float, sigma_eff: float) -> Optional[torch.Tensor]:
    """``Q = (sigma - sigma_eff)^2 V_i``: what one fresh model error injects into a step of that length."""
    if table is None:
        return None
    return table[i] * (sigma - sigma_eff) ** 2


def weighted_q(
    table: Optional[torch.Tensor], steps: List[int], weights: List[float], sig: List[float]
) -> Optional[torch.Tensor]:
    """``Q = sum_j (w_j sigma_j)^2 V_j`` over the outputs of steps ``steps`` (quadrature form)."""
    if table is None:
        return None
    q = torch.zeros_like(table[0])
    for j, w in zip(steps, weights):
        q = q + (w * sig[j]) ** 2 * table[j]
    return q


__all__ = ["setup", "check_form", "correct", "scale_noise", "resolve_flow", "first_order_q", "weighted_q"]
