"""Load this checkout as the package ``dpm_solver_nodes`` (the repository root is the package)."""
import importlib.util
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def _load_checkout():
    if "dpm_solver_nodes" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "dpm_solver_nodes", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpm_solver_nodes"] = module
    spec.loader.exec_module(module)


_load_checkout()
torch.set_num_threads(int(__import__("os").environ.get("DPM_TEST_THREADS", "1")))
