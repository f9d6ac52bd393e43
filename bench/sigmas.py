"""Step schedules for the demo and the benchmark: n decreasing positive sigmas followed by 0 (n model calls for a
one-call-per-step sampler, the last step returning the denoised prediction at sigma_min).

eps models (x = x0 + sigma n) on [sigma_min, sigma_max]:
  karras          Karras et al. 2022, Eq. 5, rho = 7
  exponential     uniform in log sigma (= uniform in logSNR lambda = -log sigma, so ``logsnr_uniform`` is the same)
  time_uniform    uniform in the discrete model's continuous timestep t (needs a ``DiscreteVPSchedule``; without one,
                  uniform in VP time of the SD v1 schedule), the DDIM / diffusers "linspace" spacing
flow models (x = (1 - sigma) x0 + sigma n) start at sigma = 1 (pure noise):
  karras          rho = 7 on [sigma_min, 1]
  exponential     uniform in log sigma on [sigma_min, 1]
  time_uniform    uniform in sigma (flow time) on [sigma_min, 1]
  logsnr_uniform  sigma = 1, then uniform in lambda = log((1 - sigma) / sigma) on [-lambda(sigma_min), lambda(sigma_min)]
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("karras", "exponential", "time_uniform", "logsnr_uniform")


def karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(n, sigma_min, sigma_max):
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def with_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_sigmas(schedule, n, model_kind="eps", sigma_min=None, sigma_max=None, discrete=None):
    """``n`` positive sigmas (first = sigma_max, last = sigma_min) and a trailing 0, float64."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")
    if model_kind == "flow":
        sigma_min = 1e-3 if sigma_min is None else sigma_min
        if n == 1:
            return with_zero(torch.ones(1, dtype=torch.float64))
        if schedule == "karras":
            return with_zero(karras(n, sigma_min, 1.0))
        if schedule == "exponential":
            return with_zero(exponential(n, sigma_min, 1.0))
        if schedule == "time_uniform":
            return with_zero(torch.linspace(1.0, sigma_min, n, dtype=torch.float64))
        lam_end = math.log((1 - sigma_min) / sigma_min)
        lam = torch.linspace(-lam_end, lam_end, n - 1, dtype=torch.float64) if n > 2 else torch.tensor(
            [lam_end], dtype=torch.float64)
        return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam)]))
    if sigma_min is None or sigma_max is None:
        if discrete is None:
            raise ValueError("eps schedules need sigma_min and sigma_max (or a discrete schedule)")
        sigma_min, sigma_max = discrete.sigma_min, discrete.sigma_max
    if n == 1:
        return with_zero(torch.tensor([float(sigma_max)], dtype=torch.float64))
    if schedule == "karras":
        return with_zero(karras(n, sigma_min, sigma_max))
    if schedule in ("exponential", "logsnr_uniform"):
        return with_zero(exponential(n, sigma_min, sigma_max))
    if discrete is None:
        from ..embedded.model import DiscreteVPSchedule

        discrete = DiscreteVPSchedule()
    t_hi, t_lo = discrete.sigma_to_t(torch.tensor([float(sigma_max), float(sigma_min)])).tolist()
    return with_zero(discrete.t_to_sigma(torch.linspace(t_hi, t_lo, n, dtype=torch.float64)))
