"""Network output error of the bench models under round-to-nearest, BRECQ and GAC (docs/ptq_reconstruction.md).

    python benchmarks/ptq_reconstruction.py --model unet --schemes w4a8,w3a4 --iters 100 --out out/ptq_recon.json

For each scheme (bench profile ``stress``) and each ``--ptq`` setting it quantizes the shipped model exactly as
``qdrift bench --ptq`` does (:func:`qdrift.bench.quant_report.bench_quantize`) and prints one JSON line: the
relative output error on held-out FP sampler inputs (20 images x 10 preview steps, seed 7), wall time, the sum of
the blocks' output errors before / after reconstruction, and for GAC the learned sample weight averaged per
calibration timestep.

    python benchmarks/ptq_reconstruction.py --summarize out/ptq200_none out/ptq200_brecq out/ptq200_gac

reads the ``bench.json`` of ``qdrift bench --ptq ...`` runs instead and prints one markdown table: per scheme and
PTQ setting the network output error, the quantized row's Frechet distance to the FP sampler's images (with the
gap's bootstrap interval) and what each Q-Drift row leaves of it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from qdrift.bench.models import load_model
from qdrift.bench.quant_report import PTQ_CHOICES, bench_quantize


def _share(gap, ci):
    """``"value (share of the gap removed, * if the change's interval excludes 0)"``."""
    if ci is None or not gap:
        return "—"
    change, lo, hi = ci
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{-change / gap * 100:+.0f} %{star}"


def summarize(dirs: list[Path]) -> str:
    """The markdown table of several ``qdrift bench --ptq`` runs (their ``bench.json``)."""
    docs = [json.loads((Path(d) / "bench.json").read_text()) for d in dirs]
    methods = sorted({r["variant"] for doc in docs for r in doc["rows"] if r["variant"].startswith("qdrift")})
    head = ("| model, sampler | scheme | PTQ | output error | FD to FP: quantized [gap CI] | "
            + " | ".join(f"{m}: FD to FP (share of gap)" for m in methods) + " | PSNR vs FP: quantized / "
            + " / ".join(methods) + " |\n|---|---|---|---:|---:|" + "---:|" * len(methods) + "---:|")
    lines = [head]
    for doc in docs:
        meta, rows = doc["meta"], doc["rows"]
        for q in (r for r in rows if r["variant"] == "quantized"):
            key = (q["model"], q["sampler"], q["scheme"])
            same = {r["variant"]: r for r in rows if (r["model"], r["sampler"], r["scheme"]) == key}
            gap, ci = q["fd_to_fp"], q.get("fd_to_fp_ci")
            sig = "*" if ci and (ci[1] > 0 or ci[2] < 0) else ""
            info = meta.get("quant", {}).get(f"{q['model']}/{q['scheme']}", {})
            err = info.get("output_rel_err")
            cells = [f"{q['model']}, {q['sampler']} {q['steps']}", q["scheme"], meta.get("ptq", "none"),
                     "—" if err is None else f"{100 * err:.3f} %",
                     f"{gap:.1f}{sig} [{ci[1]:+.1f}, {ci[2]:+.1f}]" if ci else f"{gap:.1f}"]
            cells += [f"{same[m]['fd_to_fp']:.1f} ({_share(gap, same[m].get('fd_to_fp_ci'))})" if m in same else "—"
                      for m in methods]
            cells.append(" / ".join(f"{same[v]['psnr']:.2f}" if v in same else "—" for v in ["quantized"] + methods))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summarize", nargs="+", type=Path, default=None,
                   help="bench output folders of qdrift bench --ptq runs: print their table instead of measuring")
    p.add_argument("--model", choices=["unet", "dit"], default="unet")
    p.add_argument("--schemes", default="w4a8,w3a4")
    p.add_argument("--ptq", default=",".join(PTQ_CHOICES))
    p.add_argument("--iters", type=int, default=None, help="reconstruction steps per block (default ReconConfig's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return []
    torch.set_num_threads(args.threads)
    net = load_model(args.model).float().eval()
    results = []
    for scheme in args.schemes.split(","):
        for ptq in args.ptq.split(","):
            opts = None if ptq == "none" else ({} if args.iters is None else {"iters": args.iters})
            t0 = time.perf_counter()
            q = bench_quantize(args.model, net, scheme, "stress", ptq, opts)
            row = dict(model=args.model, scheme=scheme, ptq=ptq, iters=args.iters, seconds=time.perf_counter() - t0,
                       output_rel_err=q.qdrift_quant["output_rel_err"])
            rec = q.qdrift_quant.get("reconstruction")
            if rec:
                row.update(reconstruction_seconds=rec["seconds"],
                           block_err_rtn=sum(b["err_rtn"] for b in rec["blocks"].values()),
                           block_err=sum(b["err"] for b in rec["blocks"].values()))
                if "sample_weights" in rec:
                    by_t = defaultdict(list)
                    for t, w in zip(rec["sample_weights"]["timesteps"], rec["sample_weights"]["w"]):
                        by_t[round(t, 1)].append(w)
                    row["gac_weight_by_timestep"] = {t: sum(v) / len(v) for t, v in sorted(by_t.items())}
                    ws = rec["sample_weights"]["w"]
                    row["gac_weight_range"] = [min(ws), max(ws)]
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
