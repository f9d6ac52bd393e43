"""Computing, storing and loading DPM-Solver-v3 EMS inside ComfyUI (docs/hosts.md 1.6, dpm_solver_v3.md 3).

The model is run through ComfyUI's real CFG path: a ``CFGGuider`` samples with a ``KSAMPLER`` whose function is a
probe that calls the guided denoiser freely (x0 generation, the estimator, the tuning).  Discrete models get a
continuous sigma -> timestep map for the run (an object patch on a clone) because ComfyUI's ``timestep()`` is an
int64 argmin, which would make dD/dlambda zero.  The derivatives are one-sided differences where the network computes
in float32 (ComfyUI on a CPU), else forward-AD JVPs under ``inference_mode(False)`` + ``no_grad()`` (ComfyUI
executes nodes under inference mode, where forward AD cannot save tensors), falling back to central differences when
forward AD fails.  The model sees ``batch_size`` samples per call (0: as many as ComfyUI's memory estimate allows);
the tuning's sampler runs go through it together (``stats.tuning.Lockstep``: ComfyUI's conditioning is broadcast to
any batch).  The node shows the phase and the time left as it runs, and afterwards what it did and which solver
DPM-Solver-v3 runs with the EMS at which step count (``outcome_text``).

Imported only inside ComfyUI.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

from ..stats.job import EMSJob
from ..stats.settings import GUIDANCE_MODES, EMSKey, EMSSettings, EMSTarget
from . import ems_store
from .fingerprint import model_fingerprint
from .model_kind import detect_model_kind

logger = logging.getLogger("dpm_solver_nodes")


# ---- continuous timesteps for discrete models ---------------------------------------------------------------------

def _fractional_timestep(self, sigma):
    """The inverse of ModelSamplingDiscrete.sigma(): a fractional index, linear in log sigma between table entries
    (instead of the nearest index)."""
    log_sigmas = self.log_sigmas
    log_sigma = sigma.log().to(log_sigmas.device, log_sigmas.dtype).clamp(log_sigmas[0], log_sigmas[-1])
    upper = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, log_sigmas.shape[0] - 1)
    lower = upper - 1
    weight = (log_sigma.reshape(-1) - log_sigmas[lower]) / (log_sigmas[upper] - log_sigmas[lower])
    return (lower + weight).reshape(sigma.shape).to(sigma.device)


def continuous_model_sampling(model_sampling):
    """A shallow copy of a ModelSamplingDiscrete whose ``timestep`` interpolates, or None when the model's timestep
    map is already continuous (flow, EDM, ...)."""
    from comfy.model_sampling import ModelSamplingDiscrete

    cls = type(model_sampling)
    if getattr(cls, "timestep", None) is not ModelSamplingDiscrete.timestep:
        return None
    patched_cls = type("Continuous" + cls.__name__, (cls,), {"timestep": _fractional_timestep})
    patched = copy.copy(model_sampling)
    patched.__class__ = patched_cls
    return patched


def sigma_range(model_sampling, kind):
    """(sigma_min, sigma_max) of the EMS grid: the model's own range, a flow model's sigma = 1 moved to the
    percent_to_sigma(1e-4) point ComfyUI itself uses (lambda = -inf has no EMS)."""
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if kind == "flow" and sigma_max >= 1.0:
        sigma_max = float(model_sampling.percent_to_sigma(1e-4))
        if not sigma_max < 1.0:
            sigma_max = 0.9999
    return sigma_min, sigma_max


# ---- the EMS job through ComfyUI's model path ---------------------------------------------------------------------

class ComfyModelAccess:
    """``stats.job``'s model access: every phase runs inside a ``CFGGuider.sample`` whose sampler is a probe, so the
    model is loaded, patched and guided exactly as for an image.  "estimate" uses the negative-prompt network at
    cfg 1 when ``guidance="uncond"``; "estimate" and "check" run with inference mode off (forward AD)."""

    rows_independent = True  # conditioning is broadcast to any batch and sigma is per row (calc_cond_batch)

    def __init__(self, model, positive, negative, cfg, latent_shape, seed, guidance):
        import comfy.samplers

        self.network_dtype = network_dtype(model)
        model_sampling = model.get_model_object("model_sampling")
        self.kind = detect_model_kind(model_sampling)
        self.sigma_min, self.sigma_max = sigma_range(model_sampling, self.kind)
        patched = model.clone()
        continuous = continuous_model_sampling(model_sampling)
        if continuous is not None:
            patched.add_object_patch("model_sampling", continuous)
        self.guided = comfy.samplers.CFGGuider(patched)
        self.guided.set_conds(positive, negative)
        self.guided.set_cfg(cfg)
        self.unguided = self.guided
        if guidance == "uncond":  # the paper's reading (App. J.2): EMS of the unguided network on cfg-guided data
            self.unguided = comfy.samplers.CFGGuider(patched)
            self.unguided.set_conds(negative, negative)
            self.unguided.set_cfg(1.0)
        self.sigmas = torch.tensor([float(model_sampling.sigma_max), self.sigma_min], dtype=torch.float32)
        self.latent_shape, self.seed = tuple(latent_shape), seed

    def run(self, phase, work):
        guider = self.unguided if phase == "estimate" else self.guided  # the tuning measures the guided ODE

        def probe(model, x, extra_args):
            if phase == "x0":
                return work(model, extra_args, x.device)
            with torch.inference_mode(False), torch.no_grad():
                return work(model, extra_args, x.device)

        return _run_probe(guider, self.latent_shape, self.sigmas, self.seed, probe)


def _run_probe(guider, latent_shape, sigmas, seed, probe):
    """Run ``probe(model, x, extra_args)`` inside ``guider.sample`` with ComfyUI's real model/CFG path."""
    import comfy.samplers

    result = {}

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        result["value"] = probe(model, x, extra_args or {})
        return x

    latent = torch.zeros((1,) + tuple(latent_shape))
    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                  disable_pbar=True, seed=seed % (2 ** 64))
    return result["value"]


def network_dtype(model):
    """The dtype the diffusion model computes in (its manual-cast dtype where the weights are stored in another), or
    None where the patcher does not say."""
    base = getattr(model, "model", None)
    try:
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    except AttributeError:
        return None
    return dtype if isinstance(dtype, torch.dtype) else None


AUTO_BATCH_LIMIT = 64
MEMORY_MARGIN = 1.5  # ComfyUI's own margin on memory_required when it batches cond and uncond


def auto_batch_size(model, latent_shape, cfg, backend):
    """Samples per model call for batch_size 0: the largest power of two up to 64 whose rows (two per sample under
    CFG) fit in the free memory of the model's device by ComfyUI's own estimate (``memory_required``), three times
    over for forward AD's primal + tangent activations; 1 where the estimate is unavailable.  Not capped at K: the
    tuning's runs share calls beyond it (``stats.tuning.Lockstep``)."""
    import comfy.model_management

    limit = AUTO_BATCH_LIMIT
    try:
        comfy.model_management.load_models_gpu([model])
        free = comfy.model_management.get_free_memory(model.load_device)
        per_row = model.model.memory_required([1] + list(latent_shape))
    except Exception as error:  # noqa: BLE001 - an older or patched ComfyUI: fall back to one sample per call
        logger.warning("DPM-Solver-v3 EMS: cannot estimate the memory per sample (%s); using batch size 1", error)
        return 1
    rows_per_sample = (2 if cfg != 1.0 else 1) * (1 if backend.endswith("difference") else 3)
    batch = 1
    while batch * 2 <= limit and 2 * batch * rows_per_sample * per_row * MEMORY_MARGIN <= free:
        batch *= 2
    return batch


def latent_shape_of(model, width, height):
    base = model.model
    channels = int(getattr(base.latent_format, "latent_channels", 4))
    return channels, height // 8, width // 8


def compute_or_load(model, positive, negative, cfg, width, height, grid_size, sample_count, reduction, seed,
                    x0_steps, batch_size, guidance, jvp, filename_prefix, recompute, node_id=None):
    """The EMS for these settings from models/dpm_solver_v3_ems (by cache key) or computed by ``stats.EMSJob`` and
    saved there (the folder is checked for writing first; a failed save keeps the EMS, see ``EMSJob.run``).
    ``batch_size`` 0 picks it from the free memory (``auto_batch_size``).  While it computes, the node's progress bar
    counts model rows and its text (ComfyUI's progress text, ``node_id``: the executing node by default) says the
    phase and the time left, measured on the first chunks.

    Returns a ``stats.job.JobResult`` (ems, path, source "cached" | "computed", seconds, save_error, cost, phases)."""
    import comfy.model_management
    import comfy.utils

    from ..stats.job import resolve_jvp

    shape = latent_shape_of(model, width, height)
    settings = EMSSettings(N=int(grid_size), K=int(sample_count), reduction=reduction, seed=int(seed),
                           x0_steps=int(x0_steps), guidance=guidance, jvp=jvp)
    access = ComfyModelAccess(model, positive, negative, float(cfg), shape, int(seed), guidance)
    target = EMSTarget(model_fingerprint(model), access.kind, float(cfg), shape, access.sigma_min, access.sigma_max)
    batch = int(batch_size)
    if batch == 0:
        cached = ems_store.store().get(EMSKey(target, settings))[0] is not None and not recompute
        batch = 1 if cached else auto_batch_size(model, shape, float(cfg),
                                                 resolve_jvp(settings.jvp, access.network_dtype))
        if not cached:
            logger.info("DPM-Solver-v3 EMS: batch size 0 (auto): %d samples per model call", batch)
    job = EMSJob(target, settings, batch_size=batch, metadata={"host": "comfyui"})
    node_id = node_id if node_id is not None else executing_node_id()
    try:  # the node named: the estimation may report from a worker thread (stats.tuning.Lockstep)
        bar = comfy.utils.ProgressBar(1000, node_id=node_id)
    except TypeError:  # ComfyUI before node_id
        bar = comfy.utils.ProgressBar(1000)

    def progress(done, total):
        bar.update_absolute(int(1000 * done / total))

    def should_stop():
        comfy.model_management.throw_exception_if_processing_interrupted()  # raises on Interrupt
        return False

    def status(text):
        show_text(text, node_id)

    return job.run(access, ems_store.store(), name_prefix=filename_prefix, recompute=recompute, progress=progress,
                   should_stop=should_stop, status=status)


def executing_node_id():
    """The id of the node ComfyUI is executing (None outside an execution or in an older ComfyUI)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else context.node_id


def show_text(text, node_id=None):
    """Show ``text`` on the node in the browser (ComfyUI's progress text, frontend 1.2x+); a no-op where that is
    unavailable.  The text is also logged at debug level."""
    logger.debug("%s", text)
    node_id = node_id if node_id is not None else executing_node_id()
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def outcome_text(result):
    """What the EMS node tells its user: which solver DPM-Solver-v3 runs with these EMS at which step count
    (``EMSData.decision_summary``), then where the EMS come from and what the computation cost
    (``outcome_head``)."""
    text = f"DPM-Solver-v3 with these EMS: {result.ems.decision_summary()}.\n{outcome_head(result)}"
    if result.save_error:
        text += f"\nSaving failed: {result.save_error}"
    return text


def outcome_head(result):
    """Where the EMS come from, what each phase took, and how the decisions were made, in one line."""
    from ..stats.job import format_seconds

    ems = result.ems
    name = os.path.basename(result.path) if result.path else "not saved"
    if result.source == "cached":
        head = f"EMS loaded from {name} (computed earlier with these settings)."
    else:
        phases = result.phases or {}
        spent = ", ".join(f"{PHASE_NAMES.get(phase, phase)} {format_seconds(v['seconds'])}"
                          for phase, v in phases.items())
        rows = sum(v["rows"] for v in phases.values())
        head = (f"EMS computed in {format_seconds(result.seconds)} ({rows:,} model rows: {spent}); "
                f"saved as {name}.")
    tuning = ems.metadata.get("tuning")
    how = ""
    if tuning:
        import json

        summary = json.loads(tuning)
        how = (f" Tuned on {summary.get('samples_per_set', '?')} + {summary.get('samples_per_set', '?')} fresh "
               f"samples: fit {summary.get('fit', '?')}.")
    elif ems.metadata.get("v3_check") == "skipped":
        how = " Not tuned or checked (the check was turned off: check_samples=0); v3 runs unverified."
    elif ems.metadata.get("v3_check_samples"):
        how = f" Checked against DPM-Solver++(2M) on {ems.metadata['v3_check_samples']} samples (not tuned)."
    return head + how


PHASE_NAMES = {"x0": "samples", "estimate": "statistics", "tune": "tuning", "check": "check"}


__all__ = ["compute_or_load", "ComfyModelAccess", "continuous_model_sampling", "sigma_range", "GUIDANCE_MODES",
           "auto_batch_size", "network_dtype", "outcome_text", "outcome_head", "show_text", "executing_node_id"]
