"""Step schedules: n decreasing positive sigmas followed by 0 (n model calls for a one-call-per-step sampler, the
last step returning the denoised prediction at the last positive sigma).  float64, on the CPU.

eps models (x = x0 + sigma n) on [sigma_min, sigma_max]:
  karras          Karras et al. 2022, Eq. 5, rho = 7
  exponential     uniform in log sigma (= uniform in logSNR lambda = -log sigma, so ``logsnr_uniform`` is the same)
  time_uniform    uniform in a discrete model's continuous timestep t (``discrete`` with ``sigma_to_t`` /
                  ``t_to_sigma``), the DDIM / diffusers "linspace" spacing
flow models (x = (1 - sigma) x0 + sigma n) start at sigma = 1 (pure noise):
  karras          rho = 7 on [sigma_min, 1]
  exponential     uniform in log sigma on [sigma_min, 1]
  time_uniform    uniform in sigma (flow time) on [sigma_min, 1]
  logsnr_uniform  sigma = 1, then uniform in lambda = log((1 - sigma) / sigma) on [-lambda(sigma_min), lambda(sigma_min)]
  shifted         the flow hosts' default (ComfyUI "simple"/"normal" with ModelSamplingSD3, diffusers'
                  FlowMatchEulerDiscreteScheduler): t uniform on [1, 0] in n steps, sigma = shift t / (1 + (shift - 1) t)
                  (SD3's time shift, Esser et al. 2024, Eq. 23); its last positive sigma is shift(1/n), not sigma_min

``recommended_sigmas`` is the schedule the measurements (README, "Schedules") show our solvers do best on.
"""
from __future__ import annotations

import math

import torch

from .schedule import check_model_kind

SCHEDULES = ("karras", "exponential", "time_uniform", "logsnr_uniform")


def _check_steps(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")


def _check_range(sigma_min, sigma_max, model_kind):
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be below sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if model_kind == "flow" and sigma_max > 1:
        raise ValueError(f"flow sigmas lie in (0, 1], got sigma_max={sigma_max!r}")


def karras(n, sigma_min, sigma_max, rho=7.0):
    """n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho) (Karras et al. 2022, Eq. 5); no trailing 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(n, sigma_min, sigma_max):
    """n sigmas from sigma_max to sigma_min, uniform in log sigma; no trailing 0."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def flow_lambda(sigma):
    """The flow model's logSNR, lambda = log((1 - sigma) / sigma)."""
    return math.log((1 - sigma) / sigma)


def flow_logsnr_uniform(n, lambda_lo, lambda_hi):
    """n flow sigmas sigmoid(-lambda) for lambda uniform on [lambda_lo, lambda_hi] (descending sigma); no 0."""
    if n == 1:
        return torch.tensor([1 / (1 + math.exp(lambda_hi))], dtype=torch.float64)
    return torch.sigmoid(-torch.linspace(lambda_lo, lambda_hi, n, dtype=torch.float64))


def shifted(n, shift=3.0):
    """n + 1 flow sigmas: t = 1, 1 - 1/n, ..., 0 mapped by sigma = shift t / (1 + (shift - 1) t) (ends with 0)."""
    _check_steps(n)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def with_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_sigmas(schedule, n, model_kind="eps", sigma_min=None, sigma_max=None, discrete=None):
    """``n`` positive sigmas (first = sigma_max, or 1 for flow; last = sigma_min) and a trailing 0, float64.

    Flow schedules always start at sigma = 1 (``sigma_max`` is ignored); ``sigma_min`` defaults to 1e-3 there.
    eps ``time_uniform`` needs ``discrete`` (an object with ``sigma_to_t`` / ``t_to_sigma``, e.g. the embedded
    model's ``DiscreteVPSchedule``), and eps schedules need sigma_min and sigma_max (or ``discrete``'s).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_steps(n)
    check_model_kind(model_kind)
    if model_kind == "flow":
        sigma_min = 1e-3 if sigma_min is None else sigma_min
        _check_range(sigma_min, 1.0, "flow")
        if n == 1:
            return with_zero(torch.ones(1, dtype=torch.float64))
        if schedule == "karras":
            return with_zero(karras(n, sigma_min, 1.0))
        if schedule == "exponential":
            return with_zero(exponential(n, sigma_min, 1.0))
        if schedule == "time_uniform":
            return with_zero(torch.linspace(1.0, sigma_min, n, dtype=torch.float64))
        lam_end = flow_lambda(sigma_min)
        return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), flow_logsnr_uniform(n - 1, -lam_end, lam_end)]))
    if sigma_min is None or sigma_max is None:
        if discrete is None:
            raise ValueError("eps schedules need sigma_min and sigma_max (or a discrete schedule)")
        sigma_min, sigma_max = discrete.sigma_min, discrete.sigma_max
    _check_range(sigma_min, sigma_max, "eps")
    if n == 1:
        return with_zero(torch.tensor([float(sigma_max)], dtype=torch.float64))
    if schedule == "karras":
        return with_zero(karras(n, sigma_min, sigma_max))
    if schedule in ("exponential", "logsnr_uniform"):
        return with_zero(exponential(n, sigma_min, sigma_max))
    if discrete is None:
        raise ValueError("the eps time_uniform schedule needs the model's discrete schedule (discrete=...)")
    t_hi, t_lo = discrete.sigma_to_t(torch.tensor([float(sigma_max), float(sigma_min)])).tolist()
    return with_zero(discrete.t_to_sigma(torch.linspace(t_hi, t_lo, n, dtype=torch.float64)))


RECOMMENDED_EPS_RHO = 15.0
RECOMMENDED_FLOW_FIRST_STEP = 0.1
RECOMMENDED_FLOW_SHIFT = 3.0
RECOMMENDED_FLOW_SHIFT_WEIGHT = 0.5
RECOMMENDED_FLOW_TAPER = 0.25


def flow_first_lambda(n, lambda_end, first_step=RECOMMENDED_FLOW_FIRST_STEP):
    """lambda_1 of a flow schedule 1, lambda_1, ..., lambda_end with n - 2 uniform lambda steps h after lambda_1 and
    e^{lambda_1} = first_step * h (solved by fixed-point iteration; it contracts, |d/dlambda_1| = 1/(lambda_end -
    lambda_1) < 1)."""
    lam = -lambda_end
    for _ in range(100):
        new = math.log(first_step * (lambda_end - lam) / (n - 2))
        if abs(new - lam) < 1e-12:
            break
        lam = new
    return lam


def recommended_sigmas(n, sigma_min, sigma_max, model_kind="eps"):
    """n + 1 sigmas (n model calls with a one-call-per-step sampler, trailing 0) that our solvers do best on.

    Chosen from measurements on random analytic Gaussian mixtures and the embedded eps and flow models (README,
    "Schedules"; ``python -m dpm_solver_nodes.bench.schedule_study``):
      eps:  Karras spacing with rho = 15, between Karras' rho = 7 (dense at low noise) and logSNR-uniform steps
            (rho -> inf): below Karras' error at 6-20 steps and within a few percent of it at 40, where
            logSNR-uniform steps fall behind Karras on the embedded model.
      flow: sigma = 1 (when sigma_max = 1), then a mix in lambda = log((1 - sigma) / sigma) of two schedules:
            lambda_k = w_k lambda_k(shift 3) + (1 - w_k) lambda_k(uniform), k = 1 .. n - 1, with
            w_k = 0.5 (1 - (k - 1) / (n - 2))^(1/4).  "shift 3" is the hosts' default (``shifted``), whose steps
            crowd where a mixture's modes separate; "uniform" is uniform in lambda from lambda_1 to lambda(sigma_min)
            with e^{lambda_1} = 0.1 h (``flow_first_lambda``: the step out of sigma = 1 has an error
            ~ e^{2 lambda_1}, tied to the second-order steps' h^2).  w_k falls to 0 at sigma_min, so the last steps
            are uniform in lambda and the schedule stays second order (the hosts' last positive sigma, shift(1/n),
            makes every solver first order).  The shift-3 lambdas are capped by the uniform ones (changes nothing
            below 86 steps at sigma_min = 1e-3; keeps the lambdas increasing for any sigma_min).
            With sigma_max < 1 (img2img): uniform in lambda from lambda(sigma_max).  With sigma_min >= 0.5 (the
            first part of a split schedule): uniform in sigma.
    """
    _check_steps(n)
    check_model_kind(model_kind)
    _check_range(sigma_min, sigma_max, model_kind)
    if n == 1:
        return with_zero(torch.tensor([float(sigma_max)], dtype=torch.float64))
    if model_kind == "eps":
        return with_zero(karras(n, sigma_min, sigma_max, RECOMMENDED_EPS_RHO))
    lam_end = flow_lambda(sigma_min)
    if sigma_max < 1:
        return with_zero(flow_logsnr_uniform(n, flow_lambda(sigma_max), lam_end))
    if n == 2:
        return with_zero(torch.tensor([1.0, sigma_min], dtype=torch.float64))
    if sigma_min >= 0.5:
        # lambda(sigma_min) <= 0: a short segment next to sigma = 1 (a split schedule's first part), where the
        # uniform-lambda tail and its first-step rule have no room; uniform in sigma keeps the steps increasing
        return with_zero(torch.linspace(1.0, float(sigma_min), n, dtype=torch.float64))
    return flow_shift_mix(n, sigma_min)


def flow_shift_mix(n, sigma_min, shift=RECOMMENDED_FLOW_SHIFT, weight=RECOMMENDED_FLOW_SHIFT_WEIGHT,
                   taper=RECOMMENDED_FLOW_TAPER, first_step=RECOMMENDED_FLOW_FIRST_STEP):
    """n + 1 flow sigmas (n >= 3): 1, then lambda_k = w_k lambda_k(shifted) + (1 - w_k) lambda_k(uniform) for
    k = 1 .. n - 1 with w_k = weight (1 - (k - 1) / (n - 2))^taper, then 0 (``recommended_sigmas``, flow)."""
    lam_end = flow_lambda(sigma_min)
    lam_1 = max(flow_first_lambda(n, lam_end, first_step), -lam_end)  # never closer to 1 than sigma_min is to 0
    uniform = -torch.logit(flow_logsnr_uniform(n - 1, lam_1, lam_end))
    # the hosts' lambdas, capped by the uniform ones so that the mix stays increasing for any sigma_min
    host = (-torch.logit(shifted(n, shift)[1:-1])).minimum(uniform)
    k = torch.arange(n - 1, dtype=torch.float64)
    w = weight * (1 - k / (n - 2)) ** taper
    return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-(w * host + (1 - w) * uniform))]))
