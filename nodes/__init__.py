"""ComfyUI adapters (thin declarations over ``samplers`` and ``stats``).

Host-free parts (importable anywhere, unit-tested without ComfyUI): ``options`` (node widgets -> sampler options),
``model_kind`` (model_sampling -> "eps"/"flow"), ``fingerprint`` (model identity for the EMS store), ``ems_store``
(the folder's ``stats.EMSStore``).  ComfyUI-only parts: ``comfy_sampling`` (sampler functions, KSampler dropdown
entries), ``comfy_ems`` (the ``stats.EMSJob`` through CFGGuider), ``comfy_nodes`` (the node classes), loaded by
``load_comfyui``.
"""


def load_comfyui():
    """Build the node mappings and register the EMS folder and dropdown entries (call only inside ComfyUI)."""
    from .comfy_nodes import build_mappings

    return build_mappings()


__all__ = ["load_comfyui"]
