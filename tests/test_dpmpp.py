"""DPM-Solver++ 2S / 2M (midpoint, taylor) / 3M (samplers/dpmpp.py).

References: measured convergence orders against the DOP853 solution of the Gaussian-mixture ODE (plain and with
classifier-free guidance), PyPI k-diffusion 0.1.1.post1 on identical inputs, and the sampler's own documented
conventions (trailing zero, lower-order final steps, callback, precisions, shapes).
"""
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import (GaussianMixture, GuidedGaussianMixture, reference_solution,
                                                         sample_noise)
from dpm_solver_nodes.samplers import sample_dpmpp_2m, sample_dpmpp_2s, sample_dpmpp_3m
from dpm_solver_nodes.samplers.schedule import noise_schedule

import kdiffusion_reference

MIXTURE = GaussianMixture.random(dim=8, components=5, seed=0)
MODELS = {
    "mixture": MIXTURE,
    "cfg-1": GuidedGaussianMixture(MIXTURE, [0, 1], scale=1.0),
    "cfg-7.5": GuidedGaussianMixture(MIXTURE, [0, 1], scale=7.5),
}
SIGMA_RANGE = {"eps": (80.0, 0.05), "flow": (0.99, 0.05)}
KINDS = ("eps", "flow")


def logsnr_sigmas(steps, sigma_max, sigma_min, model_kind="eps"):
    schedule = noise_schedule(model_kind)
    lam = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), steps + 1, dtype=torch.float64)
    return schedule.sigma_from_lambda(lam)


def karras_sigmas(steps, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def start_latent(model_kind, batch=32, seed=1, dim=8):
    scale = SIGMA_RANGE[model_kind][0] if model_kind == "eps" else 1.0
    return sample_noise(batch, (dim,), seed=seed) * scale


def median_error(out, ref):
    return (out - ref).flatten(1).norm(dim=1).median().item()


# ---------------------------------------------------------------------------------------------------------------
# Measured convergence orders (logSNR-uniform sigmas, lower_order_final=False, no trailing 0)
# ---------------------------------------------------------------------------------------------------------------

SOLVERS = {
    "2m": (lambda m, x, s, k: sample_dpmpp_2m(m, x, s, model_kind=k, lower_order_final=False, disable=True), 2),
    "2m-taylor": (lambda m, x, s, k: sample_dpmpp_2m(m, x, s, model_kind=k, lower_order_final=False,
                                                     solver_type="taylor", disable=True), 2),
    "3m-taylor": (lambda m, x, s, k: sample_dpmpp_3m(m, x, s, model_kind=k, lower_order_final=False,
                                                     solver_type="taylor", disable=True), 3),
    "2s": (lambda m, x, s, k: sample_dpmpp_2s(m, x, s, model_kind=k, disable=True), 2),
}
STEPS = (64, 128, 256)
_REFERENCES = {}


def reference(model_name, model_kind):
    if (model_name, model_kind) not in _REFERENCES:
        model = MODELS[model_name].denoiser(model_kind)
        x = start_latent(model_kind)
        _REFERENCES[model_name, model_kind] = x, reference_solution(model, x, *SIGMA_RANGE[model_kind], model_kind)
    return _REFERENCES[model_name, model_kind]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("model_kind", KINDS)
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_measured_order(solver, model_kind, model_name):
    """Orders measured (64->128, 128->256 steps) on the 5-component mixture, sigma 80 -> 0.05 (eps) or
    0.99 -> 0.05 (flow): 2M 2.03 / 2.01, 2M taylor 2.04 / 2.02, 3M 3.16 / 3.07 (3.02 / 2.91 with guidance 1,
    3.05 / 3.01 with guidance 7.5), 2S 1.97 / 1.99.  From 16 steps the 3M pairs are still pre-asymptotic (3.46),
    hence the 64..256 window; every pair must lie within 0.3 of the theoretical order."""
    run, order = SOLVERS[solver]
    sigma_max, sigma_min = SIGMA_RANGE[model_kind]
    model = MODELS[model_name].denoiser(model_kind)
    x, ref = reference(model_name, model_kind)
    errors = [median_error(run(model, x, logsnr_sigmas(n, sigma_max, sigma_min, model_kind), model_kind), ref)
              for n in STEPS]
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(len(STEPS) - 1)]
    assert all(abs(p - order) < 0.3 for p in orders), (errors, orders)


# ---------------------------------------------------------------------------------------------------------------
# Parity with PyPI k-diffusion
# ---------------------------------------------------------------------------------------------------------------

def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("steps", [10, 25])
def test_2m_equals_kdiffusion(steps):
    k_sampling = kdiffusion_reference.load()
    model = MIXTURE.denoiser()
    sigmas = karras_sigmas(steps)
    x = sample_noise(8, (8,), seed=2) * 14.6
    ours = sample_dpmpp_2m(model, x, sigmas, disable=True)
    theirs = k_sampling.sample_dpmpp_2m(model, x, sigmas, disable=True)
    assert relative(ours, theirs) < 1e-5  # measured 7.4e-16 (10 steps), 9.8e-16 (25 steps)


def test_2m_equals_kdiffusion_in_float32():
    k_sampling = kdiffusion_reference.load()
    model = MIXTURE.denoiser()
    sigmas = karras_sigmas(12).float()
    x = (sample_noise(8, (8,), seed=2) * 14.6).float()
    assert relative(sample_dpmpp_2m(model, x, sigmas, disable=True),
                    k_sampling.sample_dpmpp_2m(model, x, sigmas, disable=True)) < 1e-5  # measured 2.2e-7


@pytest.mark.parametrize("steps", [8, 20])
def test_2s_equals_kdiffusion_2s_ancestral_at_eta_zero(steps):
    k_sampling = kdiffusion_reference.load()
    model = MIXTURE.denoiser()
    sigmas = karras_sigmas(steps)
    x = sample_noise(8, (8,), seed=3) * 14.6
    ours = sample_dpmpp_2s(model, x, sigmas, disable=True)
    theirs = k_sampling.sample_dpmpp_2s_ancestral(model, x, sigmas, eta=0.0, disable=True)
    assert relative(ours, theirs) < 1e-5  # measured 2.9e-16 / 4.3e-16


def _kdiffusion_3m(model, x, sigmas):
    k_sampling = kdiffusion_reference.load()
    return k_sampling.sample_dpmpp_3m_sde(model, x, sigmas, eta=0.0, noise_sampler=lambda s, t: torch.zeros_like(x),
                                          disable=True)


def test_taylor_3m_warm_up_is_the_paper_2m_and_its_third_step_differs_from_kdiffusion():
    """The Taylor form's second-order steps are the paper's 2M (midpoint), as the official form's (so its first two
    steps equal ``sample_dpmpp_2m``, measured to rounding); k-diffusion's 3M SDE at eta = 0 (Taylor warm-up, half the
    Taylor D'' weight) differs (measured 1.4e-2 relative after 3 steps of this coarse 6-step schedule)."""
    model = MIXTURE.denoiser()
    sigmas = logsnr_sigmas(6, 14.6, 0.1)
    x = sample_noise(8, (8,), seed=4) * 14.6
    two = sample_dpmpp_3m(model, x, sigmas[:3], lower_order_final=False, solver_type="taylor", disable=True)
    assert relative(two, sample_dpmpp_2m(model, x, sigmas[:3], lower_order_final=False, disable=True)) < 1e-12
    three = sample_dpmpp_3m(model, x, sigmas[:4], lower_order_final=False, solver_type="taylor", disable=True)
    assert relative(three, _kdiffusion_3m(model, x, sigmas[:4])) > 1e-6


def test_official_3m_equals_diffusers_order_3_scheduler():
    """solver_type="official" (the default) is the DPM-Solver++ authors' third-order multistep step: on the same
    sigmas and model it reproduces diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` (lower-order final
    steps below 15 steps included) to diffusers' float32 arithmetic (measured 8e-7 .. 2e-6 absolute on values up to
    6.4; the Taylor form differs by 9e-3 .. 0.85)."""
    from dpm_solver_nodes.peers import diffusers_solvers

    third = next(s for s in diffusers_solvers() if s.name == "diffusers:dpmsolver++3M")
    model = MIXTURE.denoiser()
    for steps in (5, 10, 14, 20):
        sigmas = karras_sigmas(steps)
        x = sample_noise(16, (8,), seed=5) * sigmas[0]
        theirs = third.function(model, x, sigmas, {}, "eps", steps)
        ours = sample_dpmpp_3m(model, x, sigmas, guard=False, disable=True)
        assert (ours - theirs).abs().max().item() < 2e-5, steps
        taylor = sample_dpmpp_3m(model, x, sigmas, solver_type="taylor", disable=True)
        assert (taylor - theirs).abs().max().item() > 1e-3, steps   # a different method: the check can fail


def test_official_3m_trades_order_for_accuracy_at_few_steps():
    """The official step weights D'' by half its Taylor coefficient: second order (measured 1.99 / 1.89 / 1.90 from
    32 to 256 steps) where the Taylor form is third order, but the more accurate below about 30 steps (measured at
    16 steps: 1.77e-2 vs 2.95e-2; at 256: 3.5e-5 vs 3.6e-6).  The step formulas, so without the guard (with it, at 16
    steps both forms mostly take the 2M's step: 3.8e-2 vs 3.5e-2)."""
    model = MIXTURE.denoiser()
    x, ref = reference("mixture", "eps")
    errors = {}
    for solver_type in ("official", "taylor"):
        for n in (16, 128, 256):
            sigmas = logsnr_sigmas(n, *SIGMA_RANGE["eps"])
            out = sample_dpmpp_3m(model, x, sigmas, lower_order_final=False, solver_type=solver_type, guard=False,
                                  disable=True)
            errors[solver_type, n] = median_error(out, ref)
    assert errors["official", 16] < 0.8 * errors["taylor", 16]
    assert errors["taylor", 256] < 0.2 * errors["official", 256]
    assert abs(math.log2(errors["official", 128] / errors["official", 256]) - 2) < 0.3
    with pytest.raises(ValueError, match="solver_type"):
        sample_dpmpp_3m(model, x, logsnr_sigmas(4, *SIGMA_RANGE["eps"]), solver_type="midpoint", disable=True)


def test_3m_has_higher_measured_order_than_kdiffusion_3m():
    """Measured on the mixture (eps, 32 -> 64 -> 128 -> 256 steps): our Taylor form 3.32 / 3.16 / 3.07, k-diffusion's 3M SDE
    at eta = 0 1.99 / 1.89 / 1.90 (its local error is O(h^3)); at 256 steps ours 3.6e-6, theirs 3.5e-5."""
    model = MIXTURE.denoiser()
    x, ref = reference("mixture", "eps")
    ours, theirs = [], []
    for n in STEPS:
        sigmas = logsnr_sigmas(n, *SIGMA_RANGE["eps"])
        ours.append(median_error(sample_dpmpp_3m(model, x, sigmas, lower_order_final=False, solver_type="taylor",
                                                 disable=True), ref))
        theirs.append(median_error(_kdiffusion_3m(model, x, sigmas), ref))
    our_order = math.log2(ours[-2] / ours[-1])
    their_order = math.log2(theirs[-2] / theirs[-1])
    assert our_order > their_order + 0.5, (ours, theirs)
    assert abs(their_order - 2) < 0.4, theirs
    assert ours[-1] < theirs[-1]


# ---------------------------------------------------------------------------------------------------------------
# Sigma lists: img2img, trailing zero, lower_order_final, flow from sigma = 1
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", KINDS)
def test_img2img_schedule_starting_midway(model_kind):
    """A host slices the full schedule for img2img (denoise < 1); the solvers must not assume a start at
    sigma_max.  Compare with the ODE solution from the slice's first sigma."""
    full = karras_sigmas(30) if model_kind == "eps" else torch.cat([logsnr_sigmas(29, 0.99, 0.02, "flow"),
                                                                     torch.zeros(1, dtype=torch.float64)])
    sigmas = full[12:]
    model = MIXTURE.denoiser(model_kind)
    s0 = float(sigmas[0])
    alpha0 = 1 - s0 if model_kind == "flow" else 1.0
    x = MIXTURE.sample(16, torch.Generator().manual_seed(5)) * alpha0 + s0 * sample_noise(16, (8,), seed=6)
    ref = reference_solution(model, x, s0, float(sigmas[-2]), model_kind)
    for sampler in (sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s):
        out = sampler(model, x, sigmas, model_kind=model_kind, final_step="stop", disable=True)
        # 17 steps from sigma 2.08 (eps) / 0.75 (flow), last step first order (lower_order_final): measured
        # eps 2M 7.2e-3, 3M 5.0e-3, 2S 3.9e-3; flow 3M 1.6e-2, 2S 6.6e-3.  Bound at about 2x.
        assert median_error(out, ref) < 0.035, sampler.__name__
    if model_kind == "eps":
        k_sampling = kdiffusion_reference.load()
        assert relative(sample_dpmpp_2m(model, x, sigmas, disable=True),
                        k_sampling.sample_dpmpp_2m(model, x, sigmas, disable=True)) < 1e-5


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s])
@pytest.mark.parametrize("model_kind", KINDS)
def test_trailing_zero_denoise_versus_stop(sampler, model_kind):
    model = MIXTURE.denoiser(model_kind)
    sigmas = (karras_sigmas(20) if model_kind == "eps"
              else torch.cat([logsnr_sigmas(19, 0.99, 0.03, "flow"), torch.zeros(1, dtype=torch.float64)]))
    x = start_latent(model_kind, 4) * (14.6 / 80 if model_kind == "eps" else 1)
    options = {} if sampler is sample_dpmpp_2s else {"lower_order_final": False}
    if sampler is not sample_dpmpp_2s:
        options["final_step"] = "denoise"  # the flow default, "extrapolate", is tested in test_flow_guidance.py
    denoised = sampler(model, x, sigmas, model_kind=model_kind, disable=True, **options)
    options.pop("final_step", None)
    stopped = sampler(model, x, sigmas, model_kind=model_kind, final_step="stop", disable=True, **options)
    without_zero = sampler(model, x, sigmas[:-1], model_kind=model_kind, disable=True, **options)
    assert torch.equal(stopped, without_zero)
    # "denoise": the step into the trailing 0 returns D at the last positive sigma (one model call).
    last = sigmas[-2]
    torch.testing.assert_close(denoised, model(stopped, last.expand(4)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m])
def test_lower_order_final_default(sampler):
    model = MIXTURE.denoiser()
    x = sample_noise(4, (8,), seed=7) * 14.6
    for steps, default_on in ((10, True), (14, True), (15, False), (20, False)):
        sigmas = logsnr_sigmas(steps, 14.6, 0.05)
        default = sampler(model, x, sigmas, disable=True)
        on = sampler(model, x, sigmas, lower_order_final=True, disable=True)
        off = sampler(model, x, sigmas, lower_order_final=False, disable=True)
        assert not torch.equal(on, off)
        assert torch.equal(default, on if default_on else off), steps


def test_lower_order_final_runs_orders_down_to_one():
    """With lower_order_final the last 3M steps are orders 2 then 1: the final step equals a DDIM step."""
    model = MIXTURE.denoiser()
    x = sample_noise(4, (8,), seed=8) * 14.6
    sigmas = logsnr_sigmas(8, 14.6, 0.05)
    seen = []
    out = sample_dpmpp_3m(model, x, sigmas, lower_order_final=True, callback=seen.append, disable=True)
    s, t = float(sigmas[-2]), float(sigmas[-1])
    ddim = seen[-1]["x"] * (t / s) + seen[-1]["denoised"] * (1 - t / s)
    torch.testing.assert_close(out, ddim, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s])
def test_flow_start_at_sigma_one(sampler):
    model = MIXTURE.denoiser("flow")
    sigmas = torch.cat([torch.ones(1, dtype=torch.float64), logsnr_sigmas(39, 0.97, 0.03, "flow"),
                        torch.zeros(1, dtype=torch.float64)])
    x = sample_noise(16, (8,), seed=9)
    out = sampler(model, x, sigmas, model_kind="flow", disable=True)
    assert torch.isfinite(out).all()
    ref = reference_solution(model, x, 1.0, 0.0, "flow")
    assert median_error(out, ref) < 0.05  # measured ~1e-2 or less at 40 steps


# ---------------------------------------------------------------------------------------------------------------
# Precision, shapes, batch, callback, thresholding
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 3e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s])
def test_half_precision_latents(dtype, tolerance, sampler):
    model = MIXTURE.denoiser()
    sigmas = karras_sigmas(15).float()
    x = (sample_noise(16, (8,), seed=10) * 14.6).float()
    # The 3M's guard is a per-sample switch that rounding can flip (samplers/exponential.py): compared without it.
    options = {"guard": False} if sampler is sample_dpmpp_3m else {}
    reference_out = sampler(model, x, sigmas, disable=True, **options)
    out = sampler(model, x.to(dtype), sigmas, disable=True, **options)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Relative to the fp32 result's scale; the error is the rounding of x and of D at the model boundary and of the
    # result.  Measured: fp16 1.3e-3 / 1.2e-3 / 1.4e-3, bf16 4.1e-3 / 5.0e-3 / 6.1e-3 (2M / 3M / 2S).
    assert relative(out.float(), reference_out) < tolerance


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s])
def test_video_latents_and_batch_independence(sampler):
    model = MIXTURE.denoiser()
    sigmas = karras_sigmas(10)
    flat = sample_noise(3, (8,), seed=11) * 14.6
    video = flat.reshape(3, 2, 2, 2, 1)  # (batch, channels, frames, height, width)
    out_video = sampler(model, video, sigmas, disable=True)
    assert out_video.shape == video.shape
    torch.testing.assert_close(out_video.reshape(3, 8), sampler(model, flat, sigmas, disable=True), rtol=0, atol=0)
    single = sampler(model, flat[1:2], sigmas, disable=True)
    torch.testing.assert_close(single, sampler(model, flat, sigmas, disable=True)[1:2], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sampler, calls_per_step", [(sample_dpmpp_2m, 1), (sample_dpmpp_3m, 1),
                                                     (sample_dpmpp_2s, 2)])
def test_callback_once_per_step(sampler, calls_per_step):
    good = MIXTURE.denoiser()
    calls = []

    def model(x, sigma, **extra):
        calls.append(float(sigma[0]))
        return good(x, sigma)

    sigmas = karras_sigmas(9)
    seen = []
    sampler(model, sample_noise(2, (8,), seed=12) * 14.6, sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(9))
    for d in seen:
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(d["sigma"]) == float(sigmas[d["i"]]) == float(d["sigma_hat"])
        assert d["x"].shape == d["denoised"].shape == (2, 8)
    assert len(calls) == 9 + (calls_per_step - 1) * 8  # the 2S step into sigma = 0 is one call


def test_extra_args_reach_the_model():
    seen = []

    def model(x, sigma, cond=None, **extra):
        seen.append(cond)
        return MIXTURE.denoise(x, sigma)

    sample_dpmpp_2m(model, sample_noise(2, (8,), seed=0), karras_sigmas(3), extra_args={"cond": "c"}, disable=True)
    assert seen == ["c"] * 3


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s])
def test_thresholding_bounds_predictions(sampler):
    """Dynamic thresholding (DPM-Solver++ Sec. 6, Imagen): every D the solver uses lies in [-1, 1] after
    x0 <- clamp(x0, -s, s) / s, and with a trailing 0 so does the result."""
    pixels = GaussianMixture(torch.tensor([[2.5] * 8, [-2.5] * 8]), torch.full((2, 8), 0.3))
    seen = []
    out = sampler(pixels.denoiser(), sample_noise(4, (8,), seed=13) * 14.6, karras_sigmas(10),
                  threshold_percentile=0.95, threshold_max=3.0, callback=seen.append, disable=True)
    assert all(d["denoised"].abs().max().item() <= 1 + 1e-12 for d in seen)
    assert out.abs().max().item() <= 1 + 1e-12
    plain = sampler(pixels.denoiser(), sample_noise(4, (8,), seed=13) * 14.6, karras_sigmas(10), disable=True)
    assert plain.abs().max().item() > 1.5  # without thresholding the data's scale (+-2.5) comes back


def _guard_by_full_candidates(x, table, i, lams, outputs, eta, scales):
    """The 3M guard's rule (``exponential.guarded_step``) evaluated the direct way: every candidate step in full."""
    from dpm_solver_nodes.samplers.exponential import (GUARD_NEGLIGIBLE, GUARD_NEXT_SMALL, GUARD_NEXT_TERM,
                                                       GUARD_RATIO, data_prediction_step, midpoint_2m_step)

    def norm(value):
        return value.flatten(1).norm(dim=1)

    x3 = data_prediction_step(x, table, i, history=(lams[:3], outputs[:3]), eta=eta, scales=scales)
    x2 = midpoint_2m_step(x, table, i, lams, outputs, eta)
    x1 = data_prediction_step(x, table, i, [outputs[0]], eta=eta)
    keep = (norm(x3 - x2) <= GUARD_RATIO * norm(x2 - x1)) | (norm(x3 - x2) <= GUARD_NEGLIGIBLE * norm(x2))
    if scales is not None and eta == 0 and len(lams) > 3 and all(map(math.isfinite, lams)):
        x3t = data_prediction_step(x, table, i, history=(lams[:3], outputs[:3]))
        x4t = data_prediction_step(x, table, i, history=(lams[:4], outputs[:4]))
        keep |= (norm(x3 - x2) <= GUARD_NEXT_SMALL * norm(x2)) & (norm(x4t - x3t) <= GUARD_NEXT_TERM * norm(x3t - x2))
    return torch.where(keep[:, None], x3, x2), keep


@pytest.mark.parametrize("model_kind,sigmas,i", [("eps", [14.6, 8.0, 4.0, 2.0, 0.9], 3),
                                                 ("flow", [0.95, 0.85, 0.7, 0.5, 0.3], 3),
                                                 ("flow", [1.0, 0.9, 0.7, 0.5, 0.3], 3),  # a fourth output at sigma 1
                                                 ("flow", [1.0, 0.8, 0.6, 0.3], 2)])  # the third one: rho
@pytest.mark.parametrize("eta,scales", [(0.0, (1.0, 1.0, 0.5)), (0.0, None), (1.0, (1.0, 1.0, 0.5)), (0.5, None)])
def test_guarded_step_is_its_rule_on_the_full_candidate_steps(model_kind, sigmas, i, eta, scales):
    """The guard forms its differences from the outputs' weights (x cancels) and the second-order step only where a
    sample may fall back; on samples whose D'' and D' terms span 1e-5 to 10 and 3e-3 to 3 it decides as the rule
    on the full candidates does and returns the same tensor, bit for bit (float64)."""
    from dpm_solver_nodes.samplers.exponential import guarded_step
    from dpm_solver_nodes.samplers.schedule import StepTable

    table = StepTable.build(torch.tensor(sigmas, dtype=torch.float64), noise_schedule(model_kind))
    lams = [table.lam[j] for j in range(i, -1, -1)]
    generator = torch.Generator().manual_seed(5)
    base, slope, bend = (torch.randn(64, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    size = torch.logspace(-5, 1, 64, dtype=torch.float64)  # of D'' (bend) next to D' (slope), over the samples
    curvature, ramp = size[:, None], size[torch.randperm(64, generator=generator)][:, None].sqrt()
    outputs = [base + j * 0.1 * ramp * slope + j ** 2 * 0.1 * curvature * bend for j in range(len(lams))]
    x = torch.randn(64, 8, generator=generator, dtype=torch.float64) * table.sigma[i] + base * table.alpha[i]
    expected, keep = _guard_by_full_candidates(x, table, i, lams, outputs, eta, scales)
    assert 0 < int(keep.sum()) < 64  # both branches taken
    assert torch.equal(guarded_step(x, table, i, (lams, outputs), eta=eta, scales=scales), expected)
    for kept in (keep.all(), ~keep.any()):  # the shortcuts: every sample keeps x3, or none does
        rows = keep if kept else ~keep
        subset = [output[rows] for output in outputs]
        assert torch.equal(guarded_step(x[rows], table, i, (lams, subset), eta=eta, scales=scales), expected[rows])
