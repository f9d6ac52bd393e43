"""The extension inside a real AUTOMATIC1111 / Forge / reForge WebUI checkout (docs/hosts.md section 4), in-process
and offline.

Set WEBUI_DIR to a WebUI checkout (tested: A1111 v1.10.1 82a973c0 with repositories/ filled as hosts.md 4 says;
Forge dfdcbab6 with huggingface_guess, BLIP and the assets in repositories/) and WEBUI_PYTHON to a Python that has
its requirements (default: WEBUI_DIR/venv/bin/python, else this Python).  The test runs this file as a script in
that Python, which:

  1. imports the WebUI (``initialize.imports``), links this checkout into a temporary data dir's extensions/, runs
     ``set_samplers``, ``list_extensions`` and ``load_scripts``, then "Reload UI" (``script_unloaded_callback`` +
     ``load_scripts``) and records the sampler names both times;
  2. replaces ``shared.sd_model`` with an analytic model whose data are Gaussian per element with a mean set by the
     prompt, returning the exact epsilon (SD1-style "eps"), the exact v ("v"), or the exact flow output ("flow",
     shift 3).  A1111: ``apply_model`` behind its CompVis(V)Denoiser / SD3 denoiser.  Forge: the network inside
     Forge's own ``KModel``, ``UnetPatcher`` and predictor (``_forge_analytic_model``);
  3. builds the conditioning with ``prompt_parser`` and a real ``StableDiffusionProcessingTxt2Img`` and runs every
     registered sampler through ``create_sampler(name, sd_model).sample(p, x, c, uc)`` (the WebUI's own
     ``KDiffusionSampler`` and CFG denoiser), 12 steps, CFG 5, no EMS;
  4. runs the built-in "DPM++ 2M" on the same inputs at 12 and 100 steps;
  5. computes EMS through the WebUI's sampler class (``EMSJob``), samples DPM-Solver-v3 with them, and round-trips
     the generation parameters (``create_infotext`` -> ``parse_generation_parameters`` -> override settings).

and prints one JSON report that the tests below check.  Without WEBUI_DIR every test is skipped.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS, CFG, REFERENCE_STEPS = 12, 5.0, 100
LATENT = (4, 8, 8)
BATCH = 2
PROMPT = "a red fox"
VARIANCE = 0.25


def prompt_mean(text):
    """The analytic model's data mean for a prompt."""
    return (sum(map(ord, str(text))) % 97) / 97.0 - 0.5


# CFG of two Gaussians of equal variance: N(mu_u + w (mu_c - mu_u), v), what every sampler should draw from
TARGET_MEAN = prompt_mean("") + CFG * (prompt_mean(PROMPT) - prompt_mean(""))


# ==== the harness (runs inside the WebUI's Python) ===============================================================

def _host():
    """"forge", "reforge" or "a1111": the WebUI checkout at WEBUI_DIR (hosts.md 3.5)."""
    webui_dir = os.environ.get("WEBUI_DIR", "")
    if os.path.isdir(os.path.join(webui_dir, "backend")) and os.path.isdir(os.path.join(webui_dir, "modules_forge")):
        return "forge"
    if os.path.isdir(os.path.join(webui_dir, "ldm_patched")):
        return "reforge"
    return "a1111"


def _ve_denoise(x, sigma, mu, mixture):
    """E[x0 | x0 + sigma n = x] for the analytic data (float64)."""
    import torch

    sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
    x = x.to(torch.float64)
    if not mixture:
        return mu + VARIANCE / (VARIANCE + sigma ** 2) * (x - mu)
    v, low, high = 0.05, mu - 0.6, mu + 0.6
    r_high = torch.sigmoid(((x - low) ** 2 - (x - high) ** 2) / (2 * (v + sigma ** 2)))
    gain = v / (v + sigma ** 2)
    return r_high * (high + gain * (x - high)) + (1 - r_high) * (low + gain * (x - low))


def _flow_denoise(x, sigma, mu):
    """E[x0 | x] for the Gaussian data under x = (1 - sigma) x0 + sigma n (float64):
    mu + v (1 - sigma) / (v (1 - sigma)^2 + sigma^2) (x - (1 - sigma) mu)."""
    import torch

    sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
    gain = VARIANCE * (1 - sigma) / (VARIANCE * (1 - sigma) ** 2 + sigma ** 2)
    return mu + gain * (x.to(torch.float64) - (1 - sigma) * mu)


def _vp_network_output(kind, x_in, sigma, mu, mixture):
    """What an SD-style network returns for its scaled input x_in = x / sqrt(1 + sigma^2) (float64): the exact
    epsilon ("eps") or v ("v": denoised = x / (1 + s^2) - v s / sqrt(1 + s^2))."""
    import torch

    sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
    x = x_in.to(torch.float64) * (1 + sigma ** 2).sqrt()
    x0 = _ve_denoise(x, sigma, mu, mixture)
    if kind == "v":
        return (x / (1 + sigma ** 2) - x0) * (1 + sigma ** 2).sqrt() / sigma
    return (x - x0) / sigma


def _forge_analytic_model(kind, mixture):
    """Forge's ``shared.sd_model`` stand-in: the analytic network inside Forge's own ``KModel`` + ``UnetPatcher``
    with its own predictor (SD1 discrete eps / v-prediction, or discrete flow with shift 3), so sampling runs
    through Forge's ``ForgeScheduleLinker``, ``sampling_function`` and conditioning code.  The network sees what a
    real UNet sees: the scaled input and Forge's timestep (the nearest integer timestep for discrete predictors, as
    Forge feeds real models, or 1000 sigma for flow), and turns it back into sigma."""
    import types

    import torch
    from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import Prediction, PredictionDiscreteFlow
    from backend.patcher.unet import UnetPatcher

    if kind == "flow":
        predictor = PredictionDiscreteFlow(shift=3.0)
    else:
        predictor = Prediction(prediction_type="v_prediction" if kind == "v" else "epsilon")

    class AnalyticNet(torch.nn.Module):
        storage_dtype = computation_dtype = torch.float32

        def forward(self, xc, t, context=None, control=None, transformer_options=None, **extra):
            mu = context[:, 0, 0].reshape(-1, 1, 1, 1).to(torch.float64)
            if kind == "flow":          # timestep = 1000 sigma (PredictionDiscreteFlow.sigma() would shift it again)
                sigma = (t / 1000).reshape(-1, 1, 1, 1).to(torch.float64)
                return ((xc.to(torch.float64) - _flow_denoise(xc, sigma, mu)) / sigma).float()  # (x - x0) / sigma
            return _vp_network_output(kind, xc, predictor.sigma(t), mu, mixture).float()

    cpu = torch.device("cpu")
    unet = UnetPatcher(KModel(AnalyticNet(), None, k_predictor=predictor), load_device=cpu, offload_device=cpu,
                       current_device=cpu)
    name = f"analytic-{kind}"

    class ForgeAnalyticSD(ForgeDiffusionEngine):     # Forge's own engine base: its defaults for the WebUI
        def __init__(self):
            super().__init__(types.SimpleNamespace(inpaint_model=lambda: False), None)
            vae = types.SimpleNamespace(latent_channels=4)
            self.forge_objects = ForgeObjects(unet, None, vae, None)
            self.extra_generation_params, self.comments = {}, []
            self.forge_objects_original = self.forge_objects_after_applying_lora = self.forge_objects
            self.sd_checkpoint_info = type("Info", (), {
                "sha256": "5eed" * 16, "shorthash": "5eed5eed5e", "model_name": name, "filename": "analytic",
                "name_for_extra": name, "title": name, "short_title": name})()
            self.sd_model_hash = None

        def get_learned_conditioning(self, texts):
            means = torch.tensor([prompt_mean(t) for t in texts], dtype=torch.float32)
            return means[:, None, None].expand(len(texts), 2, 4).clone()

        def decode_first_stage(self, latent):
            return latent.new_zeros(latent.shape[0], 3, latent.shape[2] * 8, latent.shape[3] * 8)

    return ForgeAnalyticSD()


def _analytic_model(kind, mixture=False):
    """A stand-in for ``shared.sd_model``: exact denoiser of N(mu(prompt), 0.25) data in every latent element, or
    (``mixture``) of the two-component mixture 0.5 N(mu - 0.6, 0.05) + 0.5 N(mu + 0.6, 0.05), whose denoiser is
    nonlinear (the Gaussian's makes the v3 statistic f constant)."""
    import contextlib
    import types

    import torch

    if _host() == "forge":
        return _forge_analytic_model(kind, mixture)

    class AnalyticSD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
            self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
            self.parameterization = "v" if kind == "v" else "eps"
            self.is_sdxl = self.is_sd2 = self.is_sdxl_inpaint = self.is_sd1 = False
            self.is_sd3 = kind == "flow"
            self.model = torch.nn.Module()
            self.model.conditioning_key = "crossattn"
            self.first_stage_model = torch.nn.Module()
            self.first_stage_model.dtype = torch.float32
            self.cond_stage_key = "txt"
            name = f"analytic-{kind}"
            self.sd_checkpoint_info = type("Info", (), {
                "sha256": "5eed" * 16, "shorthash": "5eed5eed5e", "model_name": name, "filename": "analytic",
                "name_for_extra": name, "title": name, "short_title": name})()
            self.sd_model_hash = None
            self.lowvram = False
            self.latent_channels = 4
            if kind == "flow":
                from modules.models.sd3.sd3_impls import ModelSamplingDiscreteFlow
                from modules.models.sd3.sd3_model import SD3Denoiser

                self.sampling = ModelSamplingDiscreteFlow(shift=3.0)
                self.create_denoiser = lambda: SD3Denoiser(self, self.sampling.sigmas)
            else:
                self.create_denoiser = None     # the WebUI then wraps it in CompVis(V)Denoiser

        def ema_scope(self):
            return contextlib.nullcontext()

        def decode_first_stage(self, latent):     # a grey image (the txt2img job path decodes its samples)
            return latent.new_zeros(latent.shape[0], 3, latent.shape[2] * 8, latent.shape[3] * 8)

        def get_learned_conditioning(self, texts):
            means = torch.tensor([prompt_mean(t) for t in texts], dtype=torch.float32)
            crossattn = means[:, None, None].expand(len(texts), 2, 4).clone()
            if kind == "flow":
                return {"crossattn": crossattn, "vector": means[:, None].expand(len(texts), 4).clone()}
            return crossattn

        def apply_model(self, x, t, cond):
            if kind == "flow":        # SD3Denoiser passes sigma, and the model returns the denoised x0
                mu = cond["vector"][:, 0].reshape(-1, 1, 1, 1).to(torch.float64)
                return _flow_denoise(x, t, mu).to(x.dtype)

            mu = cond["c_crossattn"][0][:, 0, 0].reshape(-1, 1, 1, 1).to(torch.float64)
            log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).log().to(torch.float64)
            low = t.floor().long().clamp(0, 999)
            high = (low + 1).clamp(max=999)
            w = (t - low).to(torch.float64)
            sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
            return _vp_network_output(kind, x, sigma, mu, mixture).to(x.dtype)  # CompVis(V)Denoiser fed x * c_in

    model = AnalyticSD()
    if _host() == "reforge":
        from modules_forge.forge_loader import ForgeSD

        # what reForge's checkpoint loader (modules_forge/forge_loader.py) adds to the WebUI's model object
        model.forge_objects = ForgeSD(_reforge_unet(kind, mixture), None, types.SimpleNamespace(), None)
        model.forge_objects_original = model.forge_objects_after_applying_lora = model.forge_objects
        model.tiling_enabled, model.ztsnr = False, False
    return model


def _reforge_unet(kind, mixture):
    """reForge samples through ``shared.sd_model.forge_objects.unet`` (its ldm_patched ``sampling_function``): the
    analytic network as the ``diffusion_model`` of a real ldm_patched ``BaseModel`` (SD1.5 config, EPS or
    V_PREDICTION sampling) in reForge's ``UnetPatcher``.  The network gets the scaled input and the model
    sampling's timestep (nearest integer) and turns it back into sigma."""
    import torch
    from ldm_patched.modules import model_base, supported_models
    from modules_forge.unet_patcher import UnetPatcher

    class AnalyticNet(torch.nn.Module):
        dtype = torch.float32

        def forward(self, xc, t, context=None, control=None, transformer_options=None, **extra):
            mu = context[:, 0, 0].reshape(-1, 1, 1, 1).to(torch.float64)
            return _vp_network_output(kind, xc, sampling.sigma(t), mu, mixture).float()

    model_type = model_base.ModelType.V_PREDICTION if kind == "v" else model_base.ModelType.EPS
    base = model_base.BaseModel(supported_models.SD15({"disable_unet_model_creation": True}), model_type=model_type)
    base.diffusion_model = AnalyticNet()
    sampling = base.model_sampling
    cpu = torch.device("cpu")
    return UnetPatcher(base, load_device=cpu, offload_device=cpu)


def _processing(sd_model, sampler_name, steps, seed, prompt=PROMPT, cfg=CFG):
    import torch
    from modules import processing, prompt_parser, rng

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=prompt, negative_prompt="", steps=steps, cfg_scale=cfg, width=64, height=64,
        sampler_name=sampler_name, batch_size=BATCH, seed=seed, do_not_save_samples=True, do_not_save_grid=True)
    p.all_prompts, p.all_negative_prompts = [prompt] * BATCH, [""] * BATCH
    p.all_seeds = p.seeds = [seed + i for i in range(BATCH)]
    p.all_subseeds = p.subseeds = [0] * BATCH
    p.iteration, p.scripts = 0, None
    p.fill_fields_from_opts()
    p.rng = rng.ImageRNG(LATENT, p.seeds)
    p.setup_prompts = lambda: None
    with torch.no_grad():
        c = prompt_parser.get_multicond_learned_conditioning(sd_model, prompt_parser.SdConditioning(p.all_prompts),
                                                             steps)
        uc = prompt_parser.get_learned_conditioning(sd_model, prompt_parser.SdConditioning(p.all_negative_prompts),
                                                    steps)
    return p, c, uc


def _sample(name, sd_model, steps, seed=1234, **p_fields):
    import torch
    from modules import sd_samplers

    p, c, uc = _processing(sd_model, name, steps, seed)
    for key, value in p_fields.items():
        setattr(p, key, value)
    x = p.rng.next()
    sampler = sd_samplers.create_sampler(name, sd_model)
    with torch.no_grad():
        out = sampler.sample(p, x, c, uc, image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1))
    return out.to(torch.float64), p


_T0 = __import__("time").time()


def _log(message):
    print(f"[harness {__import__('time').time() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _img2img(name, sd_model, steps, strength, seed=1234):
    """img2img from a clean latent: the WebUI passes the truncated schedule sigmas[steps - t_enc - 1:]."""
    import torch
    from modules import sd_samplers

    p, c, uc = _processing(sd_model, name, steps, seed)
    p.denoising_strength = strength
    noise = p.rng.next()
    init = torch.full_like(noise, 0.3)
    sampler = sd_samplers.create_sampler(name, sd_model)
    with torch.no_grad():
        out = sampler.sample_img2img(p, init, noise, c, uc, image_conditioning=noise.new_zeros(noise.shape[0], 5, 1, 1))
    return out.to(torch.float64)


def harness():
    import contextlib
    import inspect
    import io
    import tempfile
    import time

    webui_dir = os.environ["WEBUI_DIR"]
    data_dir = tempfile.mkdtemp(prefix="webui-data-")
    os.makedirs(os.path.join(data_dir, "extensions"))
    os.symlink(ROOT, os.path.join(data_dir, "extensions", "dpm-solver-nodes"))
    os.chdir(webui_dir)
    sys.path.insert(0, webui_dir)
    sys.argv = ["webui.py", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--no-hashing",
                "--skip-prepare-environment", "--do-not-download-clip", "--data-dir", data_dir]
    if _host() in ("forge", "reforge"):
        sys.argv.append("--always-cpu")
    report = {"errors": {}}
    started = time.time()
    import logging
    warnings = report["warnings"] = []   # what the WebUI's console shows at its default level (WARNING, no config)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("dpm_solver_nodes").addHandler(handler)
    with contextlib.redirect_stdout(io.StringIO()):
        if _host() in ("forge", "reforge"):      # what their webui.py does before the WebUI's imports
            from modules_forge.initialization import initialize_forge
            initialize_forge()
        from modules import initialize
        initialize.imports()
        from modules import extensions, script_callbacks, scripts, sd_samplers, shared
        import torch
        torch.set_num_threads(1)
        builtin = [s.name for s in sd_samplers.all_samplers]
        sd_samplers.set_samplers()
        extensions.list_extensions()
        scripts.load_scripts()
        first = [s.name for s in sd_samplers.all_samplers]
        script_callbacks.script_unloaded_callback()        # "Reload UI" (modules/ui_extensions + initialize_rest)
        scripts.load_scripts()
        second = [s.name for s in sd_samplers.all_samplers]
        script_callbacks.ui_settings_callback()             # our OptionInfos, as the settings page does
        from modules import sd_schedulers
        schedules = [x.name for x in sd_schedulers.schedulers]
        schedule_map = sorted(k for k, v in sd_schedulers.schedulers_map.items() if v.name == "dpm_solver_recommended")
    from modules import infotext_utils, processing
    webui = sys.modules["dpm_solver_nodes.scripts.dpm_solver_webui.webui"]
    ems_tab = sys.modules.get("dpm_solver_nodes.scripts.dpm_solver_webui.ems_tab") or __import__(
        "dpm_solver_nodes.scripts.dpm_solver_webui.ems_tab", fromlist=["ems_tab"])
    catalog = sys.modules["dpm_solver_nodes.scripts.dpm_solver_webui.catalog"]
    report.update(builtin=builtin, first=first, second=second, schedules=schedules, schedule_map=schedule_map,
                  version=subprocess.run(["git", "describe", "--tags"], capture_output=True, text=True,
                                         cwd=webui_dir).stdout.strip() or "unknown",
                  startup_seconds=time.time() - started)
    ours = [n for n in second if sd_samplers.all_samplers_map[n].options.get("dpm_solver_nodes")]
    report["ours"] = ours
    report["signatures"] = {}
    for name in ours:
        sampler = sd_samplers.all_samplers_map[name].constructor.__defaults__  # (function,)
        function = sampler[0] if sampler else None
        report["signatures"][name] = list(inspect.signature(function).parameters) if function else None
    report["runs"] = {}
    shared.opts.dpm_solver_ems_dir = os.path.join(data_dir, "ems")
    _log("WebUI imported and scripts loaded")
    kinds = ("eps", "v", "flow")
    if _host() == "reforge":
        # reForge 3b56b268's SD3 denoiser (modules/models/sd3/sd3_model.py) does not import under its default
        # "A1111" sampling back-end (NameError: k_diffusion), so no flow model reaches a k-diffusion sampler there
        kinds = ("eps", "v")
        report["kinds_not_run"] = {"flow": "reForge's SD3Denoiser fails to import (NameError: k_diffusion)"}
    for kind in kinds:
        _log(f"sampling the {kind} model")
        shared.sd_model = _analytic_model(kind)
        runs = report["runs"][kind] = {}
        reference, _ = _sample("DPM++ 2M", shared.sd_model, REFERENCE_STEPS)
        builtin_2m, _ = _sample("DPM++ 2M", shared.sd_model, STEPS)
        runs["builtin DPM++ 2M"] = {"mse": float(((builtin_2m - reference) ** 2).mean()), "finite": True,
                                    "mean": float(reference.mean()), "variance": float(reference.var()),
                                    "target_mean": TARGET_MEAN, "target_variance": VARIANCE}
        for name in ours:
            try:
                out, p = _sample(name, shared.sd_model, STEPS)
                entry = {"finite": bool(torch.isfinite(out).all()), "mse": float(((out - reference) ** 2).mean()),
                         "mean": float(out.mean()), "variance": float(out.var()),
                         "infotext": {k: str(v) for k, v in p.extra_generation_params.items()}}
                if name == "DPM++ 2M (dpm-solver-nodes)":
                    entry["max_abs_vs_builtin"] = float((out - builtin_2m).abs().max())
                if catalog.ENTRIES_BY_LABEL[name].stochastic and kind == "eps":
                    again, _ = _sample(name, shared.sd_model, STEPS)
                    entry["repeatable"] = bool(torch.equal(out, again))
                    other, _ = _sample(name, shared.sd_model, STEPS, seed=99)
                    entry["seed_changes_result"] = not torch.allclose(out, other)
                runs[name] = entry
            except Exception as error:  # noqa: BLE001 - reported, and the test fails on it
                report["errors"][f"{kind}/{name}"] = f"{type(error).__name__}: {error}"
        for name in ("DPM++ 2M", "DPM++ 2M (dpm-solver-nodes)"):  # the recommended schedule type
            try:
                out, p = _sample(name, shared.sd_model, STEPS, scheduler="DPM-Solver recommended")
                runs[f"{name} / recommended"] = {
                    "finite": bool(torch.isfinite(out).all()), "mse": float(((out - reference) ** 2).mean()),
                    "schedule_type": str(p.extra_generation_params.get("Schedule type"))}
            except Exception as error:  # noqa: BLE001
                report["errors"][f"{kind}/{name} / recommended"] = f"{type(error).__name__}: {error}"
    _log("img2img (truncated schedules) on the eps model")
    shared.sd_model = _analytic_model("eps")
    img2img = report["img2img"] = {}
    reference = _img2img("DPM++ 2M", shared.sd_model, REFERENCE_STEPS, 0.5)
    for name in ["DPM++ 2M"] + ours:
        try:
            out = _img2img(name, shared.sd_model, STEPS, 0.5)
            img2img[name] = {"finite": bool(torch.isfinite(out).all()), "mse": float(((out - reference) ** 2).mean())}
        except Exception as error:  # noqa: BLE001
            report["errors"][f"img2img/{name}"] = f"{type(error).__name__}: {error}"
    # unsupported parameterization: refused with a clear error
    shared.sd_model = _analytic_model("eps")
    if _host() == "forge":
        shared.sd_model.forge_objects.unet.model.predictor.prediction_type = "x0"
    else:
        shared.sd_model.parameterization = "x0"
    try:
        _sample("DPM++ 2M (dpm-solver-nodes)", shared.sd_model, 4)
        report["refusal"] = None
    except ValueError as error:
        report["refusal"] = str(error)
    _log("EMS")
    try:
        import gradio
        with gradio.Blocks():
            tabs = script_callbacks.ui_tabs_callback()       # what the UI does to build the extension tabs
        report["tabs"] = [[title, elem_id] for _, title, elem_id in tabs]
    except Exception as error:  # noqa: BLE001
        report["errors"]["ui_tabs"] = f"{type(error).__name__}: {error}"
    report["ems"] = _ems_round_trip(shared, sd_samplers, webui, ems_tab, infotext_utils, processing)
    _log("EMS tab job through process_images")
    report["tab_job"] = _tab_job(shared, webui, ems_tab)
    report["seconds"] = time.time() - started
    print("REPORT " + json.dumps(report))


def _quantizes_timesteps(model_wrap):
    """Whether the WebUI feeds the network an integer timestep: A1111's ``quantize`` ("Enable quantization in K
    samplers"); Forge's discrete predictor and reForge's ldm_patched model sampling always do (argmin)."""
    import torch

    sampling = getattr(model_wrap, "predictor", None)
    if sampling is None and _host() == "reforge":
        sampling = model_wrap.inner_model.forge_objects.unet.model.model_sampling
    if sampling is None:
        return bool(model_wrap.quantize)
    t = sampling.timestep(torch.tensor([1.234567]))
    return bool(torch.equal(t, t.round()))


def _ems_round_trip(shared, sd_samplers, webui, ems_tab, infotext_utils, processing):
    import logging

    import torch
    from modules import sd_samplers_common, sd_samplers_kdiffusion

    result = {}
    shared.sd_model = _analytic_model("eps", mixture=True)
    shared.opts.dpm_solver_ems_grid, shared.opts.dpm_solver_ems_samples = 20, 16
    shared.opts.dpm_solver_v3_corrector = "Automatic"
    without, p0 = _sample("DPM-Solver-v3 (dpm-solver-nodes)", shared.sd_model, STEPS)
    result["without_ems"] = p0.extra_generation_params.get("DPM-Solver-v3 EMS")
    result["without_ems_ran"] = p0.extra_generation_params.get("DPM-Solver-v3 ran")
    # N 20, K 16: the smallest grid and sample count here whose job includes the v3-vs-DPM-Solver++(2M) check (6
    # samples; N 10, K 8 has none, and its v3 measured 2.7x the error of the 2M at 12 steps on this model)
    # jvp="auto": forward AD through the WebUI's CFG denoiser (finite differences if it raises)
    job = ems_tab.EMSJob(webui.STORE, N=20, K=16, reduction="per_channel", seed=0, x0_steps=8,
                         jvp=os.environ.get("WEBUI_EMS_JVP", "auto"))

    def function(model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        return job(model, x, sigmas, extra_args, callback, disable)

    p, c, uc = _processing(shared.sd_model, "DPM++ 2M", 4, 7)
    # "Enable quantization in K samplers" rounds sigma to integer timesteps (dD/dlambda = 0); the job turns it off
    shared.opts.enable_quantization = True
    sampler = sd_samplers_kdiffusion.KDiffusionSampler(function, shared.sd_model)
    result["quantize_before"] = _quantizes_timesteps(sampler.model_wrap)
    with ems_tab.continuous_timesteps(sampler.model_wrap_cfg):        # what the job runs under
        result["quantize_during"] = _quantizes_timesteps(sampler.model_wrap)
    sampler.config = sd_samplers_common.SamplerData("DPM-Solver-v3 EMS", None, [], {})
    x = p.rng.next()
    started = __import__("time").time()
    with torch.no_grad():
        samples = sampler.sample(p, x, c, uc, image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1))
    _log("EMS computed")
    result["quantize_after"] = _quantizes_timesteps(sampler.model_wrap)
    shared.opts.enable_quantization = False
    result["seconds"] = __import__("time").time() - started
    result["stored"] = bool(job.path and os.path.isfile(job.path))
    result["ems"] = repr(job.result)
    result["estimator"] = job.result.metadata.get("estimator") if job.result is not None else None
    result["samples_finite"] = bool(torch.isfinite(samples).all())
    webui.on_model_loaded(shared.sd_model)              # checkpoint change -> lookup again
    records, package_logger = [], logging.getLogger("dpm_solver_nodes")
    handler, level = logging.Handler(), package_logger.level
    handler.emit = records.append
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        with_ems, p1 = _sample("DPM-Solver-v3 (dpm-solver-nodes)", shared.sd_model, STEPS)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
    result["with_ems"] = p1.extra_generation_params.get("DPM-Solver-v3 EMS")
    result["with_ems_ran"] = p1.extra_generation_params.get("DPM-Solver-v3 ran")
    result["v3_decisions"] = job.result.metadata.get("v3_decisions") if job.result is not None else None
    # the stored estimation-time check may send this NFE to DPM-Solver++(2M) (logged): the EMS were used for that
    result["fallback_logged"] = any("running DPM-Solver++(2M) instead" in r.getMessage() for r in records)
    result["changed_by_ems"] = float((with_ems - without).abs().max())
    result["finite"] = bool(torch.isfinite(with_ems).all())
    reference, _ = _sample("DPM++ 2M", shared.sd_model, REFERENCE_STEPS)
    result["mse_with_ems"] = float(((with_ems - reference) ** 2).mean())
    result["mse_without_ems"] = float(((without - reference) ** 2).mean())
    # generation parameters -> PNG text -> parsed -> settings a paste would restore
    p1.all_prompts, p1.all_negative_prompts = [p1.prompt] * BATCH, [""] * BATCH
    text = processing.create_infotext(p1, p1.all_prompts, p1.all_seeds, p1.all_subseeds)
    parsed = infotext_utils.parse_generation_parameters(text)
    result["infotext"] = text
    result["parsed_sampler"] = parsed.get("Sampler")
    shared.opts.dpm_solver_v3_order = 3
    result["override_settings"] = {k: v for _, k, v in infotext_utils.get_override_settings(parsed)
                                   if k.startswith("dpm_solver")}
    return result


def _tab_job(shared, webui, ems_tab):
    """The tab's "Compute EMS" path: a txt2img job through ``processing.process_images``.  Loading weights and
    token merging need a real checkpoint, so those two WebUI calls are skipped for the analytic model."""
    from modules import sd_models

    result = {}
    shared.sd_model = _analytic_model("eps", mixture=True)
    sd_models.reload_model_weights = lambda *args, **kwargs: None
    sd_models.apply_token_merging = lambda *args, **kwargs: None
    shared.opts.live_previews_enable = False   # reForge's default "Approx NN" preview downloads its weights
    if _host() == "forge":            # Forge (re)loads the selected checkpoint inside process_images
        from modules import processing

        processing.forge_model_reload = sd_models.forge_model_reload = lambda: (shared.sd_model, False)
        processing.apply_token_merging = sd_models.apply_token_merging
    shared.opts.dpm_solver_ems_grid, shared.opts.dpm_solver_ems_samples = 50, 4  # the least N checked at K 4
    before = set(os.listdir(webui.ems_folder()))
    shared.state.begin(job="dpm_solver_v3_ems")
    shared.state.interrupted = True                       # "Interrupt" pressed: nothing may be stored
    images, message = ems_tab.run_in_webui(webui.STORE, PROMPT, "", 3.0, 64, 64, BATCH, 0)
    shared.state.end()
    result["interrupted_message"] = message
    result["interrupted_stored"] = sorted(set(os.listdir(webui.ems_folder())) - before)
    shared.state.begin(job="dpm_solver_v3_ems")
    images, message = ems_tab.run_in_webui(webui.STORE, PROMPT, "", 3.0, 64, 64, BATCH, 0)
    shared.state.end()
    result["message"] = message
    result["images"] = len(images or [])
    result["stored"] = sorted(set(os.listdir(webui.ems_folder())) - before)
    # Interrupt while the job tunes (N 64, K 16 leave rows for it): "pressed" inside a denoiser call once the
    # progress has passed the data samples and the estimation (the tuning's rows are the job's last).
    shared.opts.dpm_solver_ems_grid, shared.opts.dpm_solver_ems_samples = 64, 16
    tune_rows = ems_tab.job_settings(64, 16, "per_channel", 4, BATCH).cost(guided=True)["tune"]
    progress = {"done": 0, "total": 0, "tune_rows": tune_rows}

    def report(done, total):
        progress.update(done=done, total=total)

    def model_call():
        if (progress["total"] and progress["done"] > progress["total"] - tune_rows
                and not shared.state.interrupted):
            progress["interrupted_at"] = progress["done"]
            shared.state.interrupt()

    before = set(os.listdir(webui.ems_folder()))
    shared.state.begin(job="dpm_solver_v3_ems")
    images, message = ems_tab.run_in_webui(webui.STORE, PROMPT, "", 3.0, 64, 64, BATCH, 0, x0_steps=4,
                                           progress=report, on_model_call=model_call)
    shared.state.end()
    result["tuning_interrupt"] = {"message": message, "images": len(images or []), "progress": progress,
                                  "stored": sorted(set(os.listdir(webui.ems_folder())) - before)}
    return result


# ==== the tests (run under pytest, in any Python) ================================================================

try:
    import pytest
except ImportError:  # the harness does not need pytest
    pytest = None

_REPORT = {}


def _webui_python(webui_dir):
    explicit = os.environ.get("WEBUI_PYTHON")
    if explicit:
        return explicit
    venv = os.path.join(webui_dir, "venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def _report():
    webui_dir = os.environ.get("WEBUI_DIR")
    if not webui_dir or not os.path.isdir(os.path.join(webui_dir, "modules")):
        pytest.skip("WEBUI_DIR is not set to an AUTOMATIC1111 / Forge / reForge WebUI checkout (docs/hosts.md 4)")
    if "report" not in _REPORT:
        python = _webui_python(webui_dir)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            result = subprocess.run([python, os.path.abspath(__file__), "--harness"], capture_output=True, text=True,
                                    env=env, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail("the WebUI harness did not finish in 900 s")
        lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
        if not lines:
            if "No module named" in result.stderr and "modules" not in result.stderr.split("No module named")[-1][:20]:
                pytest.skip(f"{python} lacks the WebUI's requirements (set WEBUI_PYTHON): "
                            f"{result.stderr.strip().splitlines()[-1]}")
            pytest.fail(f"WebUI harness failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
        _REPORT["report"] = json.loads(lines[-1][len("REPORT "):])
    return _REPORT["report"]


def _catalog():
    import importlib

    return importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.catalog")


def test_registration_and_reload():
    report = _report()
    labels = [entry.label for entry in _catalog().ENTRIES]
    new = [n for n in report["first"] if n not in report["builtin"]]
    assert new == labels
    assert report["second"] == report["first"], "Reload UI changed the sampler list"
    assert all(report["second"].count(name) == 1 for name in labels)
    assert report["ours"] == labels


def test_injected_parameter_hygiene_in_the_webui():
    report = _report()
    for name, parameters in report["signatures"].items():
        assert parameters is not None, name
        assert not {"n", "sigma_min", "sigma_max", "sigma_sched", "solver_type"} & set(parameters), (name, parameters)
        assert "sigmas" in parameters


def test_every_sampler_runs_on_eps_v_and_flow():
    report = _report()
    assert report["errors"] == {}
    for kind, runs in report["runs"].items():
        baseline = runs["builtin DPM++ 2M"]
        assert abs(baseline["mean"] - TARGET_MEAN) < 0.1 and abs(baseline["variance"] / VARIANCE - 1) < 0.25
        for entry in _catalog().ENTRIES:
            run = runs[entry.label]
            assert run["finite"], (kind, entry.label)
            # 512 values per run drawn from N(TARGET_MEAN, 0.25): mean within ~4.5 standard errors, variance +-25 %;
            # the first-order SDE solvers have O(h) weak error and at 12 steps reach variances of 0.13-0.37 (+-60 %)
            first_order_sde = entry.sampler in ("dpmpp_sde_1", "dpm_solver_sde_1")
            assert abs(run["mean"] - TARGET_MEAN) < 0.1, (kind, entry.label, run["mean"], TARGET_MEAN)
            assert abs(run["variance"] / VARIANCE - 1) < (0.6 if first_order_sde else 0.25), (
                kind, entry.label, run["variance"])
            if not entry.stochastic:
                # ODE solvers at 12 steps against the 100-step built-in DPM++ 2M on the same noise
                assert run["mse"] < 0.01, (kind, entry.label, run["mse"], baseline["mse"])


def test_img2img_truncated_schedules():
    """Denoising strength 0.5 at 12 steps: every sampler starts mid-schedule; the ODE solvers land within 0.01 MSE
    of the 100-step built-in DPM++ 2M img2img (the SDE ones are other draws: finite only)."""
    report = _report()
    runs = report["img2img"]
    assert runs["DPM++ 2M (dpm-solver-nodes)"]["mse"] == pytest.approx(runs["DPM++ 2M"]["mse"], rel=1e-3, abs=1e-9)
    for entry in _catalog().ENTRIES:
        assert runs[entry.label]["finite"], entry.label
        if not entry.stochastic:
            assert runs[entry.label]["mse"] < 0.01, (entry.label, runs[entry.label]["mse"])


def test_our_2m_equals_the_builtin_2m():
    """Same inputs through the WebUI's sampler class: eps and v models match the built-in to float32 rounding.  On
    the flow (SD3) model the built-in k-diffusion 2M treats sigma as VE while ours steps in the flow's lambda: both
    integrate the same ODE and converge to the same 100-step reference (checked in the test above)."""
    report = _report()
    for kind in ("eps", "v"):
        assert report["runs"][kind]["DPM++ 2M (dpm-solver-nodes)"]["max_abs_vs_builtin"] < 1e-5, kind


def test_sde_noise_is_seeded_by_the_webui():
    report = _report()
    runs = report["runs"]["eps"]
    for entry in _catalog().ENTRIES:
        if entry.stochastic:
            assert runs[entry.label]["repeatable"], entry.label
            assert runs[entry.label]["seed_changes_result"], entry.label


def test_ems_tab_builds_and_its_job_runs_through_txt2img_processing():
    report = _report()
    assert ["DPM-Solver-v3", "dpm_solver_v3_ems"] in report["tabs"]
    job = report["tab_job"]
    assert job["interrupted_stored"] == [] and job["interrupted_message"].startswith("EMS not computed")
    assert len(job["stored"]) == 1 and job["images"] == BATCH
    assert "cfg 3, N 50, K 4, per_channel, checkpoint 5eed5eed5e" in job["message"]


def test_the_ems_job_stops_on_interrupt_also_while_it_tunes():
    """The tab's job at N 64, K 16 is interrupted while it tunes (the WebUI's Interrupt, pressed inside a denoiser
    call): it stops before the end, shows no images and stores nothing."""
    stop = _report()["tab_job"]["tuning_interrupt"]
    progress = stop["progress"]
    assert progress["tune_rows"] > 0 and "interrupted_at" in progress, progress
    # the tuning's evaluations are the job's last: the stop came after the estimation, before the end
    assert progress["total"] - progress["tune_rows"] < progress["interrupted_at"] <= progress["done"] < \
        progress["total"], progress
    assert stop["message"].startswith("EMS not computed: interrupted"), stop["message"]
    assert stop["images"] == 0 and stop["stored"] == [], stop


def test_unsupported_model_is_refused():
    expected = "prediction_type 'x0'" if _host() == "forge" else "parameterization 'x0'"
    assert expected in (_report()["refusal"] or "")


def test_ems_computed_in_the_webui_are_used_and_recorded():
    ems = _report()["ems"]
    assert ems["without_ems"] == "none"
    # the WebUI rounds timesteps (A1111 with "Enable quantization in K samplers"; Forge and reForge always); the job
    # runs with continuous timesteps and restores the rounding afterwards
    assert ems["quantize_before"] and not ems["quantize_during"] and ems["quantize_after"]
    assert ems["stored"] and ems["samples_finite"] and ems["finite"]
    assert ems["with_ems"].startswith("5eed5eed5e cfg 5 N 20 K 16 per_channel")
    # the EMS change the result, or their stored check sent this NFE to DPM-Solver++(2M) (logged): both use them
    assert ems["changed_by_ems"] > 0 or ems["fallback_logged"], (ems["changed_by_ems"], ems["v3_decisions"])
    assert ems["parsed_sampler"] == "DPM-Solver-v3 (dpm-solver-nodes)"
    assert "DPM-Solver-v3 EMS: 5eed5eed5e cfg 5 N 20 K 16 per_channel" in ems["infotext"]
    # pasting the parameters restores the v3 settings that differ from the current ones
    assert ems["override_settings"] == {"dpm_solver_v3_order": 2}


def test_v3_with_webui_ems_is_no_worse_than_without():
    """DPM-Solver-v3 with EMS computed in the WebUI (N 20, K 16, the mixture model, CFG 5), 12 Karras steps, against
    the 100-step built-in DPM++ 2M: the statistics must help, or at least not hurt."""
    ems = _report()["ems"]
    assert ems["mse_with_ems"] < max(0.01, 2 * ems["mse_without_ems"]), (ems["mse_with_ems"], ems["mse_without_ems"])


def test_what_v3_ran_is_in_the_infotext_and_a_fallback_is_not_silent():
    """The infotext field "DPM-Solver-v3 ran" says what ran: without EMS (CFG 5, corrector Automatic = off) the
    paper's DPM-Solver++(2M); with the EMS, the solver of the stored decision at the checked NFE nearest 12 steps.
    Running without EMS, or on a solver the EMS check chose over v3, is logged at WARNING (the level the WebUI's
    console shows by default)."""
    import math

    report = _report()
    ems = report["ems"]
    assert ems["without_ems_ran"] == "DPM-Solver++(2M) (no EMS and corrector off)"
    assert any(m.startswith("DPM-Solver-v3: no EMS for this checkpoint") for m in report["warnings"])
    decisions = json.loads(ems["v3_decisions"])
    nfe, solver, ratio = min(decisions, key=lambda d: (abs(math.log(d[0] / STEPS)), d[0]))[:3]
    if solver == "v3":
        assert ems["with_ems_ran"].startswith("v3 with EMS") and f"at {nfe} NFE" in ems["with_ems_ran"]
    else:
        name = {"dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_3m": "DPM-Solver++(3M)", "unipc": "UniPC"}[solver]
        assert ems["with_ems_ran"].startswith(name) and f"at {nfe} NFE" in ems["with_ems_ran"], ems["with_ems_ran"]
        assert any(m.startswith(f"DPM-Solver-v3: the EMS check chose {name} over v3 at {nfe} NFE")
                   for m in report["warnings"]), report["warnings"]
    assert "DPM-Solver-v3 ran: " in ems["infotext"]


if __name__ == "__main__" and "--harness" in sys.argv:
    harness()


def test_recommended_schedule_type_is_listed_once_and_samples():
    """'DPM-Solver recommended' in sd_schedulers.schedulers once after Reload UI, in schedulers_map by name and label;
    the built-in and our DPM++ 2M run on it for every model kind, land within 0.01 MSE of the 100-step reference and
    record it in the infotext."""
    report = _report()
    assert report["schedules"].count("dpm_solver_recommended") == 1
    assert report["schedule_map"] == ["DPM-Solver recommended", "dpm_solver_recommended"]
    for kind, runs in report["runs"].items():
        for name in ("DPM++ 2M", "DPM++ 2M (dpm-solver-nodes)"):
            run = runs[f"{name} / recommended"]
            assert run["finite"] and run["mse"] < 0.01, (kind, name, run)
            assert run["schedule_type"] == "DPM-Solver recommended", (kind, name, run)
