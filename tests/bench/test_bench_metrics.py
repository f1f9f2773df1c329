"""Metrics: Frechet distance closed forms, FID fast path, KID, PSNR/SSIM by hand, paired bootstrap, Inception."""

import numpy as np
import pytest
import torch

from qdrift.bench.metrics import (InceptionFeatures, class_accuracy, feature_stats, fid_from_features,
                                  frechet_distance, inception_path, kid, paired_bootstrap_fid_diff, psnr, ssim)


def test_frechet_1d_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    d = frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]])
    assert d == pytest.approx(9.0 + (2.0 - 0.5) ** 2, abs=1e-12)


def test_frechet_non_commuting_2x2_closed_form():
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 1.0])
    # for 2x2 M with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = s1 s2
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, abs=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expect, abs=1e-10)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_of_samples_converges_and_fast_path_matches():
    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(d, d))
    s_ref = a @ a.T / d + np.eye(d)
    mu_ref = rng.normal(size=d)
    x = rng.multivariate_normal(mu_ref, s_ref, size=20000)
    assert fid_from_features(x, mu_ref, s_ref) < 0.02  # same Gaussian: ~0
    shifted = x + 1.0
    assert fid_from_features(shifted, mu_ref, s_ref) == pytest.approx(d * 1.0, abs=0.05)
    # N < D uses the N x N Gram form; it must equal the direct formula on the same statistics
    y = rng.normal(size=(5, d)) * 2
    mu_y, s_y = feature_stats(y)
    assert fid_from_features(y, mu_ref, s_ref) == pytest.approx(frechet_distance(mu_y, s_y, mu_ref, s_ref), rel=1e-7)


def test_fid_of_set_with_itself_is_zero_high_dim():
    rng = np.random.default_rng(1)
    f = np.abs(rng.normal(size=(300, 64)))
    mu, s = feature_stats(f)
    assert abs(fid_from_features(f, mu, s)) < 1e-8
    assert fid_from_features(f + 0.1, mu, s) > 0.5


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kid(x, y, subsets=20, subset_size=200)
    shifted, _ = kid(x, y + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 0.02
    assert shifted > 10 * max(abs(same), 1e-3)
    # cubic kernel MMD^2 of two point sets of 2 points, by hand
    a, b = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    k = lambda u, v: (u * v + 1) ** 3  # noqa: E731
    expect = 2 * k(0, 1) / 2 + 2 * k(2, 3) / 2 - 2 * np.mean([k(i, j) for i in (0, 1) for j in (2, 3)])
    assert kid(a, b, subsets=1, subset_size=2)[0] == pytest.approx(expect)


def test_psnr_by_hand():
    x = torch.zeros(2, 1, 8, 8)
    y = x.clone()
    y[0] += 0.1
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(10 * np.log10(4 / 0.01))
    assert torch.isinf(p[1])


def test_ssim_by_hand_constant_images_and_identity():
    a, b = 0.5, -0.2
    x = torch.full((1, 1, 10, 10), a)
    y = torch.full((1, 1, 10, 10), b)
    c1 = (0.01 * 2) ** 2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    z = torch.rand(3, 2, 12, 12) * 2 - 1
    torch.testing.assert_close(ssim(z, z), torch.ones(3, dtype=torch.float64))
    other = torch.rand(3, 2, 12, 12) * 2 - 1
    close = ssim(z, z + 0.05 * other)
    assert (close > 0.9).all() and (close < 1).all()
    assert (ssim(z, other).abs() < 0.3).all()  # independent noise: no structure in common
    with pytest.raises(ValueError):
        ssim(z, z[:, :1])
    with pytest.raises(ValueError, match="window"):
        ssim(z, z, window_size=13)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(3)
    d = 8
    ref = rng.normal(size=(2000, d))
    mu, s = feature_stats(ref)
    noise = rng.normal(size=(300, d))
    good = noise  # same distribution as the reference
    bad = noise * 1.3 + 0.2  # paired with `good`, row by row
    out = paired_bootstrap_fid_diff(bad, good, mu, s, n_boot=100, seed=0)
    assert out["diff"] > 0 and 0 < out["lo"] <= out["diff"] <= out["hi"]
    assert out["p_le_0"] == 0.0
    tie = paired_bootstrap_fid_diff(good, good, mu, s, n_boot=10)
    assert tie["lo"] == tie["hi"] == tie["diff"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_fid_diff(good, good[:10], mu, s)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        fid_from_features(np.zeros(5), np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def _inception_or_skip():
    try:
        return inception_path()
    except FileNotFoundError as e:
        pytest.skip(f"FID Inception weights unavailable: {e}")


def test_inception_features_fid_self_zero():
    path = _inception_or_skip()
    torch.manual_seed(0)
    net = InceptionFeatures(path, batch_size=4)
    # smooth blobs (image-like) and pure noise, 28x28 grayscale in [-1, 1]
    g = torch.linspace(-1, 1, 28)
    blobs = torch.stack([torch.exp(-((g[:, None] - c) ** 2 + g[None, :] ** 2) / 0.2) for c in (-0.4, 0.0, 0.4)])
    imgs = (blobs * 2 - 1)[:, None]
    noise = torch.rand(3, 1, 28, 28) * 2 - 1
    f = net(torch.cat([imgs, noise]))
    assert f.shape == (6, 2048) and np.isfinite(f).all() and (f >= 0).all()
    # batching and channel replication do not change features
    np.testing.assert_allclose(net(imgs.expand(-1, 3, -1, -1))[:1], f[:1], rtol=1e-4, atol=1e-5)
    mu, s = feature_stats(f[:3])
    assert abs(fid_from_features(f[:3], mu, s)) < 1e-6 * max(1.0, np.trace(s))
    assert fid_from_features(f[3:], mu, s) > 10.0
