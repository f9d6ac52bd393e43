"""ComfyUI scheduler entry: ``dpm_solver_recommended`` in the KSampler / BasicScheduler ``scheduler`` list, and the
function behind the *DPM-Solver recommended sigmas* node.  Both are ``samplers.recommended_sigmas`` for the sampled
model's kind and sigma range (read from its ``model_sampling``).

ComfyUI (comfy/samplers.py, v0.3.x) resolves a scheduler name through ``SCHEDULER_HANDLERS[name]`` (a
``SchedulerHandler(fn, use_ms)``; ``use_ms=True`` calls ``fn(model_sampling, steps)``) and lists the names in
``SCHEDULER_NAMES``, the list object ``KSampler.SCHEDULERS`` and the BasicScheduler node show.  Registration adds
to that dict and appends to that list in place, idempotently, like the dropdown samplers (comfy_sampling.py).
Importable without ComfyUI (tests pass stand-ins of the host modules).
"""
from __future__ import annotations

import logging

from ..samplers import recommended_sigmas
from .model_kind import detect_model_kind

logger = logging.getLogger("dpm_solver_nodes")

SCHEDULER_NAME = "dpm_solver_recommended"


def model_range(model_sampling, parameterizations=None):
    """(model_kind, sigma_min, sigma_max) of a ComfyUI ``model_sampling``; flow models start at sigma <= 1."""
    kind = detect_model_kind(model_sampling, parameterizations)
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if kind == "flow":
        sigma_max = min(sigma_max, 1.0)
    return kind, sigma_min, sigma_max


def recommended_for_model(model_sampling, steps, parameterizations=None):
    """The scheduler handler: ``steps`` + 1 float32 sigmas (trailing 0) for the model, as ComfyUI's handlers return."""
    kind, sigma_min, sigma_max = model_range(model_sampling, parameterizations)
    return recommended_sigmas(int(steps), sigma_min, sigma_max, kind).float()


def sigmas_for_node(model_sampling, steps, denoise=1.0, sigma_min=0.0, sigma_max=0.0, parameterizations=None):
    """The SIGMAS node: recommended sigmas for ``steps`` steps.  ``sigma_min`` / ``sigma_max`` of 0 mean the model's.
    ``denoise`` < 1 (img2img) takes the last ``steps`` + 1 sigmas of a ``steps / denoise``-step schedule, as
    ComfyUI's BasicScheduler does; 0 returns no sigmas."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must lie in [0, 1], got {denoise!r}")
    if denoise == 0.0:
        import torch

        return torch.zeros(0)
    kind, model_min, model_max = model_range(model_sampling, parameterizations)
    lo = float(sigma_min) if sigma_min > 0 else model_min
    hi = float(sigma_max) if sigma_max > 0 else model_max
    total = int(steps / denoise) if denoise < 1.0 else int(steps)
    return recommended_sigmas(total, lo, hi, kind).float()[-(int(steps) + 1):]


def register_scheduler(comfy_samplers=None):
    """Add ``dpm_solver_recommended`` to ComfyUI's scheduler handlers and names, in place and idempotently (never a
    module reload, never a rebound list).  Returns the registered names (empty on a ComfyUI without
    ``SCHEDULER_HANDLERS``, which then keeps its own list, with a log line)."""
    if comfy_samplers is None:
        import comfy.samplers as comfy_samplers
    handlers = getattr(comfy_samplers, "SCHEDULER_HANDLERS", None)
    handler_class = getattr(comfy_samplers, "SchedulerHandler", None)
    if handlers is None or handler_class is None:
        logger.warning("dpm_solver_nodes: this ComfyUI has no SCHEDULER_HANDLERS; the '%s' scheduler is not added "
                       "(use the 'DPM-Solver recommended sigmas' node)", SCHEDULER_NAME)
        return []
    if SCHEDULER_NAME not in handlers:
        handlers[SCHEDULER_NAME] = handler_class(recommended_for_model, use_ms=True)
    names = comfy_samplers.SCHEDULER_NAMES
    if SCHEDULER_NAME not in names:
        names.append(SCHEDULER_NAME)
    ksampler = getattr(comfy_samplers, "KSampler", None)
    listed = getattr(ksampler, "SCHEDULERS", None)
    if listed is not None and listed is not names and SCHEDULER_NAME not in listed:
        listed.append(SCHEDULER_NAME)
    return [SCHEDULER_NAME]


__all__ = ["SCHEDULER_NAME", "model_range", "recommended_for_model", "sigmas_for_node", "register_scheduler"]
