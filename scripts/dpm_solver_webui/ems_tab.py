"""The "DPM-Solver-v3" tab: compute the empirical model statistics (EMS) of the loaded checkpoint.

How it runs: a txt2img job of one batch whose sampler is an ``EMSJob`` instead of a solver.  The WebUI builds the
conditioning, loads the model and wraps it in its own CFG denoiser exactly as for an image, then calls the job
like a sampler.  It runs the package's one EMS job (``stats.EMSJob``: K samples of the model at the chosen CFG,
the estimate, the v3-vs-DPM-Solver++(2M) check) and stores the result for the checkpoint (``EMSStore``); the first
batch of samples comes back as the job's images, a preview of the data the EMS describe.  The job runs in a thread
(``TabRun``) so the tab shows its progress (sample evaluations, time left, denoiser calls) while it runs; the tab's
Interrupt and the WebUI's stop it, between the job's steps or inside the next denoiser call (the WebUI's
``InterruptedException``), and nothing is stored (a rerun with the same settings resumes).

Cost, shown before the start: ``stats.EMSSettings.cost`` (K x (x0 steps) rows for the samples, (N + 1) x K x 2 JVP
rows, about 2-3 forward passes each, for the statistics, then the tuning or the check, no larger than the
estimation). Forward AD needs an attention
implementation with forward-mode derivatives; otherwise the estimator falls back to finite differences (logged).
Forge's discrete predictors and reForge's ldm_patched model sampling map sigma to the nearest integer timestep
(their ``timestep`` is an argmin) and A1111 does the same with "Enable quantization in K samplers" on, which would
make dD/dlambda = 0 or drop the timestep's share of it, so during the job ``continuous_timesteps`` interpolates the
index in log sigma instead.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import html
import logging
import math
import threading
import time

import torch

from ...stats.estimate import generate_x0
from ...stats.job import EMSJob as StatsEMSJob
from ...stats.job import EMSJobInterrupted
from ...stats.settings import EMSSettings, EMSTarget
from . import registration, settings
from .ems_store import checkpoint_sha256, sigma_digest

logger = logging.getLogger("dpm_solver_nodes")

X0_STEPS = 20   # DPM++ 2M steps of the data samples: the WebUI's default Steps, an ordinary image
FLOW_SIGMA_CAP = 0.999
PHASE_NAMES = {"x0": "the data samples", "estimate": "the estimation", "check": "the check"}  # stats.job.PHASES


class FixedBatchModel:
    """Calls the WebUI's CFG denoiser, whose conditioning is for exactly ``batch`` rows, with any number of rows:
    chunks of ``batch``, the last padded by repeating its final row (the prompt is the same for every row).
    ``on_call()`` is called after each call of the denoiser (a sign of life where the job reports no progress)."""

    def __init__(self, model, batch, on_call=None):
        self.model, self.batch, self.on_call = model, int(batch), on_call

    def __call__(self, x, sigma, **extra_args):
        outputs = []
        for lo in range(0, x.shape[0], self.batch):
            xs, ss = x[lo:lo + self.batch], sigma[lo:lo + self.batch]
            rows = xs.shape[0]
            if rows < self.batch:
                xs = torch.cat([xs, xs[-1:].expand(self.batch - rows, *xs.shape[1:])])
                ss = torch.cat([ss, ss[-1:].expand(self.batch - rows)])
            outputs.append(self.model(xs, ss, **extra_args)[:rows])
            if self.on_call is not None:
                self.on_call()
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

    def __init__(self, model, batch, extra_args, device, on_call=None):
        self.model, self.extra_args, self.device = model, extra_args, device
        self.fixed = FixedBatchModel(model, batch, on_call)

    def run(self, phase, work):
        with continuous_timesteps(self.model):
            return work(self.fixed, self.extra_args, self.device)


class EMSJob:
    """A WebUI sampler function (``KDiffusionSampler(job, sd_model)``) that runs ``stats.EMSJob`` for the loaded
    checkpoint at the processing's cfg and stores the result in ``store``.

    After the call, ``result`` is the EMS, ``path`` the file, ``key`` the ``stats.EMSKey``, ``save_error`` the
    message of a failed save and ``source`` "computed" or "cached" (all None if it failed).
    """

    def __init__(self, store, *, N, K, reduction, seed=0, x0_steps=X0_STEPS, jvp="auto", progress=None,
                 should_stop=None, on_model_call=None):
        if reduction not in settings.REDUCTION_CHOICES:
            raise ValueError(f"reduction must be one of {settings.REDUCTION_CHOICES}, got {reduction!r}")
        self.store = store
        self.settings = EMSSettings(N=int(N), K=int(K), reduction=reduction, seed=int(seed), x0_steps=int(x0_steps),
                                    jvp=jvp)
        self.progress, self.should_stop, self.on_model_call = progress, should_stop, on_model_call
        self.result = self.path = self.key = self.save_error = self.source = None

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
        access = WebUIModelAccess(model, x.shape[0], extra_args, x.device, self.on_model_call)
        result = job.run(access, self.store, name_prefix="ems", progress=self.progress,
                         should_stop=self.should_stop)
        self.result, self.path, self.key, self.save_error = result.ems, result.path, job.key, result.save_error
        self.source = result.source
        logger.info("DPM-Solver-v3: EMS %s in %s", result.source, self.path)
        if result.x0 is not None:  # the first batch of the job's samples, a preview of the data
            return result.x0[:x.shape[0]].to(x.device, x.dtype)
        with continuous_timesteps(model):  # stored EMS: draw the same first samples again
            x0 = generate_x0(access.fixed, tuple(x.shape[1:]), x.shape[0], sigma_max, sigma_min, kind,
                             steps=self.settings.x0_steps, seed=self.settings.seed, extra_args=extra_args,
                             batch_size=x.shape[0], device=x.device)
        return x0.to(x.dtype)


def run_in_webui(store, prompt, negative_prompt, cfg_scale, width, height, batch_size, seed, x0_steps=X0_STEPS,
                 progress=None, should_stop=None, on_model_call=None):
    """Run an ``EMSJob`` through the WebUI's txt2img processing with the current EMS settings (Settings ->
    DPM-Solver: N, K, reduction); returns (images or None, message).  ``progress(done, total)`` and
    ``should_stop()`` are the job's own (``stats.EMSJob.compute``), ``on_model_call()`` follows every call of the
    WebUI's denoiser.  The WebUI's Interrupt also stops it: between the job's steps, or inside the next call of the
    denoiser, which raises the WebUI's ``InterruptedException`` (in every phase, also where the job asks no
    ``should_stop``)."""
    from modules import processing, sd_samplers_common, sd_samplers_kdiffusion, shared
    from modules.scripts import ScriptRunner
    from modules.shared import state

    opts = shared.opts
    N = settings.get(opts, "dpm_solver_ems_grid")
    K = settings.get(opts, "dpm_solver_ems_samples")
    reduction = settings.get(opts, "dpm_solver_ems_reduction")
    batch_size = max(1, int(batch_size))
    K = int(math.ceil(K / batch_size) * batch_size)

    def report(done, total):
        state.sampling_steps, state.sampling_step = total, done
        state.textinfo = f"DPM-Solver-v3 EMS: {done}/{total} sample evaluations"
        if progress is not None:
            progress(done, total)

    def stop():
        return bool(state.interrupted) or (should_stop is not None and bool(should_stop()))

    job = EMSJob(store, N=N, K=K, reduction=reduction, seed=int(seed), x0_steps=int(x0_steps), progress=report,
                 should_stop=stop, on_model_call=on_model_call)
    stopped = []  # where an interrupt stopped the job

    def function(model, x, sigmas=None, extra_args=None, callback=None, disable=None):
        try:
            return job(model, x, sigmas, extra_args, callback, disable)
        except EMSJobInterrupted as error:
            stopped.append("during " + PHASE_NAMES.get(error.phase, error.phase))
        except sd_samplers_common.InterruptedException:
            stopped.append("inside a model call")
        return x  # the processing decodes something; the tab shows no images of an interrupted job

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
    if stopped:
        return None, (f"EMS not computed: interrupted {stopped[0]}; nothing was stored (computing again with the "
                      "same settings resumes where it stopped).")
    if job.result is None:
        return None, "EMS not computed (interrupted or failed); nothing was stored."
    if job.save_error:
        stored = f"EMS computed but not stored: {job.save_error}"
    else:
        stored = f"EMS {'loaded (already computed)' if job.source == 'cached' else 'stored'}: {job.path}"
    return processed.images, (f"{stored}\n{describe_decisions(job.result)}\n{job.result!r}\ncfg {cfg_scale:g}, "
                              f"N {N}, K {K}, {reduction}, checkpoint {job.key.target.fingerprint[:10]}")


def describe_decisions(ems):
    """Where the EMS make DPM-Solver-v3 run v3 and where another solver (their per-NFE decisions), in one line."""
    decisions = getattr(ems, "decisions", ())
    if not decisions:
        return ("No check ran for these EMS (a file from an earlier version, or computed with the check turned off): "
                "DPM-Solver-v3 runs v3 with them at every step count, unchecked.")
    by_solver = {}
    for decision in decisions:
        by_solver.setdefault(decision.solver, []).append(str(decision.nfe))
    parts = [f"{'v3' if solver == 'v3' else registration.SOLVER_NAMES[solver]} at {', '.join(nfes)} NFE"
             for solver, nfes in by_solver.items()]
    return ("DPM-Solver-v3 runs " + "; ".join(parts) + " (the check's choice per NFE; a run uses the one nearest its "
            "step count).")


def _any_sampler_name():
    """A valid sampler name for the job's processing object (its sampler is replaced by the job)."""
    from modules import sd_samplers

    return sd_samplers.all_samplers[0].name


# ---- cost and progress shown in the tab ----------------------------------------------------------------------------

def job_settings(N, K, reduction, x0_steps, batch_size, seed=0):
    """The ``EMSSettings`` the tab's job will run (K rounded up to whole batches, as ``run_in_webui`` does)."""
    batch_size = max(1, int(batch_size))
    return EMSSettings(N=int(N), K=int(math.ceil(int(K) / batch_size) * batch_size), reduction=reduction,
                       seed=int(seed), x0_steps=int(x0_steps))


def format_duration(seconds):
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_text(N, K, reduction, x0_steps, batch_size, seconds_per_row=None):
    """The cost shown before a job starts: ``EMSSettings.cost`` model rows per phase (the WebUI's CFG denoiser
    evaluates cond and uncond, so guided), and the time at the speed measured on this checkpoint and size."""
    try:
        cost = job_settings(N, K, reduction, x0_steps, batch_size).cost(guided=True)
    except ValueError as error:
        return f"Invalid settings: {error}"
    text = (f"Cost: {cost['total']:,} model rows (data samples {cost['x0']:,}, estimation {cost['estimate']:,}, "
            f"tuning {cost['tune']:,}, check {cost['check']:,}; cond and uncond each count).")
    if seconds_per_row:
        text += (f" At the speed measured on this checkpoint and size: about "
                 f"{format_duration(seconds_per_row * cost['total'])}.")
    else:
        text += " Time: measured on the first chunk once it starts."
    reason = job_settings(N, K, reduction, x0_steps, batch_size).unverified_reason()
    if reason is not None:
        text += f" The job will refuse these settings: {reason}."
    return text


class TabRun:
    """The tab's EMS job: one at a time, in a thread (so the tab can show its progress while it runs), through
    the WebUI's queue (``call_queue.wrap_gradio_gpu_call``: one generation at a time, ``shared.state``, errors).

    Progress counts the job's sample evaluations.  The time left is measured, from the first chunk on, at the rate
    of the last ``RATE_WINDOW`` seconds (the phases differ in cost per evaluation: a data-sample step is one forward
    pass, an estimation row a JVP), and the denoiser calls are counted too (the job reports no progress while it
    tunes).  ``stop()`` (the tab's Interrupt) stops the job: its own ``should_stop`` between steps and, once the job
    is running, the WebUI's interrupt inside the next denoiser call (the only stop while it tunes); nothing is
    stored."""

    RATE_WINDOW = 20.0

    def __init__(self):
        self.thread = None
        self.stop_requested = threading.Event()
        self.done = self.total = 0
        self.work_started = self.first_chunk = self.finished = None
        self.reports = collections.deque()  # (time, done) of the progress reports of the last RATE_WINDOW seconds
        self.model_calls = 0
        self.interrupt_host = _interrupt_webui
        self.outputs = None
        self.cost_rows = None
        self.speed_key = None
        self.speeds = {}  # (checkpoint, width, height, batch) -> seconds per model row of EMSSettings.cost

    def running(self):
        return self.thread is not None and self.thread.is_alive()

    def start(self, store, args, cost_rows, speed_key):
        """Start the job for ``args`` (``run_in_webui``'s from prompt to x0_steps); False if one is running."""
        if self.running():
            return False
        from modules import call_queue

        self.stop_requested.clear()
        self.done = self.total = 0
        self.work_started = self.first_chunk = self.finished = None
        self.reports.clear()
        self.model_calls = 0
        self.outputs, self.cost_rows, self.speed_key = None, cost_rows, speed_key

        def compute(*values):   # (images, message, info HTML: the WebUI appends its timing there)
            images, message = run_in_webui(store, *values, progress=self.progress, should_stop=self.should_stop,
                                           on_model_call=self.model_call)
            return images, message, ""

        def work():
            try:
                self.outputs = call_queue.wrap_gradio_gpu_call(compute, extra_outputs=[None, ""])(*args)
            except BaseException as error:  # noqa: BLE001 - shown in the tab
                logger.exception("DPM-Solver-v3 EMS job failed")
                self.outputs = [None, f"EMS job failed: {type(error).__name__}: {error}", ""]
            finally:
                self.finished = time.monotonic()

        self.thread = threading.Thread(target=work, name="dpm_solver_v3_ems", daemon=True)
        self.thread.start()
        return True

    def stop(self):
        self.stop_requested.set()
        if self.work_started is not None and self.finished is None:   # our job holds the WebUI, not a generation
            self.interrupt_host()

    def model_call(self):
        self.model_calls += 1

    def should_stop(self):
        if self.work_started is None:      # asked before the first model call: the job's work starts now
            self.work_started = time.monotonic()
        return self.stop_requested.is_set()

    def progress(self, done, total):
        now = time.monotonic()
        if self.work_started is None:
            self.work_started = now
        self.done, self.total = int(done), int(total)
        if self.first_chunk is None and done > 0:
            self.first_chunk = (int(done), now - self.work_started)
        self.reports.append((now, self.done))
        while len(self.reports) > 2 and now - self.reports[1][0] > self.RATE_WINDOW:
            self.reports.popleft()
        if done >= total and self.cost_rows:   # the speed for the next estimate at this checkpoint and size
            self.speeds[self.speed_key] = (now - self.work_started) / self.cost_rows

    def seconds_left(self):
        """The time left at the rate of the last RATE_WINDOW seconds (None before two reports)."""
        if len(self.reports) < 2:
            return None
        (start, first), (end, last) = self.reports[0], self.reports[-1]
        if last <= first or end <= start:
            return None
        return (self.total - self.done) * (end - start) / (last - first)

    def progress_html(self):
        """The progress line: evaluations done / total, elapsed, ETA, and the first chunk's measurement."""
        if self.thread is None:
            return ""
        end = self.finished if self.finished is not None else time.monotonic()
        elapsed = end - self.work_started if self.work_started is not None else 0.0
        if not self.total:
            line = ("Preparing (loading the model, building the conditioning)..." if self.finished is None else
                    "Ended before the first model call of the job.")
        else:
            percent = 100.0 * self.done / self.total
            line = f"{self.done:,} / {self.total:,} sample evaluations ({percent:.0f}%), {format_duration(elapsed)}"
            left = self.seconds_left() if self.finished is None else None
            if left is not None:
                line += f", about {format_duration(left)} left"
            if self.first_chunk is not None:
                done, seconds = self.first_chunk
                line += f"; first chunk: {done:,} in {seconds:.2f} s"
            line += f"; denoiser calls: {self.model_calls:,}"
        if self.stop_requested.is_set() and self.finished is None:
            line += "; stopping..."
        value = f' value="{self.done}" max="{max(self.total, 1)}"' if self.total else ""
        return (f'<div id="dpm_solver_ems_progress"><progress style="width: 100%"{value}></progress>'
                f'<div class="dpm-solver-ems-progress-text">{html.escape(line)}</div></div>')


def _interrupt_webui():
    from modules import shared

    shared.state.interrupt()


RUN = TabRun()


def _current_checkpoint():
    from modules import shared

    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    return getattr(info, "title", None) or getattr(info, "filename", None) or ""


def _store_settings(N, K, reduction):
    """The tab's N, K and reduction into Settings -> DPM-Solver (saved), so the sampler looks up these EMS."""
    from modules import shared

    changed = False
    for key, value in (("dpm_solver_ems_grid", int(N)), ("dpm_solver_ems_samples", int(K)),
                       ("dpm_solver_ems_reduction", reduction)):
        if settings.get(shared.opts, key) != value:
            shared.opts.set(key, value)
            changed = True
    if changed:
        shared.opts.save(shared.config_filename)


def build(store):
    """The gradio block of the tab."""
    import gradio as gr
    from modules import shared

    def setting(key):
        return lambda: settings.get(shared.opts, key)

    grid, samples = settings.SETTINGS_BY_KEY["dpm_solver_ems_grid"], settings.SETTINGS_BY_KEY["dpm_solver_ems_samples"]
    with gr.Blocks(analytics_enabled=False) as block:
        gr.Markdown("Compute DPM-Solver-v3's empirical model statistics (EMS) for the **loaded checkpoint** at the "
                    "CFG you sample at. The DPM-Solver-v3 sampler then uses them automatically (nearest CFG) and "
                    "records in the infotext what it ran. Grid size, sample count and statistics shape are saved to "
                    "Settings -> DPM-Solver when you start.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt (empty: unconditional data)", lines=2, elem_id="dpm_solver_ems_prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="dpm_solver_ems_negative")
        with gr.Row():
            cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG scale (compute EMS at the CFG you sample at)",
                            elem_id="dpm_solver_ems_cfg")
            width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="dpm_solver_ems_width")
            height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="dpm_solver_ems_height")
        with gr.Row():
            n_grid = gr.Slider(grid.minimum, grid.maximum, value=setting(grid.key), step=grid.step,
                               label="Grid size N", elem_id="dpm_solver_ems_grid")
            k_samples = gr.Slider(samples.minimum, samples.maximum, value=setting(samples.key), step=samples.step,
                                  label="Samples K", elem_id="dpm_solver_ems_samples")
            reduction = gr.Radio(list(settings.REDUCTION_CHOICES), value=setting("dpm_solver_ems_reduction"),
                                 label="Statistics shape", elem_id="dpm_solver_ems_reduction")
        with gr.Row():
            batch = gr.Slider(1, 64, value=4, step=1, label="Batch size (memory only)", elem_id="dpm_solver_ems_batch")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="dpm_solver_ems_seed")
            x0_steps = gr.Slider(4, 200, value=X0_STEPS, step=1, label="Steps for the data samples (DPM++ 2M)",
                                 elem_id="dpm_solver_ems_x0_steps")
        estimate = gr.Markdown(elem_id="dpm_solver_ems_estimate")
        with gr.Row():
            button = gr.Button("Compute EMS", variant="primary", elem_id="dpm_solver_ems_compute")
            interrupt = gr.Button("Interrupt", elem_id="dpm_solver_ems_interrupt")
        progress = gr.HTML(elem_id="dpm_solver_ems_progress_box")
        status = gr.Textbox(label="Outcome", lines=4, interactive=False, elem_id="dpm_solver_ems_status")
        gallery = gr.Gallery(label="Samples the EMS were computed on", columns=4, elem_id="dpm_solver_ems_gallery")
        info = gr.HTML(elem_id="dpm_solver_ems_info")

        cost_inputs = [n_grid, k_samples, reduction, x0_steps, batch, width, height]

        def show_estimate(N, K, reduction_value, x0, batch_size, w, h):
            speed = RUN.speeds.get((_current_checkpoint(), int(w), int(h), int(batch_size)))
            return estimate_text(N, K, reduction_value, x0, batch_size, speed)

        for component in cost_inputs:
            component.change(fn=show_estimate, inputs=cost_inputs, outputs=[estimate], queue=False)
        block.load(fn=show_estimate, inputs=cost_inputs, outputs=[estimate], queue=False)

        def compute(prompt_text, negative_text, cfg_value, w, h, N, K, reduction_value, batch_size, seed_value, x0):
            if RUN.running():
                yield gr.update(), "An EMS computation is already running.", RUN.progress_html(), gr.update(), \
                    gr.update()
                return
            try:
                cost = job_settings(N, K, reduction_value, x0, batch_size, seed_value).cost(guided=True)["total"]
            except ValueError as error:
                yield gr.update(), f"Invalid settings: {error}", "", gr.update(), gr.update()
                return
            _store_settings(N, K, reduction_value)
            args = (prompt_text, negative_text, cfg_value, w, h, batch_size, seed_value, x0)
            RUN.start(store, args, cost, (_current_checkpoint(), int(w), int(h), int(batch_size)))
            while RUN.running():
                yield gr.update(), "Computing EMS...", RUN.progress_html(), gr.update(), gr.update()
                time.sleep(0.5)
            images, message, timing = (list(RUN.outputs) + [None, "", ""])[:3]
            message = message or "EMS not computed: the job failed (the WebUI's message is below)."
            yield images, message, RUN.progress_html(), timing, show_estimate(N, K, reduction_value, x0, batch_size,
                                                                                 w, h)

        button.click(fn=compute, inputs=[prompt, negative, cfg, width, height, n_grid, k_samples, reduction, batch,
                                         seed, x0_steps],
                     outputs=[gallery, status, progress, info, estimate], show_progress="hidden")
        interrupt.click(fn=RUN.stop, inputs=[], outputs=[], queue=False)
    return block
