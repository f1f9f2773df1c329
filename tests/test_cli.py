"""Every ``qdrift`` command answers bad arguments with one line on stderr and exit status 2."""

import subprocess
import sys

import pytest

from qdrift.cli import main

BAD = [
    ([], "missing command"),
    (["nope"], "unknown command 'nope'"),
    (["analytic", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["analytic", "--steps", "x"], "--steps: expected an integer >= 1, got 'x'"),
    (["analytic", "--n", "0"], "--n: expected an integer >= 2"),
    (["analytic", "--n", "1"], "--n: expected an integer >= 2"),
    (["analytic", "--K", "0"], "--K: expected an integer >= 1"),
    (["analytic", "--v", "nan"], "--v: expected a finite number > 0"),
    (["analytic", "--v", "0"], "--v: expected a finite number > 0"),
    (["analytic", "--v", "-1"], "--v: expected a finite number > 0"),
    (["analytic", "--markdown", "/nonexistent-dir/t.md"], "no such directory"),
    (["analytic", "--bogus"], "unrecognized arguments: --bogus"),
    (["analytic", "--samplers", "euler,nope"], "--samplers: expected qdrift samplers from euler"),
    (["analytic", "--samplers", ","], "--samplers: expected qdrift samplers"),
    (["analytic", "--eta", "-1"], "--eta: expected a finite number >= 0"),
    (["analytic", "--error", "speckle", "--eta", "0"], "--samplers and --eta apply to"),
    (["analytic", "--flow", "--bands", "4"], "--flow takes the independent, correlated and persistent errors"),
    (["analytic", "--flow", "--error", "speckle"], "--flow takes the independent"),
    (["bench", "--cfg", "nan"], "--cfg: expected a finite number >= 0"),
    (["bench", "--cfg", "-1"], "--cfg: expected a finite number >= 0"),
    (["bench", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["bench", "-n", "0"], "--n-images must be >= 2"),
    (["bench", "-n", "x"], "invalid int value"),
    (["bench", "-K", "0"], "--K must be >= 1"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--steps", "euler=0"], "expected SAMPLER=STEPS"),
    (["bench", "--models", "nope"], "unknown nope"),
    (["bench", "--fig-ks", "0"], "expected integers >= 1"),
    (["bench", "--v", "pixel"], "invalid choice"),
    (["bench", "--out", __file__], "exists and is not a folder"),
    (["bench", "--out", __file__ + "/sub"], "cannot create the folder"),  # checked before the run, not after it
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("qdrift"), err


def test_help_is_not_an_error(capsys):
    assert main(["--help"]) == 0
    assert "analytic" in capsys.readouterr().out


def test_console_entry_point_exit_status():
    """The same through a real process (no traceback, status 2)."""
    p = subprocess.run([sys.executable, "-m", "qdrift.cli", "analytic", "--steps", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_analytic_one_sampler_with_its_noise_amount_and_a_persistent_error(capsys):
    """``--samplers`` runs only those samplers, ``--eta`` sets the stochastic ones' noise (eta = 0: a deterministic
    3M sampler, whose runs then do not depend on the sampler noise), ``--error persistent`` keeps all the error."""
    args = ["analytic", "--error", "persistent", "--n", "300", "--steps", "6", "--samplers", "dpmpp_3m_sde,euler"]
    assert main(args + ["--eta", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| sampler")]
    assert [r.split("|")[1].strip() for r in rows] == ["dpmpp_3m_sde", "euler"]
    assert "kept along each trajectory; stochastic samplers at eta = 0" in out
    assert main(args) == 0
    assert capsys.readouterr().out != out  # the default eta (1) is another run


def test_analytic_speckle_table(tmp_path, capsys):
    """``qdrift analytic --error speckle``: v2 per channel vs per frequency band on image-like fields."""
    out = tmp_path / "speckle.md"
    assert main(["analytic", "--error", "speckle", "--n", "200", "--steps", "10", "--markdown", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    euler = next(line for line in table.splitlines() if line.startswith("| euler |"))
    _, quantized, per_channel, banded = [c.strip() for c in euler.strip("|").split("|")]
    low_channel = float(per_channel.split(" / ")[0])
    low_banded = float(banded.split(" / ")[0])
    assert low_channel > 150 and 40 < low_banded < 130, euler  # one c per channel over-smooths the low band
