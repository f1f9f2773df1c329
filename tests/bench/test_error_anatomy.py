"""qdrift.bench.error_anatomy against planted errors with known answers, and its script on tiny networks."""

import pytest
import torch

from qdrift.bench import error_anatomy

SIGMAS = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)


def _linear(x, sigma, **kwargs):
    """Exact denoiser of unit-variance Gaussian data, VE: ``D = x / (1 + sigma^2)`` (slope 1 / (1 + sigma^2))."""
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def _noise(k=16, seed=0):
    return torch.randn(k, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMAS[0]


CHECKER = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1  # (-1)^(i + j): all at Nyquist


def test_a_fixed_fine_pattern_is_a_pattern_at_high_frequency_the_model_does_not_explain():
    """``D_q = D + 0.1 sigma P`` with a checkerboard ``P``: ``delta = -0.1 P`` at every sample, so all of it is a
    fixed pattern above the frequency threshold, none of it the v2 model's (whose own ``d`` is white); for a linear denoiser the slope
    along any direction is its own, ``1 / (1 + sigma^2)``, so both kappas are that."""
    q = lambda x, s, **k: _linear(x, s) + 0.1 * s.reshape(-1, 1, 1, 1) * CHECKER  # noqa: E731
    out = error_anatomy.anatomy(_linear, q, _noise(), SIGMAS)
    assert [r["step"] for r in out["rows"]] == [0, 1, 2]  # the step to 0 has no state to deviate
    for r in out["rows"]:
        slope = 1 / (1 + r["sigma"] ** 2)
        assert r["pattern"] == pytest.approx(1.0, abs=1e-9) and r["hf err"] == pytest.approx(1.0, abs=1e-9)
        assert r["model"] < 0.02
        # d of white data is white: its share outside the disc of radius 0.25 is about 1 - pi / 16
        assert r["hf d"] == pytest.approx(1 - torch.pi / 16, abs=0.05)
        assert r["kappa state"] == pytest.approx(slope, abs=1e-5) and r["kappa err"] == pytest.approx(slope, abs=1e-5)
        assert r["keep err"] == pytest.approx(1 + (SIGMAS[r["step"] + 1] - r["sigma"]) * (1 - slope) / r["sigma"])
    assert out["final"]["mse"] > 0


def test_a_gain_error_is_all_model_and_no_pattern_and_equal_models_differ_by_nothing():
    """``delta = 0.2 d`` (``D_q = D - 0.2 sigma d``) is all explained by the v2 model and is no fixed pattern."""
    q = lambda x, s, **k: _linear(x, s) - 0.2 * (x - _linear(x, s))  # noqa: E731
    out = error_anatomy.anatomy(_linear, q, _noise(), SIGMAS)
    for r in out["rows"]:
        assert r["model"] == pytest.approx(1.0, abs=1e-9) and abs(r["pattern"]) < 0.1
    same = error_anatomy.anatomy(_linear, _linear, _noise(), SIGMAS)
    assert same["final"]["mse"] == 0.0 and same["final"]["std q"] == same["final"]["std fp"]
    with pytest.raises(ValueError, match=r"K >= 2"):
        error_anatomy.anatomy(_linear, q, _noise(k=1), SIGMAS)



def test_lifted_counts_black_positions_a_positive_error_raises_above_black():
    """Data all at -2 (below black) and a quantized model whose output is +1.5 higher at the positions of a fixed
    mask: after the last step to 0 the quantized sample is -0.5 there (lifted) and -2 elsewhere, so ``lifted`` is the
    mask's share; equal models lift nothing; samples that never reach black give no share (nan)."""
    mask = (torch.arange(64).reshape(8, 8) % 4 == 0).double()  # a quarter of the positions

    def fp(x, sigma, **k):
        return torch.full_like(x, -2.0)

    def q(x, sigma, **k):
        return fp(x, sigma) + 1.5 * mask

    out = error_anatomy.anatomy(fp, q, _noise(), SIGMAS)
    assert out["final"]["black"] == 1.0 and out["final"]["lifted"] == pytest.approx(0.25)
    assert error_anatomy.anatomy(fp, fp, _noise(), SIGMAS)["final"]["lifted"] == 0.0
    bright = error_anatomy.anatomy(lambda x, s, **k: torch.ones_like(x), q, _noise(), SIGMAS)["final"]
    assert bright["black"] == 0.0 and bright["lifted"] != bright["lifted"]
    assert "the quantized run lifts 25.00% above -0.95" in error_anatomy.format_table(out)
