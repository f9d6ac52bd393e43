"""Per-checkpoint DPM-Solver-v3 EMS in the WebUI: identity, cache keys, lookup for the sampler, refresh.

Identity (docs/hosts.md 3.4): the checkpoint's sha256 (``sd_checkpoint_info.sha256``; computed once, and cached by
the WebUI, when it is unknown, e.g. under ``--no-hashing``), the model kind, and a digest of the model's sigma table
(covers v-prediction/ZTSNR rescaling and flow shift).  EMS belong to the base checkpoint: LoRAs applied later do not
change the key.

Files live in ``stats.EMSCache`` (one safetensors file per exact key, written atomically, never served for another
key).  The key holds the EMS settings (grid size N, sample count K, reduction), the cfg the statistics were computed
at and the latent shape.  Lookup for a generation takes the entry with the current settings whose cfg is nearest
the generation's (logging when it differs by more than 1 or the cfg is above 12: docs/dpm_solver_v3.md 3.5), and a
per-element entry only at its own latent shape.  Loaded EMS are kept in memory until the checkpoint changes
(``on_model_loaded`` -> ``invalidate``) or the file changes.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch

from . import settings

logger = logging.getLogger("dpm_solver_nodes")

GUIDANCE = "guided"       # the WebUI's CFG denoiser: statistics of D_cfg, the ODE actually solved
CFG_TOLERANCE = 1.0
CFG_HIGH = 12.0


def sigma_digest(sigmas) -> str:
    """16 hex digits identifying a sigma table (float64 values to 9 significant digits)."""
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1).tolist()
    text = ",".join(f"{v:.9g}" for v in values)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_sha256(sd_model, compute=False):
    """The loaded checkpoint's sha256, or None.  ``compute``: hash the file when the WebUI has not (slow once,
    then cached in the WebUI's cache.json)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None:
        return None
    sha = getattr(info, "sha256", None)
    if not sha and compute and hasattr(info, "calculate_shorthash"):
        try:
            info.calculate_shorthash()
        except Exception as error:  # noqa: BLE001 - a missing file must not break sampling
            logger.warning("dpm-solver-nodes: cannot hash checkpoint %s: %s", getattr(info, "filename", "?"), error)
        sha = getattr(info, "sha256", None)
    return sha or None


class EMSStore:
    """EMS files of one folder (``folder()`` is evaluated on every use, so the setting can change)."""

    def __init__(self, folder):
        self.folder = folder
        self._loaded = {}   # path -> (mtime, EMS)

    def cache(self):
        from ...stats import EMSCache

        return EMSCache(self.folder())

    def invalidate(self, *_):
        """Forget loaded EMS (on checkpoint change)."""
        self._loaded.clear()

    def has_files(self) -> bool:
        folder = self.folder()
        return os.path.isdir(folder) and any(name.endswith(".safetensors") for name in os.listdir(folder))

    @staticmethod
    def make_key(model_hash, model_kind, digest, cfg, latent_shape, N, K, reduction, sigma_min, sigma_max):
        from ...stats.cache import make_key

        return make_key(model_hash, cfg=float(cfg), guidance=GUIDANCE, reduction=reduction,
                        latent_shape=list(latent_shape), N=int(N), sigma_min=float(sigma_min),
                        sigma_max=float(sigma_max), model_kind=model_kind, K=int(K), sigma_digest=digest)

    def put(self, key, ems):
        path = self.cache().put(key, ems)
        self._loaded.pop(path, None)
        return path

    def candidates(self, model_hash, model_kind, digest, N, K, reduction, latent_shape):
        """[(key, path)] of the stored EMS matching everything but the cfg."""
        found = []
        for path, key, _ in self.cache().entries():
            if (key.get("fingerprint") == model_hash and key.get("model_kind") == model_kind
                    and key.get("sigma_digest") == digest and key.get("N") == int(N) and key.get("K") == int(K)
                    and key.get("reduction") == reduction and key.get("guidance") == GUIDANCE):
                if reduction == "per_element" and list(key.get("latent_shape", [])) != list(latent_shape):
                    continue
                found.append((key, path))
        return found

    def find(self, model_hash, model_kind, digest, cfg, N, K, reduction, latent_shape):
        """(EMS or None, description) for a generation at ``cfg``."""
        found = self.candidates(model_hash, model_kind, digest, N, K, reduction, latent_shape)
        if not found:
            return None, "none"
        key, path = min(found, key=lambda item: abs(item[0]["cfg"] - (cfg if cfg is not None else item[0]["cfg"])))
        mtime = os.path.getmtime(path)
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == mtime:
            ems = cached[1]
        else:
            ems = self.cache().get(key)
            if ems is None:
                return None, "none (unreadable file)"
            self._loaded[path] = (mtime, ems)
        ems_cfg = key["cfg"]
        if cfg is not None and (abs(cfg - ems_cfg) > CFG_TOLERANCE or cfg > CFG_HIGH):
            logger.warning("DPM-Solver-v3: EMS computed at CFG %g used at CFG %g; EMS depend on the guidance scale "
                           "(compute them at this CFG in the DPM-Solver-v3 tab for best results)", ems_cfg, cfg)
        description = f"{model_hash[:10]} cfg {ems_cfg:g} N {key['N']} K {key['K']} {reduction}"
        return ems, description

    def find_for_sampler(self, model, x, model_kind, cfg_scale, opts=None):
        """The ``Host.find_ems`` hook: EMS for the checkpoint behind the sampler's ``model``."""
        from . import registration

        if opts is None:
            from modules import shared

            opts = shared.opts
        table = registration.model_sigmas(model)
        sd_model = registration.checkpoint_of(model)
        if table is None or sd_model is None:
            return None, "none"
        if not self.has_files():
            return None, "none"
        model_hash = checkpoint_sha256(sd_model, compute=True)
        if model_hash is None:
            return None, "none (checkpoint hash unknown)"
        return self.find(model_hash, model_kind, sigma_digest(table), cfg_scale,
                         settings.get(opts, "dpm_solver_ems_grid"), settings.get(opts, "dpm_solver_ems_samples"),
                         settings.get(opts, "dpm_solver_ems_reduction"), tuple(x.shape[1:]))
