"""Train the benchmark networks on Fashion-MNIST (seeded, resumable, CPU by default).

Usage::

    python -m qdrift.bench.train classifier               # 1,800 steps, ~5 min on one CPU thread
    python -m qdrift.bench.train unet --max-minutes 27    # 1,500 steps
    python -m qdrift.bench.train dit --max-minutes 27     # 2,400 steps

Each run writes ``<out>/<model>.safetensors`` (EMA weights for the denoisers; constructor config in the file's
metadata), ``<out>/<model>.json`` and ``<out>/<model>.md`` (model card: data, steps, wall time, hardware, losses,
FP metrics), and for denoisers a sample grid ``<out>/<model>_samples.png`` (one row per class).
A checkpoint (model, EMA, optimizer, step; safetensors, never pickle) is written every ``--ckpt-every`` steps to
``--ckpt-dir`` and picked up automatically by a rerun with the same model name, so an interrupted run resumes.
Batches and noise depend only on ``(seed, step)``, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qdrift import sample_euler_qdrift

from .data import NUM_CLASSES, load_fashion_mnist, to_model_range
from .guidance import schedule, wrap_denoiser
from .images import make_grid, save_png
from .models import NULL_LABEL, build_model, count_params, vp_alphas_cumprod, weights_dir

__all__ = ["main", "sample_preview", "DEFAULTS"]

DEFAULTS = {
    "classifier": dict(steps=1800, batch_size=64, lr=1e-3, ema=0.0, label_dropout=0.0),
    "unet": dict(steps=1500, batch_size=64, lr=5e-4, ema=0.998, label_dropout=0.1),
    "dit": dict(steps=2400, batch_size=64, lr=5e-4, ema=0.998, label_dropout=0.1),
}


# ----------------------------------------------------------------------------------------------------------------
# losses


def diffusion_loss(kind: str, net: nn.Module, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator,
                   alphas_cumprod: torch.Tensor | None) -> torch.Tensor:
    """Training loss on one batch: eps MSE (U-Net, uniform discrete t) or velocity MSE (DiT, logit-normal t)."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g)
    if kind == "unet":
        t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=g)
        a = alphas_cumprod[t].float()[:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(net(xt, t.float(), y), noise)
    t = torch.sigmoid(torch.randn(b, generator=g))  # SD3's logit-normal(0, 1) time sampling
    tt = t[:, None, None, None]
    xt = (1 - tt) * x0 + tt * noise
    return F.mse_loss(net(xt, t, y), noise - x0)


# ----------------------------------------------------------------------------------------------------------------
# preview sampler: the core's Euler on the bench's guided denoiser and schedule


@torch.no_grad()
def sample_preview(kind: str, net: nn.Module, labels: torch.Tensor, *, steps: int = 30, cfg: float = 3.0,
                   seed: int = 0) -> torch.Tensor:
    """Draw images with the core's Euler sampler (:func:`qdrift.sample_euler_qdrift`, ``V=None``) and
    classifier-free guidance (:func:`qdrift.bench.guidance.wrap_denoiser`).

    U-Net: Karras sigmas (rho 7) over the VP schedule's range through :class:`qdrift.adapters.DiscreteEpsDenoiser`;
    DiT: flow Euler from t = 1 to 0 on a uniform grid through :class:`qdrift.adapters.FlowDenoiser` (the bench's
    :func:`qdrift.bench.guidance.schedule`).

    Args:
        kind: ``"unet"`` or ``"dit"``.
        net: the network ``net(x, t, y)``.
        labels: ``[N]`` class labels.
        steps: Euler steps; cfg: guidance scale (1 = no guidance); seed: initial noise seed.

    Returns:
        ``[N, 1, 28, 28]`` images, clipped to [-1, 1].
    """
    den = wrap_denoiser(kind, net, cfg)
    sigmas = schedule(kind, den, steps)
    x = torch.randn(labels.shape[0], 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    return sample_euler_qdrift(den, x, sigmas, extra_args={"y": labels}, disable=True).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON metadata)


def _save_ckpt(path: Path, net: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).clone().contiguous()
    groups = [{k: v for k, v in grp.items()} for grp in sd["param_groups"]]
    meta = dict(meta, param_groups=groups)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _load_ckpt(path: Path, net: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


# ----------------------------------------------------------------------------------------------------------------
# main


def _hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{cpu}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} visible cores"
    if device.type == "cuda":
        s += f", GPU {torch.cuda.get_device_name(device)}"
    return s


def _batch_indices(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch:(k + 1) * batch]


@torch.no_grad()
def _evaluate_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = sum(int((net(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, x.shape[0], 500))
    return correct / x.shape[0]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qdrift.bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(DEFAULTS))
    p.add_argument("--steps", type=int, help="optimizer steps (default per model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ema", type=float, help="EMA decay of the shipped weights (0 = none)")
    p.add_argument("--label-dropout", type=float, help="probability of replacing the label by the null label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default="{}", help="JSON overrides of the network config, e.g. '{\"dim\": 96}'")
    p.add_argument("--out", type=Path, default=weights_dir(), help="folder for weights and model card")
    p.add_argument("--ckpt-dir", type=Path, default=Path(".cache/qdrift-train"))
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and finish up) after this wall time")
    p.add_argument("--preview-steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the preview grid")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or not 0 <= args.ema < 1 or not 0 <= args.label_dropout < 1:
        p.error("need steps >= 1, batch-size >= 1, lr > 0, 0 <= ema < 1, 0 <= label-dropout < 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the model card dict."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    args = _parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    overrides = json.loads(args.config)
    net = build_model(args.model, **overrides).to(device)
    ema = None
    if args.ema > 0:
        ema = build_model(args.model, **overrides).to(device)
        ema.load_state_dict(net.state_dict())
        ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0 if args.model != "classifier" else 1e-4)

    images, labels = load_fashion_mnist("train", args.data_root)
    x_all = to_model_range(images)
    alphas_cumprod = vp_alphas_cumprod() if args.model == "unet" else None

    ckpt = args.ckpt_dir / f"{args.model}.ckpt.safetensors"
    step, elapsed, losses = 0, 0.0, []
    if ckpt.is_file() and not args.no_resume:
        meta = _load_ckpt(ckpt, net, ema, opt)
        if meta["args"]["steps"] != args.steps or meta["args"]["seed"] != args.seed:
            print(f"note: resuming {ckpt} trained with steps={meta['args']['steps']} seed={meta['args']['seed']}",
                  file=sys.stderr)
        step, elapsed, losses = meta["step"], meta["elapsed"], meta["losses"]
        print(f"resumed from {ckpt} at step {step}", file=sys.stderr)

    def checkpoint() -> None:
        _save_ckpt(ckpt, net, ema, opt, dict(step=step, elapsed=elapsed, losses=losses,
                                            args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))

    start = time.time() - elapsed
    running = losses[-1][1] if losses else None
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.model}", disable=args.no_progress, dynamic_ncols=True)
    net.train()
    while step < args.steps:
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout etc.: a resumed run draws the same
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = _batch_indices(args.seed, step, x_all.shape[0], args.batch_size)
        x0, y = x_all[idx].to(device), labels[idx].to(device)
        if args.model == "classifier":
            loss = F.cross_entropy(net(x0), y)
        else:
            drop = torch.rand(y.shape, generator=g) < args.label_dropout
            y = torch.where(drop.to(device), torch.full_like(y, NULL_LABEL), y)
            loss = diffusion_loss(args.model, net, x0, y, g, alphas_cumprod)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - decay)
                for be, bn in zip(ema.buffers(), net.buffers()):
                    be.copy_(bn)
        step += 1
        lv = loss.item()
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if step % 50 == 0 or step == args.steps:
            losses.append([step, running])
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.ckpt_every == 0:
            elapsed = time.time() - start
            checkpoint()
    bar.close()
    elapsed = time.time() - start
    checkpoint()

    final = (ema if ema is not None else net).eval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(final.config)
    state = {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()}
    save_file(state, str(out / f"{args.model}.safetensors"), metadata={"config": json.dumps(cfg), "model": args.model})
    os.chmod(out / f"{args.model}.safetensors", 0o644)

    card = dict(
        model=args.model, architecture=type(final).__name__, config=cfg, params=count_params(final),
        prediction=getattr(final, "prediction", "logits"),
        data="Fashion-MNIST train split (60,000 images, 28x28, 10 classes; Debian package dataset-fashion-mnist, MIT)",
        pixel_range="[-1, 1]", steps=step, planned_steps=args.steps, batch_size=args.batch_size,
        images_seen=step * args.batch_size, epochs=round(step * args.batch_size / x_all.shape[0], 3), lr=args.lr,
        warmup=args.warmup, optimizer="AdamW, grad-norm clip 1.0", ema=args.ema, label_dropout=args.label_dropout,
        null_label=NULL_LABEL if args.model != "classifier" else None, seed=args.seed,
        wall_time_s=round(elapsed, 1), hardware=_hardware(device), torch=torch.__version__,
        final_loss=round(running, 5) if running is not None else None, loss_curve=losses,
        command="python -m qdrift.bench.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    if args.model == "unet":
        card["schedule"] = "discrete VP, 1000 steps, scaled-linear betas 0.00085..0.012 (Stable Diffusion's)"
    if args.model == "dit":
        card["schedule"] = "rectified flow x_t = (1 - t) x0 + t eps, v = eps - x0, logit-normal(0, 1) t"
    metrics: dict = {}
    test_x, test_y = load_fashion_mnist("test", args.data_root)
    test_x = to_model_range(test_x)
    if args.model == "classifier":
        metrics["test_accuracy"] = _evaluate_classifier(final, test_x, test_y)
    else:
        grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(10)
        samples = sample_preview(args.model, final, grid_labels, steps=args.preview_steps, cfg=args.cfg, seed=1)
        save_png(out / f"{args.model}_samples.png", make_grid(samples, nrow=10))
        card["samples_png"] = f"{args.model}_samples.png (rows: classes 0-9; Euler {args.preview_steps} steps, cfg {args.cfg}, seed 1)"
        clf_path = out / "classifier.safetensors"
        if clf_path.is_file():
            from .metrics import fid_from_features, feature_stats
            from .models import load_model

            clf = load_model("classifier", clf_path)
            n_eval = 500
            lab = torch.arange(n_eval) % NUM_CLASSES
            imgs = sample_preview(args.model, final, lab, steps=args.preview_steps, cfg=args.cfg, seed=2)
            with torch.no_grad():
                metrics["class_accuracy"] = float((clf(imgs).argmax(1) == lab).float().mean())
                f_gen = clf.features(imgs).double().numpy()
                f_ref = torch.cat([clf.features(test_x[i:i + 1000]) for i in range(0, 10000, 1000)]).double().numpy()
            mu, sig = feature_stats(f_ref)
            metrics["fd_classifier"] = fid_from_features(f_gen, mu, sig)
            metrics["eval"] = (f"{n_eval} samples (labels i % 10, seed 2), Euler {args.preview_steps} steps, cfg "
                               f"{args.cfg}; Frechet distance in the shipped classifier's 128-d features vs the 10k test set")
    card["fp_metrics"] = metrics
    (out / f"{args.model}.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / f"{args.model}.md").write_text(_card_markdown(card))
    print(json.dumps({k: card[k] for k in ("model", "params", "steps", "wall_time_s", "final_loss", "fp_metrics")}))
    return card


def _card_markdown(card: dict) -> str:
    lines = [f"# Model card: `{card['model']}` ({card['architecture']})", ""]
    keys = ["params", "prediction", "schedule", "config", "data", "pixel_range", "steps", "batch_size", "images_seen",
            "epochs", "lr", "warmup", "optimizer", "ema", "label_dropout", "null_label", "seed", "wall_time_s",
            "hardware", "torch", "final_loss", "fp_metrics", "samples_png", "command"]
    for k in keys:
        if k in card and card[k] is not None:
            v = card[k]
            v = f"`{json.dumps(v)}`" if isinstance(v, (dict, list)) else str(v)
            lines.append(f"- **{k}**: {v}")
    lines += ["", "Weights: safetensors (no pickle); load with `qdrift.bench.models.load_model(name)`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
