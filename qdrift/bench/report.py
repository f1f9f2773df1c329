"""Table-1-style markdown for ``qdrift bench`` rows, JSON-safe row conversion, and merging of split runs.

A benchmark split over several processes (e.g. one model or sampler each, ``--threads 1``) is put back into one
table with::

    python -m qdrift.bench.report out/bench_a out/bench_b [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .runner import SAMPLER_SPECS, gap_recovered

__all__ = ["ROW_FIELDS", "json_safe", "markdown_table", "header_lines", "merge_runs", "main"]

# The fields every bench.json row carries (more may follow: calib_seconds, v_reduce, form, fd_classifier_ci, ...).
ROW_FIELDS = ("model", "scheme", "sampler", "steps", "variant", "K", "n_images", "fid", "fid_ci", "fd_classifier",
              "kid", "class_acc", "psnr", "ssim", "seconds")


def json_safe(obj: Any) -> Any:
    """Recursively replace NaN / inf by None and tuples by lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _f(v: Optional[float], fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(ci: Optional[Sequence[float]], fmt: str = "+.2f") -> str:
    if not ci:
        return "—"
    d, lo, hi = ci
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{d:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]{star}"


def header_lines(meta: Dict[str, Any]) -> List[str]:
    """What the table measures, stated in its header."""
    n = meta["n_images"]
    fid = (f"FID: Inception (2015-12-05 weights, 2048-d pool features) of the {n} images vs {meta['fid_ref']} "
           "Fashion-MNIST test images" if meta["fid"] == "inception" else
           "FID: not computed (quick mode; the Inception network runs at about 10 images/s on 2 cores; "
           "`--fid inception` or `--full` turns it on)")
    return [
        f"# qdrift bench ({meta['mode']}): FP vs quantized vs quantized + Q-Drift",
        "",
        f"- {n} images per row (label i % 10, seed {meta['eval_seeds'].split(',')[0]}, the same noise in every row); "
        f"classifier-free guidance {meta['cfg_scale']:g} inside the denoiser; Q-Drift V from K = {meta['K']} "
        "calibration runs on disjoint seeds (pooled over channels, 4-std trim); `qdrift-<method>` rows run that "
        "method of qdrift.correction.METHODS (`paper`: the paper's first-order rule with the conditional V; `v2`: the "
        "library default, gain/bias removed and the exact balance with cross-step errors; README, \"Q-Drift v2\")"
        + (f"; on the stochastic samplers the Q-Drift rows run `correction=\"{meta['correction']}\"`."
           if meta.get("correction") else "."),
        f"- {fid}.",
        f"- Quantization: profile `{meta.get('quant_profile', 'reference')}` "
        "(qdrift.bench.quant_report.QUANT_PROFILES; `stress` = the schemes' bit widths without the float "
        "low-rank branch, mixed precision and float layers, `reference` = the library's recipes; the weight-only "
        "formats gguf-*, nf4, fp4, quanto-* are computed by their own libraries, qdrift.quant.formats).",
        f"- FD (cls): Frechet distance in the shipped classifier's 128-d features vs {meta['ref_images']} test images "
        "(strongly biased upward at small n: the `real` row, training images, is the floor at this n; compare rows, "
        "not absolute values). KID (cls) x 10^3 in the same features divided by the reference RMS. "
        "acc: the classifier agrees with the requested class (the CLIP-score analog).",
        "- dFD: paired bootstrap (same seeds) of FD(quantized) - FD(FP) on quantized rows and of FD(row) - "
        f"FD(quantized) on corrected rows, with its 95% interval ({meta['n_boot']} draws); * = interval excludes 0.",
        "- FD to FP: Frechet distance in the classifier's features to the FP sampler's own images of the same seeds "
        "(what Q-Drift promises to return to; 0 for the FP row).",
        "- PSNR / SSIM against the FP image of the same seed and label (higher = closer to FP). s: sampling wall "
        f"time of the row's {n} images ({meta['threads']} threads; calibration excluded, see bench.json).",
    ] + ([f"- qdrift {meta.get('qdrift_version', '?')} at commit {meta['git_commit']}."] if meta.get("git_commit")
         else [])


def markdown_table(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The Table-1-style markdown (header notes, the table, the gap-recovered summary)."""
    has_fid = any(r.get("fid") is not None for r in rows)
    lines = header_lines(meta) + [""]
    cols = ["model", "sampler", "steps", "scheme", "variant"]
    cols += ["FID", "dFID [95% CI]"] if has_fid else []
    cols += ["FD (cls)", "dFD [95% CI]", "FD to FP", "KID (cls) x1e3", "acc", "PSNR", "SSIM", "s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if i < 5 else "---:" for i in range(len(cols))) + "|")
    for r in rows:
        label = SAMPLER_SPECS[r["sampler"]].label if r.get("sampler") else "—"
        cells = [r["model"], label, str(r["steps"] or "—"), r["scheme"], r["variant"]]
        if has_fid:
            cells += [_f(r.get("fid"), ".2f"), _ci(r.get("fid_ci"))]
        kid = r.get("kid")
        cells += [_f(r.get("fd_classifier"), ".2f"), _ci(r.get("fd_classifier_ci")), _f(r.get("fd_to_fp"), ".2f"),
                  _f(None if kid is None else kid * 1e3, ".2f"), _f(r.get("class_acc"), ".3f"),
                  _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f"), _f(r.get("seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    for metric, name in (("fid", "FID"), ("fd_classifier", "FD (cls)"), ("fd_to_fp", "FD to the FP sampler's images")):
        gaps = gap_recovered(rows, metric)
        if not gaps:
            continue
        lines += ["", f"Share of the quantization gap in {name} recovered, (Q - row) / (Q - FP); negative = worse than "
                  "uncorrected. Meaningful only where the gap itself is positive and its interval excludes 0 (*):", "",
                  "| model | sampler | scheme | variant | gap Q - FP [95% CI] | row - Q [95% CI] | recovered |",
                  "|---|---|---|---|---:|---:|---:|"]
        for g in gaps:
            gap_ci = g.get("gap_ci")
            no_gap = gap_ci is not None and not gap_ci[1] > 0  # no significant positive gap: a share means nothing
            share = "— (no gap)" if no_gap else f"{_f(100 * g['recovered'], '.0f')} %"
            lines.append(f"| {g['model']} | {SAMPLER_SPECS[g['sampler']].label} | {g['scheme']} | {g['variant']} | "
                         f"{_ci(gap_ci)} | {_ci(g.get('row_ci'))} | {share} |")
    return "\n".join(lines) + "\n"


# Settings that must agree for rows of several runs to share one table.
_MERGE_KEYS = ("n_images", "K", "cfg_scale", "fid", "fid_ref", "ref_images", "n_boot", "quant_profile", "correction")


def merge_runs(docs: Sequence[Dict[str, Any]]) -> tuple:
    """Rows and meta of several ``bench.json`` documents of one split benchmark, as one run.

    Rows keep their order (first document first); a row present in several documents (the ``real`` row, or a
    sampler run twice) is kept once, from the first. ``meta`` is the first document's with ``seconds`` summed.

    Raises:
        ValueError: no document, a document without rows/meta, or runs whose settings differ (names the setting).
    """
    if not docs:
        raise ValueError("nothing to merge: give at least one bench.json")
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or "rows" not in d or "meta" not in d:
            raise ValueError(f"document {i} is not a qdrift bench.json (needs 'rows' and 'meta')")
    meta = dict(docs[0]["meta"])
    for d in docs[1:]:
        for k in _MERGE_KEYS:
            if d["meta"].get(k) != meta.get(k):
                raise ValueError(f"runs differ in {k}: {meta.get(k)!r} vs {d['meta'].get(k)!r}; they cannot share a "
                                 "table")
    rows, seen = [], set()
    for d in docs:
        for r in d["rows"]:
            key = (r["model"], r.get("sampler"), r.get("steps"), r["scheme"], r["variant"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    meta["seconds"] = sum(float(d["meta"].get("seconds") or 0.0) for d in docs)
    if len(docs) > 1:
        meta["mode"] = f"{len(docs)} runs merged"
    return rows, meta


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdrift.bench.report",
                                description="One Table-1-style markdown from the bench.json of several runs.")
    p.add_argument("runs", nargs="+", type=Path, help="output folders of qdrift bench, or bench.json files")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    docs = []
    for path in args.runs:
        f = path / "bench.json" if path.is_dir() else path
        try:
            docs.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            p.error(f"cannot read {f}: {e}")
    try:
        rows, meta = merge_runs(docs)
    except ValueError as e:
        p.error(str(e))
    table = markdown_table(rows, meta)
    if args.out is not None:
        args.out.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
