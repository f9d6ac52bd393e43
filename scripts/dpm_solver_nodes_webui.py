"""AUTOMATIC1111 / Forge / reForge WebUI entry point of dpm-solver-nodes.

The WebUI executes every ``scripts/*.py`` of an extension as a module named after the file, with the extension root
on ``sys.path`` only during that import.  ``import samplers`` would create a generic top-level module that collides
with other extensions, so the repository root is loaded once under its unique package name ``dpm_solver_nodes``
(docs/hosts.md 3.2) and everything else is imported from there.  "Reload UI" executes this file again: the package
stays loaded, the samplers are re-registered in place and the callbacks (cleared by the WebUI) added again.
"""
import importlib.util
import logging
import os
import sys

PACKAGE = "dpm_solver_nodes"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger(PACKAGE)


def load_package():
    """``dpm_solver_nodes`` from this checkout (reused when already loaded from it)."""
    module = sys.modules.get(PACKAGE)
    if module is not None:
        loaded_from = os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or ""))
        if loaded_from != ROOT:
            logger.warning("dpm-solver-nodes: using the %s package already loaded from %s, not %s",
                           PACKAGE, loaded_from, ROOT)
        return module
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module


load_package()
webui = importlib.import_module(PACKAGE + ".scripts.dpm_solver_webui.webui")
REGISTERED = webui.setup()
