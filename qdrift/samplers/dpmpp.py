"""DPM-Solver++ samplers (2M, 2M SDE, 3M SDE) with the Q-Drift correction.

Each step is written once as a function of the denoised outputs (:func:`_step_2m`, ...). Because a step is
linear in those outputs, its weights ``w_j`` on them, which the quadrature form needs, are obtained by
evaluating the same function on unit outputs: the correction can never drift apart from the update.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from tqdm.auto import trange

from .._utils import BrownianTreeNoiseSampler, half_log_snr, signal_scale
from ..correction import quadrature_variance
from ..validation import check_knobs
from ._common import check_flow_start, check_form, checked_noise, resolve_flow, scale_noise, setup

__all__ = ["sample_dpmpp_2m_qdrift", "sample_dpmpp_2m_sde_qdrift", "sample_dpmpp_3m_sde_qdrift"]

_FORM_DOC = """The correction (Q-Drift, arXiv 2603.18095, App. B, Eq. 44-45). With ``form="first_order"`` (the
    default) the step's whole increment ``x_base - x`` is scaled by ``(1 + c_i)`` with Euler's coefficient
    ``c_i = |sigma_i - sigma_eff| V_i / (2 sigma_i)``. With ``form="quadrature"`` (the authors' code) the
    step's variance ``Var(dy) = sum_j (w_j sigma_j)^2 V_j`` over its weights ``w_j`` on the denoised outputs
    gives ``c_i = Var(dy) / |sigma_i^2 - sigma_eff^2|``, the same increment rescaled. Measured on the analytic
    Gaussian (README, ``benchmarks/analytic_gaussian.py``) the quadrature form over-corrects: a multistep
    method reuses each output in the next step with a weight of opposite sign, so the errors' net weights
    telescope to one step length and the fresh variance per step is Euler's ``dsigma^2 V`` -- which the
    first-order form matches, restoring the full-precision marginal closely."""


def _unit_weights(step: Callable, n: int, *coeffs) -> List[float]:
    """Weights of a step that is linear in its ``n`` denoised outputs: ``step(0, e_k)`` for unit ``e_k``."""
    zero = torch.zeros((), dtype=torch.float64)
    units = torch.eye(n, dtype=torch.float64)
    return [float(step(zero, *units[k], *coeffs)) for k in range(n)]


def _terms(step: Callable, n: int, sig: List[float], i: int, *coeffs):
    """A step ``a x + sum_k w_k D_{i-k}`` (linear in x and its ``n`` outputs) as the plan's terms
    ``(id, A, B)`` of ``sum_j A_j x_j + sum_j B_j d_j``, with ``D_j = x_j - sigma_j d_j``."""
    one = torch.ones((), dtype=torch.float64)
    a = float(step(one, *torch.zeros(n, dtype=torch.float64), *coeffs))
    w = _unit_weights(step, n, *coeffs)
    terms = [(i - k, wk, -wk * sig[i - k]) for k, wk in enumerate(w)]
    terms[0] = (i, a + w[0], -w[0] * sig[i])
    return w, terms


def _log_steps(sig: List[float], i: int, flow: bool = False) -> torch.Tensor:
    """``h = lambda_{i+1} - lambda_i`` as a float64 CPU tensor (inf for the step to sigma = 0): VE
    ``log(sigma_i / sigma_{i+1})``; flow :func:`qdrift._utils.half_log_snr` differences."""
    if sig[i + 1] == 0:
        return torch.tensor(math.inf, dtype=torch.float64)
    if flow:
        return torch.tensor(half_log_snr(sig[i + 1], True) - half_log_snr(sig[i], True), dtype=torch.float64)
    return torch.tensor(math.log(sig[i] / sig[i + 1]), dtype=torch.float64)


def _step_2m(x, denoised, old_denoised, ratio, h, r):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in k-diffusion's form; ``old_denoised=None`` is first order.

    ``ratio = sigma_{i+1} / sigma_i``, ``h = log(sigma_i / sigma_{i+1})``, ``r = h_{i-1} / h``.
    """
    if old_denoised is None:
        return ratio * x - (-h).expm1() * denoised
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - (-h).expm1() * denoised_d


@torch.no_grad()
def sample_dpmpp_2m_qdrift(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    V=None,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable] = None,
    disable: Optional[bool] = None,
    *,
    strength: float = 1.0,
    form: str = "first_order",
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) with Q-Drift.

    {form_doc}

    Args:
        model, x, sigmas, V, extra_args, callback, disable: as :func:`qdrift.sample_euler_qdrift`.
        strength: multiplier on V.
        form: ``"first_order"`` or ``"quadrature"`` (method ``"paper"`` only).
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        flow: the model is a rectified flow (sigma = t): v2's drift is then along the score (see
            :class:`qdrift.plan.DriftPlan`). None takes the model's ``is_flow`` (False: VE).

    Returns:
        The sample ``[B, C, ...]``.
    """
    method = check_form(form, method=method)
    check_knobs("sample_dpmpp_2m_qdrift", callback=callback)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        "sample_dpmpp_2m_qdrift", model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        # First order on the first step and on the step to sigma = 0, as in k-diffusion; also after a step of
        # (nearly) zero length, where the 2M extrapolation's 1 / (2 r) overflows (k-diffusion returns inf there).
        first = old_denoised is None or sigmas[i + 1] == 0 or _negligible_previous_step(sig, i)
        r = None if first else (t - t_fn(sigmas[i - 1])) / h
        x_base = _step_2m(x, denoised, None if first else old_denoised, sigma_fn(t_next) / sigma_fn(t), h, r)
        q = _q_2m(plan.table, form, sig, i, first) if form == "quadrature" else None
        terms = _terms_2m(sig, i, first)[1] if plan.exact else None
        direction = None
        if plan.exact and not first:  # the drift scales the step's first-order part (see qdrift.plan.DriftPlan)
            x_first = _step_2m(x, denoised, None, sigma_fn(t_next) / sigma_fn(t), h, None)
            direction = (x_first, _terms_2m(sig, i, True)[1])
        x, _ = plan.step(
            i, x, x_base, sig[i], sig[i + 1], terms=terms, q=q, quadrature=form == "quadrature", direction=direction
        )
        old_denoised = denoised
    return model.final(x.to(dtype))


def _terms_2m(sig, i, first):
    """A 2M step's weights on ``D_i`` (and ``D_{i-1}``), and its terms for the plan."""
    h = _log_steps(sig, i)
    ratio = sig[i + 1] / sig[i]
    if first:
        return _terms(lambda x, a: _step_2m(x, a, None, ratio, h, None), 1, sig, i)
    r = _log_steps(sig, i - 1) / h
    return _terms(lambda x, a, b: _step_2m(x, a, b, ratio, h, r), 2, sig, i)


def _quadrature(table, steps, weights, sig):
    """The authors' quadrature ``Q`` over the outputs of ``steps`` (:func:`qdrift.correction.quadrature_variance`)."""
    if table is None:
        return None
    return quadrature_variance(weights, [sig[j] for j in steps], [table[j] for j in steps])


def _q_2m(table, form, sig, i, first):
    """Quantization variance one 2M step injects in the quadrature form (see the sampler's docstring)."""
    w = _terms_2m(sig, i, first)[0]
    return _quadrature(table, [i, i - 1][: len(w)], w, sig)


sample_dpmpp_2m_qdrift.__doc__ = sample_dpmpp_2m_qdrift.__doc__.format(form_doc=_FORM_DOC)


def _step_2m_sde(x, denoised, old_denoised, ratio, h, eta, r, solver_type, alpha=1.0):
    """The deterministic part of a DPM-Solver++(2M) SDE step (k-diffusion's form, data prediction).

    ``ratio = sigma_{i+1} / sigma_i``, ``h = lambda_{i+1} - lambda_i`` (:func:`qdrift._utils.half_log_snr`),
    ``r = h_{i-1} / h``, ``alpha = alpha_{i+1}`` the data's scale in the state (1.0 in the VE form, where this is
    k-diffusion's expression bit for bit; ``1 - t_{i+1}`` for a flow, see :func:`sample_dpmpp_2m_sde_qdrift`).
    """
    eta_h = eta * h
    x = ratio * (-eta_h).exp() * x + alpha * (-h - eta_h).expm1().neg() * denoised
    if old_denoised is not None:
        if solver_type == "heun":
            x = x + alpha * ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
        else:
            x = x + alpha * 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
    return x


def _sde_setup(x, sigmas, noise_sampler):
    """Default Brownian-tree noise over the schedule's positive range, as k-diffusion does."""
    if noise_sampler is not None:
        return noise_sampler
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max)


def _denoising_step(x, denoised, plan, form, sig, i):
    """The SDE solvers' last step, to sigma = 0: ``x = D`` (first order, as in k-diffusion), corrected."""
    q = _quadrature(plan.table, [i], [1.0], sig) if form == "quadrature" else None
    return plan.step(i, x, denoised, sig[i], 0.0, q=q, quadrature=form == "quadrature")[0]


def _sde_levels(sig, i, eta, s_noise, flow=False):
    """Host-side ``(h, sigma_eff, noise_std)`` of an SDE step: its deterministic part reaches
    ``sigma_eff = sigma_{i+1} exp(-eta h)``; fresh noise of std ``sigma_{i+1} sqrt(1 - exp(-2 eta h)) s_noise``
    (both state forms; only ``h`` differs)."""
    h = _log_steps(sig, i, flow)
    sigma_eff = sig[i + 1] * math.exp(-eta * float(h))
    return h, sigma_eff, sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * float(h))) * s_noise


_FLOW_DOC = """On a rectified flow (``flow``; sigma = t, ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = 1 - t``,
    ``sigma_t = t``) the DPM-Solver++ SDE step is the same exponential integrator in ``lambda = log(alpha /
    sigma)`` (Lu et al. 2022; ComfyUI computes both forms this way):
    ``x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-(1 + eta) h}) D_i + ...
    + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z`` with ``h = lambda_{i+1} - lambda_i``. In the VE form
    ``alpha = 1`` and ``lambda = -log sigma`` (k-diffusion's expressions, kept bit for bit); for a flow
    ``lambda = log((1 - t) / t)`` and every denoised term carries ``alpha_{i+1} = 1 - t_{i+1}``. The noise
    the x term keeps is ``(t_{i+1} / t_i) e^{-eta h} t_i = t_{i+1} e^{-eta h}``, so ``sigma_eff`` and the
    fresh noise std keep their formulas in ``t`` with the flow's ``h``; the correction is applied as for the
    VE form with sigma = t (the paper's flow heuristic). The schedule must start below t = 1."""


@torch.no_grad()
def sample_dpmpp_2m_sde_qdrift(
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
    solver_type: str = "midpoint",
    strength: float = 1.0,
    form: str = "first_order",
    correction: Optional[str] = None,
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE with Q-Drift.

    The deterministic part of a step takes the sample from ``sigma_i`` to
    ``sigma_eff = sigma_{{i+1}} exp(-eta h)`` (its coefficient on x is ``sigma_eff / sigma_i``); fresh noise
    of std ``sigma_{{i+1}} sqrt(1 - exp(-2 eta h)) s_noise`` follows. ``correction="drift"`` scales the
    deterministic increment by ``(1 + c_i)`` with ``sigma_eff`` in place of ``sigma_{{i+1}}``;
    ``correction="noise"`` lowers the fresh noise's variance by the step's quantization variance instead
    (leftover, and the final denoising step, by drift). The default (None) is ``"noise"`` for the error-model
    methods (``v2``, ``exact``, ``correlated``) and ``"drift"`` for ``paper`` and ``matched``: see
    :func:`sde_correction`.

    {flow_doc}

    {form_doc}

    Args:
        model, x, sigmas, V, extra_args, callback, disable: as :func:`qdrift.sample_euler_qdrift`.
        eta: SDE noise amount (0 gives an ODE solver).
        s_noise: multiplier on the injected noise.
        noise_sampler: ``(sigma, sigma_next) -> standard normal noise``; default a Brownian tree.
        solver_type: ``"midpoint"`` or ``"heun"``.
        strength: multiplier on V.
        form: ``"first_order"`` or ``"quadrature"`` (method ``"paper"`` only).
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        correction: ``"drift"``, ``"noise"`` or None (:func:`sde_correction`).
        flow: the state form (the noise formulas, and v2's drift along the score on a flow): None takes the
            model's ``is_flow`` (False: VE).

    Returns:
        The sample ``[B, C, ...]``.
    """
    name = "sample_dpmpp_2m_sde_qdrift"
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"{name}: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    method = check_form(form, correction, method)
    check_knobs(name, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler, callback=callback)
    flow = resolve_flow(model, flow, name)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        name, model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    correction = sde_correction(correction, plan)
    check_flow_start(name, sig, flow, log_snr=True)
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    noise_sampler = checked_noise(_sde_setup(x, sigmas, noise_sampler), x, name)
    old_denoised, h_last, h_last_cpu = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = _denoising_step(x, denoised, plan, form, sig, i)
        else:
            t, s = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
            h = s - t
            h_cpu, sigma_eff, noise_std = _sde_levels(sig, i, eta, s_noise, flow)
            # First order after a step of (nearly) zero length, where 1 / r overflows (k-diffusion's too).
            prev = None if _negligible(h_last_cpu, h_cpu) else old_denoised
            r = None if prev is None else h_last / h
            alpha = signal_scale(sigmas[i + 1], flow)
            x_base = _step_2m_sde(x, denoised, prev, sigmas[i + 1] / sigmas[i], h, eta, r, solver_type, alpha)
            a_cpu = signal_scale(sig[i + 1], flow)
            q, terms = None, None
            if plan.table is not None and (form == "quadrature" or plan.exact):
                ratio = sig[i + 1] / sig[i]
                first = lambda x_, a: _step_2m_sde(x_, a, None, ratio, h_cpu, eta, None, solver_type, a_cpu)  # noqa: E731
                if prev is None:
                    w, terms = _terms(first, 1, sig, i)
                else:
                    r_cpu = h_last_cpu / h_cpu
                    step = lambda x_, a, b: _step_2m_sde(x_, a, b, ratio, h_cpu, eta, r_cpu, solver_type, a_cpu)  # noqa: E731
                    w, terms = _terms(step, 2, sig, i)
                if form == "quadrature":
                    q = _quadrature(plan.table, [i, i - 1][: len(w)], w, sig)
            direction = None
            if plan.exact and prev is not None:  # the drift scales the step's first-order part
                x_first = _step_2m_sde(x, denoised, None, sigmas[i + 1] / sigmas[i], h, eta, None, solver_type, alpha)
                direction = (x_first, _terms(first, 1, sig, i)[1])
            x, factor = plan.step(
                i, x, x_base, sig[i], sigma_eff, terms=terms, q=q, quadrature=form == "quadrature",
                noise_std=noise_std,
                correction=correction, direction=direction,
            )
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + scale_noise(noise * sigmas[i + 1] * (-2 * eta * h).expm1().neg().sqrt() * s_noise, factor)
            h_last, h_last_cpu = h, h_cpu
        old_denoised = denoised
    return model.final(x.to(dtype))


sample_dpmpp_2m_sde_qdrift.__doc__ = sample_dpmpp_2m_sde_qdrift.__doc__.format(form_doc=_FORM_DOC, flow_doc=_FLOW_DOC)


def _step_3m_sde(x, denoised, denoised_1, denoised_2, h, h_1, h_2, eta, ratio=None, alpha=1.0):
    """The deterministic part of a DPM-Solver++(3M) SDE step (k-diffusion's form).

    VE form (``ratio=None``, ``alpha=1.0``): k-diffusion's expressions bit for bit, the x coefficient
    ``exp(-(1 + eta) h)``. Flow form: the x coefficient ``ratio exp(-eta h)`` (``ratio = t_{i+1} / t_i``; equal to
    the former in the VE form only) and ``alpha = 1 - t_{i+1}`` on every denoised term.
    """
    h_eta = h * (eta + 1)
    decay = torch.exp(-h_eta) if ratio is None else ratio * (-h * eta).exp()
    x = decay * x + alpha * (-h_eta).expm1().neg() * denoised
    if h_2 is not None:
        r0 = h_1 / h
        r1 = h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        x = x + (alpha * phi_2) * d1 - (alpha * phi_3) * d2
    elif h_1 is not None:
        r = h_1 / h
        d = (denoised - denoised_1) / r
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        x = x + (alpha * phi_2) * d
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde_qdrift(
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
    form: str = "first_order",
    correction: Optional[str] = None,
    method: Optional[str] = None,
    flow: Optional[bool] = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE with Q-Drift.

    Derivation with the common rule: the deterministic part reaches ``sigma_eff = sigma_i exp(-(1 + eta) h)``
    and weights the outputs ``D_i, D_{{i-1}}, D_{{i-2}}`` by ``w_0, w_1, w_2`` (read off the step itself, see
    the module docstring); the fresh variance a step injects is ``(sigma_i - sigma_eff)^2 V_i`` in the
    first-order form, ``sum_j (w_j sigma_j)^2 V_j`` in the quadrature form. Noise handling as in
    :func:`sample_dpmpp_2m_sde_qdrift`.

    {flow_doc}

    {form_doc}

    Args:
        model, x, sigmas, V, extra_args, callback, disable: as :func:`qdrift.sample_euler_qdrift`.
        eta, s_noise, noise_sampler: as k-diffusion's ``sample_dpmpp_3m_sde``.
        strength: multiplier on V.
        form: ``"first_order"`` or ``"quadrature"`` (method ``"paper"`` only).
        method: the correction (:data:`qdrift.correction.METHODS`): ``"v2"`` (gain and bias removed, then
            the exact variance balance with cross-step error covariance), ``"correlated"``, ``"exact"``, or
            ``"paper"`` (the paper's first-order rule, as in qdrift 0.1). None (default): ``"v2"`` for a
            Calibration; ``"paper"`` for a tensor V, which carries only the variance.
        correction: ``"drift"``, ``"noise"`` or None (:func:`sde_correction`).
        flow: the state form (the noise formulas, and v2's drift along the score on a flow): None takes the
            model's ``is_flow`` (False: VE).

    Returns:
        The sample ``[B, C, ...]``.
    """
    name = "sample_dpmpp_3m_sde_qdrift"
    method = check_form(form, correction, method)
    check_knobs(name, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler, callback=callback)
    flow = resolve_flow(model, flow, name)
    plan, model, sigmas, extra_args, s_in, sig = setup(
        name, model, x, sigmas, V, extra_args, strength, method, flow=flow
    )
    correction = sde_correction(correction, plan)
    check_flow_start(name, sig, flow, log_snr=True)
    dtype = x.dtype  # k-diffusion's steps may promote half inputs; the result keeps x's dtype
    noise_sampler = checked_noise(_sde_setup(x, sigmas, noise_sampler), x, name)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    hc, hc_1, hc_2 = None, None, None  # the same log-steps on the host, for the weights
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = _denoising_step(x, denoised, plan, form, sig, i)
        else:
            t, s = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
            h = s - t
            hc, sigma_eff, noise_std = _sde_levels(sig, i, eta, s_noise, flow)
            # Lower order after a step of (nearly) zero length, where the extrapolation's 1 / r overflows.
            use_1 = hc_1 is not None and not _negligible(hc_1, hc)
            use_2 = use_1 and hc_2 is not None and not _negligible(hc_2, hc)
            ratio = sigmas[i + 1] / sigmas[i] if flow else None  # the flow's x coefficient (see _step_3m_sde)
            alpha = signal_scale(sigmas[i + 1], flow)
            x_base = _step_3m_sde(x, denoised, denoised_1, denoised_2, h, h_1 if use_1 else None,
                                  h_2 if use_2 else None, eta, ratio, alpha)
            q, terms = None, None
            if plan.table is not None and (form == "quadrature" or plan.exact):
                n = 1 + use_1 + use_2
                r_cpu = sig[i + 1] / sig[i] if flow else None
                hcs = (hc_1 if use_1 else None, hc_2 if use_2 else None)

                def step(x_, *ds):  # the step on its first len(ds) outputs (one: the first-order part)
                    pad = [None] * (3 - len(ds))
                    return _step_3m_sde(x_, *ds, *pad, hc, *hcs[: len(ds) - 1], *pad, eta, r_cpu,
                                        signal_scale(sig[i + 1], flow))

                w, terms = _terms(step, n, sig, i)
                if form == "quadrature":
                    q = _quadrature(plan.table, list(range(i, i - n, -1)), w, sig)
            direction = None
            if plan.exact and use_1:  # the drift scales the step's first-order part
                x_first = _step_3m_sde(x, denoised, None, None, h, None, None, eta, ratio, alpha)
                direction = (x_first, _terms(step, 1, sig, i)[1])
            x, factor = plan.step(
                i, x, x_base, sig[i], sigma_eff, terms=terms, q=q, quadrature=form == "quadrature",
                noise_std=noise_std,
                correction=correction, direction=direction,
            )
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + scale_noise(noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise, factor)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        hc_1, hc_2 = hc, hc_1
    return model.final(x.to(dtype))


sample_dpmpp_3m_sde_qdrift.__doc__ = sample_dpmpp_3m_sde_qdrift.__doc__.format(form_doc=_FORM_DOC, flow_doc=_FLOW_DOC)


def sde_correction(correction: Optional[str], plan) -> str:
    """The DPM++ SDE samplers' correction: as given, or by default ``"noise"`` for the error-model methods (the
    fresh noise the step adds is lowered first, the drift takes what it cannot) and ``"drift"`` for ``paper``
    (the paper's rule, bit for bit) and ``matched``.

    Why noise first. With ``eta = 1`` a DPM++ SDE step's deterministic part goes far below the next level
    (``sigma_eff = sigma_next exp(-h)``); the noise the step adds right after is the natural place for an error's
    variance. Until session 11 the drift scaled the step's whole increment, extrapolation included, and on large
    or correlated errors failed where noise first did not (analytic Gaussian, 20 steps, planted variance 0.4
    fresh: 2M SDE 40 vs 102 %, 3M SDE -24 vs 85 %). Since the drift scales the step's first-order part
    (:class:`qdrift.plan.DriftPlan`, "Direction of the drift") the two agree within a few points on 2M SDE and
    differ either way on 3M SDE (``docs/analytic_gaussian_*.md``, columns ``v2, drift`` and ``v2, noise``): the
    drift is better on a correlated error (20 steps, ``--v 0.1``: 99 vs 84 %), noise first on a large fresh
    one (``--v 0.4``: 86 vs 99 %); noise first stays the default. Euler a keeps the drift (the two are equal
    there, and its bounded drift already hands its remainder to the noise).
    """
    if correction is not None:
        return correction
    return "noise" if plan.exact else "drift"


def _negligible_previous_step(sig, i: int) -> bool:
    """Whether the step into level ``i`` is negligible against the next (``r = h_prev / h < 1e-6`` in log-sigma),
    from the host copy of the schedule (no device sync)."""
    if i == 0 or sig[i + 1] <= 0:
        return False
    return _negligible(math.log(sig[i - 1] / sig[i]), math.log(sig[i] / sig[i + 1]))


def _negligible(h_prev, h) -> bool:
    """Whether an earlier log-step ``h_prev`` (host float, or None) is negligible against the current ``h``
    (``< 1e-6`` of it): a multistep extrapolation divides by their ratio and would overflow."""
    return h_prev is not None and abs(float(h_prev)) < 1e-6 * abs(float(h))
