"""The one EMS job every host runs: the model's own samples (x0) -> EMS estimate -> v3-vs-DPM-Solver++(2M) check
-> store, with one progress count, interrupt and resume.

Hosts give only a ``ModelAccess``: ``run(phase, work)`` calls ``work(model, extra_args, device)`` with the host's
denoiser ``model(x, sigma, **extra_args) -> x0`` for that phase ("x0", "estimate", "check") inside whatever the host
needs (ComfyUI: its CFG guider's sampling call; the WebUI: continuous timesteps and its fixed batch).  What is
computed is ``EMSSettings`` x ``EMSTarget``; the file is found again by their ``EMSKey``.

Interrupts: ``should_stop()`` is asked before every model call; True (or an exception from it or from
``progress``) stops the job.  ``EMSJobInterrupted.state`` (also ``exception.ems_job_state`` on any exception) holds
the samples, the estimator's partial sums and the estimate; ``run`` keeps the last one per key in memory and resumes
from it when the same job is started again in this process.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

import torch

from .ems import EMS
from .estimate import EstimationInterrupted, check_v3_against_dpmpp_2m, estimate_ems, generate_x0
from .settings import EMSKey, EMSSettings, EMSTarget
from .store import EMSStore, EMSStoreError
from .tuning import tuning_rows

logger = logging.getLogger("dpm_solver_nodes")

PHASES = ("x0", "estimate", "check")
FALLBACK_FOLDER = os.path.join(tempfile.gettempdir(), "dpm_solver_v3_ems_unsaved")
_INTERRUPTED = {}  # key digest -> JobState of the last interrupted run (resumed by the next run of that key)


class ModelAccess:
    """The plain library case: the same ``model`` and ``extra_args`` for every phase, on ``device``."""

    def __init__(self, model, extra_args=None, device="cpu"):
        self.model, self.extra_args, self.device = model, extra_args or {}, device

    def run(self, phase, work):
        return work(self.model, self.extra_args, self.device)


@dataclasses.dataclass
class JobState:
    """What an interrupted job had finished: ``x0`` (CPU), the estimator's ``estimation`` state, the ``ems``."""

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
    ``x0`` the samples (CPU) when computed."""

    ems: EMS
    path: str
    source: str
    seconds: float
    save_error: str = None
    cost: dict = None
    x0: torch.Tensor = None  # the model's samples the EMS were estimated on (computed results only)


class _Counter:
    """Counts model rows for the progress callback and asks ``should_stop`` before every call."""

    def __init__(self, total, progress, should_stop):
        self.total, self.progress, self.should_stop = max(int(total), 1), progress, should_stop
        self.done = 0
        self.phase = None
        self.state = None

    def wrap(self, model, report=True):
        """``model`` counted; with ``report``, asking ``should_stop`` and reporting progress around each call.  The
        estimator gets ``report=False`` and does both between its chunks: an exception raised inside a model call
        there would read as a failure of forward AD."""
        def call(x, sigma, **kwargs):
            if report:
                self.check()
            out = model(x, sigma, **kwargs)
            self.done += int(x.shape[0])
            if report:
                self.report()
            return out

        return call

    def check(self):
        if self.should_stop is not None and self.should_stop():
            raise EMSJobInterrupted(self.state, self.phase)
        return False

    def report(self, *_):
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


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

    def cost(self) -> dict:
        """Model rows per phase and in total (``EMSSettings.cost``, doubled when cfg != 1)."""
        return self.settings.cost(guided=self.target.cfg != 1.0)

    def _calls(self):
        """Model rows the progress count expects (each JVP counted as one call)."""
        s = self.settings
        samples, steps, nfes = s.check_plan()
        per_sample = (s.n_probes + 1) + (s.substeps if s.samples == "trajectory" else 0)
        tuned = s.tuning_samples()
        if tuned:
            return s.K * s.x0_steps + (s.N + 1) * s.K * per_sample + 10 + tuning_rows(tuned, s.check_nfes)
        return s.K * s.x0_steps + (s.N + 1) * s.K * per_sample + 10 + samples * (steps + 2 * sum(nfes))

    # ---- the computation -------------------------------------------------------------------------------------
    def compute(self, access, *, progress=None, should_stop=None, resume=None) -> EMS:
        """x0 -> estimate -> check through ``access`` (a ``ModelAccess``); returns the EMS (not stored).  The row
        count behind ``progress`` is an upper bound (a skipped check, early-stopping tuning), so a finished job
        reports total / total: the host's bar ends full."""
        ems = self._compute(access, progress=progress, should_stop=should_stop, resume=resume)
        if progress is not None:
            total = max(int(self._calls()), 1)
            progress(total, total)
        return ems

    def _compute(self, access, *, progress=None, should_stop=None, resume=None) -> EMS:
        s, t = self.settings, self.target
        key_json = self.key.to_json()
        if resume is not None and resume.key_json != key_json:
            raise ValueError("resume belongs to another EMS job (its settings or target differ)")
        state = resume or JobState(key_json)
        self.state = state
        counter = _Counter(self._calls(), progress, should_stop)
        counter.state = state
        shape = tuple(t.latent_shape)
        started = time.perf_counter()
        try:
            if state.x0 is None:
                counter.phase = "x0"

                def generate(model, extra_args, device):
                    return generate_x0(counter.wrap(model), shape, s.K, t.sigma_max, t.sigma_min, t.model_kind,
                                       steps=s.x0_steps, seed=s.seed, extra_args=extra_args,
                                       batch_size=self.batch_size, dtype=self.dtype, device=device).cpu()

                state.x0 = access.run("x0", generate)
            x0_seconds = time.perf_counter() - started
            if state.ems is None:
                counter.phase = "estimate"

                def estimate(model, extra_args, device):
                    try:
                        x0 = state.x0.to(device, self.dtype).clone()  # a normal tensor, also from inference mode
                        return estimate_ems(
                            counter.wrap(model, report=False), x0, t.sigma_min, t.sigma_max, model_kind=t.model_kind,
                            batch_size=self.batch_size, extra_args=extra_args,
                            resume_state=state.estimation, should_stop=counter.check, progress=counter.report,
                            metadata={"cfg": repr(float(t.cfg))},
                            **s.estimate_options())
                    except BaseException as error:
                        state.estimation = getattr(error, "estimation_state", state.estimation)
                        raise

                ems = access.run("estimate", estimate)
                state.ems = ems.replace(metadata=self._metadata(ems, x0_seconds))
            counter.phase = "check"
            if "tuning" in state.ems.metadata:  # the tuning measured its decisions on held-out trajectories
                return state.ems
            samples, steps, nfes = s.check_plan()
            if samples == 0:
                logger.info("DPM-Solver-v3 EMS: the v3-vs-DPM-Solver++(2M) check is skipped (check samples 0 or "
                            "more than the estimation's cost for these settings); v3 runs at every NFE")
                return state.ems.replace(metadata={"v3_check": "skipped"})

            def check(model, extra_args, device):
                return check_v3_against_dpmpp_2m(counter.wrap(model), state.ems, shape, t.sigma_min, t.sigma_max,
                                                 seed=s.seed, steps=steps, samples=samples, nfes=nfes,
                                                 model_kind=t.model_kind, extra_args=extra_args,
                                                 batch_size=self.batch_size, dtype=self.dtype, device=device)

            return access.run("check", check)
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
            should_stop=None, resume=None) -> JobResult:
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
                return JobResult(ems, path, "cached", time.perf_counter() - started, cost=self.cost())
        if store is not None:
            store.check_writable()
        if resume is None and digest in _INTERRUPTED:
            resume = _INTERRUPTED[digest]
            logger.info("DPM-Solver-v3: resuming the interrupted EMS job for these settings")
        logger.info("DPM-Solver-v3: computing EMS (N=%d, K=%d, %s, cfg %g, %d model rows) for model %s",
                    self.settings.N, self.settings.K, self.settings.reduction, self.target.cfg, self.cost()["total"],
                    self.target.fingerprint[:16])
        try:
            ems = self.compute(access, progress=progress, should_stop=should_stop, resume=resume)
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
        return JobResult(ems, path, "computed", seconds, save_error, self.cost(), self.state.x0)


__all__ = ["EMSJob", "ModelAccess", "JobResult", "JobState", "EMSJobInterrupted", "PHASES", "FALLBACK_FOLDER"]
