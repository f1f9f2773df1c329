"""How much each simulated PTQ scheme perturbs the shipped denoisers (a diagnostic, not the benchmark).

Usage::

    python -m qdrift.bench.quant_report unet dit --profile stress --png-dir out/quant_report

For each model and scheme it prints the mean per-layer relative output error (SVDQuant schemes: with the
low-rank branch, without it, and plain round-to-nearest), the relative error of the network output on held-out
sampler inputs, and optionally writes sample grids (FP | w4a8 | w4a4 | w3a4, same seeds) with the preview sampler.
For the weight-only formats (``--schemes gguf-q4_0 nf4 ...``) it prints the share of parameters stored quantized,
the relative weight error over them and the parameters per stored type.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..quant import (FORMAT_SCHEMES, MIXDQ_SKIP, SCHEMES, SIMULATED_SCHEMES, format_summary, layer_error_report,
                     quantize, record_calib_samples)
from .data import NUM_CLASSES
from .images import make_grid, save_png
from .models import load_model
from .train import sample_preview

__all__ = ["QUANT_PROFILES", "PTQ_CHOICES", "quant_options", "sampler_calibration", "sampler_samples", "bench_quantize",
           "output_error", "report"]

PTQ_CHOICES = ("none", "brecq", "gac")  # qdrift bench --ptq: the weight rounding (qdrift.quant.reconstruct)

# Options handed to :func:`qdrift.quant.quantize` per bench profile and scheme. The bit widths are always the
# scheme's own; the profiles differ in the float safety nets a 1-3M-parameter model gets from the recipes.
#  - "reference": the library defaults (REFERENCE.md section 3 recipes, adapted to tiny layers). The shipped
#    networks barely notice them (relative output error 0.1-1.2 %): no clear FID gap at a few hundred images.
#  - "stress" (the bench default): the same bit widths with the safety nets off, so that the quantized models
#    are clearly degraded but still recognizable, as the paper's quantized models are. w4a8: uniform 4-bit
#    per-channel weights (no 2/4/8 mixed precision) and every activation layer at 8 bits (no float layer);
#    w4a4/w3a4: no float low-rank branch and only the conditioning path (embeddings, time/label projections,
#    adaLN, norms) kept in float, i.e. shortcuts, in/out projections, patch embedding, up/down samplers and the
#    final layer quantized too. Relative output error (python -m qdrift.bench.quant_report): U-Net w4a8 1.2 %,
#    w4a4 1.2 %, w3a4 2.5 %; DiT 0.5, 1.2, 2.7 %.
# The weight-only formats (qdrift.quant.formats) are the libraries' own behaviour in both profiles, except that
# bitsandbytes and quanto, which diffusers applies to nn.Linear only, also quantize Conv2d weights under "stress":
# the shipped U-Net does with 3x3 and 1x1 convs what SD's U-Net does with Linear attention/feed-forward layers,
# and Linear-only would leave 93 % of its weights in float (docs/bench.md).
_CONV_FORMATS = ("nf4", "fp4", "quanto-int8", "quanto-int4")
QUANT_PROFILES: dict[str, dict[str, dict]] = {
    "reference": {"w4a8": {}, "w4a4": {}, "w3a4": {}, **{s: {} for s in FORMAT_SCHEMES}},
    "stress": {
        "w4a8": {"weight_bits_choices": (4,), "float_act_fraction": 0.0},
        "w4a4": {"rank": 0, "skip": MIXDQ_SKIP},
        "w3a4": {"rank": 0, "skip": MIXDQ_SKIP},
        **{s: ({"conv": True} if s in _CONV_FORMATS else {}) for s in FORMAT_SCHEMES},
    },
}


def quant_options(profile: str, scheme: str) -> dict:
    """The :func:`qdrift.quant.quantize` options of a bench profile (``"stress"`` or ``"reference"``) and scheme."""
    if profile not in QUANT_PROFILES:
        raise ValueError(f"unknown quantization profile {profile!r}; expected one of {sorted(QUANT_PROFILES)}")
    if scheme not in QUANT_PROFILES[profile]:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {sorted(QUANT_PROFILES[profile])}")
    return dict(QUANT_PROFILES[profile][scheme])


def sampler_calibration(kind: str, n: int = 16, steps: int = 10, cfg: float = 3.0, seed: int = 1000):
    """``calib_data`` for :func:`qdrift.quant.quantize`: a callable running the preview sampler on the model.

    Seeds from 1000 up are disjoint from the evaluation seeds (< 1000) used elsewhere.

    Args:
        kind: ``"unet"`` or ``"dit"``; n: images (labels ``i % 10``); steps, cfg: sampler settings; seed: noise seed.
    """
    labels = torch.arange(n) % NUM_CLASSES
    return lambda model: sample_preview(kind, model, labels, steps=steps, cfg=cfg, seed=seed)


def sampler_samples(kind: str, net: nn.Module, n: int = 16, steps: int = 10, cfg: float = 3.0, seed: int = 1000):
    """The calls :func:`sampler_calibration` makes, recorded as timestep-tagged :class:`qdrift.quant.CalibSamples`.

    Replayed in the same batches, they give the scheme's activation calibration exactly the inputs of the callable.
    """
    return record_calib_samples(net, sampler_calibration(kind, n, steps, cfg, seed), timestep_arg=1)


def bench_quantize(kind: str, net: nn.Module, scheme: str, profile: str = "stress", ptq: str = "none",
                   ptq_options: dict | None = None, calib_n: int = 16, calib_steps: int = 10,
                   error_n: int = 20) -> nn.Module:
    """The bench's quantization of ``net``: the profile's options, then the ``ptq`` weight rounding.

    ``ptq="none"`` is round to nearest with the preview-sampler callable as calibration (the published rows);
    ``"brecq"`` / ``"gac"`` record those calls as timestep-tagged samples and reconstruct block by block
    (:mod:`qdrift.quant.reconstruct`, options ``ptq_options``). The returned model's ``qdrift_quant`` gains
    ``ptq`` and ``output_rel_err`` (:func:`output_error` on ``error_n`` images). ``calib_n`` images with
    ``calib_steps`` preview steps drive the calibration (bench: 16 and 10).
    """
    if ptq not in PTQ_CHOICES:
        raise ValueError(f"unknown ptq {ptq!r}; expected one of {PTQ_CHOICES}")
    if ptq == "none":
        qnet = quantize(net, scheme, sampler_calibration(kind, calib_n, calib_steps), **quant_options(profile, scheme))
    else:
        qnet = quantize(net, scheme, sampler_samples(kind, net, calib_n, calib_steps), reconstruction=ptq,
                        reconstruction_options=ptq_options, **quant_options(profile, scheme))
    qnet.qdrift_quant["ptq"] = ptq
    qnet.qdrift_quant["output_rel_err"] = output_error(kind, net, qnet, n=error_n)
    return qnet


class _Recorder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple] = []

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return self.net(x, t, y)


@torch.no_grad()
def output_error(kind: str, net: nn.Module, qnet: nn.Module, n: int = 20, steps: int = 10, seed: int = 7) -> float:
    """Mean over sampler steps of ``|f_q - f|^2 / |f|^2`` on the FP model's own trajectory inputs."""
    rec = _Recorder(net)
    sample_preview(kind, rec, torch.arange(n) % NUM_CLASSES, steps=steps, seed=seed)
    errs = []
    for x, t, y in rec.calls:
        f, fq = net(x, t, y), qnet(x, t, y)
        errs.append(float((fq - f).pow(2).mean() / f.pow(2).mean()))
    return sum(errs) / len(errs)


def report(kinds: list[str], schemes: list[str], png_dir: Path | None = None, profile: str = "stress") -> dict:
    """Quantize each model with each scheme (options of ``profile``) and collect error numbers (module docstring)."""
    out: dict = {}
    for kind in kinds:
        net = load_model(kind)
        grids = [sample_preview(kind, net, torch.arange(20) % NUM_CLASSES, steps=20, seed=3)]
        for scheme in schemes:
            qnet = quantize(net, scheme, sampler_calibration(kind), **quant_options(profile, scheme))
            row = {"output_rel_err": output_error(kind, net, qnet)}
            if scheme in FORMAT_SCHEMES:
                row.update(format_summary(qnet))
            elif scheme != "w4a8":
                row.update(layer_error_report(qnet))
            else:
                row["mean_weight_bits"] = qnet.qdrift_quant["mean_weight_bits"]
                row["float_act_layers"] = qnet.qdrift_quant["float_act_layers"]
                row["bits"] = {k: v["weight_bits"] for k, v in qnet.qdrift_quant["layers"].items()}
            out[f"{kind}/{scheme}"] = row
            print(kind, scheme, json.dumps({k: v for k, v in row.items() if k != "bits"}), flush=True)
            if png_dir is not None:
                grids.append(sample_preview(kind, qnet, torch.arange(20) % NUM_CLASSES, steps=20, seed=3))
        if png_dir is not None:
            save_png(Path(png_dir) / f"{kind}_fp_vs_quant.png", make_grid(torch.cat(grids), nrow=20))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m qdrift.bench.quant_report", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", choices=["unet", "dit"])
    p.add_argument("--schemes", nargs="+", default=list(SIMULATED_SCHEMES), choices=list(SCHEMES),
                   help="default the simulated w4a8 w4a4 w3a4; also the weight-only formats, e.g. gguf-q4_0 nf4 "
                        "quanto-int4")
    p.add_argument("--profile", choices=sorted(QUANT_PROFILES), default="stress",
                   help="quantization options: stress (the bench default) or reference (the library defaults)")
    p.add_argument("--png-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(args.models, args.schemes, args.png_dir, args.profile)


if __name__ == "__main__":
    main()
