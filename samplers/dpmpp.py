"""DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095): data-prediction ODE solvers, singlestep (2S) and multistep
(2M, 3M), with lower-order final steps and Imagen dynamic thresholding.

Each step is the exponential integrator of ``exponential.data_prediction_step``:
x_t = (sigma_t / sigma_s) x_s + alpha_t * sum_k psi_{k+1}(h) D^{(k)}, with the derivatives estimated from earlier
model outputs (multistep) or from an intermediate evaluation (singlestep).
"""
from __future__ import annotations

import math

from .common import SamplerRun, check_choice
from .exponential import (data_prediction_step, extrapolated_denoised, first_order_data_step, guarded_step,
                          midpoint_2m_step, step_out_of_sigma_one)

SOLVER_TYPES_2M = ("midpoint", "taylor")
SOLVER_TYPES_3M = ("official", "taylor")
FINAL_STEPS = ("denoise", "extrapolate", "stop")


def _final_step(final_step):
    """None -> "auto": "extrapolate" on flow models when the last positive sigma is coarse (v = sigma / (1 - sigma)
    >= 0.125), else "denoise" (k-diffusion's step, so the 2M equals the hosts' built-in DPM++ 2M).  On the shift-3
    flow schedule extrapolating halves the 2M's error at 10-20 steps (v >= 0.16) but doubles it at 40-80 steps
    (v <= 0.08), where the error stops falling (bench/results_flow_guidance.md)."""
    if final_step is None:
        return "auto"
    return check_choice("final_step", final_step, FINAL_STEPS)


def _resolve_final_step(final_step, table, model_kind):
    if final_step != "auto":
        return final_step
    coarse = model_kind == "flow" and table.steps >= 2 and table.lam[table.steps - 1] <= EXTRAPOLATE_MAX_LAMBDA
    return "extrapolate" if coarse else "denoise"


EXTRAPOLATE_MAX_LAMBDA = math.log(8.0)  # v = e^{-lambda} >= 0.125 at the last positive sigma


OFFICIAL_3M_SCALES = (1.0, 1.0, 0.5)


def _midpoint_2m_step(x, table, i, denoised, lam_prev, denoised_prev):
    """The paper's DPM-Solver++(2M) step (Algorithm 2): D_s + (D_s - D_prev) / (2r) with weight 1 - e^{-h}
    (``exponential.midpoint_2m_step``; lam_prev finite)."""
    return midpoint_2m_step(x, table, i, [table.lam[i], lam_prev], [denoised, denoised_prev])


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                    lower_order_final=None, final_step=None, solver_type="midpoint",
                    threshold_percentile=None, threshold_max=1.0):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Algorithm 2 of the paper).

    Options:
      model_kind: "eps" (VP/VE, x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).
      lower_order_final: first-order last step; ``None`` = on below 15 steps (the paper's recommendation).  A step
        into sigma = 0 is always first order (it returns the denoised prediction, as in k-diffusion).
      final_step: for a trailing 0 in sigmas, "denoise" returns D (k-diffusion's step), "extrapolate" returns D
        extrapolated to sigma = 0 from the last two outputs (second order, ``exponential.extrapolated_denoised``),
        "stop" returns x at the last positive sigma.  None (default): "auto", i.e. "extrapolate" on flow models
        whose last positive sigma is coarse (sigma / (1 - sigma) >= 0.125), else "denoise".
      solver_type: "midpoint" is the paper's form, D_s + (D_s - D_prev) / (2r) with weight 1 - e^{-h}, and equals
        k-diffusion's ``sample_dpmpp_2m``; "taylor" uses the exact Taylor weight psi_2(h) on (D_s - D_prev)/h_prev
        (the official code's "taylor"; DPM-Solver-v3 with l = 1, s = b = 0 reduces to it).  They differ at O(h^3).
      threshold_percentile, threshold_max: Imagen dynamic thresholding of D for pixel-space models (off if None).
    On flow models sigma = 1 is lambda = -inf; the step after it keeps order 2 by interpolating D in
    rho = -log sigma = softplus(lambda), finite there (``exponential.rho_weights``); later steps are the lambda form.
    """
    check_choice("solver_type", solver_type, SOLVER_TYPES_2M)
    final_step = _final_step(final_step)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                     final_step="stop" if final_step == "stop" else "denoise",
                     threshold_percentile=threshold_percentile, threshold_max=threshold_max)
    lower_order_final = run.default_lower_order_final(lower_order_final)
    t = run.table
    final_step = _resolve_final_step(final_step, t, model_kind)
    x = run.start(x)
    previous = None  # (lambda, D) of the last point; lambda = -inf at a flow model's sigma = 1
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if t.sigma[i + 1] == 0 and final_step == "extrapolate" and previous is not None:
            x = extrapolated_denoised([t.lam[i], previous[0]], [denoised, previous[1]])
        elif run.order(i, 2, lower_order_final, 1 if previous is None else 2) == 1:
            x = data_prediction_step(x, t, i, [denoised])
        elif not math.isfinite(previous[0]):  # history at sigma = 1: interpolated in rho, order 2
            x = data_prediction_step(x, t, i, history=([t.lam[i], previous[0]], [denoised, previous[1]]))
        elif solver_type == "midpoint":
            x = _midpoint_2m_step(x, t, i, denoised, *previous)
        else:
            x = data_prediction_step(x, t, i, [denoised, (denoised - previous[1]) / (t.lam[i] - previous[0])])
        previous = (t.lam[i], denoised)
    return run.finish(x)


def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                    lower_order_final=None, final_step=None, solver_type="official", guard=True,
                    threshold_percentile=None, threshold_max=1.0):
    """DPM-Solver++(3M), the multistep third-order data-prediction solver (DPM-Solver++ App. B, official code).

    D, D' and D'' at lambda_s are the Taylor coefficients of the quadratic through the last three outputs.
      solver_type: "official" (default) is the step of the authors' code and of diffusers'
        ``DPMSolverMultistepScheduler(solver_order=3)``: weights psi_1, psi_2 and psi_3 / 2 on D, D', D'' (its
        D2 = h^2 f[l0, l1, l2] = h^2 D''/2 takes the weight psi_3 / h^2), so its local error is O(h^3) and it
        converges with order 2 (measured 1.9-2.0 on the Gaussian mixture); "taylor" weights D'' fully and converges
        with order 3 (measured 3.0-3.2).  "official" is the more accurate at the step counts people use: on the
        embedded trained models 0.68-0.90x the Taylor form's error at 5-20 NFE (eps, Karras and logSNR-uniform) and
        0.73-1.02x at 6-20 NFE (flow; 1.06-1.09x at 5), about equal at 40; on the Gaussian mixture up to about 30
        logSNR-uniform steps (still at 40 Karras steps).  ``sample_dpmpp_3m_sde(solver_type="taylor")`` at eta = 0 is
        the "taylor" form, and so is the demo's converged reference.
      guard: True (default) keeps a third-order step only for the samples whose D'' term is small next to the D'
        term (``exponential.guarded_step``), else that sample takes the second-order step; with guidance and coarse
        steps the quadratic extrapolation otherwise explodes (issue 15).  False: the authors' step everywhere.
    Warm-up runs orders 1, 2, then 3; with ``lower_order_final`` the last steps run 2, 1.  The second-order steps of
    both forms (warm-up, final and guarded) are the paper's 2M (midpoint) step, so with ``guard=False`` the official
    form equals diffusers' order-3 scheduler on the same sigmas (Taylor-weighted second-order steps measured far
    worse than the 2M at 8-12 guided steps: bench/results_flow_guidance.md).  On flow models the steps whose history
    reaches sigma = 1 interpolate in rho = -log sigma (see ``sample_dpmpp_2m``).  Other options as in
    ``sample_dpmpp_2m``.
    """
    check_choice("solver_type", solver_type, SOLVER_TYPES_3M)
    scales = OFFICIAL_3M_SCALES if solver_type == "official" else None
    final_step = _final_step(final_step)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                     final_step="stop" if final_step == "stop" else "denoise",
                     threshold_percentile=threshold_percentile, threshold_max=threshold_max)
    lower_order_final = run.default_lower_order_final(lower_order_final)
    t = run.table
    final_step = _resolve_final_step(final_step, t, model_kind)
    x = run.start(x)

    # newest first, four outputs (the fourth feeds the guard only); lambda = -inf at a flow model's sigma = 1
    lams, outputs = [], []
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        lams, outputs = [t.lam[i]] + lams[:3], [denoised] + outputs[:3]
        order = run.order(i, 3, lower_order_final, len(lams))
        if t.sigma[i + 1] == 0 and final_step == "extrapolate":
            x = extrapolated_denoised(lams, outputs)
        elif order == 1:
            x = data_prediction_step(x, t, i, [denoised])
        elif order == 2:  # the paper's 2M (midpoint) for warm-up, final and guarded steps, as diffusers
            x = midpoint_2m_step(x, t, i, lams, outputs)
        else:  # order 3, or 2 per sample where the guard finds the D'' extrapolation unreliable
            x = guarded_step(x, t, i, (lams, outputs), scales=scales, guard=guard)
    return run.finish(x)


def sample_dpmpp_2s(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps", r=0.5,
                    final_step="denoise", threshold_percentile=None, threshold_max=1.0):
    """DPM-Solver++(2S), the singlestep second-order data-prediction solver (Algorithm 1 of the paper).

    Each step from s to t evaluates the model at s and at the intermediate lambda_s + r*h reached by a first-order
    step, then takes x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) [(1 - 1/(2r)) D_s + 1/(2r) D_{s1}].
    Two model calls per step; with r = 1/2 it equals k-diffusion's ``sample_dpmpp_2s_ancestral`` at eta = 0.
    Steps into sigma = 0 are first order with one call.  A flow model's step out of sigma = 1 (lambda = -inf) puts
    its stage at rho = r rho_t in rho = -log sigma and integrates the line through both outputs in rho
    (``exponential.step_out_of_sigma_one``), second order with two calls.
    """
    if not 0 < r < 1:
        raise ValueError(f"r must lie strictly between 0 and 1, got {r!r}")
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind, final_step=final_step,
                     threshold_percentile=threshold_percentile, threshold_max=threshold_max)
    t, schedule = run.table, run.schedule
    x = run.start(x)
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if t.sigma[i + 1] == 0:
            x = data_prediction_step(x, t, i, [denoised])
            continue
        if not t.finite_step(i):  # out of a flow model's sigma = 1: the stage at rho = r rho_t (rho = -log sigma)
            x = step_out_of_sigma_one(x, t, i, denoised, (r,), lambda u, sigma: run.denoise(u, i, sigma=sigma))
            continue
        h = t.h[i]
        lam_mid = t.lam[i] + r * h
        sigma_mid = schedule.sigma_from_lambda(lam_mid)
        alpha_mid = float(schedule.alpha(sigma_mid))
        x_mid = first_order_data_step(x, denoised, t.sigma[i], sigma_mid, alpha_mid, r * h)
        denoised_mid = run.denoise(x_mid, i, sigma=sigma_mid)
        # (1 - 1/(2r)) D_s + 1/(2r) D_s1 = D_s + (D_s1 - D_s) / (2r): the midpoint form with factor 1/r
        x = data_prediction_step(x, t, i, [denoised], midpoint=(denoised_mid - denoised, 1 / r))
    return run.finish(x)


__all__ = ["sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_2s"]
