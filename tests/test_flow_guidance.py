"""Issue 15: flow starts at sigma = 1, the step into sigma = 0, and third-order steps that cannot explode.

References: the exact denoisers of random Gaussian mixtures (with classifier-free guidance) and DOP853 solutions of
their probability-flow ODE (analytic/gaussian_mixture.py); PyPI k-diffusion's sample_dpmpp_2m on the same flow
sigmas (what ComfyUI runs on flow models).  Larger measurements: bench/flow_guidance.py,
bench/results_flow_guidance.md.
"""
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import (GaussianMixture, GuidedGaussianMixture, reference_solution,
                                                         sample_noise)
from dpm_solver_nodes.samplers import (sample_ddim, sample_dpm_solver, sample_dpm_solver_sde_1,
                                      sample_dpm_solver_sde_2m, sample_dpm_solver_v3, sample_dpmpp_2m,
                                      sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m, sample_dpmpp_3m_sde)
from dpm_solver_nodes.samplers.exponential import extrapolated_denoised
from dpm_solver_nodes.samplers.sigmas import exponential, flow_logsnr_uniform, karras, shifted, with_zero
from dpm_solver_nodes.samplers.schedule import noise_schedule

import kdiffusion_reference

GUIDANCE = (1.0, 5.0, 7.5)
SEEDS = (0, 1, 2)


def mixture(seed, guidance, dim=16):
    base = GaussianMixture.random(dim=dim, components=8, seed=seed, spread=1.0)
    return GuidedGaussianMixture(base, [0, 1], scale=guidance)


def shift3_sigmas(n):
    """The hosts' default flow schedule: time-uniform t with shift 3, sigma = 3t / (1 + 2t), trailing 0."""
    return shifted(n, 3.0)


def logsnr_flow_sigmas(n):
    """1 -> 0.995, uniform in lambda down to 0.002, then 0 (issue 13's flow schedule)."""
    inner = flow_logsnr_uniform(n - 1, -math.log(0.995 / 0.005), math.log(0.998 / 0.002))
    return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), inner]))


def karras_sigmas(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    return with_zero(karras(n, sigma_min, sigma_max, rho))


def logsnr_eps_sigmas(n, sigma_min=0.002, sigma_max=80.0):
    return with_zero(exponential(n, sigma_min, sigma_max))


SCHEDULES = {"flow": (shift3_sigmas, logsnr_flow_sigmas), "eps": (karras_sigmas, logsnr_eps_sigmas)}


def per_sample_error(out, ref):
    return (out - ref).pow(2).flatten(1).mean(1).median().item()


_REFERENCES = {}


def problem(seed, guidance, model_kind, start):
    """(model, x, exact ODE solution from ``start`` to 0) for one mixture, 32 samples."""
    key = (seed, guidance, model_kind, start)
    if key not in _REFERENCES:
        model = mixture(seed, guidance).denoiser(model_kind)
        x = sample_noise(32, (16,), seed=10 + seed) * start
        _REFERENCES[key] = model, x, reference_solution(model, x, start, 0.0, model_kind, rtol=1e-10, atol=1e-10)
    return _REFERENCES[key]


# ---------------------------------------------------------------------------------------------------------------
# Out of sigma = 1: the history point at sigma = 1 is used (in rho = -log sigma), so the second step keeps its order;
# singlestep methods put their stages in rho
# ---------------------------------------------------------------------------------------------------------------

def _flow_problem(guidance, seed=0):
    model = GuidedGaussianMixture(GaussianMixture.random(dim=8, components=5, seed=seed), [0, 1],
                                  scale=guidance).denoiser("flow")
    return model, sample_noise(32, (8,), seed=1 + seed)


def _slopes(errors):
    return [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]


MULTISTEP = {
    "2m": lambda m, x, s: sample_dpmpp_2m(m, x, s, model_kind="flow", lower_order_final=False, disable=True),
    "3m": lambda m, x, s: sample_dpmpp_3m(m, x, s, model_kind="flow", lower_order_final=False, disable=True),
    "2m-sde-eta0": lambda m, x, s: sample_dpmpp_2m_sde(m, x, s, model_kind="flow", eta=0.0, lower_order_final=False,
                                                       disable=True),
    "3m-sde-eta0": lambda m, x, s: sample_dpmpp_3m_sde(m, x, s, model_kind="flow", eta=0.0, lower_order_final=False,
                                                       disable=True),
    "dpm-solver-multistep-2": lambda m, x, s: sample_dpm_solver(m, x, s, model_kind="flow", order=2,
                                                                method="multistep", lower_order_final=False,
                                                                disable=True),
    "dpm-solver-multistep-3": lambda m, x, s: sample_dpm_solver(m, x, s, model_kind="flow", order=3,
                                                                method="multistep", lower_order_final=False,
                                                                disable=True),
    "dpm-solver-sde-2m-eta0": lambda m, x, s: sample_dpm_solver_sde_2m(m, x, s, model_kind="flow", eta=0.0,
                                                                       lower_order_final=False, disable=True),
    "v3-no-corrector": lambda m, x, s: sample_dpm_solver_v3(m, x, s, model_kind="flow", use_corrector=False,
                                                            fallback=False, lower_order_final=False, disable=True),
}


@pytest.mark.parametrize("name", list(MULTISTEP))
def test_the_step_after_sigma_one_has_third_order_local_error(name):
    """Step 1 of sigmas 1, e^-H, e^-2.5H (a step ratio of 1.5 in rho) against the exact solution from the sampler's
    own x_1, H = 0.02, 0.01, 0.005: with the sigma = 1 output in its history the step's local error is O(H^3),
    measured slopes 2.67-3.16 over 3 mixtures (guidance 1 and 7.5, bench/results_flow_guidance.md); a first-order
    step (the noise-prediction solvers and v3 before this change) measures 2.0-2.75."""
    run = MULTISTEP[name]
    for guidance in (1.0, 7.5):
        model, x = _flow_problem(guidance)
        errors = []
        for step in (0.02, 0.01, 0.005):
            sigmas = torch.tensor([1.0, math.exp(-step), math.exp(-2.5 * step)], dtype=torch.float64)
            x1 = run(model, x, sigmas[:2])
            exact = reference_solution(model, x1, float(sigmas[1]), float(sigmas[2]), "flow")
            errors.append((run(model, x, sigmas) - exact).norm(dim=1).median().item())
        assert min(_slopes(errors)) > 2.5, (guidance, errors, _slopes(errors))


def test_v3_corrector_redoes_the_step_after_sigma_one_in_rho():
    """v3 (no EMS) with its corrector: the corrector at sigma_2 redoes step 1 with the quadratic in rho through the
    outputs at sigma = 1, sigma_1 and sigma_2 (a tiny last step makes the corrected x_2 the output).  Local error
    O(H^4): measured slopes 3.9-4.6 over 3 mixtures; before, the corrector used sigma_1 and sigma_2 only (slopes
    2.0-3.2)."""
    run = MULTISTEP["v3-no-corrector"]
    for guidance in (1.0, 7.5):
        model, x = _flow_problem(guidance)
        errors = []
        for step in (0.02, 0.01, 0.005):
            sigmas = torch.tensor([1.0, math.exp(-step), math.exp(-2.5 * step), math.exp(-2.5 * step - 1e-5)],
                                  dtype=torch.float64)
            x1 = run(model, x, sigmas[:2])
            exact = reference_solution(model, x1, float(sigmas[1]), float(sigmas[3]), "flow")
            out = sample_dpm_solver_v3(model, x, sigmas, model_kind="flow", fallback=False, lower_order_final=False,
                                       disable=True)
            errors.append((out - exact).norm(dim=1).median().item())
        assert min(_slopes(errors)) > 3.0, (guidance, errors, _slopes(errors))


@pytest.mark.parametrize("name, order", [("dpm-solver-2", 2), ("dpm-solver-3", 3), ("dpmpp-2s", 2)])
def test_singlestep_step_out_of_sigma_one_keeps_its_order(name, order):
    """The step 1 -> e^-H with the stages in rho (DPM-Solver-2/3, DPM-Solver++(2S)), H = 0.02, 0.01, 0.005: local
    error O(H^(order + 1)), measured slopes 2.95-3.33 (order 2) and 3.76-4.38 (order 3) over 3 mixtures; before,
    the step was DDIM with one call (slopes 1.98-2.20)."""
    def run(model, x, sigmas):
        if name == "dpmpp-2s":
            return sample_dpmpp_2s(model, x, sigmas, model_kind="flow", disable=True)
        return sample_dpm_solver(model, x, sigmas, model_kind="flow", order=order, lower_order_final=False,
                                 disable=True)

    for guidance in (1.0, 7.5):
        model, x = _flow_problem(guidance)
        calls = []

        def counted(xx, sigma, **kwargs):
            calls.append(1)
            return model(xx, sigma)

        errors = []
        for step in (0.02, 0.01, 0.005):
            sigmas = torch.tensor([1.0, math.exp(-step)], dtype=torch.float64)
            exact = reference_solution(model, x, 1.0, float(sigmas[1]), "flow")
            errors.append((run(counted, x, sigmas) - exact).norm(dim=1).median().item())
        assert len(calls) == 3 * order  # order model calls per step, as every other step
        assert min(_slopes(errors)) > order + 0.6, (guidance, errors, _slopes(errors))


def test_a_step_far_beyond_its_history_in_rho_drops_sigma_one():
    """The sigma = 1 output stays in the history only while the step extrapolates at most twice the history's span in
    rho (rho_t - rho_s <= 2 rho_s); beyond, the step is the one with the finite history (here: first order, DDIM).
    At 5-6 steps of the recommended flow schedule (ratio 3.7, 2.7) with guidance 7.5 this measured 70 -> 1.5 and
    1.2 -> 0.80 for the 2M (bench/results_flow_guidance.md)."""
    model, x = _flow_problem(7.5)
    lam = lambda sigma: math.log((1 - sigma) / sigma)
    far = torch.tensor([1.0, math.exp(-0.05), math.exp(-0.05 - 0.11)], dtype=torch.float64)  # ratio 2.2
    near = torch.tensor([1.0, math.exp(-0.05), math.exp(-0.05 - 0.09)], dtype=torch.float64)  # ratio 1.8
    for sigmas, keeps in ((far, False), (near, True)):
        out = sample_dpmpp_2m(model, x, sigmas, model_kind="flow", lower_order_final=False, disable=True)
        s1, s2 = float(sigmas[1]), float(sigmas[2])
        x1 = sample_dpmpp_2m(model, x, sigmas[:2], model_kind="flow", disable=True)
        ddim = x1 * (s2 / s1) + model(x1, torch.full((32,), s1, dtype=torch.float64)) * ((1 - s2) * -math.expm1(
            -(lam(s2) - lam(s1))))
        assert torch.allclose(out, ddim, rtol=0, atol=1e-12) != keeps


# ---------------------------------------------------------------------------------------------------------------
# Into sigma = 0: D extrapolated in v^2 (v = sigma / alpha), local error O(v^3) instead of O(v^2)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", ["flow", "eps"])
def test_extrapolated_final_step_has_third_order_local_error(model_kind):
    """On the exact ODE path, D at v and 2v extrapolated to v = 0 misses x(0) by O(v^3) (measured slopes 3.1 / 3.7 for
    v = 0.2 -> 0.1 -> 0.05, error 2.5e-4 at 0.05); returning D at v (k-diffusion's last step) by O(v^2) (measured
    1.86 / 1.96, error 5.6e-3)."""
    model = mixture(0, 5.0, dim=8).denoiser(model_kind)
    schedule = noise_schedule(model_kind)
    start = 0.5 if model_kind == "flow" else 1.0
    x = sample_noise(32, (8,), seed=2) * start
    exact = reference_solution(model, x, start, 0.0, model_kind)
    plain, extrapolated = [], []
    for v in (0.2, 0.1, 0.05):
        sig = [v / (1 + v), 2 * v / (1 + 2 * v)] if model_kind == "flow" else [v, 2 * v]  # sigma with v = e^-lambda
        outputs = []
        for s in sig:
            state = reference_solution(model, x, start, s, model_kind)
            outputs.append(model(state, torch.full((32,), s, dtype=torch.float64)))
        lams = [schedule.lambda_(s) for s in sig]
        plain.append((outputs[0] - exact).norm(dim=1).median().item())
        extrapolated.append((extrapolated_denoised(lams, outputs) - exact).norm(dim=1).median().item())
    plain_slope = math.log2(plain[1] / plain[2])
    slopes = [math.log2(extrapolated[k] / extrapolated[k + 1]) for k in range(2)]
    assert abs(plain_slope - 2) < 0.3, plain
    assert min(slopes) > 2.6, (extrapolated, slopes)
    assert extrapolated[-1] < 0.2 * plain[-1]


# ---------------------------------------------------------------------------------------------------------------
# Shift-3 flow schedules: our 2M against k-diffusion's (ComfyUI's) 2M on the same sigmas
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", GUIDANCE)
def test_shift3_flow_2m_at_most_1_1x_kdiffusion_2m(guidance):
    """Median per-sample MSE over 32 samples, 3 random mixtures, 5-10 steps (our/k-diffusion measured 0.19-0.86 here;
    before this change 1.0-1.3)."""
    k_sampling = kdiffusion_reference.load()
    ratios = []
    for seed in SEEDS:
        model, x, ref = problem(seed, guidance, "flow", 1.0)
        for steps in (5, 6, 8, 10):
            sigmas = shift3_sigmas(steps)
            ours = per_sample_error(sample_dpmpp_2m(model, x, sigmas, model_kind="flow", disable=True), ref)
            theirs = per_sample_error(k_sampling.sample_dpmpp_2m(model, x, sigmas, disable=True), ref)
            ratios.append(ours / theirs)
    assert max(ratios) <= 1.1, ratios


# ---------------------------------------------------------------------------------------------------------------
# Third-order steps with guidance: bounded outputs, never far behind the 2M
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver_type", ["official", "taylor"])
@pytest.mark.parametrize("model_kind", ["flow", "eps"])
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_3m_at_most_2x_the_2m_error_at_8_to_12_steps(guidance, model_kind, solver_type):
    """The 3M (both forms), 3 random mixtures, the hosts' schedule (shift 3 / Karras) and logSNR-uniform steps, 8-12
    steps: measured at most 1.54x (official) and 1.29x (Taylor) the (midpoint) 2M's error here; 1.54x / 1.39x over
    the guard study's 378 cases, 1.36x / 1.35x on its held-out ones, 1.86x / 1.94x on the issue's 4x16x16 mixtures.
    Without the guard: up to 3.8e3x; the Taylor form with its former Taylor-weighted second-order steps: up to 76x
    (bench/results_flow_guidance.md)."""
    worst = {}
    for seed in SEEDS:
        start = 1.0 if model_kind == "flow" else None
        for make in SCHEDULES[model_kind]:
            model, x, ref = problem(seed, guidance, model_kind, start or float(make(8)[0]))
            for steps in (8, 10, 12):
                sigmas = make(steps)
                two = per_sample_error(sample_dpmpp_2m(model, x, sigmas, model_kind=model_kind, disable=True), ref)
                three = sample_dpmpp_3m(model, x, sigmas, model_kind=model_kind, solver_type=solver_type,
                                        disable=True)
                worst[make.__name__, steps] = per_sample_error(three, ref) / two
    assert max(worst.values()) <= 2.0, worst


def test_guard_keeps_more_of_the_3m_lead_at_15_to_20_unguided_steps():
    """Geometric mean of the official 3M's error over the 2M's, 3 mixtures, both kinds, both schedules, 15 and 20
    steps, guidance 1: measured 0.47 (before the fourth-output check: 0.59).  The check keeps order 3 on late,
    smooth steps whose D'' and D' terms are of one size (bench/results_flow_guidance.md, where it also measured
    0.56 -> 0.17 on the bench's 1024-d eps mixtures)."""
    logs = []
    for seed in SEEDS:
        for model_kind in ("flow", "eps"):
            for make in SCHEDULES[model_kind]:
                start = 1.0 if model_kind == "flow" else float(make(8)[0])
                model, x, ref = problem(seed, 1.0, model_kind, start)
                for steps in (15, 20):
                    sigmas = make(steps)
                    two = per_sample_error(sample_dpmpp_2m(model, x, sigmas, model_kind=model_kind, disable=True),
                                           ref)
                    three = per_sample_error(sample_dpmpp_3m(model, x, sigmas, model_kind=model_kind, disable=True),
                                             ref)
                    logs.append(math.log(three / two))
    assert math.exp(sum(logs) / len(logs)) <= 0.52, [round(math.exp(v), 3) for v in logs]


BOUNDED = {
    "2m": lambda m, x, s, k: sample_dpmpp_2m(m, x, s, model_kind=k, disable=True),
    "2m-sde": lambda m, x, s, k: sample_dpmpp_2m_sde(m, x, s, model_kind=k, seed=0, noise_type="gaussian",
                                                     disable=True),
    "3m": lambda m, x, s, k: sample_dpmpp_3m(m, x, s, model_kind=k, disable=True),
    "3m-taylor": lambda m, x, s, k: sample_dpmpp_3m(m, x, s, model_kind=k, solver_type="taylor", disable=True),
    "3m-sde": lambda m, x, s, k: sample_dpmpp_3m_sde(m, x, s, model_kind=k, seed=0, noise_type="gaussian",
                                                     disable=True),
    "3m-sde-taylor": lambda m, x, s, k: sample_dpmpp_3m_sde(m, x, s, model_kind=k, seed=0, noise_type="gaussian",
                                                            solver_type="taylor", disable=True),
    "dpm-solver-sde-2m": lambda m, x, s, k: sample_dpm_solver_sde_2m(m, x, s, model_kind=k, seed=0,
                                                                     noise_type="gaussian", disable=True),
    "dpm-solver-sde-1": lambda m, x, s, k: sample_dpm_solver_sde_1(m, x, s, model_kind=k, seed=0,
                                                                   noise_type="gaussian", disable=True),
}
# the solvers whose flow start this issue changed, and DDIM; step counts 5-20 (CI time)
BOUNDED_MORE = {
    "dpm-solver-multistep-3": lambda m, x, s, k: sample_dpm_solver(m, x, s, model_kind=k, order=3, method="multistep",
                                                                   disable=True),
    "dpm-solver-singlestep-3": lambda m, x, s, k: sample_dpm_solver(m, x, s, model_kind=k, order=3, disable=True),
    "dpmpp-2s": lambda m, x, s, k: sample_dpmpp_2s(m, x, s, model_kind=k, disable=True),
    "v3": lambda m, x, s, k: sample_dpm_solver_v3(m, x, s, model_kind=k, disable=True),
    "ddim": lambda m, x, s, k: sample_ddim(m, x, s, model_kind=k, disable=True),
}


@pytest.mark.parametrize("model_kind", ["flow", "eps"])
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_outputs_stay_within_a_multiple_of_the_exact_range(guidance, model_kind):
    """max |output| / max |exact ODE output| (same noise) over step counts 5, 6, 8, 12, 20 and 40 (the solvers of
    BOUNDED_MORE: 5-20), 3 random mixtures (dim 16) and both schedules of the model kind.  Measured (guidance
    1 / 5 / 7.5, flow | eps): the 2M 1.08 / 2.13 / 5.84 | 1.19 / 1.65 / 7.78 (its own excursions at 5-6 guided
    logSNR or Karras steps set the scale); both 3M forms the same as the 2M (the Taylor form before its midpoint
    second-order steps: up to 6.48 | 13.5); the 3M SDE the 2M SDE's 1.27 / 3.87 / 10.4 | 1.41 / 4.44 / 18.9 (before:
    up to 18.2 | 27.8); v3 up to 12.0, DPM-Solver-3 singlestep up to 17.7; the noise-prediction SDE-DPM-Solver-2M
    the data-form 2M SDE's (its guard takes the coarse steps in the data form) and SDE-DPM-Solver-1 up to 1.96 (before
    their guard, bench/flow_guidance_noise_sde.py over 5-40 steps: the 2M 65.6 / 481 / 1.43e3 | 143 / 694 / 1.59e3,
    the 1 up to 681).  Without the guard the 3M reached |x| = 1.2e4 on data of range 4.7
    (bench/results_flow_guidance.md)."""
    worst = {}
    for seed in SEEDS:
        for make in SCHEDULES[model_kind]:
            start = 1.0 if model_kind == "flow" else float(make(8)[0])
            model, x, ref = problem(seed, guidance, model_kind, start)
            scale = ref.abs().max().item()
            for steps in (5, 6, 8, 12, 20, 40):
                table = dict(BOUNDED, **BOUNDED_MORE) if steps <= 20 else BOUNDED
                for name, run in table.items():
                    ratio = run(model, x, make(steps), model_kind).abs().max().item() / scale
                    worst[name] = max(worst.get(name, 0.0), ratio)
    assert max(worst["3m"], worst["3m-taylor"]) <= 1.1 * worst["2m"], worst
    assert max(worst["3m-sde"], worst["3m-sde-taylor"], worst["dpm-solver-sde-2m"]) <= 1.1 * worst["2m-sde"], worst
    ode = ("2m", "3m", "3m-taylor", "dpm-solver-multistep-3", "dpmpp-2s", "v3", "ddim")
    assert max(worst[name] for name in ode) <= 15, worst
    assert max(worst.values()) <= 20, worst
