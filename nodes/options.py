"""Host-free description of the ComfyUI sampler nodes and KSampler dropdown entries: their widgets and how widget
values map to the keyword options of the ``samplers`` functions.

Kept free of ComfyUI imports so the mapping is unit-tested everywhere (tests/test_comfyui_adapter.py binds every
mapped option against the real sampler signature).  ``model_kind`` is never a widget: the adapter reads it from the
model being sampled (nodes.model_kind).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

CATEGORY = "sampling/custom_sampling/samplers"
NODE_PREFIX = "DPMSolverNodes_"
DROPDOWN_PREFIX = "dpmsolver_"

LOWER_ORDER_FINAL = {"auto": None, "on": True, "off": False}
SDE_SOLVERS = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde_1", "dpm_solver_sde_1", "dpm_solver_sde_2m")
NOISE_TYPES = ("brownian", "gaussian")
NOISE_DEVICES = {"cpu": "cpu", "gpu": "latent"}  # widget -> sampler noise_device ("latent": the latent's device)
V3_CORRECTOR_REGIONS = {"everywhere": None, "noisy half": "noisy", "clean half": "clean"}
PNDM_METHODS = ("f-pndm", "s-pndm", "plms")


def _float(default, minimum, maximum, step=0.01, tooltip=None):
    config = {"default": default, "min": minimum, "max": maximum, "step": step, "round": False}
    if tooltip:
        config["tooltip"] = tooltip
    return ("FLOAT", config)


def _int(default, minimum, maximum, tooltip=None):
    config = {"default": default, "min": minimum, "max": maximum}
    if tooltip:
        config["tooltip"] = tooltip
    return ("INT", config)


def _bool(default, tooltip=None):
    config = {"default": default}
    if tooltip:
        config["tooltip"] = tooltip
    return ("BOOLEAN", config)


def _combo(choices, default=None, tooltip=None):
    config = {"default": default if default is not None else choices[0]}
    if tooltip:
        config["tooltip"] = tooltip
    return (list(choices), config)


LOWER_ORDER_FINAL_WIDGET = _combo(tuple(LOWER_ORDER_FINAL), "auto",
                                  "first-order last steps; auto = on below 15 steps (the papers' recommendation)")
THRESHOLD_WIDGETS = {
    "thresholding": _bool(False, "Imagen dynamic thresholding of the denoised image: for pixel-space models only"),
    "threshold_percentile": _float(0.995, 0.5, 1.0, 0.001, "quantile of |x0| used as the clip level"),
    "threshold_max": _float(1.0, 1.0, 100.0, 0.01, "upper bound of the clip level"),
}


def _threshold_options(thresholding, threshold_percentile, threshold_max):
    if not thresholding:
        return {}
    return {"threshold_percentile": float(threshold_percentile), "threshold_max": float(threshold_max)}


def _lower_order_final(value):
    if value not in LOWER_ORDER_FINAL:
        raise ValueError(f"lower_order_final must be one of {tuple(LOWER_ORDER_FINAL)}, got {value!r}")
    return LOWER_ORDER_FINAL[value]


@dataclass(frozen=True)
class SamplerNodeSpec:
    """One sampler node: its id, title, widgets and ``build(**widgets) -> (sampler name, options)``."""
    node_id: str
    display_name: str
    description: str
    widgets: dict
    build: Callable
    optional: dict = field(default_factory=dict)


def _dpm_solver(order, method, lower_order_final):
    return "dpm_solver", {"order": int(order), "method": method,
                          "lower_order_final": _lower_order_final(lower_order_final)}


def _dpm_solver_adaptive(order, rtol, atol):
    return "dpm_solver_adaptive", {"order": int(order), "rtol": float(rtol), "atol": float(atol)}


def _dpmpp_2s(r, thresholding, threshold_percentile, threshold_max):
    return "dpmpp_2s", {"r": float(r), **_threshold_options(thresholding, threshold_percentile, threshold_max)}


def _dpmpp_2m(lower_order_final, solver_type, thresholding, threshold_percentile, threshold_max):
    return "dpmpp_2m", {"lower_order_final": _lower_order_final(lower_order_final), "solver_type": solver_type,
                        **_threshold_options(thresholding, threshold_percentile, threshold_max)}


def _dpmpp_3m(lower_order_final, solver_type, thresholding, threshold_percentile, threshold_max):
    return "dpmpp_3m", {"lower_order_final": _lower_order_final(lower_order_final), "solver_type": solver_type,
                        **_threshold_options(thresholding, threshold_percentile, threshold_max)}


def _sde(solver, eta, s_noise, noise_type, noise_device, solver_type_3m="official"):
    if solver not in SDE_SOLVERS:
        raise ValueError(f"solver must be one of {SDE_SOLVERS}, got {solver!r}")
    if noise_device not in NOISE_DEVICES:
        raise ValueError(f"noise_device must be one of {tuple(NOISE_DEVICES)}, got {noise_device!r}")
    options = {"eta": float(eta), "s_noise": float(s_noise), "noise_type": noise_type,
               "noise_device": NOISE_DEVICES[noise_device]}
    if solver == "dpmpp_3m_sde":
        options["solver_type"] = solver_type_3m
    return solver, options


def _ddim(eta):
    return "ddim", {"eta": float(eta)}


def _pndm(method, step_weights):
    return "pndm", {"method": method, "step_weights": step_weights}


def _dpm_solver_v3(order, use_corrector, predictor_pseudo, corrector_pseudo, corrector_region, lower_order_final):
    if corrector_region not in V3_CORRECTOR_REGIONS:
        raise ValueError(f"corrector_region must be one of {tuple(V3_CORRECTOR_REGIONS)}, got {corrector_region!r}")
    # on: as the EMS's tuned decision for the NFE says (on without one); off: never
    return "dpm_solver_v3", {"order": int(order), "use_corrector": None if use_corrector else False,
                             "p_pseudo": bool(predictor_pseudo), "c_pseudo": bool(corrector_pseudo),
                             "half": V3_CORRECTOR_REGIONS[corrector_region],
                             "lower_order_final": bool(lower_order_final)}


SAMPLER_NODES = (
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolver", "DPM-Solver (noise prediction)",
        "DPM-Solver (Lu et al. 2022): exponential-integrator ODE solver in noise prediction; singlestep order 3 is "
        "the paper's DPM-Solver-fast.",
        {"order": _int(3, 1, 3, "solver order"),
         "method": _combo(("singlestep", "multistep"), "singlestep"),
         "lower_order_final": LOWER_ORDER_FINAL_WIDGET},
        _dpm_solver),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverAdaptive", "DPM-Solver adaptive",
        "DPM-Solver-12/23 with adaptive step size (Lu et al. 2022, Alg. 4): ignores the step count, uses only the "
        "first and last sigma.",
        {"order": _int(3, 2, 3, "2 = DPM-Solver-12, 3 = DPM-Solver-23"),
         "rtol": _float(0.05, 0.0001, 1.0, 0.0001, "relative tolerance of the local error"),
         "atol": _float(0.0078, 0.0, 1.0, 0.0001, "absolute tolerance (0.0078 = 1/128 of the data range)")},
        _dpm_solver_adaptive),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverPP2S", "DPM-Solver++(2S)",
        "DPM-Solver++ singlestep second order (two model calls per step).",
        {"r": _float(0.5, 0.01, 0.99, 0.01, "position of the intermediate point in the step (log-SNR fraction)"),
         **THRESHOLD_WIDGETS},
        _dpmpp_2s),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverPP2M", "DPM-Solver++(2M)",
        "DPM-Solver++ multistep second order; on flow models it steps in the true half-logSNR.",
        {"lower_order_final": LOWER_ORDER_FINAL_WIDGET,
         "solver_type": _combo(("midpoint", "taylor"), "midpoint",
                               "midpoint = the paper's 2M (k-diffusion's dpmpp_2m); taylor = exact Taylor weights"),
         **THRESHOLD_WIDGETS},
        _dpmpp_2m),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverPP3M", "DPM-Solver++(3M)",
        "DPM-Solver++ multistep third-order ODE solver (no ODE 3M ships with ComfyUI).",
        {"lower_order_final": LOWER_ORDER_FINAL_WIDGET,
         "solver_type": _combo(("official", "taylor"), "official",
                               "official = the authors' and diffusers' 3M (more accurate below ~30 steps); "
                               "taylor = exact Taylor weights (third order, better with many steps)"),
         **THRESHOLD_WIDGETS},
        _dpmpp_3m),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverSDE", "DPM-Solver SDE",
        "SDE-DPM-Solver family: stochastic solvers with seeded, reproducible noise.",
        {"solver": _combo(SDE_SOLVERS, "dpmpp_2m_sde"),
         "eta": _float(1.0, 0.0, 100.0, 0.01, "amount of injected noise (0 = the ODE)"),
         "s_noise": _float(1.0, 0.0, 100.0, 0.01, "scale of the injected noise"),
         "noise_type": _combo(NOISE_TYPES, "brownian", "brownian = Brownian tree (converges as steps grow); "
                                                       "gaussian = fresh draws every step"),
         "noise_device": _combo(tuple(NOISE_DEVICES), "cpu", "where noise is drawn: cpu gives the same image on every "
                                                      "machine, gpu is faster and device-dependent")},
        _sde,
        optional={"solver_type_3m": _combo(("official", "taylor"), "official",
                                           "dpmpp_3m_sde only: official = k-diffusion's / ComfyUI's 3M SDE step; "
                                           "taylor = exact Taylor weight on D''")}),
    SamplerNodeSpec(
        NODE_PREFIX + "DDIM", "DDIM",
        "DDIM (Song et al. 2020), the first-order exponential integrator; eta > 0 adds noise.",
        {"eta": _float(0.0, 0.0, 1.0, 0.01, "0 = deterministic DDIM, 1 = DDPM-like ancestral noise")},
        _ddim),
    SamplerNodeSpec(
        NODE_PREFIX + "PNDM", "PNDM",
        "Pseudo numerical methods (Liu et al. 2022): pseudo linear multistep on the DDIM transfer.",
        {"method": _combo(PNDM_METHODS, "f-pndm", "f-pndm: 3 pseudo-RK4 warm-up steps then PLMS (NFE = steps + 9); "
                                                  "s-pndm / plms: one improved-Euler warm-up step (NFE = steps + 1)"),
         "step_weights": _combo(("variable", "uniform"), "variable",
                                "variable: weights for the actual step sizes (any scheduler); uniform: the paper's "
                                "fixed weights (equally spaced timesteps)")},
        _pndm),
    SamplerNodeSpec(
        NODE_PREFIX + "DPMSolverV3", "DPM-Solver-v3",
        "DPM-Solver-v3 (Zheng et al. 2023) with empirical model statistics (EMS). Without an EMS input it uses the "
        "EMS cached for the sampled model (computed by 'DPM-Solver-v3 EMS compute'), else the degenerate EMS "
        "(l = 1, s = b = 0, i.e. DPM-Solver++).",
        {"order": _int(2, 1, 3, "predictor order"),
         "use_corrector": _bool(True, "redo the previous step with the new model output (no extra model call); "
                                      "on: where the EMS's tuning found it better (always without tuned EMS)"),
         "predictor_pseudo": _bool(False, "pseudo-order predictor derivatives (the official code turns this on at "
                                          "5 steps or fewer)"),
         "corrector_pseudo": _bool(True, "corrector one order higher with pseudo derivatives (official default)"),
         "corrector_region": _combo(tuple(V3_CORRECTOR_REGIONS), "everywhere",
                                    "where the corrector runs: everywhere, the noisy half (official code) or the "
                                    "clean half (paper); the large-cfg distortion of App. G.4 comes from it"),
         "lower_order_final": _bool(True, "orders ..., 3, 2, 1 over the last steps")},
        _dpm_solver_v3,
        optional={"ems": ("EMS", {"tooltip": "statistics from 'DPM-Solver-v3 EMS compute' or 'load'"})}),
)

# KSampler / KSamplerSelect dropdown entries: name -> (sampler name, fixed options).  Every entry must run on EPS and
# flow models with no EMS computed (v3 then falls back to the degenerate EMS and logs it once).
DROPDOWN_SAMPLERS = {
    DROPDOWN_PREFIX + "v3": ("dpm_solver_v3", {}),
    DROPDOWN_PREFIX + "pp_2m": ("dpmpp_2m", {}),
    DROPDOWN_PREFIX + "pp_3m": ("dpmpp_3m", {}),
    DROPDOWN_PREFIX + "pp_2s": ("dpmpp_2s", {}),
    DROPDOWN_PREFIX + "pp_2m_sde": ("dpmpp_2m_sde", {"noise_device": "cpu"}),  # CPU noise: same image anywhere
    DROPDOWN_PREFIX + "pp_3m_sde": ("dpmpp_3m_sde", {"noise_device": "cpu"}),
    DROPDOWN_PREFIX + "3s": ("dpm_solver", {"order": 3, "method": "singlestep"}),
    DROPDOWN_PREFIX + "adaptive": ("dpm_solver_adaptive", {}),
}


def widget_defaults(spec: SamplerNodeSpec) -> dict:
    return {name: config[1]["default"] for name, config in spec.widgets.items()}


__all__ = ["CATEGORY", "NODE_PREFIX", "DROPDOWN_PREFIX", "SamplerNodeSpec", "SAMPLER_NODES", "DROPDOWN_SAMPLERS",
           "widget_defaults", "LOWER_ORDER_FINAL", "NOISE_DEVICES", "V3_CORRECTOR_REGIONS", "PNDM_METHODS"]
