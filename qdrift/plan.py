"""The per-run correction plan: which error model a sampler run corrects, and each step's coefficient.

:class:`DriftPlan` is built once per sampler call (``qdrift.samplers._common.setup``). For the paper's method
it applies :mod:`qdrift.correction`'s first-order rule; for the exact methods (Q-Drift v2) it runs a
per-channel linear-Gaussian surrogate of the whole run alongside the sample and solves each step's variance
balance with :func:`qdrift.correction.balance_coefficient`. It also removes the model output's gain and bias
(method ``v2``).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import torch

from .correction import (
    DEFAULT_METHOD,
    METHODS,
    apply_drift,
    balance_coefficient,
    between_evaluations,
    channel_view,
    compute_dtype,
    drift_coefficient,
    lower_noise,
    quadrature_coefficient,
    band_shares,
    filter_bands,
    scale_increment,
    scale_increment_bands,
)
from .validation import MAX_DRIFT, DriftClippedWarning, check_choice, clip_drift, resolve_v

__all__ = ["DriftPlan", "recording"]

_RECORDING = threading.local()


@contextmanager
def recording():
    """Collects the :class:`DriftPlan` of every sampler run started in this thread inside the ``with`` block.

    Each plan's :attr:`DriftPlan.trace` then says what the run's correction did per step::

        with qdrift.plan.recording() as plans:
            qdrift.sample_euler_qdrift(model, x, sigmas, cal)
        plans[0].trace[i]["c"]
    """
    plans: list = []
    stack = getattr(_RECORDING, "stack", None)
    if stack is None:
        stack = _RECORDING.stack = []
    stack.append(plans)
    try:
        yield plans
    finally:
        stack.remove(plans)


@contextmanager
def undrifted():
    """Sampler runs started in this thread inside the ``with`` block run the exact methods' surrogate and
    output correction but take every step with ``c = 0`` (no drift): the trace then predicts the undrifted
    run, which :func:`qdrift.calib.size_drift` compares with what the quantized model really accumulates."""
    before = getattr(_RECORDING, "undrifted", False)
    _RECORDING.undrifted = True
    try:
        yield
    finally:
        _RECORDING.undrifted = before

_PARTS = {  # method -> (exact balance, cross-step correlation, gain and bias)
    "paper": (False, False, False),
    "exact": (True, False, False),
    "correlated": (True, True, False),
    "v2": (True, True, True),
    "matched": (False, False, False),  # the gain option is the matching pass's, see :meth:`DriftPlan.__init__`
}


class _Sources:
    """Independent-ish Gaussian sources of a run's surrogate, per channel, and their covariance ``[N, N, C]``.

    Kinds: the initial deviation, fresh noise the sampler injects, and model errors (correlated among
    themselves as calibrated). Vectors over sources are ``[N, C]``; the covariance grows as sources appear.
    """

    def __init__(self, channels: int):
        self.channels = channels
        self.cov = torch.zeros(0, 0, channels, dtype=torch.float64)

    def add(self, var: torch.Tensor, cov_with: Optional[torch.Tensor] = None) -> int:
        """A new source of variance ``var`` ``[C]`` and covariance ``cov_with`` ``[N, C]`` with the others."""
        n = self.cov.shape[0]
        new = torch.zeros(n + 1, n + 1, self.channels, dtype=torch.float64)
        new[:n, :n] = self.cov
        if cov_with is not None:
            new[n, :n] = cov_with
            new[:n, n] = cov_with
        new[n, n] = var
        self.cov = new
        return n

    def pad(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` ``[n, C]`` extended with zeros to all sources ``[N, C]``."""
        return torch.cat([g, g.new_zeros(self.cov.shape[0] - g.shape[0], self.channels)])

    def unit(self, index: int, scale) -> torch.Tensor:
        g = torch.zeros(self.cov.shape[0], self.channels, dtype=torch.float64)
        g[index] = scale
        return g

    def covar(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``Cov(a, b)`` per channel ``[C]`` of two vectors over sources."""
        a, b = self.pad(a), self.pad(b)
        return torch.einsum("ac,bc,abc->c", a, b, self.cov)


class DriftPlan:
    """How one sampler run corrects its steps: the error model and the step rule (one object per run).

    Built by the samplers' ``setup`` from ``V`` and ``method``; every sampler step calls :meth:`step` once;
    :meth:`wrap` removes the model output's gain and bias (method ``v2``). For ``method="paper"`` it is the
    paper's rule, bit for bit as before.

    The exact methods (Q-Drift v2). The paper keeps each step's marginal by cancelling, to first order, the
    variance a fresh error of variance ``V`` injects, ``dsigma^2 V``. A real sampler differs from that in
    ways that matter at practical step counts: steps are long (the first-order rule under-corrects), a
    multistep method reuses each model output in later steps with weights of opposite sign (the injected
    variance telescopes), ancestral and SDE solvers inject noise and take deterministic steps to
    ``sigma_eff < sigma_next``, the last step goes to 0, and a quantized network's errors at successive
    steps of one trajectory are strongly correlated (they accumulate like ``(sum_j h_j delta_j)^2``).

    So the plan runs, alongside the sample, a per-channel linear-Gaussian surrogate of the whole run and
    chooses each ``c`` so that the surrogate's corrected state has exactly the full-precision state's
    variance. In the surrogate the full-precision denoiser is linear around its mean,
    ``D(x) - E D = kappa (x - E x)`` with ``kappa = 1 - sigma Cov(x, d) / Var(x)`` (exact for Gaussian
    data, VE or flow), so ``d_j = (1 - kappa_j) y_j / sigma_j`` for a state deviation ``y_j``; the quantized
    model adds the residual error ``e_j`` of the evaluation (variance ``V_j``; covariance
    ``rho(sigma_a, sigma_b) sqrt(V_a V_b)`` between two evaluations of a trajectory, from the calibration's
    cross-step statistics, or 0 with method ``exact``; 1 for the same output reused). A step is linear in
    the states and directions of its evaluations, ``x_next = sum_j A_j x_j + sum_j B_j d_j`` (Euler:
    ``x + h d_i``; LMS: ``x + sum_j a_j d_{i-j}``; 2M: ``ratio x + sum_j w_j D_j`` with
    ``D_j = x_j - sigma_j d_j``), which the sampler passes as ``terms``. Writing the corrected state as the
    full-precision one plus a difference, ``y + D``, each is a vector over the run's Gaussian sources
    (initial deviation, injected noise, errors), and the corrected step is ``D_next = D_base + c Inc`` with
    ``D_base`` the difference after the uncorrected step and ``Inc`` the corrected chain's increment. The
    balance ``Var(y_next + D_next) = Var(y_next)`` is

        [Var(D_base) + 2 Cov(y_next, D_base)] + 2 c [Cov(D_base + y_next, Inc)] + c^2 Var(Inc) = 0,

    solved exactly (:func:`balance_coefficient`), within ``|c| <= 1`` and ``c <= sigma_eff / (sigma -
    sigma_eff)``: the scaled step goes to the level ``sigma + (1 + c)(sigma_eff - sigma)``, and past 0 it
    would put noise back instead of removing it (``c sigma`` of it on a step to 0: the speckle of a few long
    ancestral steps). In a run that injects noise a first-order step to 0 takes no drift of either sign: ``c < 0``
    there would leave ``|c|`` of the noise the model sees, the sampler's fresh noise among it, in the final sample,
    white noise that the one-unit-per-channel surrogate counts as variance like the error it replaces, but that
    lands where the sample's spectrum is weakest (on the bench DiT, w3a4 DPM++ 3M SDE, the last step's ``c = -0.81``
    took the top band from 2.9x FP's to 3.9x; a deterministic run keeps its hold-back, which on the DiT's flow Euler
    backs off an overshooting step before it). What a bounded step cannot absorb is taken from the fresh noise the
    sampler adds right after it, if any (its variance lowered by what is left, as ``correction="noise"`` does;
    callers that cannot scale their noise pass ``lower_noise=False``); the rest stays in ``D`` and the next step's
    balance takes it up.
    For a fresh error, one Euler step of pure noise this is ``c = |h| V / (2 sigma_eff)`` to first order;
    the paper's ``|h| V / (2 sigma)`` (Eq. 12) is its short-step limit.

    Direction of the drift. The drift that keeps the marginals in Karras' generalized SDE is along the score,
    ``D(x_i) - x_i``: the step's first-order (Euler / DDIM) part from its current evaluation. For a one-step
    first-order sampler that is the whole increment. A multistep or second-order step (LMS, DPM++ 2M and the
    SDE solvers, Heun) adds history or corrector terms whose weights amplify the model errors they carry (a 3M
    SDE step extrapolates three outputs), so scaling its whole increment also scales those errors, and on long
    or correlated errors the balance then often has no root (40 % of a large fresh error removed by 2M SDE's
    drift, 37 % of a correlated one by 3M SDE's noise first). Such samplers pass ``direction``, their first-order
    result and its terms: per unit the drift scales that increment where it reaches the balance, else whichever
    of it and the whole increment comes closer. Without a root the drift takes the closest ``c``, and what is
    left goes to the fresh noise that follows, as for a bounded drift. On a rectified flow (``flow``) the step's
    first-order part ``h d`` with ``d = eps_hat - x0_hat`` removes noise *and* grows the signal; the score
    direction is ``h eps_hat`` (the scaled VE coordinates ``x / (1 - t)``, :meth:`_score_direction`), and it
    takes the first-order part's place (every unit of a sampler that passes no direction). Along the whole flow
    step a band whose variance is stationary (its signal grows as fast as its noise shrinks) can shed the
    error's excess only with ``c = -1``: frozen at its noise level, which on the bench DiT was visible grain.

    Args:
        V: a :class:`qdrift.Calibration` or a tensor table (see :func:`resolve_v`).
        sigmas: the schedule ``[steps + 1]``.
        x: the initial sample (channels, device, dtype).
        sampler: the sampler's name, for messages.
        strength: multiplier on the correction (V, gain and bias).
        method: one of :data:`METHODS`, or None: :data:`DEFAULT_METHOD` for a Calibration, ``"paper"`` for
            a tensor V (it carries only the variance).
        spatial: x's axes after the channel are a spatial grid (False for token sequences such as packed FLUX
            latents: a calibration's frequency bands are then not used, nor for samples without axes after the
            channel).
        lower_noise: the sampler scales the fresh noise it adds after a step by :meth:`step`'s factor (False for
            a caller that cannot): the exact methods then let the noise take up what a bounded drift leaves (see
            :meth:`_solve`). The diffusers Euler ancestral scheduler can: it scales the noise it drew.
        flow: the model is a rectified flow (sigma = t): the exact methods drift along the score (above).

    Measured accumulation. A calibration sized by :func:`qdrift.calib.size_drift` carries a per-channel
    factor (:attr:`qdrift.Calibration.drift_scale`) on the residual error's variance ``V`` of method ``v2``:
    the ratio of the mean square difference the undrifted, output-corrected quantized run really accumulates
    from the full-precision run to the surrogate's prediction of it. The surrogate's accumulated difference is
    linear in ``V``, so the scaled surrogate predicts the measured accumulation and each step's drift is sized
    to it (a network that removes an error-made deviation faster than the surrogate's ``kappa`` gets less drift).
    A sizing that also ran the plain quantized sampler carries the measured share of the output correction
    (:attr:`qdrift.Calibration.output_scale`): the gain, state term and bias are scaled by it (times ``strength``).

    Cost. The surrogate never looks at ``x``: it depends on the calibration, the schedule and the sampler's
    calls. Each solved step is kept with the calibration (until the calibration changes) under a digest of the
    run's history of plan calls, so a later run with the same calibration, schedule, sampler options and
    strength replays the steps bit for bit and only builds the surrogate from the first step it has not seen.

    Trace. :attr:`trace` holds, per corrected step, ``step``, ``sigma``, ``sigma_eff`` and ``c`` (per unit,
    or the paper's per channel); for the exact methods also the surrogate's ``excess`` (the variance the step
    would add over the full-precision state's without its correction, ``Var(D_base) + 2 Cov(y_next,
    D_base)``), ``var_fp`` (the full-precision state's variance), ``var_diff`` (``Var(D)`` after the
    corrected step: the predicted mean square difference from the full-precision run) and ``excess_after`` (the
    corrected state's variance over the full-precision state's after the step and the fresh noise that follows it:
    what the step's balance and noise lowering left), each ``[units]``, and,
    where the sampler passed a ``direction``, ``first_order`` (``[units]`` bool: the drift scaled the
    first-order increment there, else the whole one).
    :func:`recording` collects the plans of sampler runs; :func:`qdrift.calib.check_correction` compares
    the predictions with what the two models really do.

    Frequency bands. With a calibration made with ``bands=NB`` (:attr:`qdrift.Calibration.banded`) the
    surrogate's units are (channel, radial frequency band) pairs: every statistic above is per band, white
    noise a sampler injects splits by the bands' shares of the FFT bins, each step's ``c`` is per unit and
    scales that band of the increment (:func:`qdrift.correction.scale_increment_bands`), the fresh noise a
    stochastic sampler lowers is lowered per band, each band by that band's excess alone
    (:func:`qdrift.correction.scale_noise`; lowered per channel, white, it took variance from bands that had no
    excess: on a speckle error the low band ended below FP's), and the gain and bias act per band. For
    stationary Gaussian data the bands are independent, so this is exact; one ``c`` per channel is not when the
    error's spectrum differs from the sample's (a high-pass error then makes one ``c`` per channel smooth the low
    frequencies, which had no excess to lose).
    """

    _warned_tensor = False
    _warned_old = False

    def __init__(self, V, sigmas: torch.Tensor, x: torch.Tensor, sampler: str, strength: float = 1.0,
                 method: Optional[str] = None, spatial: bool = True, lower_noise: bool = True, flow: bool = False):
        # A moment-matching pass (qdrift.calib.match_moments) hands the plan its probe in place of V.
        self.trace: list = []  # per corrected step: see the class docstring
        for plans in getattr(_RECORDING, "stack", ()):
            plans.append(self)
        self.matcher = V if hasattr(V, "match_step") else None
        if self.matcher is not None:
            V, method = self.matcher.calibration, "matched"
        self.cal = V if (hasattr(V, "error_model") and not isinstance(V, torch.Tensor)) else None
        if method is None:
            method = "paper" if self.cal is None else ("matched" if self.cal.matched is not None else DEFAULT_METHOD)
        check_choice("method", method, METHODS)
        self.sampler, self.method = sampler, method
        self.channels, self.device = x.shape[1], x.device
        self.table = resolve_v(V, sigmas, x, sampler, strength)  # the paper's V (or None; strength checked either way)
        exact, cross, gain = _PARTS[method]
        if method == "matched" and self.matcher is None:
            if self.cal is None or self.cal.matched is None:
                raise ValueError(
                    f"{sampler}: method='matched' needs a Calibration with moment-matching tables "
                    "(qdrift.calib.match_moments); this one has none"
                )
            self.matcher = _MatchedTable(self.cal, sampler, strength) if strength > 0 else None
        if method == "matched":
            gain = self.matcher is not None and self.matcher.gain
        if self.table is not None and self.cal is None and method != "paper":
            if not DriftPlan._warned_tensor:
                DriftPlan._warned_tensor = True
                warnings.warn(
                    f"{sampler}: method={method!r} needs a Calibration (a tensor V carries only the variance); "
                    "using the paper's rule for tensor V", stacklevel=4,
                )
            exact = cross = gain = False
        self.exact = exact and self.table is not None
        self.gain = gain and self.table is not None and strength > 0
        self.strength = float(strength)
        self.drift = not getattr(_RECORDING, "undrifted", False)  # False: c = 0 at every step (see undrifted())
        self.lower_noise = bool(lower_noise)
        self.flow = bool(flow)
        # A calibration with frequency bands: the surrogate's units are (channel, band) pairs, each step's c is
        # per unit and scales that band of the increment (exact for stationary Gaussian data).
        # Samples without spatial axes have one band, and a grid too small to hold a bin in every calibrated band
        # cannot take a band's correction: the calibration's per-channel statistics serve them.
        banded = spatial and x.ndim > 2 and (self.exact or self.gain) and getattr(self.cal, "banded", None) is not None
        shares = band_shares(x.shape[2:], self.cal.bands) if banded else None
        if banded and not bool((shares > 0).all()):
            banded = False
            warnings.warn(
                f"{sampler}: the samples' {'x'.join(map(str, x.shape[2:]))} grid leaves "
                f"{int((shares == 0).sum())} of the calibration's {self.cal.bands} frequency bands without an FFT "
                "bin; using its per-channel statistics (one band)", stacklevel=4,
            )
        self.em_cal = self.cal.banded if banded else self.cal
        self.bands = self.cal.bands if banded else 1
        self.units = self.channels * self.bands
        if banded:
            # White noise per unit, on the scale of the calibration's grid, where every other statistic of a unit
            # was measured (a band's share of the positions' variance differs a little between grids); files
            # without the shares use the samples' grid.
            kept = self.em_cal.meta.get("band_shares")
            self._shares = (shares if kept is None else torch.tensor(kept, dtype=torch.float64)).repeat(self.channels)
        self.cross = self.exact and cross
        # The measured-accumulation factor on V (method v2 only: it was measured with the output correction on).
        scale = self.cal.drift_scale if (self.exact and self.gain and self.cal is not None) else None
        self._v_scale = None if scale is None else scale.repeat_interleave(self.bands)
        if self.cross and self.em_cal.trajectory is None and not DriftPlan._warned_old:
            DriftPlan._warned_old = True
            warnings.warn(
                f"{sampler}: the calibration has no cross-step statistics (written before qdrift format "
                "version 2); errors are taken as independent between steps. "
                "Recalibrate with qdrift.calibrate for the correlated-error correction.", stacklevel=4,
            )
        self._cache = _solved(self.cal) if (self.exact or self.gain) else None
        if self.exact:
            # The surrogate depends on the calibration, the schedule and the sampler's calls, never on x: each
            # step's solution is kept under the history of the run's plan calls (``_record``) and a later run
            # with the same history replays it; the surrogate itself is built only when a step is not known.
            self._sigma0 = float(sigmas[0])
            base = (method, self.gain, self.cross, self.strength, self.bands, self.units,
                    tuple(x.shape[2:]) if self.bands > 1 else None, self._sigma0, self.drift, self.lower_noise,
                    self.flow)
            self._digest = hashlib.blake2b(repr(base).encode(), digest_size=16).digest()
            self._events: list = []
            self._live = False

    # -- model output: gain and bias --------------------------------------------------------------------
    def wrap(self, model):
        """The model with its output's gain and bias removed (method ``v2``), else the model itself."""
        if not self.gain:
            return model
        from .calib.calibration import interpolate_log_sigma

        cal, cache, strength, bound = self.em_cal, self._cache, self._output_strength(), self._bound_gain
        if ("gain", self.bands) not in cache:
            em = cal.error_model(cal.sigmas, gain=True)
            cache[("gain", self.bands)] = torch.stack([em["k"], em["j"], em["b"]], 1)  # [S, 3, units]
        table = cache[("gain", self.bands)]

        def gain_at(levels: tuple, x: torch.Tensor):
            """``(k, j, b)`` ``[B or 1, units]`` at the call's levels on x's device (kept with the calibration)."""
            key = ("gain at", self.bands, self.strength, levels, x.device)
            if key not in cache:
                query = torch.tensor(levels, dtype=torch.float64)
                kjb = bound(interpolate_log_sigma(table, cal.sigmas, query) * strength)
                if self.bands > 1:
                    # Where k and j are equal across each channel's bands (every one 0 where the models agree) the
                    # per-channel form is exact and needs no FFT: decided here, on the host, once per level.
                    per_band = kjb.reshape(len(kjb), 3, self.channels, self.bands)
                    if bool((per_band[:, :2] == per_band[:, :2, :, :1]).all()):
                        kjb = per_band[..., 0]  # [N, 3, C]: b's band 0 is the channel's mean
                # j = None where there is no state term (decided here, on the host: no device sync per call)
                cache[key] = tuple(None if i == 1 and not bool((kjb[:, 1] != 0).any()) else kjb[:, i].to(x.device)
                                   for i in range(3))
            return cache[key]

        def corrected(x, sigma, **kwargs):
            denoised = model(x, sigma, **kwargs)
            # The levels as host floats: one small copy (the output check has synchronized already), and the
            # run's few levels then cost one lookup each.
            levels = sigma.reshape(-1).tolist() if isinstance(sigma, torch.Tensor) else [float(sigma)]
            if all(level == levels[0] for level in levels):
                levels = levels[:1]
            kk, jj, bb = gain_at(tuple(levels), x)
            ct = compute_dtype(x)
            sv = torch.tensor(levels, dtype=ct, device=x.device).reshape((-1,) + (1,) * (x.ndim - 1))
            d = self._remove_gain((x - denoised).to(ct) / sv, x.to(ct) / sv, kk, jj, bb)
            return (x.to(ct) - sv * d).to(denoised.dtype)

        for attr in ("is_flow", "inner_model", "name", "final"):
            if hasattr(model, attr):
                setattr(corrected, attr, getattr(model, attr))
        return corrected

    def _output_strength(self):
        """What the output's gain, state term and bias are scaled by: the strength, times (method ``v2``, which the
        sizing measured) the measured share of the correction per unit (:attr:`qdrift.Calibration.output_scale`)."""
        share = self.cal.output_scale if (self.cal is not None and self.method == "v2") else None
        if share is None:
            return self.strength
        return self.strength * share.repeat_interleave(self.bands)[None, None, :]

    @staticmethod
    def _bound_gain(kjb: torch.Tensor) -> torch.Tensor:
        """``(k, j, b)`` ``[N, 3, units]`` scaled by the strength, with ``1 + k`` kept within the calibration's
        bounds ``[1 / MAX_GAIN_FACTOR, MAX_GAIN_FACTOR]``: a strength of 2 or more on a calibrated ``k = -1/2``
        would otherwise divide the output by 0 or flip its sign."""
        from .calib.calibration import MAX_GAIN_FACTOR

        return torch.cat([kjb[:, :1].clamp(1 / MAX_GAIN_FACTOR - 1, MAX_GAIN_FACTOR - 1), kjb[:, 1:]], 1)

    def _remove_gain(self, d: torch.Tensor, u: torch.Tensor, k: torch.Tensor, j: Optional[torch.Tensor],
                     b: torch.Tensor) -> torch.Tensor:
        """``(d - j u - b) / (1 + k)`` per channel, or per channel and band (only band 0 carries a mean); ``d``
        and ``u`` (the state over sigma) ``[B, C, ...]`` in their compute dtype, ``k``, ``j``, ``b``
        ``[B or 1, units]``, or ``[B or 1, C]`` per channel also for a banded plan (``j`` None: no state term)."""
        shape = (-1, self.channels) + (1,) * (d.ndim - 2)
        k, b = k.to(d.device), b.to(d.device)
        if self.bands > 1 and k.shape[-1] != self.channels:  # per band (else collapsed to per channel by gain_at)
            k, b = k.reshape(-1, self.channels, self.bands), b.reshape(-1, self.channels, self.bands)
            out = filter_bands(d, 1 / (1 + k)) - (b[..., 0] / (1 + k[..., 0])).reshape(shape).to(d.dtype)
            if j is None:
                return out
            return out - filter_bands(u, j.to(d.device).reshape(k.shape) / (1 + k)).to(d.dtype)
        if j is not None:
            d = d - j.to(d.device).reshape(shape).to(d.dtype) * u
        return (d - b.reshape(shape).to(d.dtype)) / (1 + k.reshape(shape).to(d.dtype))

    def correct_increment(self, inc: torch.Tensor, x: torch.Tensor, sigma: float, h: float) -> torch.Tensor:
        """A step's increment ``h d_hat`` ``[B, C, ...]`` from the state ``x`` with the output's gain and bias at
        ``sigma`` removed, ``h (d_hat - j x / sigma - b) / (1 + k)`` (for schedulers that see increments, not
        denoiser outputs)."""
        if not self.gain:
            return inc
        em = self.em_cal.error_model(torch.tensor([float(sigma)], dtype=torch.float64), gain=True)
        k, j, b = self._bound_gain(torch.stack([em[key] for key in ("k", "j", "b")], 1)
                                   * self._output_strength()).unbind(1)
        j = j if bool((j != 0).any()) else None
        ct = compute_dtype(inc)
        return self._remove_gain(inc.to(ct), x.to(ct) * (float(h) / float(sigma)), k, j, b * float(h)).to(inc.dtype)

    # -- the surrogate ----------------------------------------------------------------------------------
    def evaluate(self, key: float, sigma: float, terms: Optional[Sequence[Tuple[float, float, float]]] = None) -> None:
        """Records a model evaluation ``key`` at level ``sigma`` (exact methods; a no-op otherwise).

        The evaluation is at the current state, or (``terms``, as :meth:`step`'s) at the uncorrected
        intermediate state ``sum_j A_j x_j + sum_j B_j d_j`` (Heun's second call: ``[(i, 1, h)]``). Steps
        record their own first evaluation; only intermediate states need this call.
        """
        if self.exact:
            self._record(("e", float(key), float(sigma), _terms(terms)))

    def _evaluate(self, key: float, sigma: float, terms) -> None:
        if key in self._evals:
            return
        if terms is None:
            y, d = self._y, self._d
        else:
            y, d = self._apply(terms)
        em = self._error_model_at([float(sigma)])
        var = em["V"][0] * self.strength
        std = (var if self._v_scale is None else var * self._v_scale).sqrt()
        rho = self._rho(float(sigma), self._errors)  # [J, C] with earlier errors
        cov_with = torch.zeros(self._src.cov.shape[0], self.units, dtype=torch.float64)
        for (_, _, index, other_std), r in zip(self._errors, rho):
            cov_with[index] = r * std * other_std
        index = self._src.add(std * std, cov_with)
        self._errors.append((float(sigma), key, index, std))
        self._evals[key] = (float(sigma), em["kappa"][0], y, d, index)

    # -- the run's history: what the surrogate is built from ---------------------------------------------
    def _record(self, event: tuple) -> bytes:
        """Appends a plan call to the run's history (applied to the surrogate if it is built); returns the key
        of the history so far."""
        self._events.append(event)
        self._digest = hashlib.blake2b(self._digest + repr(event).encode(), digest_size=16).digest()
        if self._live and event[0] != "s":
            self._run(event)
        return self._digest

    def _run(self, event: tuple):
        kind, args = event[0], event[1:]
        if kind == "e":
            return self._evaluate(*args)
        if kind == "n":
            return self._noise(*args)
        if kind == "r":
            return self._rescale(*args)
        return self._solve(*args)

    def _build(self) -> None:
        """The surrogate at the start of the run, with every recorded call before the newest (a step) applied."""
        self._src = _Sources(self.units)
        var0 = self._error_model_at([self._sigma0])["var_x"][0]
        self._y = self._src.unit(self._src.add(var0), 1.0)  # full-precision state deviation
        self._d = torch.zeros_like(self._y)  # corrected minus full-precision
        self._evals: dict = {}  # id -> (sigma, kappa [C], y, D at the evaluated state, error source)
        self._errors: list = []  # (sigma, id, source index, std [C])
        self._noisy = False  # the run has injected fresh noise (see _drift)
        if self.cross and ("rho", self.gain, self.bands) not in self._cache:
            rho = self.em_cal.error_correlation(gain=self.gain)
            self._cache[("rho", self.gain, self.bands)] = None if rho is None else between_evaluations(rho)
        self.rho = self._cache[("rho", self.gain, self.bands)] if self.cross else None
        for event in self._events[:-1]:
            self._run(event)
        self._live = True

    def _apply(self, terms):
        """``(y, D_base)`` after ``sum_j A_j x_j + sum_j B_j d_j`` without correction."""
        src = self._src
        y = torch.zeros(src.cov.shape[0], self.units, dtype=torch.float64)
        d = torch.zeros_like(y)
        for key, a_coef, b_coef in terms:
            s, kappa, y_j, d_j, index = self._evals[key]
            y = y + (a_coef + b_coef * (1 - kappa) / s) * src.pad(y_j)
            d = d + (a_coef + b_coef * (1 - self._difference_kappa(s, kappa)) / s) * src.pad(d_j)
            d[index] += b_coef  # the evaluation's own error, in d units
        return y, d

    def _difference_kappa(self, sigma: float, kappa: torch.Tensor) -> torch.Tensor:
        """The full-precision denoiser's slope along the difference ``D`` at ``sigma``: the state's ``kappa`` (the
        surrogate's model). ``qdrift.bench.band_accumulation --error-slope`` overrides it with the slope along the
        quantization error's direction, measured at calibration states: that predicts far less accumulation than
        the quantized run has (the fresh error is noise to the denoiser; what accumulates is the part it keeps)."""
        return kappa

    def noise(self, std: float) -> None:
        """Records fresh noise of std ``std`` the sampler adds at full strength (Euler's and Heun's churn); noise a
        step lowers is recorded by the step itself (:meth:`step`'s ``noise_std``)."""
        if self.exact and std:
            self._record(("n", float(std), None))

    def _noise(self, std: float, factor: Optional[torch.Tensor]) -> None:
        if not std:
            return
        self._noisy = True
        var = torch.full((self.units,), float(std) ** 2, dtype=torch.float64)
        index = self._src.add(var * self._shares if self.bands > 1 else var)
        self._y = self._src.pad(self._y)
        self._d = self._src.pad(self._d)
        self._y[index] = 1.0
        if factor is not None:  # per unit
            self._d[index] = factor.detach().double().cpu() - 1.0

    def rescale(self, factor: float) -> None:
        """Records that the sampler scales the whole state by ``factor`` (a flow's ancestral step)."""
        if self.exact and factor != 1.0:
            self._record(("r", float(factor)))

    def _rescale(self, factor: float) -> None:
        self._y = self._y * float(factor)
        self._d = self._d * float(factor)

    # -- the step ---------------------------------------------------------------------------------------
    def step(self, i: int, x: torch.Tensor, x_base: torch.Tensor, sigma: float, sigma_eff: float, *,
             terms: Optional[Sequence[Tuple[float, float, float]]] = None, q: Optional[torch.Tensor] = None,
             quadrature: bool = False, noise_std: Optional[float] = None, correction: str = "drift",
             direction: Optional[tuple] = None):
        """Corrects one step; returns ``(x after the deterministic part, factor on the sampler's noise or None)``.

        The factor is per channel ``[C]``, or per channel and frequency band ``[C, NB]`` for a banded plan; the
        sampler applies it with :func:`qdrift.correction.scale_noise`.

        Args:
            i: step index (row of the V table; the id of the step's first evaluation).
            x: sample before the step ``[B, C, ...]``.
            x_base: the plain sampler's deterministic result ``[B, C, ...]``.
            sigma: level the step starts from (and its first evaluation's); sigma_eff: level its
                deterministic part reaches.
            terms: the step as ``x_next = sum_j A_j x_j + sum_j B_j d_j`` over evaluations, as
                ``(id_j, A_j, B_j)`` (see the class docstring); default ``[(i, 1, sigma_eff - sigma)]``,
                an Euler step.
            q: the paper rule's injected variance, when the sampler computes it itself (quadrature, Heun).
            quadrature: the authors' DPM-Solver++ denominator (paper method only).
            noise_std: the std of the fresh noise the sampler adds after this step (0 or None: none).
            correction: ``"drift"`` or ``"noise"`` (lower that noise instead, drift for the rest).
            direction: ``(x_first, first_terms)``: the step's first-order result from the current evaluation and
                its terms (exact methods; see "Direction of the drift" in the class docstring). None: the drift
                scales the whole increment ``x_base - x``.
        """
        if self.matcher is not None:
            c, shift = self.matcher.match_step(i, x, x_base, float(sigma), float(sigma_eff))
            if c is None:
                return x_base, None
            self._log(i, sigma, sigma_eff, c)
            if c.ndim == 2:  # per frequency band
                x_new = scale_increment_bands(x_base, x_base - x, c)
            else:
                x_new = apply_drift(x, x_base, c.to(device=x.device, dtype=compute_dtype(x)))
            return x_new + channel_view(shift.to(device=x.device, dtype=compute_dtype(x)), x_new).to(x_new.dtype), None
        if self.table is None:
            return x_base, None
        if not self.exact:
            if q is None:
                q = self.table[i] * (sigma - sigma_eff) ** 2
            factor = None
            if correction == "noise" and noise_std is not None:
                factor, q = lower_noise(noise_std, q)
            rule = quadrature_coefficient if quadrature else drift_coefficient
            c = clip_drift(rule(q, sigma, sigma_eff))  # c <= 1, warned
            self._log(i, sigma, sigma_eff, c)
            return apply_drift(x, x_base, c), factor
        self.evaluate(float(i), sigma)
        terms = ((float(i), 1.0, float(sigma_eff) - float(sigma)),) if terms is None else _terms(terms)
        x_dir, dir_terms = (x_base, None) if direction is None else (direction[0], _terms(direction[1]))
        if self.flow:  # along the score (a sampler without a direction: its whole step is the first-order part)
            score = self._score_direction(i, x, x_dir, terms if dir_terms is None else dir_terms, sigma)
            if score is not None:
                x_dir, dir_terms = score
        only = direction is None and dir_terms is not None
        key = self._record(("s", int(i), terms, float(noise_std or 0.0), correction, float(sigma), float(sigma_eff),
                            dir_terms, only))
        solved = self._cache.get(key)
        if solved is None:
            if not self._live:
                self._build()
            solved = self._solve(int(i), terms, float(noise_std or 0.0), correction, float(sigma), float(sigma_eff),
                                 dir_terms, only)
            self._cache.put(key, solved)
        else:
            self._live = False  # the surrogate (if built) is behind the history now
        c, factor, clipped, predicted, first_order = solved
        if first_order is not None:
            predicted = dict(predicted, first_order=first_order)
        self._log(i, sigma, sigma_eff, c, predicted)
        if clipped:
            # More than doubling (or cancelling) a step: the error is large against the step, or the calibration is
            # far from this run (another model or latent format, too large a strength). What is not absorbed stays
            # in the surrogate and later steps take it up. One message text for every step, so Python's default
            # filter shows it once per call site (the trace has each step's c).
            warnings.warn(
                f"{self.sampler}: Q-Drift v2 asked for |c| > {MAX_DRIFT:g} (more than doubling or cancelling a step) "
                "and clipped it; later steps take up the rest. An error large against its step (few steps, the "
                "lowest noise levels, coarse quantization) asks for it; so do a calibration of another model or "
                "latent format and too large a strength",
                DriftClippedWarning, stacklevel=3,
            )
        if factor is not None and factor.ndim == 1:  # per band [C, NB] stays on the host (scale_noise's FFT short cut)
            factor = factor.to(x.device)
        if first_order is None or not bool(first_order.any()):
            return self._scale(x_base, x_base - x, c, x), factor
        if bool(first_order.all()):
            return self._scale(x_base, x_dir - x, c, x), factor
        # some units along the first-order increment, the others along the whole one
        along = self._scale(x_base, x_dir - x, c * first_order, x)
        return self._scale(along, x_base - x, c * ~first_order, x), factor

    @staticmethod
    def _score_direction(i: int, x: torch.Tensor, x_first: torch.Tensor, first_terms, sigma: float):
        """A flow's drift direction ``(x_score, its terms)`` from the step's first-order result ``x_first`` and its
        terms, or None where that part is not a single-evaluation step ``A x + B d`` from the current state.

        A flow's state ``x = (1 - t) x0 + t eps`` moves along ``d = eps_hat - x0_hat``: a longer step removes more
        noise *and* grows the signal faster. The drift of Karras' generalized SDE is along the score, in the scaled
        (VE) coordinates ``x / (1 - t)``: it removes noise and leaves the signal's scale as the step leaves it. With
        ``x = (1 - t) x0_hat + t eps_hat`` and ``eps_hat = x + (1 - t) d``, the step ``A x + B d`` changes the noise
        coefficient by ``k = A t + B - t`` (``sigma_eff - t``: Euler/DDIM's ``A = 1, B = h``, and the DPM++ SDE
        solvers' first-order part in the flow form alike), so the drift scales ``k eps_hat``:
        ``x_score = x + k (x + (1 - t) d)`` (Euler: ``(1 - t) x_first + sigma_eff x``). Along the whole step a balance
        that asks to remove an excess where the state's variance is stationary (the signal grows as fast as the
        noise shrinks) is met only by ``c = -1``: a band frozen at its noise level, grain on real data. Along the
        score the step's full-precision part always removes noise (``c < 0`` is then left to increments dominated
        by the error, as on a VE model), and ``c`` has the same bound at level 0 (``x_score``'s noise is
        ``sigma_eff + c k``).
        """
        if len(first_terms) != 1 or first_terms[0][0] != float(i) or first_terms[0][2] == 0.0:
            return None
        _, a_coef, b_coef = first_terms[0]
        t = float(sigma)
        k = a_coef * t + b_coef - t
        d = (x_first - a_coef * x) / b_coef
        return x + k * (x + (1.0 - t) * d), ((float(i), 1.0 + k, k * (1.0 - t)),)

    def _scale(self, x_base: torch.Tensor, inc: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_base + c inc`` with ``c`` per unit (per channel, or per channel and band; x: the step's start)."""
        if self.bands > 1:
            return scale_increment_bands(x_base, inc, c.reshape(self.channels, self.bands))
        return scale_increment(x_base, inc, c.to(device=x.device, dtype=compute_dtype(x)))

    def _solve(self, i: int, terms, noise_std: float, correction: str, sigma: float, sigma_eff: float,
               dir_terms=None, only: bool = False):
        """The step's balance on the surrogate, which it advances; returns ``(c [units], factor or None,
        clipped, the surrogate's predictions for the trace, first_order [units] bool or None)``. ``only``: the drift
        is along ``dir_terms`` in every unit (a flow's score direction in a step without another)."""
        src = self._src
        y_next, d_base = self._apply(terms)
        cur = src.pad(self._y) + src.pad(self._d)
        const = excess = src.covar(d_base, d_base) + 2 * src.covar(y_next, d_base)
        const = const + self._deficit(i)
        factor = None
        shares = self._shares if self.bands > 1 else None  # white noise's variance per unit, over noise_std^2
        if correction == "noise" and noise_std:
            # The sampler lowers its noise per unit (per band: the band of the noise alone, scale_noise) by the excess.
            factor, left = lower_noise(noise_std, const.clamp(min=0), shares)
            const = const.clamp(max=0) + left
        # The drift scales the step's first-order increment (the score direction), or its whole increment where
        # only that reaches the balance or comes closer to it (see the class docstring).
        drift = self._drift(y_next + d_base - cur, const, y_next + d_base, sigma, sigma_eff, len(terms) == 1)
        first_order = None
        if dir_terms is not None:
            y_dir, d_dir = self._apply(dir_terms)
            along = self._drift(y_dir + d_dir - cur, const, y_next + d_base, sigma, sigma_eff, True)
            first_order = along["reached"] | (along["left"].abs() <= drift["left"].abs()) | only
            drift = {k: torch.where(first_order if v.ndim == 1 else first_order[None], along[k], v)
                     for k, v in drift.items()}
        c, inc = drift["c"], drift["inc"]
        # Warn where the limit |c| <= MAX_DRIFT is what stops the drift, not the bound at level 0 (a last step to 0
        # takes no drift whatever the balance asks: that is the step's nature, not a sign of a wrong calibration).
        clipped = bool(((drift["solved"].abs() > MAX_DRIFT) & (c.abs() >= MAX_DRIFT)).any())
        if not self.drift:
            factor = None
        elif correction == "drift" and noise_std and self.lower_noise and not bool(drift["reached"].all()):
            # A bounded drift, or one without a root, leaves excess the fresh noise that follows can absorb (a few
            # ancestral steps go nearly to 0, so the drift can take little): the sampler lowers that noise by it.
            left = (drift["left"] * ~drift["reached"]).clamp(min=0)
            factor, _ = lower_noise(noise_std, left, shares)
        self._y, self._d = y_next, d_base + c * inc
        predicted = {"excess": excess, "var_fp": src.covar(y_next, y_next), "var_diff": src.covar(self._d, self._d)}
        self._noise(noise_std, factor)
        predicted["excess_after"] = src.covar(self._d, self._d) + 2 * src.covar(self._y, self._d)
        if factor is not None and self.bands > 1:
            factor = factor.reshape(self.channels, self.bands)  # the sampler lowers each band of its noise
        return c, factor, clipped, predicted, first_order

    def _deficit(self, i: int):
        """How far below the full-precision state's variance step ``i``'s balance aims, per unit: 0, the balance is
        greedy. A look-ahead would aim below it where later steps cannot take up the error they add; measured, it
        does not help (``benchmarks/lookahead_check.py`` overrides this: on Euler ancestral's correlated analytic
        error a deficit of any size, from any step, leaves the final excess where it was, since the denoising steps
        after it contract an early deficit away and the late steps have no drift or noise left to shape)."""
        return 0.0

    def _drift(self, inc: torch.Tensor, const: torch.Tensor, x_base: torch.Tensor, sigma: float,
               sigma_eff: float, first_order: bool) -> dict:
        """The balance ``const + 2 c Cov(x_base, inc) + c^2 Var(inc) = 0`` for a drift ``c inc`` (``inc`` and the
        uncorrected result ``x_base`` as vectors over sources; ``first_order``: ``inc`` is one evaluation's step):
        ``c`` within its bounds, the unbounded ``solved``, what is ``left`` of the excess, and whether the balance
        is ``reached``, each ``[units]``."""
        lin, quad = self._src.covar(x_base, inc), self._src.covar(inc, inc)
        solved = balance_coefficient(const, lin, quad)
        if not self.drift:
            solved = torch.zeros_like(solved)
        c = solved.clamp(-MAX_DRIFT, MAX_DRIFT)
        # A step scaled by (1 + c) acts as a step to the lower level sigma + (1 + c)(sigma_eff - sigma); past
        # level 0 it no longer removes noise but puts it back with its sign flipped (c sigma of it on a step to
        # 0). So c stops where the scaled step reaches 0; what it cannot absorb stays for later steps.
        if sigma > sigma_eff >= 0:
            c = c.clamp(max=sigma_eff / (sigma - sigma_eff))
        # In a run that injects noise, a step to 0 along a first-order part, x + (1 + c)(x0_hat - x), with c < 0 would
        # leave |c| of the noise the model sees, the sampler's own fresh noise among it, in the final sample: white
        # noise, which lands where the sample's spectrum is weakest (grain), and which the surrogate, one unit per
        # channel, counts as variance like the error it saves. So that step takes no drift (the bound above already
        # stops c > 0). A deterministic run may still hold its last step back (on the bench DiT that backs off the
        # step before, which overshot, and gives a better FID), and so may a whole multistep increment (LMS's).
        if sigma_eff == 0 and first_order and self._noisy:
            c = c.clamp(min=0.0)
        left = const + 2 * c * lin + c * c * quad
        reached = left.abs() <= 1e-6 * (const.abs() + (2 * c * lin).abs() + c * c * quad)
        return {"c": c, "solved": solved, "left": left, "reached": reached, "inc": inc}

    def _log(self, i: int, sigma: float, sigma_eff: float, c: torch.Tensor, predicted: Optional[dict] = None) -> None:
        self.trace.append(dict(step=int(i), sigma=float(sigma), sigma_eff=float(sigma_eff), c=c, **(predicted or {})))

    def _error_model_at(self, levels: Sequence[float]):
        """The calibration's error model (computed once per run on its own grid) at ``levels``, with
        ``kappa`` and ``var_x`` (the full-precision state's variance) of the linear surrogate."""
        from .calib.calibration import interpolate_log_sigma

        if ("grid", self.gain, self.bands) not in self._cache:
            em = self.em_cal.error_model(self.em_cal.sigmas, gain=self.gain)
            grid = {k: (v.log() if k == "var_x" else v) for k, v in em.items() if v is not None}
            self._cache[("grid", self.gain, self.bands)] = (grid, torch.stack(list(grid.values()), 1))  # [S, keys, units]
        self._em_grid, self._em_stack = self._cache[("grid", self.gain, self.bands)]
        query = torch.tensor(levels, dtype=torch.float64)
        rows = interpolate_log_sigma(self._em_stack, self.cal.sigmas, query)
        out = {k: rows[:, j] for j, k in enumerate(self._em_grid)}
        sig = query[:, None].expand(len(levels), self.units)
        if "var_x" in out:
            # Var(x) grows like sigma^2 beyond the calibrated range: extend it as s^2 + sigma^2 at the top.
            top = float(self.cal.sigmas[0])
            s2 = (self._em_grid["var_x"][0].exp() - top**2).clamp(min=0)
            out["var_x"] = torch.where(sig > top, s2 + sig**2, out["var_x"].exp())
            out["kappa"] = (1 - sig * out["cov_xd"] / out["var_x"]).clamp(min=0)  # > 1 is a flow's (x0 = x / (1 - t))
        else:  # no trajectory sums: an exact VE denoiser's Cov(x, d) = sigma, and Var(d) = 1 - kappa
            out["cov_xd"] = sig.clone()
            out["kappa"] = (1 - out["var_d"]).clamp(0, 1)
            out["var_x"] = sig**2 / (1 - out["kappa"]).clamp(min=1e-12)
        return out

    def _rho(self, sigma: float, errors: Sequence[tuple]) -> torch.Tensor:
        """Error correlation between a new evaluation at ``sigma`` and earlier ones ``[J, C]`` (0 without
        calibrated cross-step statistics)."""
        if self.rho is None or not errors:
            return torch.zeros(len(errors), self.units, dtype=torch.float64)
        from .calib.calibration import interpolate_log_sigma

        grid = self.cal.sigmas
        row = interpolate_log_sigma(self.rho, grid, torch.tensor([sigma], dtype=torch.float64))[0]  # [S, C]
        other = torch.tensor([e[0] for e in errors], dtype=torch.float64)
        return interpolate_log_sigma(row, grid, other).clamp(-1, 1)


def _terms(terms) -> Optional[tuple]:
    """A step's or evaluation's ``terms`` as a tuple of float triples (hashable, with an exact ``repr``)."""
    return None if terms is None else tuple((float(k), float(a), float(b)) for k, a, b in terms)


def _fingerprint(cal) -> tuple:
    """What a calibration's error model is computed from: its options, and every tensor with its in-place
    version counter (a tensor changed in place, or replaced, gives another fingerprint)."""
    tensors = [cal.sigmas, *cal.moments.tensors().values()]
    if cal.trajectory is not None:
        tensors += list(cal.trajectory.tensors().values())
    options = (cal.reduce, cal.conditional, repr(cal.meta.get("band_units")), repr(cal.meta.get("band_shares")),
               repr(cal.meta.get("drift_scale")))
    sub = () if cal.banded is None else _fingerprint(cal.banded)
    return options, tuple(tensors), tuple(t._version for t in tensors), sub


class _Solved:
    """One calibration's cached plan work: its error-model tables (string-tagged tuple keys) and the solved
    steps of v2 surrogates (keyed by the digest of a run's history). Valid while the calibration's
    :func:`_fingerprint` holds; bounded (cleared when full)."""

    LIMIT = 200_000

    def __init__(self, fingerprint):
        self.fingerprint, self.tables, self.steps = fingerprint, {}, {}

    def __contains__(self, key):
        return key in self.tables

    def __getitem__(self, key):
        return self.tables[key]

    def __setitem__(self, key, value):
        if len(self.tables) >= self.LIMIT:
            self.tables.clear()
        self.tables[key] = value

    def get(self, digest: bytes):
        return self.steps.get(digest)

    def put(self, digest: bytes, solved) -> None:
        if len(self.steps) >= self.LIMIT:
            self.steps.clear()
        self.steps[digest] = solved


_SOLVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _solved(cal) -> _Solved:
    """The cache of ``cal`` (a fresh one if it has none, or if the calibration changed since)."""
    fingerprint = _fingerprint(cal)
    entry = _SOLVED.get(cal)
    if entry is None or not _same(entry.fingerprint, fingerprint):
        entry = _SOLVED[cal] = _Solved(fingerprint)
    return entry


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[2] != b[2] or len(a[1]) != len(b[1]) or not all(x is y for x, y in zip(a[1], b[1])):
        return False
    return (not a[3] and not b[3]) or (bool(a[3]) and bool(b[3]) and _same(a[3], b[3]))


def _sampler_names():
    from .samplers import REGISTRY  # the samplers import the plan; the registry is read at run time

    return REGISTRY


class _MatchedTable:
    """The moment-matching tables of a calibration (:attr:`qdrift.Calibration.matched`) applied to any schedule.

    The matching pass measures, per step, the ``c`` and mean shift that keep the quantized run's per-channel
    variance and mean on the full-precision run's, and stores them per unit of step length at the step's
    level: ``V_eff = 2 sigma c / |sigma - sigma_eff|`` (the V the paper's first-order rule would need for that
    ``c``) and ``shift / |sigma - sigma_eff|``. Here they are read back at this run's levels, interpolated in
    log-sigma, and turned into this run's ``c`` and shift, so one table serves other step counts (exactly on
    the matched schedule; to first order in the step length elsewhere).
    """

    def __init__(self, cal, sampler: str, strength: float):
        from .calib.calibration import interpolate_log_sigma

        self._interp = interpolate_log_sigma
        m = cal.matched
        self.sigmas, self.v, self.rate = m["sigmas"], m["V"] * strength, m["shift"] * strength
        info = cal.meta.get("match") or {}
        self.gain = bool(info.get("gain", False))
        matched_on, running = info.get("sampler"), sampler.replace("sample_", "").replace("_qdrift", "")
        if matched_on and matched_on != running and running in _sampler_names():
            warnings.warn(
                f"{sampler}: the calibration's moment-matching tables were measured with the {matched_on!r} sampler; "
                "on another sampler they hold only to first order (run qdrift.calib.match_moments with this one)",
                stacklevel=5,
            )

    def match_step(self, i, x, x_base, sigma: float, sigma_eff: float):
        gap = abs(sigma - sigma_eff)
        q = torch.tensor([sigma], dtype=torch.float64)
        v, rate = self._interp(self.v, self.sigmas, q)[0], self._interp(self.rate, self.sigmas, q)[0]
        c = v * gap / (2 * sigma) if sigma > 0 else torch.zeros_like(v)
        return clip_drift(c.flatten()).reshape(c.shape).clamp(min=-MAX_DRIFT), rate * gap
