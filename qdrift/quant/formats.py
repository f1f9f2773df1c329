"""Weight-only quantization in the formats people run, computed by the formats' own libraries.

Each scheme quantizes the eligible weights of a deep copy of the model with the format's library, dequantizes
them with the same library, and loads the dequantized values into the copy: exactly the numbers a weight-only
loader computes with (activations stay in floating point in all three formats). Nothing is re-implemented here:
the grids, block sizes, scales and rounding are the libraries'.

- ``"gguf-q8_0"``, ``"gguf-q5_1"``, ``"gguf-q5_0"``, ``"gguf-q4_1"``, ``"gguf-q4_0"``: GGUF through ``gguf``
  (gguf-py from llama.cpp; ``pip install "qdrift[gguf]"``), ``gguf.quants.quantize`` / ``dequantize``. Blocks of
  32 consecutive values along the last dim of the stored tensor. gguf-py quantizes only these five types and a few
  exotic ones in Python; its K-quants (Q2_K..Q6_K) and IQ types dequantize only, so they are not offered here.
  Which tensors stay in higher precision follows ComfyUI-GGUF's converter (``tools/convert.py``) and its patch
  of llama.cpp's quantizer (``tools/lcpp.patch``), rule by rule in :func:`gguf_plan`.
- ``"nf4"``, ``"fp4"``: bitsandbytes 4-bit (``pip install "qdrift[bnb]"``), ``bitsandbytes.functional.
  quantize_4bit`` / ``dequantize_4bit`` with blocksize 64 and float32 absmax (diffusers' ``BitsAndBytesConfig``
  defaults: no double quantization). Like diffusers only ``nn.Linear`` weights, unless ``conv=True``.
- ``"quanto-int8"``, ``"quanto-int4"``: optimum-quanto weights (``pip install "qdrift[quanto]"``),
  ``optimum.quanto.quantize(module, weights=qint8|qint4)`` + ``freeze``, then ``weight.dequantize()``: int8
  symmetric per output channel; int4 affine (scale and shift) in groups of 128 input values (quanto shrinks the
  group by 32 until it divides the row, and uses one group per output channel for rows of 128 or fewer). Like
  diffusers' quanto backend only ``nn.Linear``, unless ``conv=True`` (``optimum.quanto.quantize``'s own default).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._checks import as_flag, as_int, check_finite, check_layer_params, patterns

__all__ = ["FORMAT_SCHEMES", "FORMAT_LIBRARIES", "GGUF_KEEP", "GGUF_SMALL", "GGUF_ROW", "format_available",
           "gguf_plan", "quantize_format", "format_summary", "format_grids", "RECON_FORMATS"]

GGUF_TYPES = {"gguf-q8_0": "Q8_0", "gguf-q5_1": "Q5_1", "gguf-q5_0": "Q5_0", "gguf-q4_1": "Q4_1", "gguf-q4_0": "Q4_0"}
BNB_TYPES = {"nf4": "nf4", "fp4": "fp4"}
QUANTO_TYPES = {"quanto-int8": "qint8", "quanto-int4": "qint4"}
FORMAT_SCHEMES = tuple(GGUF_TYPES) + tuple(BNB_TYPES) + tuple(QUANTO_TYPES)

# scheme -> (importable module, pip extra)
FORMAT_LIBRARIES = {**{s: ("gguf", "gguf") for s in GGUF_TYPES}, **{s: ("bitsandbytes", "bnb") for s in BNB_TYPES},
                    **{s: ("optimum.quanto", "quanto") for s in QUANTO_TYPES}}

# ComfyUI-GGUF keeps the conditioning path in F16/F32 (its lcpp.patch: time_embedding., add_embedding., time_in.,
# txt_in., vector_in., guidance_in., img_in., final_layer.; token embeddings). Matched (re.search, case-insensitive)
# against each component of a parameter's dotted name; the qdrift bench models' counterparts are time_embed,
# label_emb, patch_embed (Flux's img_in) and final (Flux's final_layer).
GGUF_KEEP = (r"^time_(embed|embedding|in)$", r"^(add_embedding|label_emb|token_embd)$",
             r"^(txt|vector|guidance|img)_in$", r"^patch_embed$", r"^final(_layer)?$")
GGUF_SMALL = 1024  # ComfyUI-GGUF's QUANTIZATION_THRESHOLD: tensors with at most this many values stay F32
GGUF_ROW = 256  # its SD1/SDXL shape fix stores such tensors as rows of 256 values

_DEFAULTS = {
    "gguf": dict(keep=GGUF_KEEP, small=GGUF_SMALL, reshape=True),
    "bnb": dict(skip=(), conv=False, blocksize=64),
    "quanto": dict(skip=(), conv=False),
}


def _family(scheme: str) -> str:
    return "gguf" if scheme in GGUF_TYPES else "bnb" if scheme in BNB_TYPES else "quanto"


def format_available(scheme: str) -> bool:
    """True when the library behind ``scheme`` is importable (no import is done)."""
    module = FORMAT_LIBRARIES[scheme][0]
    return importlib.util.find_spec(module.split(".")[0]) is not None and (
        "." not in module or importlib.util.find_spec(module) is not None)


def _require(scheme: str):
    module, extra = FORMAT_LIBRARIES[scheme]
    if not format_available(scheme):
        raise ImportError(f"scheme {scheme!r} needs the Python package providing {module!r}: "
                          f'pip install "qdrift[{extra}]"')
    return importlib.import_module(module)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    pats = [re.compile(p, re.IGNORECASE) for p in patterns]
    return any(p.search(part) for part in name.split(".") for p in pats)


# ----------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_plan(name: str, shape: Sequence[int], *, keep: Sequence[str] = GGUF_KEEP, small: int = GGUF_SMALL,
              reshape: bool = True) -> tuple[str, tuple[int, ...] | None]:
    """What ComfyUI-GGUF stores for one floating-point tensor before trying the quantized type.

    Rules, in order (ComfyUI-GGUF ``tools/convert.py`` and ``tools/lcpp.patch``):

    1. 1-D tensors (biases, norm scales) -> ``"F32"``.
    2. at most ``small`` (1,024) values -> ``"F32"``.
    3. a name component matches ``keep`` (embeddings, time/label/patch input projections, final layer) ->
       ``"F16"``.
    4. otherwise ``"quant"``, stored as rows of ``GGUF_ROW`` (256) values when ``reshape`` (the converter's SD1/SDXL
       shape fix: at least 512 values, a multiple of 256, last dim not a multiple of 256; this lets a 3x3 conv
       kernel ``[out, in, 3, 3]`` be quantized in blocks of 32 consecutive values of the flattened kernel), else in
       its own shape. If the stored rows are not a multiple of the block size (32), gguf raises ``QuantError`` and
       the tensor falls back to ``"F16"`` (the patched llama.cpp quantizer's fallback), see :func:`quantize_format`.

    Args:
        name: dotted parameter name; shape: its shape.

    Returns:
        ``(kind, stored_shape)``: kind ``"F32"``, ``"F16"`` or ``"quant"``; stored_shape for ``"quant"``.
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    if len(shape) <= 1:
        return "F32", None
    if numel <= small:
        return "F32", None
    if _matches(name, keep):
        return "F16", None
    stored = tuple(int(d) for d in shape)
    if reshape and numel >= 2 * GGUF_ROW and numel % GGUF_ROW == 0 and stored[-1] % GGUF_ROW != 0:
        stored = (numel // GGUF_ROW, GGUF_ROW)
    return "quant", stored


def _gguf_tensor(gguf, w: torch.Tensor, qtype: str, kind: str,
                 stored: tuple[int, ...] | None) -> tuple[torch.Tensor, str]:
    if kind == "F32":
        return w, "F32"
    w16 = w.detach().to(torch.float16)  # the converter's intermediate F16 file is what llama.cpp quantizes
    if kind == "F16":
        return w16.to(w.dtype), "F16"
    t = getattr(gguf.GGMLQuantizationType, qtype)
    data = w16.float().cpu().numpy().reshape(stored)
    try:
        packed = gguf.quants.quantize(data, t)
    except gguf.QuantError:
        return w16.to(w.dtype), "F16"
    deq = gguf.quants.dequantize(packed, t)
    return torch.from_numpy(deq.reshape(tuple(w.shape)).copy()).to(w.dtype), qtype


def _quantize_gguf(model: nn.Module, scheme: str, opts: dict) -> dict:
    gguf = _require(scheme)
    qtype = GGUF_TYPES[scheme]
    report = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            kind, stored = gguf_plan(name, tuple(p.shape), keep=opts["keep"], small=opts["small"],
                                     reshape=opts["reshape"])
            new, stored_as = _gguf_tensor(gguf, p.data, qtype, kind, stored)
            reason = {"F32": "1-D" if p.ndim <= 1 else "small", "F16": "keep"}.get(kind, "quantized")
            if kind == "quant" and stored_as == "F16":
                reason = "row not a multiple of the block size"
            report[name] = _entry(p.data, new, stored_as, reason, stored_shape=stored if stored_as == qtype else None)
            p.data.copy_(new)
    return report


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes and optimum-quanto: weights of nn.Linear (and Conv2d with conv=True)


def _eligible(model: nn.Module, opts: dict) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Conv2d) if opts["conv"] else (nn.Linear,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not _matches(n, opts["skip"])}


def _quantize_bnb(model: nn.Module, scheme: str, opts: dict) -> dict:
    _require(scheme)
    import bitsandbytes.functional as bnbf

    report = {}
    layers = _eligible(model, opts)
    with torch.no_grad():
        for name, mod in layers.items():
            w = mod.weight.data
            # bitsandbytes quantizes the flattened tensor in blocks of `blocksize` consecutive values. It is dequantized
            # flat too: the 0.50 CPU kernel mis-scales 2-D weights whose rows are not a multiple of the blocksize.
            packed, state = bnbf.quantize_4bit(w.detach().float().reshape(-1).contiguous(), blocksize=opts["blocksize"],
                                               quant_type=BNB_TYPES[scheme], compress_statistics=False)
            new = bnbf.dequantize_4bit(packed, state).reshape(w.shape).to(w.dtype)
            report[f"{name}.weight"] = _entry(w, new, scheme.upper(), "quantized", blocksize=opts["blocksize"])
            mod.weight.data.copy_(new)
    for name, p in model.named_parameters():
        report.setdefault(name, _entry(p.data, p.data, "F32", "not a quantized layer"))
    return report


def _quantize_quanto(model: nn.Module, scheme: str, opts: dict) -> dict:
    quanto = _require(scheme)
    qtype = getattr(quanto, QUANTO_TYPES[scheme])
    report = {}
    layers = _eligible(model, opts)
    with torch.no_grad():
        for name, mod in layers.items():
            holder = nn.Sequential(copy.deepcopy(mod).float())  # quanto swaps modules inside a parent
            quanto.quantize(holder, weights=qtype)
            quanto.freeze(holder)
            qmod = holder[0]
            new = qmod.weight.dequantize().to(mod.weight.dtype).reshape(mod.weight.shape)
            report[f"{name}.weight"] = _entry(mod.weight.data, new, QUANTO_TYPES[scheme], "quantized",
                                              group_size=qmod.weight_group_size)
            mod.weight.data.copy_(new)
    for name, p in model.named_parameters():
        report.setdefault(name, _entry(p.data, p.data, "F32", "not a quantized layer"))
    return report


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _entry(old: torch.Tensor, new: torch.Tensor, stored_as: str, reason: str, **extra: Any) -> dict:
    err = float((new.double() - old.double()).pow(2).sum())
    sig = float(old.double().pow(2).sum())
    return dict(type=stored_as, reason=reason, shape=tuple(old.shape), numel=old.numel(), sq_err=err, sq_norm=sig,
                **{k: v for k, v in extra.items() if v is not None})


def quantize_format(model: nn.Module, scheme: str, **options: Any) -> nn.Module:
    """Return a deep copy of ``model`` whose eligible weights are replaced by the format's dequantized values.

    Args:
        model: any ``nn.Module`` (not modified).
        scheme: one of :data:`FORMAT_SCHEMES` (module docstring).
        **options: GGUF: ``keep`` [:data:`GGUF_KEEP`] name-component regexes stored F16, ``small`` [1024] values at
            or below which a tensor stays F32, ``reshape`` [True] ComfyUI-GGUF's rows-of-256 shape fix.
            nf4/fp4: ``skip`` [()] name-component regexes left in float, ``conv`` [False] also quantize Conv2d
            weights, ``blocksize`` [64] a power of two in [32, 4096]. quanto: ``skip`` [()], ``conv`` [False].
            Regex options take a string or a sequence of strings; numbers may be numpy scalars.

    Returns:
        The copy, in eval mode, with ``qdrift_quant = {"scheme", "options", "tensors": {param name: {type, reason,
        shape, numel, sq_err, sq_norm, ...}}}``; ``type`` is what the tensor is stored as (``"Q4_0"``, ``"NF4"``,
        ``"qint4"``, ``"F16"``, ``"F32"``).

    Raises:
        ValueError: unknown scheme or option, a bad option value (named), NaN or inf in a tensor the scheme
            quantizes or stores (named: GGUF every floating-point parameter, bitsandbytes and quanto the weight and
            bias of each layer they quantize).
        ImportError: the format's library is not installed.
    """
    return _quantize_format(model, scheme, options, "quantize_format")


def _check_format_options(fn: str, opts: dict) -> dict:
    """The format options checked up front (regex lists, flags, sizes); numpy scalars converted."""
    for key in ("keep", "skip"):
        if key in opts:
            opts[key] = patterns(fn, key, opts[key])
    for key in ("reshape", "conv"):
        if key in opts:
            opts[key] = as_flag(fn, key, opts[key])
    if "small" in opts:
        opts["small"] = as_int(fn, "small", opts["small"], 0,
                               what="an integer >= 0 (tensors with at most this many values stay F32)")
    if "blocksize" in opts:
        opts["blocksize"] = as_int(fn, "blocksize", opts["blocksize"], 32, 4096,
                                   what="a power of two in [32, 4096] (bitsandbytes' 4-bit block sizes)")
        if opts["blocksize"] & (opts["blocksize"] - 1):
            raise ValueError(f"{fn}: blocksize must be a power of two in [32, 4096] (bitsandbytes' 4-bit block sizes), "
                             f"got {opts['blocksize']!r}")
    return opts


def _check_format_weights(fn: str, model: nn.Module, family: str, opts: dict) -> None:
    """Refuse NaN / inf in what the scheme quantizes or stores: GGUF every floating parameter (each is written to
    the file), bitsandbytes and quanto the weights and biases of the layers they quantize."""
    if family == "gguf":
        hint = "quantization needs finite weights (was the checkpoint loaded correctly?)"
        for name, p in model.named_parameters():
            layer = name.rpartition(".")[0]
            check_finite(fn, f"parameter {name!r}" + (f" (layer {layer!r})" if layer else ""), p.detach(), hint)
        return
    for name, mod in _eligible(model, opts).items():
        check_layer_params(fn, name, mod)


def _quantize_format(model: nn.Module, scheme: str, options: dict, fn: str) -> nn.Module:
    """:func:`quantize_format`; ``fn`` is the entry point named in error messages."""
    if not isinstance(scheme, str) or scheme not in FORMAT_SCHEMES:
        raise ValueError(f"{fn}: unknown format scheme {scheme!r}; expected one of {FORMAT_SCHEMES}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    family = _family(scheme)
    unknown = set(options) - set(_DEFAULTS[family])
    if unknown:
        raise ValueError(f"{fn}: unknown options for {scheme}: {sorted(unknown)}; valid: {sorted(_DEFAULTS[family])}")
    opts = _check_format_options(fn, dict(_DEFAULTS[family], **options))
    _check_format_weights(fn, model, family, opts)
    qmodel = copy.deepcopy(model).eval()
    report = {"gguf": _quantize_gguf, "bnb": _quantize_bnb, "quanto": _quantize_quanto}[family](qmodel, scheme, opts)
    qmodel.qdrift_quant = dict(scheme=scheme, options=opts, tensors=report)
    return qmodel


def format_summary(qmodel: nn.Module) -> dict:
    """Share of parameters stored quantized, and the relative weight error ``|W_q - W|^2 / |W|^2`` over them.

    Args:
        qmodel: a model returned by :func:`quantize_format`.

    Returns:
        ``{"quantized_params", "total_params", "quantized_share", "weight_rel_err", "types": {type: params}}``.
    """
    rep = getattr(qmodel, "qdrift_quant", None)
    if rep is None or "tensors" not in rep:
        raise ValueError("format_summary needs a model returned by quantize_format")
    tensors = rep["tensors"].values()
    quant = [t for t in tensors if t["reason"] == "quantized"]
    total = sum(t["numel"] for t in tensors)
    qn = sum(t["numel"] for t in quant)
    types: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + t["numel"]
    return dict(quantized_params=qn, total_params=total, quantized_share=qn / max(1, total),
                weight_rel_err=sum(t["sq_err"] for t in quant) / max(1e-30, sum(t["sq_norm"] for t in quant)),
                types=types)


# ----------------------------------------------------------------------------------------------------------------
# grids for learned rounding (qdrift.quant.reconstruct)

RECON_FORMATS = tuple(GGUF_TYPES) + tuple(BNB_TYPES)  # format schemes whose rounding reconstruct() can learn

# GGUF integer levels k of each type: weight = d * k (symmetric) or m + d * k (``_1`` types), d and m per block of 32
_GGUF_LEVELS = {"Q8_0": (-128, 127, False), "Q5_0": (-16, 15, False), "Q4_0": (-8, 7, False),
                "Q5_1": (0, 31, True), "Q4_1": (0, 15, True)}


def _gguf_neighbours(gguf, w: torch.Tensor, qtype: str, stored: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values below and above each weight, with the block scales (and minima) gguf-py stores."""
    t = getattr(gguf.GGMLQuantizationType, qtype)
    data = w.detach().to(torch.float16).float().cpu().numpy().reshape(stored)
    packed = gguf.quants.quantize(data, t)
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = packed.reshape(-1, size)
    d = torch.from_numpy(raw[:, 0:2].copy().view("float16").astype("float64")).reshape(-1)
    qmin, qmax, affine = _GGUF_LEVELS[qtype]
    m = torch.from_numpy(raw[:, 2:4].copy().view("float16").astype("float64")).reshape(-1) if affine else 0 * d
    x = torch.from_numpy(data.astype("float64")).reshape(-1, block)
    k = torch.floor((x - m[:, None]) / torch.where(d == 0, 1.0, d)[:, None]).clamp(qmin, qmax)
    lo = m[:, None] + d[:, None] * k
    hi = m[:, None] + d[:, None] * (k + 1).clamp(qmin, qmax)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def _bnb_neighbours(w: torch.Tensor, scheme: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 / FP4: the two codebook entries (times the block's absmax) bracketing each weight."""
    import bitsandbytes.functional as bnbf

    flat = w.detach().float().reshape(-1).contiguous()
    _, state = bnbf.quantize_4bit(flat, blocksize=blocksize, quant_type=BNB_TYPES[scheme], compress_statistics=False)
    code = torch.unique(state.code.double().cpu())  # sorted codebook
    absmax = state.absmax.double().cpu().repeat_interleave(blocksize)[: flat.numel()]
    x = flat.double() / torch.where(absmax == 0, 1.0, absmax)
    j = torch.searchsorted(code, x, right=True).clamp(1, code.numel() - 1)
    below = x < code[0]
    lo = torch.where(below, code[0], code[j - 1]) * absmax
    hi = torch.where(below | (x >= code[-1]), torch.where(below, code[0], code[-1]), code[j]) * absmax
    return lo.reshape(w.shape), hi.reshape(w.shape)


def format_grids(qmodel: nn.Module, model: nn.Module) -> dict:
    """``{module name: ("weight", target, lo, hi)}`` for the quantized ``Linear``/``Conv2d`` weights of a format.

    The grid is the format's own, read from its library: GGUF's per-block ``d`` (and ``m``) from gguf-py's packed
    blocks (levels ``d k`` or ``m + d k``); bitsandbytes' codebook (NF4 or FP4, non-uniform) times each block's
    absmax, so learned rounding chooses between the two codebook entries that bracket the weight. optimum-quanto's
    scales are not exposed in a stable way: ``"quanto-*"`` raise.

    Raises:
        ValueError: a scheme without readable grid (names the schemes that support reconstruction).
    """
    from .ptq import SIMULATED_SCHEMES

    rep = qmodel.qdrift_quant
    scheme = rep["scheme"]
    if scheme not in RECON_FORMATS:
        raise ValueError(f"reconstruction is not supported for scheme {scheme!r} (its grid is not read back from "
                         f"its library); it is for {', '.join(SIMULATED_SCHEMES + RECON_FORMATS)}")
    gguf = _require(scheme) if scheme in GGUF_TYPES else None
    out = {}
    for name, mod in qmodel.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        entry = rep["tensors"].get(f"{name}.weight")
        if entry is None or entry["reason"] != "quantized":
            continue
        w = model.get_submodule(name).weight.detach()
        if gguf is not None:
            lo, hi = _gguf_neighbours(gguf, w, entry["type"], entry["stored_shape"])
        else:
            lo, hi = _bnb_neighbours(w, scheme, rep["options"]["blocksize"])
        target = w.to(torch.float16).double() if gguf is not None else w.double()  # GGUF quantizes the F16 file
        out[name] = ("weight", target, lo, hi)
    return out
