"""Shared fixtures: the real k-diffusion sampling module (loaded without its heavy package __init__)."""

import importlib.util
import sys
import types

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _load_kdiffusion_sampling():
    """Imports ``k_diffusion.sampling`` without running ``k_diffusion/__init__.py``.

    The package's __init__ imports modules that need torchvision, clip and clean-fid; sampling.py needs
    only ``utils.append_dims``. A stand-in package module with that one function is registered first
    (REFERENCE.md section 4).
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [root]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    sampling_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules["k_diffusion.sampling"] = module
    sampling_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kdiff():
    module = _load_kdiffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion; see README)")
    return module
