"""The benchmark run behind ``qdrift bench``: FP vs quantized vs quantized + Q-Drift on the built-in models.

For each model x scheme x sampler it draws the same evaluation images (same seeds, same labels) with the
full-precision network, the fake-quantized one (:func:`qdrift.quant.quantize`) and the quantized one sampled
with Q-Drift, whose ``V`` is calibrated with :func:`qdrift.calibrate` on ``K`` runs whose seeds (and
seed-label pairs) are disjoint from the evaluation ones. Optional rows: the other V reduction, the other
DPM-Solver++(2M) form, and the peer baselines of :mod:`qdrift.baselines`.

Networks reach the samplers through the core's adapters with classifier-free guidance inside the network
callable (:mod:`qdrift.bench.guidance`), so calibration pairs are taken after CFG.

The run reads as plan, sample, measure: :func:`run_bench` plans the evaluation set and the (model, sampler)
blocks, :func:`sample_row` draws one row's images batch by batch, :func:`variant_row` measures them.

Seeds: evaluation image ``i`` uses its own generator seeded ``EVAL_SEED + i`` (initial noise, then the
ancestral sampler's noise) and label ``i % 10``, so an image is the same whatever ``n`` or the batch size.
Q-Drift calibration run ``k`` uses seed ``CAL_SEED + k`` and a label from a seeded permutation; the Fig. 2 pool
uses ``FIG_SEED + k``. The quantizers' own calibration (helper :func:`qdrift.bench.quant_report.sampler_calibration`)
uses seed 1000 with the preview sampler. All three ranges are disjoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import qdrift
from qdrift.baselines import is_stochastic_sampler, make_baseline
from qdrift.calib.run import AUTO_BANDS
from qdrift.correction import first_order_coefficient

from . import metrics as M
from .data import NUM_CLASSES, load_fashion_mnist, to_model_range
from .guidance import GuidedNet, schedule, wrap_denoiser
from .models import load_model

__all__ = ["SAMPLER_SPECS", "MODEL_SAMPLERS", "EVAL_SEED", "CAL_SEED", "FIG_SEED", "BenchConfig", "GuidedNet",
           "BenchModel", "Evaluator", "run_bench", "run_block", "sample_row", "variant_row", "c_coefficients"]

EVAL_SEED = 1_000_000
CAL_SEED = 2_000_000
FIG_SEED = 3_000_000


@dataclass(frozen=True)
class SamplerSpec:
    """A benchmark sampler: the qdrift sampler's short name, its default step count and a label."""

    fn: str
    steps: int
    label: str


SAMPLER_SPECS: Dict[str, SamplerSpec] = {
    "euler": SamplerSpec("euler", 30, "Euler"),
    "euler_ancestral": SamplerSpec("euler_ancestral", 4, "Euler a (turbo)"),
    "dpmpp_2m": SamplerSpec("dpmpp_2m", 20, "DPM++ 2M"),
    "dpmpp_2m_sde": SamplerSpec("dpmpp_2m_sde", 20, "DPM++ 2M SDE"),
    "lms": SamplerSpec("lms", 20, "LMS"),
    "flow_euler": SamplerSpec("euler", 20, "flow Euler"),
    "flow_lms": SamplerSpec("lms", 20, "flow LMS"),
}
MODEL_SAMPLERS: Dict[str, Tuple[str, ...]] = {
    "unet": ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "lms"),
    "dit": ("flow_euler", "flow_lms"),
}
SIZED_SUFFIX = {"all": "sized", "output": "sized-output"}  # BenchConfig.size: the row name's suffix per part sized
OPT_IN_SAMPLERS = frozenset({"dpmpp_2m_sde", "lms", "flow_lms"})  # run only when --samplers names them (not by default)


@dataclass
class BenchConfig:
    """Everything one bench run depends on (see ``qdrift bench --help``)."""

    models: Sequence[str] = ("unet", "dit")
    schemes: Sequence[str] = ("w4a8", "w4a4", "w3a4")
    quant_profile: str = "stress"  # options per scheme: qdrift.bench.quant_report.QUANT_PROFILES
    ptq: str = "none"  # weight rounding: none | brecq | gac (qdrift.bench.quant_report.bench_quantize)
    ptq_options: Dict[str, Any] = field(default_factory=dict)  # qdrift.quant.ReconConfig fields
    samplers: Optional[Sequence[str]] = None  # None: every sampler of each model
    steps: Dict[str, int] = field(default_factory=dict)  # per-sampler step overrides
    n_images: int = 100
    batch_size: int = 50
    K: int = 5
    cfg: float = 3.0
    v_reduce: Sequence[str] = ("scalar",)
    dpm_forms: Sequence[str] = ("first_order", "quadrature")
    methods: Sequence[str] = ("paper", "v2")  # Q-Drift rows: qdrift.correction.METHODS
    # the Q-Drift rows' correction="drift" | "noise" on the stochastic samplers that take one (None: each sampler's own)
    correction: Optional[str] = None
    bands: Sequence[int] = (AUTO_BANDS,)  # bands of the exact-method and "matched" rows (one row each; 1: per channel)
    tune: bool = False  # also a "-tuned" row per exact-method row: strength by qdrift.tune_strength on the K noises
    # also a row per v2 row sized by qdrift.size_drift on the K noises, per part sized: "all" (the drift and the output
    # correction: "-sized") and "output" (the output correction alone: "-sized-output")
    size: Sequence[str] = ()
    baselines: Sequence[str] = ()
    fid: bool = False
    fid_ref: int = 10000
    ref_images: int = 10000
    n_boot: int = 200
    fid_boot: int = 50
    fig_pool: int = 50
    fig_ks: Sequence[int] = (1, 5, 50)
    fig_scheme: str = "w3a4"
    grid_n: int = 10
    out: Path = Path("out/bench")
    progress: bool = True
    mode: str = "quick"

    def sampler_names(self, model: str) -> List[str]:
        names = MODEL_SAMPLERS[model]
        if self.samplers is None:
            return [s for s in names if s not in OPT_IN_SAMPLERS]
        return [s for s in names if s in self.samplers]

    def steps_for(self, sampler: str) -> int:
        return int(self.steps.get(sampler, SAMPLER_SPECS[sampler].steps))


def c_coefficients(V: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The paper's Euler coefficients ``c_i = |dsigma_i| V_i / (2 sigma_i)`` (Eq. 12) ``[S, C]``
    (:func:`qdrift.correction.first_order_coefficient` per step)."""
    s = sigmas.double().tolist()
    return torch.stack([first_order_coefficient(V[i].double(), s[i], s[i + 1]) for i in range(len(s) - 1)]).float()


# ----------------------------------------------------------------------------------------------------------------
# models


@dataclass
class BenchModel:
    """A benchmark network, its quantized copies and their denoisers."""

    kind: str
    net: nn.Module
    fp: nn.Module
    quantized: Dict[str, nn.Module] = field(default_factory=dict)
    quant_seconds: Dict[str, float] = field(default_factory=dict)
    quant_info: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def prepare_model(kind: str, cfg: BenchConfig, schemes: Sequence[str], log: Callable[[str], None],
                  load_net: Callable[[str], nn.Module] = load_model) -> BenchModel:
    """Load the network ``kind`` with ``load_net`` (default: the shipped weights) and quantize it per scheme
    (with the run's ``--ptq`` reconstruction)."""
    from .quant_report import bench_quantize

    net = load_net(kind).float().eval()
    bm = BenchModel(kind, net, wrap_denoiser(kind, net, cfg.cfg))
    for scheme in schemes:
        t0 = time.perf_counter()
        ptq_options = dict(cfg.ptq_options, progress=cfg.progress) if cfg.ptq != "none" else None
        qnet = bench_quantize(kind, net, scheme, cfg.quant_profile, cfg.ptq, ptq_options)
        bm.quant_seconds[scheme] = time.perf_counter() - t0
        rec = qnet.qdrift_quant.get("reconstruction", {})
        bm.quant_info[scheme] = dict(ptq=cfg.ptq, seconds=bm.quant_seconds[scheme],
                                     output_rel_err=qnet.qdrift_quant["output_rel_err"],
                                     reconstruction_seconds=rec.get("seconds"),
                                     block_err=({b: [e["err_rtn"], e["err"]] for b, e in rec["blocks"].items()}
                                                if rec else None))
        bm.quantized[scheme] = wrap_denoiser(kind, qnet, cfg.cfg)
        log(f"quantized {kind} with {scheme} in {bm.quant_seconds[scheme]:.1f} s")
    return bm


# ----------------------------------------------------------------------------------------------------------------
# seeds and sampling


def eval_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def calib_labels(k: int, seed: int = CAL_SEED) -> torch.Tensor:
    perm = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(k) % NUM_CLASSES]


class PerImageNoise:
    """Initial noise and ancestral noise from one generator per image (batch-size independent)."""

    def __init__(self, seeds: Sequence[int], shape: Tuple[int, ...] = (1, 28, 28)) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self) -> torch.Tensor:
        return torch.cat([torch.randn((1,) + self.shape, generator=g) for g in self.gens])

    def __call__(self, sigma, sigma_next) -> torch.Tensor:  # the sampler's noise_sampler
        return self.draw()


def initial_noise(seeds: Sequence[int], sigma0: float) -> torch.Tensor:
    return PerImageNoise(seeds).draw() * float(sigma0)


@torch.no_grad()
def sample_images(kind: str, denoiser: Callable, sampler: str, sigmas: torch.Tensor, seeds: Sequence[int],
                  labels: torch.Tensor, sampler_kwargs: Dict[str, Any]) -> torch.Tensor:
    """One batch of images ``[B, 1, 28, 28]`` in [-1, 1] (clipped) with the qdrift sampler of ``sampler``."""
    fn = qdrift.SAMPLERS[SAMPLER_SPECS[sampler].fn]
    noise = PerImageNoise(seeds)
    x = noise.draw() * float(sigmas[0])
    kw = dict(sampler_kwargs)
    if is_stochastic_sampler(SAMPLER_SPECS[sampler].fn):
        kw["noise_sampler"] = noise
    out = fn(denoiser, x, sigmas, kw.pop("V", None), extra_args={"y": labels}, disable=True, **kw)
    return out.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# metrics


class Evaluator:
    """Classifier features / logits against the Fashion-MNIST test set, and optional Inception FID."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.clf = load_model("classifier").float().eval()
        images, _ = load_fashion_mnist("test")
        ref = to_model_range(images[: cfg.ref_images])
        self.ref_feats = self.clf_features(ref)[0]
        self.ref_mu, self.ref_sigma = M.feature_stats(self.ref_feats)
        # KID's cubic kernel (x.y / D + 1)^3 assumes features of order 1; the classifier's post-ReLU features have
        # an RMS of about 3.6, so KID uses them divided by the reference set's RMS (one constant for all rows).
        self.kid_scale = float(np.sqrt(np.mean(self.ref_feats ** 2)))
        log(f"classifier reference: {ref.shape[0]} Fashion-MNIST test images")
        self.inception = None
        if cfg.fid:
            self.inception = M.InceptionFeatures()
            self.inc_mu, self.inc_sigma = inception_reference(self.inception, cfg.fid_ref, cfg.progress, log)

    @torch.no_grad()
    def clf_features(self, x: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
        feats, logits = [], []
        for i in range(0, x.shape[0], 500):
            f = self.clf.features(x[i:i + 500])
            feats.append(f)
            logits.append(self.clf.head(f))
        return torch.cat(feats).double().numpy(), torch.cat(logits)

    def features(self, images: torch.Tensor) -> Dict[str, Any]:
        feats, logits = self.clf_features(images)
        out = {"clf": feats, "logits": logits}
        if self.inception is not None:
            out["inc"] = self.inception(images, progress=self.cfg.progress)
        return out


def inception_reference(inception: "M.InceptionFeatures", n_ref: int, progress: bool,
                        log: Callable[[str], None]) -> Tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the first ``n_ref`` Fashion-MNIST test images, cached in ``~/.cache/qdrift``."""
    import hashlib
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qdrift"
    key = hashlib.sha1(f"{M.INCEPTION_SHA1}:{n_ref}".encode()).hexdigest()[:12]
    path = cache / f"fid_ref_fashion_mnist_test_{n_ref}_{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            log(f"Inception reference statistics from {path}")
            return z["mu"], z["sigma"]
    log(f"computing Inception reference statistics of {n_ref} test images (about {n_ref // 10} s on 2 cores; "
        f"cached in {path})")
    images, _ = load_fashion_mnist("test")
    feats = inception(to_model_range(images[:n_ref]), progress=progress)
    mu, sigma = M.feature_stats(feats)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def real_images(n: int) -> torch.Tensor:
    """``n`` Fashion-MNIST *training* images with labels ``i % 10`` (the metrics' floor at this n; the references
    are test images)."""
    images, labels = load_fashion_mnist("train")
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(NUM_CLASSES)]
    pick = [by_class[int(c)][i // NUM_CLASSES] for i, c in enumerate(eval_labels(n))]  # label i % 10: (i // 10)-th
    return to_model_range(images[pick])


def _mean(t: torch.Tensor) -> Optional[float]:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else None


def row_metrics(ev: Evaluator, feats: Dict[str, Any], labels: torch.Tensor, images: torch.Tensor,
                fp_images: Optional[torch.Tensor], ref_feats: Optional[Dict[str, Any]],
                cfg: BenchConfig, fp_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                fp_feats: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Metrics of one row; ``ref_feats`` (row-paired) gives the bootstrap CI of the FD/FID difference.

    ``fd_to_fp``: Frechet distance in the classifier's features between the row's images and the FP sampler's
    own images of the same seeds (``fp_stats``): the distribution Q-Drift promises to return to (0 for FP).
    """
    n = images.shape[0]
    out: Dict[str, Any] = {
        "fd_classifier": M.fid_from_features(feats["clf"], ev.ref_mu, ev.ref_sigma),
        "kid": M.kid(feats["clf"] / ev.kid_scale, ev.ref_feats / ev.kid_scale, subsets=100, subset_size=min(1000, n),
                     seed=0)[0],
        "class_acc": M.class_accuracy(feats["logits"], labels),
        "psnr": None, "ssim": None, "fid": None, "fid_ci": None, "fd_classifier_ci": None,
    }
    if fp_stats is not None:
        out["fd_to_fp"] = 0.0 if fp_images is None else M.fid_from_features(feats["clf"], *fp_stats)
        if ref_feats is not None and fp_images is not None:
            b = M.paired_bootstrap_fid_diff(feats["clf"], ref_feats["clf"], *fp_stats, n_boot=cfg.n_boot)
            out["fd_to_fp_ci"] = [b["diff"], b["lo"], b["hi"]]
    if fp_images is not None:
        out["psnr"] = _mean(M.psnr(images, fp_images))
        out["ssim"] = _mean(M.ssim(images, fp_images))
    if "inc" in feats:
        out["fid"] = M.fid_from_features(feats["inc"], ev.inc_mu, ev.inc_sigma)
    if ref_feats is not None:
        b = M.paired_bootstrap_fid_diff(feats["clf"], ref_feats["clf"], ev.ref_mu, ev.ref_sigma, n_boot=cfg.n_boot)
        out["fd_classifier_ci"] = [b["diff"], b["lo"], b["hi"]]
        if "inc" in feats and cfg.fid_boot > 0:
            b = M.paired_bootstrap_fid_diff(feats["inc"], ref_feats["inc"], ev.inc_mu, ev.inc_sigma,
                                            n_boot=cfg.fid_boot)
            out["fid_ci"] = [b["diff"], b["lo"], b["hi"]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the rows of a block


@dataclass
class Variant:
    """One row of a (model, scheme, sampler) block."""

    name: str
    scheme: str  # "fp" for the full-precision row
    K: int = 0
    v_reduce: Optional[str] = None
    form: Optional[str] = None
    baseline: Optional[str] = None
    method: Optional[str] = None
    bands: int = 1  # frequency bands of the error model (exact methods) or of moment matching ("matched")
    tuned: bool = False  # strength chosen by qdrift.tune_strength on the calibration noises
    sized: str = ""  # v2 sized by qdrift.size_drift on the calibration noises: "all" or "output" (see BenchConfig.size)


def variants_for(cfg: BenchConfig, sampler: str, scheme: str) -> List[Variant]:
    """The rows of a block: quantized, then ``qdrift-<method>`` per method (the paper's method also per DPM
    form, ``-quadrature``), per V reduction (``-channel`` after the first), per band count of the exact methods
    and of matching (``-b<N>``), each exact-method row followed by its ``-tuned`` row with ``cfg.tune`` and each v2
    row by its ``-sized`` / ``-sized-output`` rows with ``cfg.size``, then the baselines."""
    out = [Variant("quantized", scheme)]
    for method in cfg.methods:
        bands = (1,) if method == "paper" else tuple(cfg.bands)
        if method == "matched":  # its own tables: one row per band count, V's reduction does not apply
            out += [Variant("qdrift-matched" + ("" if b == 1 else f"-b{b}"), scheme, cfg.K, cfg.v_reduce[0],
                            method=method, bands=b) for b in bands]
            continue
        dpm = SAMPLER_SPECS[sampler].fn == "dpmpp_2m" and method == "paper"
        forms = tuple(cfg.dpm_forms) if dpm else (None,)
        for reduce in cfg.v_reduce:
            suffix = "" if reduce == cfg.v_reduce[0] else f"-{reduce}"
            for form in forms:
                fsuffix = "" if form in (None, forms[0]) else f"-{form}"
                for b in bands:
                    bsuffix = "" if b == 1 else f"-b{b}"
                    out.append(Variant(f"qdrift-{method}{suffix}{fsuffix}{bsuffix}", scheme, cfg.K, reduce, form,
                                       method=method, bands=b))
                    for part in (cfg.size if method == "v2" else ()):
                        out.append(Variant(f"qdrift-{method}{suffix}{fsuffix}{bsuffix}-{SIZED_SUFFIX[part]}", scheme,
                                           cfg.K, reduce, form, method=method, bands=b, sized=part))
                    if cfg.tune and method != "paper":
                        out.append(Variant(f"qdrift-{method}{suffix}{fsuffix}{bsuffix}-tuned", scheme, cfg.K, reduce,
                                           form, method=method, bands=b, tuned=True))
    for b in cfg.baselines:
        out.append(Variant(b, scheme, 0 if b == "qncd" else cfg.K, baseline=b))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run: plan


@dataclass(frozen=True)
class EvalSet:
    """The evaluation images every row draws: seeds ``EVAL_SEED + i``, labels ``i % 10``, and the batches."""

    seeds: List[int]
    labels: torch.Tensor
    batches: List[Tuple[int, int]]

    @classmethod
    def for_config(cls, cfg: BenchConfig) -> "EvalSet":
        n = cfg.n_images
        batches = [(i, min(n, i + cfg.batch_size)) for i in range(0, n, cfg.batch_size)]
        return cls([EVAL_SEED + i for i in range(n)], eval_labels(n), batches)

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class Block:
    """One (model, sampler) block: its schedule and the fields every row of it shares."""

    kind: str
    sampler: str
    steps: int
    sigmas: torch.Tensor

    @property
    def fn(self) -> str:
        return SAMPLER_SPECS[self.sampler].fn

    def common(self, n: int, cfg_scale: float) -> Dict[str, Any]:
        return dict(model=self.kind, sampler=self.sampler, sampler_fn=self.fn, steps=self.steps, n_images=n,
                    cfg_scale=cfg_scale)


@dataclass(frozen=True)
class RowSampling:
    """How one row samples: the denoiser, its sampler options (rebuilt for every batch, after ``reset``)."""

    denoiser: Callable
    kwargs: Callable[[], Dict[str, Any]] = dict
    reset: Optional[Callable[[], None]] = None


@dataclass(frozen=True)
class FPReference:
    """The FP row of a block: its images, features and classifier-feature statistics (what rows compare to)."""

    images: torch.Tensor
    feats: Dict[str, Any]
    stats: Tuple[np.ndarray, np.ndarray]


def model_schemes(cfg: BenchConfig) -> List[str]:
    """The schemes a model is quantized with: the table's, plus the Fig. 2 scheme when the figure is drawn."""
    schemes = list(cfg.schemes)
    if cfg.fig_pool > 0 and cfg.fig_scheme not in schemes:
        schemes.append(cfg.fig_scheme)
    return schemes


def progress_total(cfg: BenchConfig, n_batches: int) -> int:
    """Sampler calls of the whole run (the progress bar's total): per block, the FP row and every variant row."""
    return sum(n_batches * (1 + len(cfg.schemes) * len(variants_for(cfg, s, "x")))
               for m in cfg.models for s in cfg.sampler_names(m))


def variant_sampling(var: Variant, den_q: Callable, cal: Any, block: Block, strength: float = 1.0,
                     correction: Optional[str] = None) -> RowSampling:
    """The quantized denoiser as a variant runs it: as is, with a calibrated ``V`` (Q-Drift, at ``strength``, and
    ``correction`` where the block's sampler takes one), or a baseline."""
    if var.baseline is not None:
        den = make_baseline(var.baseline, den_q, cal)
        return RowSampling(den, partial(den.sampler_kwargs, block.fn, block.sigmas), den.reset)
    if var.v_reduce is not None:
        extra = {"form": var.form} if var.form is not None else {}
        extra.update(correction_kwargs(block, correction))
        return RowSampling(den_q, partial(dict, V=cal.with_options(reduce=var.v_reduce), **extra, method=var.method,
                                          strength=strength))
    return RowSampling(den_q)


def correction_kwargs(block: Block, correction: Optional[str]) -> Dict[str, Any]:
    """``{"correction": correction}`` where the block's sampler injects noise (and so takes one), else ``{}``."""
    return {"correction": correction} if correction is not None and is_stochastic_sampler(block.fn) else {}


# ----------------------------------------------------------------------------------------------------------------
# the run: sample


def sample_row(block: Block, how: RowSampling, evalset: EvalSet, bar: Any, desc: str) -> Tuple[torch.Tensor, float]:
    """All evaluation images of one row, batch by batch; returns ``([n, 1, 28, 28], sampling seconds)``."""
    bar.set_description(f"{block.kind} {block.sampler} {desc}")
    parts, secs = [], 0.0
    for a, b in evalset.batches:
        if how.reset is not None:
            how.reset()
        t0 = time.perf_counter()
        parts.append(sample_images(block.kind, how.denoiser, block.sampler, block.sigmas, evalset.seeds[a:b],
                                   evalset.labels[a:b], how.kwargs()))
        secs += time.perf_counter() - t0
        bar.update(1)
    return torch.cat(parts), secs


def calibrate_block(bm: BenchModel, scheme: str, block: Block, K: int, bands: int = 1) -> Tuple[Any, float]:
    """Q-Drift's ``K``-run calibration of one scheme at the block's schedule (seeds ``CAL_SEED + k``), with
    ``bands`` frequency bands, and its wall time."""
    t0 = time.perf_counter()
    x_cal = initial_noise([CAL_SEED + k for k in range(K)], float(block.sigmas[0]))
    cal = qdrift.calibrate(bm.fp, bm.quantized[scheme], x_cal, block.sigmas, {"y": calib_labels(K)},
                           reduce="channel", disable=True, bands=bands)
    return cal, time.perf_counter() - t0


def tune_block(bm: BenchModel, scheme: str, block: Block, K: int, cal: Any, var: Variant,
               correction: Optional[str] = None) -> Tuple[Any, float]:
    """``qdrift.tune_strength`` of a variant on the calibration's ``K`` noises (as the row samples: same V
    reduction, method and ``correction``); returns the :class:`qdrift.calib.StrengthTuning` and its wall time."""
    t0 = time.perf_counter()
    x_cal = initial_noise([CAL_SEED + k for k in range(K)], float(block.sigmas[0]))
    tuned = qdrift.tune_strength(cal.with_options(reduce=var.v_reduce), bm.fp, bm.quantized[scheme], x_cal,
                                 block.sigmas, block.fn, {"y": calib_labels(K)}, method=var.method, seed=CAL_SEED,
                                 sampler_kwargs=correction_kwargs(block, correction) or None)
    return tuned, time.perf_counter() - t0


def size_block(bm: BenchModel, scheme: str, block: Block, K: int, cal: Any, var: Variant) -> Tuple[Any, float]:
    """``qdrift.size_drift`` of a variant's calibration (its V reduction) on the calibration's ``K`` noises, sizing
    the part ``var.sized`` names; returns the sized calibration and the pass's wall time."""
    t0 = time.perf_counter()
    x_cal = initial_noise([CAL_SEED + k for k in range(K)], float(block.sigmas[0]))
    sized = qdrift.size_drift(cal.with_options(reduce=var.v_reduce), bm.fp, bm.quantized[scheme], x_cal,
                              block.sigmas, block.fn, {"y": calib_labels(K)}, seed=CAL_SEED,
                              drift=var.sized != "output")
    return sized, time.perf_counter() - t0


def match_block(bm: BenchModel, scheme: str, block: Block, K: int, cal: Any, bands: int) -> Tuple[Any, float]:
    """Moment matching (``qdrift.match_moments``) of one scheme on the block's sampler and schedule, from the
    calibration's ``K`` noises; returns the calibration with its tables and the matching pass's wall time."""
    t0 = time.perf_counter()
    x_cal = initial_noise([CAL_SEED + k for k in range(K)], float(block.sigmas[0]))
    matched = qdrift.match_moments(cal, bm.fp, bm.quantized[scheme], x_cal, block.sigmas, block.fn,
                                   {"y": calib_labels(K)}, bands=bands, seed=CAL_SEED)
    return matched, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# the run: measure


def real_row(ev: Evaluator, evalset: EvalSet, cfg: BenchConfig) -> Dict[str, Any]:
    """The row of real training images (the metrics' floor at this n)."""
    real = real_images(evalset.n)
    return dict(model="real", scheme="—", sampler=None, sampler_fn=None, steps=0, variant="train images", K=0,
                n_images=evalset.n, cfg_scale=None, seconds=None,
                **row_metrics(ev, ev.features(real), evalset.labels, real, None, None, cfg))


def fp_row(ev: Evaluator, block: Block, images: torch.Tensor, secs: float, evalset: EvalSet,
           cfg: BenchConfig) -> Tuple[Dict[str, Any], FPReference]:
    """The FP row of a block and the reference the block's other rows are measured against."""
    feats = ev.features(images)
    fp = FPReference(images, feats, M.feature_stats(feats["clf"]))
    row = dict(block.common(evalset.n, cfg.cfg), scheme="fp", variant="fp", K=0, seconds=secs,
               **row_metrics(ev, feats, evalset.labels, images, None, None, cfg, fp.stats))
    return row, fp


def variant_row(ev: Evaluator, block: Block, var: Variant, images: torch.Tensor, feats: Dict[str, Any], secs: float,
                cal_secs: float, ref: Optional[Dict[str, Any]], fp: FPReference, evalset: EvalSet,
                cfg: BenchConfig) -> Dict[str, Any]:
    """One variant's row; ``ref`` (the quantized row's features, None for that row) pairs the bootstrap CIs."""
    row = dict(block.common(evalset.n, cfg.cfg), scheme=var.scheme, variant=var.name, K=var.K, seconds=secs,
               **row_metrics(ev, feats, evalset.labels, images, fp.images, ref, cfg, fp.stats, fp.feats))
    if var.K:
        row["calib_seconds"] = cal_secs
    for key in ("v_reduce", "form", "method"):
        if getattr(var, key) is not None:
            row[key] = getattr(var, key)
    if var.method is not None:
        row["bands"] = var.bands
    return row


def grid_label(var: Variant, cfg: BenchConfig) -> Optional[str]:
    """The grid row label of a variant (the quantized row and each method's main Q-Drift row), or None."""
    if var.name == "quantized":
        return f"{var.scheme} Q"
    if var.method is not None and var.form in (None, cfg.dpm_forms[0]) and var.v_reduce == cfg.v_reduce[0]:
        bands = f" {var.bands} bands" if var.bands > 1 else ""
        return f"{var.scheme} Q-Drift {var.method}{bands}" + (" tuned" if var.tuned else "") + (
            {"": "", "all": " sized", "output": " sized output"}[var.sized])
    return None


def run_meta(cfg: BenchConfig, started: float, commit: Optional[str],
             quant_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The run's settings, seeds, quantization (PTQ reconstruction, per-scheme output error), threads, time and
    code version."""
    return dict(mode=cfg.mode, quant_profile=cfg.quant_profile, ptq=cfg.ptq, ptq_options=dict(cfg.ptq_options),
                quant=dict(quant_info or {}), n_images=cfg.n_images, batch_size=cfg.batch_size,
                K=cfg.K, cfg_scale=cfg.cfg, correction=cfg.correction,
                eval_seeds=f"{EVAL_SEED} + i, label i % 10", calib_seeds=f"{CAL_SEED} + k",
                calib_labels=calib_labels(cfg.K).tolist(), fid="inception" if cfg.fid else "none",
                fid_ref=cfg.fid_ref if cfg.fid else None, ref_images=cfg.ref_images, n_boot=cfg.n_boot,
                fid_boot=cfg.fid_boot if cfg.fid else None, threads=torch.get_num_threads(),
                seconds=time.perf_counter() - started, qdrift_version=qdrift.__version__, git_commit=commit)


# ----------------------------------------------------------------------------------------------------------------
# the run


def run_block(ev: Evaluator, bm: BenchModel, block: Block, evalset: EvalSet, cfg: BenchConfig, bar: Any,
              grid: List[Tuple[str, torch.Tensor]], calibrations: Dict[Tuple[str, str, str], Any]
              ) -> List[Dict[str, Any]]:
    """The rows of one (model, sampler) block: FP, then per scheme the quantized, Q-Drift and baseline rows.

    Appends the block's grid rows to ``grid`` and its calibrations to ``calibrations``.
    """
    images, secs = sample_row(block, RowSampling(bm.fp), evalset, bar, "fp")
    row, fp = fp_row(ev, block, images, secs, evalset, cfg)
    rows = [row]
    grid.append(("FP", images[: cfg.grid_n]))
    for scheme in cfg.schemes:
        cal, cal_secs = calibrate_block(bm, scheme, block, cfg.K)
        calibrations[(block.kind, scheme, block.sampler)] = cal
        q_feats, matched, banded = None, {}, {}
        for var in variants_for(cfg, block.sampler, scheme):
            use, use_secs = cal, cal_secs
            if var.bands > 1 and var.method != "matched":
                if var.bands not in banded:
                    banded[var.bands] = calibrate_block(bm, scheme, block, cfg.K, var.bands)
                use, use_secs = banded[var.bands]
            if var.method == "matched":
                if var.bands not in matched:
                    matched[var.bands] = match_block(bm, scheme, block, cfg.K, cal, var.bands)
                use, use_secs = matched[var.bands][0], cal_secs + matched[var.bands][1]
            if var.sized:
                use, size_secs = size_block(bm, scheme, block, cfg.K, use, var)
                use_secs += size_secs
            tuned = None
            if var.tuned:
                tuned, tune_secs = tune_block(bm, scheme, block, cfg.K, use, var, cfg.correction)
                use_secs += tune_secs
            how = variant_sampling(var, bm.quantized[scheme], use, block, 1.0 if tuned is None else tuned.strength,
                                   cfg.correction)
            images, secs = sample_row(block, how, evalset, bar, f"{scheme} {var.name}")
            feats = ev.features(images)
            ref = fp.feats if var.name == "quantized" else q_feats
            rows.append(variant_row(ev, block, var, images, feats, secs, use_secs, ref, fp, evalset, cfg))
            if var.sized:
                rows[-1]["drift_scale"] = use.drift_scale.tolist()
                if use.output_scale is not None:
                    rows[-1]["output_scale"] = use.output_scale.tolist()
            if tuned is not None:
                rows[-1].update(strength=tuned.strength, tune_mse={f"{k:g}": v for k, v in tuned.mse.items()})
            if var.name == "quantized":
                q_feats = feats
            label = grid_label(var, cfg)
            if label is not None:
                grid.append((label, images[: cfg.grid_n]))
    return rows


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              load_net: Callable[[str], nn.Module] = load_model) -> Dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "grids": {...}, "fig": {...}, "calibrations": {...},
    "meta": {...}}``.

    Images are not written here (see :mod:`qdrift.bench.cli`); the returned ``grids`` hold the first
    ``cfg.grid_n`` images of every row.

    Args:
        cfg: the run's settings.
        log: progress messages.
        load_net: ``load_net(kind) -> nn.Module``, the network of ``"unet"`` / ``"dit"`` (default: the shipped
            weights, :func:`qdrift.bench.models.load_model`).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    quant_info: Dict[str, Dict[str, Any]] = {}
    commit = git_commit()  # the code that runs, read before any file can change under a long run
    ev = Evaluator(cfg, log)
    evalset = EvalSet.for_config(cfg)
    rows = [real_row(ev, evalset, cfg)]
    grids: Dict[Tuple[str, str], List[Tuple[str, torch.Tensor]]] = {}
    calibrations: Dict[Tuple[str, str, str], Any] = {}
    fig: Dict[str, Any] = {}
    bar = tqdm(total=progress_total(cfg, len(evalset.batches)), desc="qdrift bench", unit="batch",
               disable=not cfg.progress, dynamic_ncols=True)
    for kind in cfg.models:
        bm = prepare_model(kind, cfg, model_schemes(cfg), log, load_net)
        quant_info.update({f"{kind}/{scheme}": info for scheme, info in bm.quant_info.items()})
        for sampler in cfg.sampler_names(kind):
            steps = cfg.steps_for(sampler)
            block = Block(kind, sampler, steps, schedule(kind, bm.fp, steps))
            rows += run_block(ev, bm, block, evalset, cfg, bar, grids.setdefault((kind, sampler), []), calibrations)
        if cfg.fig_pool > 0:
            sampler = cfg.sampler_names(kind)[0] if cfg.sampler_names(kind) else MODEL_SAMPLERS[kind][0]
            bar.set_description(f"{kind} Fig. 2 pool")
            fig[kind] = calibration_envelopes(bm, cfg, sampler)
        del bm
    bar.close()
    return dict(rows=rows, grids=grids, fig=fig, calibrations=calibrations,
                meta=run_meta(cfg, started, commit, quant_info))


def git_commit() -> Optional[str]:
    """The qdrift checkout's commit (``git rev-parse HEAD``, ``+dirty`` with uncommitted changes), or None."""
    import subprocess

    root = Path(qdrift.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def calibration_envelopes(bm: BenchModel, cfg: BenchConfig, sampler: str) -> Dict[str, Any]:
    """The paper's Fig. 2: ``c_i`` per step and channel from ``K``-run subsets of a pool of single-run calibrations.

    For each K in ``cfg.fig_ks`` the pool (``cfg.fig_pool`` runs, seeds ``FIG_SEED + k``, labels ``k % 10``) is
    split into disjoint subsets of K runs; each subset's merged statistics give ``V`` (per channel, conditional)
    and ``c_i = |dsigma_i| V_i / (2 sigma_i)``. Returns min / max / mean over subsets ``[S, C]`` per K.
    """
    kind = bm.kind
    steps = cfg.steps_for(sampler)
    sigmas = schedule(kind, bm.fp, steps)
    den_q = bm.quantized[cfg.fig_scheme]
    singles = []
    for k in range(cfg.fig_pool):
        x = initial_noise([FIG_SEED + k], float(sigmas[0]))
        singles.append(qdrift.calibrate(bm.fp, den_q, x, sigmas, {"y": torch.tensor([k % NUM_CLASSES])},
                                        reduce="channel", disable=True, bands=1))  # V's envelope: per channel
    out: Dict[str, Any] = dict(model=kind, scheme=cfg.fig_scheme, sampler=sampler, steps=steps, pool=cfg.fig_pool,
                               sigmas=sigmas.tolist(), envelopes={})
    for K in cfg.fig_ks:
        if K > cfg.fig_pool:
            continue
        cs = []
        for j in range(cfg.fig_pool // K):
            merged = singles[j * K]
            for other in singles[j * K + 1:(j + 1) * K]:
                merged = merged.merge(other)
            cs.append(c_coefficients(merged.V, sigmas))
        stack = torch.stack(cs)
        out["envelopes"][int(K)] = dict(subsets=len(cs), min=stack.amin(0).tolist(), max=stack.amax(0).tolist(),
                                        mean=stack.mean(0).tolist())
    return out


def gap_recovered(rows: List[Dict[str, Any]], metric: str = "fd_classifier") -> List[Dict[str, Any]]:
    """Fraction of the quantization gap ``(m_q - m_variant) / (m_q - m_fp)`` each corrected row recovers."""
    fp = {(r["model"], r["sampler"]): r for r in rows if r["variant"] == "fp"}
    q = {(r["model"], r["sampler"], r["scheme"]): r for r in rows if r["variant"] == "quantized"}
    out = []
    for r in rows:
        if r["variant"] in ("fp", "quantized"):
            continue
        f, qq = fp.get((r["model"], r["sampler"])), q.get((r["model"], r["sampler"], r["scheme"]))
        if f is None or qq is None or r.get(metric) is None or qq.get(metric) is None:
            continue
        gap = qq[metric] - f[metric]
        ci_key = "fid_ci" if metric == "fid" else f"{metric}_ci"
        out.append(dict(model=r["model"], sampler=r["sampler"], scheme=r["scheme"], variant=r["variant"], metric=metric,
                        gap=gap, gap_ci=qq.get(ci_key), row_ci=r.get(ci_key),
                        recovered=(qq[metric] - r[metric]) / gap if abs(gap) > 1e-12 else math.nan))
    return out
