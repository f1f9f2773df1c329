"""``qdrift bench``: a tiny smoke run (tiny untrained networks, few steps, one scheme) checking the JSON rows, the
markdown table and the PNGs; plus the table arithmetic and the CLI's error messages."""

import json
import math
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from qdrift.bench import cli, runner
from qdrift.bench.data import load_fashion_mnist
from qdrift.bench.images import read_png_size
from qdrift.bench.models import DiT, UNet, weights_dir
from qdrift.bench.report import ROW_FIELDS, markdown_table


def _need_data_and_classifier():
    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    if not (weights_dir() / "classifier.safetensors").is_file():
        pytest.skip("classifier weights not trained")


def _tiny(kind: str) -> torch.nn.Module:
    """Small untrained networks with a non-zero output layer (the real ones start at zero)."""
    torch.manual_seed(0)
    net = UNet(channels=8, mult=(1, 2), blocks=1, heads=2) if kind == "unet" else DiT(patch=7, dim=32, depth=1, heads=2)
    last = net.conv_out if kind == "unet" else net.final.linear
    torch.nn.init.normal_(last.weight, std=0.05)
    if kind == "dit":  # adaLN-Zero: open the gates so that the quantized blocks matter
        for m in [net.final.ada] + [blk.ada for blk in net.blocks]:
            torch.nn.init.normal_(m.weight, std=0.05)
    return net.eval()


def _png_pixels(path):
    """Decode an 8-bit non-interlaced PNG (filter 0 rows, as save_png writes) -> [H, W, channels] uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag}"
        if tag == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color = ihdr[:4]
    ch = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * ch)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, ch)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    _need_data_and_classifier()
    out = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    rc = cli.main(["--models", "unet,dit", "--schemes", "w4a4", "--samplers", "euler,dpmpp_2m,flow_euler",
                   "--steps", "euler=3,dpmpp_2m=3,flow_euler=3", "-n", "8", "--batch-size", "5", "-K", "2",
                   "--baselines", "ptqd", "--methods", "paper,v2,matched", "--bands", "1,2", "--tune", "--size-drift", "--ref-images", "300", "--boot", "20", "--fig-pool", "4",
                   "--fig-ks", "1,2,4", "--fig-scheme", "w4a4", "--grid-n", "4", "--out", str(out),
                   "--no-progress"], load_net=_tiny)
    return rc, out


def test_smoke_run_rows(smoke):
    rc, out = smoke
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["quant_profile"] == "stress"  # the default
    assert doc["meta"]["ptq"] == "none"  # the default: round to nearest, the published rows
    assert set(doc["meta"]["quant"]) == {"unet/w4a4", "dit/w4a4"}
    assert doc["meta"]["quant"]["unet/w4a4"]["output_rel_err"] > 0
    assert "profile `stress`" in (out / "table.md").read_text()
    real = [r for r in doc["rows"] if r["model"] == "real"]
    assert len(real) == 1 and real[0]["class_acc"] >= 0.75 and real[0]["fd_classifier"] > 0  # real training images
    rows = [r for r in doc["rows"] if r["model"] != "real"]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["n_images"] == 8 and r["steps"] == 3 and r["seconds"] > 0
        assert r["fid"] is None and r["fid_ci"] is None  # quick mode: no Inception
        assert math.isfinite(r["fd_classifier"]) and r["fd_classifier"] >= 0
        assert 0 <= r["class_acc"] <= 1
    keys = [(r["model"], r["sampler"], r["scheme"], r["variant"]) for r in rows]
    expected = {("unet", "euler", "fp", "fp"), ("unet", "euler", "w4a4", "quantized"),
                ("unet", "euler", "w4a4", "qdrift-paper"), ("unet", "euler", "w4a4", "qdrift-v2"),
                ("unet", "euler", "w4a4", "ptqd"), ("unet", "dpmpp_2m", "w4a4", "qdrift-paper"),
                ("unet", "dpmpp_2m", "w4a4", "qdrift-paper-quadrature"), ("unet", "dpmpp_2m", "w4a4", "qdrift-v2"),
                ("dit", "flow_euler", "fp", "fp"), ("dit", "flow_euler", "w4a4", "quantized"),
                ("dit", "flow_euler", "w4a4", "qdrift-paper"), ("dit", "flow_euler", "w4a4", "qdrift-v2")}
    expected |= {(m, s, "w4a4", v) for m, s in (("unet", "euler"), ("unet", "dpmpp_2m"), ("dit", "flow_euler"))
                 for v in ("qdrift-matched", "qdrift-matched-b2", "qdrift-v2-b2", "qdrift-v2-tuned", "qdrift-v2-b2-tuned",
                           "qdrift-v2-sized", "qdrift-v2-b2-sized")}
    assert expected <= set(keys) and len(keys) == len(set(keys)) == 37
    by = {k: r for k, r in zip(keys, rows)}
    fp, q, qd = (by[("unet", "euler", s, v)] for s, v in (("fp", "fp"), ("w4a4", "quantized"), ("w4a4", "qdrift-paper")))
    assert fp["psnr"] is None and q["psnr"] is not None and q["ssim"] <= 1
    assert qd["K"] == 2 and q["K"] == 0 and qd["v_reduce"] == "scalar" and qd["calib_seconds"] > 0
    assert by[("unet", "dpmpp_2m", "w4a4", "qdrift-paper-quadrature")]["form"] == "quadrature"
    assert qd["method"] == "paper" and by[("unet", "euler", "w4a4", "qdrift-v2")]["method"] == "v2"
    assert fp["fd_to_fp"] == 0.0 and q["fd_to_fp"] > 0  # distance to the FP sampler's own images
    d, lo, hi = qd["fd_classifier_ci"]
    assert lo <= hi and math.isclose(d, qd["fd_classifier"] - q["fd_classifier"], rel_tol=1e-6, abs_tol=1e-6)
    # the quantized model differs from FP and Q-Drift changes the sampler's output
    assert q["psnr"] < 200 and qd["psnr"] != q["psnr"]
    dq = by[("dit", "flow_euler", "w4a4", "quantized")]
    assert dq["psnr"] < 200 and by[("dit", "flow_euler", "w4a4", "qdrift-paper")]["psnr"] != dq["psnr"]
    assert doc["meta"]["calib_labels"] and len(doc["meta"]["calib_labels"]) == 2
    m1, m2 = by[("unet", "euler", "w4a4", "qdrift-matched")], by[("unet", "euler", "w4a4", "qdrift-matched-b2")]
    assert m1["method"] == m2["method"] == "matched" and m1["calib_seconds"] > 0
    assert m1["psnr"] != q["psnr"] and m1["psnr"] != m2["psnr"]  # matching acts, and bands differ from one c
    v1, v2b = by[("unet", "euler", "w4a4", "qdrift-v2")], by[("unet", "euler", "w4a4", "qdrift-v2-b2")]
    assert v2b["method"] == "v2" and v2b["bands"] == 2 and v1["bands"] == 1 and v2b["psnr"] != v1["psnr"]
    for name in ("qdrift-v2-tuned", "qdrift-v2-b2-tuned"):  # --tune: strength by qdrift.tune_strength on the K noises
        t = by[("unet", "euler", "w4a4", name)]
        mse = {float(k): v for k, v in t["tune_mse"].items()}
        assert t["method"] == "v2" and len(mse) == 7 and t["strength"] == min(mse, key=lambda k: (mse[k], abs(k - 1)))
        assert t["calib_seconds"] > by[("unet", "euler", "w4a4", name[: -len("-tuned")])]["calib_seconds"]
    for name in ("qdrift-v2-sized", "qdrift-v2-b2-sized"):  # --size-drift: qdrift.size_drift on the K noises
        t, plain = by[("unet", "euler", "w4a4", name)], by[("unet", "euler", "w4a4", name[: -len("-sized")])]
        assert t["method"] == "v2" and len(t["drift_scale"]) == 1 and 0 <= t["drift_scale"][0] <= 4
        assert t["calib_seconds"] > plain["calib_seconds"] and "drift_scale" not in plain


def test_smoke_run_table_and_pngs(smoke):
    _, out = smoke
    table = (out / "table.md").read_text()
    assert "| model | sampler | steps | scheme | variant |" in table and "FID: not computed" in table
    body = [ln for ln in table.splitlines() if ln.startswith("| unet") or ln.startswith("| dit")]
    assert len([ln for ln in body if "quantized" in ln and "w4a4" in ln]) == 3
    assert any(ln.startswith("| real |") for ln in table.splitlines())
    assert "recovered" in table
    for name in ("grid_unet_euler.png", "grid_unet_dpmpp_2m.png", "grid_dit_flow_euler.png", "fig2_c_envelopes.png"):
        path = out / name
        w, h = read_png_size(path)
        px = _png_pixels(path)
        assert px.shape[:2] == (h, w) and px.std() > 5, name  # not blank
    # grid: FP, w4a4 Q, w4a4 Q-Drift rows of 4 images (84 px tiles)
    assert _png_pixels(out / "grid_unet_euler.png").shape[0] >= 3 * 84
    fig = json.loads((out / "fig2.json").read_text())
    env = fig["unet"]["envelopes"]
    assert set(env) == {"1", "2", "4"} and env["1"]["subsets"] == 4 and env["4"]["subsets"] == 1
    lo, hi = np.array(env["1"]["min"]), np.array(env["1"]["max"])
    assert lo.shape == (3, 1) and (lo <= hi).all() and (hi > 0).any()
    assert np.allclose(env["4"]["min"], env["4"]["max"])
    assert len(list((out / "calibrations").glob("*.qdrift.safetensors"))) == 3


def test_c_coefficients_match_paper_rule():
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.0])
    V = torch.tensor([[0.1], [0.2], [0.4]])
    c = runner.c_coefficients(V, sigmas)
    assert torch.allclose(c[:, 0], torch.tensor([6 * 0.1 / 20, 3 * 0.2 / 8, 1 * 0.4 / 2]))


def test_opt_in_samplers_run_only_when_asked():
    """The U-Net's DPM++ 2M SDE rows are opt-in: the default set (make demo) stays Euler, Euler a and DPM++ 2M."""
    assert runner.BenchConfig().sampler_names("unet") == ["euler", "euler_ancestral", "dpmpp_2m"]
    cfg = runner.BenchConfig(samplers=["dpmpp_2m_sde", "euler"])
    assert cfg.sampler_names("unet") == ["euler", "dpmpp_2m_sde"] and cfg.steps_for("dpmpp_2m_sde") == 20
    assert cfg.sampler_names("dit") == []
    # the DiT's flow LMS rows too (its error amplification is what the frequency bands are measured on)
    assert runner.BenchConfig().sampler_names("dit") == ["flow_euler"]
    cfg = runner.BenchConfig(samplers=["flow_lms"])
    assert cfg.sampler_names("dit") == ["flow_lms"] and cfg.steps_for("flow_lms") == 20
    assert runner.SAMPLER_SPECS["flow_lms"].fn == runner.SAMPLER_SPECS["lms"].fn == "lms"
    assert runner.BenchConfig(samplers=["lms"]).sampler_names("unet") == ["lms"]


def test_correction_option_reaches_the_qdrift_rows_of_stochastic_samplers_only(tmp_path):
    """``qdrift bench --correction drift``: the Q-Drift rows of Euler a and the DPM++ SDE solvers run with it (noise
    first is the SDE solvers' own default); deterministic samplers, quantized rows and baselines are untouched."""
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--correction", "drift", "--out", str(tmp_path)]))
    assert cfg.correction == "drift"
    assert cli.config_from_args(cli.build_parser().parse_args(["--out", str(tmp_path)])).correction is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--correction", "both"])
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    den = lambda x, s, **k: x * 0  # noqa: E731
    row = runner.Variant("qdrift-v2", "w4a4", 5, "scalar", method="v2")
    cal = type("Cal", (), {"with_options": lambda self, **k: self})()
    for fn, expect in (("dpmpp_2m_sde", "drift"), ("euler_ancestral", "drift"), ("euler", None), ("dpmpp_2m", None)):
        block = runner.Block("unet", fn, 2, sigmas)
        kw = runner.variant_sampling(row, den, cal, block, correction="drift").kwargs()
        assert kw.get("correction") == expect and kw["method"] == "v2", (fn, kw)
        assert "correction" not in runner.variant_sampling(row, den, cal, block).kwargs()
    sde = runner.Block("unet", "dpmpp_2m_sde", 2, sigmas)
    plain = runner.variant_sampling(runner.Variant("quantized", "w4a4"), den, None, sde, correction="drift")
    assert plain.kwargs() == {}
    meta = runner.run_meta(runner.BenchConfig(correction="drift"), 0.0, None)
    assert meta["correction"] == "drift"


def test_per_image_noise_is_batch_independent():
    a = runner.PerImageNoise([5, 6, 7]).draw()
    b = torch.cat([runner.PerImageNoise([5]).draw(), runner.PerImageNoise([6, 7]).draw()])
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_guided_net_combines_conditional_and_null():
    class Net(torch.nn.Module):
        def forward(self, x, t, y):
            return x + y.float()[:, None, None, None]

    g = runner.GuidedNet(Net(), 3.0)
    x = torch.zeros(2, 1, 2, 2)
    out = g(x, torch.zeros(2), torch.tensor([1, 2]))
    # null label 10: out_u = 10, out_c = y -> 10 + 3 (y - 10)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([10 + 3 * (1 - 10.0), 10 + 3 * (2 - 10.0)]))


def test_gap_recovered_and_table():
    rows = [dict(model="unet", sampler="euler", steps=30, scheme="fp", variant="fp", fd_classifier=1.0),
            dict(model="unet", sampler="euler", steps=30, scheme="w4a4", variant="quantized", fd_classifier=5.0,
                 fd_classifier_ci=[4.0, 2.0, 6.0]),
            dict(model="unet", sampler="euler", steps=30, scheme="w4a4", variant="qdrift", fd_classifier=4.0,
                 fd_classifier_ci=[-1.0, -1.5, -0.5])]
    g = runner.gap_recovered(rows)
    assert len(g) == 1 and math.isclose(g[0]["recovered"], 0.25)
    meta = dict(mode="quick", n_images=10, eval_seeds="1 + i", cfg_scale=3.0, K=5, fid="none", ref_images=10,
                n_boot=10, threads=1)
    t = markdown_table(rows, meta)
    assert "| +4.00 [+2.00, +6.00]* | -1.00 [-1.50, -0.50]* | 25 % |" in t


def test_cli_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["--schemes", "w2a2"])
    assert "w2a2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["-n", "1"])
    with pytest.raises(SystemExit):
        cli.main(["--quant-profile", "loud"])
    assert "stress" in capsys.readouterr().err
    assert cli.config_from_args(cli.build_parser().parse_args(["--quant-profile", "reference"])).quant_profile \
        == "reference"
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--ptq", "gac", "--ptq-iters", "50"]))
    assert cfg.ptq == "gac" and cfg.ptq_options == {"iters": 50}
    assert cli.config_from_args(cli.build_parser().parse_args([])).ptq == "none"
    with pytest.raises(SystemExit):
        cli.main(["--ptq", "adaround"])
    assert "brecq" in capsys.readouterr().err
    args = cli.build_parser().parse_args([])
    assert args.schemes == ["w4a8", "w4a4", "w3a4"]  # the quick default keeps the simulated schemes only
    assert cli.build_parser().parse_args(["--schemes", "gguf-q4_0,nf4,quanto-int4"]).schemes == \
        ["gguf-q4_0", "nf4", "quanto-int4"]
    monkeypatch.setattr("qdrift.quant.formats.format_available", lambda scheme: scheme != "nf4")
    assert cli.main(["--models", "dit", "--schemes", "gguf-q4_0,nf4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nf4 needs bitsandbytes" in err and "qdrift[bnb]" in err and "gguf" not in err
    monkeypatch.undo()
    monkeypatch.setattr("qdrift.bench.models.WEIGHTS_DIR", tmp_path)
    assert cli.main(["--models", "dit", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "python -m qdrift.bench.train dit" in err and "classifier" in err
    monkeypatch.setattr("qdrift.bench.metrics.INCEPTION_PACKAGE", "no_such_package_qdrift")
    assert cli.main(["--models", "unet", "--fid", "inception", "--out", str(tmp_path / "o")]) == 2
    assert "--fid none" in capsys.readouterr().err


def test_report_merges_split_runs(smoke, tmp_path, capsys):
    from qdrift.bench import report

    _, out = smoke
    doc = json.loads((out / "bench.json").read_text())
    unet = dict(doc, rows=[r for r in doc["rows"] if r["model"] in ("real", "unet")])
    dit = dict(doc, rows=[r for r in doc["rows"] if r["model"] in ("real", "dit")])
    rows, meta = report.merge_runs([unet, dit])
    assert [r["variant"] for r in rows] == [r["variant"] for r in doc["rows"]]  # real row once, order kept
    assert meta["seconds"] == pytest.approx(2 * doc["meta"]["seconds"]) and "2 runs merged" in meta["mode"]
    (tmp_path / "a.json").write_text(json.dumps(unet))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bench.json").write_text(json.dumps(dit))
    assert report.main([str(tmp_path / "a.json"), str(tmp_path / "b"), "--out", str(tmp_path / "t.md")]) == 0
    assert capsys.readouterr().out == (tmp_path / "t.md").read_text() == report.markdown_table(rows, meta)
    other = dict(dit, meta=dict(dit["meta"], n_images=9))
    with pytest.raises(ValueError, match="differ in n_images"):
        report.merge_runs([unet, other])
    with pytest.raises(ValueError, match="not a qdrift bench.json"):
        report.merge_runs([unet, {"rows": []}])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])
    assert "cannot read" in capsys.readouterr().err


def test_correction_check_script_prints_a_line_per_scheme_method_and_noise_set(capsys):
    """benchmarks/correction_check.py on tiny untrained networks: one summary per (scheme, method, noise set)."""
    from qdrift.bench import correction_check

    torch.set_num_threads(1)
    rc = correction_check.main(["--model", "unet", "--schemes", "w4a4", "--steps", "3", "-K", "2", "-n", "3",
                                "--table", "--threads", "1"], load_net=_tiny)
    out = capsys.readouterr().out
    assert rc == 0
    spectra = [ln for ln in out.splitlines() if ln.startswith("w4a4 ") and "per frequency band" in ln]
    lines = [ln for ln in out.splitlines() if ln.startswith("w4a4 ") and ln not in spectra]
    assert len(lines) == 4 and sum("calibration: paper" in ln for ln in lines) == 1
    assert sum("held-out: v2 on 3 noises" in ln for ln in lines) == 1
    assert "| level | Var fp |" in out
    assert len(spectra) == 4 and sum("held-out: v2, final variance per frequency band" in ln for ln in spectra) == 1
    assert all(re.search(r"plain( \d+\.\d{3}){4}, corrected( \d+\.\d{3}){4}$", ln) for ln in spectra), spectra
    rc = correction_check.main(["--model", "unet", "--schemes", "w4a4", "--steps", "3", "-K", "2", "-n", "3",
                                "--methods", "v2", "--strengths", "0.5,2", "--threads", "1"], load_net=_tiny)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("w4a4 ") and "frequency band" not in ln]
    assert rc == 0 and len(lines) == 4 and sum("held-out (strength 2): v2" in ln for ln in lines) == 1
    rc = correction_check.main(["--model", "unet", "--schemes", "w4a4", "--steps", "3", "-K", "2", "-n", "3",
                                "--methods", "v2", "--size-drift", "--size-output", "--threads", "1"], load_net=_tiny)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("w4a4 ") and "frequency band" not in ln]
    assert rc == 0 and len(lines) == 7 and sum("size_drift factor" in ln for ln in lines) == 1
    assert sum("held-out: v2-sized on 3 noises" in ln for ln in lines) == 1
    assert sum("held-out: v2-sized-output on 3 noises" in ln for ln in lines) == 1
    assert "held-out: v2-sized, final variance per frequency band" in out  # the row's label, not its method
    assert re.search(r"calibration \[\d+\.\d{3} \+- (\d+\.\d{3}|inf|nan) -> \d+\.\d{3}\]", lines[0]), lines[0]
    rc = correction_check.main(["--model", "unet", "--schemes", "w4a4", "--steps", "3", "-K", "2", "-n", "3",
                                "--methods", "v2", "--output-only", "--threads", "1"], load_net=_tiny)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("w4a4 ") and "frequency band" not in ln]
    assert rc == 0 and len(lines) == 4 and sum("held-out: v2-output-only on 3 noises" in ln for ln in lines) == 1
    rc = correction_check.main(["--model", "unet", "--schemes", "w4a4", "--steps", "3", "-K", "2", "-n", "3",
                                "--methods", "v2", "--size-drift", "--factor-only", "--threads", "1"], load_net=_tiny)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("w4a4 ")]
    assert rc == 0 and len(lines) == 1 and "size_drift factor" in lines[0]
    with pytest.raises(SystemExit):
        correction_check.main(["--model", "unet", "--factor-only"], load_net=_tiny)
    assert "--factor-only needs --size-drift" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        correction_check.main(["--model", "unet", "--size-output"], load_net=_tiny)
    assert "--size-output needs --size-drift" in capsys.readouterr().err
    for bad in ("x", "-1", "inf", ""):
        with pytest.raises(SystemExit):
            correction_check.main(["--model", "unet", "--strengths", bad], load_net=_tiny)
    assert "--strengths must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        correction_check.main(["--model", "unet", "--bands", "0"], load_net=_tiny)
    assert "--bands must be >= 1" in capsys.readouterr().err


def test_error_anatomy_script_prints_a_table_per_scheme(capsys):
    """benchmarks/error_anatomy.py on tiny untrained networks: one table per scheme."""
    from qdrift.bench import error_anatomy

    torch.set_num_threads(1)
    rc = error_anatomy.main(["--model", "dit", "--schemes", "w4a4,w3a4", "--steps", "3", "-K", "2", "--threads", "1"],
                            load_net=_tiny)
    out = capsys.readouterr().out
    assert rc == 0 and out.count("| step | sigma |") == 2 and out.count("plain quantized sampler") == 2
    assert "dit w3a4, Euler 3 steps" in out


def test_flow_direction_script_prints_a_line_per_scheme_and_sampler(capsys):
    """benchmarks/flow_direction.py on a tiny untrained DiT: one line per (scheme, sampler), the SDE solvers from
    t = 1 - 1e-4; --whole-step runs flow=False and refuses a stochastic sampler."""
    from qdrift.bench import flow_direction

    torch.set_num_threads(1)
    rc = flow_direction.main(["--schemes", "w4a4", "--samplers", "euler,heun,dpmpp_2m_sde", "--steps", "4", "-n", "3"],
                             load_net=_tiny)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("w4a4 ")]
    assert rc == 0 and [ln.split(":")[0] for ln in lines] == [
        "w4a4 euler 4 flow=True bands=1", "w4a4 heun 2 flow=True bands=1", "w4a4 dpmpp_2m_sde 4 flow=True bands=1"]
    assert all(re.search(r"mse q \d\.\d{5} -> \d\.\d{5}; min c [+-]\d\.\d{3}; v2, final variance", ln) for ln in lines)
    rc = flow_direction.main(["--schemes", "w4a4", "--samplers", "euler", "--steps", "4", "-n", "3", "--whole-step",
                              "--bands", "2"], load_net=_tiny)
    assert rc == 0 and "w4a4 euler 4 flow=False bands=2:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        flow_direction.main(["--samplers", "euler_ancestral", "--whole-step"], load_net=_tiny)
    assert "deterministic samplers only" in capsys.readouterr().err


def test_the_sized_rows_name_the_part_they_size(monkeypatch):
    """``--size-drift`` adds a ``-sized`` row (the drift and the output correction), ``--size-output`` a
    ``-sized-output`` row (``qdrift.size_drift(drift=False)``), each after its v2 row; the paper's rows get none."""
    args = cli.build_parser().parse_args(["--methods", "paper,v2", "--size-drift", "--size-output"])
    cfg = cli.config_from_args(args)
    assert cfg.size == ("all", "output")
    names = [(v.name, v.sized) for v in runner.variants_for(cfg, "euler", "w4a4")]
    assert names[:5] == [("quantized", ""), ("qdrift-paper", ""), ("qdrift-v2-b4", ""), ("qdrift-v2-b4-sized", "all"),
                         ("qdrift-v2-b4-sized-output", "output")]  # four bands: qdrift.calibrate's default on 28x28
    assert cli.config_from_args(cli.build_parser().parse_args(["--size-output"])).size == ("output",)
    seen = []
    monkeypatch.setattr(runner.qdrift, "size_drift", lambda cal, *a, **kw: seen.append(kw["drift"]) or cal)

    class _Cal:
        def with_options(self, reduce):
            return self

    class _Block:
        sigmas, fn = torch.tensor([80.0, 1.0, 0.0]), "euler"

    class _Bench:
        fp, quantized = None, {"w4a4": None}

    for var in runner.variants_for(cfg, "euler", "w4a4")[3:5]:
        runner.size_block(_Bench(), "w4a4", _Block(), 2, _Cal(), var)
    assert seen == [True, False]


def test_band_accumulation_splits_the_sizing_pass_measure_by_band(capsys):
    """Per band, the measured accumulation sums (Parseval) to the sizing pass's per-channel one, is 0 for identical
    runs, and the tool prints one line per scheme (and with --error-slope a second prediction of the same runs)."""
    import qdrift
    from qdrift.bench import band_accumulation as BA

    torch.manual_seed(0)
    fp = [torch.randn(3, 2, 8, 8, dtype=torch.float64) for _ in range(2)]
    q = [f + 0.1 * torch.randn_like(f) for f in fp]
    trace = [{"var_diff": torch.ones(8, dtype=torch.float64)}, {}]  # the second step predicted nothing
    measured, predicted = BA.band_accumulation(fp, q, trace, 4)
    per_channel = (q[0] - fp[0]).pow(2).mean((0, 2, 3)) / fp[0].var((0, 2, 3))
    assert torch.allclose(measured.reshape(2, 4).sum(1), per_channel, rtol=1e-10)
    assert torch.allclose(predicted, 1 / fp[0].var((0, 2, 3)).repeat_interleave(4))
    assert float(BA.band_accumulation(fp, fp, trace, 4)[0].abs().max()) == 0.0
    assert BA.main(["--schemes", "w4a4", "-n", "3", "--bands", "2", "--error-slope"], load_net=_tiny) == 0
    out = capsys.readouterr().out
    assert "2 bands" in out and out.count("w4a4: measured") == 1
    lines = {line.split(":")[0]: line for line in out.splitlines() if "measured" in line}
    measured = lambda line: line.split("measured ")[1].split(";")[0]  # noqa: E731
    # the same runs measured, another prediction (the surrogate carried with the slope along the error)
    assert measured(lines["w4a4"]) == measured(lines["w4a4 (slope along the error)"])
    assert lines["w4a4"].split("predicted")[1] != lines["w4a4 (slope along the error)"].split("predicted")[1]
    assert qdrift.plan.DriftPlan._difference_kappa(None, 1.0, "kappa") == "kappa"  # the override is undone


def test_lookahead_check_reproduces_the_analytic_v2_column_and_shoots(capsys):
    """Its first row (no deficit) is `qdrift analytic`'s v2 column on the same draws; each further row aims lower by
    the previous row's predicted final excess (the shooting), and the override is undone afterwards."""
    import warnings

    import qdrift
    from qdrift.bench import analytic, lookahead
    from qdrift.plan import DriftPlan

    before = DriftPlan._deficit
    args = ["--steps", "6", "--n", "400", "--K", "2", "--starts", "1", "--iterations", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
        assert lookahead.main(args) == 0
        table = analytic.measure(400, 6, 0.4, 2, error="correlated", samplers=["euler_ancestral"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2 and float(rows[0][2]) == 0.0 and float(rows[1][2]) == pytest.approx(float(rows[0][3]), abs=2e-3)
    assert float(rows[0][4].strip(" %")) == pytest.approx(table["euler_ancestral"]["v2"], abs=0.05)
    assert DriftPlan._deficit is before
