"""The benchmark run behind ``qdrift bench``: FP vs quantized vs quantized + Q-Drift on the built-in models.

For each model x scheme x sampler it draws the same evaluation images (same seeds, same labels) with the
full-precision network, the fake-quantized one (:func:`qdrift.quant.quantize`) and the quantized one sampled
with Q-Drift, whose ``V`` is calibrated with :func:`qdrift.calibrate` on ``K`` runs whose seeds (and
seed-label pairs) are disjoint from the evaluation ones. Optional rows: the other V reduction, the other
DPM-Solver++(2M) form, and the peer baselines of :mod:`qdrift.baselines`.

Networks reach the samplers through the core's adapters (U-Net: :class:`qdrift.adapters.DiscreteEpsDenoiser`
on its ``alphas_cumprod``; DiT: :class:`qdrift.adapters.FlowDenoiser`), with classifier-free guidance inside
the network callable (:class:`GuidedNet`), so calibration pairs are taken after CFG.

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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import qdrift
from qdrift.adapters import DiscreteEpsDenoiser, FlowDenoiser, get_sigmas_flow

from . import metrics as M
from .data import NUM_CLASSES, load_fashion_mnist, to_model_range
from .models import NULL_LABEL, load_model, vp_alphas_cumprod

__all__ = ["SAMPLER_SPECS", "MODEL_SAMPLERS", "EVAL_SEED", "CAL_SEED", "FIG_SEED", "BenchConfig", "GuidedNet",
           "BenchModel", "Evaluator", "run_bench", "c_coefficients"]

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
    "flow_euler": SamplerSpec("euler", 20, "flow Euler"),
}
MODEL_SAMPLERS: Dict[str, Tuple[str, ...]] = {
    "unet": ("euler", "euler_ancestral", "dpmpp_2m"),
    "dit": ("flow_euler",),
}


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
        return [s for s in names if self.samplers is None or s in self.samplers]

    def steps_for(self, sampler: str) -> int:
        return int(self.steps.get(sampler, SAMPLER_SPECS[sampler].steps))


class GuidedNet(nn.Module):
    """Classifier-free guidance inside the network callable: ``out_u + scale * (out_c - out_u)``.

    Call: ``net(x [B, C, H, W], t [B], y [B] int) -> [B, C, H, W]`` (one batched call of the wrapped network on
    ``[x; x]`` with labels ``[y; null]``). ``scale = 1`` calls the network once, conditionally.
    """

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.net(x, t, y)
        null = torch.full_like(y, NULL_LABEL)
        out_c, out_u = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return out_u + self.scale * (out_c - out_u)


def wrap_denoiser(kind: str, net: nn.Module, cfg: float) -> nn.Module:
    """The k-diffusion denoiser ``D(x, sigma, y=labels)`` of a benchmark network, guidance included."""
    guided = GuidedNet(net, cfg)
    if kind == "unet":
        return DiscreteEpsDenoiser(guided, vp_alphas_cumprod())
    if kind == "dit":
        return FlowDenoiser(guided)
    raise ValueError(f"unknown model kind {kind!r}; expected 'unet' or 'dit'")


def schedule(kind: str, denoiser: nn.Module, steps: int) -> torch.Tensor:
    """Sampling schedule ``[steps + 1]``: Karras (rho 7) over the U-Net's VP range, uniform flow time for the DiT."""
    if kind == "unet":
        return denoiser.get_sigmas(steps).to(torch.float32)
    return get_sigmas_flow(steps).to(torch.float32)


def c_coefficients(V: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The paper's Euler coefficients ``c_i = |dsigma_i| V_i / (2 sigma_i)`` (Eq. 12) ``[S, C]``."""
    s = sigmas.double()
    ds = (s[:-1] - s[1:]).abs()[:, None]
    return (ds * V.double() / (2 * s[:-1, None])).float()


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


def load_bench_model(kind: str) -> nn.Module:
    """The shipped network (a hook the tests replace with tiny untrained ones)."""
    return load_model(kind)


_DEFAULT_LOADER = load_bench_model


def prepare_model(kind: str, cfg: BenchConfig, schemes: Sequence[str], log: Callable[[str], None]) -> BenchModel:
    from .quant_report import bench_quantize

    net = load_bench_model(kind).float().eval()
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
    if SAMPLER_SPECS[sampler].fn == "euler_ancestral":
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
# the run


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


def variants_for(cfg: BenchConfig, sampler: str, scheme: str) -> List[Variant]:
    """The rows of a block: quantized, then ``qdrift-<method>`` per method (the paper's method also per DPM
    form, ``-quadrature``), per V reduction (``-channel`` after the first), then the baselines."""
    out = [Variant("quantized", scheme)]
    for method in cfg.methods:
        dpm = SAMPLER_SPECS[sampler].fn == "dpmpp_2m" and method == "paper"
        forms = tuple(cfg.dpm_forms) if dpm else (None,)
        for reduce in cfg.v_reduce:
            suffix = "" if reduce == cfg.v_reduce[0] else f"-{reduce}"
            for form in forms:
                fsuffix = "" if form in (None, forms[0]) else f"-{form}"
                out.append(Variant(f"qdrift-{method}{suffix}{fsuffix}", scheme, cfg.K, reduce, form, method=method))
    for b in cfg.baselines:
        out.append(Variant(b, scheme, 0 if b == "qncd" else cfg.K, baseline=b))
    return out


def _batches(n: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "grids": {...}, "fig": {...}, "meta": {...}}``.

    Images are not written here (see :mod:`qdrift.bench.cli`); the returned ``grids`` hold the first
    ``cfg.grid_n`` images of every row.
    """
    from tqdm.auto import tqdm

    from ..baselines import make_baseline

    started = time.perf_counter()
    quant_info: Dict[str, Dict[str, Any]] = {}
    commit = git_commit()  # the code that runs, read before any file can change under a long run
    ev = Evaluator(cfg, log)
    n = cfg.n_images
    seeds = [EVAL_SEED + i for i in range(n)]
    labels = eval_labels(n)
    batches = _batches(n, cfg.batch_size)
    rows: List[Dict[str, Any]] = []
    grids: Dict[Tuple[str, str], List[Tuple[str, torch.Tensor]]] = {}
    calibrations: Dict[Tuple[str, str, str], Any] = {}
    fig: Dict[str, Any] = {}

    real = real_images(n)
    rows.append(dict(model="real", scheme="—", sampler=None, sampler_fn=None, steps=0, variant="train images", K=0,
                     n_images=n, cfg_scale=None, seconds=None,
                     **row_metrics(ev, ev.features(real), labels, real, None, None, cfg)))

    plan = [(m, s) for m in cfg.models for s in cfg.sampler_names(m)]
    n_units = sum(len(batches) * (1 + len(cfg.schemes) * len(variants_for(cfg, s, "x"))) for _, s in plan)
    bar = tqdm(total=n_units, desc="qdrift bench", unit="batch", disable=not cfg.progress, dynamic_ncols=True)

    for kind in cfg.models:
        schemes = list(cfg.schemes)
        if cfg.fig_pool > 0 and cfg.fig_scheme not in schemes:
            schemes.append(cfg.fig_scheme)
        bm = prepare_model(kind, cfg, schemes, log)
        quant_info.update({f"{kind}/{scheme}": info for scheme, info in bm.quant_info.items()})
        for sampler in cfg.sampler_names(kind):
            spec = SAMPLER_SPECS[sampler]
            steps = cfg.steps_for(sampler)
            sigmas = schedule(kind, bm.fp, steps)
            common = dict(model=kind, sampler=sampler, sampler_fn=spec.fn, steps=steps, n_images=n, cfg_scale=cfg.cfg)

            def draw(den: Callable, kwargs_fn: Callable[[], Dict[str, Any]], desc: str,
                     reset: Optional[Callable[[], None]] = None) -> Tuple[torch.Tensor, float]:
                bar.set_description(f"{kind} {sampler} {desc}")
                parts, secs = [], 0.0
                for a, b in batches:
                    if reset is not None:
                        reset()
                    t0 = time.perf_counter()
                    parts.append(sample_images(kind, den, sampler, sigmas, seeds[a:b], labels[a:b], kwargs_fn()))
                    secs += time.perf_counter() - t0
                    bar.update(1)
                return torch.cat(parts), secs

            fp_images, fp_secs = draw(bm.fp, dict, "fp")
            fp_feats = ev.features(fp_images)
            fp_stats = M.feature_stats(fp_feats["clf"])
            rows.append(dict(common, scheme="fp", variant="fp", K=0, seconds=fp_secs,
                             **row_metrics(ev, fp_feats, labels, fp_images, None, None, cfg, fp_stats)))
            grid = grids.setdefault((kind, sampler), [])
            grid.append(("FP", fp_images[: cfg.grid_n]))

            for scheme in cfg.schemes:
                den_q = bm.quantized[scheme]
                t0 = time.perf_counter()
                x_cal = initial_noise([CAL_SEED + k for k in range(cfg.K)], float(sigmas[0]))
                cal = qdrift.calibrate(bm.fp, den_q, x_cal, sigmas, {"y": calib_labels(cfg.K)}, reduce="channel",
                                       disable=True)
                cal_secs = time.perf_counter() - t0
                calibrations[(kind, scheme, sampler)] = cal
                q_images, q_feats = None, None
                for var in variants_for(cfg, sampler, scheme):
                    reset = None
                    if var.baseline is not None:
                        den = make_baseline(var.baseline, den_q, cal)
                        reset = den.reset
                        kw_fn = lambda den=den: den.sampler_kwargs(spec.fn, sigmas)  # noqa: E731
                    elif var.v_reduce is not None:
                        c = cal.with_options(reduce=var.v_reduce)
                        extra = {"form": var.form} if var.form is not None else {}
                        extra["method"] = var.method
                        den = den_q
                        kw_fn = lambda c=c, extra=extra: dict(V=c, **extra)  # noqa: E731
                    else:
                        den, kw_fn = den_q, dict
                    images, secs = draw(den, kw_fn, f"{scheme} {var.name}", reset)
                    feats = ev.features(images)
                    ref = fp_feats if var.name == "quantized" else q_feats
                    row = dict(common, scheme=scheme, variant=var.name, K=var.K, seconds=secs,
                               **row_metrics(ev, feats, labels, images, fp_images, ref, cfg, fp_stats, fp_feats))
                    if var.K:
                        row["calib_seconds"] = cal_secs
                    if var.v_reduce is not None:
                        row["v_reduce"] = var.v_reduce
                    if var.form is not None:
                        row["form"] = var.form
                    if var.method is not None:
                        row["method"] = var.method
                    rows.append(row)
                    if var.name == "quantized":
                        q_images, q_feats = images, feats
                    if var.name == "quantized" or (var.method is not None and var.form in (None, cfg.dpm_forms[0])
                                                   and var.v_reduce == cfg.v_reduce[0]):
                        label = "Q" if var.name == "quantized" else f"Q-Drift {var.method}"
                        grid.append((f"{scheme} {label}", images[: cfg.grid_n]))
        if cfg.fig_pool > 0:
            sampler = cfg.sampler_names(kind)[0] if cfg.sampler_names(kind) else MODEL_SAMPLERS[kind][0]
            bar.set_description(f"{kind} Fig. 2 pool")
            fig[kind] = calibration_envelopes(bm, cfg, sampler)
        del bm
    bar.close()
    meta = dict(mode=cfg.mode, quant_profile=cfg.quant_profile, ptq=cfg.ptq, ptq_options=dict(cfg.ptq_options),
                quant=quant_info, n_images=n, batch_size=cfg.batch_size, K=cfg.K,
                cfg_scale=cfg.cfg,
                eval_seeds=f"{EVAL_SEED} + i, label i % 10", calib_seeds=f"{CAL_SEED} + k",
                calib_labels=calib_labels(cfg.K).tolist(), fid="inception" if cfg.fid else "none",
                fid_ref=cfg.fid_ref if cfg.fid else None, ref_images=cfg.ref_images, n_boot=cfg.n_boot,
                fid_boot=cfg.fid_boot if cfg.fid else None, threads=torch.get_num_threads(),
                seconds=time.perf_counter() - started, qdrift_version=qdrift.__version__, git_commit=commit)
    return dict(rows=rows, grids=grids, fig=fig, calibrations=calibrations, meta=meta)


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
                                        reduce="channel", disable=True))
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
