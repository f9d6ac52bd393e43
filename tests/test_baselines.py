"""DDIM, DDPM, PNDM and multistep consistency sampling (samplers/baselines.py).

References: hand formulas, PyPI k-diffusion's ``sample_euler`` (= DDIM for eps models), diffusers 0.42.1
``DDIMScheduler`` / ``PNDMScheduler`` driven with the same timesteps, the DOP853 reference solution of the
Gaussian-mixture ODE for measured orders, and the exact output law of the stochastic samplers on a Gaussian.
"""
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.samplers import baselines, sample_dpmpp_2m
from dpm_solver_nodes.samplers.baselines import sample_consistency, sample_ddim, sample_ddpm, sample_pndm
from dpm_solver_nodes.samplers.schedule import noise_schedule

import kdiffusion_reference

MIXTURE = GaussianMixture.random(dim=8, components=5, seed=0)
KINDS = ("eps", "flow")


def logsnr_sigmas(steps, sigma_max, sigma_min, model_kind):
    schedule = noise_schedule(model_kind)
    lam = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), steps + 1, dtype=torch.float64)
    return schedule.sigma_from_lambda(lam)


def rho_uniform_sigmas(steps, sigma_max, sigma_min, model_kind):
    """Sigmas equally spaced in rho = sigma / alpha = e^{-lambda}, PNDM's equally spaced steps."""
    schedule = noise_schedule(model_kind)
    rho = torch.linspace(math.exp(-schedule.lambda_(sigma_max)), math.exp(-schedule.lambda_(sigma_min)), steps + 1,
                         dtype=torch.float64)
    return schedule.sigma_from_lambda(-torch.log(rho))


SIGMA_RANGE = {"eps": (80.0, 0.05), "flow": (0.99, 0.05)}


def start_latent(model_kind, batch=32, seed=1):
    scale = SIGMA_RANGE[model_kind][0] if model_kind == "eps" else 1.0
    return sample_noise(batch, (MIXTURE.dim,), seed=seed) * scale


def median_error(out, ref):
    return (out - ref).flatten(1).norm(dim=1).median().item()


def measured_orders(sampler, model_kind, steps, grid=logsnr_sigmas, **options):
    sigma_max, sigma_min = SIGMA_RANGE[model_kind]
    model = MIXTURE.denoiser(model_kind)
    x = start_latent(model_kind)
    ref = reference_solution(model, x, sigma_max, sigma_min, model_kind)
    errors = [median_error(sampler(model, x, grid(n, sigma_max, sigma_min, model_kind), model_kind=model_kind,
                                   disable=True, **options), ref) for n in steps]
    return errors, [math.log2(errors[k] / errors[k + 1]) for k in range(len(steps) - 1)]


# ---------------------------------------------------------------------------------------------------------------
# DDIM is the first-order exponential-integrator step
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", KINDS)
def test_ddim_step_is_hand_formula_and_dpmpp_first_order_step(model_kind):
    model = MIXTURE.denoiser(model_kind)
    sigmas = torch.tensor([0.9, 0.6] if model_kind == "flow" else [5.0, 2.0], dtype=torch.float64)
    x = start_latent(model_kind, batch=4) * float(sigmas[0])
    s, t = float(sigmas[0]), float(sigmas[1])
    alpha_s, alpha_t = (1 - s, 1 - t) if model_kind == "flow" else (1.0, 1.0)
    denoised = model(x, torch.full((4,), s, dtype=torch.float64))
    eps = (x - alpha_s * denoised) / s
    hand = alpha_t * denoised + t * eps  # DDIM Eq. 12 with sigma_eta = 0
    ours = sample_ddim(model, x, sigmas, model_kind=model_kind, disable=True)
    dpmpp = sample_dpmpp_2m(model, x, sigmas, model_kind=model_kind, disable=True)  # one step: first order
    torch.testing.assert_close(ours, hand, rtol=1e-13, atol=1e-13)
    assert torch.equal(ours, dpmpp)


def test_ddim_eps_equals_kdiffusion_euler():
    k_sampling = kdiffusion_reference.load()
    model = MIXTURE.denoiser("eps")
    sigmas = k_sampling.get_sigmas_karras(12, 0.03, 80.0, device="cpu").to(torch.float64)
    x = start_latent("eps", batch=8)
    ours = sample_ddim(model, x, sigmas, disable=True)
    theirs = k_sampling.sample_euler(model, x, sigmas, disable=True)
    assert (ours - theirs).abs().max().item() <= 1e-12 * theirs.abs().max().item()


@pytest.mark.parametrize("model_kind", KINDS)
def test_ddpm_is_ddim_with_eta_one(model_kind):
    model = MIXTURE.denoiser(model_kind)
    sigmas = logsnr_sigmas(8, *SIGMA_RANGE[model_kind], model_kind)
    x = start_latent(model_kind, batch=4)
    a = sample_ddpm(model, x, sigmas, model_kind=model_kind, seed=3, disable=True)
    b = sample_ddim(model, x, sigmas, model_kind=model_kind, eta=1.0, seed=3, disable=True)
    c = sample_ddim(model, x, sigmas, model_kind=model_kind, eta=1.0, seed=4, disable=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------------------------
# Measured convergence orders on the Gaussian mixture (median per-sample error vs DOP853 at 1e-12)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", KINDS)
def test_ddim_is_first_order(model_kind):
    # Measured: eps 1.02 / 1.02 / 1.00, flow 1.02 / 0.99 / 1.01 at 16 -> 128 steps.
    _, orders = measured_orders(sample_ddim, model_kind, [16, 32, 64, 128])
    assert all(abs(p - 1) < 0.15 for p in orders), orders


@pytest.mark.parametrize("model_kind", KINDS)
@pytest.mark.parametrize("method", ["f-pndm", "plms"])
def test_pndm_fourth_order_with_variable_weights(model_kind, method):
    # The pseudo methods are classical RK4 / Adams-Bashforth in rho (see baselines._PseudoStepper), so their local
    # error is O(delta^5).  Measured (eps, f-pndm): 3.76 / 3.90 / 3.94 from 64 to 512 steps: the order approaches
    # 4 from below as the steps shrink (the O(delta^5) term dominates only past ~100 steps on this stiff range,
    # sigma 80 -> 0.05).  We assert the finest pair within 4 +- 0.3 and every pair above 3.5.
    _, orders = measured_orders(sample_pndm, model_kind, [64, 128, 256, 512], method=method)
    assert abs(orders[-1] - 4) < 0.3, orders
    assert min(orders) > 3.5, orders


@pytest.mark.parametrize("model_kind", KINDS)
def test_s_pndm_second_order(model_kind):
    # Measured (eps): 1.74 / 1.86 / 1.93 from 16 to 128 steps; 1.96 / 1.98 / 1.99 from 32 to 256.
    _, orders = measured_orders(sample_pndm, model_kind, [32, 64, 128, 256], method="s-pndm")
    assert all(abs(p - 2) < 0.3 for p in orders), orders
    assert abs(orders[-1] - 2) < 0.1, orders


def test_pndm_uniform_weights_are_second_order_off_an_equally_spaced_grid():
    """PNDM's fixed 55/-59/37/-9 weights assume equally spaced steps.  On logSNR-uniform sigmas (not equally spaced
    in rho) the mean eps they form is off by O(delta^2), so F-PNDM is second order there (measured 1.88 / 1.94 /
    2.02 / 2.00 at 32 -> 512 steps), which is why ``step_weights="variable"`` is the default."""
    _, orders = measured_orders(sample_pndm, "eps", [64, 128, 256], step_weights="uniform")
    assert all(abs(p - 2) < 0.15 for p in orders), orders


@pytest.mark.parametrize("method", ["f-pndm", "s-pndm", "plms"])
def test_pndm_variable_weights_reduce_to_paper_weights_on_equally_spaced_steps(method):
    model = MIXTURE.denoiser("eps")
    sigmas = rho_uniform_sigmas(20, 10.0, 0.1, "eps")
    x = start_latent("eps", batch=4) / 8
    variable = sample_pndm(model, x, sigmas, method=method, disable=True)
    uniform = sample_pndm(model, x, sigmas, method=method, step_weights="uniform", disable=True)
    torch.testing.assert_close(variable, uniform, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic samplers: the exact output law on a Gaussian
# ---------------------------------------------------------------------------------------------------------------

GAUSSIAN = GaussianMixture(torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.3, 1.0, 0.05]]))


def stochastic_sigmas(steps, model_kind):
    """Exact start (eps: sigma 20, flow: sigma 1), logSNR-uniform middle, trailing 0."""
    zero = torch.zeros(1, dtype=torch.float64)
    if model_kind == "eps":
        return torch.cat([logsnr_sigmas(steps - 1, 20.0, 0.02, "eps"), zero])
    return torch.cat([torch.ones(1, dtype=torch.float64), logsnr_sigmas(steps - 2, 0.98, 0.02, "flow"), zero])


def exact_output_law(sampler, model_kind, sigmas, **options):
    """Mean and variance of the sampler's output when x ~ p(x at sigmas[0]) exactly.

    With one Gaussian the denoiser is affine per coordinate, so the output is affine in the start latent and the
    noise draws: out = c + A x_T + sum_k B_k z_k.  Batch row 0 gives c (+ A mean), row 1 the response to a unit
    change of x_T, row k + 2 the response to a unit draw at step k (the noise sampler puts a 1 there).
    """
    steps, dim = len(sigmas) - 1, GAUSSIAN.dim
    base = GAUSSIAN.means[0] if model_kind == "eps" else torch.zeros(dim, dtype=torch.float64)
    x = base.repeat(steps + 2, 1)
    x[1] += 1.0
    draws = []

    def probe_noise(sigma_s, sigma_t):
        z = torch.zeros(steps + 2, dim, dtype=torch.float64)
        z[len(draws) + 2] = 1.0
        draws.append((sigma_s, sigma_t))
        return z

    out = sampler(GAUSSIAN.denoiser(model_kind), x, sigmas, model_kind=model_kind, noise_sampler=probe_noise,
                  disable=True, **options)
    start_variance = GAUSSIAN.variances[0] + sigmas[0] ** 2 if model_kind == "eps" else torch.ones(dim)
    variance = (out[1] - out[0]) ** 2 * start_variance + ((out[2:] - out[0]) ** 2).sum(0)
    return out[0], variance, len(draws)


@pytest.mark.parametrize("model_kind", KINDS)
@pytest.mark.parametrize("sampler, options", [(sample_ddpm, {}), (sample_ddim, {"eta": 0.5}), (sample_ddim, {})])
def test_stochastic_samplers_converge_weakly_to_the_data_law(model_kind, sampler, options):
    """The mean is exact; the variance deficit vanishes at weak order 1 (measured 0.90 / 0.95 / 0.97 / 0.99 for
    DDPM, 0.94 ... 0.99 for eta = 0.5, 0.98 ... 1.00 for eta = 0 from 25 to 400 steps).  The target variance
    v^2 / (v + sigma_min^2) is the exact law after the final denoising step from sigma_min = 0.02."""
    v = GAUSSIAN.variances[0]
    sigma_min = 0.02 if model_kind == "eps" else 0.02 / 0.98  # in eps coordinates
    target = v * v / (v + sigma_min ** 2)
    deficits = []
    for steps in (50, 100, 200, 400):
        mean, variance, draws = exact_output_law(sampler, model_kind, stochastic_sigmas(steps, model_kind),
                                                 **options)
        torch.testing.assert_close(mean, GAUSSIAN.means[0], rtol=0, atol=1e-12)
        eta = 1.0 if sampler is sample_ddpm else options.get("eta", 0.0)
        assert draws == (steps - 1 if eta > 0 else 0)  # one draw per step, none into sigma = 0
        deficits.append((1 - variance / target).abs().max().item())
    orders = [math.log2(deficits[k] / deficits[k + 1]) for k in range(len(deficits) - 1)]
    assert all(abs(p - 1) < 0.15 for p in orders), (deficits, orders)
    assert deficits[-1] < 0.025


@pytest.mark.parametrize("sampler, options", [(sample_ddpm, {}), (sample_ddim, {"eta": 0.7})])
def test_stochastic_samples_match_the_exact_law_within_monte_carlo_error(sampler, options):
    steps, batch = 40, 4000
    sigmas = stochastic_sigmas(steps, "eps")
    mean, variance, _ = exact_output_law(sampler, "eps", sigmas, **options)
    x = GAUSSIAN.means[0] + (GAUSSIAN.variances[0] + sigmas[0] ** 2).sqrt() * sample_noise(batch, (3,), seed=11)
    out = sampler(GAUSSIAN.denoiser("eps"), x, sigmas, seed=12, disable=True, **options)
    # 5 standard errors: mean se = sqrt(var / n), variance se = var * sqrt(2 / (n - 1)) for a Gaussian.
    assert ((out.mean(0) - mean).abs() < 5 * (variance / batch).sqrt()).all()
    assert ((out.var(0) - variance).abs() < 5 * variance * math.sqrt(2 / (batch - 1))).all()


# ---------------------------------------------------------------------------------------------------------------
# Consistency sampling
# ---------------------------------------------------------------------------------------------------------------

def point_mass_model(point):
    """The exact denoiser of a point mass at ``point``: D(x, sigma) = point."""
    def model(x, sigma, **_):
        return point.expand_as(x).to(x.dtype)
    return model


@pytest.mark.parametrize("model_kind", KINDS)
def test_consistency_returns_the_point_of_a_point_mass(model_kind):
    point = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.1, 0.0] if model_kind == "flow" else [80.0, 10.0, 1.0, 0.1, 0.0],
                          dtype=torch.float64)
    seen = []
    x = sample_noise(256, (3,), seed=2) * float(sigmas[0])
    out = sample_consistency(point_mass_model(point), x, sigmas, model_kind=model_kind, seed=5,
                             callback=seen.append, disable=True)
    assert torch.equal(out, point.expand_as(out))
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    # Between steps x is the re-noised point alpha c + sigma z with fresh standard normal z.
    for d in seen[1:]:
        s = float(d["sigma"])
        alpha = 1 - s if model_kind == "flow" else 1.0
        z = (d["x"] - alpha * point) / s
        assert abs(z.mean().item()) < 5 / math.sqrt(z.numel()) and abs(z.std().item() - 1) < 0.05
    zs = [(d["x"] - (1 - float(d["sigma"]) if model_kind == "flow" else 1.0) * point) / float(d["sigma"])
          for d in seen[1:]]
    assert abs(torch.corrcoef(torch.stack([zs[0].flatten(), zs[1].flatten()]))[0, 1].item()) < 0.1  # fresh noise


def test_consistency_without_trailing_zero_ends_noised():
    point = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sigmas = torch.tensor([80.0, 1.0, 0.2], dtype=torch.float64)
    out = sample_consistency(point_mass_model(point), torch.zeros(2048, 3, dtype=torch.float64), sigmas,
                             seed=1, disable=True)
    z = (out - point) / 0.2
    assert abs(z.std().item() - 1) < 0.05
    stop = sample_consistency(point_mass_model(point), torch.zeros(4, 3, dtype=torch.float64),
                              torch.tensor([80.0, 1.0, 0.0]), final_step="stop", seed=1, disable=True)
    assert not torch.allclose(stop, point.expand_as(stop))


# ---------------------------------------------------------------------------------------------------------------
# diffusers 0.42.1 on identical inputs
# ---------------------------------------------------------------------------------------------------------------

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1)


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the named peer for DDIM/PNDM")


def _sigma(alphas_cumprod):
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt().item()


def _run_diffusers(scheduler, x, **step_kwargs):
    """Drive a diffusers scheduler with the mixture's eps in VP coordinates: x_k = x_VP / sqrt(acp)."""
    model = MIXTURE.denoiser("eps")
    acp = scheduler.alphas_cumprod
    for k, t in enumerate(scheduler.timesteps):
        a = acp[int(t)].to(torch.float64)
        sigma = ((1 - a) / a).sqrt()
        x_k = x / a.sqrt()
        eps = (x_k - model(x_k, sigma.expand(x.shape[0]))) / sigma
        kwargs = {key: (value[k] if key == "variance_noise" else value) for key, value in step_kwargs.items()}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def _host_sigmas(scheduler, timesteps):
    return torch.tensor([_sigma(scheduler.alphas_cumprod[int(t)]) for t in timesteps]
                        + [_sigma(scheduler.final_alpha_cumprod)], dtype=torch.float64)


def _relative(ours_vp, theirs):
    return ((ours_vp - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(eta):
    diffusers = _diffusers()
    scheduler = diffusers.DDIMScheduler(clip_sample=False, **SD_CONFIG)
    scheduler.set_timesteps(10)
    z = sample_noise(16, (8,), seed=3)
    draws = [sample_noise(16, (8,), seed=100 + k) for k in range(10)]
    theirs = _run_diffusers(scheduler, z.clone(), eta=eta, **({"variance_noise": draws} if eta else {}))
    sigmas = _host_sigmas(scheduler, scheduler.timesteps)
    supply = iter(draws)
    ours = sample_ddim(MIXTURE.denoiser("eps"), z * math.sqrt(1 + sigmas[0] ** 2), sigmas, eta=eta,
                       noise_sampler=lambda s, t: next(supply), disable=True)
    # diffusers keeps alphas_cumprod and its coefficients in float32: measured 3.5e-8 (eta 0), 6.9e-8 (eta 0.7).
    assert _relative(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < 1e-5


def test_plms_matches_diffusers_pndm_without_prk_steps():
    diffusers = _diffusers()
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **SD_CONFIG)
    scheduler.set_timesteps(10)
    z = sample_noise(16, (8,), seed=3)
    theirs = _run_diffusers(scheduler, z.clone())
    sigmas = _host_sigmas(scheduler, scheduler._timesteps[::-1])
    x = z * math.sqrt(1 + sigmas[0] ** 2)
    ours = sample_pndm(MIXTURE.denoiser("eps"), x, sigmas, method="plms", step_weights="uniform", disable=True)
    assert _relative(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < 1e-5  # measured 4.9e-8
    # diffusers' timesteps are equally spaced in t, not in rho, so the variable weights differ (measured 3.3e-2).
    variable = sample_pndm(MIXTURE.denoiser("eps"), x, sigmas, method="plms", disable=True)
    assert _relative(variable / math.sqrt(1 + sigmas[-1] ** 2), theirs) > 1e-3


def test_f_pndm_matches_diffusers_prk_given_its_midpoints(monkeypatch):
    """diffusers evaluates the RK4 midpoint at timestep t - 50 (half a step in t); from sigmas alone we place it
    halfway in rho, so the two differ (measured 1.5e-2 relative after 10 steps).  With diffusers' midpoint sigmas
    substituted, everything else (RK4 weights, transfer, PLMS phase) agrees to float32 precision."""
    diffusers = _diffusers()
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=False, **SD_CONFIG)
    scheduler.set_timesteps(10)
    z = sample_noise(16, (8,), seed=3)
    theirs = _run_diffusers(scheduler, z.clone())
    timesteps = list(scheduler._timesteps[::-1])
    sigmas = _host_sigmas(scheduler, timesteps)
    x = z * math.sqrt(1 + sigmas[0] ** 2)
    model = MIXTURE.denoiser("eps")
    rho_midpoints = sample_pndm(model, x, sigmas, method="f-pndm", step_weights="uniform", disable=True)
    assert 1e-3 < _relative(rho_midpoints / math.sqrt(1 + sigmas[-1] ** 2), theirs) < 5e-2
    monkeypatch.setattr(baselines._PseudoStepper, "rho_midpoint",
                        lambda self, i: _sigma(scheduler.alphas_cumprod[int(timesteps[i]) - 50]))
    ours = sample_pndm(model, x, sigmas, method="f-pndm", step_weights="uniform", disable=True)
    assert _relative(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < 1e-5  # measured 4.5e-8


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: NFE, callback, flow start at sigma = 1, trailing zero, bad options
# ---------------------------------------------------------------------------------------------------------------

def counting(model):
    calls = []

    def wrapped(x, sigma, **extra):
        calls.append(float(sigma[0]))
        return model(x, sigma, **extra)

    return wrapped, calls


@pytest.mark.parametrize("method, extra", [("f-pndm", 9), ("s-pndm", 1), ("plms", 1)])
def test_pndm_model_calls(method, extra):
    model, calls = counting(MIXTURE.denoiser("eps"))
    steps = 10
    sample_pndm(model, start_latent("eps", 2), logsnr_sigmas(steps, 80.0, 0.05, "eps"), method=method, disable=True)
    assert len(calls) == steps + extra


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm, sample_consistency])
def test_one_model_call_per_step(sampler):
    model, calls = counting(MIXTURE.denoiser("eps"))
    sampler(model, start_latent("eps", 2), logsnr_sigmas(7, 80.0, 0.05, "eps"), seed=0, disable=True)
    assert len(calls) == 7


@pytest.mark.parametrize("sampler, options", [
    (sample_ddim, {}), (sample_ddim, {"eta": 1.0}), (sample_ddpm, {}), (sample_consistency, {}),
    (sample_pndm, {"method": "f-pndm"}), (sample_pndm, {"method": "s-pndm"}), (sample_pndm, {"method": "plms"})])
@pytest.mark.parametrize("model_kind", KINDS)
def test_trailing_zero_callback_and_flow_start(sampler, options, model_kind):
    model = MIXTURE.denoiser(model_kind)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    if model_kind == "flow":
        sigmas = torch.cat([one, logsnr_sigmas(22, 0.95, 0.05, "flow"), zero])
    else:
        sigmas = torch.cat([logsnr_sigmas(23, 80.0, 0.05, "eps"), zero])
    seen = []
    x = start_latent(model_kind, 4) if model_kind == "eps" else sample_noise(4, (8,), seed=1)
    seed = {} if sampler is sample_pndm else {"seed": 0}
    out = sampler(model, x, sigmas, model_kind=model_kind, callback=seen.append, disable=True, **seed, **options)
    assert torch.isfinite(out).all()
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 1))
    assert set(seen[0]) >= {"x", "i", "sigma", "sigma_hat", "denoised"}
    # With a trailing 0 the result is a denoised prediction: close to the ODE solution for the ODE samplers.
    ref = reference_solution(model, x, float(sigmas[0]), 0.0, model_kind)
    # Measured (eps / flow, 23 steps): DDIM 0.168 / 0.147, F-PNDM 0.016 / 0.015, PLMS 0.016 / 0.016,
    # S-PNDM 0.050 / 0.042; bounds at 1.5x.
    bound = {"f-pndm": 0.025, "plms": 0.025, "s-pndm": 0.075}.get(options.get("method"), 0.25)
    if sampler in (sample_pndm, sample_ddim) and options.get("eta", 0) == 0:
        assert median_error(out, ref) < bound


@pytest.mark.parametrize("call", [
    lambda m, x, s: sample_ddim(m, x, s, eta=-0.1),
    lambda m, x, s: sample_ddim(m, x, s, eta=float("nan")),
    lambda m, x, s: sample_ddim(m, x, s, s_noise=-1.0),
    lambda m, x, s: sample_ddpm(m, x, s, s_noise="1"),
    lambda m, x, s: sample_pndm(m, x, s, method="pndm4"),
    lambda m, x, s: sample_pndm(m, x, s, step_weights="fixed"),
    lambda m, x, s: sample_consistency(m, x, s, model_kind="v"),
    lambda m, x, s: sample_ddim(m, x, s, final_step="last"),
    lambda m, x, s: sample_pndm(m, x, s.flip(0)),
])
def test_bad_options_raise_value_error(call):
    with pytest.raises(ValueError):
        call(MIXTURE.denoiser("eps"), start_latent("eps", 2), logsnr_sigmas(4, 80.0, 0.05, "eps"))


def test_error_messages_name_the_option():
    with pytest.raises(ValueError, match="method"):
        sample_pndm(MIXTURE.denoiser("eps"), start_latent("eps", 2), logsnr_sigmas(4, 80.0, 0.05, "eps"),
                    method="x")
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(MIXTURE.denoiser("eps"), start_latent("eps", 2), logsnr_sigmas(4, 80.0, 0.05, "eps"), eta=-1)


@pytest.mark.parametrize("model_kind", KINDS)
def test_ddim_eta_above_one_is_capped_at_consistency_sampling(model_kind):
    """sigma_eta is capped at sigma_t, where the DDIM step is x_t = alpha_t D + sigma_t z: the consistency step."""
    model = MIXTURE.denoiser(model_kind)
    sigmas = torch.cat([logsnr_sigmas(6, *SIGMA_RANGE[model_kind], model_kind), torch.zeros(1, dtype=torch.float64)])
    x = start_latent(model_kind, batch=4)
    capped = sample_ddim(model, x, sigmas, model_kind=model_kind, eta=1e4, seed=3, disable=True)
    consistency = sample_consistency(model, x, sigmas, model_kind=model_kind, seed=3, disable=True)
    torch.testing.assert_close(capped, consistency, rtol=1e-12, atol=1e-12)


def test_s_noise_scales_only_the_added_noise():
    model = MIXTURE.denoiser("eps")
    sigmas = logsnr_sigmas(6, 80.0, 0.05, "eps")
    x = start_latent("eps", batch=4)
    quiet = [sample_ddim(model, x, sigmas, eta=0.5, s_noise=0.0, seed=s, disable=True) for s in (1, 2)]
    assert torch.equal(quiet[0], quiet[1])
    assert not torch.allclose(quiet[0], sample_ddim(model, x, sigmas, disable=True))  # sigma_down < sigma_t
    draws = [sample_noise(4, (8,), seed=20 + k) for k in range(6)]
    half = iter([d * 0.5 for d in draws])
    full = iter(draws)
    torch.testing.assert_close(
        sample_ddim(model, x, sigmas, eta=0.5, s_noise=0.5, noise_sampler=lambda s, t: next(full), disable=True),
        sample_ddim(model, x, sigmas, eta=0.5, noise_sampler=lambda s, t: next(half), disable=True),
        rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 3e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("sampler, options", [(sample_ddim, {}), (sample_pndm, {}), (sample_ddpm, {"seed": 1}),
                                              (sample_consistency, {"seed": 1})])
def test_half_precision_latents(dtype, tolerance, sampler, options):
    model = MIXTURE.denoiser("eps")
    sigmas = torch.cat([logsnr_sigmas(14, 14.6, 0.05, "eps"), torch.zeros(1, dtype=torch.float64)]).float()
    x = (sample_noise(16, (8,), seed=10) * 14.6).float()
    full = sampler(model, x, sigmas, disable=True, **options)
    half = sampler(model, x.to(dtype), sigmas, disable=True, **options)
    assert half.dtype == dtype and torch.isfinite(half).all()
    # Measured fp16 / bf16: DDIM 7.5e-4 / 3.7e-3, PNDM 1.8e-3 / 1.0e-2 (eps taken at the rounded latent the model
    # saw; at the unrounded one 3.5e-3 / 1.4e-2), DDPM 6.2e-4 / 4.3e-3, consistency 9.2e-4 / 4.9e-3.
    assert ((half.float() - full).abs().max() / full.abs().max()).item() < tolerance
