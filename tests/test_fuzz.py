"""Property-based fuzzing of the public entry points (hypothesis).

Every sampler, ``calibrate``, ``load_calibration`` on mutated files and the adapters, fed random valid and invalid
input, must either raise a qdrift ``ValueError`` (``CalibrationFileError`` for files) with a message, or return a
finite result of the right shape and dtype; valid input must succeed. Never a hang (files are loaded in a worker
process with a timeout), never NaN.
"""

import json
import os
import shutil
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qdrift
from qdrift import adapters
from qdrift.bench.gaussian import GaussianData

from calib_loader import Loader

# A few dozen examples per test keep the suite fast; QDRIFT_FUZZ_EXAMPLES=1000 hunts longer.
FAST = settings(max_examples=int(os.environ.get("QDRIFT_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=list(HealthCheck))
NAMES = list(qdrift.SAMPLERS)
STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
MULTISTEP = {"lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"}
KNOBS = {
    "euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "euler_ancestral": ["eta", "s_noise"],
    "lms": ["order"],
    "dpmpp_2m": [],
    "dpmpp_2m_sde": ["eta", "s_noise"],
    "dpmpp_3m_sde": ["eta", "s_noise"],
}
ODD_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 6), st.just("1"), st.none(),
    st.booleans(),
)


def _data(channels):
    return GaussianData([0.3 * c - 0.2 for c in range(channels)], [1.0 + 0.2 * c for c in range(channels)])


def _valid_knob(name, value) -> bool:
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if name == "order":
        return isinstance(value, int) and value >= 1
    if name in ("s_tmin", "s_tmax"):
        return value >= 0
    return math.isfinite(value) and value >= 0


@st.composite
def schedules(draw):
    """``(sigmas, valid)``: a decreasing schedule, sometimes damaged."""
    n = draw(st.integers(1, 6))
    levels = sorted(draw(st.lists(st.floats(0.01, 50.0), min_size=n, max_size=n, unique=True)), reverse=True)
    values = levels + ([0.0] if draw(st.booleans()) or n == 1 else [])
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    sigmas = torch.tensor(values, dtype=torch.float64)
    if not bool((sigmas.to(dtype)[1:] < sigmas.to(dtype)[:-1]).all()):
        dtype = torch.float64  # rounding to a narrower float would merge levels: a different (invalid) case
    sigmas = sigmas.to(dtype)
    damage = draw(st.sampled_from(["none"] * 6 + ["nan", "inf", "negative", "repeat", "rising", "2d", "int", "list"]))
    if damage == "none":
        return sigmas, True
    s = sigmas.clone()
    j = draw(st.integers(0, len(s) - 1))
    if damage == "nan":
        s[j] = float("nan")
    elif damage == "inf":
        s[j] = float("inf")
    elif damage == "negative":
        s[-1] = -0.5
    elif damage == "repeat":
        s = torch.cat([s[:1], s])
    elif damage == "rising":
        s = s.flip(0)
    elif damage == "2d":
        s = s[None]
    elif damage == "int":
        s = (s * 10).long()
    elif damage == "list":
        s = s.tolist()
    return s, False


def _bad(result, good) -> bool:
    """Whether a model output differs from a usable one (shape, type, finiteness)."""
    return not (isinstance(result, torch.Tensor) and result.shape == good.shape and result.is_floating_point()
                and bool(torch.isfinite(result).all()))


def _model(behaviour, at, channels):
    """A denoiser (computed in float64, returned in x's dtype) that misbehaves from call ``at`` on; the returned
    list records whether it ever returned an unusable output."""
    data = _data(channels)
    calls, bad = [], []

    def model(x, sigma, **kw):
        calls.append(1)
        out = data.denoiser(x.double(), sigma.double()).to(x.dtype)
        if behaviour == "exact" or len(calls) <= at:
            return out
        result = {
            "nan": lambda: out * float("nan"),
            "inf": lambda: out + float("inf"),
            "broadcast": lambda: out[:1],
            "squeeze": lambda: out[..., :1] if out.ndim > 2 else out[:, :1],
            "integer": lambda: out.long(),
            "none": lambda: None,
            "huge": lambda: out * 1e30,
            "float64": lambda: out.double(),
        }[behaviour]()
        bad.append(_bad(result, out))
        return result

    return model, bad


@FAST
@given(
    name=st.sampled_from(NAMES),
    schedule=schedules(),
    x_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    batch=st.integers(1, 3),
    channels=st.integers(1, 3),
    spatial=st.sampled_from([(), (3,), (2, 2)]),
    behaviour=st.sampled_from(["exact"] * 4 + ["nan", "inf", "broadcast", "squeeze", "integer", "none", "huge",
                                                "float64"]),
    at=st.integers(0, 8),
    v_kind=st.sampled_from(["none", "scalar", "channel", "huge", "negative", "nan", "wrong_steps", "wrong_channels"]),
    v_scale=st.floats(0.0, 0.5),
    knob=st.one_of(st.none(), st.tuples(st.integers(0, 3), ODD_VALUES)),
    strength=st.one_of(st.just(1.0), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    form=st.sampled_from(["first_order", "quadrature"]),
    x_nan=st.booleans(),
)
def test_samplers_raise_clearly_or_return_finite(name, schedule, x_dtype, batch, channels, spatial, behaviour, at,
                                                 v_kind, v_scale, knob, strength, form, x_nan):
    sigmas, valid = schedule
    x = torch.randn((batch, channels) + spatial, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x * 10).to(x_dtype)
    if x_nan and behaviour == "exact":
        x.view(-1)[0] = float("nan")
        valid = False
    steps = (len(sigmas) - 1) if isinstance(sigmas, list) else (sigmas.shape[-1] - 1)
    kw = {}
    if name in MULTISTEP:
        kw["form"] = form
    if name in STOCHASTIC:
        kw["noise_sampler"] = qdrift.default_noise_sampler(x, seed=1)
    names = KNOBS[name]
    if knob is not None and names:
        knob_name = names[knob[0] % len(names)]
        kw[knob_name] = knob[1]
        valid &= _valid_knob(knob_name, knob[1])
    kw["strength"] = strength
    valid &= strength == strength and 0 <= strength < float("inf")
    rows = max(steps, 1)
    V = {
        "none": None,
        "scalar": torch.full((rows,), v_scale),
        "channel": torch.full((rows, channels), v_scale),
        "huge": torch.full((rows, channels), 1e6),
        "negative": torch.full((rows,), -0.1),
        "nan": torch.full((rows,), float("nan")),
        "wrong_steps": torch.zeros(rows + 1, channels),
        "wrong_channels": torch.zeros(rows, channels + 1),
    }[v_kind]
    valid &= v_kind in ("none", "scalar", "channel", "huge")
    model, bad = _model(behaviour, at, channels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qdrift.DriftClippedWarning)
            out = qdrift.SAMPLERS[name](model, x, sigmas, V, disable=True, **kw)
    except ValueError as e:
        assert str(e).strip(), "an error without a message"
        if valid and not any(bad) and behaviour != "huge":  # huge outputs may overflow the sample: refused
            raise AssertionError(f"valid input refused: {e}") from e
        return
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())
    assert valid and not any(bad), "invalid input passed"


@FAST
@given(
    sizes=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    channels=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    as_tensor=st.booleans(),
    schedule=schedules(),
    behaviour=st.sampled_from(["exact", "noisy", "nan", "broadcast", "none"]),
    trim=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    reduce=st.sampled_from(["channel", "scalar", "pixel"]),
)
def test_calibrate_raises_clearly_or_returns_finite(sizes, channels, as_tensor, schedule, behaviour, trim, reduce):
    sigmas, valid = schedule
    c0 = channels[0]
    gen = torch.Generator().manual_seed(0)
    if as_tensor:
        x = torch.randn((sum(sizes), c0, 3), generator=gen) * 10
        valid &= sum(sizes) > 0
        c = c0
    else:
        x = [torch.randn((k, ch, 3), generator=gen) * 10 for k, ch in zip(sizes, channels)]
        valid &= len(x) > 0 and all(k > 0 for k in sizes) and len(set(channels[: len(sizes)])) == 1
        c = c0
    valid &= reduce != "pixel" and (trim is None or trim >= 0)
    fp = _data(c)
    bad = []

    def q(x, sigma, **kw):
        out = fp.denoiser(x, sigma)
        result = {"exact": out, "noisy": out + 0.1 * torch.randn_like(out), "nan": out * float("nan"),
                  "broadcast": out[:1], "none": None}[behaviour]
        bad.append(_bad(result, out))
        return result

    try:
        cal = qdrift.calibrate(fp, q, x, sigmas, reduce=reduce, trim=trim, disable=True)
    except ValueError as e:
        assert str(e).strip()
        assert not (valid and not any(bad)), f"valid input refused: {e}"
        return
    assert valid and not any(bad), "invalid input passed"
    assert cal.V.shape == (cal.steps, c) and bool(torch.isfinite(cal.V).all()) and bool((cal.V >= 0).all())


@pytest.fixture(scope="module")
def files():
    """A worker process for loading, and a valid calibration file's bytes and parts."""
    from safetensors import safe_open

    root = tempfile.mkdtemp(prefix="qdrift-fuzz-")
    data = _data(2)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 10
    cal = qdrift.calibrate(data, data, x, qdrift.get_sigmas_karras(4, 0.05, 10.0), disable=True)
    good = os.path.join(root, "good.safetensors")
    cal.save(good)
    with safe_open(good, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["qdrift"])
    worker = Loader()
    yield {"root": root, "bytes": open(good, "rb").read(), "tensors": tensors, "header": header, "load": worker.load}
    worker.close()
    shutil.rmtree(root, ignore_errors=True)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
HEADER_KEYS = ["format", "format_version", "qdrift_version", "reduce", "conditional", "meta"]
META_KEYS = ["K", "trim", "trajectory", "model_fp", "model_q", "schedule", "seconds", "qdrift_version", "source", "x"]


@FAST
@given(
    mutation=st.sampled_from(["flip", "truncate", "append", "header_field", "meta_field", "raw_metadata", "tensor"]),
    where=st.integers(0, 10**6),
    count=st.integers(1, 8),
    value=JSON,
    key=st.integers(0, 100),
    raw=st.text(max_size=40),
)
def test_load_calibration_raises_clearly_or_loads_finite(files, mutation, where, count, value, key, raw):
    from safetensors.torch import save_file

    path = os.path.join(files["root"], "mutated.safetensors")
    data = bytearray(files["bytes"])
    header = json.loads(json.dumps(files["header"]))
    tensors = dict(files["tensors"])
    if mutation == "flip":
        for k in range(count):
            data[(where + 7919 * k) % len(data)] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif mutation == "truncate":
        open(path, "wb").write(bytes(data[: where % len(data)]))
    elif mutation == "append":
        open(path, "wb").write(bytes(data) + raw.encode())
    else:
        if mutation == "header_field":
            header[HEADER_KEYS[key % len(HEADER_KEYS)]] = value
        elif mutation == "meta_field":
            header["meta"][META_KEYS[key % len(META_KEYS)]] = value
        elif mutation == "tensor":
            name = sorted(tensors)[key % len(tensors)]
            t = tensors[name].clone()
            t.view(-1)[where % t.numel()] = [float("nan"), -1.0, 1e30, 0.0][count % 4]
            tensors[name] = t
        text = raw if mutation == "raw_metadata" else json.dumps(header)
        save_file(tensors, path, metadata={"qdrift": text})
    answer = files["load"](path, timeout=30)
    if answer["ok"]:
        assert answer["finite"] and answer["shape"] == [len(files["tensors"]["sigmas"]) + 1, 2]
        assert answer["channels"] == 2
        assert isinstance(answer["K"], int)
    else:
        assert answer["type"] in ("CalibrationFileError", "CalibrationFileNotFoundError"), answer
        assert path in answer["message"]


ADAPTERS = {
    "discrete_eps": lambda net: adapters.DiscreteEpsDenoiser(net, torch.linspace(0.9999, 0.005, 200)),
    "discrete_v": lambda net: adapters.DiscreteVDenoiser(net, torch.linspace(0.9999, 0.005, 200), quantize=True),
    "continuous_eps": lambda net: adapters.ContinuousEpsDenoiser(net, 0.01, 80.0),
    "continuous_v": lambda net: adapters.ContinuousVDenoiser(net, 0.01, 80.0, scale_input=False),
    "x0": lambda net: adapters.X0Denoiser(net, 0.01, 80.0),
    "flow": lambda net: adapters.FlowDenoiser(net, time_scale=1000.0),
}


@FAST
@given(
    kind=st.sampled_from(list(ADAPTERS)),
    sigma=st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.lists(st.floats(-1.0, 100.0, width=32), min_size=2, max_size=2)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_adapters_raise_clearly_or_hand_finite_times_to_the_network(kind, sigma, dtype):
    seen = []

    def net(x, t, **kw):
        assert bool(torch.isfinite(t.double()).all()), f"the network got timestep {t}"
        seen.append(t)
        return torch.tanh(x.double()).to(x.dtype)

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    s = torch.tensor(sigma) if isinstance(sigma, list) else sigma
    values = sigma if isinstance(sigma, list) else [sigma]
    hi = 1.0 if kind == "flow" else float("inf")
    valid = all(v == v and 0 <= v <= hi and v != float("inf") for v in values)
    try:
        out = ADAPTERS[kind](net)(x, s)
    except ValueError as e:
        assert str(e).strip() and not valid, e
        assert not seen
        return
    assert valid and out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
