"""How much each simulated PTQ scheme perturbs the shipped denoisers (a diagnostic, not the benchmark).

Usage::

    python -m qdrift.bench.quant_report unet dit --png-dir out/quant_report

For each model and scheme it prints the mean per-layer relative output error (SVDQuant schemes: with the
low-rank branch, without it, and plain round-to-nearest), the relative error of the network output on held-out
sampler inputs, and optionally writes sample grids (FP | w4a8 | w4a4 | w3a4, same seeds) with the preview sampler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..quant import SCHEMES, layer_error_report, quantize
from .data import NUM_CLASSES
from .images import make_grid, save_png
from .models import load_model
from .train import sample_preview

__all__ = ["sampler_calibration", "output_error", "report"]


def sampler_calibration(kind: str, n: int = 16, steps: int = 10, cfg: float = 3.0, seed: int = 1000):
    """``calib_data`` for :func:`qdrift.quant.quantize`: a callable running the preview sampler on the model.

    Seeds from 1000 up are disjoint from the evaluation seeds (< 1000) used elsewhere.

    Args:
        kind: ``"unet"`` or ``"dit"``; n: images (labels ``i % 10``); steps, cfg: sampler settings; seed: noise seed.
    """
    labels = torch.arange(n) % NUM_CLASSES
    return lambda model: sample_preview(kind, model, labels, steps=steps, cfg=cfg, seed=seed)


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


def report(kinds: list[str], schemes: list[str], png_dir: Path | None = None) -> dict:
    """Quantize each model with each scheme and collect error numbers (see module docstring)."""
    out: dict = {}
    for kind in kinds:
        net = load_model(kind)
        grids = [sample_preview(kind, net, torch.arange(20) % NUM_CLASSES, steps=20, seed=3)]
        for scheme in schemes:
            qnet = quantize(net, scheme, sampler_calibration(kind))
            row = {"output_rel_err": output_error(kind, net, qnet)}
            if scheme != "w4a8":
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
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--png-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(args.models, args.schemes, args.png_dir)


if __name__ == "__main__":
    main()
