"""ComfyUI V1 node classes: one SAMPLER node per ``options.SAMPLER_NODES`` entry, and the EMS compute / load / save
nodes.  Imported only inside ComfyUI (see nodes/__init__.py)."""
from __future__ import annotations

import logging
import os

import comfy.samplers
import folder_paths

from ..stats.settings import JVP_BACKENDS as JVP_MODES, REDUCTIONS, EMSSettings
from . import comfy_ems, comfy_schedulers, ems_store
from .comfy_sampling import comfy_sampler_function, register_dropdown_samplers
from .options import CATEGORY, NODE_PREFIX, SAMPLER_NODES

logger = logging.getLogger("dpm_solver_nodes")

EMS_CATEGORY = "sampling/custom_sampling/dpm_solver_v3"


def sampler_node_class(spec):
    """A V1 node class for a ``SamplerNodeSpec``: widgets -> options -> KSAMPLER(our function, options)."""

    def input_types(cls):
        types = {"required": dict(spec.widgets)}
        if spec.optional:
            types["optional"] = dict(spec.optional)
        return types

    def get_sampler(self, ems=None, **widgets):
        name, options = spec.build(**widgets)
        if ems is not None:
            options["ems"] = ems
        if name == "dpm_solver_v3":
            comfy_ems.show_text("DPM-Solver-v3: " + (
                f"with the EMS wired in: {ems.decision_summary()}" if ems is not None else
                "no EMS wired in: the EMS stored for the sampled model are used, else it runs as DPM-Solver++ with "
                "the v3 corrector (the sampling node says which)"))
        return (comfy.samplers.KSAMPLER(comfy_sampler_function(name), options),)

    return type(spec.node_id, (), {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": ("SAMPLER",),
        "FUNCTION": "get_sampler",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": spec.description,
        "get_sampler": get_sampler,
    })


class ComputeEMS:
    """Estimate DPM-Solver-v3 EMS for a model at one cfg, store them in models/dpm_solver_v3_ems, and return them.

    Reuses a stored file made with the same model fingerprint and settings instead of recomputing; the KSampler
    'dpmsolver_v3' entry and the DPM-Solver-v3 node find stored EMS by fingerprint without being wired to this node.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING", {"tooltip": "prompts whose samples the statistics describe"}),
            "negative": ("CONDITIONING",),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "EMS depend on the guidance scale: use the cfg you sample with"}),
            "width": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8,
                              "tooltip": "image width of the generated samples (per_element EMS fit only it)"}),
            "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8}),
            "grid_size": ("INT", {"default": EMSSettings.N, "min": 2, "max": 2000,
                                  "tooltip": "N: log-SNR grid cells; the grid's resolution matters more than K "
                                             "(bench/results_ems_cost.md)"}),
            "sample_count": ("INT", {"default": EMSSettings.K, "min": 2, "max": 8192,
                                     "tooltip": "K: samples per grid node; N x K also sets how many fresh samples "
                                                "the tuning may use (at most the estimation's model calls): 2 + 2 "
                                                "at N 200 K 4, 3 + 3 at K 8 (bench/results_ems_cost.md)"}),
            "reduction": (list(REDUCTIONS), {"default": "per_channel",
                                             "tooltip": "per_channel works at every resolution"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "part of the EMS cache key: keep it fixed to reuse stored EMS"}),
        }, "optional": {
            "x0_steps": ("INT", {"default": 20, "min": 2, "max": 500,
                                 "tooltip": "DPM-Solver++(2M) steps used to generate the samples"}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": 256,
                                   "tooltip": "samples per model call (memory only); 0: as many as fit in the free "
                                              "memory by ComfyUI's estimate, up to 64"}),
            "guidance": (list(comfy_ems.GUIDANCE_MODES), {
                "default": "guided", "tooltip": "guided: EMS of the CFG denoiser (the ODE that is solved); "
                                                "uncond: of the negative-prompt network (the paper's reading)"}),
            "jvp": (list(JVP_MODES), {"default": "auto", "tooltip": "auto: forward AD, finite differences if the "
                                                                   "model does not support it"}),
            "filename_prefix": ("STRING", {"default": "ems"}),
            "recompute": ("BOOLEAN", {"default": False, "tooltip": "ignore a stored file with the same settings"}),
        }}

    RETURN_TYPES = ("EMS", "STRING")
    RETURN_NAMES = ("ems", "summary")
    OUTPUT_TOOLTIPS = ("the statistics, for the DPM-Solver-v3 node's ems input",
                       "what the node did and which solver DPM-Solver-v3 runs with these EMS at which step count")
    FUNCTION = "compute"
    CATEGORY = EMS_CATEGORY
    DESCRIPTION = __doc__

    def compute(self, model, positive, negative, cfg, width, height, grid_size, sample_count, reduction, seed,
                x0_steps=20, batch_size=0, guidance="guided", jvp="auto", filename_prefix="ems", recompute=False):
        result = comfy_ems.compute_or_load(
            model, positive, negative, cfg, width, height, grid_size, sample_count, reduction, seed, x0_steps,
            batch_size, guidance, jvp, filename_prefix, recompute)
        summary = comfy_ems.outcome_text(result)
        comfy_ems.show_text(comfy_ems.outcome_head(result))  # the progress text's last word; the whole is the output
        logger.info("%s", summary)
        info = {"file": os.path.basename(result.path) if result.path else "", "source": result.source,
                "seconds": round(result.seconds, 3), "fingerprint": result.ems.metadata.get("fingerprint", ""),
                "decisions": [[d.nfe, d.solver, round(d.ratio, 4), d.corrector] for d in result.ems.decisions]}
        if result.phases:
            info["phases"] = result.phases
        if result.save_error:
            info["save_error"] = result.save_error
        return {"ui": {"ems": [info], "text": [summary]}, "result": (result.ems, summary)}


class LoadEMS:
    """Load EMS from models/dpm_solver_v3_ems (files written by 'DPM-Solver-v3 EMS compute' or 'save')."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ems_name": (folder_paths.get_filename_list(ems_store.FOLDER_NAME),)}}

    RETURN_TYPES = ("EMS",)
    RETURN_NAMES = ("ems",)
    FUNCTION = "load"
    CATEGORY = EMS_CATEGORY
    DESCRIPTION = __doc__

    @classmethod
    def IS_CHANGED(cls, ems_name):
        path = folder_paths.get_full_path(ems_store.FOLDER_NAME, ems_name)
        return os.path.getmtime(path) if path else ""

    def load(self, ems_name):
        path = folder_paths.get_full_path(ems_store.FOLDER_NAME, ems_name)
        if path is None:
            raise ValueError(f"EMS file {ems_name!r} not found in models/{ems_store.FOLDER_NAME}")
        return (ems_store.store().load(path),)


class SaveEMS:
    """Save EMS under a chosen name in models/dpm_solver_v3_ems (for the loader, or to share)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ems": ("EMS",), "filename": ("STRING", {"default": "my_model_cfg7.5"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = EMS_CATEGORY
    DESCRIPTION = __doc__

    def save(self, ems, filename):
        path = ems_store.store().save(ems, filename)  # refuses '', '.', '..' and over-long names
        return {"ui": {"ems": [{"file": os.path.basename(path)}]}}


def build_mappings():
    """Register the EMS folder and the dropdown entries; return (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)."""
    ems_store.register_folder(folder_paths)
    register_dropdown_samplers()
    comfy_schedulers.register_scheduler()
    classes, names = {}, {}
    for spec in SAMPLER_NODES:
        classes[spec.node_id] = sampler_node_class(spec)
        names[spec.node_id] = spec.display_name
    for node_id, cls, title in ((NODE_PREFIX + "ComputeEMS", ComputeEMS, "DPM-Solver-v3 EMS compute"),
                                (NODE_PREFIX + "LoadEMS", LoadEMS, "DPM-Solver-v3 EMS load"),
                                (NODE_PREFIX + "SaveEMS", SaveEMS, "DPM-Solver-v3 EMS save"),
                                (NODE_PREFIX + "RecommendedSigmas", RecommendedSigmas, "DPM-Solver recommended sigmas")):
        classes[node_id] = cls
        names[node_id] = title
    return classes, names


class RecommendedSigmas:
    """The step schedule our solvers do best on for this model (samplers.recommended_sigmas): Karras spacing with
    rho 15 for eps/v models, sigma = 1 then a logSNR mix of shift-3 and uniform steps for flow models (SD3, Flux).
    sigma_min / sigma_max of 0 use the model's; denoise < 1 keeps the tail, as BasicScheduler does."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "sigma_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5000.0, "step": 0.001, "round": False,
                                    "tooltip": "0 = the model's"}),
            "sigma_max": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False,
                                    "tooltip": "0 = the model's (flow models start at 1)"})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"
    DESCRIPTION = __doc__

    def get_sigmas(self, model, steps, denoise, sigma_min, sigma_max):
        return (comfy_schedulers.sigmas_for_node(model.get_model_object("model_sampling"), steps, denoise,
                                                 sigma_min, sigma_max),)


__all__ = ["build_mappings", "sampler_node_class", "ComputeEMS", "LoadEMS", "SaveEMS", "RecommendedSigmas"]
