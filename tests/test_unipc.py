"""UniPC (samplers/unipc.py) against diffusers 0.42.1's UniPCMultistepScheduler on identical inputs, and measured
convergence orders against the DOP853 solution of the Gaussian-mixture ODE (plain and with guidance 7.5)."""
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import (GaussianMixture, GuidedGaussianMixture, reference_solution,
                                                         sample_noise)
from dpm_solver_nodes.samplers import sample_dpmpp_2m
from dpm_solver_nodes.samplers.schedule import noise_schedule
from dpm_solver_nodes.samplers.unipc import sample_unipc

MIXTURE = GaussianMixture.random(dim=8, components=5, seed=0)
MODELS = {"mixture": MIXTURE, "cfg-7.5": GuidedGaussianMixture(MIXTURE, [0, 1], scale=7.5)}


def logsnr_sigmas(n, sigma_max, sigma_min, model_kind="eps"):
    schedule = noise_schedule(model_kind)
    lam = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), n, dtype=torch.float64)
    return schedule.sigma_from_lambda(lam)


def with_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_unipc(model, x, sigmas, order, variant, dtype, final="zero"):
    """diffusers' UniPCMultistepScheduler (predict_x0, lower_order_final=True: its defaults) on our VE sigmas, driven
    in VP coordinates with the model's eps, as bench/peers.py runs it; ``dtype`` for its sigmas and sample.
    ``final="zero"``: ``sigmas`` end in 0; "sigma_min": they end at their last positive sigma, returned in VE."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the named peer for UniPC")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", solver_type=variant, solver_order=order, predict_x0=True,
        final_sigmas_type=final)
    positive = sigmas[sigmas > 0]
    steps = len(positive) if final == "zero" else len(positive) - 1
    scheduler.set_timesteps(steps)
    scheduler.sigmas = (with_zero(positive) if final == "zero" else positive).to(dtype)
    scheduler.set_begin_index(0)
    sample = (x / math.sqrt(1 + positive[0].item() ** 2)).to(dtype)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = positive[i].item()
        x_ve = sample.double() * math.sqrt(1 + sigma ** 2)
        eps = ((x_ve - model(x_ve, x_ve.new_full([len(x_ve)], sigma))) / sigma).to(dtype)
        sample = scheduler.step(eps, timestep, sample).prev_sample
    if final == "zero":
        return sample.double()
    return sample.double() * math.sqrt(1 + positive[-1].item() ** 2)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh2_equals_diffusers(order, model_name):
    """Same sigmas (logSNR-uniform 80 -> 0.002, trailing 0), 5 / 8 / 20 steps: diffusers in float64 agrees to rounding
    (measured 8e-16 - 5e-14 relative), in float32 (how hosts run it) to its float32 rounding (2e-7 - 2.6e-6)."""
    model = MODELS[model_name].denoiser()
    x = sample_noise(16, (8,), seed=2) * 80.0
    for n in (5, 8, 20):
        sigmas = with_zero(logsnr_sigmas(n, 80.0, 0.002))
        ours = sample_unipc(model, x, sigmas, order=order, disable=True)
        assert relative(ours, diffusers_unipc(model, x, sigmas, order, "bh2", torch.float64)) < 1e-11, n
        assert relative(ours, diffusers_unipc(model, x, sigmas, order, "bh2", torch.float32)) < 2e-5, n


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh1_equals_diffusers_ending_at_sigma_min(order):
    """bh1 (B(h) = h) and a schedule that stops at sigma_min (diffusers' final_sigmas_type="sigma_min", our
    final_step="stop" on a trailing 0; the last step is first order in both): measured 1e-15 - 2e-14.  (diffusers'
    bh1 step into sigma = 0 returns NaN: its B(h) = -h is -inf there, times a zero correction.)"""
    model = MIXTURE.denoiser()
    x = sample_noise(16, (8,), seed=4) * 80.0
    for n in (6, 10):
        sigmas = logsnr_sigmas(n, 80.0, 0.002)
        ours = sample_unipc(model, x, with_zero(sigmas), order=order, variant="bh1", final_step="stop", disable=True)
        theirs = diffusers_unipc(model, x, sigmas, order, "bh1", torch.float64, final="sigma_min")
        assert relative(ours, theirs) < 1e-11, n
        assert torch.equal(ours, sample_unipc(model, x, sigmas, order=order, variant="bh1", disable=True))


def test_unip2_bh2_is_dpmpp_2m_and_the_corrector_changes_it():
    """UniP-2 with B(h) = 1 - e^{-h} is the DPM-Solver++(2M) step (the paper's Sec. 3.3 remark); the corrector is what
    UniPC adds.  Measured 3e-16 relative without the corrector."""
    model = MIXTURE.denoiser()
    x = sample_noise(16, (8,), seed=5) * 80.0
    sigmas = with_zero(logsnr_sigmas(10, 80.0, 0.002))
    plain = sample_unipc(model, x, sigmas, use_corrector=False, disable=True)
    assert relative(plain, sample_dpmpp_2m(model, x, sigmas, lower_order_final=True, disable=True)) < 1e-12
    assert relative(sample_unipc(model, x, sigmas, disable=True), plain) > 1e-4


# (order, use_corrector) -> the order of convergence: UniP-p alone has order p, UniPC-p order p + 1 (Theorem 3.1)
ORDERS = {(1, True): 2, (2, False): 2, (2, True): 3, (3, True): 4}
RANGES = {"eps": (80.0, 0.05), "flow": (0.99, 0.05)}
_REFERENCES = {}


def _reference(model_name, kind):
    if (model_name, kind) not in _REFERENCES:
        model = MODELS[model_name].denoiser(kind)
        x = sample_noise(32, (8,), seed=1) * (RANGES[kind][0] if kind == "eps" else 1.0)
        _REFERENCES[model_name, kind] = model, x, reference_solution(model, x, *RANGES[kind], kind)
    return _REFERENCES[model_name, kind]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("order, corrector", list(ORDERS))
def test_measured_order(order, corrector, kind, model_name):
    """logSNR-uniform steps 80 (0.99 flow) -> 0.05, no trailing 0, lower_order_final=False; slopes of the median
    error from 32 -> 64 -> 128 steps.  Measured (eps and flow alike): UniPC-1 1.97-2.00, UniP-2 2.03-2.15, UniPC-2
    2.40-3.08 (guided: 2.40 at 32 -> 64, 2.91 after), UniPC-3 2.93-4.39.  Each slope must reach the order less 0.7
    (UniPC-3 less 1.2: 2.93 on the plain mixture, pre-asymptotic) and not exceed it by more than 1.5."""
    model, x, ref = _reference(model_name, kind)
    errors = []
    for n in (32, 64, 128):
        out = sample_unipc(model, x, logsnr_sigmas(n + 1, *RANGES[kind], kind), model_kind=kind, order=order,
                           use_corrector=corrector, lower_order_final=False, disable=True)
        errors.append((out - ref).flatten(1).norm(dim=1).median().item())
    slopes = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    expected = ORDERS[order, corrector]
    slack = 1.2 if expected == 4 else 0.7
    assert all(expected - slack < s < expected + 1.5 for s in slopes), (errors, slopes)
    # the order is what the corrector adds: UniP-p alone converges with order p
    if corrector and order == 2:
        plain = sample_unipc(model, x, logsnr_sigmas(129, *RANGES[kind], kind), model_kind=kind, order=2,
                             use_corrector=False, lower_order_final=False, disable=True)
        assert errors[-1] < 0.2 * (plain - ref).flatten(1).norm(dim=1).median().item()


def _flow_problem(guidance):
    model = GuidedGaussianMixture(GaussianMixture.random(dim=8, components=5, seed=0), [0, 1],
                                  scale=guidance).denoiser("flow")
    return model, sample_noise(32, (8,), seed=1)


def test_the_step_after_sigma_one_keeps_its_order():
    """Flow start at sigma = 1 (lambda = -inf): sigmas 1, e^-H, e^-2.5H, H = 0.02, 0.01, 0.005, without corrector,
    error of the second step against the exact solution from the sampler's own x_1: UniP-2 uses the sigma = 1 output
    in rho (local error O(H^3), as sample_dpmpp_2m: tests/test_flow_guidance.py).  Measured slopes 2.9-3.0."""
    for guidance in (1.0, 7.5):
        model, x = _flow_problem(guidance)
        errors = []
        for step in (0.02, 0.01, 0.005):
            sigmas = torch.tensor([1.0, math.exp(-step), math.exp(-2.5 * step)], dtype=torch.float64)
            run = dict(model_kind="flow", lower_order_final=False, use_corrector=False, disable=True)
            x1 = sample_unipc(model, x, sigmas[:2], **run)
            exact = reference_solution(model, x1, float(sigmas[1]), float(sigmas[-1]), "flow")
            errors.append((sample_unipc(model, x, sigmas, **run) - exact).norm(dim=1).median().item())
        slopes = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
        assert min(slopes) > 2.5, (guidance, errors, slopes)


def test_the_corrector_redoes_the_step_out_of_sigma_one_in_rho():
    """The step 1 -> e^-H is DDIM (local error O(H^2) in rho); the corrector at e^-H redoes it with the line in rho
    through the outputs at sigma = 1 and e^-H, integrated exactly (O(H^3)).  A tiny last step makes the corrected x_1
    the output; error against the exact solution from sigma = 1, H = 0.08, 0.04, 0.02.  Measured: uncorrected slopes
    2.0-2.4; corrected 0.002-0.6x the uncorrected error, mean slope over the range 4.1 (guidance 1; 5.1 then 3.2)
    and 3.1 (guidance 7.5)."""
    for guidance in (1.0, 7.5):
        model, x = _flow_problem(guidance)
        errors = {False: [], True: []}
        for step in (0.08, 0.04, 0.02):
            sigmas = torch.tensor([1.0, math.exp(-step), math.exp(-step) * (1 - 1e-6)], dtype=torch.float64)
            exact = reference_solution(model, x, 1.0, float(sigmas[-1]), "flow")
            for corrector in errors:
                out = sample_unipc(model, x, sigmas, model_kind="flow", lower_order_final=False,
                                   use_corrector=corrector, disable=True)
                errors[corrector].append((out - exact).norm(dim=1).median().item())
        assert all(c < 0.7 * p for c, p in zip(errors[True], errors[False])), (guidance, errors)
        assert math.log2(errors[True][0] / errors[True][-1]) / 2 > 2.5, (guidance, errors)


def test_one_model_call_per_step_and_the_final_denoise():
    """n steps with a trailing 0: n model calls; the output is D at the last positive sigma of the predicted
    (uncorrected, as diffusers) x, so it equals the denoised value the callback reports there."""
    model = MIXTURE.denoiser()
    calls, seen = [], []

    def counted(x, sigma, **kwargs):
        calls.append(1)
        return model(x, sigma, **kwargs)

    x = sample_noise(4, (8,), seed=6) * 80.0
    sigmas = with_zero(logsnr_sigmas(7, 80.0, 0.002))
    out = sample_unipc(counted, x, sigmas, callback=seen.append, disable=True)
    assert len(calls) == 7 and [d["i"] for d in seen] == list(range(7))
    assert torch.equal(out, seen[-1]["denoised"])
    with pytest.raises(ValueError, match="variant"):
        sample_unipc(model, x, sigmas, variant="bh3")
    with pytest.raises(ValueError, match="order"):
        sample_unipc(model, x, sigmas, order=4)
