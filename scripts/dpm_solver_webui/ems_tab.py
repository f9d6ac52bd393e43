"""The "DPM-Solver-v3" tab: compute the empirical model statistics (EMS) of the loaded checkpoint.

How it runs: a txt2img job of one batch whose sampler is an ``EMSJob`` instead of a solver.  The WebUI builds the
conditioning, loads the model and wraps it in its own CFG denoiser exactly as for an image, then calls the job
like a sampler.  It runs the package's one EMS job (``stats.EMSJob``: K samples of the model at the chosen CFG,
the estimate, the v3-vs-DPM-Solver++(2M) check) and stores the result for the checkpoint (``EMSStore``); the first
batch of samples comes back as the job's images, a preview of the data the EMS describe.  Progress goes to
``shared.state``; "Interrupt" stops it (the WebUI's CFG denoiser raises inside the next model call) and nothing is
stored (a rerun with the same settings resumes).

Cost: ``stats.EMSSettings.cost`` (K x (x0 steps) rows for the samples, (N + 1) x K x 2 JVP rows, about 2-3 forward
passes each, for the statistics, and a check no larger than the estimation). Forward AD needs an attention
implementation with forward-mode derivatives; otherwise the estimator falls back to finite differences (logged).
Forge's discrete predictors and reForge's ldm_patched model sampling map sigma to the nearest integer timestep
(their ``timestep`` is an argmin) and A1111 does the same with "Enable quantization in K samplers" on, which would
make dD/dlambda = 0 or drop the timestep's share of it, so during the job ``continuous_timesteps`` interpolates the
index in log sigma instead.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch

from ...stats.estimate import generate_x0
from ...stats.job import EMSJob as StatsEMSJob
from ...stats.settings import EMSSettings, EMSTarget
from . import registration, settings
from .ems_store import checkpoint_sha256, sigma_digest

logger = logging.getLogger("dpm_solver_nodes")

X0_STEPS = 50
FLOW_SIGMA_CAP = 0.999


class FixedBatchModel:
    """Calls the WebUI's CFG denoiser, whose conditioning is for exactly ``batch`` rows, with any number of rows:
    chunks of ``batch``, the last padded by repeating its final row (the prompt is the same for every row)."""

    def __init__(self, model, batch):
        self.model, self.batch = model, int(batch)

    def __call__(self, x, sigma, **extra_args):
        outputs = []
        for lo in range(0, x.shape[0], self.batch):
            xs, ss = x[lo:lo + self.batch], sigma[lo:lo + self.batch]
            rows = xs.shape[0]
            if rows < self.batch:
                xs = torch.cat([xs, xs[-1:].expand(self.batch - rows, *xs.shape[1:])])
                ss = torch.cat([ss, ss[-1:].expand(self.batch - rows)])
            outputs.append(self.model(xs, ss, **extra_args)[:rows])
        return torch.cat(outputs)


def interpolated_timestep(sigma, log_sigmas):
    """The fractional timestep of ``sigma`` on a discrete schedule: linear in log sigma between the two table
    entries around it (k-diffusion's ``DiscreteSchedule.sigma_to_t`` without quantization), clamped to the table."""
    log_sigmas = log_sigmas.to(sigma.device)
    log_sigma = sigma.log().to(log_sigmas.dtype)
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


def _rounding_samplers(model):
    """The objects whose ``timestep(sigma)`` rounds to an integer timestep on the model's path: Forge's predictor
    (``ForgeScheduleLinker.predictor``) and reForge's ldm_patched model sampling
    (``sd_model.forge_objects.unet.model.model_sampling``), each when it has a discrete ``log_sigmas`` table (flow
    samplings have none, and Forge's flow predictor is "const")."""
    wrap = registration.denoiser_wrap(model)
    unet = getattr(getattr(registration.checkpoint_of(model), "forge_objects", None), "unet", None)
    candidates = [getattr(wrap, "predictor", None), getattr(getattr(unet, "model", None), "model_sampling", None)]
    found = []
    for candidate in candidates:
        if candidate is None or any(candidate is other for other in found):
            continue
        if getattr(candidate, "log_sigmas", None) is None or getattr(candidate, "prediction_type", None) == "const":
            continue
        if callable(getattr(candidate, "timestep", None)):
            found.append(candidate)
    return found


@contextlib.contextmanager
def continuous_timesteps(model):
    """While active, sigma maps to a fractional timestep: Forge's discrete predictor and reForge's ldm_patched
    discrete model sampling (whose ``timestep`` is an argmin) interpolate in log sigma, and A1111's CompVisDenoiser
    runs with ``quantize`` off (the "Enable quantization in K samplers" setting).  Flow samplings are left alone."""
    patched = _rounding_samplers(model)
    for sampling in patched:
        sampling.timestep = functools.partial(interpolated_timestep, log_sigmas=sampling.log_sigmas)
    wrap = registration.denoiser_wrap(model)
    quantize = getattr(wrap, "quantize", None)
    if quantize:
        wrap.quantize = False
    try:
        yield
    finally:
        for sampling in patched:
            del sampling.timestep
        if quantize:
            wrap.quantize = quantize


class WebUIModelAccess:
    """``stats.job``'s model access in the WebUI: every phase calls the WebUI's CFG denoiser with any number of
    rows (``FixedBatchModel``) under ``continuous_timesteps``."""

    def __init__(self, model, batch, extra_args, device):
        self.model, self.fixed, self.extra_args, self.device = model, FixedBatchModel(model, batch), extra_args, device

    def run(self, phase, work):
        with continuous_timesteps(self.model):
            return work(self.fixed, self.extra_args, self.device)


class EMSJob:
    """A WebUI sampler function (``KDiffusionSampler(job, sd_model)``) that runs ``stats.EMSJob`` for the loaded
    checkpoint at the processing's cfg and stores the result in ``store``.

    After the call, ``result`` is the EMS, ``path`` the file, ``key`` the ``stats.EMSKey`` and ``save_error`` the
    message of a failed save (all None if it failed).
    """

    def __init__(self, store, *, N, K, reduction, seed=0, x0_steps=X0_STEPS, jvp="auto", progress=None,
                 should_stop=None):
        if reduction not in settings.REDUCTION_CHOICES:
            raise ValueError(f"reduction must be one of {settings.REDUCTION_CHOICES}, got {reduction!r}")
        self.store = store
        self.settings = EMSSettings(N=int(N), K=int(K), reduction=reduction, seed=int(seed), x0_steps=int(x0_steps),
                                    jvp=jvp)
        self.progress, self.should_stop = progress, should_stop
        self.result = self.path = self.key = self.save_error = None

    def __call__(self, model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        kind = registration.detect_model_kind(model)
        table = registration.model_sigmas(model)
        sd_model = registration.checkpoint_of(model)
        if table is None or sd_model is None:
            raise ValueError("DPM-Solver-v3 EMS: the loaded model exposes no sigma table")
        model_hash = checkpoint_sha256(sd_model, compute=True)
        if model_hash is None:
            raise ValueError("DPM-Solver-v3 EMS: the loaded checkpoint has no file hash (is a checkpoint loaded?)")
        sigma_min, sigma_max = float(table[0]), float(table[-1])
        if kind == "flow":
            sigma_max = min(sigma_max, FLOW_SIGMA_CAP)
        p = getattr(model, "p", None)
        target = EMSTarget(model_hash, kind, float(getattr(p, "cfg_scale", 1.0)), tuple(x.shape[1:]), sigma_min,
                           sigma_max, sigma_digest(table))
        info = {"host": "webui", "prompt": str(getattr(p, "prompt", ""))[:200],
                "model_name": getattr(getattr(sd_model, "sd_checkpoint_info", None), "model_name", "")}
        job = StatsEMSJob(target, self.settings, batch_size=x.shape[0], metadata=info)
        access = WebUIModelAccess(model, x.shape[0], extra_args, x.device)
        result = job.run(access, self.store, name_prefix="ems", progress=self.progress,
                         should_stop=self.should_stop)
        self.result, self.path, self.key, self.save_error = result.ems, result.path, job.key, result.save_error
        logger.info("DPM-Solver-v3: EMS %s in %s", result.source, self.path)
        if result.x0 is not None:  # the first batch of the job's samples, a preview of the data
            return result.x0[:x.shape[0]].to(x.device, x.dtype)
        with continuous_timesteps(model):  # stored EMS: draw the same first samples again
            x0 = generate_x0(access.fixed, tuple(x.shape[1:]), x.shape[0], sigma_max, sigma_min, kind,
                             steps=self.settings.x0_steps, seed=self.settings.seed, extra_args=extra_args,
                             batch_size=x.shape[0], device=x.device)
        return x0.to(x.dtype)


def run_in_webui(store, prompt, negative_prompt, cfg_scale, width, height, batch_size, seed, x0_steps=X0_STEPS):
    """Run an ``EMSJob`` through the WebUI's txt2img processing with the current EMS settings; returns a message."""
    from modules import processing, sd_samplers_common, sd_samplers_kdiffusion, shared
    from modules.scripts import ScriptRunner
    from modules.shared import state

    opts = shared.opts
    N = settings.get(opts, "dpm_solver_ems_grid")
    K = settings.get(opts, "dpm_solver_ems_samples")
    reduction = settings.get(opts, "dpm_solver_ems_reduction")
    batch_size = max(1, int(batch_size))
    K = int(math.ceil(K / batch_size) * batch_size)

    def progress(done, total):
        state.sampling_steps, state.sampling_step = total, done
        state.textinfo = f"DPM-Solver-v3 EMS: {done}/{total} sample evaluations"

    job = EMSJob(store, N=N, K=K, reduction=reduction, seed=int(seed), x0_steps=int(x0_steps), progress=progress,
                 should_stop=lambda: bool(state.interrupted))

    def function(model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        return job(model, x, sigmas, extra_args, callback, disable)

    def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        sampler = sd_samplers_kdiffusion.KDiffusionSampler(function, p.sd_model)
        sampler.config = sd_samplers_common.SamplerData("DPM-Solver-v3 EMS", None, [], {})
        p.sampler = sampler
        x = p.rng.next()
        return sampler.sample(p, x, conditioning, unconditional_conditioning,
                              image_conditioning=p.txt2img_image_conditioning(x))

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative_prompt, cfg_scale=float(cfg_scale),
        width=int(width), height=int(height), batch_size=batch_size, n_iter=1, steps=1, seed=int(seed),
        sampler_name=_any_sampler_name(), scheduler="Automatic", do_not_save_samples=True, do_not_save_grid=True)
    p.sample = sample
    # no txt2img scripts run on the job (they would alter the data the EMS describe); an empty runner rather than
    # None, which reForge's processing dereferences
    p.scripts, p.script_args = ScriptRunner(), []
    try:
        processed = processing.process_images(p)
    finally:
        p.close()
    if job.result is None:
        return None, "EMS not computed (interrupted or failed); nothing was stored."
    stored = f"EMS stored: {job.path}" if not job.save_error else f"EMS computed but not stored: {job.save_error}"
    return processed.images, (f"{stored}\n{job.result!r}\ncfg {cfg_scale:g}, N {N}, K {K}, {reduction}, "
                              f"checkpoint {job.key.target.fingerprint[:10]}")


def _any_sampler_name():
    """A valid sampler name for the job's processing object (its sampler is replaced by the job)."""
    from modules import sd_samplers

    return sd_samplers.all_samplers[0].name


def build(store):
    """The gradio block of the tab."""
    import gradio as gr
    from modules import call_queue

    with gr.Blocks(analytics_enabled=False) as block:
        gr.Markdown("Compute DPM-Solver-v3's empirical model statistics (EMS) for the **loaded checkpoint**. "
                    "Grid size, sample count and reduction come from Settings -> DPM-Solver. The DPM-Solver-v3 "
                    "sampler then uses them automatically at the nearest CFG.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt (empty: unconditional data)", lines=2)
            negative = gr.Textbox(label="Negative prompt", lines=2)
        with gr.Row():
            cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale (compute EMS at the CFG you sample at)")
            width = gr.Slider(64, 2048, value=512, step=8, label="Width")
            height = gr.Slider(64, 2048, value=512, step=8, label="Height")
        with gr.Row():
            batch = gr.Slider(1, 64, value=4, step=1, label="Batch size (memory only)")
            seed = gr.Number(value=0, precision=0, label="Seed")
            x0_steps = gr.Slider(4, 200, value=X0_STEPS, step=1, label="Steps for the data samples (DPM++ 2M)")
            button = gr.Button("Compute EMS", variant="primary")
        gallery = gr.Gallery(label="Samples the EMS were computed on", columns=4)
        status = gr.Textbox(label="Status", lines=4, interactive=False)
        info = gr.HTML()

        def compute(*args):
            images, message = run_in_webui(store, *args)
            return images, message, ""

        # wrap_gradio_gpu_call: queue lock, shared.state begin/end, errors and timing shown in the last output
        button.click(fn=call_queue.wrap_gradio_gpu_call(compute, extra_outputs=[None, ""]),
                     inputs=[prompt, negative, cfg, width, height, batch, seed, x0_steps],
                     outputs=[gallery, status, info])
    return block
