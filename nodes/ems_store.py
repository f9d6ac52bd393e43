"""ComfyUI's ``models/dpm_solver_v3_ems/`` folder: registration with folder_paths and the one ``stats.EMSStore``
over it (keys, lookup by model fingerprint, validation, in-memory EMS) that the nodes and the dropdown share."""
from __future__ import annotations

import os

from ..stats.store import EXTENSION, FOLDER_NAME, EMSStore

_STORE = None


def register_folder(folder_paths) -> str:
    """Register ``models/dpm_solver_v3_ems`` with ComfyUI's folder_paths (an extra_model_paths.yaml entry of the same
    name, loaded earlier, stays first) and return the folder new files are written to."""
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    if FOLDER_NAME in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER_NAME, default)
    else:
        folder_paths.folder_names_and_paths[FOLDER_NAME] = ([default], {EXTENSION})
    folder_paths.folder_names_and_paths[FOLDER_NAME][1].add(EXTENSION)
    return store().write_folder()


def store() -> EMSStore:
    """The process-wide store over folder_paths' ``dpm_solver_v3_ems`` folders (the first one is written to)."""
    global _STORE
    if _STORE is None:
        import folder_paths

        _STORE = EMSStore(lambda: folder_paths.get_folder_paths(FOLDER_NAME))
    return _STORE


def set_store(new_store):
    """Use ``new_store`` (an ``EMSStore``) instead of folder_paths' folders (tests, embedding); returns the old one."""
    global _STORE
    old, _STORE = _STORE, new_store
    return old


__all__ = ["FOLDER_NAME", "EXTENSION", "register_folder", "store", "set_store"]
