"""Block-wise reconstruction of quantized weights: BRECQ / AdaRound, and gradient-aligned calibration (GAC).

``quantize(model, scheme, samples, reconstruction="brecq" | "gac")`` first quantizes ``model`` with the scheme's
own recipe (activation ranges, smoothing, bits: :mod:`qdrift.quant.ptq`), then learns, block by block, whether
each quantized weight rounds down or up on the scheme's grid, so that the quantized block's output matches the
full-precision block's output on timestep-tagged calibration samples.

- **AdaRound** (Nagel et al., ICML 2020, Eqs. 21-24): a weight between its two neighbouring grid values ``lo`` and
  ``hi`` is ``lo + h(V) (hi - lo)`` with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma,
  0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``; ``V`` starts where ``h(V)`` reproduces the float weight; the
  regularizer ``sum 1 - |2 h(V) - 1|^beta`` with ``beta`` annealed 20 -> 2 after a 20 % warm-up pushes ``h`` to
  0 or 1; at the end every weight is set to ``lo`` or ``hi`` (``h >= 0.5``): always a grid value.
- **BRECQ** (Li et al., ICLR 2021): the loss is the output error of a whole block (a ResBlock, an attention block,
  a transformer block), summed over the block's output elements and averaged over calibration samples, plus
  ``reg_weight`` (0.01) times the regularizer; blocks are reconstructed one after the other.
- **GAC** (Hoang et al., arXiv 2602.01289, ICLR 2026; no code released, PDF not available here): the block loss
  weights calibration sample ``i`` by ``w_i = softmax(s / tau)_i`` (scaled so that equal ``s`` give 1), ``tau = 1``,
  all ``s_i = 0`` at the start. Before each block's reconstruction, ``gac_steps`` outer updates of ``s``: a
  one-step virtual update of the rounding parameters ``V' = V - alpha grad_V sum_i w_i err_i(V)`` on a batch of the
  training split, then ``L_val(V') = L_GM + L_MSE`` on a validation split (``val_fraction`` = 5 % of the samples,
  balanced over ``groups`` = 5 timestep groups), ``L_GM = -2 / (T (T - 1)) sum_{t < k} G_t . G_k`` with ``G_t`` the
  gradient of the mean error of group ``t``'s validation samples at ``V'``. ``s`` moves along
  ``d L_val / d s = (d V' / d s)^T grad_{V'} L_val``: both factors are second-order autograd passes (the HVPs in
  ``grad_{V'} L_GM`` and the mixed derivative in ``d V' / d s``), nothing of third order. The paper reaches the
  same goal with a surrogate gradient with respect to ``w`` whose exact form is not known here.

Adaptations forced by tiny models and CPU time (all options of :class:`ReconConfig`):

- ``iters`` = 200 Adam steps per block at ``lr`` = 1e-2 on ``V``, batches of 16 samples (BRECQ: 20,000 steps at
  1e-3, batches of 32, on a GPU), so that a bench model reconstructs in minutes on 2 CPU cores.
- Block inputs and targets are the *full-precision* model's block inputs and outputs (BRECQ and Q-Diffusion can
  feed the quantized model's inputs instead); activations are quantized as the scheme defines them during the
  reconstruction (activation rounding passes gradients straight through, :func:`qdrift.quant.functional.round_ste`).
- The GAC inner step size ``alpha`` is chosen per outer step so that the virtual update has root-mean-square
  size ``lr`` (one Adam step of the real reconstruction); ``alpha`` itself is held constant in the derivative.
- ``s`` is one vector over the training split, kept from block to block (the paper's per-block schedule is not
  known here); validation samples keep weight 1 in the reconstruction.

Which schemes: every simulated scheme (``w4a8``: per-output-channel grid of each layer's bits; ``w4a4``/``w3a4``:
the grid of each group of the smoothed residual ``R = W diag(lambda) - L``) and the weight-only formats, whose grids
are read from the formats' own libraries (:mod:`qdrift.quant.formats`, see ``_format_grid``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

__all__ = ["RECONSTRUCTIONS", "CalibSamples", "ReconConfig", "record_calib_samples", "find_blocks",
           "rectified_sigmoid", "adaround_init", "timestep_groups", "validation_split", "gradient_alignment_loss",
           "reconstruct"]

RECONSTRUCTIONS = ("brecq", "gac")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (Nagel et al. 2020, Eq. 23)


# ----------------------------------------------------------------------------------------------------------------
# calibration samples


@dataclass
class CalibSamples:
    """Timestep-tagged network inputs, e.g. recorded from the full-precision sampler's trajectories.

    Args:
        args: positional inputs of the network, each a Tensor ``[N, ...]`` (batch first) or None.
        timesteps: ``[N]`` the timestep (or sigma, or flow time) tag of each sample; any monotone scale.
        kwargs: keyword inputs, each ``[N, ...]`` or a non-tensor passed unchanged.
        batch_sizes: sizes of the recorded calls, in order (sum ``N``); the scheme's activation calibration
            replays the samples in these batches (default: batches of 32).
    """

    args: tuple
    timesteps: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    batch_sizes: tuple | None = None

    def __post_init__(self) -> None:
        if isinstance(self.args, torch.Tensor):
            self.args = (self.args,)
        self.args = tuple(self.args)
        if not isinstance(self.timesteps, torch.Tensor) or self.timesteps.ndim != 1:
            raise ValueError("CalibSamples.timesteps must be a 1-D tensor with one timestep tag per sample, got "
                             f"{type(self.timesteps).__name__} {tuple(getattr(self.timesteps, 'shape', ()))}")
        n = self.timesteps.shape[0]
        if n == 0:
            raise ValueError("CalibSamples is empty")
        if not torch.isfinite(self.timesteps.double()).all():
            raise ValueError("CalibSamples.timesteps must be finite")
        tensors = [a for a in self.args if a is not None] + [v for v in self.kwargs.values()
                                                               if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ValueError("CalibSamples needs at least one tensor input")
        for a in self.args:
            if a is not None and not isinstance(a, torch.Tensor):
                raise ValueError(f"CalibSamples.args must be Tensors or None, got {type(a).__name__}")
        for a in tensors:
            if a.ndim == 0 or a.shape[0] != n:
                raise ValueError(f"every CalibSamples input must have the batch dim first with {n} rows (one per "
                                 f"timestep tag), got shape {tuple(a.shape)}")
        if self.batch_sizes is None:
            self.batch_sizes = tuple(min(32, n - i) for i in range(0, n, 32))
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if sum(self.batch_sizes) != n or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive and sum to {n}, got {self.batch_sizes}")

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def select(self, idx: torch.Tensor | slice) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the samples ``idx``."""
        cut = lambda v: v[idx] if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()}

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        """The recorded calls ``((args...), {kwargs})`` in order (what :func:`qdrift.quant.quantize` replays)."""
        start = 0
        for b in self.batch_sizes:
            yield self.select(slice(start, start + b))
            start += b


def record_calib_samples(model: nn.Module, run: Callable[[nn.Module], Any], *, timestep_arg: int | str = 1,
                         ) -> CalibSamples:
    """Record every call of ``model`` made by ``run(model)`` (e.g. a full-precision sampler loop).

    Args:
        model: the full-precision network.
        run: ``run(model)`` calls the network (batch-first inputs).
        timestep_arg: position (int) or keyword (str) of the timestep input, used as the sample's tag; a 0-d or
            1-element timestep is broadcast over the call's batch.

    Returns:
        :class:`CalibSamples` with the calls concatenated and ``batch_sizes`` the calls' batch sizes.
    """
    calls: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        calls.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run(model)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("run(model) never called the model")
    sizes, tags = [], []
    for args, kwargs in calls:
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim), None)
        if first is None:
            raise ValueError("recorded calls need a batch-first tensor input")
        b = first.shape[0]
        t = args[timestep_arg] if isinstance(timestep_arg, int) and timestep_arg < len(args) else (
            kwargs.get(timestep_arg) if isinstance(timestep_arg, str) else None)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"timestep_arg={timestep_arg!r} is not a tensor input of the recorded calls")
        if t.numel() == 1 and b > 1:  # one timestep for the whole call: give every row its own copy
            t = t.reshape(1).expand(b).clone()
            if isinstance(timestep_arg, int):
                args = args[:timestep_arg] + (t,) + args[timestep_arg + 1:]
            else:
                kwargs = dict(kwargs, **{timestep_arg: t})
            calls[len(sizes)] = (args, kwargs)
        tags.append(t.reshape(-1).to(torch.float64))
        sizes.append(b)
    n_args = len(calls[0][0])
    cat = lambda vs: torch.cat(vs) if isinstance(vs[0], torch.Tensor) else vs[0]  # noqa: E731
    args = tuple(None if calls[0][0][j] is None else cat([c[0][j] for c in calls]) for j in range(n_args))
    kwargs = {k: cat([c[1][k] for c in calls]) for k in calls[0][1]}
    return CalibSamples(args, torch.cat(tags), kwargs, tuple(sizes))


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ReconConfig:
    """Settings of :func:`reconstruct` (module docstring: what each one is in the papers and here).

    Args:
        iters: Adam steps per block. batch_size: samples per step. lr: Adam step on ``V``.
        reg_weight: weight of the rounding regularizer. beta: (start, end) of its annealed exponent.
        warmup: share of ``iters`` without the regularizer.
        blocks: names of the modules reconstructed as blocks, in order (default :func:`find_blocks`).
        seed: seeds the minibatches, the validation split and GAC's batches (own generators, no global RNG).
        progress: show a progress bar per block.
        groups: GAC timestep groups. val_fraction: GAC validation share (balanced over groups). tau: softmax
            temperature. gac_steps: outer updates of ``s`` per block. gac_lr: Adam step on ``s`` (0 freezes the
            weights equal: GAC then reduces to BRECQ).
    """

    iters: int = 200
    batch_size: int = 16
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple = (20.0, 2.0)
    warmup: float = 0.2
    blocks: Sequence[str] | None = None
    seed: int = 0
    progress: bool = False
    groups: int = 5
    val_fraction: float = 0.05
    tau: float = 1.0
    gac_steps: int = 10
    gac_lr: float = 0.05

    @classmethod
    def from_options(cls, options: ReconConfig | dict | None) -> ReconConfig:
        """Build from a dict (unknown keys raise ``ValueError`` naming the valid ones) or pass through."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"reconstruction options must be a dict or ReconConfig, got {type(options).__name__}")
        valid = {f.name for f in fields(cls)}
        bad = set(options) - valid
        if bad:
            raise ValueError(f"unknown reconstruction options {sorted(bad)}; valid: {sorted(valid)}")
        cfg = cls(**options)
        for key in ("iters", "batch_size", "groups", "gac_steps"):
            v = getattr(cfg, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "gac_steps" else 1):
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        for key in ("lr", "reg_weight", "gac_lr"):
            if not getattr(cfg, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)!r}")
        if not 0 <= cfg.warmup < 1 or not 0 < cfg.val_fraction < 1 or not cfg.tau > 0:
            raise ValueError("need warmup in [0, 1), val_fraction in (0, 1) and tau > 0, got "
                             f"{cfg.warmup}, {cfg.val_fraction}, {cfg.tau}")
        return cfg


# ----------------------------------------------------------------------------------------------------------------
# AdaRound pieces


def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (Nagel et al. 2020, Eq. 23)."""
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = (w - lo) / (hi - lo)`` (the float weight), clipped into (0, 1) where ``hi == lo``."""
    d = hi - lo
    frac = torch.where(d.abs() > 0, (w - lo) / torch.where(d.abs() > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    frac = frac.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def _round_reg(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's regularizer ``sum 1 - |2 h - 1|^beta`` (Eq. 24)."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def _beta_at(it: int, cfg: ReconConfig) -> float | None:
    """BRECQ's linear temperature decay of ``beta`` after the warm-up; None during the warm-up."""
    start = int(cfg.warmup * cfg.iters)
    if it < start:
        return None
    ratio = (it - start) / max(1, cfg.iters - start)
    b0, b1 = cfg.beta
    return b1 + (b0 - b1) * max(0.0, 1 - ratio)


@dataclass
class _Rounding:
    """One quantized layer's learnable rounding: weight ``lo + h(V) (hi - lo)`` at ``key`` inside its block."""

    key: str
    lo: torch.Tensor
    hi: torch.Tensor
    V: torch.Tensor

    def soft(self, V: torch.Tensor | None = None) -> torch.Tensor:
        return self.lo + rectified_sigmoid(self.V if V is None else V) * (self.hi - self.lo)

    def hard(self) -> torch.Tensor:
        """Every weight exactly ``lo`` or ``hi``: a grid value."""
        return torch.where(rectified_sigmoid(self.V) >= 0.5, self.hi, self.lo)


# ----------------------------------------------------------------------------------------------------------------
# grids: the two neighbouring grid values of every weight, per scheme


def _uniform_neighbours(target: torch.Tensor, scale: torch.Tensor, qmin: float, qmax: float,
                        offset: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``offset + scale * k`` for integer ``k`` in ``[qmin, qmax]``: the values just below and above target."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    k = torch.floor((target - offset) / safe).clamp(qmin, qmax)
    k_hi = (k + 1).clamp(qmin, qmax)
    return offset + k * scale, offset + k_hi * scale


def _mixdq_grid(q: nn.Module, fp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .functional import signed_qmax

    w = fp.weight.detach().to(torch.float64)
    qmax = signed_qmax(q.weight_bits)
    scale = (w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / qmax).expand_as(w)
    lo, hi = _uniform_neighbours(w, scale, -qmax, qmax)
    return w, lo, hi


def _svdquant_grid(q: nn.Module, fp: nn.Module, weight_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .functional import signed_qmax
    from .layers import weight_columns, weight_from_columns

    w = fp.weight.detach().to(torch.float64)
    lam = q.smooth.to(torch.float64)
    resid = weight_from_columns(weight_columns(w) * lam, w.shape)
    if q.rank > 0:  # R = W diag(lambda) - up @ down
        resid = resid - (q.lr_up.double() @ q.lr_down.double().reshape(q.rank, -1)).reshape(w.shape)
    cols = weight_columns(resid)
    qmax = signed_qmax(weight_bits)
    n, g = cols.shape[-1], q.act_group
    pad = (-n) % g
    padded = torch.nn.functional.pad(cols, (0, pad)).reshape(*cols.shape[:-1], -1, g)
    scale = (padded.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax).expand_as(padded)
    scale = weight_from_columns(scale.reshape(*cols.shape[:-1], -1)[..., :n], w.shape)
    lo, hi = _uniform_neighbours(resid, scale, -qmax, qmax)
    return resid, lo, hi


def _layer_grids(qmodel: nn.Module, model: nn.Module) -> dict[str, tuple[str, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]]:
    """``{layer name: (weight attribute, target, lo, hi)}`` for every layer whose rounding can be learned."""
    from .formats import format_grids
    from .layers import MixDQLayer, SVDQuantLayer

    rep = qmodel.qdrift_quant
    if "tensors" in rep:  # a weight-only format: grids read from the format's library
        return format_grids(qmodel, model)
    out = {}
    for name, q in qmodel.named_modules():
        if isinstance(q, MixDQLayer) and q.weight_bits <= 16:
            out[name] = ("weight_q",) + _mixdq_grid(q, model.get_submodule(name))
        elif isinstance(q, SVDQuantLayer):
            out[name] = ("weight_q",) + _svdquant_grid(q, model.get_submodule(name), rep["options"]["weight_bits"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# blocks


def find_blocks(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """The highest modules below the root that hold quantized layers and have their own ``forward``.

    Containers (``ModuleList``, ``Sequential``, ``ModuleDict``, bare ``nn.Module`` holders) are descended into.
    For the bench U-Net: ``conv_in``, each ``down.i`` / ``up.i``, ``mid1``, ``mid_attn``, ``mid2``, ``conv_out``;
    for the DiT: each ``blocks.i`` and ``final.linear``.
    """
    names = list(layer_names)
    out: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for child_name, child in mod.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if not any(n == full or n.startswith(full + ".") for n in names):
                continue
            container = isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) or (
                type(child).forward is nn.Module.forward)
            if container and full not in names:
                visit(full, child)
            else:
                out.append(full)

    visit("", model)
    return out


def _capture(model: nn.Module, blocks: Sequence[str], samples: CalibSamples,
             chunk: int = 64) -> dict[str, tuple[tuple, dict, torch.Tensor]]:
    """Inputs ``(args, kwargs)`` and output of every block for every calibration sample (batch first), one pass."""
    seen: dict[str, list] = {b: [] for b in blocks}

    def hook_for(block: str):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"block {block!r} returns {type(output).__name__}; reconstruction needs a Tensor "
                                 "output: pass blocks=[...] naming modules that return one")
            seen[block].append((args, kwargs, output))
        return hook

    handles = [model.get_submodule(b).register_forward_hook(hook_for(b), with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            n = len(samples)
            for start in range(0, n, chunk):
                args, kwargs = samples.select(slice(start, min(n, start + chunk)))
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for block, calls in seen.items():
        if not calls:
            raise ValueError(f"the calibration samples never reached block {block!r}; pass blocks=[...] naming "
                             "modules the model calls")
        rows = sum(o.shape[0] for _, _, o in calls)
        if rows != len(samples):
            raise ValueError(f"block {block!r} saw {rows} rows for {len(samples)} calibration samples (called more "
                             "than once per forward, or not batch-first); pass blocks=[...]")
        b0 = calls[0][2].shape[0]
        cat = lambda vs: (torch.cat(vs) if isinstance(vs[0], torch.Tensor) and vs[0].ndim  # noqa: E731
                          and vs[0].shape[0] == b0 else vs[0])
        args = tuple(cat([c[0][j] for c in calls]) for j in range(len(calls[0][0])))
        kwargs = {k: cat([c[1][k] for c in calls]) for k in calls[0][1]}
        out[block] = (args, kwargs, torch.cat([c[2] for c in calls]))
    return out


class _BlockProblem:
    """One block's reconstruction problem: quantized block, learnable roundings, FP inputs and targets."""

    def __init__(self, qblock: nn.Module, roundings: list[_Rounding], args: tuple, kwargs: dict,
                 target: torch.Tensor) -> None:
        self.qblock, self.roundings = qblock, roundings
        self.args, self.kwargs, self.target = args, kwargs, target
        self.n = target.shape[0]

    def err(self, idx: torch.Tensor, Vs: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Per-sample output error ``sum_j (f_q(x_i)_j - f(x_i)_j)^2`` ``[len(idx)]`` at rounding logits ``Vs``."""
        Vs = [r.V for r in self.roundings] if Vs is None else Vs
        weights = {r.key: r.soft(V) for r, V in zip(self.roundings, Vs)}
        cut = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == self.n else v  # noqa: E731
        out = functional_call(self.qblock, weights, tuple(cut(a) for a in self.args),
                              {k: cut(v) for k, v in self.kwargs.items()}, strict=False)
        return (out - self.target[idx]).pow(2).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# GAC: timestep groups, validation split, gradient alignment, the outer update of s


def timestep_groups(timesteps: torch.Tensor, groups: int) -> torch.Tensor:
    """Group id ``[N]`` (0 .. G-1): the sorted distinct timesteps split into ``groups`` contiguous runs.

    With fewer distinct timesteps than ``groups`` each timestep is its own group.
    """
    uniq, inverse = torch.unique(timesteps, sorted=True, return_inverse=True)
    g = min(groups, uniq.numel())
    bounds = torch.tensor_split(torch.arange(uniq.numel()), g)
    gid_of_uniq = torch.empty(uniq.numel(), dtype=torch.long)
    for k, b in enumerate(bounds):
        gid_of_uniq[b] = k
    return gid_of_uniq[inverse]


def validation_split(group: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a validation split with ``max(1, round(fraction * n_g))`` samples of each group ``g``."""
    out = []
    for g in torch.unique(group):
        members = torch.nonzero(group == g).flatten()
        k = max(1, round(fraction * members.numel()))
        if k >= members.numel():
            raise ValueError(f"timestep group {int(g)} has {members.numel()} calibration samples: too few for a "
                             "validation split; record more samples per timestep")
        out.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
    return torch.sort(torch.cat(out)).values


def gradient_alignment_loss(G: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_GM = -2 / (T (T - 1)) sum_{t < k} G_t . G_k`` for per-group gradients ``G_t`` (flat, same length)."""
    T = len(G)
    if T < 2:
        raise ValueError("gradient alignment needs at least 2 timestep groups")
    total = sum((G[t] * G[k]).sum() for t in range(T) for k in range(t + 1, T))
    return -2.0 / (T * (T - 1)) * total


def _sample_weights(s: torch.Tensor, tau: float) -> torch.Tensor:
    """``N softmax(s / tau)``: exactly 1 for every sample when all ``s`` are equal."""
    z = s / tau
    e = torch.exp(z - z.max())
    return e / e.mean()


def _gac_losses(prob: _BlockProblem, s: torch.Tensor, train_idx: torch.Tensor, batch: torch.Tensor,
                val_idx: torch.Tensor, val_group: torch.Tensor, tau: float, step_rms: float
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One-step virtual update and the validation losses at ``V'``: ``(V', L_GM, L_MSE)`` (graph kept)."""
    Vs = [r.V for r in prob.roundings]
    w = _sample_weights(s, tau)
    inner = (w[batch] * prob.err(train_idx[batch], Vs)).mean()
    g = torch.autograd.grad(inner, Vs, create_graph=True)
    gnorm = torch.sqrt(sum(gi.pow(2).sum() for gi in g) / sum(gi.numel() for gi in g))
    alpha = step_rms / gnorm.clamp_min(1e-30)  # virtual step of rms size ``lr`` (its dependence on s included)
    V1 = [V - alpha * gi for V, gi in zip(Vs, g)]
    G, l_mse = [], 0.0
    for k in torch.unique(val_group):
        idx = val_idx[val_group == k]
        lk = prob.err(idx, V1).mean()
        gk = torch.autograd.grad(lk, V1, create_graph=True)
        G.append(torch.cat([x.flatten() for x in gk]))
        l_mse = l_mse + lk * idx.numel() / val_idx.numel()
    return V1, gradient_alignment_loss(G), l_mse


def _gac_update(prob: _BlockProblem, s: torch.Tensor, opt: torch.optim.Optimizer, train_idx: torch.Tensor,
                val_idx: torch.Tensor, val_group: torch.Tensor, cfg: ReconConfig,
                gen: torch.Generator) -> dict[str, float]:
    """``cfg.gac_steps`` outer updates of ``s`` on one block; returns L_GM / L_MSE before and after."""
    hist: dict[str, float] = {}
    with _math_attention():  # CPU flash attention has no double backward; the math kernel does
        for step in range(cfg.gac_steps):
            _gac_step(prob, s, opt, train_idx, val_idx, val_group, cfg, gen, hist, step)
    return hist


def _math_attention():
    """Context forcing ``scaled_dot_product_attention`` onto its composite (twice differentiable) math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no sdpa_kernel: the kernel choice is left to torch
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _gac_step(prob: _BlockProblem, s: torch.Tensor, opt: torch.optim.Optimizer, train_idx: torch.Tensor,
              val_idx: torch.Tensor, val_group: torch.Tensor, cfg: ReconConfig, gen: torch.Generator,
              hist: dict[str, float], step: int) -> None:
    """One outer update of ``s``: virtual step, validation losses, ``dL_val/ds``, Adam."""
    batch = torch.randperm(train_idx.numel(), generator=gen)[:cfg.batch_size]  # the whole split if it fits
    V1, l_gm, l_mse = _gac_losses(prob, s, train_idx, batch, val_idx, val_group, cfg.tau, cfg.lr)
    if step == 0:
        hist.update(l_gm_before=float(l_gm.detach()), l_mse_before=float(l_mse.detach()))
    g_val = torch.autograd.grad(l_gm + l_mse, V1, retain_graph=True)  # grad_{V'} L_val (HVPs inside)
    (ds,) = torch.autograd.grad(V1, s, grad_outputs=g_val)  # (dV'/ds)^T grad_{V'} L_val
    opt.zero_grad()
    s.grad = ds
    opt.step()
    hist.update(l_gm_last=float(l_gm.detach()), l_mse_last=float(l_mse.detach()))


# ----------------------------------------------------------------------------------------------------------------
# the driver


def _reconstruct_block(prob: _BlockProblem, omega: torch.Tensor, cfg: ReconConfig, gen: torch.Generator,
                       bar: Any) -> None:
    """AdaRound on one block: Adam on the ``V`` of its layers, weighted output error plus the regularizer."""
    Vs = [r.V for r in prob.roundings]
    opt = torch.optim.Adam(Vs, lr=cfg.lr)
    for it in range(cfg.iters):
        idx = torch.randint(prob.n, (min(cfg.batch_size, prob.n),), generator=gen)
        rec = (omega[idx] * prob.err(idx)).mean()  # BRECQ: sum over output elements, mean over samples
        beta = _beta_at(it, cfg)
        loss = rec if beta is None else rec + cfg.reg_weight * sum(_round_reg(rectified_sigmoid(V), beta)
                                                                   for V in Vs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar is None:
            continue
        bar.update(1)
        if it % 50 == 0 or it == cfg.iters - 1:
            bar.set_postfix(rec=f"{float(rec.detach()):.3g}")


def reconstruct(qmodel: nn.Module, model: nn.Module, samples: CalibSamples, method: str,
                options: ReconConfig | dict | None = None) -> dict[str, Any]:
    """Learn the rounding of every quantized weight of ``qmodel`` block by block (in place); deterministic.

    Args:
        qmodel: the output of :func:`qdrift.quant.quantize` (round-to-nearest weights), modified in place.
        model: the full-precision model it was quantized from (same module names).
        samples: timestep-tagged calibration inputs (:class:`CalibSamples`).
        method: ``"brecq"`` (uniform sample weights) or ``"gac"`` (gradient-aligned sample weights).
        options: :class:`ReconConfig` or a dict of its fields.

    Returns:
        Report: ``method``, ``options``, ``seconds``, ``blocks`` ``{name: {layers, err_rtn, err, gac...}}`` (mean
        per-sample block output error before / after), ``sample_weights`` (GAC: final ``w`` of the training split),
        ``n_samples``, ``n_groups``.
    """
    import time

    if method not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction {method!r}; expected None or one of {RECONSTRUCTIONS}")
    if not isinstance(samples, CalibSamples):
        raise ValueError("reconstruction needs timestep-tagged calibration samples: a qdrift.quant.CalibSamples "
                         f"(e.g. from record_calib_samples), got {type(samples).__name__}")
    cfg = ReconConfig.from_options(options)
    t0 = time.perf_counter()
    grids = _layer_grids(qmodel, model)
    if not grids:
        raise ValueError("no quantized layer with a learnable rounding in this model")
    blocks = list(cfg.blocks) if cfg.blocks is not None else find_blocks(qmodel, list(grids))
    owner = {}
    for layer in grids:
        b = next((b for b in blocks if layer == b or layer.startswith(b + ".")), None)
        if b is None:
            raise ValueError(f"quantized layer {layer!r} lies in none of the blocks {blocks}")
        owner[layer] = b
    gen = torch.Generator().manual_seed(cfg.seed)
    gac_gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(samples)
    omega = torch.ones(n)
    report: dict[str, Any] = dict(method=method, options={f.name: getattr(cfg, f.name) for f in fields(cfg)},
                                  blocks={}, n_samples=n)
    if method == "gac":
        group = timestep_groups(samples.timesteps, cfg.groups)
        if int(group.max()) < 1:
            raise ValueError("gac needs calibration samples from at least 2 distinct timesteps")
        val_idx = validation_split(group, cfg.val_fraction, gac_gen)
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[val_idx] = True
        train_idx = torch.nonzero(~is_val).flatten()
        s = torch.zeros(train_idx.numel(), requires_grad=True)
        s_opt = torch.optim.Adam([s], lr=cfg.gac_lr)
        report.update(n_groups=int(group.max()) + 1, n_val=int(val_idx.numel()))
    blocks = [b for b in blocks if any(ob == b for ob in owner.values())]
    captured = _capture(model, blocks, samples)
    bar = tqdm(total=len(blocks) * cfg.iters, disable=not cfg.progress, desc=f"{method} reconstruction")
    try:
        for b in blocks:
            layers = [name for name, ob in owner.items() if ob == b]
            args, kwargs, target = captured.pop(b)
            qblock = qmodel.get_submodule(b)
            roundings = []
            for name in layers:
                attr, tgt, lo, hi = grids[name]
                rel = name[len(b) + 1:] if name != b else ""
                key = f"{rel}.{attr}" if rel else attr
                dtype = getattr(qmodel.get_submodule(name), attr).dtype
                V = adaround_init(tgt, lo, hi).to(dtype).requires_grad_(True)
                roundings.append(_Rounding(key, lo.to(dtype), hi.to(dtype), V))
            prob = _BlockProblem(qblock, roundings, args, kwargs, target)
            entry: dict[str, Any] = dict(layers=layers, err_rtn=_rtn_err(prob, qblock))
            if method == "gac" and cfg.gac_steps > 0:
                entry["gac"] = _gac_update(prob, s, s_opt, train_idx, val_idx, group[val_idx], cfg, gac_gen)
                with torch.no_grad():
                    omega[train_idx] = _sample_weights(s.detach(), cfg.tau)
            bar.set_description(f"{method} {b}")
            _reconstruct_block(prob, omega, cfg, gen, bar)
            with torch.no_grad():
                for r, name in zip(roundings, layers):
                    q = qmodel.get_submodule(name)
                    getattr(q, grids[name][0]).copy_(r.hard())
            entry["err"] = _rtn_err(prob, qblock)
            report["blocks"][b] = entry
    finally:
        bar.close()
    if method == "gac":
        report["sample_weights"] = dict(train_idx=train_idx.tolist(), w=omega[train_idx].tolist(),
                                        timesteps=samples.timesteps[train_idx].tolist())
    report["seconds"] = time.perf_counter() - t0
    return report


@torch.no_grad()
def _rtn_err(prob: _BlockProblem, qblock: nn.Module, chunk: int = 256) -> float:
    """Mean per-sample output error of the block with the weights it currently holds."""
    tot = 0.0
    cut_n = prob.n
    for start in range(0, cut_n, chunk):
        idx = torch.arange(start, min(cut_n, start + chunk))
        cut = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == cut_n else v  # noqa: E731
        out = qblock(*(cut(a) for a in prob.args), **{k: cut(v) for k, v in prob.kwargs.items()})
        tot += float((out - prob.target[idx]).double().pow(2).flatten(1).sum(1).sum())
    return tot / cut_n
