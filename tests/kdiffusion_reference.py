"""PyPI k-diffusion's ``sampling.py`` without its package ``__init__`` (which imports torchvision, clip, ...).

``load()`` returns the module ``k_diffusion.sampling`` or calls ``pytest.skip`` with the reason when k-diffusion is
not installed (install it with ``pip install --no-deps k-diffusion==0.1.1.post1``).
"""
import importlib
import importlib.util
import sys
import types

import pytest


def load():
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    sys.modules["k_diffusion.utils"] = utils
    package.utils = utils
    sampling = importlib.import_module("k_diffusion.sampling")
    package.sampling = sampling
    return sampling
