"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): noise-prediction ODE solvers of orders 1-3, singlestep
(DPM-Solver-1/2/3, Algorithms 1-2, and the "fast" order mix of Sec. 3.4), multistep, and the adaptive step size
DPM-Solver-12/23 (Sec. 3.5, with k-diffusion's PID controller).

The host's model returns x0 = D(x, sigma); these solvers integrate the noise prediction derived from it,
eps = (x - alpha_t D) / sigma_t, with the exponential integrator of ``exponential.noise_prediction_step``
(DPM-Solver Eq. 3.7): x_t = (alpha_t / alpha_s) x_s - sigma_t sum_k phi_{k+1}(h) eps^{(k)}(lambda_s).
Everything is written in the schedule's lambda (``schedule.py``), so eps-in-VE and flow models share one code path;
a flow run is exactly alpha_t times the eps run on the VE-rescaled problem.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .common import SamplerRun, check_choice, check_nonnegative, check_positive_int
from .exponential import (data_prediction_step, first_order_data_step, guarded_step, noise_prediction_step,
                          step_out_of_sigma_one)
from .schedule import StepTable, noise_schedule

METHODS = ("singlestep", "multistep")
ADAPTIVE_ORDERS = (2, 3)
# A flow run from sigma = 1 (lambda = -inf) enters the adaptive integration at sigma = 0.99.  With u = e^lambda =
# alpha/sigma the exact step from sigma = 1 is x_t = sigma_t x_1 + sigma_t * integral_0^{u_t} D du (DPM-Solver++ Eq. 9
# with e^lambda dlambda = du), and D is smooth in u there (D - E[x0] ~ Cov n u), so the entry is one Heun
# (trapezoid) step in u: x_t = sigma_t x_1 + alpha_t (D_1 + D(x_t^DDIM, sigma_t)) / 2, error O(u_t^3) ~ 1e-6.
FLOW_ENTRY_LAMBDA = math.log(0.01 / 0.99)
# The stages of DPM-Solver-2 and -3 (Algorithms 1-2: r1 = 1/2; r1 = 1/3, r2 = 2/3), as fractions of the step.
R_STAGES = {2: (1 / 2,), 3: (1 / 3, 2 / 3)}


class StepBudgetError(ValueError):
    """The adaptive solver would need more than ``max_nfe`` model calls (tolerances too tight for the budget)."""


class _Point(NamedTuple):
    """A point of the noise schedule."""

    sigma: float
    lam: float
    alpha: float


def _point(schedule, lam) -> _Point:
    sigma = schedule.sigma_from_lambda(lam)
    return _Point(sigma, lam, float(schedule.alpha(sigma)))


def _table_point(table, i) -> _Point:
    return _Point(table.sigma[i], table.lam[i], table.alpha[i])


def _noise_prediction(x, denoised, point):
    """eps = (x - alpha D) / sigma (DPM-Solver Eq. 2.1 solved for the noise)."""
    return (x - denoised * point.alpha) / point.sigma


def _step(x, schedule, s, t, derivatives):
    """``noise_prediction_step`` from point s to point t with the Taylor terms [eps, eps', ...] at s."""
    segment = StepTable(schedule, (s.sigma, t.sigma), (s.lam, t.lam), (s.alpha, t.alpha), (s.sigma, t.sigma),
                        (t.lam - s.lam,))
    return noise_prediction_step(x, segment, 0, derivatives)


def _singlestep(x, eps, s, t, order, noise_at, schedule, embedded=False):
    """One DPM-Solver-``order`` step from s to t; returns (x_t, embedded lower-order x_t or None).

    Order 1 is DPM-Solver-1 (DDIM).  Order 2 is DPM-Solver-2 (Algorithm 1, r1 = 1/2):
      u1 = DPM-Solver-1 to s1 = lambda_s + r1 h,
      x_t = (alpha_t / alpha_s) x - sigma_t phi_1(h) [eps + (eps_1 - eps) / (2 r1)].
    Order 3 is DPM-Solver-3 (Algorithm 2, r1 = 1/3, r2 = 2/3); in Taylor form the stages use the slope estimates
    eps' ~ (eps_1 - eps)/(r1 h) with weight phi_2(r2 h) for u2, and eps' ~ (eps_2 - eps)/(r2 h) with weight phi_2(h)
    for x_t, which is the paper's (r2/r1)(phi_1(r2 h)/(r2 h) - 1) and (1/r2)(phi_1(h)/h - 1) form.
    ``embedded`` also returns the lower-order solution of the adaptive pair (Sec. 3.5): DPM-Solver-1 inside order 2
    and DPM-Solver-2 with r1 = 1/3 (sharing eps_1) inside order 3.  ``noise_at(u, point)`` evaluates eps.
    """
    if order == 1:
        return _step(x, schedule, s, t, [eps]), None
    h = t.lam - s.lam
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = _point(schedule, s.lam + r1 * h)
    d1 = noise_at(_step(x, schedule, s, s1, [eps]), s1) - eps
    second = _step(x, schedule, s, t, [eps + d1 / (2 * r1)]) if order == 2 or embedded else None
    if order == 2:
        return second, (_step(x, schedule, s, t, [eps]) if embedded else None)
    r2 = 2 / 3
    s2 = _point(schedule, s.lam + r2 * h)
    d2 = noise_at(_step(x, schedule, s, s2, [eps, d1 / (r1 * h)]), s2) - eps
    return _step(x, schedule, s, t, [eps, d2 / (r2 * h)]), second


def fast_schedule(sigma_min, sigma_max, nfe, order=3, model_kind="eps"):
    """The paper's DPM-Solver-fast recipe (Sec. 3.4, k-diffusion's ``sample_dpm_fast``) for a budget of ``nfe`` calls.

    Returns ``(sigmas, orders)``: K + 1 sigmas uniform in lambda from sigma_max to sigma_min (no trailing 0) and
    the order of each of the K singlestep steps, to pass as ``sample_dpm_solver(..., method="singlestep",
    orders=orders)``.  Order 3: K = nfe // 3 + 1 steps of order 3 ending with [2, 1], [1] or [2] for nfe % 3 = 0,
    1, 2; order 2: all 2 (ending with 1 for odd nfe); order 1: nfe steps of DDIM.
    """
    check_positive_int("nfe", nfe)
    check_choice("order", order, (1, 2, 3))
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if order == 3:
        k = nfe // 3 + 1
        orders = [3] * (k - 2) + [2, 1] if nfe % 3 == 0 else [3] * (k - 1) + [nfe % 3]
    elif order == 2:
        orders = [2] * (nfe // 2) + [1] * (nfe % 2)
    else:
        orders = [1] * nfe
    schedule = noise_schedule(model_kind)
    lam_start, lam_end = schedule.lambda_(float(sigma_max)), schedule.lambda_(float(sigma_min))
    if not math.isfinite(lam_start):
        raise ValueError(f"sigma_max = {sigma_max!r} is pure noise for model_kind={model_kind!r} (lambda = -inf); "
                         "time-uniform steps need a finite start, e.g. 0.999")
    lams = torch.linspace(lam_start, lam_end, len(orders) + 1, dtype=torch.float64)
    return schedule.sigma_from_lambda(lams), orders


def sample_dpm_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps", order=3,
                      method="singlestep", lower_order_final=None, final_step="denoise", orders=None,
                      threshold_percentile=None, threshold_max=1.0):
    """DPM-Solver with noise prediction (Lu et al. 2022), orders 1-3, singlestep or multistep.

    Options:
      model_kind: "eps" (VP/VE, x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).
      order: 1, 2 or 3.
      method: "singlestep": every host step is one DPM-Solver-``order`` step (Algorithms 1-2) with order - 1
        intermediate model calls placed in lambda (r = 1/2 for order 2, r = 1/3, 2/3 for order 3), so ``order``
        calls per step.  "multistep": one call per step; eps^{(k)} are the exact Taylor coefficients of the
        polynomial through the last ``order`` outputs (``taylor_derivatives``), weighted by phi_{k+1}(h).  The
        official multistep third-order code and diffusers weight phi_3 / h^2 on h^2 f[l0, l1, l2] = h^2 eps''/2,
        half the Taylor term, which lowers the local error to O(h^3); this one keeps the full term and is third
        order (measured in tests/test_dpm_solver.py).  Warm-up runs orders 1, 2, then 3 (as the official code);
        the first-order start leaves an O(h^2) error that can dominate at moderate step counts (order 2.5 measured
        on a logSNR-uniform grid from sigma = 20; 3 with a refined warm-up).
      lower_order_final: the last steps run orders ..., 3, 2, 1.  ``None`` = on below 15 steps (the papers'
        recommendation).  For singlestep order 3 this is the paper's "fast" mix (Sec. 3.4) for nfe % 3 = 0 on the
        host's sigmas; ``fast_schedule`` builds the other mixes and k-diffusion's time-uniform sigmas.
      orders: singlestep only: an explicit order (1-3) for each step, overriding ``order`` and
        ``lower_order_final`` (e.g. from ``fast_schedule``).
      final_step: "denoise" (a trailing 0 in sigmas returns D, one call) or "stop" (return x at the last positive
        sigma).  Steps into sigma = 0 are first order.
      threshold_percentile, threshold_max: Imagen dynamic thresholding of D for pixel-space models (off if None).
    A flow model's sigma = 1 is lambda = -inf, where the noise-prediction form is undefined (alpha = 0): the step out
    of it puts a singlestep method's stages in rho = -log sigma (``exponential.step_out_of_sigma_one``, ``order``
    calls; a multistep method's first step is DDIM), and the multistep steps whose history reaches it are
    data-prediction steps with D interpolated in rho (``exponential.rho_weights``; the third-order one guarded as
    the 3M's, ``exponential.guarded_step``), so both keep their order.
    The callback runs once per host step with the denoised prediction at the step's start.
    """
    check_choice("order", order, (1, 2, 3))
    check_choice("method", method, METHODS)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind, final_step=final_step,
                     threshold_percentile=threshold_percentile, threshold_max=threshold_max)
    if orders is not None:
        if method != "singlestep":
            raise ValueError("orders (a per-step order list) applies to method='singlestep' only")
        orders = list(orders)
        if len(orders) != run.steps or any(o not in (1, 2, 3) for o in orders):
            raise ValueError(f"orders must list an order in (1, 2, 3) for each of the {run.steps} steps, got {orders}")
    lower_order_final = run.default_lower_order_final(lower_order_final)
    if method == "singlestep":
        return _run_singlestep(run, x, order, lower_order_final, orders)
    return _run_multistep(run, x, order, lower_order_final)


def _run_singlestep(run, x, order, lower_order_final, orders):
    t, schedule = run.table, run.schedule
    x = run.start(x)
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if t.sigma[i + 1] == 0:
            x = data_prediction_step(x, t, i, [denoised])
            continue
        step_order = orders[i] if orders is not None else run.order(i, order, lower_order_final, order)
        if not t.finite_step(i):  # out of a flow model's sigma = 1: the stages in rho (order 1: DDIM)
            if step_order == 1:
                x = data_prediction_step(x, t, i, [denoised])
            else:
                x = step_out_of_sigma_one(x, t, i, denoised, R_STAGES[step_order],
                                          lambda u, sigma: run.denoise(u, i, sigma=sigma))
            continue
        s = _table_point(t, i)

        def noise_at(u, point):
            return _noise_prediction(u, run.denoise(u, i, sigma=point.sigma), point)

        x, _ = _singlestep(x, _noise_prediction(x, denoised, s), s, _table_point(t, i + 1), step_order, noise_at,
                           schedule)
    return run.finish(x)


def _run_multistep(run, x, order, lower_order_final):
    t = run.table
    x = run.start(x)
    lams, noises, outputs = [], [], []  # newest first; lambda = -inf at a flow model's sigma = 1
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        lams, outputs = [t.lam[i]] + lams[:order - 1], [denoised] + outputs[:order - 1]
        if not t.finite_step(i):
            x = data_prediction_step(x, t, i, [denoised])
            continue
        noises = [_noise_prediction(x, denoised, _table_point(t, i))] + noises[:order - 1]
        step_order = run.order(i, order, lower_order_final, len(lams))
        if step_order == 3 and not math.isfinite(lams[2]):  # the data form in rho, guarded as the 3M's steps
            x = guarded_step(x, t, i, (lams[:3], outputs[:3]), second_outputs=2)
        elif not math.isfinite(lams[step_order - 1]):  # history at sigma = 1: the data form, D interpolated in rho
            x = data_prediction_step(x, t, i, history=(lams[:step_order], outputs[:step_order]))
        else:
            x = noise_prediction_step(x, t, i, history=(lams[:step_order], noises[:step_order]))
    return run.finish(x)


class _StepSizeController:
    """PID step-size control on the error ratio (Söderlind 2003), as k-diffusion's ``PIDStepSizeController``.

    h <- h * limiter(e_n^{-b1} e_{n-1}^{-b2} e_{n-2}^{-b3}) with b1 = (p + i + d)/k, b2 = -(p + 2d)/k, b3 = d/k,
    limiter(f) = 1 + atan(f - 1); a step is accepted when the factor is >= accept_safety.  p = d = 0, i = 1 is the
    classic controller h * error^{-1/k} of the paper's Sec. 3.5.
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors = []

    def propose_step(self, error):
        inverse = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse, inverse, inverse]
        self.inverse_errors[0] = inverse
        e = self.inverse_errors
        factor = 1 + math.atan(e[0] ** self.b1 * e[1] ** self.b2 * e[2] ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [e[0], e[0], e[1]]
        self.h *= factor
        return accept


def _check_adaptive_options(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, max_nfe):
    check_choice("order", order, ADAPTIVE_ORDERS)
    rtol, atol = check_nonnegative("rtol", rtol), check_nonnegative("atol", atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0 (the error norm would divide by zero)")
    if check_nonnegative("h_init", h_init) == 0:
        raise ValueError("h_init must be > 0 (the first step size in lambda)")
    for name, value in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not pcoeff + icoeff + dcoeff > 0:
        raise ValueError(f"pcoeff + icoeff + dcoeff must be > 0 or the step size never adapts, got "
                         f"{pcoeff + icoeff + dcoeff!r}")
    if not isinstance(accept_safety, (int, float)) or not 0 < accept_safety <= 1:
        raise ValueError(f"accept_safety must lie in (0, 1], got {accept_safety!r}")
    check_positive_int("max_nfe", max_nfe)
    if max_nfe < order + 1:
        raise ValueError(f"max_nfe must be at least order + 1 = {order + 1}, got {max_nfe}")
    return rtol, atol


def sample_dpm_solver_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                               order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0.,
                               accept_safety=0.81, max_nfe=1000, final_step="denoise", return_info=False,
                               threshold_percentile=None, threshold_max=1.0):
    """DPM-Solver-12 / DPM-Solver-23 with adaptive step size (paper Sec. 3.5; k-diffusion's
    ``sample_dpm_adaptive`` at eta = 0).

    Only the RANGE of ``sigmas`` is used: the solver integrates in lambda from sigmas[0] to the last positive sigma
    with its own step sizes (the number of steps in ``sigmas`` is ignored), then, if the list ends at 0 and
    ``final_step="denoise"``, returns D at that last sigma (one more call).  A sub-range (img2img) is respected.
    A flow run from sigma = 1 (lambda = -inf) first takes one Heun step in u = e^lambda to sigma = 0.99 (two calls,
    ``FLOW_ENTRY_LAMBDA``).

    Each attempt from s to t = s + h runs a singlestep pair sharing model calls: DPM-Solver-1 and -2 (order 2, two
    calls) or DPM-Solver-2 (r1 = 1/3) and -3 (order 3, three calls); eps at s is reused after a rejection (k-diffusion
    recomputes it, so its reported nfe is higher by n_reject; the samples are the same).  The error is the RMS over
    the whole batch of (x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|)) (k-diffusion's norm; the official
    code takes a per-sample norm and the batch maximum); the PID controller then scales h.

    Options:
      model_kind: "eps" or "flow" (the step sizes live in that schedule's lambda).
      order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
      rtol, atol: relative and absolute tolerance of the error norm (defaults as k-diffusion; the latent's scale).
      h_init: the first step size in lambda.
      pcoeff, icoeff, dcoeff: PID controller coefficients (default: the paper's integral controller).
      accept_safety: accept a step when the controller's factor is at least this (0.81 = 0.9^2).
      max_nfe: raise ``StepBudgetError`` (a ValueError) instead of calling the model more often than this.
      final_step: "denoise" or "stop" (return x at the last positive sigma even if the list ends at 0).
      return_info: also return {"steps", "nfe", "n_accept", "n_reject"}.
      threshold_percentile, threshold_max: Imagen dynamic thresholding of D (off if None).
    The callback runs after every attempt (so a host interrupt raised from it stops the loop) with x, the denoised
    prediction at the attempt's start, the current sigma, "i" (the attempt index), "error", "h" and the info counts.
    """
    rtol, atol = _check_adaptive_options(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, max_nfe)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind, final_step=final_step,
                     threshold_percentile=threshold_percentile, threshold_max=threshold_max)
    table, schedule = run.table, run.schedule
    last = table.steps if table.sigmas[-1] > 0 else table.steps - 1
    s, end = _table_point(table, 0), _table_point(table, last)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    x = run.start(x)

    from tqdm.auto import tqdm

    with tqdm(disable=disable, unit="nfe") as progress:
        def denoise(u, point):
            if run.nfe >= max_nfe:
                raise StepBudgetError(
                    f"DPM-Solver adaptive reached max_nfe = {max_nfe} model calls at sigma = {s.sigma:.6g} of the "
                    f"range {table.sigmas[0]:.6g} -> {end.sigma:.6g}; loosen rtol/atol or raise max_nfe")
            denoised = run.denoise(u, info["steps"], sigma=point.sigma)
            progress.update(1)
            return denoised

        def noise_at(u, point):
            return _noise_prediction(u, denoise(u, point), point)

        if last > 0 and not math.isfinite(s.lam):  # flow from sigma = 1: one Heun step in u off lambda = -inf
            entry = end if end.lam <= FLOW_ENTRY_LAMBDA else _point(schedule, FLOW_ENTRY_LAMBDA)
            denoised = denoise(x, s)
            x_euler = first_order_data_step(x, denoised, s.sigma, entry.sigma, entry.alpha, math.inf)
            x = x_euler + (denoise(x_euler, entry) - denoised) * (entry.alpha / 2)
            s = entry
            info["steps"] += 1
            info["n_accept"] += 1
            _report_attempt(run, x, s, denoised, info, error=0.0, h=math.inf)
        controller = _StepSizeController(h_init, pcoeff, icoeff, dcoeff, order, accept_safety)
        x_prev, eps = x, None
        while s.lam < end.lam - 1e-5:
            if eps is None:
                denoised = denoise(x, s)
                eps = _noise_prediction(x, denoised, s)
            lam_t = min(end.lam, s.lam + controller.h)
            t = end if lam_t == end.lam else _point(schedule, lam_t)
            x_high, x_low = _singlestep(x, eps, s, t, order, noise_at, schedule, embedded=True)
            delta = (torch.maximum(x_low.abs(), x_prev.abs()) * rtol).clamp(min=atol)
            error = torch.linalg.norm((x_low - x_high) / delta).item() / math.sqrt(x.numel())
            if controller.propose_step(error):
                x_prev, x, s, eps = x_low, x_high, t, None
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["steps"] += 1
            info["nfe"] = run.nfe
            _report_attempt(run, x, s, denoised, info, error=error, h=controller.h)
        if last < table.steps:  # the list ends at 0 and final_step="denoise"
            x = denoise(x, end) * table.alpha[-1]
    info["nfe"] = run.nfe
    x = run.finish(x)
    return (x, info) if return_info else x


def _report_attempt(run, x, s, denoised, info, error, h):
    info["nfe"] = run.nfe
    if run.callback is not None:
        sigma = x.new_tensor(s.sigma)
        run.callback({"x": x, "i": info["steps"] - 1, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised,
                      "error": error, "h": h, **info})


__all__ = ["sample_dpm_solver", "sample_dpm_solver_adaptive", "fast_schedule", "StepBudgetError"]
