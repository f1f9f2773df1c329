"""The PTQ comparison table (``benchmarks/ptq_reconstruction.py --summarize``) reads bench.json files."""

import json

from qdrift.bench.ptq_reconstruction import summarize


def _run(tmp_path, ptq, gap, v2_change, err):
    rows = [
        dict(model="unet", sampler="euler", steps=30, scheme="fp", variant="fp", fd_to_fp=0.0, psnr=None),
        dict(model="unet", sampler="euler", steps=30, scheme="w4a8", variant="quantized", fd_to_fp=gap,
             fd_to_fp_ci=[gap, gap / 2, gap * 1.5], psnr=25.0),
        dict(model="unet", sampler="euler", steps=30, scheme="w4a8", variant="qdrift-v2", fd_to_fp=gap + v2_change,
             fd_to_fp_ci=[v2_change, v2_change - 1, v2_change + 1], psnr=26.0),
    ]
    out = tmp_path / ptq
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"meta": {"ptq": ptq, "quant": {"unet/w4a8": {"output_rel_err": err}}},
                                                "rows": rows}))
    return out


def test_summary_reads_each_runs_gap_and_share(tmp_path):
    table = summarize([_run(tmp_path, "none", 20.0, -10.0, 0.012), _run(tmp_path, "gac", 10.0, 0.5, 0.010)])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "qdrift-v2" in lines[0]
    assert "| none | 1.200 % | 20.0* [+10.0, +30.0] | 10.0 (+50 %*) | 25.00 / 26.00 |" in lines[2]
    assert "| gac | 1.000 % |" in lines[3] and "(-5 %)" in lines[3]  # interval includes 0: no star
