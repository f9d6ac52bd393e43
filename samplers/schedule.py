"""The one noise schedule every solver uses.

Hosts hand a sampler a decreasing list of ``sigmas`` and a denoiser ``D(x, sigma)`` that returns the
clean-data prediction x0.  What the number ``sigma`` means depends on the model kind:

``"eps"``  VP and VE models in k-diffusion coordinates (SD1.x/2.x/XL eps and v-prediction, EDM):
           x = x0 + sigma * n, so alpha_t = 1, sigma_t = sigma and lambda = -log(sigma).
``"flow"`` flow-matching / rectified-flow models (ComfyUI's CONST: SD3, Flux, ModelSamplingSD3):
           x = (1 - sigma) * x0 + sigma * n, so alpha_t = 1 - sigma, sigma_t = sigma and
           lambda = log((1 - sigma) / sigma).  sigma = 1 (pure noise) is lambda = -inf.

lambda is the half log-SNR, log(alpha_t / sigma_t), of the DPM-Solver papers (Lu et al. 2022, Eq. 3.2).  Every
update formula in this package is an exponential-integrator step written in lambda, alpha_t and sigma_t, so one
implementation serves both kinds; a sigma of 0 is lambda = +inf.

All schedule quantities are computed once per run in float64 on the CPU (``StepTable``) and handed to the update
formulas as Python floats, so the sampling loop does no host-to-device copies and no per-step tensor math on
scalars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODEL_KINDS = ("eps", "flow")


def check_model_kind(model_kind: str) -> str:
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    return model_kind


class NoiseSchedule:
    """alpha_t, sigma_t and lambda as functions of the host's sigma, for one model kind.

    The methods accept Python floats or tensors (float64 recommended) and follow the conventions in the module
    docstring.  ``sigma_from_lambda`` inverts ``lambda_`` and is what solvers use to place intermediate points
    (singlestep solvers, adaptive step size).
    """

    kind = "eps"

    def alpha(self, sigma):
        return sigma * 0 + 1 if isinstance(sigma, torch.Tensor) else 1.0

    def sigma_t(self, sigma):
        return sigma

    def lambda_(self, sigma):
        if isinstance(sigma, torch.Tensor):
            return -torch.log(sigma)
        return -math.log(sigma) if sigma > 0 else math.inf

    def sigma_from_lambda(self, lam):
        if isinstance(lam, torch.Tensor):
            return torch.exp(-lam)
        return math.exp(-lam)

    def sigma_max_allowed(self):
        return math.inf

    def __repr__(self):
        return f"{type(self).__name__}()"


class VarianceExplodingSchedule(NoiseSchedule):
    """``model_kind="eps"``: x = x0 + sigma * n (VP models are rescaled to this form by the hosts)."""

    kind = "eps"


class FlowSchedule(NoiseSchedule):
    """``model_kind="flow"``: x = (1 - sigma) * x0 + sigma * n with sigma in [0, 1]."""

    kind = "flow"

    def alpha(self, sigma):
        return 1 - sigma

    def lambda_(self, sigma):
        if isinstance(sigma, torch.Tensor):
            return torch.log1p(-sigma) - torch.log(sigma)
        if sigma <= 0:
            return math.inf
        if sigma >= 1:
            return -math.inf
        return math.log1p(-sigma) - math.log(sigma)

    def sigma_from_lambda(self, lam):
        # sigma = 1 / (1 + e^lambda), the inverse of lambda = log((1 - sigma) / sigma)
        if isinstance(lam, torch.Tensor):
            return torch.sigmoid(-lam)
        if lam == math.inf:
            return 0.0
        if lam == -math.inf:
            return 1.0
        if lam > 0:  # e^-lambda / (1 + e^-lambda): no overflow for large lambda
            e = math.exp(-lam)
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(lam)) if lam > -700 else 1.0

    def sigma_max_allowed(self):
        return 1.0


def noise_schedule(model_kind: str = "eps") -> NoiseSchedule:
    """The schedule for ``model_kind`` ("eps" or "flow")."""
    check_model_kind(model_kind)
    return FlowSchedule() if model_kind == "flow" else VarianceExplodingSchedule()


def validate_sigmas(sigmas, schedule: NoiseSchedule) -> torch.Tensor:
    """Check a host's sigma list and return it as float64 on the CPU.

    Requirements: 1-D, at least two entries, finite, strictly decreasing, positive except for an optional
    trailing 0, and (flow models) no sigma above 1.
    """
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must hold at least 2 values (a start and an end), got {sigmas.numel()}; "
            "a sampler with n steps needs n + 1 sigmas")
    s = sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas contain NaN or inf: {s.tolist()}")
    if (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError(f"sigmas must be positive except for an optional trailing 0, got {s.tolist()}")
    diffs = s[1:] - s[:-1]
    if (diffs >= 0).any():
        i = int(torch.nonzero(diffs >= 0)[0])
        raise ValueError(
            f"sigmas must be strictly decreasing; sigmas[{i}] = {s[i].item():.6g} is followed by "
            f"sigmas[{i + 1}] = {s[i + 1].item():.6g}")
    if s[0] > schedule.sigma_max_allowed() * (1 + 1e-6):
        raise ValueError(
            f"sigma {s[0].item():.6g} exceeds {schedule.sigma_max_allowed()} for model_kind={schedule.kind!r}; "
            "flow-matching sigmas lie in [0, 1] (is this an eps model?)")
    return s


@dataclass(frozen=True)
class StepTable:
    """Per-run schedule values at every sigma, as Python floats (float64).

    ``lam[i]``, ``alpha[i]``, ``sigma[i]`` at sigmas[i]; ``h[i] = lam[i+1] - lam[i]`` for step i.  A trailing
    sigma of 0 has lam = +inf; a flow start at sigma = 1 has lam = -inf.
    """

    schedule: NoiseSchedule
    sigmas: tuple
    lam: tuple
    alpha: tuple
    sigma: tuple
    h: tuple

    @classmethod
    def build(cls, sigmas, schedule: NoiseSchedule) -> "StepTable":
        s = validate_sigmas(sigmas, schedule).tolist()
        s = [min(v, schedule.sigma_max_allowed()) for v in s]
        lam = [schedule.lambda_(v) for v in s]
        alpha = [float(schedule.alpha(v)) for v in s]
        h = [lam[i + 1] - lam[i] for i in range(len(s) - 1)]
        return cls(schedule, tuple(s), tuple(lam), tuple(alpha), tuple(s), tuple(h))

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def finite_step(self, i: int) -> bool:
        """True when step i has finite h: not from lambda = -inf and not into sigma = 0."""
        return math.isfinite(self.h[i])
