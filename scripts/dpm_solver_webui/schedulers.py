"""The "DPM-Solver recommended" entry of the WebUI's Schedule type list (A1111 1.10, Forge, reForge).

All three keep their schedules in ``modules/sd_schedulers.py``: a ``schedulers`` list of ``Scheduler(name, label,
function, default_rho=-1, need_inner_model=False, aliases=None)`` that the UI dropdowns, ``/sdapi/v1/schedulers`` and
the X/Y/Z grid read, and ``schedulers_map`` (by name and by label) that ``KDiffusionSampler.get_sigmas`` looks the
choice up in.  It calls ``function(n=steps, sigma_min=, sigma_max=, inner_model=<the k-diffusion model wrap>,
device=)`` with the model's (or the user's) sigma range.  ``register`` appends our entry to that list and adds it to
that map, in place and idempotently (Reload UI executes the scripts again).
"""
from __future__ import annotations

import logging
import types

from ...samplers import recommended_sigmas
from .registration import detect_model_kind

logger = logging.getLogger("dpm_solver_nodes")

NAME = "dpm_solver_recommended"
LABEL = "DPM-Solver recommended"


def recommended_scheduler(n, sigma_min, sigma_max, inner_model=None, device="cpu"):
    """``samplers.recommended_sigmas`` for the loaded model's kind (read from the model wrap, as our samplers do)."""
    kind = detect_model_kind(types.SimpleNamespace(inner_model=inner_model))
    sigma_max = min(float(sigma_max), 1.0) if kind == "flow" else float(sigma_max)
    return recommended_sigmas(int(n), float(sigma_min), sigma_max, kind).float().to(device)


def register(sd_schedulers=None):
    """Add the entry to ``sd_schedulers.schedulers`` and ``schedulers_map``; returns its label (None on a WebUI
    without ``modules/sd_schedulers.py``, before A1111 1.9, with a log line)."""
    if sd_schedulers is None:
        try:
            from modules import sd_schedulers
        except ImportError:
            logger.warning("dpm-solver-nodes: this WebUI has no modules/sd_schedulers.py; the '%s' schedule type "
                           "is not added", LABEL)
            return None
    entry = next((s for s in sd_schedulers.schedulers if s.name == NAME), None)
    if entry is None:
        entry = sd_schedulers.Scheduler(NAME, LABEL, recommended_scheduler, need_inner_model=True)
        sd_schedulers.schedulers.append(entry)
    sd_schedulers.schedulers_map[NAME] = entry
    sd_schedulers.schedulers_map[LABEL] = entry
    return LABEL


__all__ = ["NAME", "LABEL", "recommended_scheduler", "register"]
