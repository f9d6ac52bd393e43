"""Self-tuning DPM-Solver-v3 EMS (issue 12): choose the fit of s, b and the sampler policy per checkpoint by
measurement, after the moments are accumulated.

The estimator's float64 moments (``EstimationState``) determine every fit of ``statistics_from_moments`` (Eq. 11
with l' smoothing, a lambda window for s and b, a ridge on s) and, with common random numbers, every coarser grid
(a subset of nodes).  Which fit makes v3 accurate depends on the model: a +-0.5 lambda window removes a trained
network's roughness in s, b but blurs the real structure of a smooth model, where per-node fits win
(bench/results_ems_tuning.md).  So ``tune`` measures instead of guessing:

1. fresh noise, independent of the estimation's, 2S samples; references from our DPM-Solver++(3M) in its
   third-order Taylor form at ``5 x max(nfes)`` steps on the spacing the check has always used (uniform in lambda for
   eps from sigma_max, in sigma from 1 for flow), ending in a final denoise;
2. on the first S ("selection") samples: every candidate fit (``FITS``) x policy (``POLICIES``: corrector on/off)
   at every NFE, and the pack's own solvers v3 may fall back to (``pack_solvers``: DPM-Solver++(2M) and UniPC bh2
   for eps models, 2M and (3M) for unguided flow models; for a guided model one per NFE, 2M at few steps and UniPC
   from ``GUIDED_UNIPC_FROM`` on; their defaults, as v3's fallback runs them);
3. the fit: the one with the smallest mean over NFEs of log(best policy's error / best of those solvers' error);
   then (``ORDER3``, where the whole family ran on an unguided model) the chosen fit's order-3 predictor with both policies on the same
   samples.  Per NFE the decision: the better policy of order 2, or of order 3 where that is clearly better
   (``clearly_better``: by more than one standard error of the paired mean log error ratio); the pack's solver is
   2M unless the selection ran a second one (unguided) and it is clearly better (a guided model: the one it ran);
   v3 runs where it is clearly better than that solver;
4. on the other S ("report") samples: v3 as planned (at every NFE) and both ``pack_candidates``.  Up to
   ``POOLED_UP_TO`` NFE v3 wins where it is clearly better than the solver on both sets together (the 2S paired
   log error ratios, one standard error; above that NFE on the selection set alone), and at every NFE only where its
   mean error on the report set is below the solver's (a veto: the mean carries the heavy tails the log ratios play
   down).  The stored ``ratio`` of each decision is decided error / the better of the two candidates on the report
   set (< 1: v3 wins): held out for the fit, policy, order and fallback, not for the decision up to
   ``POOLED_UP_TO`` NFE, which the report set helps make.

Cost in model rows (one sample through the model): S x (steps + (|FITS| x |POLICIES| + |POLICIES| (order 3) + 2, or
+ 1 and no order 3 guided) x sum(nfes)) for the selection and S x (steps + 3 x sum(nfes)) for the report; ``tuning_plan`` picks the
largest S (at most ``MAX_SAMPLES``) whose cost does not exceed the estimation's own rows (a JVP row counted as one),
and where even S = 2 does not fit, the two ends of the fit family (``FAMILY_ENDS``: per node, and the +-0.5 window) before giving
up.  With ``batch_rows`` (a model whose rows are independent of each other, e.g. ComfyUI's), the runs of each stage
go through the model together (``Lockstep``): the rows are the same, the model calls far fewer and larger.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import types

import torch

logger = logging.getLogger("dpm_solver_nodes")

TUNE_NFES = (5, 6, 8, 10, 15, 20)
MAX_SAMPLES = 16  # per set (selection, report)
MIN_SAMPLES = 2
REFERENCE_FACTOR = 5  # reference steps = 5 x the largest NFE judged
# the pack's solvers v3 may fall back to, per model kind (``pack_candidates``): two for every model, so the tuning's
# cost is the same whichever two they are
PACK_SOLVERS = ("dpmpp_2m", "unipc")
PACK_BY_KIND = {"eps": ("dpmpp_2m", "unipc"), "flow": ("dpmpp_2m", "dpmpp_3m")}
GUIDED_PACK = ("dpmpp_2m", "unipc")
# a guided model's selection runs one of the pack per NFE: UniPC from this NFE on, DPM-Solver++(2M) below
GUIDED_UNIPC_FROM = {"eps": 10, "flow": 15}
# v3's test pools both sets up to this NFE (the criterion's range): replayed on per-sample errors of 24 mixture /
# guidance pairs against 512 evaluation samples, it cut the criterion's violations at 5-10 NFE as much as twice the
# samples would (bench/ems_decision_study.py, bench/results_ems_decision.md); above it (order 3, guided 15-20 NFE)
# pooled samples let through runs that blew up on a few held-out samples (the archived guided12 study)
POOLED_UP_TO = 10


@dataclasses.dataclass(frozen=True)
class Fit:
    """One way to turn the moments into l, s, b: ``statistics_from_moments(smooth, sb_window, s_ridge)`` on every
    ``stride``-th grid node."""

    name: str
    sb_window: float
    smooth: int
    s_ridge: float
    stride: int = 1


FITS = (
    Fit("node", 0.0, 1, 0.01),
    Fit("node_half_grid", 0.0, 1, 0.01, stride=2),
    Fit("window_0.5", 0.5, 5, 0.01),
)
# (+-0.25 lambda, chosen only on the study's conv net, gave way to the order-3 runs at the same cost)
POLICIES = (True, False)  # use_corrector
# on an unguided model where the whole family runs, the chosen fit's predictor of order 3 (Algorithm 1 with n = 2
# derivatives) with and without corrector is measured too: on the study's unguided eps mixtures it won at 15-20 NFE
# (0.45-0.65x the pack where order 2 was 1.02-1.15x); on guided flow mixtures six selection samples chose it where
# it lost (1.1-1.8x the pack at 8 NFE, cfg 7.5, where order 2 was 0.56x), so guided models keep order 2, as the
# paper recommends for guided sampling
ORDER3 = True
# where the budget cannot pay for every fit: the two kinds that issue 12 found to win on different models (per node on
# smooth models, the +-0.5 window on trained networks)
FAMILY_ENDS = ("node", "window_0.5")


def order3_runs(fits, policies=len(POLICIES), pack=len(PACK_SOLVERS)) -> int:
    """Runs per NFE and selection sample of the order-3 pass: the chosen fit's policies, where the whole family
    (``FITS``) runs on an unguided model (``pack``: the pack's solvers in the selection, one for a guided model)."""
    return policies if ORDER3 and fits == len(FITS) and pack == len(PACK_SOLVERS) else 0


def selection_rows(samples, nfes=TUNE_NFES, fits=len(FITS), policies=len(POLICIES), pack=len(PACK_SOLVERS)) -> int:
    """Rows of the references and the selection set; ``pack``: the pack's solvers run there (those v3 may fall back
    to, ``pack_solvers``: one for a guided model)."""
    steps = REFERENCE_FACTOR * max(nfes)
    return samples * (steps + (fits * policies + order3_runs(fits, policies, pack) + pack) * sum(nfes))


def tuning_rows(samples, nfes=TUNE_NFES, fits=len(FITS), policies=len(POLICIES), pack=len(PACK_SOLVERS)) -> int:
    """Model rows of ``tune`` with ``samples`` per set (the report set runs v3 at every NFE)."""
    steps = REFERENCE_FACTOR * max(nfes)
    return (selection_rows(samples, nfes, fits, policies, pack)
            + samples * (steps + (1 + len(PACK_SOLVERS)) * sum(nfes)))


def tuning_calls(samples, nfes=TUNE_NFES, fits=len(FITS), policies=len(POLICIES), batch_rows=None,
                 pack=len(PACK_SOLVERS)) -> int:
    """Model calls of ``tune`` with ``samples`` per set: one per step of each run, or with ``batch_rows`` (runs in
    ``Lockstep``) one per ``batch_rows`` rows of the runs still going at each step (the report set runs v3 at every
    NFE)."""
    steps = REFERENCE_FACTOR * max(nfes)
    stages = ({nfe: pack + fits * policies for nfe in nfes}, {nfe: len(PACK_SOLVERS) + 1 for nfe in nfes})
    if order3_runs(fits, policies, pack):
        stages += ({nfe: order3_runs(fits, policies, pack) for nfe in nfes},)
    if batch_rows is None:
        return 2 * steps + sum(nfe * runs for stage in stages for nfe, runs in stage.items())
    calls = steps * -(-2 * samples // batch_rows)
    for stage in stages:
        for step in range(1, max(nfes) + 1):
            rows = samples * sum(runs for nfe, runs in stage.items() if nfe >= step)
            calls += -(-rows // batch_rows)
    return calls


def tune_samples(budget_rows, nfes=TUNE_NFES, fits=len(FITS), pack=len(PACK_SOLVERS)) -> int:
    """The largest S <= MAX_SAMPLES with tuning_rows(S) <= budget_rows (0 if below MIN_SAMPLES)."""
    per_sample = tuning_rows(1, nfes, fits, pack=pack)
    samples = min(MAX_SAMPLES, int(budget_rows) // per_sample)
    return samples if samples >= MIN_SAMPLES else 0


def tuning_plan(budget_rows, nfes=TUNE_NFES, guided=False):
    """(S, fits) of the tuning within ``budget_rows``: every fit in ``FITS`` with the largest S that fits, else
    ``FAMILY_ENDS`` at the largest S that fits; (0, ()) where not even that fits (no tuning).  ``guided``: the
    selection runs only DPM-Solver++(2M) of the pack (``pack_solvers``), so a sample costs less."""
    pack = 1 if guided else len(PACK_SOLVERS)
    for fits in (FITS, tuple(f for f in FITS if f.name in FAMILY_ENDS)):
        samples = tune_samples(budget_rows, nfes, len(fits), pack)
        if samples:
            return samples, fits
    return 0, ()


class LockstepAborted(RuntimeError):
    """Raised inside a sampler run whose model call could not be answered (another call raised)."""


class Lockstep:
    """Runs several sampler calls together: each in its own thread, their model calls collected and answered by one
    concatenated call (in chunks of at most ``batch_rows`` rows) from the calling thread, so the host's context
    (inference mode, Interrupt checks, progress) stays in the thread that holds it.  The model must treat rows
    independently (per-row sigma, conditioning broadcast to any batch), as ComfyUI's guided model does.

    ``run(jobs)`` calls every ``job(model)`` and returns their results in order.  An exception, of a job or of a model
    call, ends every job (the others get ``LockstepAborted`` from their next model call) and is raised.
    """

    def __init__(self, model, batch_rows):
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
        self.model, self.batch_rows = model, batch_rows
        self.calls = 0

    def run(self, jobs):
        condition = threading.Condition()
        pending, answers, results = {}, {}, [None] * len(jobs)
        state = {"live": len(jobs), "error": None}
        local = threading.local()
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def proxy(x, sigma, **kwargs):
            index = local.index
            with condition:
                if state["error"] is not None:
                    raise LockstepAborted("another run failed")
                pending[index] = (x, sigma, kwargs)
                condition.notify_all()
                while index not in answers and state["error"] is None:
                    condition.wait()
                if index not in answers:
                    raise LockstepAborted("another run failed")
                return answers.pop(index)

        def worker(index, job):
            local.index = index
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    results[index] = job(proxy)
            except BaseException as error:  # noqa: BLE001 - handed to the calling thread
                with condition:
                    if state["error"] is None and not isinstance(error, LockstepAborted):
                        state["error"] = error
            finally:
                with condition:
                    state["live"] -= 1
                    condition.notify_all()

        threads = [threading.Thread(target=worker, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        try:
            while True:
                with condition:
                    while state["live"] and state["error"] is None and len(pending) < state["live"]:
                        condition.wait()
                    if not state["live"] or state["error"] is not None:
                        break
                    batch = sorted(pending.items())
                    pending.clear()
                outputs = self._answer(batch)
                with condition:
                    answers.update(outputs)
                    condition.notify_all()
        except BaseException as error:
            with condition:
                if state["error"] is None:
                    state["error"] = error
                condition.notify_all()
        for thread in threads:
            thread.join()
        if state["error"] is not None:
            raise state["error"]
        return results

    def _answer(self, batch):
        """One model call per group of requests with the same keyword arguments, chunked to ``batch_rows``."""
        outputs, groups = {}, []
        for index, (x, sigma, kwargs) in batch:
            for group in groups:
                if group[0].keys() == kwargs.keys() and all(group[0][k] is kwargs[k] for k in kwargs):
                    group[1].append((index, x, sigma))
                    break
            else:
                groups.append((kwargs, [(index, x, sigma)]))
        for kwargs, requests in groups:
            xs = torch.cat([x for _, x, _ in requests])
            sigmas = torch.cat([torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
                                for _, x, sigma in requests])
            chunks = []
            for lo in range(0, xs.shape[0], self.batch_rows):
                chunks.append(self.model(xs[lo:lo + self.batch_rows], sigmas[lo:lo + self.batch_rows], **kwargs))
                self.calls += 1
            out = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            lo = 0
            for index, x, _ in requests:
                outputs[index] = out[lo:lo + x.shape[0]]
                lo += x.shape[0]
        return outputs


def sampling_sigmas(nfe, sigma_min, sigma_max, model_kind):
    """The spacing of the EMS check: uniform in lambda from sigma_max (eps) or in sigma from 1, where flow sampling
    starts (flow), plus a final 0; float64."""
    from ..samplers.schedule import noise_schedule

    if model_kind == "flow":
        sigmas = torch.linspace(1.0, sigma_min, nfe, dtype=torch.float64)
    else:
        schedule = noise_schedule(model_kind)
        lams = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), nfe, dtype=torch.float64)
        sigmas = schedule.sigma_from_lambda(lams)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def pack_solver(name):
    """The sampler of a decision solver name (``samplers.ems_data.DECISION_SOLVERS`` are ``samplers.SAMPLERS`` keys)."""
    from ..samplers import SAMPLERS

    return SAMPLERS[name]


def fit_statistics(state, lambdas, stat_shape, fit):
    """(lambdas, (l, s, b), standard errors) of ``fit`` from the estimator's moments (``_finish`` on the nodes)."""
    from .estimate import _finish

    rows = lambdas.shape[0]
    if (rows - 1) % fit.stride:
        raise ValueError(f"fit {fit.name}: stride {fit.stride} does not divide the grid's {rows - 1} cells")
    index = torch.arange(0, rows, fit.stride)
    sliced = types.SimpleNamespace(count=state.count[:, index], means=state.means[:, :, index],
                                   comoments=state.comoments[:, :, index])
    grid = lambdas[index]
    stats, errors = _finish(sliced, grid, stat_shape, fit.smooth, fit.sb_window, fit.s_ridge)
    return grid, stats, errors


def fit_ems(state, lambdas, stat_shape, fit, metadata):
    from .ems import EMS

    grid, (l, s, b), errors = fit_statistics(state, lambdas, stat_shape, fit)
    info = dict(metadata, N=str(grid.shape[0] - 1), smooth=str(fit.smooth), sb_window=f"{fit.sb_window:g}",
                s_ridge=f"{fit.s_ridge:g}", fit=fit.name)
    return EMS(grid, l, s, b, metadata=info, standard_errors=errors)


def _rms(out, reference):
    """Per-sample RMS error (float64); inf where the run produced NaN or inf."""
    error = (out.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt()
    return torch.nan_to_num(error, nan=math.inf)


class _Runner:
    """Runs samplers from the tuning noise and measures their per-sample errors against the references, one stage
    (a list of runs) at a time: one after the other, or in ``Lockstep`` when ``batch_rows`` is given."""

    def __init__(self, model, noise, sigma_min, sigma_max, model_kind, extra_args, batch_rows=None):
        self.model, self.noise, self.reference = model, noise, None
        self.sigma_min, self.sigma_max, self.model_kind = sigma_min, sigma_max, model_kind
        self.extra_args = extra_args
        self.lockstep = Lockstep(model, batch_rows) if batch_rows is not None else None

    def stage(self, jobs):
        """``[job(model) for job in jobs]``, the model calls answered together in lockstep mode."""
        if self.lockstep is None:
            return [job(self.model) for job in jobs]
        return self.lockstep.run(jobs)

    def references(self, samples, nfes):
        """Our DPM-Solver++(3M) in its third-order Taylor form from each set's noise (``reference_jobs``)."""
        jobs = reference_jobs(self.noise, samples, self.sigma_min, self.sigma_max, self.model_kind, self.extra_args,
                              nfes)
        self.reference = torch.cat(self.stage(jobs))
        return self.reference

    def errors(self, runs):
        """Per-sample errors of each run (rows, nfe, solver, ems, use_corrector); inf for a diverging run."""
        return self.stage([lambda model, run=run: self._errors(model, *run) for run in runs])

    def _errors(self, model, rows, nfe, solver, ems=None, use_corrector=True, order=2):
        from ..samplers.common import NonFiniteError
        from ..samplers.v3 import sample_dpm_solver_v3

        sigmas = sampling_sigmas(nfe, self.sigma_min, self.sigma_max, self.model_kind).to(self.noise.device,
                                                                                           self.noise.dtype)
        x = self.noise[rows] * sigmas[0]
        try:
            if solver == "v3":
                out = sample_dpm_solver_v3(model, x, sigmas, self.extra_args, disable=True, ems=ems, order=order,
                                           use_corrector=use_corrector, model_kind=self.model_kind, fallback=False)
            else:
                out = pack_solver(solver)(model, x, sigmas, self.extra_args, disable=True,
                                          model_kind=self.model_kind)
        except (NonFiniteError, ArithmeticError) as error:  # a diverging candidate: the model saw NaN or inf
            logger.debug("DPM-Solver-v3 tuning: %s at %d NFE failed (%s)", solver, nfe, error)
            return torch.full((self.noise[rows].shape[0],), math.inf, dtype=torch.float64)
        return _rms(out, self.reference[rows])


def _mean(errors):
    return float(errors.mean())


def clearly_better(errors, baseline):
    """Whether per-sample ``errors`` beat ``baseline`` on the same samples by more than one standard error of the
    mean log error ratio (paired)."""
    if not torch.isfinite(errors).all():
        return False
    if not torch.isfinite(baseline).all():
        return True
    logs = torch.log(errors.double().clamp(min=1e-300) / baseline.double().clamp(min=1e-300))
    spread = float(logs.std()) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return float(logs.mean()) + spread < 0


def v3_clearly_better(nfe, v3, solver, held_v3, held_solver, pooled_up_to=None):
    """Whether v3 wins at ``nfe`` from per-sample errors of v3's planned run and the fallback ``solver`` on the
    selection set and (``held_v3``, ``held_solver``) on the report set: up to ``POOLED_UP_TO`` NFE clearly better
    (``clearly_better``) on both sets' 2S paired samples, above it on the selection set alone; and always with a
    report-set mean error below the solver's (one set can veto v3, never choose it alone: six heavy-tailed
    selection samples misled it at 6 guided flow NFE, 0.70 vs 0.99 there, 1.647 vs 1.642 held out)."""
    pooled_up_to = POOLED_UP_TO if pooled_up_to is None else pooled_up_to
    if nfe <= pooled_up_to:
        wins = clearly_better(torch.cat([v3, held_v3]), torch.cat([solver, held_solver]))
    else:
        wins = clearly_better(v3, solver)
    return wins and _mean(held_v3) < _mean(held_solver)


def is_guided(metadata):
    """Whether the metadata's cfg (as the EMS job records it) is not 1 (unreadable: guided)."""
    try:
        return float((metadata or {}).get("cfg", "1")) != 1.0
    except ValueError:
        return True


def pack_candidates(metadata, model_kind="eps"):
    """The two pack solvers v3 may fall back to and the report set measures (the stored ratios' denominator):
    DPM-Solver++(2M) and UniPC bh2 (``samplers.unipc``) for eps models and guided flow models, 2M and (3M) for
    unguided flow models.  Measured on the study's models on noise of their own (bench/ems_pack_study.py,
    bench/results_ems_pack.md): on eps models UniPC is 0.40-0.77x the 2M's error at 10-20 NFE unguided (3M 0.91-1.14,
    better than UniPC only on one mixture at 8-10 NFE) and 0.11-0.88x at 15-20 NFE guided; on unguided flow models
    3M is 0.46-0.87x at 15-20 NFE where UniPC is 0.87-1.01x; with guidance 3M overshot on a few eps samples (2.3-5.7x
    2M's mean error, which six selection samples cannot see) and UniPC is 0.44-1.00x the 2M at 15-20 flow NFE."""
    return GUIDED_PACK if is_guided(metadata) else PACK_BY_KIND[model_kind]


def pack_solvers(metadata, model_kind="eps", nfe=None):
    """The pack's solvers the selection set runs at ``nfe``: both ``pack_candidates`` for an unguided model; one for a
    guided model (cfg != 1, whose rows cost twice): UniPC from ``GUIDED_UNIPC_FROM`` NFE on, else DPM-Solver++(2M)
    (measured: guided UniPC was 1.1-2.3x the 2M's error at 8 eps NFE on two mixtures and 1.1-6.4x at 5-10 flow NFE,
    0.11-1.05x at 10-20 eps NFE and 0.44-1.00x at 15-20 flow NFE; bench/results_ems_pack.md)."""
    candidates = pack_candidates(metadata, model_kind)
    if not is_guided(metadata):
        return candidates
    if nfe is None:
        return candidates[:1]
    return ("unipc",) if nfe >= GUIDED_UNIPC_FROM[model_kind] else ("dpmpp_2m",)


def tuning_noise(latent_shape, samples, seed, dtype=torch.float32, device="cpu"):
    """The tuning's fresh noise: 2 x ``samples`` latents (selection set, then report set), independent of the
    estimation's noise."""
    generator = torch.Generator().manual_seed((int(seed) + 1) * 7919 % (2 ** 63))
    noise = torch.randn((2 * samples,) + tuple(latent_shape), generator=generator, dtype=torch.float32)
    return noise.to(device, dtype)


def reference_jobs(noise, samples, sigma_min, sigma_max, model_kind, extra_args, nfes=TUNE_NFES):
    """One ``job(model) -> references`` per set (selection, report) of ``noise``: our DPM-Solver++(3M) in its
    third-order Taylor form at ``REFERENCE_FACTOR x max(nfes)`` steps on ``sampling_sigmas``.  Each set is its own
    batch (a host may condition on the row: the embedded wrapper's labels); ``Lockstep`` may run them alongside
    other work (``stats.job`` runs them with the estimation)."""
    from ..samplers.dpmpp import sample_dpmpp_3m

    steps = REFERENCE_FACTOR * max(nfes)
    sigmas = sampling_sigmas(steps, sigma_min, sigma_max, model_kind).to(noise.device, noise.dtype)
    return [lambda model, rows=rows: sample_dpmpp_3m(model, noise[rows] * sigmas[0], sigmas, extra_args, disable=True,
                                                     model_kind=model_kind, solver_type="taylor", guard=False)
            for rows in (slice(0, samples), slice(samples, 2 * samples))]


def tune(model, state, lambdas, stat_shape, sigma_min, sigma_max, *, model_kind="eps", samples, seed=0,
         nfes=TUNE_NFES, fits=FITS, policies=POLICIES, extra_args=None, dtype=torch.float32, device="cpu",
         metadata=None, batch_rows=None, references=None):
    """Measure every candidate (module docstring) and return (EMS of the chosen fit with its decisions, report).

    ``batch_rows``: None runs each sampler run on its own (each set of samples is one batch: the model may
    condition on the row); an integer runs each stage's runs in ``Lockstep``, at most that many rows per model
    call (only for models whose rows are independent).  The measured errors do not depend on it beyond rounding.

    ``report`` (JSON-able): the chosen fit, per NFE the selection-set errors of every candidate and pack solver,
    the decision, and the report-set errors; ``rows``: model rows spent; ``calls``: model calls.

    ``references``: the output of ``reference_jobs`` on ``tuning_noise(latent shape, samples, seed)`` where it has
    been run already (alongside the estimation); their rows count in ``rows``, their calls do not.
    """
    order3 = order3_runs(len(fits), len(policies), len(pack_solvers(metadata, model_kind)))
    fits = [f for f in fits if (lambdas.shape[0] - 1) % f.stride == 0]
    noise = tuning_noise(stat_shape_latent(state), samples, seed, dtype, device)
    counter = [0, 0]

    def counted(x, sigma, **kwargs):
        counter[0] += int(x.shape[0])
        counter[1] += 1
        return model(x, sigma, **kwargs)

    steps = REFERENCE_FACTOR * max(nfes)
    select, held_out = slice(0, samples), slice(samples, 2 * samples)
    runner = _Runner(counted, noise, sigma_min, sigma_max, model_kind, extra_args, batch_rows)
    if references is None:
        runner.references(samples, nfes)
    else:
        if tuple(references.shape) != tuple(noise.shape):
            raise ValueError(f"references of shape {tuple(references.shape)} do not match the tuning's noise "
                             f"{tuple(noise.shape)}")
        runner.reference = references.to(noise.device, noise.dtype)
        counter[0] += 2 * samples * steps
    base = dict(metadata or {})
    allowed = {nfe: pack_solvers(base, model_kind, nfe) for nfe in nfes}
    candidates_pack = pack_candidates(base, model_kind)
    candidates = {f.name: fit_ems(state, lambdas, stat_shape, f, base) for f in fits}
    # the selection runs only the solvers v3 may fall back to: the best fit against them is the best fit against any
    # (the score's denominators are the same for every candidate) and the decisions compare with them alone
    runs = [(select, nfe, name, None, True) for nfe in nfes for name in allowed[nfe]]
    runs += [(select, nfe, "v3", ems, corrector) for ems in candidates.values() for corrector in policies
             for nfe in nfes]
    measured = iter(runner.errors(runs))
    pack = {nfe: {name: next(measured) for name in allowed[nfe]} for nfe in nfes}
    table = {}  # (fit, corrector, nfe) -> per-sample selection errors
    for name in candidates:
        for corrector in policies:
            for nfe in nfes:
                table[(name, corrector, nfe)] = next(measured)

    def score(name):
        return sum(math.log(min(_mean(table[(name, c, n)]) for c in policies) /
                            min(_mean(e) for e in pack[n].values()) + 1e-300) for n in nfes) / len(nfes)

    chosen = min(candidates, key=score)
    ems = candidates[chosen]
    third = {}  # (corrector, nfe) -> per-sample selection errors of the chosen fit's order-3 predictor
    if order3:
        runs = [(select, nfe, "v3", ems, corrector, 3) for corrector in policies for nfe in nfes]
        third = dict(zip([(r[4], r[1]) for r in runs], runner.errors(runs)))
    plans = {}
    for nfe in nfes:
        corrector, order = min(policies, key=lambda c: _mean(table[(chosen, c, nfe)])), 2
        best = table[(chosen, corrector, nfe)]
        if third:
            # order 3 replaces order 2 only where clearly better on the selection set (paired, one standard error)
            corrector3 = min(policies, key=lambda c: _mean(third[(c, nfe)]))
            if clearly_better(third[(corrector3, nfe)], best):
                corrector, order, best = corrector3, 3, third[(corrector3, nfe)]
        # the pack's fallback is the first it ran (2M, or a guided model's one) unless the second is clearly better;
        # v3 runs only where it is clearly better than that
        first, *others = allowed[nfe]
        best_pack = others[0] if others and clearly_better(pack[nfe][others[0]], pack[nfe][first]) else first
        plans[nfe] = (corrector, order, best_pack, best)
    # the report set runs v3 (the planned policy and order) at every NFE (the rows ``tuning_rows`` counts)
    runs = [(held_out, nfe, p, None, True) for nfe in nfes for p in candidates_pack]
    runs += [(held_out, nfe, "v3", ems, plans[nfe][0], plans[nfe][1]) for nfe in nfes]
    measured = iter(runner.errors(runs))
    held_errors = {nfe: {p: next(measured) for p in candidates_pack} for nfe in nfes}
    held_v3_errors = {nfe: next(measured) for nfe in nfes}
    decisions, per_nfe = [], {}
    for nfe in nfes:
        corrector, order, best_pack, best = plans[nfe]
        held = {p: _mean(e) for p, e in held_errors[nfe].items()}
        held_v3 = _mean(held_v3_errors[nfe])
        v3_wins = v3_clearly_better(nfe, best, pack[nfe][best_pack], held_v3_errors[nfe], held_errors[nfe][best_pack])
        solver = "v3" if v3_wins else best_pack
        decided = held_v3 if v3_wins else held[best_pack]
        ratio = decided / min(held.values())
        if not math.isfinite(ratio):
            ratio = 1e6
        decisions.append((nfe, solver, ratio, corrector, order))
        selection = {f"{n}/{'corr' if c else 'nocorr'}": _mean(table[(n, c, nfe)]) for n in candidates for c in policies}
        selection.update({f"{chosen}/order3/{'corr' if c else 'nocorr'}": _mean(third[(c, nfe)]) for c in policies
                          if (c, nfe) in third})
        per_nfe[nfe] = {"solver": solver, "corrector": corrector, "order": order, "ratio": ratio, "held_out": held,
                        "held_out_decided": decided, "held_out_v3": held_v3,
                        "selection_pack": {p: _mean(e) for p, e in pack[nfe].items()}, "selection": selection}
    report = {"fit": chosen, "samples": samples, "reference_steps": steps, "rows": counter[0], "calls": counter[1],
              "scores": {n: score(n) for n in candidates}, "nfes": per_nfe}
    summary = {"fit": chosen, "samples_per_set": samples, "reference_steps": steps, "rows": counter[0],
               "calls": counter[1], "scores": {n: round(v, 3) for n, v in report["scores"].items()}}
    logger.info("DPM-Solver-v3 EMS tuning: fit %s; %s", chosen, ", ".join(
        f"{d[0]}: {d[1]}{'' if d[1] != 'v3' else (' corrector' if d[3] else ' no corrector')}"
        f"{' order 3' if d[1] == 'v3' and d[4] == 3 else ''} {d[2]:.2f}"
        for d in decisions))
    ems = ems.replace(metadata={"tuning": json.dumps(summary, separators=(",", ":"))}, decisions=decisions)
    return ems, report


def stat_shape_latent(state):
    """One latent's shape (C, H, W) from the estimator's settings."""
    return tuple(state.settings["latent_shape"])


__all__ = ["tune", "Fit", "FITS", "POLICIES", "ORDER3", "order3_runs", "TUNE_NFES", "tuning_rows", "tune_samples", "tuning_plan", "tuning_calls", "fit_ems",
           "fit_statistics", "sampling_sigmas", "PACK_SOLVERS", "FAMILY_ENDS", "Lockstep", "LockstepAborted",
           "tuning_noise", "reference_jobs", "POOLED_UP_TO", "v3_clearly_better"]
