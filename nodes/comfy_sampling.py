"""ComfyUI sampler functions over ``samplers``: model-kind detection at call time, the v3 EMS lookup, and the
KSampler / KSamplerSelect dropdown entries (docs/hosts.md 1.2-1.3).

Imported only inside ComfyUI.
"""
from __future__ import annotations

import logging
import math

from .. import samplers as library
from .model_kind import find_attribute, model_kind_of_sampler_model
from .options import DROPDOWN_SAMPLERS

logger = logging.getLogger("dpm_solver_nodes")

_logged_once = set()


def log_once(key, level, message, *args):
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.log(level, message, *args)


def comfy_sampler_function(name):
    """``fn(model, x, sigmas, extra_args, callback, disable, **options)`` for ComfyUI's KSAMPLER: reads
    ``model_kind`` from the sampled model's model_sampling, then calls ``samplers.SAMPLERS[name]``."""
    if name == "dpm_solver_v3":
        return sample_dpm_solver_v3
    function = library.SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        kind = model_kind_of_sampler_model(model)
        return function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                        model_kind=kind, **options)

    sample.__name__ = f"sample_{name}"
    sample.__doc__ = function.__doc__
    return sample


# ---- DPM-Solver-v3: EMS of the model being sampled ----------------------------------------------------------------

def find_cached_ems(model, kind, x=None):
    """The EMS stored for the model a sampler is running (``stats.EMSStore.find``: by fingerprint, nearest cfg,
    per-element files only at their latent shape), or None.  The store keeps loaded EMS in memory, so repeated
    generations get the same object and v3 reuses its step plan; bad files are skipped with one log line."""
    from . import ems_store
    from .fingerprint import model_fingerprint

    patcher = find_attribute(model, "model_patcher")
    if patcher is None:
        log_once(("no-patcher",), logging.WARNING,
                 "DPM-Solver-v3: cannot identify the sampled model (no model_patcher); using the degenerate EMS")
        return None
    fingerprint = model_fingerprint(patcher)
    cfg = find_attribute(model, "cfg")
    ems, path = ems_store.store().find(fingerprint, kind, cfg=cfg,
                                       latent_shape=None if x is None else tuple(x.shape[1:]))
    if ems is None:
        log_once(("missing", fingerprint), logging.WARNING,
                 "DPM-Solver-v3: no EMS stored for this model (fingerprint %s) in models/%s; sampling with the "
                 "degenerate EMS (l = 1, s = b = 0, equivalent to DPM-Solver++). Compute them once with the "
                 "'DPM-Solver-v3 EMS compute' node (DPMSolverNodes_ComputeEMS).",
                 fingerprint[:16], ems_store.FOLDER_NAME)
        return None
    ems_cfg = ems.metadata.get("cfg")
    differs = cfg is not None and ems_cfg is not None and not math.isclose(float(ems_cfg), float(cfg), rel_tol=1e-6)
    if differs:
        log_once(("cfg", path, float(cfg)), logging.WARNING,
                 "DPM-Solver-v3: EMS %s were computed at cfg %s, sampling at cfg %s; EMS depend on the guidance "
                 "scale, compute them at this cfg for the best result", path, ems_cfg, cfg)
    else:
        log_once(("using", path), logging.INFO, "DPM-Solver-v3: using EMS %s", path)
    return ems


def _check_ems_model(model, ems):
    """Warn once when EMS wired into the node were computed for another model (LoRA, other checkpoint, shift)."""
    from .fingerprint import model_fingerprint

    expected = ems.metadata.get("fingerprint")
    patcher = find_attribute(model, "model_patcher")
    if expected is None or patcher is None:
        return
    actual = model_fingerprint(patcher)
    if actual != expected:
        log_once(("other-model", expected, actual), logging.WARNING,
                 "DPM-Solver-v3: the EMS input was computed for another model (fingerprint %s, sampling %s: other "
                 "weights, LoRA or model-sampling patch); EMS must match the model to help",
                 expected[:16], actual[:16])


def what_v3_runs(ems, steps, fallback=True, sigmas=None, model_kind=None):
    """(text, warn): which solver ``samplers.sample_dpm_solver_v3`` runs at ``steps`` steps with ``ems`` (its
    fallback rule: the stored decision for the nearest NFE), and whether that deserves a warning (no EMS, a
    decision that sends this step count to another solver: DPM-Solver++(2M)/(3M) or UniPC, or ``sigmas`` that are
    not the spacing the decision was measured on: ``ems_data.spacing_note``)."""
    from ..samplers.ems_data import SOLVER_NAMES, spacing_note

    if ems is None:
        return ("DPM-Solver-v3 without EMS: l = 1, s = b = 0 (DPM-Solver++ with the v3 corrector); compute EMS for this "
                "model with the 'DPM-Solver-v3 EMS compute' node", True)
    decision = ems.decision_for(steps) if fallback else None
    note = spacing_note(sigmas, model_kind) if decision is not None and sigmas is not None and model_kind else None
    note = f"; {note}" if note else ""
    if decision is not None and decision.solver != "v3":
        return (f"DPM-Solver-v3 ran {SOLVER_NAMES[decision.solver]} at {steps} steps: the EMS tuning measured it "
                f"better than v3 at {decision.nfe} steps (EMS: {ems.decision_summary()}){note}", True)
    measured = (f" (measured at {decision.nfe} steps: {decision.ratio:.2f}x the error of the best other solver "
                f"measured)" if decision is not None else "")
    return f"DPM-Solver-v3 with EMS at {steps} steps{measured}{note}", bool(note)


def sample_dpm_solver_v3(model, x, sigmas, extra_args=None, callback=None, disable=None, ems=None, **options):
    """DPM-Solver-v3 for ComfyUI: ``ems`` given (node input) or the EMS cached for the sampled model, else the
    degenerate EMS.  Which solver actually runs (v3, or DPM-Solver++ where the EMS's decision says so, or v3 without
    EMS) is shown on the sampling node and, where it is not v3 with EMS, logged as a warning once per EMS and step
    count."""
    from .comfy_ems import show_text

    kind = model_kind_of_sampler_model(model)
    if ems is None:
        ems = find_cached_ems(model, kind, x)
    else:
        _check_ems_model(model, ems)
    steps = len(sigmas) - 1
    text, warn = what_v3_runs(ems, steps, options.get("fallback", True), sigmas, kind)
    if warn:
        log_once(("v3-runs", id(ems), steps), logging.WARNING, "%s", text)
    show_text(text)
    return library.sample_dpm_solver_v3(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                        ems=ems, model_kind=kind, **options)


# ---- KSampler dropdown -------------------------------------------------------------------------------------------

def _dropdown_function(sampler, fixed):
    function = comfy_sampler_function(sampler)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                        **{**fixed, **options})

    return sample


def register_dropdown_samplers(comfy_samplers=None, k_diffusion_sampling=None):
    """Add the DROPDOWN_SAMPLERS entries to KSampler/KSamplerSelect: ``sample_<name>`` on
    comfy.k_diffusion.sampling (which ``ksampler(name)`` resolves) and the names appended in place to
    KSAMPLER_NAMES and SAMPLER_NAMES (KSampler.SAMPLERS is the same list object).  Idempotent; never reloads a
    module and never rebinds a list (docs/hosts.md 1.3)."""
    if comfy_samplers is None:
        import comfy.samplers as comfy_samplers
    if k_diffusion_sampling is None:
        import comfy.k_diffusion.sampling as k_diffusion_sampling
    for name, (sampler, fixed) in DROPDOWN_SAMPLERS.items():
        setattr(k_diffusion_sampling, "sample_" + name, _dropdown_function(sampler, fixed))
        for names in (comfy_samplers.KSAMPLER_NAMES, comfy_samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
    return list(DROPDOWN_SAMPLERS)


__all__ = ["comfy_sampler_function", "sample_dpm_solver_v3", "register_dropdown_samplers", "find_cached_ems",
           "what_v3_runs"]
