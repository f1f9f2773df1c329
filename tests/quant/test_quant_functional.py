"""Fake-quantization primitives against hand-computed grids."""

import pytest
import torch

from qdrift.quant import (ema_range, quantize_asymmetric, quantize_symmetric, quantize_symmetric_groups,
                          quantize_unsigned_groups, signed_qmax)


def test_signed_qmax_table():
    assert [signed_qmax(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
    for bad in (1, 0, 17, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            signed_qmax(bad)


def test_symmetric_int4_per_row_hand_grid():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.26], [-1.4, 0.5, 0.0, 0.19]], dtype=torch.float64)
    # row 0: scale 0.7/7 = 0.1 -> levels 7, -3.5 -> -4 (half to even), 1, 2.6 -> 3
    # row 1: scale 0.2 -> -7, 2.5 -> 2 (half to even), 0, 0.95 -> 1
    expect = torch.tensor([[0.7, -0.4, 0.1, 0.3], [-1.4, 0.4, 0.0, 0.2]], dtype=torch.float64)
    got = quantize_symmetric(w, 4, dim=1)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


def test_symmetric_int3_and_int2_levels():
    w = torch.linspace(-1, 1, 101, dtype=torch.float64)
    q3 = quantize_symmetric(w, 3)
    assert sorted(set((q3 * 3).round().tolist())) == [-3, -2, -1, 0, 1, 2, 3]
    q2 = quantize_symmetric(w, 2)
    assert sorted(set(q2.tolist())) == [-1.0, 0.0, 1.0]  # ternary
    assert torch.equal(quantize_symmetric(torch.zeros(3), 4), torch.zeros(3))


def test_symmetric_groups_hand_grid_with_partial_group():
    # groups of 2 along the last dim: [0.7, 0.1] [-0.3, 0.02] [2.1]
    # scales 0.1 | 0.3/7 (0.02 / (0.3/7) = 0.467 -> 0) | 0.3
    x = torch.tensor([[0.7, 0.1, -0.3, 0.02, 2.1]], dtype=torch.float64)
    expect = torch.tensor([[0.7, 0.1, -0.3, 0.0, 2.1]], dtype=torch.float64)
    got = quantize_symmetric_groups(x, 4, 2)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    # int3 grid on group [0.7, 0.1]: scale 0.7/3, 0.1 -> round(0.4286) = 0
    got3 = quantize_symmetric_groups(x[:, :2], 3, 2)
    torch.testing.assert_close(got3, torch.tensor([[0.7, 0.0]], dtype=torch.float64))
    # group size larger than the row = one group per row
    torch.testing.assert_close(quantize_symmetric_groups(x, 4, 64), quantize_symmetric(x, 4, dim=1))
    with pytest.raises(ValueError, match="group_size"):
        quantize_symmetric_groups(x, 4, 0)


def test_unsigned_groups_hand_grid_and_shift():
    # uint4: 15 levels over [0, max]; x + shift with shift 0.5: [0, 1.5, 0.75] -> scale 0.1
    x = torch.tensor([[-0.5, 1.0, 0.25, -0.44]], dtype=torch.float64)
    got = quantize_unsigned_groups(x[:, :3], 4, 4, shift=0.5)
    torch.testing.assert_close(got, torch.tensor([[-0.5, 1.0, 0.3]], dtype=torch.float64), rtol=0, atol=1e-12)
    # values below -shift clip to -shift
    got = quantize_unsigned_groups(torch.tensor([-1.0, 1.0]), 4, 2, shift=0.5)
    assert got[0].item() == pytest.approx(-0.5)
    # per-channel shift broadcasts over the last dim
    got = quantize_unsigned_groups(torch.tensor([[-0.2, -0.1]]), 4, 2, shift=torch.tensor([0.2, 0.1]))
    torch.testing.assert_close(got, torch.tensor([[-0.2, -0.1]]))


def test_asymmetric_hand_grid_zero_exact():
    # range [-1, 2] at 2 bits: scale 1, zero point 1 -> levels {-1, 0, 1, 2}
    x = torch.tensor([-3.0, -0.6, 0.0, 0.4, 1.6, 5.0])
    got = quantize_asymmetric(x, 2, -1.0, 2.0)
    torch.testing.assert_close(got, torch.tensor([-1.0, -1.0, 0.0, 0.0, 2.0, 2.0]))
    # a range excluding 0 is widened to include it: [0.5, 2.55] -> [0, 2.55] at 8 bits, scale 0.01
    got = quantize_asymmetric(torch.tensor([0.0, 0.123, 2.55]), 8, 0.5, 2.55)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.12, 2.55]), rtol=0, atol=1e-6)


def test_ema_range_recurrence():
    lo, hi = ema_range([-1.0, -3.0], [1.0, 2.0], momentum=0.95)
    assert lo == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert hi == pytest.approx(0.95 * 1 + 0.05 * 2)
    with pytest.raises(ValueError):
        ema_range([], [])
    with pytest.raises(ValueError, match="momentum"):
        ema_range([0.0], [1.0], momentum=1.0)
