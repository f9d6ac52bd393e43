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
import os
import time

import torch

from . import ems_store
from .ems_store import FOLDER_NAME, EMSIndex
from .fingerprint import model_fingerprint
from .model_kind import detect_model_kind

logger = logging.getLogger("dpm_solver_nodes")

GUIDANCE_MODES = ("guided", "uncond")
_INDEX = None
CHECK_SAMPLES = 16  # reference trajectories for the v3-vs-DPM-Solver++(2M) check (samples * (steps + 128) rows)
CHECK_STEPS = 100  # DPM-Solver++(2M) steps of those references


def index() -> EMSIndex:
    global _INDEX
    if _INDEX is None:
        import folder_paths

        _INDEX = EMSIndex(lambda: folder_paths.get_folder_paths(FOLDER_NAME))
    return _INDEX


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


# ---- estimation ---------------------------------------------------------------------------------------------------

class _Progress:
    """ComfyUI progress bar over both phases (x0 generation ~ 1/4, estimation ~ 3/4) + Interrupt checks."""

    def __init__(self, generation_rows, estimation_rows):
        import comfy.model_management
        import comfy.utils

        self._interrupt = comfy.model_management.throw_exception_if_processing_interrupted
        self.generation_rows = max(generation_rows, 1)
        self.bar = comfy.utils.ProgressBar(1000)
        self.rows = 0

    def generation(self, rows):
        self._interrupt()
        self.rows += rows
        self.bar.update_absolute(min(250, int(250 * self.rows / self.generation_rows)))

    def estimation(self, done, total):
        self._interrupt()
        self.bar.update_absolute(250 + int(750 * done / max(total, 1)))


def _counting(model, progress):
    def call(x, sigma, **kwargs):
        progress.generation(x.shape[0])
        return model(x, sigma, **kwargs)

    return call


def _run_probe(guider, latent_shape, sigmas, seed, probe):
    """Run ``probe(model, x, extra_args)`` inside ``guider.sample`` with ComfyUI's real model/CFG path."""
    import comfy.samplers

    result = {}

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        result["value"] = probe(model, x, extra_args or {})
        return x

    latent = torch.zeros((1,) + tuple(latent_shape))
    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                  disable_pbar=True, seed=seed)
    return result["value"]


def compute_ems(model, positive, negative, cfg, latent_shape, *, N, K, reduction, seed, x0_steps, batch_size,
                guidance, jvp, metadata):
    """Generate K latents at ``cfg`` with the model itself and estimate its EMS (see the module docstring)."""
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    kind = detect_model_kind(model_sampling)
    sigma_min, sigma_max = sigma_range(model_sampling, kind)
    patched = model.clone()
    continuous = continuous_model_sampling(model_sampling)
    if continuous is not None:
        patched.add_object_patch("model_sampling", continuous)

    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sigmas = torch.tensor([float(model_sampling.sigma_max), sigma_min], dtype=torch.float32)
    rows_generation = K * (x0_steps + 1) * (2 if cfg != 1.0 else 1)
    progress = _Progress(rows_generation, (N + 1) * K)

    from ..stats.estimate import RECOMMENDED_SETTINGS, check_v3_against_dpmpp_2m, estimate_ems, generate_x0

    def generate(denoiser, x, extra_args):
        return generate_x0(_counting(denoiser, progress), tuple(latent_shape), K, float(model_sampling.sigma_max),
                           sigma_min, kind, steps=x0_steps, seed=seed, extra_args=extra_args,
                           batch_size=batch_size, dtype=torch.float32, device=x.device).cpu()

    started = time.perf_counter()
    x0 = _run_probe(guider, latent_shape, sigmas, seed, generate)
    generation_seconds = time.perf_counter() - started

    guided = guider
    if guidance == "uncond":  # the paper's reading (App. J.2): EMS of the unguided network on cfg-guided data
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(negative, negative)
        guider.set_cfg(1.0)

    def estimate(denoiser, x, extra_args):
        with torch.inference_mode(False), torch.no_grad():
            data = x0.clone().to(x.device, torch.float32)
            return estimate_ems(denoiser, data, sigma_min, sigma_max, model_kind=kind, N=N, K=K,
                                reduction=reduction, sb_window=RECOMMENDED_SETTINGS["sb_window"],
                                s_ridge=RECOMMENDED_SETTINGS["s_ridge"], jvp=jvp, batch_size=batch_size, seed=seed,
                                extra_args=extra_args, progress=progress.estimation,
                                metadata={**metadata, "x0_seconds": f"{generation_seconds:.1f}"})

    ems = _run_probe(guider, latent_shape, sigmas, seed, estimate)

    def check(denoiser, x, extra_args):  # the data of v3's automatic fallback, on the guided model that samples
        with torch.inference_mode(False), torch.no_grad():
            return check_v3_against_dpmpp_2m(denoiser, ems, tuple(latent_shape), sigma_min, sigma_max, seed=seed,
                                             steps=CHECK_STEPS, samples=min(K, CHECK_SAMPLES), model_kind=kind,
                                             extra_args=extra_args, batch_size=batch_size, device=x.device)

    return _run_probe(guided, latent_shape, sigmas, seed, check)


def latent_shape_of(model, width, height):
    base = model.model
    channels = int(getattr(base.latent_format, "latent_channels", 4))
    return channels, height // 8, width // 8


def compute_or_load(model, positive, negative, cfg, width, height, grid_size, sample_count, reduction, seed,
                    x0_steps, batch_size, guidance, jvp, filename_prefix, recompute):
    """The EMS for these settings from models/dpm_solver_v3_ems (by cache key) or freshly computed and saved.

    Returns (ems, path, "cached" | "computed", seconds)."""
    from ..stats import load_ems

    started = time.perf_counter()
    kind = detect_model_kind(model.get_model_object("model_sampling"))
    fingerprint = model_fingerprint(model)
    shape = latent_shape_of(model, width, height)
    settings = {"fingerprint": fingerprint, "cfg": float(cfg), "guidance": guidance, "reduction": reduction,
                "N": int(grid_size), "K": int(sample_count), "x0_steps": int(x0_steps), "seed": int(seed),
                "jvp": jvp, "latent_shape": list(shape) if reduction == "per_element" else [shape[0]]}
    key = ems_store.cache_key(settings)
    path = None if recompute else index().by_cache_key(key)
    if path is not None:
        try:
            ems = load_ems(path, expect={"fingerprint": fingerprint, "model_kind": kind})
            logger.info("DPM-Solver-v3: EMS loaded from %s", path)
            return ems, path, "cached", time.perf_counter() - started
        except ValueError as error:
            logger.warning("DPM-Solver-v3: cached EMS %s unusable (%s); recomputing", path, error)
    metadata = {"fingerprint": fingerprint, "cache_key": key, "cfg": repr(float(cfg)), "guidance": guidance,
                "model_kind": kind, "x0_source": f"model samples, dpmpp_2m {int(x0_steps)} steps at this cfg",
                "x0_steps": str(int(x0_steps)), "host": "comfyui"}
    logger.info("DPM-Solver-v3: computing EMS (N=%d, K=%d, %s, cfg %s) for model %s", grid_size, sample_count,
                reduction, cfg, fingerprint[:16])
    ems = compute_ems(model, positive, negative, float(cfg), shape, N=int(grid_size), K=int(sample_count),
                      reduction=reduction, seed=int(seed), x0_steps=int(x0_steps), batch_size=int(batch_size),
                      guidance=guidance, jvp=jvp, metadata=metadata)
    import folder_paths

    path = os.path.join(ems_store.write_folder(folder_paths), ems_store.file_name(filename_prefix, key))
    ems.save(path)
    seconds = time.perf_counter() - started
    logger.info("DPM-Solver-v3: EMS saved to %s (%.1f s)", path, seconds)
    return ems, path, "computed", seconds


__all__ = ["compute_or_load", "compute_ems", "continuous_model_sampling", "sigma_range", "index", "GUIDANCE_MODES"]
