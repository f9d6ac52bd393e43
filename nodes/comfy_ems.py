"""Computing, storing and loading DPM-Solver-v3 EMS inside ComfyUI (docs/hosts.md 1.6, dpm_solver_v3.md 3).

The model is run through ComfyUI's real CFG path: a ``CFGGuider`` samples with a ``KSAMPLER`` whose function is a
probe that calls the guided denoiser freely (x0 generation, then the estimator).  Discrete models get a continuous
sigma -> timestep map for the run (an object patch on a clone) because ComfyUI's ``timestep()`` is an int64 argmin,
which would make dD/dlambda zero.  JVPs run under ``inference_mode(False)`` + ``no_grad()`` (ComfyUI executes nodes
under inference mode, where forward AD cannot save tensors); the estimator falls back to finite differences when
forward AD fails.  Moments are accumulated on the CPU and the model sees ``batch_size`` samples at a time.

Imported only inside ComfyUI.
"""
from __future__ import annotations

import copy
import logging

import torch

from ..stats.job import EMSJob
from ..stats.settings import GUIDANCE_MODES, EMSSettings, EMSTarget
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

    def __init__(self, model, positive, negative, cfg, latent_shape, seed, guidance):
        import comfy.samplers

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
        guider = self.unguided if phase == "estimate" else self.guided

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


def latent_shape_of(model, width, height):
    base = model.model
    channels = int(getattr(base.latent_format, "latent_channels", 4))
    return channels, height // 8, width // 8


def compute_or_load(model, positive, negative, cfg, width, height, grid_size, sample_count, reduction, seed,
                    x0_steps, batch_size, guidance, jvp, filename_prefix, recompute):
    """The EMS for these settings from models/dpm_solver_v3_ems (by cache key) or computed by ``stats.EMSJob`` and
    saved there (the folder is checked for writing first; a failed save keeps the EMS, see ``EMSJob.run``).

    Returns a ``stats.job.JobResult`` (ems, path, source "cached" | "computed", seconds, save_error, cost)."""
    import comfy.model_management
    import comfy.utils

    shape = latent_shape_of(model, width, height)
    settings = EMSSettings(N=int(grid_size), K=int(sample_count), reduction=reduction, seed=int(seed),
                           x0_steps=int(x0_steps), guidance=guidance, jvp=jvp)
    access = ComfyModelAccess(model, positive, negative, float(cfg), shape, int(seed), guidance)
    target = EMSTarget(model_fingerprint(model), access.kind, float(cfg), shape, access.sigma_min, access.sigma_max)
    job = EMSJob(target, settings, batch_size=int(batch_size), metadata={"host": "comfyui"})
    bar = comfy.utils.ProgressBar(1000)

    def progress(done, total):
        bar.update_absolute(int(1000 * done / total))

    def should_stop():
        comfy.model_management.throw_exception_if_processing_interrupted()  # raises on Interrupt
        return False

    return job.run(access, ems_store.store(), name_prefix=filename_prefix, recompute=recompute, progress=progress,
                   should_stop=should_stop)


__all__ = ["compute_or_load", "ComfyModelAccess", "continuous_model_sampling", "sigma_range", "GUIDANCE_MODES"]
