"""Calibration files under bad input: every failure to read is a CalibrationFileError naming the file and the
problem (never a hang, an OS-level or a library-internal error); every failure to write an OSError naming the path."""

import json
import os

import numpy as np
import pytest
import torch

import qdrift
from qdrift.bench.gaussian import GaussianData
from qdrift.calib import CalibrationFileError, CalibrationFileNotFoundError

from calib_loader import Loader

DATA = GaussianData([0.5, -1.0], [1.0, 0.5])
SIGMAS = qdrift.get_sigmas_karras(4, 0.05, 10.0).double()


@pytest.fixture(scope="module")
def cal():
    x = DATA.prior(3, float(SIGMAS[0]), spatial=(4,), generator=torch.Generator().manual_seed(0))
    return qdrift.calibrate(DATA, DATA, x, SIGMAS, disable=True)


@pytest.fixture(scope="module")
def loader():
    worker = Loader()
    yield worker
    worker.close()


def _write(path, cal, header_edit=None, raw=None):
    """Writes ``cal`` with its JSON header changed by ``header_edit(header)`` or replaced by ``raw``."""
    from safetensors.torch import save_file

    header = {"format": "qdrift.calibration", "format_version": 1, "qdrift_version": qdrift.__version__,
              "reduce": "channel", "conditional": True, "meta": json.loads(json.dumps(cal.meta))}
    if header_edit is not None:
        header_edit(header)
    save_file({"sigmas": cal.sigmas, **cal.moments.tensors()}, str(path),
              metadata={"qdrift": raw if raw is not None else json.dumps(header)})
    return path


def test_missing_file_is_both_calibration_file_error_and_file_not_found(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CalibrationFileNotFoundError, match="nope.safetensors") as info:
        qdrift.load_calibration(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CalibrationFileError)


def test_directory_is_refused_by_kind(tmp_path):
    with pytest.raises(CalibrationFileError, match=f"{tmp_path} is a directory, not a regular file"):
        qdrift.load_calibration(tmp_path)


def test_fifo_is_refused_without_opening_it(tmp_path, loader):
    """A FIFO used to block the loader forever (opening it waits for a writer)."""
    fifo = tmp_path / "cal.safetensors"
    os.mkfifo(fifo)
    answer = loader.load(fifo, timeout=30)
    assert answer["type"] == "CalibrationFileError" and "FIFO" in answer["message"] and str(fifo) in answer["message"]


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_device_is_refused(loader):
    answer = loader.load("/dev/null")
    assert answer["type"] == "CalibrationFileError" and "character device" in answer["message"]


def test_non_path_is_refused():
    with pytest.raises(CalibrationFileError, match="path must be"):
        qdrift.load_calibration(3)


def test_deeply_nested_metadata_is_a_calibration_file_error(tmp_path, cal):
    deep = '{"format": "qdrift.calibration", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _write(tmp_path / "deep.safetensors", cal, raw=deep)
    with pytest.raises(CalibrationFileError, match="corrupt qdrift metadata"):
        qdrift.load_calibration(path)


BAD_META = [("K", "five"), ("K", 2.5), ("K", -1), ("K", True), ("K", None), ("trim", "x"), ("trim", -1.0),
            ("trajectory", 3), ("model_fp", 5), ("model_q", ["a"]), ("source", {}), ("schedule", "x"),
            ("schedule", [1.0, "a"]), ("seconds", "x"), ("seconds", -1), ("qdrift_version", [1]),
            ("band_units", 0), ("band_units", 3), ("band_units", "x"), ("band_shares", [0.5, 0.5])]


@pytest.mark.parametrize("key,value", BAD_META, ids=[f"{k}={v!r}" for k, v in BAD_META])
def test_metadata_fields_of_the_wrong_type_are_refused_at_load(tmp_path, cal, key, value):
    """A non-integer K used to load fine and fail later, inside merge."""
    path = _write(tmp_path / "meta.safetensors", cal, lambda h: h["meta"].__setitem__(key, value))
    with pytest.raises(CalibrationFileError, match=rf"meta.*'{key}'.*must be") as info:
        qdrift.load_calibration(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key,value", [("qdrift_version", 5), ("format_version", 1.0), ("reduce", 1),
                                       ("conditional", "yes")])
def test_header_fields_of_the_wrong_type_are_refused(tmp_path, cal, key, value):
    path = _write(tmp_path / "header.safetensors", cal, lambda h: h.__setitem__(key, value))
    with pytest.raises(CalibrationFileError, match=key):
        qdrift.load_calibration(path)


def test_host_metadata_fields_and_numpy_values_round_trip(tmp_path, cal):
    meta = dict(cal.meta, K=np.int64(3), seconds=np.float32(1.5), seeds=[1, 2], settings={"cfg": 7.5}, host="x")
    path = tmp_path / "host.safetensors"
    qdrift.Calibration(cal.sigmas, cal.moments, meta=meta).save(path)
    back = qdrift.load_calibration(path)
    assert back.meta["K"] == 3 and back.meta["seeds"] == [1, 2] and back.meta["settings"] == {"cfg": 7.5}
    assert back.merge(back).meta["K"] == 6


def test_wrong_metadata_is_refused_in_memory_too(cal):
    with pytest.raises(ValueError, match=r"meta\['K'\] must be an integer"):
        qdrift.Calibration(cal.sigmas, cal.moments, meta={"K": "five"})


@pytest.mark.parametrize("shares", ["abc", [0.5], [0.5, 0.0], [0.5, float("nan")]])
def test_band_meta_is_checked_where_it_is_read(cal, shares):
    """The band-unit fields used to load and then fail inside the error model (ZeroDivisionError, a torch
    size mismatch) when a sampler read them."""
    with pytest.raises(ValueError, match=r"meta\['band_shares'\] must be a list of 2 numbers in \(0, 1\]"):
        qdrift.Calibration(cal.sigmas, cal.moments, meta={"band_units": 2, "band_shares": shares})
    ok = qdrift.Calibration(cal.sigmas, cal.moments, meta={"band_units": 2, "band_shares": [0.25, 0.75]})
    assert ok.V.shape == cal.V.shape


def test_saving_into_a_missing_directory_is_an_os_error_naming_the_path(tmp_path, cal):
    path = tmp_path / "missing" / "cal.safetensors"
    with pytest.raises(FileNotFoundError, match=f"cannot write {path}: no such directory"):
        cal.save(path)


def test_saving_onto_a_directory_is_an_os_error_and_leaves_nothing_behind(tmp_path, cal):
    target = tmp_path / "dir"
    target.mkdir()
    with pytest.raises(OSError, match=f"cannot write {target}"):
        cal.save(target)
    assert os.listdir(tmp_path) == ["dir"] and os.listdir(target) == []


def test_save_replaces_an_existing_file(tmp_path, cal):
    path = tmp_path / "cal.safetensors"
    path.write_bytes(b"old")
    cal.save(path)
    assert torch.equal(qdrift.load_calibration(path).V, cal.V) and os.listdir(tmp_path) == ["cal.safetensors"]


def test_meta_that_cannot_be_json_is_a_value_error(cal, tmp_path):
    loop = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="meta cannot be written as JSON"):
        qdrift.Calibration(cal.sigmas, cal.moments, meta={"loop": loop}).save(tmp_path / "x.safetensors")


@pytest.mark.parametrize("name,edit,match", [
    ("traj_sum_xx", lambda t: -t, "sum_xx has a negative sum of squares"),
    ("traj_n", lambda t: t * 0, "at least one position"),
    ("traj_n", lambda t: -t, "at least one position"),
    ("traj_sum_xd", lambda t: t * 1e3 + 1.0, "sum_xd is above its Cauchy-Schwarz bound"),
    ("traj_cross_xd", lambda t: t * 1e3 + 1.0, "cross_xd has a sum of products above its Cauchy-Schwarz bound"),
])
def test_trajectory_sums_no_data_could_give_are_refused_at_load(tmp_path, cal, name, edit, match):
    """A file's cross-step sums are read tensor by tensor: one that no set of trajectories could have summed to (a
    negated sum of squares, a count of 0) changed the samples silently before; now the file is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.qdrift.safetensors"
    cal.save(good)
    assert qdrift.load_calibration(good).trajectory is not None  # the untouched file loads
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors[name] = edit(tensors[name])
    bad = tmp_path / "bad.qdrift.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CalibrationFileError, match=match):
        qdrift.load_calibration(bad)
