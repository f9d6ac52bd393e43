"""SDE solvers (samplers/sde.py) and their noise (samplers/exponential.py, "Noise"): parity with PyPI k-diffusion on
identical inputs and noise, a pinned difference for the 3M SDE, measured strong orders on one Brownian path, batch
independence, eta = 0 against the ODE solvers, flow starts at sigma = 1, half precision and option checks.

Float64 Gaussian mixture (dim 8) throughout; k-diffusion is the real PyPI package (tests/kdiffusion_reference.py).
"""
import math

import pytest
import torch

from dpm_solver_nodes.analytic import GaussianMixture, sample_noise
from dpm_solver_nodes.samplers import dpmpp, sde
from dpm_solver_nodes.samplers.common import SamplerRun
from dpm_solver_nodes.samplers.exponential import taylor_derivatives
from dpm_solver_nodes.samplers.noise import GaussianNoise, TorchsdeBrownianNoise, make_noise
from kdiffusion_reference import load

# k-diffusion's tree sampler queries at float32 sigmas just outside torchsde's 6-decimal-rounded ends; torchsde warns
# and clamps (our BrownianNoise clamps first, without the warning).
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

MIXTURE = GaussianMixture.random(dim=8, seed=0)
SDE_SAMPLERS = [sde.sample_dpm_solver_sde_1, sde.sample_dpmpp_sde_1, sde.sample_dpm_solver_sde_2m,
                sde.sample_dpmpp_2m_sde, sde.sample_dpmpp_3m_sde]
MULTISTEP = (sde.sample_dpm_solver_sde_2m, sde.sample_dpmpp_2m_sde, sde.sample_dpmpp_3m_sde)


def karras(n, sigma_min=0.03, sigma_max=10.0, rho=7.0, zero=True):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]) if zero else s


def start(batch, sigma, seed=1):
    return sample_noise(batch, (8,), seed=seed) * sigma


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def kd_brownian(x, sigmas, seeds):
    positive = sigmas[sigmas > 0]
    return load().BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=seeds)


class BrownianPath:
    """An exact Brownian path in time sigma, sampled on a fine grid; increments between grid points are exact.

    Coarse runs use sub-grids (grid[::k]), so every run sees one path.  Same convention as the samplers' noise
    sources: (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|).  Cheap enough for 2048-step references, which
    torchsde's tree (about 1 ms per query here) is not.
    """

    def __init__(self, grid, batch, seed):
        self.grid = grid.tolist()
        self.index = {v: j for j, v in enumerate(self.grid)}
        steps = torch.randn(len(grid) - 1, batch, 8, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
        increments = steps * (grid[:-1] - grid[1:]).sqrt()[:, None, None]
        self.w = torch.cat([torch.zeros(1, batch, 8, dtype=torch.float64), increments.cumsum(0)])

    def __call__(self, sigma, sigma_next):
        i, j = self.index[float(sigma)], self.index[float(sigma_next)]
        return (self.w[j] - self.w[i]) / math.sqrt(abs(self.grid[j] - self.grid[i]))


# ----------------------------------------------------------------------------------------------------------------
# Noise sources
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brownian_noise_reproduces_kdiffusion_tree_sampler(dtype):
    """noise_type="brownian_tree": our per-sample trees give k-diffusion's BrownianTreeNoiseSampler(seed=[list]) increments, sign included, for
    int seed s (samples get s, s+1, ...) and for a list, on float32 host sigmas and arbitrary sub-intervals."""
    sigmas = karras(8).to(torch.float32)
    x = torch.zeros(3, 4, 2, 2, dtype=dtype)
    positive = sigmas[sigmas > 0].to(torch.float64)
    reference = kd_brownian(x, sigmas, [11, 12, 13])
    for seed in (11, [11, 12, 13]):
        ours = make_noise(x, sigmas, None, "brownian_tree", seed=seed)
        assert isinstance(ours, TorchsdeBrownianNoise)
        for i in range(len(positive) - 1):
            a, b = reference(sigmas[i], sigmas[i + 1]), ours(positive[i].item(), positive[i + 1].item())
            assert b.dtype == dtype and b.shape == x.shape
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # reversed direction flips the sign; an interval not on the step grid matches too
    torch.testing.assert_close(ours(0.5, 2.0), reference(torch.tensor(0.5), torch.tensor(2.0)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(2.0, 0.5), -ours(0.5, 2.0))


def test_noise_sources_are_standard_normal_and_per_sample():
    x = torch.zeros(2, 4096, dtype=torch.float64)
    for noise in (make_noise(x, karras(4), {"seed": 3}, "brownian"), make_noise(x, karras(4), {"seed": 3}, "gaussian")):
        z = noise(5.0, 1.0)
        assert abs(z.mean().item()) < 0.06 and abs(z.std().item() - 1) < 0.04
        assert not torch.allclose(z[0], z[1])  # samples draw from different seeds
    one = GaussianNoise(x[:1], [4])(1.0, 0.5)
    torch.testing.assert_close(make_noise(x, karras(4), None, "gaussian", seed=3)(1.0, 0.5)[1:], one)


# ----------------------------------------------------------------------------------------------------------------
# Parity with k-diffusion
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.6, 0.8)])
def test_2m_sde_matches_kdiffusion(solver_type, eta, s_noise):
    kd = load()
    model, sigmas = MIXTURE.denoiser("eps"), karras(12)
    x = start(3, 10.0)
    seeds = [21, 22, 23]
    reference = kd.sample_dpmpp_2m_sde(model, x, sigmas, eta=eta, s_noise=s_noise, solver_type=solver_type,
                                       noise_sampler=kd_brownian(x, sigmas, seeds), disable=True)
    options = dict(eta=eta, s_noise=s_noise, solver_type=solver_type, lower_order_final=False)
    shared = sde.sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, seeds), **options)
    own = sde.sample_dpmpp_2m_sde(model, x, sigmas, seed=21, noise_type="brownian_tree", **options)
    assert relative(shared, reference) < 1e-5
    assert relative(own, reference) < 1e-5  # our own torchsde trees, seeds 21, 22, 23


DIFFUSERS_CASES = [("sde-dpmsolver", 2, "midpoint", sde.sample_dpm_solver_sde_2m),
                   ("sde-dpmsolver", 2, "heun", sde.sample_dpm_solver_sde_2m),
                   ("sde-dpmsolver", 1, "midpoint", sde.sample_dpm_solver_sde_1),
                   ("sde-dpmsolver++", 2, "midpoint", sde.sample_dpmpp_2m_sde),
                   ("sde-dpmsolver++", 2, "heun", sde.sample_dpmpp_2m_sde),
                   ("sde-dpmsolver++", 1, "midpoint", sde.sample_dpmpp_sde_1)]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates "sde-dpmsolver" (still the peer)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 notice
@pytest.mark.parametrize("algorithm_type,order,solver_type,sampler", DIFFUSERS_CASES,
                         ids=[f"{a}-{o}-{t}" for a, o, t, _ in DIFFUSERS_CASES])
def test_matches_diffusers_dpmsolver_multistep_sde(algorithm_type, order, solver_type, sampler):
    """diffusers' DPMSolverMultistepScheduler (VP, SD's scaled-linear betas, 15 steps, final sigma_min) with the
    same per-step noise (variance_noise): the noise-prediction solvers against "sde-dpmsolver", the data-prediction
    ones against "sde-dpmsolver++".  diffusers works in VP coordinates x_vp = x / sqrt(1 + sigma^2) and float32.
    The noise-prediction solvers run with guard=False (the paper's step everywhere): their guard takes this
    schedule's last step (h = 2.2, unstable in the noise form) in the data form."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, algorithm_type=algorithm_type,
        solver_order=order, solver_type=solver_type, prediction_type="sample", final_sigmas_type="sigma_min",
        lower_order_final=False)
    scheduler.set_timesteps(15)
    sigmas = scheduler.sigmas.double()
    steps = len(scheduler.timesteps)
    noise = sample_noise(3 * steps, (8,), seed=4).reshape(steps, 3, 8)
    x = start(3, sigmas[0].item())
    sample = x / (1 + sigmas[0] ** 2).sqrt()
    for i, timestep in enumerate(scheduler.timesteps):
        denoised = MIXTURE.denoise(sample * (1 + sigmas[i] ** 2).sqrt(), sigmas[i].expand(3))
        sample = scheduler.step(denoised, timestep, sample, variance_noise=noise[i]).prev_sample
    reference = sample * (1 + sigmas[-1] ** 2).sqrt()
    index = {v: j for j, v in enumerate(sigmas.tolist())}
    options = dict(lower_order_final=False, solver_type=solver_type) if order == 2 else {}
    if algorithm_type == "sde-dpmsolver":
        options["guard"] = False
    ours = sampler(MIXTURE.denoiser("eps"), x, sigmas, noise_sampler=lambda s, _: noise[index[float(s)]], **options)
    assert relative(ours, reference) < 2e-6


# ----------------------------------------------------------------------------------------------------------------
# The noise-prediction solvers' guard: unstable noise-form steps are taken in the data form
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_noise_form_excess_is_the_measured_variance_of_the_unguarded_step(eta):
    """On the point mass D = 0, y = x / sigma is exactly N(0, 1) at every sigma.  Measured on the samplers (64000
    values): the variance of y after SDE-DPM-Solver-1's step (guard=False) from exact y is 1 + ``noise_form_excess``
    within 5 standard errors; at eta = 1 the excess passes the guard's 0.25 between h = 0.2 and 0.4."""
    zero = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    draws = torch.Generator().manual_seed(5)
    x = torch.randn(8000, 8, generator=draws, dtype=torch.float64) * 10.0
    noise = lambda sigma, sigma_next: torch.randn(8000, 8, generator=draws, dtype=torch.float64)  # noqa: E731
    for h in (0.2, 0.4):
        sigmas = torch.tensor([10.0, 10.0 * math.exp(-h)], dtype=torch.float64)
        y = sde.sample_dpm_solver_sde_1(zero, x, sigmas, eta=eta, noise_sampler=noise, guard=False) / sigmas[-1]
        expected = 1 + sde.noise_form_excess(h, eta)
        assert abs(y.var().item() - expected) < 5 * expected * math.sqrt(2 / y.numel()), (h, y.var(), expected)
        if eta == 1.0:
            assert (expected - 1 > sde.NOISE_FORM_MAX_EXCESS) == (h > 0.3)


def test_guard_takes_coarse_steps_in_the_data_form():
    """6 logSNR-uniform steps, h = 1.16 (the noise form's excess noise far above the guard's 0.25 at every step): the
    guarded SDE-DPM-Solver-2M and -1 are the data-prediction
    SDE-DPM-Solver++(2M) and ++1 on the same noise, and differ from the unguarded ones; at 40 steps (h = 0.15,
    excess 0.05) the guard changes nothing."""
    model = MIXTURE.denoiser("eps")
    x = start(3, 10.0)

    def logsnr(n):
        lam = torch.linspace(-math.log(10.0), -math.log(0.03), n, dtype=torch.float64)
        return torch.cat([torch.exp(-lam), torch.zeros(1, dtype=torch.float64)])

    noise = dict(seed=[11, 12, 13], noise_type="gaussian")
    for noise_form, data_form, n in ((sde.sample_dpm_solver_sde_2m, sde.sample_dpmpp_2m_sde, 6),
                                     (sde.sample_dpm_solver_sde_1, sde.sample_dpmpp_sde_1, 6)):
        guarded = noise_form(model, x, logsnr(n), **noise)
        torch.testing.assert_close(guarded, data_form(model, x, logsnr(n), **noise), rtol=1e-12, atol=1e-12)
        assert relative(guarded, noise_form(model, x, logsnr(n), guard=False, **noise)) > 1e-2
        torch.testing.assert_close(noise_form(model, x, logsnr(40), **noise),
                                   noise_form(model, x, logsnr(40), guard=False, **noise), rtol=0, atol=0)


def _kd_3m_correction(h, h_1, h_2, denoised, denoised_1, denoised_2, eta=1.0):
    """The term k-diffusion's 3M SDE is missing, computed with its own formulas: -phi_3 * d2, i.e. a second copy of
    its D'' term (it weights d2 = h^2 D''/2 where the Taylor expansion has h^2 D'')."""
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)
    h_eta = h * (eta + 1)
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    return -phi_3 * d2


def test_3m_sde_equals_kdiffusion_while_only_first_and_second_order_terms_act():
    """Orders 1, 2 and then the step into sigma = 0: the D'' term never acts, so the two agree."""
    kd = load()
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(3), start(3, 10.0)
    reference = kd.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [1, 2, 3]),
                                       disable=True)
    ours = sde.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [1, 2, 3]),
                                   lower_order_final=False)
    assert relative(ours, reference) < 1e-5


def test_3m_sde_differs_from_kdiffusion_by_exactly_the_missing_half_of_the_second_derivative_term():
    """Pin 1 (public API): the Taylor form's warm-up is the paper's 2M SDE step (midpoint), so its first two steps are
    ``sample_dpmpp_2m_sde``'s on the same noise; k-diffusion's warm-up takes the Taylor weight (the official form
    keeps it), so they differ from k-diffusion's.  Pin 2 (every step of a 12-step run): from k-diffusion's own state
    and history, our third-order step lands on k-diffusion's next state plus -phi_3 d2, the missing half of the D''
    term (the steps are otherwise the same formula)."""
    kd = load()
    model = MIXTURE.denoiser("eps")
    x = start(3, 10.0)
    sigmas = karras(3, zero=False)
    ours = sde.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [4, 5, 6]),
                                   lower_order_final=False, guard=False, solver_type="taylor")
    two = sde.sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [4, 5, 6]),
                                  lower_order_final=False)
    torch.testing.assert_close(ours, two, rtol=1e-12, atol=1e-12)
    reference = kd.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [4, 5, 6]),
                                       disable=True)
    assert relative(ours, reference) > 1e-6  # a different warm-up: the check can fail

    sigmas = karras(12)
    states, outputs = [], []

    def record(d):
        states.append(d["x"])
        outputs.append(d["denoised"])

    noise = kd_brownian(x, sigmas, [4, 5, 6])
    final = kd.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=noise, callback=record, disable=True)
    states.append(final)
    run = SamplerRun(model, x, sigmas)
    lam = run.table.lam
    checked = 0
    for i in range(2, len(sigmas) - 2):  # third-order steps (the last step goes to sigma = 0)
        lams, values = [lam[i], lam[i - 1], lam[i - 2]], [outputs[i], outputs[i - 1], outputs[i - 2]]
        step = sde._data_sde_step(states[i], run, i, taylor_derivatives(lams, values), 1.0, 1.0,
                                  lambda j: noise(sigmas[j], sigmas[j + 1]))
        correction = _kd_3m_correction(run.table.h[i], run.table.h[i - 1], run.table.h[i - 2], *values)
        torch.testing.assert_close(step, states[i + 1] + correction, rtol=1e-9, atol=1e-9)
        checked += 1
    assert checked == 9


# ----------------------------------------------------------------------------------------------------------------
# Strong convergence on one Brownian path
# ----------------------------------------------------------------------------------------------------------------

def _fine_grid(model_kind, steps, sigma_max, sigma_min):
    if model_kind == "eps":
        return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64))
    lam = torch.linspace(math.log((1 - sigma_max) / sigma_max), math.log((1 - sigma_min) / sigma_min), steps + 1,
                         dtype=torch.float64)
    return torch.sigmoid(-lam)


def _strong_order(sampler, model_kind, options, steps=(16, 32, 64, 128), reference_steps=2048, batch=32):
    """Least-squares slope of log RMS error vs log steps against a 2048-step solution on the same path.

    Start x = data + noise at sigma_max (1 for eps, 0.5 for flow) and stop at sigma = 0.03 (no final denoise), so
    the error measures the SDE solution, not a switch of mixture component from a badly placed start.
    """
    model = MIXTURE.denoiser(model_kind)
    sigma_max, sigma_min = (1.0, 0.03) if model_kind == "eps" else (0.5, 0.03)
    x0 = MIXTURE.sample(batch, generator=torch.Generator().manual_seed(3))
    n = sample_noise(batch, (8,), seed=1)
    x = x0 + sigma_max * n if model_kind == "eps" else (1 - sigma_max) * x0 + sigma_max * n
    grid = _fine_grid(model_kind, reference_steps, sigma_max, sigma_min)
    path = BrownianPath(grid, batch, seed=5)
    reference = sde.sample_dpmpp_2m_sde(model, x, grid, model_kind=model_kind, noise_sampler=path,
                                        solver_type="heun", lower_order_final=False)
    errors = []
    for n_steps in steps:
        y = sampler(model, x, grid[::reference_steps // n_steps], model_kind=model_kind, noise_sampler=path,
                    **options)
        errors.append((y - reference).pow(2).sum(1).mean().sqrt().item())
    design = torch.tensor([[math.log(s), 1.0] for s in steps], dtype=torch.float64)
    target = torch.tensor([[math.log(e)] for e in errors], dtype=torch.float64)
    return -torch.linalg.lstsq(design, target).solution[0, 0].item(), errors


@pytest.mark.parametrize("sampler,model_kind,options", [
    (sde.sample_dpmpp_2m_sde, "eps", dict(solver_type="midpoint", lower_order_final=False)),
    (sde.sample_dpmpp_2m_sde, "eps", dict(solver_type="heun", lower_order_final=False)),
    (sde.sample_dpmpp_3m_sde, "eps", dict(lower_order_final=False)),
    (sde.sample_dpmpp_sde_1, "eps", {}),
    (sde.sample_dpm_solver_sde_2m, "eps", dict(lower_order_final=False)),
    (sde.sample_dpm_solver_sde_1, "eps", {}),
    (sde.sample_dpmpp_2m_sde, "flow", dict(solver_type="midpoint", lower_order_final=False)),
    (sde.sample_dpmpp_3m_sde, "flow", dict(lower_order_final=False)),
    (sde.sample_dpmpp_sde_1, "flow", {}),
], ids=lambda v: getattr(v, "__name__", v if isinstance(v, str) else None))
def test_strong_order_one(sampler, model_kind, options):
    """Additive noise: the noise increments limit every solver to strong order 1, measured as the slope over 32-128
    steps: 0.98-1.06 (from 16 steps the guarded 3M's third-order drift still shows: 1.31-1.49)."""
    order, errors = _strong_order(sampler, model_kind, options, steps=(32, 64, 128))
    assert 0.7 <= order <= 1.3, f"strong order {order:.2f}, errors {errors}"


def test_own_brownian_noise_converges_to_one_path():
    """The production noise (per-sample Brownian bridge paths, seed list) refines one path on nested schedules:
    errors against a 256-step solution fall like 1/steps (a fresh-noise source would not converge at all)."""
    model = MIXTURE.denoiser("eps")
    x0 = MIXTURE.sample(2, generator=torch.Generator().manual_seed(3))
    x = x0 + sample_noise(2, (8,), seed=1)
    grid = _fine_grid("eps", 256, 1.0, 0.03)
    options = dict(seed=[8, 9], lower_order_final=False)
    reference = sde.sample_dpmpp_2m_sde(model, x, grid, **options)
    errors = [(sde.sample_dpmpp_2m_sde(model, x, grid[::256 // n], **options) - reference).norm().item()
              for n in (8, 16, 32)]
    assert errors[0] / errors[2] > 2.5, errors
    gaussian = sde.sample_dpmpp_2m_sde(model, x, grid[::8], noise_type="gaussian", **options)
    assert (gaussian - reference).norm().item() > 3 * errors[2]


@pytest.mark.parametrize("model_kind", ["eps", "flow"])
@pytest.mark.parametrize("eta", [0.5, 2.0])
@pytest.mark.parametrize("sampler", MULTISTEP, ids=lambda f: f.__name__)
def test_every_eta_keeps_the_data_marginal(sampler, eta, model_kind):
    """The eta family (noise coefficients sigma_t sqrt(1 - e^{-2 eta h}) / sigma_t sqrt(eta (e^{2h} - 1))) has the
    probability-flow marginals for every eta, checked where no peer covers it (k-diffusion and diffusers pin
    eta = 1 only): Gaussian data N(mu, v), 4000 samples started from the exact marginal at sigma_max, 40 steps to
    sigma_min; the per-dimension variance must match alpha^2 v + sigma^2 within 3% and the mean alpha mu.
    (Sampling error of the ratio is 0.8%; a noise term off by the eta factor moves it by tens of percent.)"""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 8, generator=g, dtype=torch.float64)
    v = 0.2 + torch.rand(1, 8, generator=g, dtype=torch.float64)
    model = GaussianMixture(mu, v).denoiser(model_kind)
    count = 4000
    n = torch.randn(count, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if model_kind == "eps":
        sigma_max, sigma_min, alpha_max, alpha_min = 5.0, 0.2, 1.0, 1.0
    else:
        sigma_max, sigma_min, alpha_max, alpha_min = 0.9, 0.1, 0.1, 0.9
    x = alpha_max * mu + (alpha_max ** 2 * v + sigma_max ** 2).sqrt() * n
    sigmas = _fine_grid(model_kind, 40, sigma_max, sigma_min)
    draws = torch.Generator().manual_seed(7)
    noise = lambda sigma, sigma_next: torch.randn(count, 8, generator=draws, dtype=torch.float64)  # noqa: E731
    y = sampler(model, x, sigmas, model_kind=model_kind, eta=eta, noise_sampler=noise)
    ratio = (y.var(0) / (alpha_min ** 2 * v + sigma_min ** 2)).mean().item()
    assert abs(ratio - 1) < 0.03, ratio
    assert (y.mean(0) - alpha_min * mu).abs().max().item() < 0.05


# ----------------------------------------------------------------------------------------------------------------
# Batches, eta = 0, flow, precision, options
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_type", ["brownian", "gaussian"])
@pytest.mark.parametrize("sampler", [sde.sample_dpmpp_2m_sde, sde.sample_dpm_solver_sde_1])
def test_sample_does_not_depend_on_batch(sampler, noise_type):
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(8), start(4, 10.0)
    batch4 = sampler(model, x, sigmas, seed=40, noise_type=noise_type)
    first2 = sampler(model, x[:2], sigmas, seed=40, noise_type=noise_type)
    last2 = sampler(model, x[2:], sigmas, extra_args={"seed": [42, 43]}, noise_type=noise_type)
    torch.testing.assert_close(first2, batch4[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last2, batch4[2:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sampler(model, x, sigmas, seed=41, noise_type=noise_type), batch4)


def test_eta_zero_is_the_ode_solver():
    kd = load()
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(10), start(2, 10.0)
    for model_kind, model, sigmas, x in [("eps", model, sigmas, x),
                                         ("flow", MIXTURE.denoiser("flow"), torch.linspace(1, 0, 11), start(2, 1))]:
        ode = dict(model_kind=model_kind, lower_order_final=False)
        pairs = [
            (sde.sample_dpmpp_2m_sde(model, x, sigmas, eta=0.0, **ode),
             dpmpp.sample_dpmpp_2m(model, x, sigmas, final_step="denoise", **ode)),
            (sde.sample_dpmpp_2m_sde(model, x, sigmas, eta=0.0, solver_type="heun", **ode),
             dpmpp.sample_dpmpp_2m(model, x, sigmas, solver_type="taylor", final_step="denoise", **ode)),
            (sde.sample_dpmpp_3m_sde(model, x, sigmas, eta=0.0, solver_type="taylor", **ode),
             dpmpp.sample_dpmpp_3m(model, x, sigmas, solver_type="taylor", final_step="denoise", **ode)),
        ]
        for ours, ode_result in pairs:
            torch.testing.assert_close(ours, ode_result, rtol=1e-12, atol=1e-12)
    # first order at eta = 0 is DDIM, which for eps models is Euler in sigma
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(10), start(2, 10.0)
    euler = kd.sample_euler(model, x, sigmas, disable=True)
    for sampler in (sde.sample_dpmpp_sde_1, sde.sample_dpm_solver_sde_1):
        torch.testing.assert_close(sampler(model, x, sigmas, eta=0.0), euler, rtol=1e-10, atol=1e-10)
    # s_noise = 0 drops the noise but keeps the SDE drift: it is not the ODE
    assert relative(sde.sample_dpmpp_2m_sde(model, x, sigmas, s_noise=0.0), euler) > 1e-4


@pytest.mark.parametrize("sampler", SDE_SAMPLERS, ids=lambda f: f.__name__)
def test_flow_start_at_sigma_one(sampler):
    """Out of sigma = 1 (lambda = -inf) the step is x_t = alpha_t D + sigma_t z (eta > 0) or the DDIM step (eta = 0);
    a full run is finite and ends at D (the trailing 0)."""
    model = MIXTURE.denoiser("flow")
    x = start(2, 1.0)
    z = sample_noise(2, (8,), seed=9)
    fixed = lambda sigma, sigma_next: z  # noqa: E731
    mean = MIXTURE.mean().expand(2, 8)
    one_step = torch.tensor([1.0, 0.7], dtype=torch.float64)
    torch.testing.assert_close(sampler(model, x, one_step, model_kind="flow", noise_sampler=fixed),
                               0.3 * mean + 0.7 * z)
    torch.testing.assert_close(sampler(model, x, one_step, model_kind="flow", eta=0.0), 0.3 * mean + 0.7 * x)
    out = sampler(model, x, torch.linspace(1, 0, 9, dtype=torch.float64), model_kind="flow", seed=2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("sampler", SDE_SAMPLERS, ids=lambda f: f.__name__)
def test_half_precision_is_finite_and_close_to_float32(sampler, dtype, tolerance):
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(10), start(2, 10.0).float()
    full = sampler(model, x, sigmas, seed=5)
    half = sampler(model, x.to(dtype), sigmas, seed=5)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert relative(half.float(), full) < tolerance


def test_callback_and_final_step_stop():
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(6), start(1, 10.0)
    seen = []
    out = sde.sample_dpmpp_3m_sde(model, x, sigmas, seed=1, final_step="stop", callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(5)) and torch.isfinite(out).all()  # the trailing 0 is dropped
    assert relative(out, sde.sample_dpmpp_3m_sde(model, x, sigmas, seed=1)) > 1e-4  # stopped at sigma_min, not at D


@pytest.mark.parametrize("options", [
    dict(eta=-0.5), dict(eta=float("nan")), dict(s_noise=-1.0), dict(noise_type="pink"), dict(noise_device="gpu"),
    dict(seed="abc"), dict(seed=[1, 2, 3]), dict(seed=1.5), dict(noise_sampler=3), dict(model_kind="vp"),
    dict(final_step="last"),
])
@pytest.mark.parametrize("sampler", SDE_SAMPLERS, ids=lambda f: f.__name__)
def test_bad_options_raise_value_error(sampler, options):
    calls = []

    def model(x, sigma, **_):
        calls.append(1)
        return x * 0

    with pytest.raises(ValueError):
        sampler(model, start(2, 10.0), karras(4), **options)
    assert not calls  # rejected before the first model call


@pytest.mark.parametrize("sampler", MULTISTEP, ids=lambda f: f.__name__)
def test_solver_type_is_checked(sampler):
    with pytest.raises(ValueError, match="solver_type"):
        sampler(MIXTURE.denoiser("eps"), start(1, 10.0), karras(4), solver_type="euler")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("noise_type", ["brownian", "gaussian"])
def test_noise_device_on_cuda(noise_type):
    """Noise is made on the latent's device by default; noise_device="cpu" makes it where a CPU run makes it, so a
    CUDA run reproduces the CPU result."""
    model, sigmas = MIXTURE.denoiser("eps"), karras(6)
    x = start(2, 10.0)
    cpu = sde.sample_dpmpp_2m_sde(model, x, sigmas, seed=3, noise_type=noise_type)
    on_cpu_noise = sde.sample_dpmpp_2m_sde(model, x.cuda(), sigmas, seed=3, noise_type=noise_type, noise_device="cpu")
    on_gpu_noise = sde.sample_dpmpp_2m_sde(model, x.cuda(), sigmas, seed=3, noise_type=noise_type)
    assert on_cpu_noise.device.type == "cuda" and torch.isfinite(on_gpu_noise).all()
    torch.testing.assert_close(on_cpu_noise.cpu(), cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [4, 12, 25])
def test_official_3m_sde_equals_kdiffusion_on_the_same_noise(steps):
    """solver_type="official" is k-diffusion's sample_dpmpp_3m_sde step (half the Taylor D'' weight); fed the same
    Brownian noise it reproduces it (guard off, no lower-order final steps; measured < 1e-15 relative).  The Taylor
    form differs (measured 1e-3 .. 1e-2), so the comparison can fail."""
    kd = load()
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(steps), start(3, 10.0)
    reference = kd.sample_dpmpp_3m_sde(model, x, sigmas, noise_sampler=kd_brownian(x, sigmas, [7, 8, 9]),
                                       disable=True)
    options = dict(noise_sampler=kd_brownian(x, sigmas, [7, 8, 9]), lower_order_final=False, guard=False)
    ours = sde.sample_dpmpp_3m_sde(model, x, sigmas, solver_type="official", **options)
    assert relative(ours, reference) < 1e-6
    options["noise_sampler"] = kd_brownian(x, sigmas, [7, 8, 9])
    assert relative(sde.sample_dpmpp_3m_sde(model, x, sigmas, solver_type="taylor", **options), reference) > 1e-5


def test_official_3m_sde_at_eta_zero_is_kdiffusions_ode_and_differs_from_ours_in_the_warm_up_step_only():
    """At eta = 0 the official 3M SDE is k-diffusion's sample_dpmpp_3m_sde(eta=0).  Our official ODE 3M follows
    diffusers, whose second-order (warm-up) step is the 2M midpoint step where k-diffusion takes the Taylor weight
    psi_2: with three positive steps (orders 1, 2, 3) the two agree after step 1 exactly and differ after step 2."""
    kd = load()
    model, sigmas, x = MIXTURE.denoiser("eps"), karras(6), start(3, 10.0)
    zero = lambda s, t: torch.zeros_like(x)  # noqa: E731
    options = dict(eta=0.0, lower_order_final=False, guard=False, solver_type="official")
    ours = sde.sample_dpmpp_3m_sde(model, x, sigmas, **options)
    assert relative(ours, kd.sample_dpmpp_3m_sde(model, x, sigmas, eta=0.0, noise_sampler=zero, disable=True)) < 1e-6
    ode = dict(lower_order_final=False, guard=False, final_step="stop")
    one = sigmas[:2]
    torch.testing.assert_close(sde.sample_dpmpp_3m_sde(model, x, one, **options, final_step="stop"),
                               dpmpp.sample_dpmpp_3m(model, x, one, **ode), rtol=1e-12, atol=1e-12)
    two = sigmas[:3]
    assert relative(sde.sample_dpmpp_3m_sde(model, x, two, **options, final_step="stop"),
                    dpmpp.sample_dpmpp_3m(model, x, two, **ode)) > 1e-6


def test_comfyui_sde_node_passes_the_3m_solver_type():
    from dpm_solver_nodes.nodes import options

    node = next(s for s in options.SAMPLER_NODES if s.node_id == "DPMSolverNodes_DPMSolverSDE")
    widgets = {**options.widget_defaults(node), "solver": "dpmpp_3m_sde"}
    assert node.build(**widgets)[1]["solver_type"] == "official"
    assert node.build(**widgets, solver_type_3m="taylor")[1]["solver_type"] == "taylor"
    assert "solver_type" not in node.build(**{**widgets, "solver": "dpmpp_sde_1"})[1]
    assert "solver_type_3m" in node.optional
