"""EMS files in ComfyUI's ``models/dpm_solver_v3_ems/`` folder: registration, listing, lookup by model fingerprint.

Files are the package's own safetensors format (``stats.EMS.save``, written atomically).  Their string metadata
carries ``fingerprint`` (nodes.fingerprint.model_fingerprint of the model they describe), ``cfg``, ``model_kind``
and ``cache_key`` (a digest of every setting that produced them), so a lookup reads only file headers; the
headers are cached per (path, mtime, size).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os

logger = logging.getLogger("dpm_solver_nodes")

FOLDER_NAME = "dpm_solver_v3_ems"
EXTENSION = ".safetensors"
CACHE_KEY_VERSION = "2"  # 2: EMS computed with RECOMMENDED_SETTINGS (window fit, slope ridge)


def register_folder(folder_paths) -> str:
    """Register ``models/dpm_solver_v3_ems`` with ComfyUI's folder_paths (an extra_model_paths.yaml entry of the same
    name, loaded earlier, stays first) and return the folder new files are written to."""
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    if FOLDER_NAME in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER_NAME, default)
    else:
        folder_paths.folder_names_and_paths[FOLDER_NAME] = ([default], {EXTENSION})
    folder_paths.folder_names_and_paths[FOLDER_NAME][1].add(EXTENSION)
    return write_folder(folder_paths)


def write_folder(folder_paths) -> str:
    return folder_paths.get_folder_paths(FOLDER_NAME)[0]


def cache_key(settings: dict) -> str:
    """A digest of every setting that determines an EMS estimate (fingerprint, cfg, grid, samples, ...)."""
    text = json.dumps({"version": CACHE_KEY_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def safe_stem(name: str) -> str:
    """A file-name stem from user text: letters, digits, '-', '_' and '.' only, never empty or hidden."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "ems"


def file_name(prefix: str, key: str) -> str:
    return f"{safe_stem(prefix)}-{key[:16]}{EXTENSION}"


class EMSIndex:
    """Header metadata of the EMS files under a set of folders, re-read only when a file changes."""

    def __init__(self, folders):
        self._folders = folders  # callable returning the current folder list
        self._headers = {}

    def files(self):
        found = []
        for folder in self._folders():
            if not os.path.isdir(folder):
                continue
            for root, _dirs, names in os.walk(folder, followlinks=True):
                for name in names:
                    if name.endswith(EXTENSION) and not name.startswith("."):
                        found.append(os.path.join(root, name))
        return sorted(found)

    def metadata(self, path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._headers.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except Exception as error:  # unreadable file: skipped, never served
            logger.warning("dpm_solver_nodes: skipping unreadable EMS file %s (%s)", path, error)
            metadata = None
        self._headers[path] = (stamp, metadata)
        return metadata

    def by_cache_key(self, key):
        for path in self.files():
            metadata = self.metadata(path)
            if metadata and metadata.get("cache_key") == key:
                return path
        return None

    def for_model(self, fingerprint, cfg=None):
        """The file for a model fingerprint: the same cfg if there is one, else the nearest cfg (None if none)."""
        best, best_distance = None, math.inf
        for path in self.files():
            metadata = self.metadata(path)
            if not metadata or metadata.get("fingerprint") != fingerprint:
                continue
            try:
                distance = abs(float(metadata.get("cfg", "nan")) - float(cfg)) if cfg is not None else 0.0
            except (TypeError, ValueError):
                distance = math.inf
            if not math.isfinite(distance):
                distance = 1e9
            newer = best is not None and distance == best_distance and os.path.getmtime(path) > os.path.getmtime(best)
            if best is None or distance < best_distance or newer:
                best, best_distance = path, distance
        return best


__all__ = ["FOLDER_NAME", "EMSIndex", "cache_key", "file_name", "safe_stem", "register_folder", "write_folder"]
