"""Per-checkpoint DPM-Solver-v3 EMS in the WebUI: the checkpoint's identity and the sampler's lookup, over the one
``stats.EMSStore`` (keys, validation, in-memory EMS, symlink-safe listing; see stats/store.py).

Identity: the checkpoint's sha256 (``sd_checkpoint_info.sha256``; computed once, and cached by the WebUI, when it
is unknown, e.g. under ``--no-hashing``), the model kind, and ``stats.sigma_digest`` of the model's sigma table
(covers v-prediction/ZTSNR rescaling and flow shift).  EMS belong to the base checkpoint: LoRAs applied later do not
change the key.  A generation uses the file with the current EMS settings (grid size N, sample count K,
reduction; Settings -> DPM-Solver) whose cfg is nearest its own (logged when they differ by more than 1 or the cfg
is above 12), a per-element file only at its own latent shape.  Loaded EMS stay in memory until the checkpoint
changes (``on_model_loaded`` -> ``invalidate``) or the file changes.
"""
from __future__ import annotations

import logging

from ...stats.fingerprint import sigma_digest
from ...stats.store import EMSStore as _Store
from . import settings

logger = logging.getLogger("dpm_solver_nodes")

CFG_TOLERANCE = 1.0
CFG_HIGH = 12.0


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


class EMSStore(_Store):
    """``stats.EMSStore`` over one folder (``folder()`` is evaluated on every use, so the setting can change), plus
    the WebUI's lookup for a generation."""

    def __init__(self, folder):
        super().__init__(lambda: [folder()])

    def find_for_generation(self, model_hash, model_kind, digest, cfg, N, K, reduction, latent_shape):
        """(EMS or None, description for the infotext) for a generation at ``cfg``."""
        ems, path = self.find(model_hash, model_kind, cfg=cfg, latent_shape=latent_shape, sigma_digest=digest,
                              where={"N": int(N), "K": int(K), "reduction": reduction})
        if ems is None:
            return None, "none"
        ems_cfg = float(ems.metadata.get("cfg", "nan"))
        if cfg is not None and (abs(cfg - ems_cfg) > CFG_TOLERANCE or cfg > CFG_HIGH):
            logger.warning("DPM-Solver-v3: EMS computed at CFG %g used at CFG %g; EMS depend on the guidance scale "
                           "(compute them at this CFG in the DPM-Solver-v3 tab for best results)", ems_cfg, cfg)
        return ems, f"{model_hash[:10]} cfg {ems_cfg:g} N {int(N)} K {int(K)} {reduction}"

    def find_for_sampler(self, model, x, model_kind, cfg_scale, opts=None):
        """The ``Host.find_ems`` hook: EMS for the checkpoint behind the sampler's ``model``."""
        from . import registration

        if opts is None:
            from modules import shared

            opts = shared.opts
        table = registration.model_sigmas(model)
        sd_model = registration.checkpoint_of(model)
        if table is None or sd_model is None or not self.files():
            return None, "none"
        model_hash = checkpoint_sha256(sd_model, compute=True)
        if model_hash is None:
            return None, "none (checkpoint hash unknown)"
        return self.find_for_generation(model_hash, model_kind, sigma_digest(table), cfg_scale,
                                        settings.get(opts, "dpm_solver_ems_grid"),
                                        settings.get(opts, "dpm_solver_ems_samples"),
                                        settings.get(opts, "dpm_solver_ems_reduction"), tuple(x.shape[1:]))


__all__ = ["EMSStore", "checkpoint_sha256", "sigma_digest"]
