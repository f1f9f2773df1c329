"""Benchmark networks for 28x28 Fashion-MNIST: an eps-prediction U-Net (SD-like, discrete VP schedule), a
rectified-flow DiT (FLUX/SD3-like, velocity prediction, adaLN-Zero), and a small classifier.

Both denoisers are class-conditional with a null label (``NULL_LABEL = 10``) for classifier-free guidance and take
``net(x, t, y)``: ``x [B, 1, 28, 28]``, ``t [B]`` float (U-Net: the timestep index in [0, 999], fractional allowed;
DiT: the flow time in [0, 1]), ``y [B]`` int64 in [0, 10].

Module names follow the conventions that :mod:`qdrift.quant` uses to keep layers in float: ``time_embed``,
``label_emb``, ``emb_proj``, ``norm*``, ``skip`` (shortcuts), ``conv_in``/``conv_out``, ``patch_embed``,
``final``, ``ada`` (adaLN modulation), ``upsample``/``downsample``.

Weights ship as safetensors in ``qdrift/bench/weights/`` with a JSON model card; :func:`load_model` reads them
(never pickle).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["NULL_LABEL", "UNet", "DiT", "Classifier", "vp_alphas_cumprod", "build_model", "load_model",
           "weights_dir", "MODEL_CONFIGS", "count_params"]

NULL_LABEL = 10
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_dir() -> Path:
    """Folder of the shipped weights and model cards."""
    return WEIGHTS_DIR


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def vp_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" discrete VP schedule: ``betas = linspace(sqrt(b0), sqrt(b1), T)^2``.

    Returns:
        ``alphas_cumprod [T]`` float64 (sigma_t = sqrt((1 - a_t) / a_t) runs from ~0.029 to ~14.6 for T = 1000).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``t [B]`` (float)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _check_inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, channels: int, size: int) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1:] != (channels, size, size):
        raise ValueError(f"x must be [B, {channels}, {size}, {size}], got {tuple(x.shape)}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be [B] with B = {x.shape[0]}, got {tuple(t.shape)}")
    if y is None:
        return torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
    if y.shape != t.shape or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"y must be an int tensor [B], got {tuple(y.shape)} {y.dtype}")
    return y.long()


# ----------------------------------------------------------------------------------------------------------------
# U-Net


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning embedding added after the first conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels (1x1-conv q/k/v and output projection)."""

    def __init__(self, channels: int, heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (the conv is named ``downsample`` so that quantization keeps it in float)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (named ``upsample``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Class-conditional eps-prediction U-Net for 28x28 images (28 -> 14 -> 7, attention at 7x7).

    Args:
        channels: base width; level widths are ``channels * mult``.
        mult: width multipliers per resolution level.
        blocks: ResBlocks per level on the way down (``blocks + 1`` on the way up, as in SD).
        num_classes: class count; label ``num_classes`` is the null label.
        heads: attention heads.

    Call:
        ``net(x [B, 1, 28, 28], t [B] timestep index (float), y [B] int or None) -> eps [B, 1, 28, 28]``.
    """

    prediction = "eps"

    def __init__(self, channels: int = 32, mult: tuple[int, ...] = (1, 2, 2), blocks: int = 1,
                 num_classes: int = 10, heads: int = 4, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.config = dict(channels=channels, mult=list(mult), blocks=blocks, num_classes=num_classes, heads=heads,
                           in_channels=in_channels, image_size=image_size)
        self.in_channels, self.image_size = in_channels, image_size
        emb = channels * 4
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes + 1, emb)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in mult]
        self.down = nn.ModuleList()
        skips = [channels]
        c = channels
        for level, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResBlock(c, w, emb))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb)
        self.mid_attn = AttnBlock(c, heads)
        self.mid2 = ResBlock(c, c, emb)
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb))
                c = w
            if level > 0:
                self.up.append(Upsample(c))
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = _check_inputs(x, t, y, self.in_channels, self.image_size)
        emb = self.time_embed(timestep_embedding(t, self.config["channels"])) + self.label_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], 1), emb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# DiT


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[grid*grid, dim]``."""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for c in (yy.flatten(), xx.flatten()):
        a = c[:, None] * omega[None]
        parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, 1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift, scale, gate for attention and MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.attn.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.attn.proj(a)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    """Class-conditional diffusion transformer trained as a rectified flow (velocity prediction).

    ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0`` (so ``x0 = x_t - t v``).

    Args:
        patch: patch side (28 must be divisible by it).
        dim: token width; depth: blocks; heads: attention heads; mlp_ratio: MLP width factor.
        num_classes: class count; label ``num_classes`` is the null label.

    Call:
        ``net(x [B, 1, 28, 28], t [B] flow time in [0, 1], y [B] int or None) -> v [B, 1, 28, 28]``.
    """

    prediction = "flow"

    def __init__(self, patch: int = 2, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0,
                 num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.config = dict(patch=patch, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.in_channels, self.image_size, self.patch = in_channels, image_size, patch
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.register_buffer("pos", _sincos_2d(dim, self.grid)[None], persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_emb = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.final = nn.Module()
        self.final.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final.ada = nn.Linear(dim, 2 * dim)
        self.final.linear = nn.Linear(dim, patch * patch * in_channels)
        for m in (self.final.ada, self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, H, W]`` -> tokens ``[B, grid^2, dim]`` (the stride-``patch`` conv, row-major patches)."""
        return rearrange(self.patch_embed(x), "b d gh gw -> b (gh gw) d")

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, grid^2, patch^2 C]`` -> image ``[B, C, H, W]`` (the inverse of the patch layout)."""
        p, g = self.patch, self.grid
        return rearrange(h, "b (gh gw) (ph pw c) -> b c (gh ph) (gw pw)", gh=g, gw=g, ph=p, pw=p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = _check_inputs(x, t, y, self.in_channels, self.image_size)
        h = self.patchify(x) + self.pos
        c = self.time_embed(timestep_embedding(t * 1000.0, self.config["dim"])) + self.label_emb(y)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final.ada(F.silu(c))[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.final.linear(self.final.norm(h) * (1 + scale) + shift))


# ----------------------------------------------------------------------------------------------------------------
# classifier


class Classifier(nn.Module):
    """Small CNN for Fashion-MNIST; ``features`` gives the penultimate 128-d activations (for Frechet distance).

    Call:
        ``net(x [B, 1, 28, 28] in [-1, 1]) -> logits [B, 10]``.
    """

    def __init__(self, width: int = 32, feat_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.config = dict(width=width, feat_dim=feat_dim, num_classes=num_classes)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * w * 49, feat_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feat_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feat_dim]`` (post-ReLU)."""
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"x must be [B, 1, 28, 28], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------------
# construction and loading

MODEL_CONFIGS: dict[str, tuple[type, dict]] = {
    "unet": (UNet, dict(channels=32, mult=(1, 2, 3), blocks=1)),
    "dit": (DiT, dict(patch=4, dim=160, depth=6, heads=4)),
    "classifier": (Classifier, dict(width=32, feat_dim=128)),
}


def build_model(name: str, **overrides) -> nn.Module:
    """Instantiate a benchmark network (untrained) from its default config, with optional overrides.

    Args:
        name: ``"unet"``, ``"dit"`` or ``"classifier"``.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    cls, cfg = MODEL_CONFIGS[name]
    return cls(**dict(cfg, **overrides))


def load_model(name: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load shipped (or given) weights into a fresh network, in eval mode.

    The safetensors file's metadata holds the constructor config (key ``config``, JSON), so a file trained with
    non-default sizes loads too.

    Args:
        name: ``"unet"``, ``"dit"`` or ``"classifier"``.
        path: safetensors file (default: ``weights_dir() / f"{name}.safetensors"``).
        device: torch device.

    Raises:
        ValueError: unknown name. FileNotFoundError: no weights file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    path = Path(path) if path is not None else WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}; train them with: python -m qdrift.bench.train {name}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    cfg = json.loads(meta.get("config", "{}"))
    if "mult" in cfg:
        cfg["mult"] = tuple(cfg["mult"])
    model = MODEL_CONFIGS[name][0](**cfg) if cfg else build_model(name)
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval()
