"""Host-free DPM-Solver family samplers with the k-diffusion signature.

Every sampler is ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`` where
``model(x, sigma * s_in, **extra_args)`` returns the denoised x0, and accepts ``model_kind="eps"|"flow"``.
"""
from .schedule import MODEL_KINDS, FlowSchedule, NoiseSchedule, StepTable, VarianceExplodingSchedule, noise_schedule
from .common import NonFiniteError, SamplerRun, dynamic_threshold
from .dpmpp import sample_dpmpp_2m, sample_dpmpp_2s, sample_dpmpp_3m
from .dpm_solver import sample_dpm_solver, sample_dpm_solver_adaptive
from .sde import (sample_dpm_solver_sde_1, sample_dpm_solver_sde_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde,
                  sample_dpmpp_sde_1)
from .baselines import sample_consistency, sample_ddim, sample_ddpm, sample_pndm
from .unipc import sample_unipc
from .v3 import sample_dpm_solver_v3
from .sigmas import SCHEDULES, make_sigmas, recommended_sigmas
from .noise import NOISE_TYPES

SAMPLERS = {
    "dpm_solver": sample_dpm_solver,
    "dpm_solver_adaptive": sample_dpm_solver_adaptive,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_sde_1": sample_dpmpp_sde_1,
    "dpm_solver_sde_1": sample_dpm_solver_sde_1,
    "dpm_solver_sde_2m": sample_dpm_solver_sde_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "pndm": sample_pndm,
    "consistency": sample_consistency,
    "dpm_solver_v3": sample_dpm_solver_v3,
    "unipc": sample_unipc,
}

__all__ = ["SAMPLERS", "MODEL_KINDS", "NoiseSchedule", "VarianceExplodingSchedule", "FlowSchedule",
           "StepTable", "noise_schedule", "NonFiniteError", "SamplerRun", "dynamic_threshold", "SCHEDULES", "make_sigmas",
           "recommended_sigmas", "NOISE_TYPES"] + [
    f"sample_{name}" for name in SAMPLERS]
