"""Under torch.distributed the statistics all-gather: two gloo processes equal one process."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qdrift
from qdrift.bench.gaussian import GaussianData

DATA = GaussianData([0.5, -1.0], [1.0, 0.5])
SIGMAS = qdrift.get_sigmas_karras(6, 0.05, 20.0).double()


def _quantized(x, sigma, **kw):
    """A deterministic 'quantized' model (rounded output), so every process sees the same pairs."""
    return (DATA.denoiser(x, sigma) * 8).round() / 8


def _shard(rank):
    return DATA.prior(3, 20.0, spatial=(5, 5), generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cal = qdrift.calibrate(DATA, _quantized, _shard(rank), SIGMAS, disable=True)
        cal.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file init")
def test_two_gloo_processes_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    single = qdrift.calibrate(DATA, _quantized, [_shard(0), _shard(1)], SIGMAS, disable=True)
    for rank in (0, 1):
        cal = qdrift.load_calibration(tmp_path / f"rank{rank}.safetensors")
        assert cal.meta["K"] == 6
        for k, v in single.moments.tensors().items():
            assert torch.allclose(cal.moments.tensors()[k], v, rtol=1e-12, atol=1e-12), k
        assert torch.allclose(cal.V, single.V)
