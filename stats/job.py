"""The one EMS job every host runs: the model's own samples (x0) -> EMS estimate -> tuning (``stats.tuning``; the
v3-vs-DPM-Solver++(2M) check where the settings leave the tuning too few model rows) -> store, with one progress
count, a status line with the time left, interrupt and resume.

Hosts give only a ``ModelAccess``: ``run(phase, work)`` calls ``work(model, extra_args, device)`` with the host's
denoiser ``model(x, sigma, **extra_args) -> x0`` for that phase ("x0", "estimate", "tune", "check") inside whatever
the host needs (ComfyUI: its CFG guider's sampling call; the WebUI: continuous timesteps and its fixed batch).  Its
optional attributes ``network_dtype`` and ``rows_independent`` let the job take the cheaper paths (``ModelAccess``).
What is computed is ``EMSSettings`` x ``EMSTarget``; the file is found again by their ``EMSKey``.

Interrupts: ``should_stop()`` is asked before every model call; True (or an exception from it or from
``progress``) stops the job.  ``EMSJobInterrupted.state`` (also ``exception.ems_job_state`` on any exception) holds
the samples, the estimator's partial sums and the estimate; ``run`` keeps the last one per key in memory and resumes
from it when the same job is started again in this process (an interrupted tuning starts again from its beginning,
the estimation is kept).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import threading
import time

import torch

from .ems import EMS
from . import tuning
from .estimate import EstimationInterrupted, check_v3_against_dpmpp_2m, estimate_ems, generate_x0
from .settings import EMSKey, EMSSettings, EMSTarget
from .store import EMSStore, EMSStoreError
from .tuning import tuning_calls, tuning_rows

logger = logging.getLogger("dpm_solver_nodes")

# seconds of an estimation row (a JVP) / a forward row, until the estimation's first chunk is timed: about what a JVP
# cost on the ComfyUI tests' checkpoint (bench/results_comfy_ems_cost.md)
JVP_SECONDS_FACTOR = 3.0

PHASES = ("x0", "estimate", "tune", "check")
PHASE_TITLES = {"x0": "generating the model's samples", "estimate": "estimating the statistics",
                "tune": "tuning the fit and the solver per step count", "check": "checking v3 against DPM-Solver++(2M)"}
STATUS_INTERVAL = 2.0  # seconds between two status texts while a phase runs
FALLBACK_FOLDER = os.path.join(tempfile.gettempdir(), "dpm_solver_v3_ems_unsaved")
_INTERRUPTED = {}  # key digest -> JobState of the last interrupted run (resumed by the next run of that key)


class ModelAccess:
    """The plain library case: the same ``model`` and ``extra_args`` for every phase, on ``device``.

    ``network_dtype``: the dtype the network computes in, where known; float32 or float64 lets ``jvp="auto"`` use
    one-sided differences (fewer model rows than forward AD's JVPs; in float16 a difference is noise).
    ``rows_independent``: the model treats every row on its own (per-row sigma, conditioning broadcast to any batch),
    so the tuning may send the rows of several sampler runs through one call (``stats.tuning.Lockstep``); the
    embedded models' row-labelled wrapper is not."""

    def __init__(self, model, extra_args=None, device="cpu", *, network_dtype=None, rows_independent=False):
        self.model, self.extra_args, self.device = model, extra_args or {}, device
        self.network_dtype, self.rows_independent = network_dtype, rows_independent

    def run(self, phase, work):
        return work(self.model, self.extra_args, self.device)


def resolve_jvp(jvp, network_dtype):
    """The JVP back-end a job runs for the settings' ``jvp``: "auto" is one-sided differences where the network
    computes in float32 or float64 (``network_dtype``), else forward AD (falling back to central differences)."""
    if jvp == "auto" and network_dtype in (torch.float32, torch.float64):
        return "one_sided_difference"
    return jvp


def format_seconds(seconds) -> str:
    """'45 s', '3 min 20 s', '1 h 05 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclasses.dataclass
class JobState:
    """What an interrupted job had finished: ``x0`` (CPU), the estimator's ``estimation`` state, the ``ems`` (the
    untuned fit once the estimation has finished)."""

    key_json: str
    x0: torch.Tensor = None
    estimation: object = None
    ems: EMS = None


class EMSJobInterrupted(RuntimeError):
    def __init__(self, state, phase):
        super().__init__(f"EMS job interrupted during {phase}; run it again with the same settings to resume")
        self.state, self.phase = state, phase


@dataclasses.dataclass
class JobResult:
    """``ems``; ``path`` where it is stored (None if it could not be saved anywhere); ``source`` "cached" or
    "computed"; ``save_error`` the message when the store could not take it; ``seconds``; ``cost`` (model rows);
    ``x0`` the samples (CPU) when computed; ``phases`` the measured rows and seconds per phase (computed results)."""

    ems: EMS
    path: str
    source: str
    seconds: float
    save_error: str = None
    cost: dict = None
    x0: torch.Tensor = None  # the model's samples the EMS were estimated on (computed results only)
    phases: dict = None


class _Counter:
    """Counts model rows per phase for the progress callback, asks ``should_stop`` before every call, measures the
    seconds per row of each phase and turns them into a time estimate for the ``status`` callback (and one log line
    when the first chunk of the x0 and estimation phases has been timed)."""

    def __init__(self, plan, progress, should_stop, status=None, jvp_factor=1.0, calls=None):
        self.plan = dict(plan)
        self.planned_calls, self.calls = calls, 0
        self.total = max(int(sum(self.plan.values())), 1)
        self.progress, self.should_stop, self.status = progress, should_stop, status
        self.jvp_factor = jvp_factor  # seconds per estimation row / seconds per forward row, until measured
        self.done = 0
        self.rows = {phase: 0 for phase in self.plan}
        self.seconds = {phase: 0.0 for phase in self.plan}
        self.phase = None
        self.state = None
        self.started = self.phase_started = time.perf_counter()
        self.last_status = -math.inf
        self.logged = set()
        self.lock = threading.Lock()

    def enter(self, phase):
        """Start timing ``phase`` (the previous phase's time is kept)."""
        self._close()
        self.phase, self.phase_started = phase, time.perf_counter()
        self.rows.setdefault(phase, 0)
        self.seconds.setdefault(phase, 0.0)
        self.plan.setdefault(phase, 0)
        self._status(force=True)

    def _close(self):
        if self.phase is not None:
            now = time.perf_counter()
            self.seconds[self.phase] += now - self.phase_started
            self.phase_started = now

    def wrap(self, model, report=True, calls=True):
        """``model`` counted; with ``report``, asking ``should_stop`` and reporting progress around each call.  The
        estimator gets ``report=False`` and does both between its chunks: an exception raised inside a model call
        there would read as a failure of forward AD.  ``calls=False``: rows only, for the runs that share model
        calls in a ``Lockstep`` (whose own model is wrapped by ``count_calls``)."""
        def call(x, sigma, **kwargs):
            if report:
                self.check()
            out = model(x, sigma, **kwargs)
            with self.lock:  # runs in lockstep count from their own threads
                self.calls += int(calls)
                self.done += int(x.shape[0])
                self.rows[self.phase] = self.rows.get(self.phase, 0) + int(x.shape[0])
            if report:
                self.report()
            return out

        return call

    def count_calls(self, model):
        def call(x, sigma, **kwargs):
            with self.lock:
                self.calls += 1
            return model(x, sigma, **kwargs)

        return call

    def check(self):
        if self.should_stop is not None and self.should_stop():
            raise EMSJobInterrupted(self.state, self.phase)
        return False

    def report(self, *_):
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        if self.phase in ("x0", "estimate") and self.phase not in self.logged and self.rows[self.phase]:
            self.logged.add(self.phase)
            left = self.seconds_left()
            logger.info("DPM-Solver-v3 EMS: the first %s chunk (%d model rows) took %.2f s; about %s left in all",
                        "x0" if self.phase == "x0" else "estimation", self.rows[self.phase], self.elapsed(self.phase),
                        format_seconds(left) if left is not None else "?")
        self._status()

    def elapsed(self, phase):
        extra = time.perf_counter() - self.phase_started if phase == self.phase else 0.0
        return self.seconds.get(phase, 0.0) + extra

    def seconds_per_row(self, phase):
        """Measured in ``phase``, else from the phase measured on the largest calls: the estimation (its rows cost
        ``jvp_factor`` forward rows), else the other phases (the x0 phase's calls hold only K samples)."""
        if self.rows.get(phase):
            return self.elapsed(phase) / self.rows[phase]
        if self.rows.get("estimate"):
            rate = self.elapsed("estimate") / self.rows["estimate"] / self.jvp_factor
        else:
            forward = [p for p in ("tune", "check", "x0") if self.rows.get(p)]
            if not forward:
                return None
            rate = self.elapsed(forward[0]) / self.rows[forward[0]]
        return rate * self.jvp_factor if phase == "estimate" else rate

    def seconds_left(self):
        left = 0.0
        for phase, planned in self.plan.items():
            remaining = max(planned - self.rows.get(phase, 0), 0)
            if remaining:
                rate = self.seconds_per_row(phase)
                if rate is None:
                    return None
                left += remaining * rate
        return left

    def text(self):
        """The status line: phase, share of the model rows done, time so far and the estimate of what is left."""
        done = f"{100 * min(self.done, self.total) / self.total:.0f}%"
        if self.planned_calls:
            done += f" (model call {self.calls:,} of about {max(self.planned_calls, self.calls):,})"
        left = self.seconds_left()
        estimate = f"about {format_seconds(left)} left" if left is not None else "timing the first call"
        return (f"DPM-Solver-v3 EMS, {PHASE_TITLES.get(self.phase, self.phase)}: {done}; "
                f"{format_seconds(time.perf_counter() - self.started)} so far, {estimate}")

    def _status(self, force=False):
        if self.status is None:
            return
        now = time.perf_counter()
        if force or now - self.last_status >= STATUS_INTERVAL:
            self.last_status = now
            self.status(self.text())

    def measured(self):
        """{phase: {"rows", "seconds"}} of the phases that ran."""
        self._close()
        return {phase: {"rows": self.rows[phase], "seconds": round(self.seconds[phase], 3)}
                for phase in self.rows if self.rows[phase]}


class EMSJob:
    """EMS of ``target`` with ``settings`` (see the module docstring).

    ``batch_size``: samples per model call while generating x0 and estimating (memory only).  ``metadata``: extra
    strings stored in the file (host, prompt, model name, ...).
    """

    def __init__(self, target: EMSTarget, settings: EMSSettings = None, *, batch_size=8, dtype=torch.float32,
                 metadata=None):
        if not isinstance(target, EMSTarget):
            raise ValueError(f"target must be an EMSTarget, got {type(target).__name__}")
        settings = EMSSettings() if settings is None else settings
        if not isinstance(settings, EMSSettings):
            raise ValueError(f"settings must be an EMSSettings, got {type(settings).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.target, self.settings, self.batch_size, self.dtype = target, settings, batch_size, dtype
        self.key = EMSKey(target, settings)
        self.state = None
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    @property
    def guided(self) -> bool:
        """cfg != 1: the network runs twice per sample, and the tuning's fallback is DPM-Solver++(2M) alone."""
        return self.target.cfg != 1.0

    def _pack(self):
        return 1 if self.guided else len(tuning.PACK_SOLVERS)

    def cost(self, access=None) -> dict:
        """Model rows per phase and in total (``EMSSettings.cost``, doubled when cfg != 1), for the JVP back-end
        the job runs through ``access`` (``resolve_jvp``; without ``access``, the settings' ``jvp``)."""
        return self.settings.cost(guided=self.guided, backend=self._backend(access))

    def _backend(self, access):
        return resolve_jvp(self.settings.jvp, getattr(access, "network_dtype", None))

    def overlap(self, access=None) -> int:
        """Samples per set of the tuning whose reference solutions run alongside the estimation, in the same model
        calls (``stats.tuning.Lockstep``; the references need only the model, and alone they are a hundred small
        calls); 0 where they run in the tuning: rows not independent, no tuning, trajectory samples, forward AD (its
        dual tensors belong to the thread that made them), or a batch size below 4 x the tuning's samples per set
        (the estimation keeps the larger share of each call)."""
        s = self.settings
        samples = s.tuning_plan(self.guided)[0]
        if (samples and getattr(access, "rows_independent", False) and s.samples == "diffused"
                and self._backend(access).endswith("difference") and self.batch_size >= 4 * samples):
            return samples
        return 0

    def estimator_batch(self, access=None) -> int:
        """Samples per estimation call: the batch size, less the references' rows where they run alongside
        (``overlap``), and no more than keeps the estimation's calls as many as the references' steps (the
        references then never run alone in calls of a few rows)."""
        overlap = self.overlap(access)
        if not overlap:
            return self.batch_size
        s = self.settings
        per_node = self._per_node(access)
        chunks = -(-(tuning.REFERENCE_FACTOR * max(s.check_nfes) - 10) // per_node)
        return max(1, min(self.batch_size - 2 * overlap, (s.N + 1) * s.K // chunks))

    def _per_node(self, access):
        s = self.settings
        return {"finite_difference": 3 + 2 * s.n_probes, "one_sided_difference": 2 + s.n_probes}.get(
            self._backend(access), s.n_probes + 1) + (s.substeps if s.samples == "trajectory" else 0)

    def plan(self, access=None) -> dict:
        """Rows the progress count expects per phase, in the phase they run in (samples through the host's
        denoiser, a JVP counted as one; not doubled by CFG); phases that will not run are 0."""
        s = self.settings
        backend = self._backend(access)
        per_node = {"finite_difference": 3 + 2 * s.n_probes, "one_sided_difference": 2 + s.n_probes}.get(
            backend, s.n_probes + 1) + (s.substeps if s.samples == "trajectory" else 0)
        samples, fits = s.tuning_plan(self.guided)
        check_samples, steps, nfes = s.check_plan() if not samples else (0, 0, ())
        plan = {"x0": s.K * s.x0_steps, "estimate": (s.N + 1) * s.K * per_node + 10,
                "tune": tuning_rows(samples, s.check_nfes, len(fits), pack=self._pack()) if samples else 0,
                "check": check_samples * (steps + 2 * sum(nfes))}
        overlap = self.overlap(access)
        if overlap:
            references = 2 * overlap * tuning.REFERENCE_FACTOR * max(s.check_nfes)
            plan["estimate"] += references
            plan["tune"] -= references
        return plan

    def calls(self, access=None) -> dict:
        """Model calls per phase (about: the tuning's runs in lockstep finish at different times) and in total."""
        s = self.settings
        batch = self.batch_size
        chunks = -(-s.K // batch)
        backend = self._backend(access)
        per_node = {"finite_difference": 3 + 2 * s.n_probes, "one_sided_difference": 2 + s.n_probes}.get(
            backend, s.n_probes + 1) + (s.substeps if s.samples == "trajectory" else 0)
        samples, fits = s.tuning_plan(self.guided)
        check_samples, steps, nfes = s.check_plan() if not samples else (0, 0, ())
        lockstep = batch if getattr(access, "rows_independent", False) else None
        overlap = self.overlap(access)
        estimator_batch = self.estimator_batch(access)
        if getattr(access, "rows_independent", False) and s.samples == "diffused":  # chunks span grid nodes
            estimate = -(-(s.N + 1) * s.K // estimator_batch) * per_node + 10
        else:
            estimate = (s.N + 1) * chunks * per_node + 10
        tune = tuning_calls(samples, s.check_nfes, len(fits), batch_rows=lockstep, pack=self._pack()) if samples else 0
        if overlap:  # the references' steps share the estimation's calls
            reference_steps = tuning.REFERENCE_FACTOR * max(s.check_nfes)
            estimate = max(estimate, reference_steps)
            tune -= reference_steps * -(-2 * overlap // batch)
        calls = {"x0": chunks * s.x0_steps, "estimate": estimate, "tune": tune,
                 "check": steps * -(-check_samples // batch) + 2 * sum(nfes) if check_samples else 0}
        calls["total"] = sum(calls.values())
        return calls

    def _calls(self, access=None):
        """Model rows the progress count expects in all."""
        return sum(self.plan(access).values())

    # ---- the computation -------------------------------------------------------------------------------------
    def compute(self, access, *, progress=None, should_stop=None, resume=None, status=None) -> EMS:
        """x0 -> estimate -> tuning (or check) through ``access`` (a ``ModelAccess``); returns the EMS (not stored).

        ``progress(done, total)``: model rows (the row count is an upper bound: a diverging tuning candidate stops
        early, so a finished job reports total / total and the host's bar ends full).  ``status(text)``: a line for
        people (phase, share done, time so far and left, measured on the chunks run), at each phase and every
        ``STATUS_INTERVAL`` seconds.  ``self.phases`` holds the measured rows and seconds per phase afterwards.
        ValueError, before any model call, where the settings leave no budget to check v3 (``unverified_reason``)."""
        reason = self.settings.unverified_reason()
        if reason is not None:
            raise ValueError(f"DPM-Solver-v3 EMS: {reason}")
        ems = self._compute(access, progress=progress, should_stop=should_stop, resume=resume, status=status)
        if progress is not None:
            total = max(int(self._calls(access)), 1)
            progress(total, total)
        return ems

    def _compute(self, access, *, progress=None, should_stop=None, resume=None, status=None) -> EMS:
        s, t = self.settings, self.target
        key_json = self.key.to_json()
        if resume is not None and resume.key_json != key_json:
            raise ValueError("resume belongs to another EMS job (its settings or target differ)")
        state = resume or JobState(key_json)
        self.state = state
        backend = self._backend(access)
        counter = _Counter(self.plan(access), progress, should_stop, status,
                           jvp_factor=1.0 if backend.endswith("difference") else JVP_SECONDS_FACTOR,
                           calls=self.calls(access)["total"])
        counter.state = state
        self.phases = None
        shape = tuple(t.latent_shape)
        try:
            if state.x0 is None:
                counter.enter("x0")

                def generate(model, extra_args, device):
                    return generate_x0(counter.wrap(model), shape, s.K, t.sigma_max, t.sigma_min, t.model_kind,
                                       steps=s.x0_steps, seed=s.seed, extra_args=extra_args,
                                       batch_size=self.batch_size, dtype=self.dtype, device=device).cpu()

                state.x0 = access.run("x0", generate)
            x0_seconds = counter.elapsed("x0")
            samples, fits = s.tuning_plan(self.guided)
            references = None
            if state.ems is None:
                counter.enter("estimate")
                overlap = self.overlap(access)

                def estimator(model, extra_args, device, batch_size):
                    try:
                        x0 = state.x0.to(device, self.dtype).clone()  # a normal tensor, also from inference mode
                        options = dict(s.estimate_options(), jvp=backend)
                        return estimate_ems(
                            counter.wrap(model, report=False, calls=not overlap), x0, t.sigma_min, t.sigma_max, model_kind=t.model_kind,
                            batch_size=batch_size, extra_args=extra_args,
                            resume_state=state.estimation, should_stop=counter.check, progress=counter.report,
                            metadata={"cfg": repr(float(t.cfg))}, return_state=True,
                            rows_independent=bool(getattr(access, "rows_independent", False)), **options)
                    except BaseException as error:
                        state.estimation = getattr(error, "estimation_state", state.estimation)
                        raise

                def estimate(model, extra_args, device):
                    if not overlap:
                        return estimator(model, extra_args, device, self.batch_size), None
                    noise = tuning.tuning_noise(shape, overlap, s.seed, self.dtype, device)
                    jobs = [lambda proxy: estimator(proxy, extra_args, device, self.estimator_batch(access))]
                    jobs += [lambda proxy, job=job: job(counter.wrap(proxy, report=False, calls=False))
                             for job in tuning.reference_jobs(noise, overlap, t.sigma_min, t.sigma_max, t.model_kind,
                                                              extra_args, tuple(s.check_nfes))]
                    results = tuning.Lockstep(counter.count_calls(model), self.batch_size).run(jobs)
                    return results[0], torch.cat(results[1:])

                (ems, state.estimation), references = access.run("estimate", estimate)
                state.ems = ems.replace(metadata=self._metadata(ems, x0_seconds))
            if samples:
                counter.enter("tune")
                batch_rows = self.batch_size if getattr(access, "rows_independent", False) else None

                def tune(model, extra_args, device):
                    tuned, _ = tuning.tune(counter.wrap(model), state.estimation, state.ems.lambdas,
                                           state.ems.stat_shape, t.sigma_min, t.sigma_max, model_kind=t.model_kind,
                                           samples=samples, seed=s.seed, nfes=tuple(s.check_nfes), fits=fits,
                                           extra_args=extra_args, dtype=self.dtype, device=device,
                                           metadata=dict(state.ems.metadata), batch_rows=batch_rows,
                                           references=references)
                    return tuned

                result = access.run("tune", tune)
                self.phases = counter.measured()
                return result
            check_samples, steps, nfes = s.check_plan()
            if check_samples == 0:
                logger.warning("DPM-Solver-v3 EMS: check_samples=0, so the v3-vs-DPM-Solver++ check is skipped and "
                               "these EMS carry no decisions: v3 runs unverified at every NFE")
                self.phases = counter.measured()
                return state.ems.replace(metadata={"v3_check": "skipped"})
            if s.tune:
                needed = tuning.tuning_rows(tuning.MIN_SAMPLES, s.check_nfes, len(tuning.FAMILY_ENDS),
                                            pack=self._pack())
                logger.warning("DPM-Solver-v3 EMS: N = %d, K = %d give the tuning too few model rows (%d; it needs "
                               "%d: raise N x K by %.0f%%); running the v3-vs-DPM-Solver++(2M) check instead", s.N,
                               s.K, s.tuning_budget(), needed, 100 * (needed / s.tuning_budget() - 1))

            counter.enter("check")

            def check(model, extra_args, device):
                return check_v3_against_dpmpp_2m(counter.wrap(model), state.ems, shape, t.sigma_min, t.sigma_max,
                                                 seed=s.seed, steps=steps, samples=check_samples, nfes=nfes,
                                                 model_kind=t.model_kind, extra_args=extra_args,
                                                 batch_size=self.batch_size, dtype=self.dtype, device=device)

            result = access.run("check", check)
            self.phases = counter.measured()
            return result
        except EstimationInterrupted as error:
            state.estimation = error.state
            raise EMSJobInterrupted(state, "estimate") from None
        except BaseException as error:
            try:
                error.ems_job_state = state
            except Exception:  # noqa: BLE001 - exceptions without a __dict__
                pass
            raise

    def _metadata(self, ems, x0_seconds):
        t, s = self.target, self.settings
        info = {"cache_key": self.key.to_json(), "fingerprint": t.fingerprint, "cfg": repr(float(t.cfg)),
                "guidance": s.guidance, "model_kind": t.model_kind, "sigma_digest": t.sigma_digest,
                "x0_source": f"model samples, DPM-Solver++(2M) {s.x0_steps} steps at this cfg",
                "x0_steps": str(s.x0_steps), "x0_seconds": f"{x0_seconds:.1f}"}
        info.update(self.metadata)
        return info

    # ---- compute or load, and store ---------------------------------------------------------------------------
    def run(self, access, store: EMSStore = None, *, name_prefix="ems", recompute=False, progress=None,
            should_stop=None, resume=None, status=None) -> JobResult:
        """The stored EMS for this key (unless ``recompute``), else compute and store them.

        The store's folder is checked for writing before computing (``EMSStoreError`` if it is not writable).  A
        save that fails after the computation keeps the EMS: it goes to ``FALLBACK_FOLDER`` if possible, the
        result carries the message in ``save_error``, and the EMS are returned either way.
        """
        started = time.perf_counter()
        digest = self.key.digest()
        if store is not None and not recompute:
            ems, path = store.get(self.key)
            if ems is not None:
                logger.info("DPM-Solver-v3: EMS loaded from %s", path)
                return JobResult(ems, path, "cached", time.perf_counter() - started, cost=self.cost(access))
        if store is not None:
            store.check_writable()
        if resume is None and digest in _INTERRUPTED:
            resume = _INTERRUPTED[digest]
            logger.info("DPM-Solver-v3: resuming the interrupted EMS job for these settings")
        cost, calls = self.cost(access), self.calls(access)
        logger.info("DPM-Solver-v3: computing EMS (N=%d, K=%d, %s, cfg %g, JVP by %s) for model %s: %s model rows "
                    "(%s) in about %s model calls of up to %d samples",
                    self.settings.N, self.settings.K, self.settings.reduction, self.target.cfg,
                    self._backend(access), self.target.fingerprint[:16], f"{cost['total']:,}",
                    ", ".join(f"{phase} {rows:,}" for phase, rows in cost.items() if rows and phase != "total"),
                    f"{calls['total']:,}", self.batch_size)
        try:
            ems = self.compute(access, progress=progress, should_stop=should_stop, resume=resume, status=status)
        except BaseException as error:
            state = getattr(error, "state", None) or getattr(error, "ems_job_state", None)
            if state is not None and (state.x0 is not None or state.ems is not None):
                _INTERRUPTED.clear()  # keep one: x0 and moments can be large
                _INTERRUPTED[digest] = state
            raise
        _INTERRUPTED.pop(digest, None)
        path, save_error = None, None
        if store is not None:
            name = store.file_name(self.key, name_prefix)
            try:
                path = store.save(ems, name)
            except (EMSStoreError, ValueError) as error:
                save_error = str(error)
                try:
                    path = EMSStore([FALLBACK_FOLDER]).save(ems, name)
                    save_error += f"; the EMS were saved to {path} instead (move it into the EMS folder)"
                except (EMSStoreError, ValueError) as second:
                    save_error += f"; saving to {FALLBACK_FOLDER} failed too ({second}); the EMS are kept in memory"
                logger.warning("DPM-Solver-v3: %s", save_error)
        seconds = time.perf_counter() - started
        if path and not save_error:
            logger.info("DPM-Solver-v3: EMS saved to %s (%.1f s)", path, seconds)
        if self.phases:
            logger.info("DPM-Solver-v3 EMS: measured %s", ", ".join(
                f"{phase} {v['rows']:,} rows in {v['seconds']:.1f} s" for phase, v in self.phases.items()))
        return JobResult(ems, path, "computed", seconds, save_error, cost, self.state.x0, self.phases)


__all__ = ["EMSJob", "ModelAccess", "JobResult", "JobState", "EMSJobInterrupted", "PHASES", "PHASE_TITLES",
           "FALLBACK_FOLDER", "resolve_jvp", "format_seconds"]
