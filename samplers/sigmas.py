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
RECOMMENDED_FLOW_SHIFT = 3.0
RECOMMENDED_FLOW_SHIFT_WEIGHT = 0.38
RECOMMENDED_FLOW_TAPER = 0.12
RECOMMENDED_FLOW_FIRST_STEP = 0.16
RECOMMENDED_FLOW_LAST_LAMBDA = (0.58, 1.2)  # lambda of the last positive sigma: 0.58 + 1.2 log n (at most sigma_min's)
FLOW_FULL_NOISE = 1 - 1e-6  # a flow sigma_max at least this is sigma = 1 (float32 roundings of 1 included)


def flow_last_lambda(n, lambda_end, lambda_start=-math.inf, last=RECOMMENDED_FLOW_LAST_LAMBDA):
    """lambda of the last positive sigma of an n-step flow schedule: a + b log n, counted from lambda_start when that
    lies above a (a start below sigma = 1), and never past lambda_end = lambda(sigma_min)."""
    a, b = last
    return min(lambda_end, max(a, lambda_start) + b * math.log(n))


def flow_first_lambda(n, lambda_end, first_step=RECOMMENDED_FLOW_FIRST_STEP):
    """lambda_1 of a flow schedule 1, lambda_1, ..., lambda_end with n - 2 uniform lambda steps h after lambda_1 and
    e^{lambda_1} = first_step * h (n >= 3, any finite lambda_end).

    With u = lambda_end - lambda_1 > 0 that is u + log u = R, R = lambda_end - log(first_step / (n - 2)): one root
    for every R; Newton's method in v = log u on the convex, increasing e^v + v - R, started where it is >= 0,
    falls to it monotonically."""
    if n < 3:
        raise ValueError(f"flow_first_lambda needs n >= 3, got {n!r}")
    r = lambda_end - math.log(first_step / (n - 2))
    v = math.log(r) if r > 1 else r
    for _ in range(100):
        step = (math.exp(v) + v - r) / (math.exp(v) + 1)
        v -= step
        if abs(step) < 1e-14:
            break
    return lambda_end - math.exp(v)


def recommended_sigmas(n, sigma_min, sigma_max, model_kind="eps"):
    """n + 1 sigmas (n model calls with a one-call-per-step sampler, trailing 0) that our solvers do best on.

    Chosen from measurements on random analytic Gaussian mixtures (several seeds, dimensions and component counts,
    chosen on one set and reported on another) and the embedded eps and flow models (README, "Schedules";
    ``python -m dpm_solver_nodes.bench.schedule_study``):
      eps:  Karras spacing with rho = 15, between Karras' rho = 7 (dense at low noise) and logSNR-uniform steps
            (rho -> inf); ends at sigma_min.
      flow: sigma = 1, then a mix in lambda = log((1 - sigma) / sigma) of two schedules, for k = 1 .. n - 1:
            lambda_k = w_k lambda_k(shift 3) + (1 - w_k) lambda_k(uniform),  w_k = 0.38 (1 - (k - 1) / (n - 2))^0.12.
            "shift 3" is the hosts' default (``shifted``), whose steps crowd where a mixture's modes separate;
            "uniform" runs uniformly in lambda from lambda_1 to lambda_L with e^{lambda_1} = 0.16 h
            (``flow_first_lambda``: the step out of sigma = 1 has an error ~ e^{2 lambda_1}, tied to the
            second-order steps' h^2).  The last positive sigma is at lambda_L = 0.58 + 1.2 log n
            (``flow_last_lambda``), or at sigma_min once that is reached: a step into sigma = 0 from lambda_L costs
            about the change of the denoised prediction beyond lambda_L, which falls more slowly with lambda on the
            trained model than on the mixtures, so lambda_L grows a little faster than log n to keep the schedule
            second order there; few-step schedules stop early instead of spending steps where the prediction hardly
            changes.  w_k falls to 0 at the last point, which is therefore lambda_L.
            The shift-3 lambdas are capped by the uniform ones, which keeps the lambdas increasing.
            With sigma_max < 1 (a schedule that starts from a partly noised latent): sigma_max, then uniform in
            lambda to lambda_L, counted from lambda(sigma_max) when that lies above 0.58 (a sigma_max within 1e-6
            of 1, e.g. a float32 rounding of 1, counts as 1).
    The hosts' img2img (ComfyUI's denoise, the WebUI's denoising strength) keeps the tail of a longer schedule,
    sigma_max stays the model's; the last positive sigma of a flow schedule is sigma_min only once lambda_L reaches it.
    """
    _check_steps(n)
    check_model_kind(model_kind)
    _check_range(sigma_min, sigma_max, model_kind)
    if n == 1:
        return with_zero(torch.tensor([float(sigma_max)], dtype=torch.float64))
    if model_kind == "eps":
        sigmas = karras(n, sigma_min, sigma_max, RECOMMENDED_EPS_RHO)
        sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exactly, not (sigma^(1/rho))^rho
        return with_zero(sigmas)
    lam_end = flow_lambda(sigma_min)
    if sigma_max < FLOW_FULL_NOISE:
        lam_start = flow_lambda(sigma_max)
        lam_last = flow_last_lambda(n, lam_end, lam_start)
        return with_zero(torch.cat([torch.tensor([float(sigma_max)], dtype=torch.float64),
                                    flow_logsnr_uniform(n, lam_start, lam_last)[1:]]))
    lam_last = flow_last_lambda(n, lam_end)
    if n == 2:
        sigmas = with_zero(torch.tensor([1.0, 1 / (1 + math.exp(lam_last))], dtype=torch.float64))
    else:
        sigmas = flow_shift_mix(n, lam_last)
    sigmas[0] = sigma_max  # 1, or a float32 rounding of it
    return sigmas


def flow_shift_mix(n, lambda_last, shift=RECOMMENDED_FLOW_SHIFT, weight=RECOMMENDED_FLOW_SHIFT_WEIGHT,
                   taper=RECOMMENDED_FLOW_TAPER, first_step=RECOMMENDED_FLOW_FIRST_STEP):
    """n + 1 flow sigmas (n >= 3): 1, then lambda_k = w_k lambda_k(shifted) + (1 - w_k) lambda_k(uniform) for
    k = 1 .. n - 1 with w_k = weight (1 - (k - 1) / (n - 2))^taper, the uniform part from lambda_1
    (``flow_first_lambda``) to ``lambda_last``, then 0 (``recommended_sigmas``, flow).  taper = 0 keeps w_k = weight
    to the end (the last point is then not ``lambda_last``)."""
    lam_1 = flow_first_lambda(n, lambda_last, first_step)
    uniform = torch.linspace(lam_1, lambda_last, n - 1, dtype=torch.float64)
    uniform[-1] = lambda_last
    # the hosts' lambdas, capped by the uniform ones so that the mix stays increasing
    host = (-torch.logit(shifted(n, shift)[1:-1])).minimum(uniform)
    k = torch.arange(n - 1, dtype=torch.float64)
    w = weight * (1 - k / (n - 2)) ** taper if taper > 0 else torch.full_like(k, weight)
    return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-(w * host + (1 - w) * uniform))]))
