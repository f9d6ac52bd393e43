"""SDE solvers of DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095, Sec. 5): SDE-DPM-Solver-1 and -2M (noise
prediction), SDE-DPM-Solver++1, ++(2M) and a third-order-drift ++(3M).

All of them discretise one family of reverse diffusion SDEs with the same marginals as the probability-flow ODE,
written in lambda = log(alpha_t / sigma_t) for y = x / alpha_t (VE coordinates, sigma_y = e^{-lambda}):

    dy = (1 + eta) (D - y) dlambda + sqrt(2 eta) e^{-lambda} dw_lambda,

``eta`` is the amount of noise (Karras et al.'s churn beta): eta = 1 is the paper's diffusion SDE (Eq. 10), eta = 0
the ODE.  With kappa = 1 + eta the variation-of-constants solution over a step s -> t, h = lambda_t - lambda_s,
(Prop. 5.1 for eta = 1) is, in data prediction (the "++" solvers)

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t sum_k kappa^{-k} psi_{k+1}(kappa h) D^{(k)}(lambda_s)
          + sigma_t sqrt(1 - e^{-2 eta h}) z,

and in noise prediction (eps = (x - alpha D) / sigma)

    x_t = (alpha_t / alpha_s) x_s - sigma_t kappa sum_k phi_{k+1}(h) eps^{(k)}(lambda_s)
          + sigma_t sqrt(eta (e^{2h} - 1)) z,

with psi_k, phi_k from exponential.py.  At eta = 1 the first-order terms are the paper's SDE-DPM-Solver++1
(alpha_t (1 - e^{-2h}) D) and SDE-DPM-Solver-1 (-2 sigma_t (e^h - 1) eps); the ++ form is ComfyUI's flow-aware
k-diffusion sampler, the noise-prediction form is diffusers' ``sde-dpmsolver``.  At eta = 0 both reduce to the ODE
solvers (DPM-Solver++ and DPM-Solver).  z is a standard normal from the noise source: by default a per-sample
Brownian tree (``exponential.BrownianNoise``) queried on [sigma_t, sigma_s], so refining the steps refines one fixed
Brownian path and the solvers converge strongly (order 1: the noise enters additively).

A step into sigma = 0 returns D (first order, no noise, as k-diffusion).  A flow model's step out of sigma = 1
(lambda = -inf) is the data-prediction first-order step, x_t = alpha_t D + sigma_t z for eta > 0: the
noise-prediction coefficients are infinite there.  The multistep solvers keep the output at sigma = 1 in their
history and interpolate D in rho = -log sigma (``exponential.rho_weights``), so the next step keeps its order; for
the noise-prediction 2M that step is the data-prediction one (``exponential.noise_prediction_step`` says why).
"""
from __future__ import annotations

import math

from .common import SamplerRun, check_choice, check_nonnegative
from .dpmpp import OFFICIAL_3M_SCALES, SOLVER_TYPES_3M
from .exponential import (NOISE_TYPES, batch_seeds, data_prediction_noise_scale, data_prediction_step,
                          guarded_step, make_noise, midpoint_2m_step, noise_prediction_noise_scale,
                          noise_prediction_step)

SOLVER_TYPES_2M_SDE = ("midpoint", "heun")
NOISE_DEVICES = ("latent", "cpu")


# ----------------------------------------------------------------------------------------------------------------
# Options and noise
# ----------------------------------------------------------------------------------------------------------------

def _check_sde_options(eta, s_noise, noise_type, noise_sampler, seed, noise_device):
    eta = check_nonnegative("eta", eta)
    s_noise = check_nonnegative("s_noise", s_noise)
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_choice("noise_device", noise_device, NOISE_DEVICES)
    if noise_sampler is not None and not callable(noise_sampler):
        raise ValueError(f"noise_sampler must be a callable noise_sampler(sigma, sigma_next), got {noise_sampler!r}")
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    if seed is not None and any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seed must be an int or a list of ints (one per sample), got {seed!r}")
    return eta, s_noise


class _Noise:
    """z for step i: the host's ``noise_sampler(sigmas[i], sigmas[i + 1])`` (called with the sigma tensors, as
    k-diffusion does) or our own source, built on first use (a run with eta = 0 never builds one)."""

    def __init__(self, run, x, noise_sampler, noise_type, seed, noise_device, needed):
        self.run, self.x, self.sampler = run, x, noise_sampler
        self.noise_type, self.cpu = noise_type, noise_device == "cpu"
        # Seeds are resolved (and a seed list checked against the batch) before the first model call.
        self.seed = batch_seeds(run.extra_args, x.shape[0], seed) if needed and noise_sampler is None else None
        self.own = None

    def __call__(self, i):
        run = self.run
        if self.sampler is not None:
            return self.sampler(run.sigmas[i], run.sigmas[i + 1]).to(self.x.dtype)
        if self.own is None:
            self.own = make_noise(self.x, run.table.sigmas, run.extra_args, self.noise_type, self.seed, cpu=self.cpu)
        return self.own(run.table.sigmas[i], run.table.sigmas[i + 1]).to(self.x.dtype)


def _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step, eta, s_noise, noise_type,
           noise_sampler, seed, noise_device):
    eta, s_noise = _check_sde_options(eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind, final_step=final_step)
    x = run.start(x)
    noise = _Noise(run, x, noise_sampler, noise_type, seed, noise_device, needed=eta > 0 and s_noise > 0)
    return run, x, eta, s_noise, noise


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------

def _data_sde_step(x, run, i, derivatives, eta, s_noise, noise, midpoint=None, history=None, drift=None):
    """``data_prediction_step`` (or a given ``drift``) plus sigma_t sqrt(1 - e^{-2 eta h}) s_noise z; a step into 0
    returns D."""
    out = drift if drift is not None else data_prediction_step(
        x, run.table, i, None if history else derivatives, eta=eta, midpoint=midpoint, history=history)
    if eta > 0 and s_noise > 0 and run.table.sigma[i + 1] > 0:
        out.add_(noise(i), alpha=data_prediction_noise_scale(run.table, i, eta) * s_noise)
    return out


def _noise_sde_step(x, run, i, derivatives, eta, s_noise, noise, midpoint=None):
    """``noise_prediction_step`` (drift) plus sigma_t sqrt(eta (e^{2h} - 1)) s_noise z; finite h only."""
    out = noise_prediction_step(x, run.table, i, derivatives, eta=eta, midpoint=midpoint)
    if eta > 0 and s_noise > 0:
        out.add_(noise(i), alpha=noise_prediction_noise_scale(run.table, i, eta) * s_noise)
    return out


def _noise_prediction(x, run, i, denoised):
    """eps = (x - alpha_s D) / sigma_s at sigmas[i]."""
    t = run.table
    return (x - denoised * t.alpha[i]) / t.sigma[i]


_OPTIONS_DOC = """
    Common options of the SDE solvers:
      model_kind: "eps" (VP/VE, x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).
      eta: noise amount, >= 0.  1 is the paper's reverse diffusion SDE, 0 the probability-flow ODE (the solver then
        equals its ODE counterpart), values between interpolate (Karras et al.'s churn).
      s_noise: factor on the injected noise (k-diffusion's s_noise; 1 is the SDE).
      noise_type: "brownian" (default; a Brownian tree per sample: the noise of an interval is fixed, so more steps
        converge to one path and results change smoothly with the step count) or "gaussian" (fresh normal draws per
        step, like the ancestral samplers).
      noise_sampler: a callable ``noise_sampler(sigma, sigma_next)`` returning standard normal noise like x; when
        given (the WebUI injects its seeded one under this name) it replaces noise_type/seed/noise_device.
      seed: int s (sample j gets s + j) or one int per sample; None uses extra_args["seed"] (ComfyUI), else random.
        Every sample draws from its own seed, so an image does not change with the batch size.
      noise_device: "latent" (default: noise made on the latent's device) or "cpu" (trees/generators on the CPU,
        ComfyUI's non-"_gpu" behaviour; CPU and GPU noise differ).
      final_step: "denoise" (a trailing 0 in sigmas returns D) or "stop" (return x at the last positive sigma).
"""


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

# The guard of the noise-prediction solvers.  The noise form's step is exact for a constant eps, the data form's for
# a constant D.  Their test problem is the point mass D = 0, where y = x / sigma is exactly N(0, 1) at every sigma and
# the data form is exact.  From such a y the noise form's first-order step gives y_t = (1 - eta (e^h - 1)) y_s
# + sqrt(eta (e^{2h} - 1)) z, of variance 1 + eta (1 + eta) (e^h - 1)^2: too much noise for every h > 0 when
# eta > 0, none at eta = 0 (the ODE keeps y).  Excess noise at high noise levels sends guided samples off the data,
# and the 2M's eps-difference term extrapolates the injected noise (from h = 0.51 at eta = 1, equal steps, its
# recurrence on D = 0 is unstable: |y| grows 3x a step at h = 1).  So a step whose excess is above
# NOISE_FORM_MAX_EXCESS is taken in the data form.  0.25 (eta = 1: h > 0.30) was chosen on the strong error of 3
# random guided mixtures (0.5 kept the 2M's error at 1.3-1.7x the data form's at 20 steps) and checked on the
# range of 4 others (0.5: up to 29.7x the exact range, 0.25: 17.5x, the data form's); bench/results_flow_guidance.md.
NOISE_FORM_MAX_EXCESS = 0.25


def noise_form_excess(h, eta):
    """Variance of y = x / sigma after the noise form's first-order step on D = 0 from an exact y, minus 1."""
    return eta * (1.0 + eta) * math.expm1(h) ** 2


def sample_dpmpp_sde_1(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                       eta=1.0, s_noise=1.0, noise_type="brownian", noise_sampler=None, seed=None,
                       noise_device="latent", final_step="denoise"):
    """SDE-DPM-Solver++1 (Sec. 5): x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D_s
    + sigma_t sqrt(1 - e^{-2h}) z at eta = 1; stochastic DDIM with its noise level (Sec. 6.1), DDIM at eta = 0.
    """
    run, x, eta, s_noise, noise = _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step,
                                         eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise)
    return run.finish(x)


def sample_dpm_solver_sde_1(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                            eta=1.0, s_noise=1.0, noise_type="brownian", noise_sampler=None, seed=None,
                            noise_device="latent", final_step="denoise", guard=True):
    """SDE-DPM-Solver-1 (Sec. 5), noise prediction: x_t = (alpha_t/alpha_s) x_s - 2 sigma_t (e^h - 1) eps_s
    + sigma_t sqrt(e^{2h} - 1) z at eta = 1 (DDPM's ancestral step in lambda); DDIM at eta = 0.
    guard: as in ``sample_dpm_solver_sde_2m``, a step whose noise form leaves too much noise (``noise_form_excess``
    above NOISE_FORM_MAX_EXCESS: h > 0.30 at eta = 1; never at eta = 0) is the data form's (``sample_dpmpp_sde_1``);
    guard=False is the paper's step everywhere (diffusers' scheduler).
    """
    run, x, eta, s_noise, noise = _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step,
                                         eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if run.table.finite_step(i) and not (guard and noise_form_excess(run.table.h[i], eta) > NOISE_FORM_MAX_EXCESS):
            x = _noise_sde_step(x, run, i, [_noise_prediction(x, run, i, denoised)], eta, s_noise, noise)
        else:
            x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise)
    return run.finish(x)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                        eta=1.0, s_noise=1.0, noise_type="brownian", noise_sampler=None, seed=None,
                        noise_device="latent", final_step="denoise", lower_order_final=None,
                        solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) (Sec. 5), the multistep second-order data-prediction SDE solver.

    D' at lambda_s is (D_s - D_prev) / h_prev.  solver_type "midpoint" puts weight alpha_t psi_1(kappa h) / 2 on
    h D' (the paper's formula; k-diffusion's default), "heun" the exact Taylor weight alpha_t psi_2(kappa h) / kappa
    on D'.  Both equal k-diffusion's ``sample_dpmpp_2m_sde`` for eps models (tests/test_sde.py) and ComfyUI's
    flow-aware one.  At eta = 0, "midpoint" is ``sample_dpmpp_2m`` and "heun" is ``sample_dpmpp_2m(solver_type=
    "taylor")``.  lower_order_final: first-order last step, None = on below 15 steps.
    """
    check_choice("solver_type", solver_type, SOLVER_TYPES_2M_SDE)
    run, x, eta, s_noise, noise = _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step,
                                         eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    lower_order_final = run.default_lower_order_final(lower_order_final)
    t = run.table
    previous = None  # (lambda, D) of the last point; lambda = -inf at a flow model's sigma = 1
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if run.order(i, 2, lower_order_final, 1 if previous is None else 2) == 1:
            x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise)
        elif not math.isfinite(previous[0]):  # history at sigma = 1: interpolated in rho (exponential.py)
            history = ([t.lam[i], previous[0]], [denoised, previous[1]])
            x = _data_sde_step(x, run, i, None, eta, s_noise, noise, history=history)
        else:
            h_prev = t.lam[i] - previous[0]
            if solver_type == "midpoint":
                midpoint = (denoised - previous[1], t.h[i] / h_prev)
                x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise, midpoint=midpoint)
            else:
                derivative = (denoised - previous[1]) / h_prev
                x = _data_sde_step(x, run, i, [denoised, derivative], eta, s_noise, noise)
        previous = (t.lam[i], denoised)
    return run.finish(x)


def sample_dpm_solver_sde_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                             eta=1.0, s_noise=1.0, noise_type="brownian", noise_sampler=None, seed=None,
                             noise_device="latent", final_step="denoise", lower_order_final=None,
                             solver_type="midpoint", guard=True):
    """SDE-DPM-Solver-2M (Sec. 5), the multistep second-order noise-prediction SDE solver.

    eps' at lambda_s is (eps_s - eps_prev) / h_prev.  solver_type "midpoint" puts weight sigma_t kappa phi_1(h) / 2
    on h eps' (the paper's formula), "heun" the Taylor weight sigma_t kappa phi_2(h) on eps'; both as diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")``.  At eta = 0 it is DPM-Solver's multistep
    second-order ODE solver.  lower_order_final: first-order last step, None = on below 15 steps.
    guard: a step whose noise form leaves too much noise (``noise_form_excess`` above NOISE_FORM_MAX_EXCESS: at
    eta = 1, h > 0.30; never at eta = 0) is taken in the data form, the step of ``sample_dpmpp_2m_sde``
    with the same solver_type from the same outputs; guard=False is the paper's step everywhere (diffusers'
    scheduler).
    """
    check_choice("solver_type", solver_type, SOLVER_TYPES_2M_SDE)
    run, x, eta, s_noise, noise = _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step,
                                         eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    lower_order_final = run.default_lower_order_final(lower_order_final)
    t = run.table
    previous = None  # (lambda, eps, D) of the last point; lambda = -inf at a flow model's sigma = 1
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        if not t.finite_step(i):
            x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise)
            previous = (t.lam[i], None, denoised)
            continue
        eps = _noise_prediction(x, run, i, denoised)
        data_form = guard and noise_form_excess(t.h[i], eta) > NOISE_FORM_MAX_EXCESS  # the guard (above)
        if run.order(i, 2, lower_order_final, 1 if previous is None else 2) == 1:
            if data_form:
                x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise)
            else:
                x = _noise_sde_step(x, run, i, [eps], eta, s_noise, noise)
        elif not math.isfinite(previous[0]):  # history at sigma = 1: the data form, D interpolated in rho
            history = ([t.lam[i], previous[0]], [denoised, previous[2]])
            x = _data_sde_step(x, run, i, None, eta, s_noise, noise, history=history)
        else:
            h_prev = t.lam[i] - previous[0]
            # the same 2M step on D (sample_dpmpp_2m_sde's) or on eps
            value, difference = (denoised, denoised - previous[2]) if data_form else (eps, eps - previous[1])
            step = _data_sde_step if data_form else _noise_sde_step
            if solver_type == "midpoint":
                x = step(x, run, i, [value], eta, s_noise, noise, midpoint=(difference, t.h[i] / h_prev))
            else:
                x = step(x, run, i, [value, difference / h_prev], eta, s_noise, noise)
        previous = (t.lam[i], eps, denoised)
    return run.finish(x)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps",
                        eta=1.0, s_noise=1.0, noise_type="brownian", noise_sampler=None, seed=None,
                        noise_device="latent", final_step="denoise", lower_order_final=None, solver_type="official",
                        guard=True):
    """SDE-DPM-Solver++(3M): third order in the drift, D, D', D'' from the quadratic through the last three outputs.

    solver_type: "official" (default) is k-diffusion's ``sample_dpmpp_3m_sde`` step (ComfyUI's dpmpp_3m_sde), whose
    d2 = h^2 f[l0, l1, l2] = h^2 D''/2 takes the weight psi_3(kappa h) / (kappa h)^2, i.e. half the Taylor D'' term
    (as the official ODE 3M, ``dpmpp.sample_dpmpp_3m``); "taylor" gives D'' its Taylor weight
    alpha_t psi_3(kappa h) / kappa^2.  "official" measured at most the Taylor form's error at 8-40 steps, eta = 1
    (bench/results_flow_guidance.md).  Their second-order steps (final, guarded; the Taylor form's warm-up too) are
    the paper's 2M SDE step (midpoint, ``sample_dpmpp_2m_sde``'s default); the official form's warm-up step keeps
    k-diffusion's Taylor weight psi_2(kappa h) / kappa on D', so with guard=False and lower_order_final=False it is
    k-diffusion's sampler.  At eta = 0 "taylor" is ``sample_dpmpp_3m(solver_type="taylor")``; "official" differs from
    the ODE's official form only in that warm-up step (diffusers' scheduler, which the ODE form follows, uses the 2M
    midpoint there).
    guard: as in ``sample_dpmpp_3m`` (a third-order drift only where its D'' term is small next to the D' term).
    Warm-up runs orders 1, 2, 3; lower_order_final (None = on below 15 steps) makes the last steps 2, 1.
    """
    check_choice("solver_type", solver_type, SOLVER_TYPES_3M)
    scales = OFFICIAL_3M_SCALES if solver_type == "official" else None
    run, x, eta, s_noise, noise = _setup(model, x, sigmas, extra_args, callback, disable, model_kind, final_step,
                                         eta, s_noise, noise_type, noise_sampler, seed, noise_device)
    lower_order_final = run.default_lower_order_final(lower_order_final)
    t = run.table
    def second_order(x, i, lams, outputs):
        """The drift of a second-order step: the paper's 2M (midpoint, ``sample_dpmpp_2m_sde``'s default), except the
        official form's warm-up step, which keeps k-diffusion's Taylor weight (so with guard=False and
        lower_order_final=False the official form is k-diffusion's sampler)."""
        if len(lams) == 2 and solver_type == "official":  # warm-up
            return data_prediction_step(x, t, i, history=(lams[:2], outputs[:2]), eta=eta)
        return midpoint_2m_step(x, t, i, lams, outputs, eta)

    # newest first, four outputs (the fourth feeds the guard only); lambda = -inf at a flow model's sigma = 1
    lams, outputs = [], []
    for i in run.range():
        denoised = run.denoise(x, i)
        run.report(x, i, denoised)
        lams, outputs = [t.lam[i]] + lams[:3], [denoised] + outputs[:3]
        order = run.order(i, 3, lower_order_final, len(lams))
        if order < 3:
            drift = second_order(x, i, lams, outputs) if order == 2 and t.sigma[i + 1] > 0 else None
            x = _data_sde_step(x, run, i, [denoised], eta, s_noise, noise, drift=drift)
            continue
        drift = guarded_step(x, t, i, (lams, outputs), eta=eta, scales=scales, guard=guard)
        x = _data_sde_step(x, run, i, None, eta, s_noise, noise, drift=drift)
    return run.finish(x)


for _sampler in (sample_dpmpp_sde_1, sample_dpm_solver_sde_1, sample_dpmpp_2m_sde, sample_dpm_solver_sde_2m,
                 sample_dpmpp_3m_sde):
    _sampler.__doc__ += _OPTIONS_DOC
del _sampler

__all__ = ["sample_dpmpp_sde_1", "sample_dpm_solver_sde_1", "sample_dpmpp_2m_sde", "sample_dpm_solver_sde_2m",
           "sample_dpmpp_3m_sde"]
