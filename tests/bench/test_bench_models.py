"""Benchmark networks, data loader, PNG writer, training script (resume), shipped weights."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qdrift.bench import data as bdata
from qdrift.bench.images import make_grid, read_png_size, save_png
from qdrift.bench.models import (NULL_LABEL, DiT, UNet, build_model, count_params, load_model,
                                 vp_alphas_cumprod, weights_dir)


def write_fake_idx(folder: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        with gzip.open(folder / f"{stem}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">II", 2049, n) + labels.tobytes())


def test_data_loader_on_fake_idx(tmp_path):
    write_fake_idx(tmp_path)
    x, y = bdata.load_fashion_mnist("test", tmp_path)
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8 and y.tolist()[:3] == [0, 1, 2]
    xm = bdata.to_model_range(x)
    assert xm.shape == (40, 1, 28, 28) and xm.min() >= -1 and xm.max() <= 1
    assert torch.equal(bdata.to_uint8(xm)[:, 0], x)
    with pytest.raises(ValueError, match="split"):
        bdata.load_fashion_mnist("val", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 1234, 1) + b"\x00"))
    with pytest.raises(ValueError, match="magic"):
        bdata.load_fashion_mnist("test", tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        bdata.load_fashion_mnist("train", tmp_path / "missing")


def test_real_fashion_mnist_if_installed():
    try:
        x, y = bdata.load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    assert x.shape == (10000, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


@pytest.mark.parametrize("name,lo,hi", [("unet", 1e6, 4e6), ("dit", 1e6, 4e6), ("classifier", 1e5, 1e6)])
def test_param_counts(name, lo, hi):
    assert lo <= count_params(build_model(name)) <= hi


@pytest.mark.parametrize("cls,kw,t", [(UNet, dict(channels=8, mult=(1, 2)), 500.5), (DiT, dict(dim=32, depth=1, heads=2), 0.3)])
def test_denoiser_shapes_zero_init_and_labels(cls, kw, t):
    torch.manual_seed(0)
    net = cls(**kw).eval()
    x = torch.randn(3, 1, 28, 28)
    tt = torch.full((3,), t)
    out = net(x, tt, torch.tensor([0, 5, NULL_LABEL]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialized output layer
    for p in net.parameters():  # perturb so that labels matter
        p.data.add_(0.05 * torch.randn_like(p))
    a = net(x, tt, torch.tensor([0, 0, 0]))
    b = net(x, tt, torch.tensor([1, 1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, tt), net(x, tt, torch.full((3,), NULL_LABEL)))  # y=None -> null label
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(3, 1, 32, 32), tt)
    with pytest.raises(ValueError, match="t must be"):
        net(x, tt[:2])
    with pytest.raises(ValueError, match="y must be"):
        net(x, tt, torch.zeros(3))


def test_vp_schedule_sd_range():
    ac = vp_alphas_cumprod()
    sig = ((1 - ac) / ac).sqrt()
    assert ac.shape == (1000,) and bool((ac[1:] < ac[:-1]).all())
    assert sig[0].item() == pytest.approx(0.0292, abs=1e-3) and sig[-1].item() == pytest.approx(14.61, abs=0.05)


def _patchify_reference(net, x):  # the reshape / transpose layout the einops patterns replaced
    return net.patch_embed(x).flatten(2).transpose(1, 2)


def _unpatchify_reference(net, h):
    b, p, g, c = h.shape[0], net.patch, net.grid, net.in_channels
    return h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


@pytest.mark.parametrize("patch, channels", [(2, 1), (4, 1), (7, 3)])
def test_dit_patchify_unpatchify_match_the_reshape_layout(patch, channels):
    torch.manual_seed(patch)
    net = DiT(patch=patch, dim=16, depth=1, heads=2, in_channels=channels)
    x = torch.randn(3, channels, 28, 28)
    assert torch.equal(net.patchify(x), _patchify_reference(net, x))
    h = torch.randn(3, net.grid**2, patch * patch * channels)
    assert torch.equal(net.unpatchify(h), _unpatchify_reference(net, h))
    # unpatchify inverts the token layout: pixel (i, j) of channel c is token (i // p, j // p), entry (i % p, j % p, c)
    img = net.unpatchify(h)
    i, j, c = 13, 22, channels - 1
    tok, ent = (i // patch) * net.grid + j // patch, ((i % patch) * patch + j % patch) * channels + c
    assert img[1, c, i, j] == h[1, tok, ent]


def test_shipped_dit_output_unchanged_by_einops(monkeypatch):
    if not (weights_dir() / "dit.safetensors").is_file():
        pytest.skip("dit not trained yet")
    net = load_model("dit")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, generator=g), torch.tensor([0, 4, 9, NULL_LABEL])
    with torch.no_grad():
        out = net(x, t, y)
        monkeypatch.setattr(DiT, "patchify", _patchify_reference)
        monkeypatch.setattr(DiT, "unpatchify", _unpatchify_reference)
        assert torch.equal(out, net(x, t, y))


def _preview_reference(kind, net, labels, steps, cfg, seed):
    """The stand-alone Euler + CFG the preview sampler used to be (Karras over the VP range / uniform flow time)."""
    import math

    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]

    def guided(x, t):
        y = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
        out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), y).chunk(2)
        return out_u + cfg * (out_c - out_u)

    if kind == "unet":
        log_sig = ((1 - vp_alphas_cumprod()) / vp_alphas_cumprod()).sqrt().log()
        smin, smax = log_sig[0].exp().item(), log_sig[-1].exp().item()
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sigmas = torch.cat([(smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7, torch.zeros(1)])
        x = torch.randn(n, 1, 28, 28, generator=g) * sigmas[0].item()
        for i in range(steps):
            s = sigmas[i].item()
            t = torch.tensor([float(np.interp(math.log(s), log_sig.numpy(), np.arange(1000.0)))]).expand(n)
            x = x + (sigmas[i + 1].item() - s) * guided(x / math.sqrt(s * s + 1), t)
        return x.clamp(-1, 1)
    ts = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 1, 28, 28, generator=g)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * guided(x, ts[i].expand(n))
    return x.clamp(-1, 1)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_sample_preview_is_the_core_euler_on_the_guided_denoiser(kind):
    from qdrift.bench.train import sample_preview

    torch.manual_seed(0)
    net = UNet(channels=8, mult=(1, 2), blocks=1, heads=2) if kind == "unet" else DiT(patch=7, dim=32, depth=1, heads=2)
    last = net.conv_out if kind == "unet" else net.final.linear
    torch.nn.init.normal_(last.weight, std=0.05)
    if kind == "dit":
        torch.nn.init.normal_(net.final.ada.weight, std=0.05)
    labels = torch.tensor([0, 3, 7])
    with torch.no_grad():
        ref = _preview_reference(kind, net.eval(), labels, steps=4, cfg=3.0, seed=5)
    out = sample_preview(kind, net, labels, steps=4, cfg=3.0, seed=5)
    assert out.shape == (3, 1, 28, 28) and out.std() > 0.05
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_load_model_roundtrip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = DiT(dim=32, depth=1, heads=2).eval()
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    save_file(net.state_dict(), str(tmp_path / "d.safetensors"), metadata={"config": json.dumps(net.config)})
    back = load_model("dit", tmp_path / "d.safetensors")
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    torch.testing.assert_close(back(x, t), net(x, t))
    with pytest.raises(ValueError, match="unknown model"):
        load_model("vae")
    with pytest.raises(FileNotFoundError, match="train"):
        load_model("dit", tmp_path / "none.safetensors")


def test_png_writer(tmp_path):
    imgs = torch.linspace(-1, 1, 4 * 28 * 28).reshape(4, 1, 28, 28)
    grid = make_grid(imgs, nrow=2, pad=2)
    assert grid.shape == (1, 2 * 30 + 2, 2 * 30 + 2)
    p = save_png(tmp_path / "g.png", grid)
    assert read_png_size(p) == (62, 62)
    rgb = save_png(tmp_path / "c.png", torch.zeros(3, 5, 7))
    assert read_png_size(rgb) == (7, 5)
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", torch.zeros(2, 5, 7))


def _train(tmp_path, model, steps, extra=()):
    from qdrift.bench.train import main

    return main([model, "--steps", str(steps), "--ckpt-every", "2", "--out", str(tmp_path / "out"),
                 "--ckpt-dir", str(tmp_path / "ck"), "--data-root", str(tmp_path / "data"), "--no-progress",
                 "--batch-size", "16", "--preview-steps", "1", *extra])


@pytest.mark.parametrize("model,cfg", [("unet", '{"channels": 8, "mult": [1, 2]}'), ("classifier", '{"width": 8}')])
def test_train_resume_matches_uninterrupted(tmp_path, model, cfg):
    from safetensors.torch import load_file

    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    write_fake_idx(tmp_path / "a" / "data")
    write_fake_idx(tmp_path / "b" / "data")
    card = _train(tmp_path / "a", model, 4, ["--config", cfg])
    _train(tmp_path / "b", model, 2, ["--config", cfg])  # "interrupted" at step 2
    _train(tmp_path / "b", model, 4, ["--config", cfg])  # resumes from the step-2 checkpoint
    wa = load_file(str(tmp_path / "a" / "out" / f"{model}.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out" / f"{model}.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert card["steps"] == 4 and card["wall_time_s"] >= 0 and "hardware" in card
    md = (tmp_path / "a" / "out" / f"{model}.md").read_text()
    assert "wall_time_s" in md and "Fashion-MNIST" in md
    if model == "unet":
        assert read_png_size(tmp_path / "a" / "out" / "unet_samples.png")[0] > 28
    # a fresh seed gives different weights (the comparison above can fail)
    _train(tmp_path / "c", model, 2, ["--config", cfg, "--seed", "1", "--data-root", str(tmp_path / "a" / "data")])
    wc = load_file(str(tmp_path / "c" / "out" / f"{model}.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())


SHIPPED = ["classifier", "unet", "dit"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_safetensors_small_and_loadable(name):
    path = weights_dir() / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not trained yet")
    assert path.stat().st_size < 20 * 2**20
    net = load_model(name)
    card = json.loads((weights_dir() / f"{name}.json").read_text())
    assert card["params"] == count_params(net)
    assert not list(weights_dir().glob("*.pt")) + list(weights_dir().glob("*.pth")) + list(weights_dir().glob("*.pkl"))


def test_shipped_classifier_accuracy():
    path = weights_dir() / "classifier.safetensors"
    if not path.is_file():
        pytest.skip("classifier not trained yet")
    try:
        x, y = bdata.load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    clf = load_model("classifier")
    with torch.no_grad():
        acc = (clf(bdata.to_model_range(x[:1000])).argmax(1) == y[:1000]).float().mean().item()
    assert acc > 0.85
