"""ComfyUI adapters (thin declarations over ``samplers`` and ``stats``)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
