"""dpm-solver-nodes: the DPM-Solver family (DPM-Solver, DPM-Solver++, SDE variants, DPM-Solver-v3 with EMS) for
ComfyUI and the AUTOMATIC1111 / Forge WebUI.

Imported by ComfyUI as a custom node pack (this file), by the WebUI through ``scripts/``, and as the package
``dpm_solver_nodes`` everywhere else.  Importing it never requires a host: the ComfyUI node mappings are built
only when ComfyUI's modules are importable.
"""
__version__ = "0.1.0"

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"  # ComfyUI frontend extension: the EMS compute node's seed starts "fixed"


def _running_in_comfyui() -> bool:
    import importlib.util
    import sys

    if "comfy" in sys.modules and "folder_paths" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("comfy.samplers") is not None and importlib.util.find_spec(
            "folder_paths") is not None
    except (ImportError, ValueError):
        return False


if _running_in_comfyui():
    from .nodes import load_comfyui

    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = load_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
