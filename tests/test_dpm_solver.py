"""DPM-Solver (noise prediction): singlestep / multistep orders 1-3 and the adaptive DPM-Solver-12/23.

References: the exact Gaussian-mixture ODE (analytic.reference_solution, DOP853 at 1e-12) for measured convergence
orders and tolerances, and PyPI k-diffusion's ``sample_dpm_fast`` / ``sample_dpm_adaptive`` on identical inputs.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

from dpm_solver_nodes.analytic import GaussianMixture, GuidedGaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.samplers.dpm_solver import (StepBudgetError, fast_schedule, sample_dpm_solver,
                                                  sample_dpm_solver_adaptive)
from kdiffusion_reference import load

MIXTURE = GaussianMixture.random(dim=8, components=5, seed=0)
MIXTURES = {
    "plain": MIXTURE,
    "cfg1": GuidedGaussianMixture(MIXTURE, [0, 1], scale=1.0),
    "cfg7.5": GuidedGaussianMixture(MIXTURE, [0, 1], scale=7.5),
}
LAMBDA_START, LAMBDA_END = -3.0, 3.0  # sigma 20.1 -> 0.050 (eps), 0.953 -> 0.047 (flow)
_references = {}


def sigmas_uniform_in_lambda(model_kind, steps, warm_up=False, start=LAMBDA_START, end=LAMBDA_END):
    """steps + 1 sigmas uniform in lambda (logSNR); ``warm_up`` adds the points start + h * (1/16, 1/8, 1/4, 1/2)."""
    lam = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    if warm_up:
        h = (end - start) / steps
        extra = start + h * torch.tensor([1 / 16, 1 / 8, 1 / 4, 1 / 2], dtype=torch.float64)
        lam = torch.cat([lam[:1], extra, lam[1:]])
    return torch.exp(-lam) if model_kind == "eps" else torch.sigmoid(-lam)


def start_latent(model_kind, sigma_start, batch=16, seed=3):
    noise = sample_noise(batch, (8,), seed=seed)
    return noise * sigma_start  # eps: x0 + sigma n ~ sigma n; flow: a point at sigma near the noise end


def reference(mixture_name, model_kind):
    key = (mixture_name, model_kind)
    if key not in _references:
        model = MIXTURES[mixture_name].denoiser(model_kind)
        sigmas = sigmas_uniform_in_lambda(model_kind, 1)
        x = start_latent(model_kind, float(sigmas[0]))
        _references[key] = x, reference_solution(model, x, float(sigmas[0]), float(sigmas[-1]), model_kind=model_kind)
    return _references[key]


def slope(steps, errors):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("mixture_name", ["plain", "cfg1", "cfg7.5"])
@pytest.mark.parametrize("model_kind", ["eps", "flow"])
@pytest.mark.parametrize("method", ["singlestep", "multistep"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order(mixture_name, model_kind, method, order):
    """Least-squares slope of the median per-sample error vs step count is the order within 0.3.

    Measured (slope over 16/32/64 steps, 48/96/192 for the stiffer CFG 7.5; eps and flow agree to 0.01):
      plain   s1 0.99  s2 2.07  s3 3.25  m1 1.00  m2 1.91  m3 2.85
      cfg1    s1 0.99  s2 2.06  s3 3.27  m1 0.99  m2 1.94  m3 3.16
      cfg7.5  s1 1.00  s2 2.08  s3 3.06  m1 1.00  m2 1.99  m3 3.17  (32/64/128 steps: m3 3.30, pre-asymptotic)
    Multistep runs get four extra warm-up points at start + h/16, h/8, h/4, h/2: the order-1 and order-2 warm-up
    steps of a multistep method make O(h^2), O(h^3) starting errors, which a third-order method's order needs to be
    measured without (standard multistep analysis).  On the plain logSNR grid the multistep third order measures
    2.0 / 2.6 / 2.5 / 2.6 between 8/16/32/64/128 steps on the plain mixture: the warm-up error (k-diffusion's and the
    official code's multistep start the same way).
    """
    model = MIXTURES[mixture_name].denoiser(model_kind)
    x, ref = reference(mixture_name, model_kind)
    steps = [48, 96, 192] if mixture_name == "cfg7.5" else [16, 32, 64]
    errors = []
    for n in steps:
        sigmas = sigmas_uniform_in_lambda(model_kind, n, warm_up=method == "multistep")
        out = sample_dpm_solver(model, x, sigmas, model_kind=model_kind, method=method, order=order,
                                lower_order_final=False, final_step="stop", disable=True)
        errors.append((out - ref).norm(dim=1).median().item())
    measured = slope(steps, errors)
    assert abs(measured - order) <= 0.3, (measured, errors)


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_flow_run_is_the_rescaled_eps_run(method, order):
    """Integrating in lambda makes the flow run alpha_t times the eps run on the VE-rescaled problem (x / alpha)."""
    lam = torch.linspace(-3, 3, 13, dtype=torch.float64)
    sigmas_eps, sigmas_flow = torch.exp(-lam), torch.sigmoid(-lam)
    x_eps = start_latent("eps", float(sigmas_eps[0])) + MIXTURE.mean()
    x_flow = x_eps * (1 - sigmas_flow[0])
    kwargs = dict(method=method, order=order, lower_order_final=False, final_step="stop", disable=True)
    out_eps = sample_dpm_solver(MIXTURE.denoiser("eps"), x_eps, sigmas_eps, **kwargs)
    out_flow = sample_dpm_solver(MIXTURE.denoiser("flow"), x_flow, sigmas_flow, model_kind="flow", **kwargs)
    torch.testing.assert_close(out_flow / (1 - sigmas_flow[-1]), out_eps, rtol=1e-12, atol=1e-12)


def counting(model, log):
    def counted(x, sigma, **kwargs):
        log.append(float(sigma.reshape(-1)[0]))
        return model(x, sigma, **kwargs)

    return counted


@pytest.mark.parametrize("method, order, lower_order_final, expected_calls", [
    ("singlestep", 3, False, 3 * 5 + 1),   # five order-3 steps, then the step into 0 returns D (one call)
    ("singlestep", 3, True, 3 * 4 + 2 + 1),  # the fast mix on the host's steps: 3, 3, 3, 3, 2, then 1 into 0
    ("singlestep", 2, False, 2 * 5 + 1),
    ("multistep", 3, True, 6),
])
def test_model_calls_and_callbacks(method, order, lower_order_final, expected_calls):
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0], dtype=torch.float64)
    calls, reports = [], []
    out = sample_dpm_solver(counting(MIXTURE.denoiser(), calls), start_latent("eps", 14.6, batch=2), sigmas,
                            method=method, order=order, lower_order_final=lower_order_final,
                            callback=reports.append, disable=True)
    assert len(calls) == expected_calls
    assert [r["i"] for r in reports] == list(range(6))
    assert [float(r["sigma"]) for r in reports] == sigmas[:-1].tolist()
    assert min(calls) == pytest.approx(0.1) and max(calls) == pytest.approx(14.6)
    # the step into sigma = 0 returns the denoised prediction at the last positive sigma
    torch.testing.assert_close(out, reports[-1]["denoised"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
def test_flow_from_pure_noise_converges(method):
    """A flow run from sigma = 1 (lambda = -inf) starts with a first-order step, then converges to the ODE solution.

    The DDIM step out of sigma = 1 errs by O(u^2), u = e^lambda at the second sigma, which bounds the order at 2 on
    host schedules whatever the solver's order.  Measured median errors at 10/20/40 steps: singlestep 9.1e-3,
    1.7e-3, 4.6e-4; multistep (a third of the calls) 9.7e-2, 2.5e-2, 5.2e-3.
    """
    model = MIXTURE.denoiser("flow")
    x = start_latent("flow", 1.0)
    ref = reference_solution(model, x, 1.0, 0.05, model_kind="flow")
    errors = []
    for n in (10, 20, 40):
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        sigmas = 3 * t / (1 + 2 * t)  # SD3's shifted flow schedule (shift 3) ...
        sigmas = torch.cat([sigmas[sigmas > 0.05], torch.tensor([0.05], dtype=torch.float64)])  # ... ending at 0.05
        out = sample_dpm_solver(model, x, sigmas, model_kind="flow", order=3, method=method,
                                lower_order_final=False, final_step="stop", disable=True)
        errors.append((out - ref).norm(dim=1).median().item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[-1] < (1e-3 if method == "singlestep" else 1e-2), errors


@pytest.mark.parametrize("nfe, order, expected", [
    (12, 3, [3, 3, 3, 2, 1]), (10, 3, [3, 3, 3, 1]), (11, 3, [3, 3, 3, 2]), (2, 3, [2]),
    (7, 2, [2, 2, 2, 1]), (4, 1, [1, 1, 1, 1]),
])
def test_fast_schedule_orders(nfe, order, expected):
    sigmas, orders = fast_schedule(0.03, 14.6, nfe, order=order)
    assert orders == expected and sum(orders) == nfe
    assert len(sigmas) == len(orders) + 1
    lam = -torch.log(sigmas)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((len(orders),), float(lam[1] - lam[0]),
                                                                 dtype=torch.float64))
    flow_sigmas, _ = fast_schedule(0.03, 0.97, nfe, order=order, model_kind="flow")
    assert flow_sigmas[0] == pytest.approx(0.97) and flow_sigmas[-1] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="pure noise"):
        fast_schedule(0.03, 1.0, nfe, order=order, model_kind="flow")


@contextlib.contextmanager
def float64_defaults():
    """k-diffusion builds its time grids with torch.linspace / torch.tensor in the default dtype (float32)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@pytest.mark.parametrize("nfe", [10, 11, 12, 20])
def test_fast_matches_k_diffusion(nfe):
    """``sample_dpm_fast`` = singlestep with ``fast_schedule``: same time-uniform steps, orders and model calls.

    k-diffusion computes its t grid and the step coefficients in float32 (default dtype), which alone changes the
    result by ~2e-7 relative (measured 1e-7 .. 2.3e-7); with float64 defaults the two agree to ~1e-15.
    """
    k_diffusion = load()
    model = MIXTURE.denoiser()
    x = start_latent("eps", 14.6, batch=6, seed=1)
    sigma_min, sigma_max = torch.tensor(0.03, dtype=torch.float64), torch.tensor(14.6, dtype=torch.float64)
    sigmas, orders = fast_schedule(0.03, 14.6, nfe)
    ours_calls, ours_reports = [], []
    ours = sample_dpm_solver(counting(model, ours_calls), x, sigmas, orders=orders, callback=ours_reports.append,
                             disable=True)
    theirs_calls, theirs_reports = [], []
    with pytest.warns(UserWarning):  # torch.tensor(tensor) inside k-diffusion
        theirs = k_diffusion.sample_dpm_fast(counting(model, theirs_calls), x, sigma_min, sigma_max, nfe,
                                             callback=theirs_reports.append, disable=True)
    assert len(ours_calls) == len(theirs_calls) == nfe
    assert [r["i"] for r in ours_reports] == [r["i"] for r in theirs_reports]
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    with float64_defaults(), pytest.warns(UserWarning):
        theirs64 = k_diffusion.sample_dpm_fast(model, x, sigma_min, sigma_max, nfe, disable=True)
    assert ((ours - theirs64).norm() / theirs64.norm()).item() < 1e-12


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_matches_k_diffusion(order):
    """``sample_dpm_adaptive`` (eta = 0) = ours on [sigma_max, sigma_min]: same attempts, accepts and rejects.

    Deliberate difference, pinned: after a rejection we reuse eps at s (the state has not moved), k-diffusion calls
    the model again, so its reported nfe is ours + n_reject (the samples are identical).  Relative difference
    measured 5e-11 / 1e-10 with k-diffusion's float32 tolerance scalars and ~1e-15 with float64 defaults.
    """
    k_diffusion = load()
    model = MIXTURE.denoiser()
    x = start_latent("eps", 14.6, batch=6, seed=1)
    sigma_min, sigma_max = torch.tensor(0.03, dtype=torch.float64), torch.tensor(14.6, dtype=torch.float64)
    ours_calls = []
    ours, info = sample_dpm_solver_adaptive(counting(model, ours_calls), x, torch.stack([sigma_max, sigma_min]),
                                            order=order, return_info=True, disable=True)
    with pytest.warns(UserWarning):
        theirs, their_info = k_diffusion.sample_dpm_adaptive(model, x, sigma_min, sigma_max, order=order,
                                                             return_info=True, disable=True)
    assert their_info["n_reject"] >= 1  # the comparison exercises a rejected step
    assert (info["steps"], info["n_accept"], info["n_reject"]) == (
        their_info["steps"], their_info["n_accept"], their_info["n_reject"])
    assert info["nfe"] == len(ours_calls) == their_info["nfe"] - their_info["n_reject"]
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    with float64_defaults(), pytest.warns(UserWarning):
        theirs64 = k_diffusion.sample_dpm_adaptive(model, x, sigma_min, sigma_max, order=order, disable=True)
    assert ((ours - theirs64).norm() / theirs64.norm()).item() < 1e-12


@pytest.mark.parametrize("mixture_name, model_kind, sigma_start", [
    ("plain", "eps", 80.0), ("plain", "flow", 1.0), ("plain", "flow", 0.9), ("cfg7.5", "eps", 80.0),
    ("cfg7.5", "flow", 1.0),
])
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_reaches_tolerance(mixture_name, model_kind, sigma_start, order):
    """Max per-sample relative error vs the exact ODE is within 2 x rtol and falls with rtol.

    Measured at rtol 1e-3 (atol 1e-4): 5.5e-5 .. 1.4e-3 (the worst: plain flow from sigma = 1, order 2).  A flow
    run from sigma = 1 enters at 0.99 with a Heun step in e^lambda; a DDIM entry left a 1e-3 floor.
    """
    model = MIXTURES[mixture_name].denoiser(model_kind)
    x = start_latent(model_kind, sigma_start)
    ref = reference_solution(model, x, sigma_start, 0.03, model_kind=model_kind)
    sigmas = torch.tensor([sigma_start, 0.03], dtype=torch.float64)
    errors = []
    for rtol in (1e-2, 1e-3):
        out = sample_dpm_solver_adaptive(model, x, sigmas, model_kind=model_kind, order=order, rtol=rtol,
                                         atol=rtol / 10, disable=True)
        errors.append(((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item())
    assert errors[1] <= 2e-3, errors
    assert errors[1] < errors[0] / 3, errors


def test_adaptive_respects_a_sub_range_and_ignores_the_step_count():
    """img2img: integrate from sigmas[0] to the last positive sigma only; a trailing 0 adds one denoise call."""
    model = MIXTURE.denoiser()
    x = MIXTURE.sample(8, torch.Generator().manual_seed(5)) + 5.0 * sample_noise(8, (8,), seed=6)
    ref = reference_solution(model, x, 5.0, 0.1)
    stop_calls, denoise_calls = [], []
    coarse = sample_dpm_solver_adaptive(model, x, torch.tensor([5.0, 0.1]), rtol=1e-3, atol=1e-4, disable=True)
    stop = sample_dpm_solver_adaptive(counting(model, stop_calls), x, torch.tensor([5.0, 2.0, 0.5, 0.1, 0.0]),
                                      rtol=1e-3, atol=1e-4, final_step="stop", disable=True)
    denoised = sample_dpm_solver_adaptive(counting(model, denoise_calls), x, torch.tensor([5.0, 2.0, 0.5, 0.1, 0.0]),
                                          rtol=1e-3, atol=1e-4, disable=True)
    torch.testing.assert_close(stop, coarse, rtol=1e-6, atol=1e-6)  # float32 sigmas vs float32 sigmas: same range
    assert ((stop - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-3
    assert max(stop_calls) == pytest.approx(5.0, rel=1e-6) and min(stop_calls) > 0.1  # never outside the range
    assert len(denoise_calls) == len(stop_calls) + 1 and denoise_calls[-1] == pytest.approx(0.1, rel=1e-6)
    torch.testing.assert_close(denoised, model(stop, torch.full((8,), 0.1)), rtol=1e-6, atol=1e-6)


def test_adaptive_reports_and_can_be_interrupted():
    class Interrupted(Exception):
        pass

    calls, reports = [], []

    def callback(report):
        reports.append(report)
        if len(reports) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        sample_dpm_solver_adaptive(counting(MIXTURE.denoiser(), calls), start_latent("eps", 14.6),
                                   torch.tensor([14.6, 0.03]), callback=callback, disable=True)
    assert [r["i"] for r in reports] == [0, 1, 2]
    assert reports[-1]["nfe"] == len(calls)  # no model call after the interrupt
    assert {"x", "sigma", "denoised", "error", "h", "n_accept", "n_reject"} <= set(reports[0])


def test_adaptive_stops_at_max_nfe():
    calls = []
    with pytest.raises(StepBudgetError, match="max_nfe = 20"):
        sample_dpm_solver_adaptive(counting(MIXTURE.denoiser(), calls), start_latent("eps", 80.0),
                                   torch.tensor([80.0, 0.03]), rtol=1e-6, atol=1e-7, max_nfe=20, disable=True)
    assert len(calls) == 20
    assert issubclass(StepBudgetError, ValueError)


@pytest.mark.parametrize("options, message", [
    (dict(order=1), "order"), (dict(order=4), "order"), (dict(rtol=-0.1), "rtol"), (dict(atol=math.nan), "atol"),
    (dict(rtol=0, atol=0), "both be 0"), (dict(h_init=0), "h_init"), (dict(accept_safety=1.5), "accept_safety"),
    (dict(icoeff=0), "pcoeff \\+ icoeff"), (dict(pcoeff=math.inf), "pcoeff"), (dict(max_nfe=0), "max_nfe"),
    (dict(max_nfe=3), "max_nfe"), (dict(model_kind="v"), "model_kind"), (dict(final_step="none"), "final_step"),
])
def test_adaptive_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sample_dpm_solver_adaptive(MIXTURE.denoiser(), start_latent("eps", 14.6), torch.tensor([14.6, 0.03]),
                                   disable=True, **options)


@pytest.mark.parametrize("options, message", [
    (dict(order=4), "order"), (dict(method="fast"), "method"), (dict(orders=[3, 3]), "orders"),
    (dict(orders=[3, 3, 4]), "orders"), (dict(method="multistep", orders=[3, 2, 1]), "singlestep"),
])
def test_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sample_dpm_solver(MIXTURE.denoiser(), start_latent("eps", 14.6), torch.tensor([14.6, 3.0, 0.5, 0.03]),
                          disable=True, **options)
