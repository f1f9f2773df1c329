"""Paired Q-Drift calibration of two diffusers pipelines (full precision and quantized).

Both pipelines run their own prompt encoding and guidance; only their schedulers are swapped for the
calibration pass: the full-precision pipeline gets a recording Euler scheduler (the calibration trajectory
of the paper, Sec. 3.1, is full-precision Euler), the quantized pipeline a replaying one that returns the
recorded states, so the quantized model is evaluated on exactly the full-precision trajectory. The model
outputs the schedulers see are taken after classifier-free guidance, as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from ..calib.calibration import REDUCES, Calibration
from ..calib.size import host_sizes
from ..calib.trace import PairedTrace, PairedTraceError
from ..hosts._bind import HOST_BANDS
from ..validation import _integer, _real, flag_arg
from .schedulers import (
    QDriftEulerDiscreteScheduler,
    QDriftFlowMatchEulerDiscreteScheduler,
    _diffusers_base,
    _step_with_signature,
)

__all__ = ["calibrate_pipeline"]


def _denoised(sched, i: int, model_output: torch.Tensor, sample: torch.Tensor, out) -> torch.Tensor:
    """The x0 estimate D at step i in the scheduler's own sigma space (float32)."""
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        sigma = float(sched.sigmas[i])
        return sample.to(torch.float32) - sigma * model_output.to(torch.float32)
    return out.pred_original_sample.to(torch.float32)


class _PairMixin:
    """Recording (``mode="fp"``) or replaying (``mode="q"``) Euler scheduler for :func:`calibrate_pipeline`."""

    def _pair_begin(self, mode: str, channel_dim: int, run: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self._pair_mode = mode
        self._pair_dim = channel_dim
        self._pair_run = run
        self._pair_x: List[torch.Tensor] = []
        self._pair_d: List[torch.Tensor] = []
        self._pair_final: Optional[torch.Tensor] = None

    def _to_cf(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).movedim(self._pair_dim, 1)

    def _from_cf(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.movedim(1, self._pair_dim).to(device=like.device, dtype=like.dtype)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.step = _step_with_signature(_diffusers_base(cls))

    def _qdrift_step(self, model_output, timestep, sample, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        _check_channel_dim(self._pair_dim, sample)  # before any statistics (the latents' shape is known only now)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = int(self.step_index)
        out = super().step(model_output, timestep, sample, return_dict=True, **kwargs)
        D = _denoised(self, i, model_output, sample, out)
        last = i == len(self.timesteps) - 1
        if self._pair_mode == "fp":
            self._pair_x.append(self._to_cf(sample))
            self._pair_d.append(self._to_cf(D))
            if last:
                self._pair_final = self._to_cf(out.prev_sample)
        else:
            run = self._pair_run
            if i >= run["x"].shape[0]:
                raise PairedTraceError("the quantized pipeline ran more steps than the full-precision one")
            if i == 0:
                gap = float((self._to_cf(sample) - run["x"][0]).abs().max())
                if gap > 1e-3 * max(float(self.sigmas[0]), 1.0):
                    raise PairedTraceError(
                        f"the quantized pipeline started from different latents (max difference {gap:.3g}); both "
                        "pipelines must build the same latents from the same generator seed"
                    )
            self._pair_d.append(self._to_cf(D))
            nxt = run["final"] if last else run["x"][i + 1]
            out.prev_sample = self._from_cf(nxt, out.prev_sample)
        if return_dict:
            return out
        return (out.prev_sample,) + tuple(out.to_tuple()[1:])


def _check_channel_dim(dim: int, sample: Any) -> None:
    """Raises ``ValueError`` unless ``dim`` is a channel axis of the latents ``sample`` (not the batch axis 0)."""
    ndim = getattr(sample, "ndim", None)
    if not isinstance(ndim, int) or ndim < 2:
        raise ValueError(
            f"calibrate_pipeline: the scheduler was given latents of shape {tuple(getattr(sample, 'shape', ()))}; "
            "expected a tensor [batch, ...] with a channel axis"
        )
    if not -ndim <= dim < ndim or dim % ndim == 0:
        raise ValueError(
            f"calibrate_pipeline: channel_dim={dim} is not a channel axis of the pipeline's {ndim}-D latents of shape "
            f"{tuple(sample.shape)}: expected an axis in 1..{ndim - 1} or -{ndim - 1}..-1 (axis 0 is the batch; 1 for "
            "[B, C, H, W] latents, -1 for packed [B, tokens, C] latents)"
        )


class _RecordEuler(_PairMixin, EulerDiscreteScheduler):
    pass


class _RecordFlowEuler(_PairMixin, FlowMatchEulerDiscreteScheduler):
    pass


class _SizeMixin:
    """A Q-Drift Euler scheduler that also keeps its state before each step and its result (channels on axis 1),
    for :func:`calibrate_pipeline`'s sizing runs (:meth:`qdrift.calib.PairedTrace.add_sized_run`)."""

    def _size_begin(self, channel_dim: int) -> None:
        self._size_dim = channel_dim
        self._size_states: List[torch.Tensor] = []
        self._size_first: Optional[torch.Tensor] = None

    def _qdrift_step(self, model_output, timestep, sample, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        last = int(self.step_index) == len(self.timesteps) - 1
        if not self._size_states:
            self._size_first = model_output.detach().to("cpu", torch.float32)
        self._size_states.append(sample.detach().to("cpu", torch.float32).movedim(self._size_dim, 1))
        out = super()._qdrift_step(model_output, timestep, sample, **kwargs)
        if last:
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self._size_states.append(prev.detach().to("cpu", torch.float32).movedim(self._size_dim, 1))
        return out


class _SizeEuler(_SizeMixin, QDriftEulerDiscreteScheduler):
    pass


class _SizeFlowEuler(_SizeMixin, QDriftFlowMatchEulerDiscreteScheduler):
    pass


def _calibration_scheduler(scheduler: Any):
    """The Euler scheduler of the pipeline's family, with the pipeline scheduler's config."""
    cfg = scheduler.config
    name = type(scheduler).__name__
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or "FlowMatch" in name:
        if getattr(cfg, "stochastic_sampling", False):
            raise ValueError("calibrate_pipeline: a stochastic flow-matching scheduler config is not supported")
        return _RecordFlowEuler
    if getattr(cfg, "use_flow_sigmas", False) or getattr(cfg, "prediction_type", None) == "flow_prediction":
        raise ValueError(
            f"calibrate_pipeline: {name} is configured for a flow model; give the pipeline a "
            "FlowMatchEulerDiscreteScheduler to calibrate it"
        )
    return _RecordEuler


def _prompt_kwargs(prompt: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict):
        return _call_args("a prompt dict", prompt)
    raise ValueError(
        "calibrate_pipeline: each prompt must be a string or a dict of pipeline call arguments (e.g. prompt_embeds), "
        f"got {type(prompt).__name__}"
    )


def _call_args(what: str, args: Mapping) -> Dict[str, Any]:
    """``args`` as a dict of keyword arguments for a pipeline call (string keys; the generator is ours)."""
    bad = [k for k in args if not isinstance(k, str)]
    if bad:
        raise ValueError(f"calibrate_pipeline: {what} must have string keys (pipeline argument names), got {bad[0]!r}")
    if "generator" in args:
        raise ValueError(
            f"calibrate_pipeline: {what} must not hold 'generator': run k uses torch.Generator seeded with seed + k "
            "(pass seed instead)"
        )
    return dict(args)


def _int_arg(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int (numpy integers accepted; bools and floats refused)."""
    v = _integer(value)
    if v is None or (minimum is not None and v < minimum):
        raise ValueError(f"calibrate_pipeline: {name} must be an int{_at_least(minimum)}, got {value!r}")
    return v


def _at_least(minimum: Optional[int]) -> str:
    return "" if minimum is None else f" >= {minimum}"


def _flag_arg(name: str, value: Any) -> bool:
    return flag_arg("calibrate_pipeline", name, value)


def calibrate_pipeline(
    fp_pipe: Any,
    q_pipe: Any,
    prompts: Sequence[Union[str, Dict[str, Any]]],
    K: int,
    *,
    num_inference_steps: int = 20,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    reduce: str = "channel",
    conditional: bool = True,
    trim: Optional[float] = 4.0,
    channel_dim: int = 1,
    call_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = False,
    bands: int = HOST_BANDS,
    size_drift: Union[bool, str] = "auto",
) -> Calibration:
    """Calibrates Q-Drift for a quantized diffusers pipeline against its full-precision twin.

    Runs ``K`` paired generations: run ``k`` uses ``prompts[k % len(prompts)]`` and generator seed
    ``seed + k``. The full-precision pipeline follows Euler (``EulerDiscreteScheduler``, or
    ``FlowMatchEulerDiscreteScheduler`` for flow models, both built from its scheduler's config); the quantized
    pipeline is evaluated on the recorded states. The pipelines' schedulers are restored afterwards.

    Args:
        fp_pipe: the full-precision pipeline.
        q_pipe: the quantized pipeline (same architecture, latent shape and scheduler config).
        prompts: strings, or dicts of call arguments (e.g. ``{"prompt_embeds": ..., "negative_prompt_embeds":
            ...}``) for pipelines driven by embeddings.
        K: number of calibration runs (the paper finds K = 5 close to a 5,000-run reference).
        num_inference_steps: calibration steps (V is interpolated in log-sigma for other schedules).
        guidance_scale: passed to both pipelines when not None (pairs are recorded after guidance).
        seed: base generator seed.
        reduce: ``"channel"`` or ``"scalar"``.
        conditional: ``Var(delta | d_hat)`` (True, the paper) or ``Var(delta)``.
        trim: delta outlier trimming in standard deviations (None or 0: none).
        channel_dim: the latents' channel axis as the scheduler sees them (-1 for packed FLUX latents).
        call_kwargs: further arguments for both pipeline calls (``height``, ``width``, ...).
        progress: show the pipelines' progress bars.
        bands: also the statistics per radial frequency band (see :func:`qdrift.calibrate`; default
            :data:`qdrift.hosts.HOST_BANDS`, 1 for per channel only); only for latents with a spatial grid after the
            channel axis (``channel_dim=1``); packed latents get none.
        size_drift: True: then run the quantized pipeline ``2 K`` more times from the same seeds, with the Q-Drift
            Euler scheduler of its family and no drift, plain and with v2's output correction, and size v2's
            output correction and drift by what those runs accumulate against the full-precision ones
            (:func:`qdrift.size_drift`; :attr:`qdrift.Calibration.output_scale`,
            :attr:`qdrift.Calibration.drift_scale`). ``"auto"`` (the default): size every model but a flow model,
            where the sizing measured worse (:data:`qdrift.calib.size.SIZE_FLOW_MODELS`). False: never.

    Returns:
        The :class:`qdrift.Calibration` (for :func:`qdrift.diffusers.qdrift_scheduler` or the k-diffusion samplers).

    Integer and number arguments may be numpy scalars; the flags (``conditional``, ``progress``, and
    ``size_drift`` besides ``"auto"``) take ``bool``, ``numpy.bool_`` or a 0-d bool tensor.

    Raises:
        ValueError: for bad arguments (all checked before any pipeline runs; ``channel_dim`` against the latents
            at the first scheduler step, before any statistics), or when the two pipelines' runs do not pair up.
    """
    # Every argument is checked here, before any pipeline runs (channel_dim against the latents' shape at the
    # first scheduler step, before any statistics).
    K = _int_arg("K", K, 1)
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(
            "calibrate_pipeline: prompts must be a non-empty list of strings or of dicts of call arguments, got "
            f"{type(prompts).__name__}" + (" of length 0" if isinstance(prompts, Sequence) and not prompts else "")
        )
    num_inference_steps = _int_arg("num_inference_steps", num_inference_steps, 1)
    if guidance_scale is not None:
        g = _real(guidance_scale)
        if g is None or not math.isfinite(g):
            raise ValueError(
                f"calibrate_pipeline: guidance_scale must be a finite number or None, got {guidance_scale!r}"
            )
        guidance_scale = g
    seed = _int_arg("seed", seed)
    if not -(2**63) <= seed or seed + K - 1 > 2**64 - 1:
        raise ValueError(
            f"calibrate_pipeline: seed must be an int with seed >= -2**63 and seed + K - 1 <= 2**64 - 1 (run k uses "
            f"torch.Generator().manual_seed(seed + k)), got seed={seed!r} with K={K}"
        )
    if not isinstance(reduce, str) or reduce not in REDUCES:
        raise ValueError(
            f"calibrate_pipeline: reduce must be one of {', '.join(repr(r) for r in REDUCES)}, got {reduce!r}"
        )
    conditional = _flag_arg("conditional", conditional)
    if trim is not None:
        t = _real(trim)
        if t is None or not t >= 0:  # NaN fails the comparison
            raise ValueError(
                f"calibrate_pipeline: trim must be None or a number >= 0 (standard deviations; 0: no trimming), "
                f"got {trim!r}"
            )
        trim = t
    channel_dim = _int_arg("channel_dim", channel_dim)
    if call_kwargs is not None:
        if not isinstance(call_kwargs, Mapping):
            raise ValueError(
                "calibrate_pipeline: call_kwargs must be a dict of pipeline call arguments (e.g. "
                f"{{'height': 512, 'width': 512}}) or None, got {type(call_kwargs).__name__}"
            )
        call_kwargs = _call_args("call_kwargs", call_kwargs)
    progress = _flag_arg("progress", progress)
    bands = _int_arg("bands", bands, 1)
    host_sizes("calibrate_pipeline", size_drift, False)  # checked before any pipeline runs
    for name, pipe in (("fp_pipe", fp_pipe), ("q_pipe", q_pipe)):
        if not callable(pipe) or not hasattr(pipe, "scheduler"):
            raise ValueError(
                f"calibrate_pipeline: {name} must be a diffusers pipeline (callable with a .scheduler), got "
                f"{type(pipe).__name__}"
            )
    calls = [_prompt_kwargs(p) for p in prompts]
    rec_cls = _calibration_scheduler(fp_pipe.scheduler)
    base_config = fp_pipe.scheduler.config
    recorder = rec_cls.from_config(base_config)
    replayer = rec_cls.from_config(base_config)
    trace = PairedTrace(
        meta={
            "host": "diffusers",
            "scheduler": rec_cls.__mro__[2].__name__,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "channel_dim": channel_dim,
        }
    )
    orig_fp, orig_q = fp_pipe.scheduler, q_pipe.scheduler
    bars = []
    if not progress:
        for pipe in {id(fp_pipe): fp_pipe, id(q_pipe): q_pipe}.values():
            if hasattr(pipe, "set_progress_bar_config"):
                bars.append((pipe, dict(getattr(pipe, "_progress_bar_config", {}))))
                pipe.set_progress_bar_config(disable=True)
    try:
        for k in range(K):
            kwargs = _run_kwargs(calls, k, call_kwargs, num_inference_steps, guidance_scale)
            recorder._pair_begin("fp", channel_dim)
            fp_pipe.scheduler = recorder  # set before each call: fp_pipe may be q_pipe (a sanity check)
            fp_pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed + k))
            if recorder._pair_final is None:
                raise PairedTraceError("the full-precision pipeline did not run its scheduler to the end")
            run = trace.add_run(recorder.sigmas, recorder._pair_x, recorder._pair_d, recorder._pair_final)
            replayer._pair_begin("q", channel_dim, trace.runs[run])
            q_pipe.scheduler = replayer
            q_pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed + k))
            trace.set_q(run, replayer._pair_d)
        cal = trace.calibration(reduce=reduce, conditional=conditional, trim=trim, meta={"K_runs": K},
                                bands=bands if channel_dim in (1, -3) else 1)
        if host_sizes("calibrate_pipeline", size_drift, rec_cls is _RecordFlowEuler):
            cal = _size(trace, cal, q_pipe, [_run_kwargs(calls, k, call_kwargs, num_inference_steps, guidance_scale)
                                             for k in range(K)], seed, channel_dim,
                        _SizeFlowEuler if rec_cls is _RecordFlowEuler else _SizeEuler, base_config)
    finally:
        fp_pipe.scheduler = orig_fp
        q_pipe.scheduler = orig_q
        for pipe, cfg in bars:
            pipe._progress_bar_config = cfg
    return cal


def _size(trace: PairedTrace, cal: Calibration, q_pipe: Any, runs: List[Dict[str, Any]], seed: int, channel_dim: int,
          size_cls: type, config: Any) -> Calibration:
    """The sizing runs of :func:`calibrate_pipeline` (one per recorded run, same seeds); the sized calibration."""
    from ..plan import recording, undrifted

    base = trace.begin_sizing(cal)
    for k, kwargs in enumerate(runs):
        states, firsts = [], []  # the two runs' states, and the quantized model's first output in each
        for strength in (0.0, 1.0):  # the plain run (sizes the output correction), then the output-corrected one
            sizer = size_cls.from_config(config).set_calibration(base, channel_dim=channel_dim, method="v2",
                                                                 strength=strength)
            sizer._size_begin(channel_dim)
            q_pipe.scheduler = sizer
            with recording() as plans, undrifted():
                q_pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed + k))
            states.append(sizer._size_states)
            firsts.append(sizer._size_first)
        if not plans:
            raise PairedTraceError("the quantized pipeline's sizing run made no Q-Drift step")
        trace.add_sized_run(states[1], plans[-1].trace, plain=states[0], repeat=tuple(firsts))
    return trace.sized()


def _run_kwargs(calls, k, call_kwargs, num_inference_steps, guidance_scale) -> Dict[str, Any]:
    """The pipeline call arguments of run ``k`` (latent output)."""
    kwargs = dict(calls[k % len(calls)])
    kwargs.update(call_kwargs or {})
    kwargs["num_inference_steps"] = num_inference_steps
    kwargs["output_type"] = "latent"
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    return kwargs
