"""Issue 8: does DPM-Solver-v3 beat its peers on the embedded (trained) models, and with which EMS settings?

    python -m dpm_solver_nodes.bench.v3_study [--guidance 1 5 7.5] [--flow] [--threads 1]
        [--cache ~/.cache/dpm_solver_nodes/v3_study] [--out bench/results_v3_study.md]

Writes results_v3_study.md, .json and .png (error ratio vs NFE per setting).  Everything is measured in the run;
cached moment runs (torch.save of the estimator's partial sums, keyed by all their settings) only skip recomputing
them (a cold run takes about 40 minutes of one CPU thread, most of it the N = 120, K = 512 runs).

Metric: for every sample the RMS difference (over the 256 pixels) between a solver's result and a converged
reference from the same noise (our DPM-Solver++(3M), ``REFERENCE_STEPS`` logSNR-uniform steps; its own error is
checked against twice the steps), averaged over ``BATCH`` samples (label k mod 10).  "ratio" = v3 error / the best
peer's error at the same NFE, the best over {our dpmpp_2m, our dpmpp_3m, diffusers UniPC bh2 (eps only)} x {karras,
logSNR-uniform, time-uniform}; "vs 2M" = v3 error / our dpmpp_2m's error on its best schedule.

How the EMS variants are produced cheaply: a few estimator runs ("moment runs", ``moment_run``: ``estimate_ems``
at per-element resolution, stopped after its last chunk so that its ``EstimationState`` - the float64 partial sums,
kept per disjoint sample group - is returned).  From one run: a coarser grid N | N_run is the subset of its nodes
(with crn the noise is the same at every node, so this is exactly the estimator's result at N); a smaller K pools
fewer groups; disjoint groups are independent estimations (own x0, noise and probes: the "seed" rows); the
reductions pool the per-element moments (per_channel = scalar here: one channel); the l' smoothing and the s, b
window fit are applied afterwards (``statistics``: the estimator's formulas, plus ``sb_window``).  The runs:
R120 (model samples, N=120, K=512, 8 groups), R200 (model samples, N=200, K=128, 4 groups of 32), R200_nocrn,
R200_fd (finite differences), R200_data (training digits), R200_traj (the estimator's samples="trajectory"),
T120 (``trajectory_moment_run``: the model's own ODE states on the grid, K=512).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import time

import torch

log = logging.getLogger("dpm_solver_nodes.bench.v3_study")
HERE = pathlib.Path(__file__).resolve().parent
BATCH = 100
NOISE_SEED = 1234
REFERENCE_STEPS = 500
NFES = (5, 6, 8, 10, 15, 20)
SCHEDULES = ("karras", "logsnr_uniform", "time_uniform")


# ----------------------------------------------------------------------------------------------------------------
# model, noise, reference
# ----------------------------------------------------------------------------------------------------------------

class Setup:
    """The embedded eps model at guidance ``cfg`` (label = row mod 10), the evaluation noise and its reference."""

    def __init__(self, cfg, batch=BATCH, reference_steps=REFERENCE_STEPS, check=True, model_kind="eps"):
        from ..embedded import load_model
        from ..embedded.make_ems import LabelledByRow

        self.cfg = float(cfg)
        self.model_kind = model_kind
        self.base = load_model(model_kind)
        self.model = LabelledByRow(self.base, cfg)
        self.sigma_min = self.base.sigma_min
        # flow: sampling starts at sigma = 1, the EMS grid stops at 0.999 (lambda = -inf at 1)
        self.sigma_max = self.base.sigma_max if model_kind == "eps" else 1.0
        self.ems_sigma_max = self.base.sigma_max if model_kind == "eps" else 0.999
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = torch.randn((batch,) + tuple(self.base.shape), generator=generator)
        started = time.perf_counter()
        self.reference = self.solve_reference(reference_steps)
        self.reference_seconds = time.perf_counter() - started
        self.reference_error = None
        if check:  # the reference's own error, estimated against twice the steps
            finer = self.solve_reference(2 * reference_steps)
            self.reference_error = self.error(self.reference, finer)

    def sigmas(self, schedule, n):
        from .sigmas import make_sigmas

        if self.model_kind == "flow":
            return make_sigmas(schedule, n, "flow", self.sigma_min).to(torch.float32)
        return make_sigmas(schedule, n, "eps", self.sigma_min, self.sigma_max,
                           discrete=self.base.discrete).to(torch.float32)

    def solve_reference(self, steps):
        from ..samplers.dpmpp import sample_dpmpp_3m

        sigmas = self.sigmas("logsnr_uniform", steps)
        return sample_dpmpp_3m(self.model, self.noise * sigmas[0], sigmas, disable=True, model_kind=self.model_kind,
                               solver_type="taylor")

    @staticmethod
    def error(x, reference):
        """Per-sample RMS over the pixels (float64, (batch,))."""
        return (x.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt()

    def run(self, sampler, schedule, nfe, **options):
        sigmas = self.sigmas(schedule, nfe)
        calls = [0]

        def counted(x, sigma, **kwargs):
            calls[0] += 1
            return self.model(x, sigma, **kwargs)

        out = sampler(counted, self.noise * sigmas[0], sigmas, disable=True, model_kind=self.model_kind, **options)
        if calls[0] != nfe:
            raise RuntimeError(f"{getattr(sampler, '__name__', sampler)} made {calls[0]} model calls for NFE {nfe}")
        return self.error(out, self.reference)


def unipc_bh2(model, x, sigmas, disable=None, model_kind="eps", **_):
    """diffusers' UniPCMultistepScheduler (bh2) on our sigmas (peers.diffusers_run)."""
    import diffusers

    from ..peers import SD_V1_CONFIG, diffusers_run

    return diffusers_run(diffusers.UniPCMultistepScheduler(**SD_V1_CONFIG, solver_type="bh2"), model, x, sigmas, None)


def peer_errors(setup, nfes=NFES, schedules=SCHEDULES, with_unipc=True):
    with_unipc = with_unipc and setup.model_kind == "eps"  # diffusers' UniPC here is an eps (VP) scheduler
    """{(peer, schedule, nfe): mean error, ...} and the per-sample errors of every run."""
    from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m

    # the study (bench/results_v3_study.md) was measured with the exact-Taylor 3M; the official form, the default
    # since, is 0.7-0.9x its error at 6-20 NFE but is never the best peer there except flow at 15 NFE (about 3 %)
    peers = {"dpmpp_2m": sample_dpmpp_2m, "dpmpp_3m": functools.partial(sample_dpmpp_3m, solver_type="taylor")}
    if with_unipc:
        peers["unipc_bh2"] = unipc_bh2
    errors = {}
    for name, fn in peers.items():
        for schedule in schedules:
            for nfe in nfes:
                errors[(name, schedule, nfe)] = setup.run(fn, schedule, nfe)
    return errors


def best_of(errors, nfe, names=None):
    """(mean error, key) of the best peer run at ``nfe`` (optionally among ``names``)."""
    candidates = [(float(e.mean()), k) for k, e in errors.items() if k[2] == nfe and (names is None or k[0] in names)]
    return min(candidates)


# ----------------------------------------------------------------------------------------------------------------
# moment runs and EMS variants
# ----------------------------------------------------------------------------------------------------------------

class _Done(Exception):
    pass


def moment_run(model, x0, sigma_min, sigma_max, N, K, seed, crn=True, jvp="forward", groups=8, cache=None,
               tag="", model_kind="eps", samples="diffused"):
    """The per-element estimator state (partial sums in ``groups`` sample groups) of ``estimate_ems``, cached.

    Returns (state, lambdas).  The estimator returns only the EMS, so ``progress`` stops it after the last chunk;
    the exception then carries the finished state (the documented ``estimation_state``)."""
    from ..stats.estimate import estimate_ems

    settings = (tag, N, K, seed, crn, jvp, groups, float(sigma_min), float(sigma_max), float(x0.double().sum()),
                tuple(x0.shape)) + ((model_kind,) if model_kind != "eps" else ()) + (
                    (samples,) if samples != "diffused" else ())
    key = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    path = pathlib.Path(cache) / f"moments_{key}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)

    def progress(done, total):
        if done == total:
            raise _Done()

    try:
        estimate_ems(model, x0, sigma_min, sigma_max, N=N, K=K, reduction="per_element", jvp=jvp, crn=crn,
                     seed=seed, batch_size=50, error_groups=groups, progress=progress, model_kind=model_kind,
                     **({"samples": samples} if samples != "diffused" else {}))
    except _Done as stop:
        state = stop.estimation_state
    else:  # pragma: no cover - progress always stops the run
        raise RuntimeError("estimate_ems finished without reporting its last chunk")
    ve = (lambda s: s / (1 - s)) if model_kind == "flow" else (lambda s: s)
    lambdas = torch.linspace(-math.log(ve(sigma_max)), -math.log(ve(sigma_min)), N + 1, dtype=torch.float64)
    result = (state, lambdas)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
    return result


def _pool(count, means, comoments, keep):
    """Moments of the union of the groups selected by ``keep`` (Chan's parallel combination)."""
    c = count[keep]
    total = c.sum(0)
    weights = (c / total.clamp(min=1e-300))[None, :, :, None]
    pooled = (means[:, keep] * weights).sum(1)
    delta = means[:, keep] - pooled[:, None]
    from ..stats.estimate import COMOMENT_PAIRS, MEAN_NAMES

    index = {name: i for i, name in enumerate(MEAN_NAMES)}
    spread = torch.stack([(delta[index[p]] * delta[index[q]] * c[:, :, None]).sum(0) for p, q in COMOMENT_PAIRS])
    return total, pooled, comoments[:, keep].sum(1) + spread


def _pool_elements(count, means, comoments):
    """Per-element moments (nodes, P) -> one pooled element (nodes, 1): the scalar / per-channel (C = 1) fit."""
    from ..stats.estimate import COMOMENT_PAIRS, MEAN_NAMES

    P = means.shape[-1]
    pooled = means.mean(-1, keepdim=True)
    delta = means - pooled
    index = {name: i for i, name in enumerate(MEAN_NAMES)}
    spread = torch.stack([(delta[index[p]] * delta[index[q]]).sum(-1, keepdim=True) * count[:, None]
                          for p, q in COMOMENT_PAIRS])
    return count * P, pooled, comoments.sum(-1, keepdim=True) + spread


def statistics(count, means, comoments, lambdas, smooth=5, sb_window=0.0, sb_mode="within"):
    """l, s, b from moments as ``stats.estimate.statistics_from_moments`` (same formulas), plus a fit of s and b
    over the nodes within +-``sb_window`` in lambda:
      "within" (recommended; what stats.estimate implements as ``sb_window``): s = sum Cov(f, f') / sum Var f over
        the window (the within-node scatter), b = mean E f' - s mean E f (window means);
      "within_pointwise_b": that s, but b = E f' - s E f at the node;
      "pooled": one least-squares line through all the window's observations (the spread of the node means too)."""
    from ..stats.estimate import RELATIVE_VARIANCE_FLOOR, _window_sum, fit_terms

    l, var_f, cov_ff, mean_f, mean_df, scale = fit_terms(count, means, comoments, lambdas, smooth)
    half_width = int(round(sb_window / float(lambdas[1] - lambdas[0]))) if sb_window > 0 else 0
    if half_width and sb_mode == "pooled":
        # pooled regression over the window: within-node (co)variances plus the spread of the node means
        n = _window_sum(torch.ones_like(mean_f), half_width)
        ef, edf = _window_sum(mean_f, half_width) / n, _window_sum(mean_df, half_width) / n
        var_w = _window_sum(var_f + mean_f ** 2, half_width) / n - ef ** 2
        cov_w = _window_sum(cov_ff + mean_f * mean_df, half_width) / n - ef * edf
        var_f, cov_ff, mean_f, mean_df = var_w, cov_w, ef, edf
    elif half_width:
        # within-node moments only: s = sum Cov / sum Var over the window; b from window means ("within") or from
        # the node's own means ("within_pointwise_b")
        var_f, cov_ff = _window_sum(var_f, half_width), _window_sum(cov_ff, half_width)
        if sb_mode == "within":
            n = _window_sum(torch.ones_like(mean_f), half_width)
            mean_f, mean_df = _window_sum(mean_f, half_width) / n, _window_sum(mean_df, half_width) / n
    floor = RELATIVE_VARIANCE_FLOOR * scale
    s = torch.where(var_f > floor, cov_ff / torch.where(var_f > floor, var_f, torch.ones_like(var_f)),
                    torch.zeros_like(var_f))
    b = mean_df - s * mean_f
    return tuple(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (l, s, b))


def ems_variant(run, *, N=None, groups=None, reduction="scalar", smooth=5, sb_window=0.0, sb_mode="within",
                shrink=False, zero_s=False, degenerate_below=None, metadata=None, model_kind="eps"):
    """The EMS ``estimate_ems`` would return for a sub-grid (N | N_run), a subset of sample groups and a reduction.

    smooth: half-width (nodes) of the moving average of dl/dlambda.  sb_window: see ``statistics``.
    shrink: per-element statistics shrunk towards the pooled (scalar) ones, element by element, with the
    positive-part James-Stein weight max(0, 1 - se^2 / d^2), d the element's deviation from the pooled value and se
    its jackknife standard error over the kept groups.
    zero_s: s = 0 and b = E f' (l kept).
    degenerate_below: l = 1, s = b = 0 (DPM-Solver++) at lambda < this value (noisy end), the estimate above.
    """
    from ..stats.ems import EMS

    state, lambdas = run
    n_run = len(lambdas) - 1
    N = n_run if N is None else N
    if n_run % N:
        raise ValueError(f"N={N} does not divide the run's N={n_run}")
    nodes = torch.arange(0, n_run + 1, n_run // N)
    G = state.count.shape[0]
    keep = torch.zeros(G, dtype=torch.bool)
    keep[list(range(G)) if groups is None else list(groups)] = True
    count, means, comoments = state.count[:, nodes], state.means[:, :, nodes], state.comoments[:, :, nodes]
    lam = lambdas[nodes]

    def stats_of(mask, pooled_elements):
        c, m, cm = _pool(count, means, comoments, mask)
        if pooled_elements:
            c, m, cm = _pool_elements(c, m, cm)
        l, s, b = statistics(c, m, cm, lam, smooth, sb_window, sb_mode)
        if zero_s:
            from ..stats.estimate import MEAN_NAMES, smoothed_derivative

            mean = dict(zip(MEAN_NAMES, m))
            a = 1 - l
            b = -(smoothed_derivative(l, lam, smooth) + a) * mean["x"] + a * mean["D"] - mean["Ddot"]
            s = torch.zeros_like(s)
        return l, s, b

    shape = tuple(state.settings["latent_shape"])
    if reduction == "per_element" and not shrink:
        l, s, b = stats_of(keep, False)
    elif reduction == "scalar":
        l, s, b = stats_of(keep, True)
        shape = (1,) * len(shape)
    elif shrink:
        fine = stats_of(keep, False)
        coarse = stats_of(keep, True)
        kept = keep.nonzero().flatten().tolist()
        replicas = []
        for g in kept:
            mask = keep.clone()
            mask[g] = False
            replicas.append(stats_of(mask, False))
        out = []
        for i in range(3):
            values = torch.stack([r[i] for r in replicas])
            var = ((values - values.mean(0)) ** 2).sum(0) * (len(kept) - 1) / len(kept)
            d2 = (fine[i] - coarse[i]) ** 2
            weight = (1 - var / d2.clamp(min=1e-30)).clamp(min=0)
            out.append(coarse[i] + weight * (fine[i] - coarse[i]))
        l, s, b = out
    else:
        raise ValueError(reduction)
    if degenerate_below is not None:
        noisy = (lam < degenerate_below)[:, None]
        l = torch.where(noisy, torch.ones_like(l), l)
        s = torch.where(noisy, torch.zeros_like(s), s)
        b = torch.where(noisy, torch.zeros_like(b), b)
    reshape = (-1,) + shape
    return EMS(lam, l.reshape(reshape), s.reshape(reshape), b.reshape(reshape),
               metadata=dict({"model_kind": model_kind}, **(metadata or {})))


def degenerate_ems():
    from ..stats.ems import EMS

    return EMS.degenerate(torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64))


def v3_errors(setup, ems, schedule, nfes=NFES, **options):
    from ..samplers.v3 import sample_dpm_solver_v3

    return {nfe: setup.run(sample_dpm_solver_v3, schedule, nfe, ems=ems, **options) for nfe in nfes}


class TrajectoryState:
    """The same partial sums as ``stats.estimate.EstimationState`` (count, means, comoments per group and node)."""

    def __init__(self, count, means, comoments, latent_shape, jvp_rows, forward_rows, seconds):
        self.count, self.means, self.comoments = count, means, comoments
        self.settings = {"latent_shape": tuple(latent_shape)}
        self.jvp_rows, self.forward_rows, self.seconds = jvp_rows, forward_rows, seconds


def trajectory_moment_run(model, shape, sigma_min, sigma_max, N, K, seed, groups=8, batch_size=50, cache=None,
                          tag=""):
    """Moments on the model's OWN ODE trajectories instead of forward-diffused x0 (``x0_source="trajectories"``).

    K trajectories from sigma_max * z (z seeded by ``seed``) are integrated with our DPM-Solver++(2M) on the EMS grid
    itself (N steps uniform in lambda, then denoised); the state x_j at node j is what a sampler actually meets, so
    the statistics describe the ODE's marginals rather than q_lambda of the samples.  At each node the same
    quantities as ``estimate_ems`` are taken (D, one Rademacher Hutchinson probe - the same probe at every node -
    and D' along (D - x, 1), forward AD), and the same per-group moments are kept.
    """
    from ..samplers.dpmpp import sample_dpmpp_2m
    from ..stats.estimate import COMOMENT_PAIRS, MEAN_NAMES, _derivatives_forward, _VEDenoiser

    key = hashlib.sha256(repr(("trajectory", tag, N, K, seed, groups, float(sigma_min), float(sigma_max),
                               tuple(shape))).encode()).hexdigest()[:16]
    path = pathlib.Path(cache) / f"trajectory_{key}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    started = time.perf_counter()
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), N + 1, dtype=torch.float64)
    sigmas = torch.cat([torch.exp(-lambdas), lambdas.new_zeros(1)]).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((K,) + tuple(shape), generator=generator)
    probes = (torch.randint(0, 2, (K,) + tuple(shape), generator=generator).to(torch.float32) * 2 - 1)
    P = math.prod(shape)
    states = torch.empty((N + 1, K) + tuple(shape))
    forward_rows = 0
    for lo in range(0, K, batch_size):
        hi = min(K, lo + batch_size)

        def record(info, _lo=lo, _hi=hi):
            states[info["i"], _lo:_hi] = info["x"]

        sample_dpmpp_2m(model, z[lo:hi] * sigmas[0], sigmas, callback=record, disable=True)
        forward_rows += (N + 1) * (hi - lo)
    denoise = _VEDenoiser(model, "eps", None)
    group_of = torch.arange(K) * groups // K
    count = torch.zeros(groups, N + 1, dtype=torch.float64)
    means = torch.zeros(len(MEAN_NAMES), groups, N + 1, P, dtype=torch.float64)
    comoments = torch.zeros(len(COMOMENT_PAIRS), groups, N + 1, P, dtype=torch.float64)
    index = {name: i for i, name in enumerate(MEAN_NAMES)}
    jvp_rows = 0
    for j in range(N + 1):
        rows = {name: [] for name in MEAN_NAMES}
        for lo in range(0, K, batch_size):
            hi = min(K, lo + batch_size)
            x = states[j, lo:hi]
            lam = torch.full((hi - lo,), float(lambdas[j]), dtype=torch.float32)
            denoised, jvs, ddot = _derivatives_forward(denoise, x, lam, [probes[lo:hi]])
            jvp_rows += 2 * (hi - lo)
            for name, value in zip(MEAN_NAMES, (probes[lo:hi] * jvs[0], x, denoised, ddot)):
                rows[name].append(value.double().reshape(hi - lo, P))
        obs = {name: torch.cat(v) for name, v in rows.items()}
        for g in range(groups):
            sel = group_of == g
            n = int(sel.sum())
            count[g, j] = n
            mu = {name: obs[name][sel].mean(0) for name in MEAN_NAMES}
            for name in MEAN_NAMES:
                means[index[name], g, j] = mu[name]
            for k, (p, q) in enumerate(COMOMENT_PAIRS):
                comoments[k, g, j] = ((obs[p][sel] - mu[p]) * (obs[q][sel] - mu[q])).sum(0)
    state = TrajectoryState(count, means, comoments, shape, jvp_rows, forward_rows, time.perf_counter() - started)
    result = (state, lambdas)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
    return result


# ----------------------------------------------------------------------------------------------------------------
# the automatic fallback check (prototype for stats.estimate)
# ----------------------------------------------------------------------------------------------------------------

def validate_v3(model, ems, shape, sigma_min, sigma_max, x0_seed, x0_steps=100, samples=20, nfes=NFES,
                model_kind="eps", **options):
    """v3 / DPM-Solver++(2M) error ratio per NFE on the estimator's own x0 trajectories (the fallback check).

    ``generate_x0(..., steps=x0_steps, seed=x0_seed)`` made each x0 by a ``x0_steps``-step 2M solve from seeded
    noise, so the first ``samples`` of them are references for that noise at no extra cost (their own error,
    ~1e-4 RMS at 100 steps here, is far below the 5-10 NFE errors being compared).  Both solvers run on the
    logSNR-uniform schedule; returns {nfe: (v3 mean RMS error, 2M mean RMS error)}.  Costs samples * 2 * sum(nfes)
    forward rows (20 samples, NFE 5-20: 2,560 rows, about 1 % of the estimation).
    """
    from ..samplers.dpmpp import sample_dpmpp_2m
    from ..samplers.v3 import sample_dpm_solver_v3
    from ..stats.estimate import generate_x0
    from .sigmas import make_sigmas

    reference = generate_x0(model, shape, samples, sigma_max, sigma_min, model_kind, steps=x0_steps, seed=x0_seed,
                            batch_size=samples)
    noise = torch.randn((samples,) + tuple(shape), generator=torch.Generator().manual_seed(x0_seed))
    result = {}
    for nfe in nfes:
        if model_kind == "flow":
            sigmas = make_sigmas("logsnr_uniform", nfe, "flow", sigma_min).to(torch.float32)
        else:
            sigmas = make_sigmas("logsnr_uniform", nfe, "eps", sigma_min, sigma_max).to(torch.float32)
        x = noise * sigmas[0]
        v3 = sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True, model_kind=model_kind, **options)
        m2 = sample_dpmpp_2m(model, x, sigmas, disable=True, model_kind=model_kind)
        result[nfe] = (float(Setup.error(v3, reference).mean()), float(Setup.error(m2, reference).mean()))
    return result


# ----------------------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------------------

RECOMMENDED = dict(N=200, K=32, reduction="per_channel", smooth=5, sb_window=0.5, sb_mode="within", crn=True,
                   jvp="forward",
                   x0="model samples (generate_x0, 100 steps)", corrector="full", schedule="logSNR-uniform")


def data_x0(K):
    """K training digits, row k of label k mod 10 (the model wrapper's labelling)."""
    from ..embedded.data import load_mnist16, split

    (images, labels), _ = split(*load_mnist16())
    rows = []
    for k in range(K):
        pool = (labels == k % 10).nonzero().flatten()
        rows.append(images[pool[k // 10]])
    return torch.stack(rows)


def ratio_with_error(a, b):
    """mean(a) / mean(b) for paired per-sample errors, with its delta-method standard error."""
    r = float(a.mean() / b.mean())
    se = float((a - r * b).std() / math.sqrt(len(a)) / b.mean())
    return r, se


def study_guidance(cfg, cache, model_kind="eps", log_line=print):
    from ..stats.estimate import generate_x0

    setup = Setup(cfg, model_kind=model_kind)
    log_line(f"[{model_kind} cfg {cfg:g}] reference: {REFERENCE_STEPS} steps {setup.reference_seconds:.1f} s, its own "
             f"error vs {2 * REFERENCE_STEPS} steps {float(setup.reference_error.mean()):.2e}")
    peers = peer_errors(setup)
    best = {n: best_of(peers, n) for n in NFES}
    best2m = {n: best_of(peers, n, ["dpmpp_2m"]) for n in NFES}
    kw = dict(sigma_min=setup.sigma_min, sigma_max=setup.ems_sigma_max, cache=cache, model_kind=model_kind)
    runs = {}

    def run(name):
        if name in runs:
            return runs[name]
        started = time.perf_counter()
        if name == "R120":  # model samples, N = 120, K = 512 in 8 groups
            x0 = generate_x0(setup.model, setup.base.shape, 512, setup.ems_sigma_max, setup.sigma_min, model_kind,
                             steps=100, seed=7, batch_size=50)
            runs[name] = moment_run(setup.model, x0, N=120, K=512, seed=0, groups=8, tag=f"model{cfg}", **kw)
        elif name in ("R200", "R200_nocrn", "R200_fd"):  # model samples, N = 200, K = 128 in 4 groups
            K = 128 if model_kind == "eps" else 64
            x0 = generate_x0(setup.model, setup.base.shape, K, setup.ems_sigma_max, setup.sigma_min, model_kind,
                             steps=100, seed=101, batch_size=50)
            options = {"R200": {}, "R200_nocrn": {"crn": False}, "R200_fd": {"jvp": "finite_difference"}}[name]
            runs[name] = moment_run(setup.model, x0, N=200, K=K, seed=1, groups=K // 32, tag=f"m200_{cfg}_1",
                                    **options, **kw)
        elif name == "R200_traj":  # the estimator's samples="trajectory" (x from the model's own ODE), K = 32
            x0 = generate_x0(setup.model, setup.base.shape, 32, setup.ems_sigma_max, setup.sigma_min, model_kind,
                             steps=100, seed=101, batch_size=50)
            runs[name] = moment_run(setup.model, x0, N=200, K=32, seed=1, groups=1, tag=f"traj200_{cfg}",
                                    samples="trajectory", **kw)
        elif name == "R200_data":
            runs[name] = moment_run(setup.model, data_x0(128), N=200, K=128, seed=1, groups=4, tag=f"data{cfg}", **kw)
        elif name == "T120":
            runs[name] = trajectory_moment_run(setup.model, setup.base.shape, setup.sigma_min, setup.ems_sigma_max,
                                               N=120, K=512, seed=11, groups=8, cache=cache, tag=f"traj{cfg}")
        state = runs[name][0]
        log_line(f"[{model_kind} cfg {cfg:g}] moment run {name}: {state.jvp_rows} JVP rows, {state.forward_rows} "
                 f"forward rows, {state.seconds:.0f} s (this run {time.perf_counter() - started:.0f} s, cached "
                 f"runs report the original time)")
        return runs[name]

    rows = []

    def row(group, label, ems_of, schedule="logsnr_uniform", **options):
        try:
            ems = ems_of()
            errors = v3_errors(setup, ems, schedule, **options)
        except Exception as error:  # noqa: BLE001 - a failed setting is a result too
            log_line(f"  {label}: failed: {type(error).__name__}: {error}")
            return
        cells = {}
        for n in NFES:
            peer = peers[best[n][1]]
            two_m = peers[best2m[n][1]]
            cells[n] = {"error": float(errors[n].mean()), "ratio": ratio_with_error(errors[n], peer),
                        "vs_2m": ratio_with_error(errors[n], two_m)}
        rows.append({"group": group, "label": label, "cells": cells})
        log_line(f"  {group:12s} {label:46s} " + " ".join(f"{n}:{cells[n]['ratio'][0]:.2f}/{cells[n]['vs_2m'][0]:.2f}"
                                                         for n in NFES))

    def variant(name, **ems_kw):
        return lambda: ems_variant(run(name), model_kind=model_kind, **ems_kw)

    rec = dict(N=200, sb_window=0.5, sb_mode="within", groups=[0])  # recommended: K = 32 (one group of R200)
    row("baseline", "degenerate l=1,s=b=0 (DPM++ Taylor) + v3 corrector", degenerate_ems)
    row("baseline", "degenerate, corrector off", degenerate_ems, use_corrector=False)
    row("recommended", "N=200 K=32 per_channel sb_window=0.5, full corr.", variant("R200", **rec))
    for g in range(1, 4 if model_kind == "eps" else 2):
        row("seed", f"recommended, independent estimate #{g + 1} (K=32)", variant("R200", **dict(rec, groups=[g])))
    full = model_kind == "eps" and cfg in (1.0, 5.0)  # the expensive moment runs only at the demo's scales
    if full:
        for N in (30, 60, 120):
            row("N (R120)", f"N={N} K=512 sb_window=0 (official-style)", variant("R120", N=N))
        for K, groups in ((64, [0]), (128, [0, 1]), (256, range(4)), (512, None)):
            row("K (R120)", f"N=120 K={K} sb_window=0", variant("R120", N=120, groups=groups))
    for N in (50, 100, 200):
        row("N", f"N={N} K=32 sb_window=0", variant("R200", N=N, groups=[0]))
        row("N", f"N={N} K=32 sb_window=0.5", variant("R200", N=N, groups=[0], sb_window=0.5))
    row("K", "N=200 K=128 sb_window=0.5", variant("R200", N=200, sb_window=0.5))
    for smooth in (0, 2, 10):
        row("smooth l'", f"recommended, smooth={smooth} nodes", variant("R200", **dict(rec, smooth=smooth)))
    for window in (0.25, 1.0):
        row("sb_window", f"recommended, sb_window={window}", variant("R200", **dict(rec, sb_window=window)))
    row("sb_window", "recommended, s and b by the pooled window regression",
        variant("R200", **dict(rec, sb_mode="pooled")))
    row("sb_window", "recommended, s windowed, b at the node",
        variant("R200", **dict(rec, sb_mode="within_pointwise_b")))
    row("reduction", "recommended, per_element", variant("R200", **dict(rec, reduction="per_element")))
    row("reduction", "recommended, per_element shrunk to per_channel",
        variant("R200", **dict(rec, reduction="per_element", shrink=True)))
    row("s, b", "recommended, s=0 (b = E f')", variant("R200", **dict(rec, zero_s=True)))
    row("corrector", "recommended, corrector off", variant("R200", **rec), use_corrector=False)
    row("corrector", "recommended, corrector noisy half", variant("R200", **rec), half="noisy")
    row("corrector", "recommended, corrector clean half", variant("R200", **rec), half="clean")
    row("solver", "recommended, order 3, pseudo predictor", variant("R200", **rec), order=3, p_pseudo=True)
    row("solver", "recommended, corrector of the predictor's order", variant("R200", **rec), c_pseudo=False)
    row("schedule", "recommended on Karras sigmas", variant("R200", **rec), "karras")
    row("schedule", "recommended on time-uniform sigmas", variant("R200", **rec), "time_uniform")
    if full:
        row("crn", "recommended without crn", variant("R200_nocrn", **rec))
        row("JVP", "recommended, finite differences (h=1e-3)", variant("R200_fd", **rec))
        row("x0 source", "recommended, estimator samples='trajectory'", variant("R200_traj", **dict(rec, groups=None)))
        if cfg == 1:
            row("x0 source", "recommended, x0 = training digits", variant("R200_data", **rec))
            row("x0 source", "N=120 K=512 sb=0, x0 = model samples", variant("R120", N=120))
            row("x0 source", "N=120 K=512 sb=0, x0 = own ODE trajectories", variant("T120", N=120))
            row("x0 source", "N=120 K=512 sb=0.5, x0 = own ODE trajectories", variant("T120", N=120, sb_window=0.5))

    # the fallback check on the estimator's own samples, compared with the held-out measurement
    validation = {}
    ems = ems_variant(run("R200"), model_kind=model_kind, **rec)
    for name, options in (("full corrector", {}), ("corrector off", {"use_corrector": False})):
        started = time.perf_counter()
        checked = validate_v3(setup.model, ems, setup.base.shape, setup.sigma_min, setup.ems_sigma_max, x0_seed=101,
                              model_kind=model_kind, **options)
        seconds = time.perf_counter() - started
        held_out = v3_errors(setup, ems, "logsnr_uniform", **options)
        validation[name] = {"seconds": seconds, "cells": {
            n: {"check": checked[n][0] / checked[n][1],
                "held_out": float(held_out[n].mean()) / float(peers[("dpmpp_2m", "logsnr_uniform", n)].mean())}
            for n in NFES}}
        log_line(f"  fallback check ({name}, {seconds:.1f} s): " + " ".join(
            f"{n}:{c['check']:.2f}/{c['held_out']:.2f}" for n, c in validation[name]["cells"].items()))
    cost = {}
    for name, (state, _) in runs.items():
        cost[name] = {"jvp_rows": state.jvp_rows, "forward_rows": state.forward_rows, "seconds": state.seconds,
                      "K": int(state.count[:, 0].sum()), "N": state.count.shape[1] - 1}
    peer_table = {f"{k[0]} {k[1]} {k[2]}": float(v.mean()) for k, v in peers.items()}
    return {"cfg": cfg, "model_kind": model_kind, "reference_error": float(setup.reference_error.mean()),
            "best": {n: [best[n][0], list(best[n][1][:2])] for n in NFES},
            "best_2m": {n: [best2m[n][0], list(best2m[n][1][:2])] for n in NFES},
            "peers": peer_table, "rows": rows, "validation": validation, "cost": cost}


def write_report(results, out_md, environment):
    lines = ["# DPM-Solver-v3 on the embedded trained models (issue 8)", "",
             "Generated by `python -m dpm_solver_nodes.bench.v3_study` (bench/v3_study.py; method in its docstring). "
             f"Environment: {environment}.", "",
             "Cells: v3 error / best peer's error at that NFE (best of our dpmpp_2m, dpmpp_3m and diffusers UniPC "
             "bh2 over Karras, logSNR-uniform and time-uniform sigmas) ± delta-method standard error over the "
             f"{BATCH} samples; in brackets v3 / our dpmpp_2m on its best schedule.  < 1 means v3 wins.  "
             "v3: order 2, c_pseudo, lower_order_final, logSNR-uniform sigmas unless the row says otherwise.", ""]
    for result in results:
        kind, cfg = result["model_kind"], result["cfg"]
        lines += [f"## {kind} model, guidance {cfg:g}", "",
                  f"Reference: our dpmpp_3m, {REFERENCE_STEPS} logSNR-uniform steps; its RMS distance to "
                  f"{2 * REFERENCE_STEPS} steps: {result['reference_error']:.1e}.", "",
                  "| NFE | " + " | ".join(str(n) for n in NFES) + " |", "|---|" + "---|" * len(NFES),
                  "| best peer | " + " | ".join(f"{result['best'][n][0]:.2e} {result['best'][n][1][0]} "
                                                f"{result['best'][n][1][1]}" for n in NFES) + " |",
                  "| dpmpp_2m | " + " | ".join(f"{result['best_2m'][n][0]:.2e} {result['best_2m'][n][1][1]}"
                                               for n in NFES) + " |", "",
                  "| group | setting | " + " | ".join(f"{n}" for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for row in result["rows"]:
            cells = []
            for n in NFES:
                c = row["cells"][n]
                cells.append(f"{c['ratio'][0]:.2f}±{c['ratio'][1]:.2f} ({c['vs_2m'][0]:.2f})")
            lines.append(f"| {row['group']} | {row['label']} | " + " | ".join(cells) + " |")
        seeds = [r for r in result["rows"] if r["group"] in ("recommended", "seed")]
        if len(seeds) > 1:
            spread = [max(r["cells"][n]["error"] for r in seeds) / min(r["cells"][n]["error"] for r in seeds)
                      for n in NFES]
            lines += ["", f"Independent estimations (recommended settings, {len(seeds)} disjoint K=32 sample groups "
                      "with their own noise and probes): max/min v3 error per NFE: "
                      + ", ".join(f"{n}: {s:.3f}" for n, s in zip(NFES, spread)) + "."]
        lines += ["", "Fallback check (`validate_v3`: v3 / dpmpp_2m on 20 of the estimator's own x0 trajectories "
                  "against their 100-step solutions) vs the held-out measurement (100 other samples, 500-step "
                  "reference), both on logSNR-uniform sigmas:", "",
                  "| corrector | check s | " + " | ".join(str(n) for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for name, v in result["validation"].items():
            lines.append(f"| {name} | {v['seconds']:.1f} | " + " | ".join(
                f"{v['cells'][n]['check']:.2f} / {v['cells'][n]['held_out']:.2f}" for n in NFES) + " |")
        lines += ["", "Moment runs (per-element partial sums; the table's variants are exact sub-results):", ""]
        for name, c in result["cost"].items():
            lines.append(f"- {name}: N={c['N']}, K={c['K']}, {c['jvp_rows']} JVP rows + {c['forward_rows']} forward "
                         f"rows, {c['seconds']:.0f} s wall on a shared 2-core machine, 1 thread")
        lines.append("")
    tmp = out_md.with_name(out_md.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out_md)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("baseline", "recommended", "N (R120)", "corrector", "x0 source")
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        for row in result["rows"]:
            if row["group"] not in shown:
                continue
            ratios = [row["cells"][n]["ratio"][0] for n in NFES]
            style = "-" if row["group"] == "recommended" else "--"
            ax.plot(NFES, ratios, style, marker="o", lw=2.5 if row["group"] == "recommended" else 1,
                    label=row["label"])
        two_m = [result["best_2m"][n][0] / result["best"][n][0] for n in NFES]
        ax.plot(NFES, two_m, "k:", lw=2, label="dpmpp_2m (best schedule)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("error / best peer's error")
        ax.set_title(f"{result['model_kind']} model, guidance {result['cfg']:g}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes.bench.v3_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 5.0, 7.5])
    parser.add_argument("--flow", action="store_true", help="also the flow model at guidance 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(pathlib.Path.home() / ".cache" / "dpm_solver_nodes" / "v3_study"))
    parser.add_argument("--out", default=str(HERE / "results_v3_study.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = pathlib.Path(args.out)
    results = []
    jobs = [("eps", w) for w in args.guidance] + ([("flow", 1.0)] if args.flow else [])
    for kind, w in jobs:
        results.append(study_guidance(w, args.cache, kind, log_line=lambda s: print(s, flush=True)))
        data = out.with_suffix(".json")
        tmp = data.with_name(data.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp, data)
    environment = (f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
                   f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    write_report(results, out, environment)
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
