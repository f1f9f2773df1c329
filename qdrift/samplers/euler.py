"""Euler, Euler ancestral and Heun samplers with the Q-Drift correction.

Each reproduces the k-diffusion sampler of the same name exactly when ``V`` is None or all zero.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import trange

from .._utils import ancestral_step, to_d
from ..correction import injected_variance
from ._common import CORRECTIONS, check_flow_start, checked_noise, resolve_flow, scale_noise, setup
from ..validation import check_choice, check_knobs

__all__ = ["sample_euler_qdrift", "sample_euler_ancestral_qdrift", "sample_heun_qdrift"]


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, plan):
    """Karras et al. (2022) Algorithm 2, lines 4-6: raise the noise level to ``sigma_hat`` (stochastic churn)."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if s_churn > 0:
        # Drawn on every step while churn is on (also outside [s_tmin, s_tmax]), as k-diffusion does, so the
        # default noise stream, and so the result, is the same as k-diffusion's for the same seed.
        eps = noise_sampler(sigmas[i], sigma_hat) * s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
            plan.noise(s_noise * float(sigma_hat**2 - sigmas[i] ** 2) ** 0.5)
    return x, sigma_hat, gamma


def _check_flow_eta(name, sig, eta):
    """Refuses, before any model call, an ``eta`` whose flow step goes below t = 0: ``t_down`` (see
    :func:`qdrift._utils.get_ancestral_step_flow`) is negative once ``eta > t_i / (t_i - t_{i+1})``, and ComfyUI's
    ``sample_euler_ancestral_RF`` does not clamp it either."""
    for i in range(len(sig) - 1):
        t_down = ancestral_step(sig[i], sig[i + 1], eta, flow=True)[0]
        if t_down < 0:
            most = min(t / (t - t_next) for t, t_next in zip(sig[:-1], sig[1:]) if t_next > 0)
            raise ValueError(
                f"{name}: eta={eta!r} takes flow step {i} of {len(sig) - 1} (t={sig[i]:.6g} -> {sig[i + 1]:.6g}) past "
                f"t = 0 (t_down={t_down:.6g}); on a flow eta must be at most t_i / (t_i - t_{{i+1}}) on every step, "
                f"{most:.6g} for this schedule"
            )


@torch.no_grad()
def sample_euler_qdrift(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    V=None,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable] = None,
    strength: float = 1.0,
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """Euler steps (Karras et al. 2022, Algorithm 2) with Q-Drift (arXiv 2603.18095, Eq. 12).

    ``x_{i+1} = x_i + dsigma_i (1 + c_i) d_hat_i`` with ``c_i = |dsigma_i| V_i / (2 sigma_i)`` per channel,
    where ``dsigma_i = sigma_{i+1} - sigma_hat_i``. For a flow model wrapped by
    :class:`qdrift.adapters.FlowDenoiser` (sigma = t, to_d = velocity) this is the paper's flow-matching Euler.

    Args:
        model: denoiser ``D(x [B, C, ...], sigma [B], **extra_args) -> x0 [B, C, ...]``.
        x: initial noise already scaled by ``sigmas[0]``, ``[B, C, ...]``.
        sigmas: decreasing schedule ``[steps + 1]``, usually ending in 0.
        V: None, a :class:`qdrift.Calibration`, or ``Var(delta | d_hat)`` as ``[steps, C]`` or ``[steps]``.
        extra_args: keyword arguments for ``model``.
        callback: called each step with k-diffusion's keys ``x, i, sigma, sigma_hat, denoised``.
        disable: disables the progress bar.
        s_churn, s_tmin, s_tmax, s_noise: Karras' stochastic churn (0 churn = deterministic).
        noise_sampler: ``(sigma, sigma_next) -> noise`` for the churn; default ``torch.randn_like(x)``.
        strength: multiplier on V (1 = the paper's correction).
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        flow: the model is a rectified flow (sigma = t): v2's drift is then along the score (see
            :class:`qdrift.plan.DriftPlan`). None takes the model's ``is_flow`` (False: VE).

    With churn the step starts at ``sigma_hat`` (up to ``1.41 sigma_i``) but uses ``V_i``, the value
    calibrated at ``sigma_i``.

    Returns:
        The sample ``[B, C, ...]`` in x's dtype.
    """
    check_knobs("sample_euler_qdrift", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                noise_sampler=noise_sampler, callback=callback)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        "sample_euler_qdrift", model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    noise_sampler = checked_noise(noise_sampler, x, "sample_euler_qdrift")
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, gamma = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, plan)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        # Euler step, its increment scaled by (1 + c_i) (paper Eq. 12; the step to sigma = 0 included).
        s_hat = sig[i] * (float(gamma) + 1)
        x, _ = plan.step(i, x, x + d * dt, s_hat, sig[i + 1])
    return model.final(x.to(dtype))


@torch.no_grad()
def sample_euler_ancestral_qdrift(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    V=None,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable] = None,
    strength: float = 1.0,
    correction: str = "drift",
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """Ancestral Euler with Q-Drift (paper Sec. 3.2): Euler to ``sigma_down`` with ``c_i``, then fresh noise.

    On a rectified flow (``flow``; sigma = t, ``x = (1 - t) x0 + t eps``) the step follows
    :func:`qdrift._utils.get_ancestral_step_flow` (derivation there; ComfyUI's ``sample_euler_ancestral_RF``):
    Euler to ``t_down``, scale by ``(1 - t_{i+1}) / (1 - t_down)``, then noise of std ``sigma_up``. The drift
    ``c_i`` acts on the Euler part with ``sigma = t`` (the paper's flow heuristic, as for flow Euler); the
    ``"noise"`` budget is the fresh noise expressed before the scaling. The flow schedule must start at t <= 1,
    and ``eta`` must not take a step past t = 0 (``eta <= t_i / (t_i - t_{i+1})`` on every step; ComfyUI does not
    clamp it either): both are refused at entry.

    ``correction="drift"`` (the paper): ``c_i = |sigma_down - sigma_i| V_i / (2 sigma_i)``, ancestral noise
    unchanged. ``correction="noise"``: the ancestral noise variance ``(s_noise sigma_up)^2`` is lowered by the
    variance quantization injects, ``(sigma_down - sigma_i)^2 V_i``, per channel; what the noise budget
    cannot absorb (always at the final step, where no noise is added) is corrected by drift.

    Args:
        model, x, sigmas, V, extra_args, callback, disable: as :func:`sample_euler_qdrift`.
        eta: ancestral noise amount (0 = deterministic Euler).
        s_noise: multiplier on the ancestral noise.
        noise_sampler: ``(sigma, sigma_next) -> standard normal noise``; default ``torch.randn_like(x)``.
        strength: multiplier on V.
        correction: ``"drift"`` or ``"noise"``.
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        flow: the state form (the noise formulas, and v2's drift along the score on a flow): None takes the
            model's ``is_flow`` (False: VE).

    Returns:
        The sample ``[B, C, ...]``.
    """
    check_choice("correction", correction, CORRECTIONS)
    flow = resolve_flow(model, flow, "sample_euler_ancestral_qdrift")
    check_knobs("sample_euler_ancestral_qdrift", eta=eta, s_noise=s_noise,
                noise_sampler=noise_sampler, callback=callback)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        "sample_euler_ancestral_qdrift", model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    check_flow_start("sample_euler_ancestral_qdrift", sig, flow)
    if flow:
        _check_flow_eta("sample_euler_ancestral_qdrift", sig, eta)
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    noise_sampler = checked_noise(noise_sampler, x, "sample_euler_ancestral_qdrift")
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up, scale = ancestral_step(sigmas[i], sigmas[i + 1], eta, flow)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = to_d(x, sigmas[i], denoised)
        # Euler step to sigma_down, increment scaled by (1 + c_i); the ancestral noise follows.
        # (the flow form rescales after the Euler part: a no-op factor 1.0 in the VE form)
        s_down, s_up, s_scale = ancestral_step(sig[i], sig[i + 1], eta, flow)
        budget = s_noise * s_up / s_scale if sig[i + 1] > 0 else 0.0
        x, factor = plan.step(
            i, x, x + d * (sigma_down - sigmas[i]), sig[i], s_down, noise_std=budget, correction=correction
        )
        if sigmas[i + 1] > 0:
            x = scale * x + scale_noise(noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up, factor)
            plan.rescale(s_scale)
    return model.final(x.to(dtype))


@torch.no_grad()
def sample_heun_qdrift(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    V=None,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: Optional[Callable] = None,
    strength: float = 1.0,
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """Heun steps (Karras et al. 2022, Algorithm 2) with a Q-Drift correction derived by the same rule.

    Derivation. A Heun step ``x + dt (d_1 + d_2) / 2`` weights each of its two model outputs by ``dt / 2``.
    With independent quantization errors of variance ``V_i`` (at ``sigma_i``) and ``V_{i+1}`` (at
    ``sigma_{i+1}``) it injects ``Q = (dt / 2)^2 (V_i + V_{i+1})`` (the error's effect through ``x_2`` is of
    higher order). The increment is ``dt d`` to first order, so the paired drift that cancels ``Q`` is the
    ``(1 + c)`` rescaling with ``c = Q / (2 sigma_hat |dt|)`` (see :mod:`qdrift.correction`): half the Euler
    coefficient when ``V`` is flat. The final step to sigma = 0 is an Euler step, as in k-diffusion, with the
    Euler coefficient. If the two errors of a step were fully correlated (a smooth quantization error),
    ``Q`` would be up to twice as large; the analytic test plants independent errors. ``V_{i+1}`` is the next
    step's row of the table; on the last step of a schedule that does not end in 0 there is none and
    ``V_i`` stands in for it. With churn, ``V_i`` (calibrated at ``sigma_i``) is used from ``sigma_hat``.

    Args:
        as :func:`sample_euler_qdrift`.

    Returns:
        The sample ``[B, C, ...]``.
    """
    check_knobs("sample_heun_qdrift", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                noise_sampler=noise_sampler, callback=callback)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        "sample_heun_qdrift", model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    noise_sampler = checked_noise(noise_sampler, x, "sample_heun_qdrift")
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat, gamma = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, plan)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        s_hat = sig[i] * (float(gamma) + 1)
        if sigmas[i + 1] == 0:
            # Euler method for the last step, as in k-diffusion, with the Euler coefficient.
            x, _ = plan.step(i, x, x + d * dt, s_hat, 0.0)
        else:
            # Heun's method: both outputs weighted dt / 2, so Q = (dt/2)^2 (V_i + V_{i+1}).
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            table = plan.table
            v_next = table[min(i + 1, len(table) - 1)] if table is not None else None  # V at sigma_{i+1}
            # one weight on the sum V_i + V_{i+1}: the same Q, computed as the paper's rule always was
            q = None if table is None else injected_variance([(sig[i + 1] - s_hat) / 2], [table[i] + v_next])
            # Both outputs carry an error; the second's state carries the first's (exact methods).
            h = sig[i + 1] - s_hat
            plan.evaluate(i, s_hat)
            plan.evaluate(i + 0.5, sig[i + 1], terms=[(i, 1.0, h)])
            terms = [(i, 1.0, h / 2), (i + 0.5, 0.0, h / 2)]
            direction = (x_2, [(i, 1.0, h)]) if plan.exact else None  # the drift scales the Euler predictor
            x, _ = plan.step(i, x, x + d_prime * dt, s_hat, sig[i + 1], terms=terms, q=q, direction=direction)
    return model.final(x.to(dtype))
