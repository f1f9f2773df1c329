"""Linear multistep (LMS) sampler with the Q-Drift correction."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from tqdm.auto import trange

from .._utils import to_d
from ..correction import injected_variance
from ._common import check_form, setup
from ..validation import check_knobs, flag_arg

__all__ = ["sample_lms_qdrift", "lms_coefficient"]


def lms_coefficient(order: int, t: List[float], i: int, j: int) -> float:
    """Weight of ``d_{i-j}`` in an order-``order`` Adams-Bashforth step from ``t[i]`` to ``t[i+1]``.

    It is the integral over the step of the Lagrange basis polynomial through ``t[i], ..., t[i-order+1]``
    that is 1 at ``t[i-j]`` (computed with scipy's adaptive quadrature, as k-diffusion does).
    """
    from scipy import integrate  # deferred: scipy costs ~0.4 s at `import qdrift`

    if order - 1 > i:
        raise ValueError(f"lms_coefficient: order {order} too high for step {i}")

    def basis(tau: float) -> float:
        value = 1.0
        for k in range(order):
            if k != j:
                value *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return value

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms_qdrift(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    V=None,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    order: int = 4,
    strength: float = 1.0,
    form: str = "first_order",
    method: Optional[str] = None,
    flow: Optional[bool] = None,
    final_denoise: bool = False,
) -> torch.Tensor:
    """Linear multistep in sigma (k-diffusion's ``sample_lms``) with Q-Drift.

    ``x_{i+1} = x_i + sum_j a_ij d_{i-j}``. Derivation with the common rule (:mod:`qdrift.correction`):
    the step's weights on the model outputs are the ``a_ij``, so it injects ``sum_j a_ij^2 V_{i-j}``
    (``form="quadrature"``, divided by ``|sigma_i^2 - sigma_{i+1}^2|`` as the authors do for DPM-Solver++).
    But each output is reused by ``order`` consecutive steps, and the weights a model error receives over
    those steps add up to its own step's length (the method is consistent), so the variance a *new* error
    injects is ``dsigma_i^2 V_i`` and the drift that cancels it is Euler's
    ``c_i = |dsigma_i| V_i / (2 sigma_i)`` (``form="first_order"``, the default; it measures closest to the
    full-precision marginal on the analytic Gaussian, see README).

    Args:
        model, x, sigmas, V, extra_args, callback, disable: as :func:`qdrift.sample_euler_qdrift`.
        order: multistep order (k-diffusion default 4).
        strength: multiplier on V.
        form: ``"first_order"`` or ``"quadrature"`` (method ``"paper"`` only).
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        final_denoise: on the step to sigma = 0 return the denoised output (a first-order step, as ComfyUI's
            ``sample_lms`` does since mid-2025) instead of k-diffusion's multistep step (the default).
        flow: as :func:`qdrift.sample_euler_qdrift`.

    Returns:
        The sample ``[B, C, ...]``.
    """
    method = check_form(form, method=method)
    final_denoise = flag_arg("sample_lms_qdrift", "final_denoise", final_denoise)
    check_knobs("sample_lms_qdrift", order=order, callback=callback)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        "sample_lms_qdrift", model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    sigmas_cpu = sigmas.detach().cpu().numpy()  # the coefficients from the schedule's own dtype, as k-diffusion
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if final_denoise and sig[i + 1] == 0:
            # ComfyUI's denoising step to sigma = 0: x = D = x - sigma_i d_i, an Euler step (the default terms).
            x, _ = plan.step(i, x, denoised, sig[i], 0.0, quadrature=form == "quadrature")
            continue
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x_base = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
        q = None
        if form == "quadrature" and plan.table is not None:
            # Weights a_ij on d_{i-j}: Q = sum_j a_ij^2 V_{i-j}.
            q = injected_variance(coeffs, [plan.table[i - j] for j in range(cur_order)])
        # x + sum_j a_ij d_{i-j}: each output is reused by `order` steps (the exact methods follow that).
        terms = [(i - j, float(j == 0), float(a)) for j, a in enumerate(coeffs)]
        direction = None
        if plan.exact and cur_order > 1:  # the drift scales the step's Euler part (see qdrift.plan.DriftPlan)
            h = sig[i + 1] - sig[i]
            direction = (x + h * d, [(i, 1.0, h)])
        x, _ = plan.step(
            i, x, x_base, sig[i], sig[i + 1], terms=terms, q=q, quadrature=form == "quadrature", direction=direction
        )
    return model.final(x.to(dtype))
