"""The classic samplers the DPM-Solvers are measured against: DDIM, DDPM, PNDM and multistep consistency sampling.

All four are written for the host's sigmas and both model kinds through the schedule's alpha_t, sigma_t and
lambda (``samplers/schedule.py``), and all reuse the one first-order step, ``exponential.first_order_data_step``:

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D_s,        h = lambda_t - lambda_s,

which is DDIM with eta = 0 (Song et al. 2020, Eq. 12) and DPM-Solver++1.  With the noise prediction
eps = (x - alpha D) / sigma it reads x_t = alpha_t D + sigma_t eps.

The stochastic samplers add noise through one helper, ``_ancestral_step``: the deterministic part is the same step
to the lower noise level sigma_down = sqrt(sigma_t^2 - sigma_noise^2) and then sigma_noise z is added.  For the
forward process x = alpha x0 + sigma n the posterior q(x_t | x_s, x0) has standard deviation
sigma_t sqrt(1 - e^{-2h}) whatever the schedule (VP, VE or flow), which is DDIM's sigma_eta at eta = 1 and the
DDPM step.
"""
from __future__ import annotations

import math

from .common import SamplerRun, check_choice, check_nonnegative
from .exponential import first_order_data_step, make_noise, taylor_derivatives


def _run(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, threshold_percentile,
         threshold_max):
    return SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind, final_step=final_step,
                      threshold_percentile=threshold_percentile, threshold_max=threshold_max)


def _ancestral_step(x, denoised, run, i, sigma_noise, noise, s_noise=1.0):
    """x_t = alpha_t D + sqrt(sigma_t^2 - sigma_noise^2) eps_s + s_noise sigma_noise z (DDIM Eq. 12, host
    coordinates).

    ``sigma_noise`` is capped at sigma_t; sigma_noise = sigma_t re-noises the prediction, x_t = alpha_t D + sigma_t z.
    """
    t = run.table
    sigma_t, alpha_t = t.sigma[i + 1], t.alpha[i + 1]
    sigma_noise = min(sigma_noise, sigma_t)
    if sigma_noise == 0:
        return first_order_data_step(x, denoised, t.sigma[i], sigma_t, alpha_t, t.h[i])
    sigma_down = math.sqrt(max(sigma_t ** 2 - sigma_noise ** 2, 0.0))
    h_down = math.log(alpha_t / sigma_down) - t.lam[i] if sigma_down > 0 else math.inf
    x = first_order_data_step(x, denoised, t.sigma[i], sigma_down, alpha_t, h_down)
    if s_noise == 0:
        return x
    return x + noise(t.sigma[i], sigma_t) * (sigma_noise * s_noise)


def _noise_sampler(run, x, noise_sampler, seed):
    if noise_sampler is not None:
        return noise_sampler
    return make_noise(x, run.table.sigmas, run.extra_args, noise_type="gaussian", seed=seed)


def _sample_ancestral(run, x, eta, s_noise, noise_sampler, seed):
    """The DDIM/DDPM loop: one model call per step, posterior noise scaled by eta."""
    t = run.table
    x = run.start(x)
    noise = _noise_sampler(run, x, noise_sampler, seed) if eta > 0 and s_noise > 0 else None
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        # sigma_eta = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1}) (DDIM Eq. 16) is, in any
        # schedule's coordinates, eta * sigma_t * sqrt(1 - e^{-2h}).
        sigma_eta = eta * t.sigma[i + 1] * math.sqrt(-math.expm1(-2 * t.h[i])) if eta > 0 else 0.0
        x = _ancestral_step(x, denoised, run, i, sigma_eta, noise, s_noise)
    return run.finish(x)


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps", eta=0.0,
                s_noise=1.0, noise_sampler=None, seed=None, final_step="denoise", threshold_percentile=None,
                threshold_max=1.0):
    """DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models", Eq. 12) on the host's sigmas.

    x_t = alpha_t D + sqrt(sigma_t^2 - sigma_eta^2) eps + sigma_eta z with eps = (x_s - alpha_s D) / sigma_s.
    eta = 0 is the deterministic DDIM, identical to DPM-Solver-1 / DPM-Solver++1 (and to k-diffusion's Euler for
    eps models); eta = 1 is the DDPM posterior step (``sample_ddpm``).  One model call per step.

    Options:
      model_kind: "eps" (x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).
      eta: >= 0, the DDIM noise scale; sigma_eta = eta sigma_t sqrt(1 - e^{-2h}) (DDIM Eq. 16).  Above 1 the noise
        is capped at sigma_t (the step then re-noises the prediction, as multistep consistency sampling does).
      s_noise: >= 0, scales only the added noise z (the k-diffusion convention), not sigma_eta's deterministic part.
      noise_sampler: ``noise(sigma_s, sigma_t)`` returning a standard normal like x; default independent Gaussian
        noise seeded per sample from ``seed`` (else ``extra_args["seed"]``, else random).
      final_step: "denoise" (a trailing 0 in sigmas returns D) or "stop" (return x at the last positive sigma).
      threshold_percentile, threshold_max: Imagen dynamic thresholding of D (pixel-space models; off if None).
    """
    eta = check_nonnegative("eta", eta)
    s_noise = check_nonnegative("s_noise", s_noise)
    run = _run(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, threshold_percentile,
               threshold_max)
    return _sample_ancestral(run, x, eta, s_noise, noise_sampler, seed)


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps", s_noise=1.0,
                noise_sampler=None, seed=None, final_step="denoise", threshold_percentile=None, threshold_max=1.0):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on the host's sigmas.

    Each step draws x_t from the posterior q(x_t | x_s, x0 = D(x_s)) of the forward process: mean
    (alpha_t / alpha_s) e^{-2h} x_s + alpha_t (1 - e^{-2h}) D, standard deviation sigma_t sqrt(1 - e^{-2h})
    (the "fixed small" variance beta-tilde).  This is DDIM with eta = 1.  The step into a trailing sigma = 0 adds no
    noise and returns D.  Options as in ``sample_ddim``.
    """
    s_noise = check_nonnegative("s_noise", s_noise)
    run = _run(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, threshold_percentile,
               threshold_max)
    return _sample_ancestral(run, x, 1.0, s_noise, noise_sampler, seed)


def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                       noise_sampler=None, seed=None, final_step="denoise"):
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

    At each sigma the model's prediction D is taken as the sample and re-noised to the next sigma with fresh
    noise: x = alpha_t D + sigma_t z (x = D + sigma_t z for eps models, (1 - sigma_t) D + sigma_t z for flow).  With
    a trailing sigma = 0 the last step returns D.  One model call per step.  For consistency-distilled models
    (LCM, CM); on an ordinary diffusion model it does not converge to the ODE solution.

    Options: model_kind, noise_sampler, seed and final_step as in ``sample_ddim``.
    """
    run = _run(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, None, 1.0)
    t = run.table
    x = run.start(x)
    noise = _noise_sampler(run, x, noise_sampler, seed)
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        x = _ancestral_step(x, denoised, run, i, t.sigma[i + 1], noise)
    return run.finish(x)


# ----------------------------------------------------------------------------------------------------------------
# PNDM
# ----------------------------------------------------------------------------------------------------------------

PNDM_METHODS = ("f-pndm", "s-pndm", "plms")
STEP_WEIGHTS = ("variable", "uniform")
# Adams-Bashforth weights for equally spaced steps, newest first (PNDM Eq. 12 for order 4).
_UNIFORM_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class _PseudoStepper:
    """The pieces of a pseudo numerical method in DDIM's variables y = x / alpha, rho = sigma / alpha = e^{-lambda}.

    There the probability-flow ODE is dy/drho = eps(y, rho) (DDIM Eq. 14) and PNDM's transfer part (PNDM Eq. 9, the
    DDIM step with a given eps) is the Euler step y_t = y_s + (rho_t - rho_s) eps.  So the pseudo Runge-Kutta and
    linear multistep methods are the classical ones in rho, with the model's eps as the gradient part.
    """

    def __init__(self, run):
        self.run = run
        self.schedule = run.schedule

    def eps(self, x, denoised, alpha, sigma):
        """The noise prediction for the latent the model saw (rounded to fp16/bf16 for half-precision latents:
        eps = (x - alpha D) / sigma would otherwise turn that rounding into an error of size rounding / sigma)."""
        x = x.to(self.run.input_dtype).to(x.dtype)
        return (x - denoised * alpha) / sigma

    def transfer(self, x, eps, sigma_s, alpha_s, sigma_t):
        """PNDM's phi(x_s, eps, s, t): the DDIM step with noise prediction ``eps``; alpha_s must be > 0."""
        lam_s, lam_t = self.schedule.lambda_(sigma_s), self.schedule.lambda_(sigma_t)
        alpha_t = float(self.schedule.alpha(sigma_t))
        denoised = (x - eps * sigma_s) / alpha_s  # the x0 that ``eps`` implies
        return first_order_data_step(x, denoised, sigma_s, sigma_t, alpha_t, lam_t - lam_s)

    def rho_midpoint(self, i):
        """The sigma halfway between sigmas[i] and sigmas[i+1] in rho (RK4's t + delta/2)."""
        t = self.run.table
        rho_mid = 0.5 * (math.exp(-t.lam[i]) + math.exp(-t.lam[i + 1]))
        return self.schedule.sigma_from_lambda(-math.log(rho_mid))

    def eps_at(self, x, i, sigma):
        denoised = self.run.denoise(x, i, sigma=sigma)
        return self.eps(x, denoised, float(self.schedule.alpha(sigma)), sigma)


def _multistep_eps(history, rho_s, rho_t, step_weights):
    """The Adams-Bashforth combination e' of the stored eps values (newest first, at their rho values).

    "uniform": PNDM's fixed weights (order 4: (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24), exact for equally spaced
    steps.  "variable": the mean over [rho_s, rho_t] of the polynomial through the stored points,
    sum_m e^{(m)}(rho_s) (rho_t - rho_s)^m / (m + 1)!, which is the same on an equally spaced grid and keeps the
    order on any grid.
    """
    rhos, values = [r for r, _ in history], [e for _, e in history]
    if step_weights == "uniform":
        out = None
        for w, e in zip(_UNIFORM_WEIGHTS[len(values)], values):
            out = e * w if out is None else out + e * w
        return out
    delta = rho_t - rho_s
    out = None
    for m, d in enumerate(taylor_derivatives(rhos, values)):
        term = d * (delta ** m / math.factorial(m + 1))
        out = term if out is None else out + term
    return out


def sample_pndm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                method="f-pndm", step_weights="variable", final_step="denoise", threshold_percentile=None,
                threshold_max=1.0):
    """PNDM, pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

    The gradient part is the model's noise prediction eps = (x - alpha D) / sigma, combined by a classical method;
    the transfer part moves x with that combined eps by a DDIM step (PNDM Eq. 9).

    Options:
      method:
        "f-pndm": three pseudo Runge-Kutta (RK4) warm-up steps, eps' = (e1 + 2 e2 + 2 e3 + e4) / 6 with e2, e3 at
          the midpoint and e4 at the step's end (PNDM Eq. 13; 4 model calls each), then the 4th-order pseudo linear
          multistep (PLMS, PNDM Eq. 12) with one call per step.  NFE = steps + 9 (12 calls for the first 3 steps).
        "s-pndm": one pseudo improved-Euler warm-up step, eps' = (e(x_s, s) + e(x~_t, t)) / 2 with x~_t the DDIM
          step (2 calls), then the 2nd-order PLMS (3 e_0 - e_1) / 2.  NFE = steps + 1.
        "plms": the improved-Euler first step, then PLMS of orders 2, 3 and 4: the PLMS of latent diffusion, the
          WebUI, and diffusers' ``PNDMScheduler(skip_prk_steps=True)``.  NFE = steps + 1.
      step_weights: "variable" (default) uses Adams-Bashforth weights for the actual steps in rho = sigma / alpha
        and puts the RK4 midpoint halfway in rho, so the orders above (4 / 2 / 4) hold on any schedule (Karras,
        exponential, ...); on a grid equally spaced in rho they are PNDM's weights.  "uniform" uses the paper's
        fixed weights, which assume equally spaced steps (the paper's timesteps): it reproduces diffusers and the
        WebUI when the sigmas come from their equally spaced timesteps, and is second order on other grids.
      model_kind, final_step, threshold_percentile, threshold_max: as in ``sample_ddim``.

    A step into sigma = 0 cannot evaluate eps at its end, so during a warm-up it is a DDIM step (returns D); in the
    multistep phase it is the usual PLMS step.  A flow model's step out of sigma = 1 (alpha = 0, eps = x) is a
    DDIM step and its eps is not used by later steps.
    """
    check_choice("method", method, PNDM_METHODS)
    check_choice("step_weights", step_weights, STEP_WEIGHTS)
    run = _run(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, threshold_percentile,
               threshold_max)
    t = run.table
    stepper = _PseudoStepper(run)
    warmup_steps = 3 if method == "f-pndm" else 1
    max_order = 2 if method == "s-pndm" else 4
    x = run.start(x)
    history = []  # (rho, eps) at the starts of earlier steps, newest first
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        sigma_s, alpha_s, sigma_t = t.sigma[i], t.alpha[i], t.sigma[i + 1]
        if alpha_s == 0:  # flow at sigma = 1: eps = x, lambda = -inf
            x = first_order_data_step(x, denoised, sigma_s, sigma_t, t.alpha[i + 1], t.h[i])
            continue
        rho_s, rho_t = math.exp(-t.lam[i]), (math.exp(-t.lam[i + 1]) if sigma_t > 0 else 0.0)
        e1 = stepper.eps(x, denoised, alpha_s, sigma_s)
        warming_up = len(history) < warmup_steps
        if warming_up and sigma_t == 0:
            x = first_order_data_step(x, denoised, sigma_s, sigma_t, t.alpha[i + 1], t.h[i])
            continue
        if warming_up and method == "f-pndm":
            sigma_mid = stepper.rho_midpoint(i)
            e2 = stepper.eps_at(stepper.transfer(x, e1, sigma_s, alpha_s, sigma_mid), i, sigma_mid)
            e3 = stepper.eps_at(stepper.transfer(x, e2, sigma_s, alpha_s, sigma_mid), i, sigma_mid)
            e4 = stepper.eps_at(stepper.transfer(x, e3, sigma_s, alpha_s, sigma_t), i, sigma_t)
            combined = (e1 + (e2 + e3) * 2 + e4) / 6
        elif warming_up:
            e2 = stepper.eps_at(stepper.transfer(x, e1, sigma_s, alpha_s, sigma_t), i, sigma_t)
            combined = (e1 + e2) / 2
        history = [(rho_s, e1)] + history[:max_order - 1]
        if not warming_up:
            combined = _multistep_eps(history, rho_s, rho_t, step_weights)
        x = stepper.transfer(x, combined, sigma_s, alpha_s, sigma_t)
    return run.finish(x)


__all__ = ["sample_ddim", "sample_ddpm", "sample_pndm", "sample_consistency"]
