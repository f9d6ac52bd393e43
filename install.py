"""WebUI install hook: install only the Python packages the WebUI lacks.

The AUTOMATIC1111 / Forge / reForge WebUI runs this file at start-up (a subprocess with the WebUI root on
PYTHONPATH, skipped under --skip-install / --skip-prepare-environment) and offers ``launch.is_installed`` and
``launch.run_pip``.  ComfyUI-Manager runs it too, without ``launch``; there (and anywhere else) it does nothing:
ComfyUI-Manager installs requirements.txt itself.  torch is never installed here: the host provides it.
"""
import importlib.util

# import name -> pip requirement; all of them ship with the A1111, Forge and reForge WebUIs today.
REQUIREMENTS = {
    "numpy": "numpy",
    "safetensors": "safetensors",
    "einops": "einops",
    "torchsde": "torchsde",
    "tqdm": "tqdm",
}


def missing(requirements=REQUIREMENTS, is_installed=None):
    """The pip requirements whose import name is not installed."""
    check = is_installed or (lambda name: importlib.util.find_spec(name) is not None)
    return [requirement for name, requirement in requirements.items() if not check(name)]


def main():
    try:
        import launch  # the WebUI's; absent under ComfyUI-Manager or plain python
    except ImportError:
        launch = None
    if not (hasattr(launch, "is_installed") and hasattr(launch, "run_pip")):
        print("dpm-solver-nodes: install.py is for the AUTOMATIC1111/Forge WebUI; nothing to do here")
        return []
    if importlib.util.find_spec("torch") is None:
        print("dpm-solver-nodes: torch is not installed; the WebUI installs it, not this extension")
        return []
    needed = missing(is_installed=launch.is_installed)
    for requirement in needed:
        launch.run_pip(f"install {requirement}", f"{requirement} for dpm-solver-nodes")
    return needed


if __name__ == "__main__":
    main()
