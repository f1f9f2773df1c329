"""Streaming, mergeable paired statistics of (d_fp, d_q) per (step, channel).

Counts, means, centered second moments and the centered co-moment are kept in float64 and merged with
Chan et al.'s parallel update, so any split of the data -- batches, processes, nodes -- gives the same
result as one pass over all of it (up to float64 rounding of the merge order).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from einops import rearrange

from ..correction import band_components

__all__ = ["DeltaMoments", "PairedMoments", "batch_moments", "gather_moments", "gather_sums", "sum_over_ranks"]

MOMENT_FIELDS = ("n", "mean_fp", "mean_q", "m2_fp", "m2_q", "c_fq")
"""The fields of :class:`PairedMoments` (and the moment tensors of a calibration file), in order."""
_FIELDS = MOMENT_FIELDS


class DeltaMoments:
    """Moments of the error ``delta = d_q - d_fp`` from those of the pair (mixin).

    Needs ``mean_fp, mean_q, var_fp, var_q, cov`` (``Cov(d_fp, d_q)``) on the class, all the same shape.
    """

    @property
    def mean_delta(self) -> torch.Tensor:
        """``E[delta]`` with ``delta = d_q - d_fp`` ``[S, C]``."""
        return self.mean_q - self.mean_fp

    @property
    def var_delta(self) -> torch.Tensor:
        """``Var(delta) = Var(d_q) + Var(d_fp) - 2 Cov`` ``[S, C]`` (the paper's "unconditional" V)."""
        return (self.var_q + self.var_fp - 2 * self.cov).clamp(min=0)

    @property
    def cov_delta_q(self) -> torch.Tensor:
        """``Cov(delta, d_hat) = Var(d_q) - Cov(d_fp, d_q)`` ``[S, C]``."""
        return self.var_q - self.cov

    @property
    def cov_delta_fp(self) -> torch.Tensor:
        """``Cov(delta, d_fp) = Cov(d_fp, d_q) - Var(d_fp)`` ``[S, C]``."""
        return self.cov - self.var_fp

    def gain_slope(self) -> torch.Tensor:
        """The least-squares slope ``k = Cov(delta, d_fp) / Var(d_fp)`` of the error on the full-precision
        output (PTQD's correlated part, arXiv 2305.10657) ``[S, C]``; 0 where ``d_fp`` does not vary."""
        var_fp = self.var_fp
        return torch.where(var_fp > 1e-12, self.cov_delta_fp / var_fp.clamp(min=1e-12), torch.zeros_like(var_fp))

    def gain_residual(self, k: torch.Tensor):
        """Bias and residual variance of the split ``delta = k d_fp + b + r`` for a given gain ``k``.

        Returns:
            ``(b, var_r)``: ``b = E[delta] - k E[d_fp]`` and ``Var(r) = Var(delta) - 2 k Cov(delta, d_fp) +
            k^2 Var(d_fp)``, each ``[S, C]``.
        """
        b = self.mean_delta - k * self.mean_fp
        var_r = (self.var_delta - 2.0 * k * self.cov_delta_fp + k * k * self.var_fp).clamp(min=0.0)
        return b, var_r

    def conditional_variance(self) -> torch.Tensor:
        """``Var(delta | d_hat) = Var(delta) - Cov(delta, d_hat)^2 / Var(d_hat)`` ``[S, C]`` (paper Eq. 9).

        The linear-Gaussian conditional variance, ``Var(delta) (1 - rho^2)``; where ``Var(d_hat) = 0`` it is
        ``Var(delta)``.
        """
        var_q = self.var_q
        explained = torch.where(var_q > 0, self.cov_delta_q**2 / var_q.clamp(min=1e-300), torch.zeros_like(var_q))
        return (self.var_delta - explained).clamp(min=0)


@dataclass
class PairedMoments(DeltaMoments):
    """Sufficient statistics of the pair ``(a, b) = (d_fp, d_q)``, each field ``[S, C]`` float64.

    Attributes:
        n: sample counts (after trimming).
        mean_fp, mean_q: means of ``d_fp`` and ``d_q``.
        m2_fp, m2_q: centered sums of squares ``sum (a - mean_a)^2``.
        c_fq: centered co-moment ``sum (a - mean_a)(b - mean_b)``.
    """

    n: torch.Tensor
    mean_fp: torch.Tensor
    mean_q: torch.Tensor
    m2_fp: torch.Tensor
    m2_q: torch.Tensor
    c_fq: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.n.shape
        for f in _FIELDS:
            value = getattr(self, f)
            if not isinstance(value, torch.Tensor) or value.shape != shape or value.ndim != 2:
                raise ValueError(f"PairedMoments.{f} must be a 2-D tensor of shape {tuple(shape)}, got {value!r:.80}")
            setattr(self, f, value.detach().to(device="cpu", dtype=torch.float64))

    @classmethod
    def zeros(cls, steps: int, channels: int) -> "PairedMoments":
        """Empty statistics for ``steps`` noise levels and ``channels`` channels."""
        return cls(*(torch.zeros(steps, channels, dtype=torch.float64) for _ in _FIELDS))

    @property
    def shape(self):
        """``(S, C)``."""
        return tuple(self.n.shape)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The six fields by name."""
        return {f: getattr(self, f) for f in _FIELDS}

    def _ratio(self, m2: torch.Tensor) -> torch.Tensor:
        return torch.where(self.n > 0, m2 / self.n.clamp(min=1), torch.zeros_like(m2))

    @property
    def var_fp(self) -> torch.Tensor:
        """Population variance of ``d_fp`` ``[S, C]``."""
        return self._ratio(self.m2_fp)

    @property
    def var_q(self) -> torch.Tensor:
        """Population variance of ``d_hat = d_q`` ``[S, C]``."""
        return self._ratio(self.m2_q)

    @property
    def cov(self) -> torch.Tensor:
        """``Cov(d_fp, d_q)`` ``[S, C]``."""
        return self._ratio(self.c_fq)

    def merge(self, other: "PairedMoments") -> "PairedMoments":
        """Statistics of the union of both data sets (Chan et al. 1979); neither input is changed."""
        if not isinstance(other, PairedMoments) or other.shape != self.shape:
            raise ValueError(f"PairedMoments.merge: need moments of shape {self.shape}, got {getattr(other, 'shape', other)}")
        n = self.n + other.n
        frac = torch.where(n > 0, other.n / n.clamp(min=1e-300), torch.zeros_like(n))
        weight = self.n * frac  # n_a n_b / n
        d_fp = other.mean_fp - self.mean_fp
        d_q = other.mean_q - self.mean_q
        return PairedMoments(
            n=n,
            mean_fp=self.mean_fp + d_fp * frac,
            mean_q=self.mean_q + d_q * frac,
            m2_fp=self.m2_fp + other.m2_fp + d_fp * d_fp * weight,
            m2_q=self.m2_q + other.m2_q + d_q * d_q * weight,
            c_fq=self.c_fq + other.c_fq + d_fp * d_q * weight,
        )

    def pooled(self) -> "PairedMoments":
        """Statistics pooled over channels, ``[S, 1]`` (the paper's scalar-per-step V)."""
        n = self.n.sum(1, keepdim=True)
        safe = n.clamp(min=1e-300)
        mean_fp = (self.n * self.mean_fp).sum(1, keepdim=True) / safe
        mean_q = (self.n * self.mean_q).sum(1, keepdim=True) / safe
        dev_fp, dev_q = self.mean_fp - mean_fp, self.mean_q - mean_q
        return PairedMoments(
            n=n,
            mean_fp=mean_fp,
            mean_q=mean_q,
            m2_fp=(self.m2_fp + self.n * dev_fp**2).sum(1, keepdim=True),
            m2_q=(self.m2_q + self.n * dev_q**2).sum(1, keepdim=True),
            c_fq=(self.c_fq + self.n * dev_fp * dev_q).sum(1, keepdim=True),
        )

    def select(self, index) -> "PairedMoments":
        """Rows ``index`` of every field (e.g. a subset of steps)."""
        return PairedMoments(**{f: getattr(self, f)[index] for f in _FIELDS})


def batch_moments(d_fp: torch.Tensor, d_q: torch.Tensor, trim: Optional[float] = 4.0) -> PairedMoments:
    """Moments of one batch at one step, per channel, pooling batch and spatial positions: ``[1, C]``.

    Args:
        d_fp: full-precision ``d`` ``[B, C, ...]``.
        d_q: quantized ``d_hat`` ``[B, C, ...]``.
        trim: drop pairs whose ``delta`` lies more than ``trim`` standard deviations from the mean delta of
            *its own sample and channel* (over the spatial positions; the authors trim at 4). Trimming per
            sample makes the kept set independent of how samples are batched, merged or spread over
            processes, so any split gives the same statistics. Samples without spatial positions are not
            trimmed. None or 0 keeps all.

    Raises:
        ValueError: if the shapes differ or an output is not finite.
    """
    if d_fp.shape != d_q.shape or d_fp.ndim < 2:
        raise ValueError(
            f"calibrate: the two models' outputs must have the same shape [B, C, ...], got {tuple(d_fp.shape)} "
            f"and {tuple(d_q.shape)}"
        )
    batch, channels = d_fp.shape[:2]
    a = d_fp.detach().to(torch.float64).reshape(batch, channels, -1)
    b = d_q.detach().to(torch.float64).reshape(batch, channels, -1)
    if trim and a.shape[-1] > 1:
        delta = b - a
        mu = delta.mean(-1, keepdim=True)
        sd = delta.std(-1, correction=0, keepdim=True)
        w = ((delta - mu).abs() <= trim * sd).to(torch.float64)
    else:
        w = torch.ones_like(a)
    a, b, w = (t.transpose(0, 1).reshape(channels, -1) for t in (a, b, w))
    n = w.sum(1)
    safe = n.clamp(min=1)
    mean_a = (a * w).sum(1) / safe
    mean_b = (b * w).sum(1) / safe
    da = (a - mean_a[:, None]) * w
    db = (b - mean_b[:, None]) * w
    return PairedMoments(
        n=n[None],
        mean_fp=mean_a[None],
        mean_q=mean_b[None],
        m2_fp=(da * da).sum(1)[None],
        m2_q=(db * db).sum(1)[None],
        c_fq=(da * db).sum(1)[None],
    )


def gather_moments(moments: PairedMoments, group=None) -> PairedMoments:
    """Merges every process's moments (``torch.distributed``), in rank order, on every process.

    An all-gather of the small ``[6, S, C]`` statistics followed by the same Chan merge as a single process
    would do, so the result equals a one-process run over all ranks' data. Works with any backend; the
    statistics travel on the device the backend needs (CUDA for NCCL).
    """
    import torch.distributed as dist

    stacked = torch.stack([getattr(moments, f) for f in _FIELDS]).to(_backend_device(group))
    parts: List[torch.Tensor] = [torch.empty_like(stacked) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stacked, group=group)
    merged = PairedMoments.zeros(*moments.shape)
    for part in parts:
        merged = merged.merge(PairedMoments(*part.cpu()))
    return merged


def gather_sums(sums: "TrajectorySums", group=None) -> "TrajectorySums":
    """Adds every process's :class:`TrajectorySums` (``torch.distributed`` all-reduce), on every process."""
    import torch.distributed as dist

    device = _backend_device(group)
    out = {}
    for name, value in sums.tensors().items():
        t = value.to(device)
        dist.all_reduce(t, group=group)
        out[name] = t.cpu()
    return TrajectorySums(**out)


def _backend_device(group) -> torch.device:
    """The device collectives of ``group`` need (CUDA for NCCL, else CPU)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(value: int, group=None) -> int:
    """Sums an integer over all ranks of ``group``."""
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_backend_device(group))
    dist.all_reduce(t, group=group)
    return int(round(float(t)))


_TRAJ_FIELDS = ("n", "sum_d", "sum_e", "sum_x", "sum_xx", "sum_xd", "sum_dd", "sum_de", "sum_ee")
_CROSS_FIELDS = ("cross_xx", "cross_xd", "cross_xe")


@dataclass
class TrajectorySums:
    """Cross-step sums of the pair ``(d_fp, delta)`` and the state ``x`` along calibration trajectories.

    :class:`PairedMoments` describes each step on its own. Q-Drift v2 also needs how the error at one step
    relates to the errors at earlier steps of the *same* trajectory (same sample, same position): a quantized
    network's errors on nearby inputs are strongly correlated and accumulate like ``(sum_j h_j delta_j)^2``,
    not ``sum_j h_j^2 V_j``. These are plain float64 sums over samples and spatial positions (untrimmed), so
    merging two sets of sums is adding them, in any order, on any number of processes; memory is ``[S, S, C]``,
    independent of K.

    Attributes:
        n: positions summed per step and channel ``[C]`` (samples x spatial positions).
        sum_d, sum_e: ``sum d_fp`` and ``sum delta`` per step ``[S, C]``.
        sum_x, sum_xx: ``sum x`` and ``sum x^2`` of the state the models were evaluated on ``[S, C]``.
        sum_xd: ``sum x d_fp`` ``[S, C]`` (``Cov(x, d)``: ``sigma`` for an exact VE denoiser, not for flow).
        sum_dd, sum_de, sum_ee: ``sum d_i d_j``, ``sum d_i delta_j``, ``sum delta_i delta_j`` ``[S, S, C]``.
        cross_xx, cross_xd, cross_xe: ``sum x_i x_j``, ``sum x_i d_j``, ``sum x_i delta_j`` ``[S, S, C]``, for the
            error's dependence on the state (the state term of ``Calibration.error_model``); None in statistics
            from before format version 3 (all three or none).
    """

    n: torch.Tensor
    sum_d: torch.Tensor
    sum_e: torch.Tensor
    sum_x: torch.Tensor
    sum_xx: torch.Tensor
    sum_xd: torch.Tensor
    sum_dd: torch.Tensor
    sum_de: torch.Tensor
    sum_ee: torch.Tensor
    cross_xx: Optional[torch.Tensor] = None
    cross_xd: Optional[torch.Tensor] = None
    cross_xe: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, torch.Tensor) or self.n.ndim != 1:
            raise ValueError(f"TrajectorySums.n must be a 1-D tensor [C], got {self.n!r:.80}")
        if not isinstance(self.sum_d, torch.Tensor) or self.sum_d.ndim != 2:
            raise ValueError(f"TrajectorySums.sum_d must be a 2-D tensor [S, C], got {self.sum_d!r:.80}")
        steps, channels = self.sum_d.shape
        pair = (steps, steps, channels)
        expected = {"n": (channels,), "sum_d": (steps, channels), "sum_e": (steps, channels),
                    "sum_x": (steps, channels), "sum_xx": (steps, channels), "sum_xd": (steps, channels), "sum_dd": pair,
                    "sum_de": pair, "sum_ee": pair, "cross_xx": pair, "cross_xd": pair, "cross_xe": pair}
        present = [f for f in _CROSS_FIELDS if getattr(self, f) is not None]
        if present and len(present) != len(_CROSS_FIELDS):
            raise ValueError(f"TrajectorySums: give all of {_CROSS_FIELDS} or none, got only {present}")
        for f in self.fields:
            value = getattr(self, f)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[f]:
                raise ValueError(
                    f"TrajectorySums.{f} must be a tensor of shape {expected[f]}, got "
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                )
            setattr(self, f, value.detach().to(device="cpu", dtype=torch.float64))

    @classmethod
    def zeros(cls, steps: int, channels: int) -> "TrajectorySums":
        """Empty sums for ``steps`` noise levels and ``channels`` channels."""
        s, c = steps, channels
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(z(c), z(s, c), z(s, c), z(s, c), z(s, c), z(s, c), z(s, s, c), z(s, s, c), z(s, s, c),
                   z(s, s, c), z(s, s, c), z(s, s, c))

    @classmethod
    def of_batch(cls, x: torch.Tensor, d_fp: torch.Tensor, d_q: torch.Tensor) -> "TrajectorySums":
        """Sums of one batch of trajectories.

        Args:
            x: states ``[S, B, C, ...]`` the models were evaluated on.
            d_fp, d_q: the two models' ``d`` on them ``[S, B, C, ...]``.
        """
        channels = x.shape[2]
        flat = lambda t: rearrange(t.detach().to(torch.float64), "s b c ... -> s c (b ...)")  # noqa: E731
        xs, d = flat(x), flat(d_fp)
        e = flat(d_q) - d
        # [C, S, P] @ [C, P, S] -> [C, S, S] -> [S, S, C]
        outer = lambda a, b: torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).permute(1, 2, 0)  # noqa: E731
        return cls(
            n=torch.full((channels,), float(xs.shape[-1]), dtype=torch.float64),
            sum_d=d.sum(-1), sum_e=e.sum(-1), sum_x=xs.sum(-1), sum_xx=(xs * xs).sum(-1), sum_xd=(xs * d).sum(-1),
            sum_dd=outer(d, d), sum_de=outer(d, e), sum_ee=outer(e, e),
            cross_xx=outer(xs, xs), cross_xd=outer(xs, d), cross_xe=outer(xs, e),
        )

    @property
    def shape(self):
        """``(S, C)``."""
        return tuple(self.sum_d.shape)

    @property
    def fields(self) -> tuple:
        """The names of the fields these sums hold (the state cross sums only where present)."""
        return _TRAJ_FIELDS + (_CROSS_FIELDS if self.cross_xe is not None else ())

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The fields by name (the state cross sums only where present)."""
        return {f: getattr(self, f) for f in self.fields}

    def merge(self, other: "TrajectorySums") -> "TrajectorySums":
        """Sums of the union of both data sets (element-wise addition; the state cross sums only if both have
        them)."""
        if not isinstance(other, TrajectorySums) or other.shape != self.shape:
            raise ValueError(f"TrajectorySums.merge: need sums of shape {self.shape}, got {getattr(other, 'shape', other)}")
        common = [f for f in self.fields if f in other.fields]
        return TrajectorySums(**{f: getattr(self, f) + getattr(other, f) for f in common})

    def check_consistent(self) -> None:
        """Raises ``ValueError`` naming the first field that no set of trajectories could have summed to: a count
        below 1, a negative sum of squares, or a sum of products above its Cauchy-Schwarz bound
        (``|sum a b| <= sqrt(sum a^2 sum b^2)``, ``(sum a)^2 <= n sum a^2``). For sums read from a file, whose
        tensors arrive one by one; sums this class computes always pass."""
        if bool((self.n < 1).any()):
            raise ValueError(f"TrajectorySums.n must count at least one position per channel, got {self.n.tolist()!r:.80}")
        diag = lambda t: torch.diagonal(t, dim1=0, dim2=1).transpose(0, 1)  # noqa: E731  [S, S, C] -> [S, C]
        cross = self.cross_xe is not None
        squares = {"sum_dd": diag(self.sum_dd), "sum_ee": diag(self.sum_ee), "sum_xx": self.sum_xx}
        if cross:
            squares["cross_xx"] = diag(self.cross_xx)
        for name, sq in squares.items():
            if bool((sq < 0).any()):
                raise ValueError(f"TrajectorySums.{name} has a negative sum of squares")
        dd, ee, xx = squares["sum_dd"], squares["sum_ee"], self.sum_xx
        above = lambda value, bound: bool((value.abs() > bound * (1 + 1e-6) + 1e-12).any())  # noqa: E731
        pairs = {"sum_dd": (dd, dd), "sum_de": (dd, ee), "sum_ee": (ee, ee)}
        if cross:
            pairs.update(cross_xx=(xx, xx), cross_xd=(xx, dd), cross_xe=(xx, ee))
        singles = {"sum_d": (self.sum_d, self.n * dd), "sum_e": (self.sum_e, self.n * ee),
                   "sum_x": (self.sum_x, self.n * xx), "sum_xd": (self.sum_xd, xx * dd)}
        for name, (a, b) in pairs.items():
            if above(getattr(self, name), (a[:, None] * b[None, :]).sqrt()):
                raise ValueError(f"TrajectorySums.{name} has a sum of products above its Cauchy-Schwarz bound")
        for name, (value, product) in singles.items():
            if above(value, product.sqrt()):
                raise ValueError(f"TrajectorySums.{name} is above its Cauchy-Schwarz bound")

    def pooled(self) -> "TrajectorySums":
        """Sums pooled over channels (``[.., 1]``), for one scalar per step."""
        return TrajectorySums(**{f: v.sum(-1, keepdim=True) for f, v in self.tensors().items()})

    def state_variance(self) -> torch.Tensor:
        """``Var(x)`` of the calibration states per step ``[S, C]``."""
        n = self.n.clamp(min=1)
        return (self.sum_xx / n - (self.sum_x / n) ** 2).clamp(min=0)

    def state_d_covariance(self) -> torch.Tensor:
        """``Cov(x, d_fp)`` per step ``[S, C]``."""
        n = self.n.clamp(min=1)
        return self.sum_xd / n - (self.sum_x / n) * (self.sum_d / n)

    def d_variance(self) -> torch.Tensor:
        """``Var(d_fp)`` per step ``[S, C]`` (untrimmed)."""
        n = self.n.clamp(min=1)
        return (torch.diagonal(self.sum_dd, dim1=0, dim2=1).transpose(0, 1) / n - (self.sum_d / n) ** 2).clamp(min=0)

    def step_moments(self) -> Dict[str, torch.Tensor]:
        """Per step ``[S, C]``: the means ``d``, ``e`` (delta), ``x`` and the (co)variances ``dd``, ``de``, ``ee``,
        ``xx``, ``xd``, ``xe`` (``xe`` = ``Cov(x, delta)``, only with the state cross sums)."""
        n = self.n.clamp(min=1)
        diag = lambda t: torch.diagonal(t, dim1=0, dim2=1).transpose(0, 1) / n  # noqa: E731
        out = {"d": self.sum_d / n, "e": self.sum_e / n, "x": self.sum_x / n}
        out.update(dd=diag(self.sum_dd) - out["d"] ** 2, de=diag(self.sum_de) - out["d"] * out["e"],
                   ee=diag(self.sum_ee) - out["e"] ** 2, xx=self.sum_xx / n - out["x"] ** 2,
                   xd=self.sum_xd / n - out["x"] * out["d"])
        if self.cross_xe is not None:
            out["xe"] = diag(self.cross_xe) - out["x"] * out["e"]
        return out

    def residual_covariance(self, gain: torch.Tensor, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Cov(r_i, r_j)`` of the residual ``r = delta - k d_fp - s x`` between steps ``[S, S, C]``.

        Args:
            gain: ``k`` per step ``[S, C]`` or ``[S, 1]`` (zeros: the covariance of delta itself).
            state: ``s`` per step, same shape, or None (0). Needs the state cross sums where nonzero.
        """
        n = self.n.clamp(min=1)
        md, me, mx = self.sum_d / n, self.sum_e / n, self.sum_x / n
        cov = lambda sums, a, b: sums / n - a[:, None] * b[None]  # noqa: E731  [S, S, C]: Cov(a_i, b_j)
        cov_dd, cov_de, cov_ee = cov(self.sum_dd, md, md), cov(self.sum_de, md, me), cov(self.sum_ee, me, me)
        ki, kj = gain[:, None], gain[None]
        out = cov_ee - kj * cov_de.transpose(0, 1) - ki * cov_de + ki * kj * cov_dd
        if state is None or not bool((state != 0).any()):
            return out
        if self.cross_xe is None:
            raise ValueError("TrajectorySums.residual_covariance: a state term needs the state cross sums")
        cov_xx, cov_xd, cov_xe = cov(self.cross_xx, mx, mx), cov(self.cross_xd, mx, md), cov(self.cross_xe, mx, me)
        si, sj = state[:, None], state[None]
        # - s_j Cov(r'_i, x_j) - s_i Cov(x_i, r'_j) + s_i s_j Cov(x_i, x_j), with r' = delta - k d
        return (out - sj * (cov_xe.transpose(0, 1) - ki * cov_xd.transpose(0, 1))
                - si * (cov_xe - kj * cov_xd) + si * sj * cov_xx)

    def residual_correlation(self, gain: torch.Tensor, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Correlation of the residual between steps ``[S, S, C]`` (1 on the diagonal, within [-1, 1])."""
        cov = self.residual_covariance(gain, state)
        var = torch.diagonal(cov, dim1=0, dim2=1).transpose(0, 1).clamp(min=0)  # [S, C]
        scale = (var[:, None] * var[None]).sqrt()
        rho = torch.where(scale > 0, cov / scale.clamp(min=1e-300), torch.zeros_like(cov))
        rho = rho.clamp(-1.0, 1.0)
        eye = torch.eye(rho.shape[0], dtype=rho.dtype)[..., None]
        return rho * (1 - eye) + eye




class PairedAccumulator:
    """Streams paired trajectories into the statistics a :class:`qdrift.Calibration` holds.

    The one accumulator behind :func:`qdrift.calibrate` and :class:`qdrift.calib.PairedTrace`: per
    (step, channel) :class:`PairedMoments` (``delta`` outliers trimmed per sample) and the cross-step
    :class:`TrajectorySums`. Adding batches in any order, or merging accumulators (:meth:`merge`,
    :meth:`gather`), gives the statistics of all the data at once; memory does not grow with the number of
    trajectories.

    With ``bands > 1`` it also keeps the same statistics of every channel's radial frequency bands
    (:func:`qdrift.correction.band_components`: ``C * bands`` units) in :attr:`banded`, for the frequency-resolved
    error model of Q-Drift v2.

    Args:
        trim: ``delta`` outlier trimming in standard deviations (see :func:`batch_moments`); None or 0 keeps all.
        bands: radial frequency bands per channel (1: none).
    """

    def __init__(self, trim: Optional[float] = 4.0, bands: int = 1):
        if not isinstance(bands, numbers.Integral) or isinstance(bands, bool) or bands < 1:
            raise ValueError(f"calibrate: bands must be a positive integer, got {bands!r}")
        self.trim = trim
        self.bands = int(bands)
        self.moments: Optional[PairedMoments] = None
        self.sums: Optional["TrajectorySums"] = None
        self.count = 0
        self.spatial: Optional[tuple] = None  # the grid of the first batch
        self.banded: Optional["PairedAccumulator"] = PairedAccumulator(trim) if bands > 1 else None

    def check_sample(self, x: torch.Tensor, who: str = "calibrate") -> None:
        """Refuses samples ``x`` ``[B, C, ...]`` that frequency bands cannot split (no spatial axes)."""
        if self.bands > 1 and x.ndim < 3:
            raise ValueError(
                f"{who}: bands={self.bands} needs samples with spatial axes [B, C, H, W, ...], got shape "
                f"{tuple(x.shape)}"
            )

    @property
    def shape(self):
        """``(S, C)``, or None before the first batch."""
        return None if self.moments is None else self.moments.shape

    def add(self, x: torch.Tensor, d_fp: torch.Tensor, d_q: torch.Tensor, who: str = "calibrate") -> None:
        """Adds one batch of trajectories.

        Args:
            x: the states the models were evaluated on ``[S, B, C, ...]``.
            d_fp, d_q: the two models' ``d = (x - D) / sigma`` on them, same shape.
            who: the caller named in error messages.

        Raises:
            ValueError: if the shapes disagree with each other or with earlier batches.
        """
        if x.ndim < 3 or x.shape != d_fp.shape or x.shape != d_q.shape:
            raise ValueError(
                f"{who}: states and both models' d must share one shape [S, B, C, ...], got {tuple(x.shape)}, "
                f"{tuple(d_fp.shape)}, {tuple(d_q.shape)}"
            )
        self.check_sample(x[0], who)
        steps, channels = x.shape[0], x.shape[2]
        if self.shape is not None and self.shape != (steps, channels):
            raise ValueError(
                f"{who}: this batch has {steps} steps and {channels} channels, earlier ones {self.shape[0]} and "
                f"{self.shape[1]}"
            )
        rows = [batch_moments(d_fp[i], d_q[i], self.trim) for i in range(steps)]
        moments = PairedMoments(**{f: torch.cat([getattr(r, f) for r in rows]) for f in _FIELDS})
        sums = TrajectorySums.of_batch(x, d_fp, d_q)
        self.moments = moments if self.moments is None else self.moments.merge(moments)
        self.sums = sums if self.sums is None else self.sums.merge(sums)
        self.count += int(x.shape[1])
        self.spatial = self.spatial or tuple(x.shape[3:])
        if self.banded is not None:
            split = lambda t: band_components(t.flatten(0, 1), self.bands).unflatten(0, t.shape[:2])  # noqa: E731
            for b in range(x.shape[1]):  # one trajectory at a time: the split tensors are bands x larger
                one = slice(b, b + 1)
                self.banded.add(split(x[:, one]), split(d_fp[:, one]), split(d_q[:, one]), who)

    def merge(self, other: "PairedAccumulator") -> "PairedAccumulator":
        """A new accumulator holding both data sets."""
        if other.bands != self.bands:
            raise ValueError(f"PairedAccumulator.merge: band counts differ ({self.bands} vs {other.bands})")
        out = PairedAccumulator(self.trim, self.bands)
        if self.banded is not None:
            out.banded = self.banded.merge(other.banded)
        for part in (self, other):
            if part.moments is None:
                continue
            if out.moments is not None and out.shape != part.shape:
                raise ValueError(f"PairedAccumulator.merge: shapes differ ({out.shape} vs {part.shape})")
            out.moments = part.moments if out.moments is None else out.moments.merge(part.moments)
            out.sums = part.sums if out.sums is None else out.sums.merge(part.sums)
            out.count += part.count
            out.spatial = out.spatial or part.spatial
        return out

    def gather(self, group=None) -> None:
        """Merges every ``torch.distributed`` rank's statistics into this accumulator, on every rank."""
        self.moments = gather_moments(self.moments, group)
        self.sums = gather_sums(self.sums, group)
        self.count = sum_over_ranks(self.count, group)
        if self.banded is not None:
            self.banded.gather(group)


__all__ += ["TrajectorySums", "PairedAccumulator"]
