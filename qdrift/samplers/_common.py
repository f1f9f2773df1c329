"""What every qdrift sampler shares: entry checks, the checked model, and the run's correction plan."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..correction import scale_noise
from ..plan import DriftPlan
from ..validation import (
    FLOW_T_SLACK,
    CheckedModel,
    check_choice,
    check_extra_args,
    prepare_sigmas,
    validate_sampler_inputs,
)

FORMS = ("first_order", "quadrature")
CORRECTIONS = ("drift", "noise")


def setup(
    name: str, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, V, extra_args: Optional[dict], strength: float,
    method: Optional[str] = None, flow: Optional[bool] = None,
) -> Tuple[DriftPlan, Callable, torch.Tensor, Dict, torch.Tensor, List[float]]:
    """Validates inputs; returns ``(plan, model, sigmas, extra_args, s_in [B], sigmas as floats)``.

    ``plan`` (:class:`qdrift.plan.DriftPlan`) holds the run's correction. ``model`` is the checked model
    (:class:`qdrift.validation.CheckedModel`: the output is returned unchanged after checking its shape,
    type and finiteness, naming the step and sigma of a bad call), with the plan's output correction (gain
    and bias, method ``v2``) applied after the check. ``flow``: the model is a rectified flow (None: its
    ``is_flow``; see :func:`resolve_flow`); the exact methods then drift along the score. The schedule comes back
    widened to float32 if it was half precision and on x's device. The float copy of the schedule (made once, on
    the host) feeds the correction's scalar math so the loop makes no device round trips.
    """
    sigmas = prepare_sigmas(sigmas, x, name)
    validate_sampler_inputs(x, sigmas, name)
    check_extra_args(name, extra_args)
    plan = DriftPlan(V, sigmas, x, name, strength, method, flow=resolve_flow(model, flow, name))
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sig = sigmas.detach().double().cpu().tolist()
    return plan, plan.wrap(CheckedModel(model, name, sig)), sigmas, extra_args, s_in, sig


def check_form(form: str, correction: Optional[str] = None, method: Optional[str] = None) -> Optional[str]:
    """Checks the ``form``, ``correction`` and ``method`` options of a sampler; returns the method to use
    (``form="quadrature"`` is the paper's rule: with ``method=None`` it selects ``"paper"``)."""
    check_choice("form", form, FORMS)
    if form == "quadrature" and method is None:
        return "paper"
    if form == "quadrature" and method != "paper":
        raise ValueError(
            f"form='quadrature' is the authors' DPM-Solver++ rule within the paper's method: pass method='paper' "
            f"with it (got method={method!r})"
        )
    if correction is not None:
        check_choice("correction", correction, CORRECTIONS)
    return method


def checked_noise(noise_sampler: Optional[Callable], x: torch.Tensor, name: str) -> Callable:
    """The run's noise sampler (k-diffusion's default for x when None), its every draw checked:
    a floating-point tensor of x's shape on x's device (shape, dtype and device only: no reduction, and the
    draw is returned unchanged, so results stay bit for bit). A draw that merely broadcasts would give every
    sample the same noise; one of the wrong shape would fail inside the sampler's arithmetic."""
    from .._utils import default_noise_sampler

    draw = default_noise_sampler(x) if noise_sampler is None else noise_sampler

    def checked(sigma, sigma_next):
        noise = draw(sigma, sigma_next)
        if (not isinstance(noise, torch.Tensor) or noise.shape != x.shape or not noise.is_floating_point()
                or noise.device != x.device):
            got = (f"a {noise.dtype} tensor of shape {tuple(noise.shape)} on {noise.device}"
                   if isinstance(noise, torch.Tensor) else type(noise).__name__)
            raise ValueError(f"{name}: noise_sampler(sigma, sigma_next) must return a floating-point tensor of x's "
                             f"shape {tuple(x.shape)} on {x.device}, got {got}")
        return noise

    return checked


def resolve_flow(model, flow: Optional[bool], name: str) -> bool:
    """The state form a stochastic sampler injects noise for: ``flow`` when given, else the model's ``is_flow``
    (:class:`qdrift.adapters.FlowDenoiser` sets it). Hosts pass ``flow`` (ComfyUI: prediction type CONST)."""
    if flow is None:
        return bool(getattr(model, "is_flow", False))
    if not isinstance(flow, bool):
        raise ValueError(f"{name}: flow must be True, False or None (from the model), got {flow!r}")
    return flow


def check_flow_start(name: str, sig: List[float], flow: bool, log_snr: bool = False) -> None:
    """On a flow (sigma = t, ``x_t = (1 - t) x0 + t eps``) the schedule must start at t <= 1 (flow time lives in
    [0, 1]; :data:`qdrift.validation.FLOW_T_SLACK` of rounding allowed): above it the signal ``1 - t`` is negative
    and the ancestral step's scale divides by zero at ``t_down = 1``. A sampler working in half-log-SNR
    (``log_snr``) needs t < 1: log-SNR is -inf at t = 1 (ComfyUI offsets its first sigma with
    ``offset_first_sigma_for_snr``; the ComfyUI node does the same before calling)."""
    if flow and log_snr and sig[0] >= 1:
        raise ValueError(
            f"{name}: on a flow model the schedule must start below t = 1 (log-SNR is -inf there), got {sig[0]}; "
            "start at e.g. 1 - 1e-4"
        )
    if flow and sig[0] > 1 + FLOW_T_SLACK:
        raise ValueError(
            f"{name}: on a flow model the schedule must start at or below t = 1 (flow time lives in [0, 1]), got "
            f"{sig[0]}; pass a flow schedule (qdrift.get_sigmas_flow) or flow=False for a VE schedule"
        )


__all__ = ["setup", "check_form", "scale_noise", "checked_noise", "resolve_flow", "check_flow_start"]
