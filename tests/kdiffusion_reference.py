"""PyPI k-diffusion's ``sampling.py`` without its package ``__init__`` (which imports torchvision, clip, ...).

``load()`` returns the module ``k_diffusion.sampling`` (loaded by ``peers.load_kdiffusion``, the one loader of
the project) or calls ``pytest.skip`` with the reason when k-diffusion is not installed (install it with
``pip install --no-deps k-diffusion==0.1.1.post1``).
"""
import pytest

from dpm_solver_nodes.peers import Unavailable, load_kdiffusion


def load():
    try:
        return load_kdiffusion()
    except Unavailable as reason:
        pytest.skip(str(reason))
