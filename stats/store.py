"""The one EMS store both hosts use: folders of EMS files, found by their cache key or by the model they describe.

* One key: ``stats.settings.EMSKey`` (target + settings + estimator version); its JSON is stored in the file
  (metadata ``cache_key``) and its sha256 names the file (``<prefix>-<digest[:16]>.safetensors``).
* Lookups read only headers (cached per path, mtime, size and inode) and validate them; a bad file is skipped with
  one log line (per file version) and never stops a lookup for other models.  The chosen file is then read whole
  through one open and verified (sha256, bounds); if that fails, the next candidate is tried.
* Loaded EMS are kept in memory per (path, mtime, size, inode): repeated generations get the same object, so the
  sampler's per-EMS plan cache hits.
* Folders are walked without following a symlinked folder twice (real paths are tracked), so a symlink loop ends.
* Writes go through ``EMS.save`` (temp file + ``os.replace``).  Temp files of writers that died (their pid is gone
  on this machine, or older than an hour) are removed on the next save or check.  Names are validated.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time

from .ems import EMS, TMP_PREFIX, TMP_SUFFIX, read_ems_file, read_file_header
from .settings import EMSKey

logger = logging.getLogger("dpm_solver_nodes")

FOLDER_NAME = "dpm_solver_v3_ems"
EXTENSION = ".safetensors"
MAX_NAME = 120
STALE_TMP_SECONDS = 3600
_TMP_PATTERN = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[0-9a-f]+" + re.escape(TMP_SUFFIX) + "$")


class EMSStoreError(OSError):
    """The store cannot write where it was asked to (the message says where and why)."""


def validate_name(name) -> str:
    """A file stem from user text: refused when empty, '.', '..' or longer than MAX_NAME characters; characters
    other than letters, digits, '-', '_' and '.' become '_'; a trailing ``.safetensors`` is dropped."""
    if not isinstance(name, str):
        raise ValueError(f"an EMS file name must be a string, got {type(name).__name__}")
    stem = name.strip()
    if stem.endswith(EXTENSION):
        stem = stem[:-len(EXTENSION)]
    if stem in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a usable EMS file name: give a name such as 'my_model_cfg7.5'")
    if len(stem) > MAX_NAME:
        raise ValueError(f"EMS file name of {len(stem)} characters is too long (at most {MAX_NAME})")
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    if stem.startswith("."):  # hidden files are not listed
        stem = "_" + stem[1:]
    return stem


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class EMSStore:
    """EMS files under ``folders`` (a list of paths, or a callable returning it, evaluated on every use); new
    files go to the first folder."""

    def __init__(self, folders):
        self._folders = folders if callable(folders) else (lambda: list(folders))
        self._headers = {}    # path -> (stamp, (key or None, metadata) or None)
        self._loaded = {}     # path -> (stamp, EMS)
        self._logged = set()  # (path, stamp) already reported as bad

    # ---- folders and files ------------------------------------------------------------------------------------
    def folders(self):
        return [os.fspath(f) for f in self._folders()]

    def write_folder(self) -> str:
        folders = self.folders()
        if not folders:
            raise EMSStoreError("the EMS store has no folder to write to")
        return folders[0]

    def files(self):
        """Sorted paths of the ``*.safetensors`` files (not hidden) below the folders; symlinked folders are
        followed once each, so a symlink loop ends."""
        found, visited = [], set()
        for folder in self.folders():
            if not os.path.isdir(folder):
                continue
            for root, dirs, names in os.walk(folder, followlinks=True):
                real = os.path.realpath(root)
                if real in visited:
                    dirs[:] = []
                    continue
                visited.add(real)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, n) for n in names if n.endswith(EXTENSION) and not n.startswith("."))
        return sorted(found)

    def _skip(self, path, stamp, error):
        if (path, stamp) not in self._logged:
            self._logged.add((path, stamp))
            logger.warning("DPM-Solver-v3: skipping EMS file %s (%s)", path, error)

    def header(self, path):
        """(EMSKey or None, metadata) of a valid file header, None for a bad file (logged once per version)."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._headers.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            metadata, stamp = read_file_header(path)
            from .ems import validate_metadata

            validate_metadata(metadata, repr(path))
            key = EMSKey.from_json(metadata["cache_key"], repr(path)) if "cache_key" in metadata else None
            entry = (key, metadata)
        except (ValueError, OSError) as error:
            self._skip(path, stamp, error)
            entry = None
        self._headers[path] = (stamp, entry)
        return entry

    def load(self, path) -> EMS:
        """The EMS of ``path``, read once per file version and then served from memory; ValueError if bad."""
        try:
            stat = os.stat(path)
        except OSError as error:
            raise ValueError(f"EMS file {path!r} cannot be read ({error})") from None
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == (stat.st_mtime_ns, stat.st_size, stat.st_ino):
            return cached[1]
        try:
            ems, stamp = read_ems_file(path)
        except OSError as error:
            raise ValueError(f"EMS file {path!r} cannot be read ({error})") from None
        self._loaded[path] = (stamp, ems)
        return ems

    def invalidate(self, *_):
        """Forget loaded EMS (e.g. on a checkpoint change); headers are re-read when files change anyway."""
        self._loaded.clear()

    # ---- lookups ----------------------------------------------------------------------------------------------
    def get(self, key: EMSKey):
        """(EMS, path) stored for exactly ``key``, or (None, None); the job's own file name first, then copies
        (e.g. saved under another name)."""
        digest = key.digest()
        own = f"-{digest[:16]}{EXTENSION}"
        matching = [path for path in sorted(self.files(), key=lambda p: not p.endswith(own))
                    if (entry := self.header(path)) is not None and entry[0] is not None
                    and entry[0].digest() == digest]
        return self._first_loadable(matching)

    def find(self, fingerprint, model_kind, cfg=None, latent_shape=None, sigma_digest=None, where=None):
        """(EMS, path) for a generation: files of this model (fingerprint, kind and, if given, sigma digest and
        settings values ``where``), per-element ones only at their own latent shape, the nearest cfg first (ties:
        the newest file).  (None, None) when none is usable."""
        candidates = []
        for path in self.files():
            entry = self.header(path)
            if entry is None or entry[0] is None:
                continue
            target, settings = entry[0].target, entry[0].settings
            if target.fingerprint != fingerprint or target.model_kind != model_kind:
                continue
            if sigma_digest is not None and target.sigma_digest != sigma_digest:
                continue
            if any(getattr(settings, k) != v for k, v in (where or {}).items()):
                continue
            if settings.reduction == "per_element" and latent_shape is not None and \
                    tuple(target.latent_shape) != tuple(latent_shape):
                continue
            distance = abs(target.cfg - float(cfg)) if cfg is not None and math.isfinite(float(cfg)) else 0.0
            candidates.append((distance, -self._headers[path][0][0], path))  # ties: the newest file
        return self._first_loadable(path for _, _, path in sorted(candidates))

    def _first_loadable(self, paths):
        """(EMS, path) of the first of ``paths`` that loads; the others are skipped with a log line."""
        for path in paths:
            try:
                return self.load(path), path
            except ValueError as error:
                self._skip(path, "load", error)
        return None, None

    # ---- writing ----------------------------------------------------------------------------------------------
    def clean_stale_temp(self, folder=None):
        """Remove ``.ems-<pid>-*.tmp`` files of writers that are gone (pid not running here, or an hour old)."""
        folder = folder or self.write_folder()
        try:
            names = os.listdir(folder)
        except OSError:
            return 0
        removed = 0
        for name in names:
            match = _TMP_PATTERN.match(name)
            if not match:
                continue
            path = os.path.join(folder, name)
            try:
                age = time.time() - os.path.getmtime(path)
                if age > STALE_TMP_SECONDS or not _pid_alive(int(match.group(1))):
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
        if removed:
            logger.info("DPM-Solver-v3: removed %d temporary EMS file(s) left by interrupted writers in %s", removed,
                        folder)
        return removed

    def check_writable(self, folder=None) -> str:
        """Create the write folder and a probe file in it (before a long computation); EMSStoreError saying where
        and why when that fails.  Returns the folder."""
        folder = folder or self.write_folder()
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + f"{os.getpid()}-", suffix=TMP_SUFFIX, dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise EMSStoreError(f"cannot write EMS files to {folder!r} ({error.strerror or error}); choose a "
                                "writable EMS folder") from None
        self.clean_stale_temp(folder)
        return folder

    def save(self, ems: EMS, name, folder=None) -> str:
        """Write ``ems`` as ``<name>.safetensors`` (``validate_name``) in the write folder; returns the path."""
        if not isinstance(ems, EMS):
            raise ValueError(f"EMSStore.save needs an EMS, got {type(ems).__name__}")
        folder = folder or self.write_folder()
        path = os.path.join(folder, validate_name(name) + EXTENSION)
        try:
            os.makedirs(folder, exist_ok=True)
            self.clean_stale_temp(folder)
            ems.save(path)
        except OSError as error:
            raise EMSStoreError(f"cannot write EMS file {path!r} ({error.strerror or error})") from None
        return path

    def file_name(self, key: EMSKey, prefix="ems") -> str:
        """The stem a job's file gets: ``<prefix>-<first 16 hex digits of the key digest>``."""
        return f"{validate_name(prefix)[:MAX_NAME - 17]}-{key.digest()[:16]}"


__all__ = ["EMSStore", "EMSStoreError", "validate_name", "FOLDER_NAME", "EXTENSION"]
