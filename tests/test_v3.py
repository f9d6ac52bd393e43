"""DPM-Solver-v3 against analytic models (docs/dpm_solver_v3.md section 6): exact EMS of a single Gaussian, the
degenerate EMS (DDIM / DPM-Solver++ Taylor), exact-Jacobian EMS of a Gaussian mixture vs DPM-Solver++(2M), flow
models, and the no-NaN list of odd inputs."""
import logging
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.samplers import sample_ddim, sample_dpm_solver_v3, sample_dpmpp_2m, sample_dpmpp_3m
from dpm_solver_nodes.samplers import v3 as v3_module
from dpm_solver_nodes.stats import EMS

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
SHAPE = (2, 2, 2)  # d = 8 as a (C, H, W) latent


def log_uniform(steps, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64))


def karras(steps, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, rho=7.0):
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def grid(N, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    return torch.linspace(-math.log(sigma_max), -math.log(sigma_min), N + 1, dtype=torch.float64)


# ---- single Gaussian with exact EMS (docs/dpm_solver_v3.md 6.2) -----------------------------------------------

def single_gaussian(seed=1):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(8, generator=g, dtype=torch.float64) * 2
    c2 = 0.05 + 0.45 * torch.rand(8, generator=g, dtype=torch.float64)
    return GaussianMixture(mu[None], c2[None]), mu, c2


def gaussian_ems(mu, c2, N=4000):
    """l = sigma^2/(c^2 + sigma^2), f = -l mu (Var f = 0), l' = -2 l (1 - l): s = 0, b = f' = 2 l (1 - l) mu."""
    lambdas = grid(N)
    s2 = torch.exp(-2 * lambdas)[:, None]
    l = s2 / (c2[None] + s2)
    b = 2 * l * (1 - l) * mu[None]
    shape = (N + 1, *SHAPE)
    return EMS(lambdas, l.reshape(shape), torch.zeros(shape, dtype=torch.float64), b.reshape(shape),
               metadata={"estimator": "exact single Gaussian"})


@pytest.fixture(scope="module")
def gaussian_case():
    mixture, mu, c2 = single_gaussian()
    model = mixture.denoiser()
    x = sample_noise(16, SHAPE, seed=0) * SIGMA_MAX
    return model, x, gaussian_ems(mu, c2), reference_solution(model, x, SIGMA_MAX, SIGMA_MIN)


@pytest.mark.parametrize("steps", [5, 10])
def test_single_gaussian_exact_ems_is_exact_up_to_quadrature(gaussian_case, steps):
    model, x, ems, reference = gaussian_case
    sigmas = log_uniform(steps)
    baseline = (sample_dpmpp_2m(model, x, sigmas, disable=True) - reference).abs().max().item()
    assert baseline > 1e-2  # DPM-Solver++ is far off (measured 0.23 at 5 steps, 0.065 at 10)
    for order in (1, 2, 3):
        for corrector in (False, True):
            out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, order=order, use_corrector=corrector,
                                       disable=True)
            error = (out - reference).abs().max().item()
            assert error <= 1e-5, (order, corrector, error)  # measured 3e-7 .. 2e-6 with N = 4000


def test_refine_cuts_quadrature_error(gaussian_case):
    model, x, _, _ = gaussian_case
    sigmas = log_uniform(5)
    ddim = sample_ddim(model, x, sigmas, disable=True)
    coarse = EMS.degenerate(grid(300))  # constant l: the only error left is the trapezoid rule on e^L
    errors = [(sample_dpm_solver_v3(model, x, sigmas, ems=coarse, order=1, use_corrector=False, refine=r,
                                    disable=True) - ddim).abs().max().item() for r in (1, 4)]
    assert 10 < errors[0] / errors[1] < 20, errors  # O(dlambda^2): refine = 4 cuts it ~16x
    # (with smooth non-constant statistics the linear interpolation of l, s, b between nodes is also O(dlambda^2),
    # so refine helps only as far as the EMS grid resolves them)


# ---- degenerate EMS (docs/dpm_solver_v3.md 6.1) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture_case():
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    model = mixture.denoiser()
    x = sample_noise(16, SHAPE, seed=0) * SIGMA_MAX
    return mixture, model, x


def _taylor_multistep(model, x, sigmas, order):
    """DPM-Solver++ in its Taylor form, every step of order min(order, points so far) with the exact Taylor
    coefficients of the polynomial through the last outputs (DPM-Solver++ Eq. 9; ``sample_dpmpp_3m``'s "taylor" form
    takes the paper's 2M for its second-order steps instead, so it is not this method)."""
    from dpm_solver_nodes.samplers.common import SamplerRun
    from dpm_solver_nodes.samplers.exponential import data_prediction_step

    run = SamplerRun(model, x, sigmas, disable=True)
    t, lams, outputs = run.table, [], []
    for i in range(t.steps):
        lams, outputs = [t.lam[i]] + lams[:order - 1], [run.denoise(x, i)] + outputs[:order - 1]
        x = data_prediction_step(x, t, i, [outputs[0]]) if t.sigma[i + 1] == 0 else data_prediction_step(
            x, t, i, history=(lams, outputs))
    return x


@pytest.mark.parametrize("steps", [5, 20])
def test_degenerate_ems_is_ddim_and_dpmpp_taylor(mixture_case, steps):
    _, model, x = mixture_case
    sigmas = log_uniform(steps)
    explicit = EMS.degenerate(grid(1200))
    for ems, tolerance in ((None, 2e-6), (explicit, 1e-4)):
        # ems=None uses a fine built-in grid; N = 1200 has the trapezoid error of docs/dpm_solver_v3.md 6.1
        scale = x.abs().max().item() / SIGMA_MAX * 5
        ddim = sample_ddim(model, x, sigmas, disable=True)
        out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, order=1, use_corrector=False, disable=True)
        assert (out - ddim).abs().max().item() <= tolerance * scale
        for lower_order_final in (False, True):
            taylor = sample_dpmpp_2m(model, x, sigmas, solver_type="taylor", lower_order_final=lower_order_final,
                                     disable=True)
            out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, order=2, use_corrector=False,
                                       lower_order_final=lower_order_final, disable=True, fallback=False)
            assert (out - taylor).abs().max().item() <= 2 * tolerance * scale
        third = _taylor_multistep(model, x, sigmas, 3)
        out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, order=3, use_corrector=False, lower_order_final=False,
                                   disable=True, fallback=False)
        assert (out - third).abs().max().item() <= 2 * tolerance * scale
    # and the midpoint form (k-diffusion's) is a different method at O(h^3): the comparison can fail
    midpoint = sample_dpmpp_2m(model, x, sigmas, disable=True)
    out = sample_dpm_solver_v3(model, x, sigmas, ems=None, order=2, use_corrector=False, disable=True, fallback=False)
    assert (out - midpoint).abs().max().item() > 1e-3


def test_without_ems_and_corrector_runs_the_papers_dpmpp(mixture_case, caplog, monkeypatch):
    """With nothing for v3 to add (no EMS, no corrector) the default ``fallback`` runs DPM-Solver++(2M) in the
    paper's midpoint form (order 2) or the official 3M (order 3), with a log line; with EMS or the corrector it
    stays v3."""
    _, model, x = mixture_case
    sigmas = log_uniform(10)
    monkeypatch.setattr(v3_module, "_warned_without_ems_or_corrector", False)
    with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
        out = sample_dpm_solver_v3(model, x, sigmas, ems=None, order=2, use_corrector=False, disable=True)
    assert torch.equal(out, sample_dpmpp_2m(model, x, sigmas, lower_order_final=True, disable=True))
    assert any("running DPM-Solver++(2M)" in r.getMessage() for r in caplog.records)
    out = sample_dpm_solver_v3(model, x, sigmas, ems=None, order=3, use_corrector=False, disable=True)
    assert torch.equal(out, sample_dpmpp_3m(model, x, sigmas, lower_order_final=True, disable=True))
    corrected = sample_dpm_solver_v3(model, x, sigmas, ems=None, order=2, disable=True)
    assert (corrected - sample_dpmpp_2m(model, x, sigmas, disable=True)).abs().max().item() > 1e-3


def test_without_ems_logs_once(mixture_case, caplog, monkeypatch):
    _, model, x = mixture_case
    monkeypatch.setattr(v3_module, "_warned_without_ems", False)
    with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
        for _ in range(3):
            sample_dpm_solver_v3(model, x, log_uniform(4), disable=True)
    assert len([r for r in caplog.records if "without EMS" in r.getMessage()]) == 1


# ---- Gaussian mixture with exact-Jacobian EMS (docs/dpm_solver_v3.md 6.3) --------------------------------------

def exact_jacobian_ems(mixture, N=120, samples=2048, seed=0):
    """EMS of the analytic mixture on q_lambda (x = x0 + sigma z, one z per sample at every node): l from the exact
    Jacobian diagonal, D' by forward-mode JVP of (x, lambda) -> D(x, e^-lambda) along (D - x, 1), l' by central
    differences, s and b by the per-element least-squares fit f' ~ s f + b (Eq. 5, 11)."""
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(samples, generator=g)
    z = torch.randn(samples, mixture.dim, generator=g, dtype=torch.float64)
    lambdas = grid(N)
    nodes = []
    for lam in lambdas.tolist():
        sigma = torch.full((samples,), math.exp(-lam), dtype=torch.float64)
        x = x0 + sigma[:, None] * z
        D = mixture.denoise_ve(x, sigma)
        l = 1 - mixture.jacobian_diagonal_ve(x, sigma).mean(0)
        _, D_dot = torch.func.jvp(lambda xx, ll: mixture.denoise_ve(xx, torch.exp(-ll)),
                                  (x, torch.full((samples,), lam, dtype=torch.float64)),
                                  (D - x, torch.ones(samples, dtype=torch.float64)))
        nodes.append((x, D, D_dot, l))
    l = torch.stack([n[3] for n in nodes])
    step = (lambdas[1] - lambdas[0]).item()
    l_dot = torch.empty_like(l)
    l_dot[1:-1] = (l[2:] - l[:-2]) / (2 * step)
    l_dot[0], l_dot[-1] = (l[1] - l[0]) / step, (l[-1] - l[-2]) / step
    s, b = torch.zeros_like(l), torch.zeros_like(l)
    for k, (x, D, D_dot, _) in enumerate(nodes):
        a = 1 - l[k]
        f = a * x - D
        f_dot = -l_dot[k] * x + a * (D - x) - D_dot
        f_mean, f_dot_mean = f.mean(0), f_dot.mean(0)
        var = ((f - f_mean) ** 2).mean(0)
        cov = ((f - f_mean) * (f_dot - f_dot_mean)).mean(0)
        # section 3.1's floor 1e-10 (a^2 C_xx + C_DD) misses dimensions where a, C_xx and C_DD all vanish (x0 constant:
        # l = 1, f = -x0); measuring it against E[f]^2 as well catches them
        floor = 1e-10 * (a * a * x.var(0) + D.var(0) + f_mean ** 2) + 1e-300
        s[k] = torch.where(var > floor, cov / var.clamp_min(1e-300), torch.zeros_like(var))
        b[k] = f_dot_mean - s[k] * f_mean
    shape = (N + 1, *SHAPE)
    return EMS(lambdas, l.reshape(shape), s.reshape(shape), b.reshape(shape))


@pytest.fixture(scope="module")
def mixture_ems(mixture_case):
    return exact_jacobian_ems(mixture_case[0])


@pytest.mark.parametrize("schedule", [log_uniform, karras])
def test_mixture_exact_jacobian_ems_beats_dpmpp_2m(mixture_case, mixture_ems, schedule):
    _, model, _ = mixture_case
    x = sample_noise(48, SHAPE, seed=123) * SIGMA_MAX
    reference = reference_solution(model, x, SIGMA_MAX, SIGMA_MIN)

    def median_error(out):
        return (out - reference).reshape(x.shape[0], -1).norm(dim=1).median().item()

    for steps in (5, 6, 8, 10):
        sigmas = schedule(steps)
        v3 = median_error(sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, order=2, disable=True))
        dpmpp = median_error(sample_dpmpp_2m(model, x, sigmas, disable=True))
        # measured (log-uniform / Karras): v3 0.24-0.40 at 5-6 NFE vs DPM++(2M) 0.60-1.09, 0.17 vs 0.31-0.43 at 10
        assert v3 < 0.8 * dpmpp, (schedule.__name__, steps, v3, dpmpp)
    for steps in (10, 20):  # section 6.3: first-order v3 beats DDIM (measured 0.70-0.75x at 10, 0.55-0.60x at 20 NFE)
        sigmas = schedule(steps)
        first = median_error(sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, order=1, use_corrector=False,
                                                  disable=True))
        ddim = median_error(sample_ddim(model, x, sigmas, disable=True))
        assert first < 0.85 * ddim, (schedule.__name__, steps, first, ddim)


# ---- flow models ----------------------------------------------------------------------------------------------

def test_flow_equals_eps_in_ve_coordinates(mixture_case, mixture_ems):
    mixture, model, x = mixture_case
    flow_model = mixture.denoiser("flow")
    ve_sigmas = karras(8)
    flow_sigmas = ve_sigmas / (1 + ve_sigmas)  # sigma~ = sigma / (1 - sigma)
    x_flow = x * (1 - flow_sigmas[0])
    for order in (1, 2, 3):
        eps = sample_dpm_solver_v3(model, x, ve_sigmas, ems=mixture_ems, order=order, disable=True)
        flow = sample_dpm_solver_v3(flow_model, x_flow, flow_sigmas, ems=mixture_ems, order=order,
                                    model_kind="flow", disable=True)
        assert torch.allclose(flow, eps * (1 - flow_sigmas[-1]), atol=1e-9, rtol=1e-9)


def test_flow_start_at_sigma_one(mixture_case, mixture_ems):
    mixture, _, _ = mixture_case
    flow_model = mixture.denoiser("flow")
    x = sample_noise(16, SHAPE, seed=5)
    errors = []
    for steps in (10, 20, 40):
        sigmas = torch.cat([torch.linspace(1.0, 0.02, steps, dtype=torch.float64), torch.zeros(1)])
        calls = []

        def counting(xx, sigma, **kwargs):
            calls.append(float(sigma[0]))
            return flow_model(xx, sigma)

        out = sample_dpm_solver_v3(counting, x, sigmas, ems=mixture_ems, model_kind="flow", disable=True)
        assert torch.isfinite(out).all() and len(calls) == steps
        reference = reference_solution(flow_model, x, 1.0, 0.0, model_kind="flow")
        errors.append((out - reference).reshape(16, -1).norm(dim=1).median().item())
    assert errors[2] < errors[1] < errors[0], errors
    for sigmas in ([1.0, 0.0], [1.0, 0.5], [1.0, 0.5, 0.0]):  # no v3 step at all, or one after the first step
        out = sample_dpm_solver_v3(flow_model, x, torch.tensor(sigmas, dtype=torch.float64), ems=mixture_ems,
                                   model_kind="flow", disable=True)
        assert torch.isfinite(out).all()
    # without the corrector the step out of sigma = 1 is DDIM (with it, the corrector at sigma = 0.5 redoes that step
    # in rho: tests/test_flow_guidance.py)
    out = sample_dpm_solver_v3(flow_model, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), ems=mixture_ems,
                               model_kind="flow", use_corrector=False, disable=True)
    assert torch.allclose(out, flow_model(x * 0.5 + 0.5 * flow_model(x, torch.ones(16)), torch.full((16,), 0.5)))


def test_flow_rejects_eps_statistics(mixture_case):
    mixture, _, x = mixture_case
    ems = EMS.degenerate(grid(10)).replace(metadata={"model_kind": "eps"})
    with pytest.raises(ValueError, match="model_kind"):
        sample_dpm_solver_v3(mixture.denoiser("flow"), x, torch.tensor([0.9, 0.5, 0.0]), ems=ems,
                             model_kind="flow", disable=True)


# ---- odd inputs: no NaN/Inf (docs/dpm_solver_v3.md 6.4) --------------------------------------------------------

def test_odd_schedules_stay_finite_and_accurate(mixture_case, mixture_ems):
    _, model, x = mixture_case
    narrow = exact_jacobian_ems(mixture_case[0], N=40, samples=256)
    narrow = EMS(narrow.lambdas * 0.5, narrow.l, narrow.s, narrow.b)  # covers sigma ~ 9 -> 0.045 only
    coarse = EMS(mixture_ems.lambdas[::30], mixture_ems.l[::30], mixture_ems.s[::30], mixture_ems.b[::30])
    cases = {
        "outside the grid": (narrow, karras(10), {}),
        "trailing zero": (mixture_ems, torch.cat([karras(9), torch.zeros(1, dtype=torch.float64)]), {}),
        "mid-way start": (mixture_ems, karras(10, sigma_max=1.0), {}),
        "single step": (mixture_ems, torch.tensor([SIGMA_MAX, SIGMA_MIN], dtype=torch.float64), {}),
        "single step to zero": (mixture_ems, torch.tensor([SIGMA_MAX, 0.0], dtype=torch.float64), {}),
        "several sigmas in one cell": (coarse, karras(30), {}),
        "order above history": (mixture_ems, karras(2), {"order": 3, "p_pseudo": True}),
        "no lower order final": (mixture_ems, karras(3), {"order": 3, "lower_order_final": False}),
        "pseudo predictor": (mixture_ems, karras(6), {"order": 3, "p_pseudo": True, "c_pseudo": False}),
    }
    for name, (ems, sigmas, options) in cases.items():
        out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True, **options)
        assert torch.isfinite(out).all(), name
        start, end = sigmas[0].item(), sigmas[-1].item()
        reference = reference_solution(model, x * (start / SIGMA_MAX), start, end)
        out = sample_dpm_solver_v3(model, x * (start / SIGMA_MAX), sigmas, ems=ems, disable=True, **options)
        error = (out - reference).reshape(x.shape[0], -1).norm(dim=1).median().item()
        ddim = sample_ddim(model, x * (start / SIGMA_MAX), sigmas, disable=True)
        ddim_error = (ddim - reference).reshape(x.shape[0], -1).norm(dim=1).median().item()
        # one- and two-step runs are crude for every solver: stay within DDIM's error there
        assert error < max(0.5, 1.2 * ddim_error), (name, error, ddim_error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents(mixture_case, mixture_ems, dtype):
    _, model, x = mixture_case
    sigmas = karras(8)
    full = sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, disable=True)
    half = sample_dpm_solver_v3(model, x.to(dtype), sigmas, ems=mixture_ems, disable=True)
    assert half.dtype == dtype and torch.isfinite(half).all()
    # compared with what DPM-Solver++(2M) loses to the same precision (the model sees rounded latents): the
    # predictor alone is no more sensitive (measured 0.3-0.6x); the corrector amplifies the rounding of the fresh
    # model output (measured 2.5x fp16, 3.7x bf16)
    baseline = (sample_dpmpp_2m(model, x.to(dtype), sigmas, disable=True).double()
                - sample_dpmpp_2m(model, x, sigmas, disable=True)).abs().max().item()
    assert (half.double() - full).abs().max().item() < 5 * baseline
    predictor_full = sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, use_corrector=False, disable=True)
    predictor_half = sample_dpm_solver_v3(model, x.to(dtype), sigmas, ems=mixture_ems, use_corrector=False,
                                          disable=True)
    assert (predictor_half.double() - predictor_full).abs().max().item() < baseline


def test_reductions_batch_and_zero_variance_dimension():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 8, generator=g, dtype=torch.float64)
    variances = 0.05 + 0.4 * torch.rand(3, 8, generator=g, dtype=torch.float64)
    means[:, 0], variances[:, 0] = 0.7, 1e-12  # a dimension with (almost) no variance
    mixture = GaussianMixture(means, variances)
    model = mixture.denoiser()
    ems = exact_jacobian_ems(mixture, N=60, samples=512)
    x = sample_noise(6, SHAPE, seed=9) * SIGMA_MAX
    sigmas = karras(10)
    reference = reference_solution(model, x, SIGMA_MAX, SIGMA_MIN)
    channel = EMS(ems.lambdas, *(t.mean((2, 3), keepdim=True) for t in (ems.l, ems.s, ems.b)))
    scalar = EMS(ems.lambdas, *(t.mean((1, 2, 3), keepdim=True) for t in (ems.l, ems.s, ems.b)))
    assert torch.all(ems.s[:, 0, 0, 0] == 0)  # the guard caught the constant dimension
    for stats in (ems, channel, scalar):
        out = sample_dpm_solver_v3(model, x, sigmas, ems=stats, disable=True)
        assert torch.isfinite(out).all()
        assert (out - reference).reshape(6, -1).norm(dim=1).median() < 0.5
        if stats is not scalar:  # the constant dimension lands on its value (pooled over all 8: 0.15 off)
            assert (out[:, 0, 0, 0] - 0.7).abs().max() < 1e-2
        # batch independence: one sample alone gives the same result
        single = sample_dpm_solver_v3(model, x[2:3], sigmas, ems=stats, disable=True)
        assert torch.allclose(single, out[2:3], atol=1e-12)


def test_absurd_statistics_are_clamped_not_nan(mixture_case, mixture_ems, caplog):
    _, model, x = mixture_case
    s = mixture_ems.s.clone()
    s[:, 0, 0, 0] = torch.linspace(-1e4, 1e4, s.shape[0])  # what an unguarded fit gives where Var f = 0
    wild = EMS(mixture_ems.lambdas, mixture_ems.l, s, mixture_ems.b)
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        out = sample_dpm_solver_v3(model, x, karras(8), ems=wild, disable=True)
    assert torch.isfinite(out).all()
    assert any("clamped" in r.getMessage() for r in caplog.records)


def test_per_element_ems_of_another_size_fall_back_to_channel_means(mixture_case, caplog):
    _, model, _ = mixture_case
    lambdas = grid(20)
    other = EMS(lambdas, torch.rand(21, 2, 3, 3), torch.zeros(21, 2, 3, 3), torch.zeros(21, 2, 3, 3))
    x = sample_noise(2, SHAPE, seed=1) * SIGMA_MAX
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        out = sample_dpm_solver_v3(model, x, karras(5), ems=other, disable=True)
    assert torch.isfinite(out).all()
    assert any("per-channel means" in r.getMessage() for r in caplog.records)
    wrong = EMS(lambdas, torch.rand(21, 3, 1, 1), torch.zeros(21, 3, 1, 1), torch.zeros(21, 3, 1, 1))
    with pytest.raises(ValueError, match="3 channels.*2 channels"):
        sample_dpm_solver_v3(model, x, karras(5), ems=wrong, disable=True)


# ---- options, corrector region, contract ------------------------------------------------------------------------

def test_half_corrector_regions(mixture_case, mixture_ems):
    _, model, x = mixture_case
    sigmas = karras(8)

    def run(**options):
        return sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, disable=True, **options)

    full, off = run(), run(use_corrector=False)
    assert (full - off).abs().max() > 1e-3
    # the boundary above every sigma: "noisy" never corrects, "clean" always does
    assert torch.equal(run(half="noisy", half_sigma=1e3), off)
    assert torch.equal(run(half="clean", half_sigma=1e3), full)
    assert torch.equal(run(half="noisy", half_sigma=1e-6), full)
    noisy, clean = run(half="noisy", half_sigma=1.0), run(half="clean", half_sigma=1.0)
    for partial in (noisy, clean):
        assert (partial - full).abs().max() > 1e-6 and (partial - off).abs().max() > 1e-6


def test_contract_callback_nfe_and_plan_cache(mixture_case, mixture_ems):
    _, model, x = mixture_case
    sigmas = torch.cat([karras(6), torch.zeros(1, dtype=torch.float64)])
    seen, calls = [], []

    def counting(xx, sigma, **kwargs):
        calls.append(kwargs)
        return model(xx, sigma)

    out = sample_dpm_solver_v3(counting, x, sigmas, extra_args={"tag": 1}, ems=mixture_ems, disable=True,
                               callback=lambda info: seen.append(info))
    assert len(calls) == 7 and all(c == {"tag": 1} for c in calls)
    assert [info["i"] for info in seen] == list(range(7))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(out, seen[-1]["denoised"])  # trailing 0 returns the (corrected) denoised output
    plans = v3_module._PLAN_CACHE[mixture_ems]
    count = len(plans)
    sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, disable=True)
    assert len(plans) == count  # reused
    stop = sample_dpm_solver_v3(model, x, sigmas, ems=mixture_ems, final_step="stop", disable=True)
    assert torch.isfinite(stop).all() and (stop - out).abs().max() > 1e-6


def test_snap_moves_sigmas_to_grid_nodes(mixture_case):
    _, model, x = mixture_case
    ems = EMS.degenerate(grid(40))
    seen = []

    def recording(xx, sigma, **kwargs):
        seen.append(float(sigma[0]))
        return model(xx, sigma)

    sample_dpm_solver_v3(recording, x, karras(5), ems=ems, snap=True, disable=True)
    nodes = torch.exp(-ems.lambdas)
    for sigma in seen:
        assert (nodes - sigma).abs().min() < 1e-9 * sigma
    with pytest.raises(ValueError, match="same EMS grid node"):
        sample_dpm_solver_v3(model, x, karras(60), ems=EMS.degenerate(grid(10)), snap=True, disable=True)


def test_bad_options_raise(mixture_case):
    _, model, x = mixture_case
    sigmas = karras(4)
    for options, message in (({"order": 4}, "order"), ({"half": "middle"}, "half"), ({"half_sigma": -1.0}, "half_sigma"),
                             ({"refine": 0}, "refine")):
        with pytest.raises(ValueError, match=message):
            sample_dpm_solver_v3(model, x, sigmas, disable=True, **options)
    with pytest.raises(ValueError, match="decreasing"):
        sample_dpm_solver_v3(model, x, sigmas.flip(0), disable=True)
    # a file name is not EMS (main: AttributeError), and on/off options are bools (main read "no" as True)
    with pytest.raises(TypeError, match="ems must be an EMS object.*file.safetensors.*load_ems"):
        sample_dpm_solver_v3(model, x, sigmas, disable=True, ems="file.safetensors")
    for name in ("use_corrector", "p_pseudo", "c_pseudo", "lower_order_final", "fallback", "snap"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            sample_dpm_solver_v3(model, x, sigmas, disable=True, **{name: "no"})


# ---- parity with the official implementation (docs/dpm_solver_v3.md 6.5) ---------------------------------------

def _load_official():
    """thu-ml/DPM-Solver-v3's ``dpm_solver_v3.py`` from $DPM_SOLVER_V3_OFFICIAL, its hard-coded ``.cuda()`` removed
    in memory (the file is never copied into this repository)."""
    import os
    import types

    path = os.environ.get("DPM_SOLVER_V3_OFFICIAL")
    if not path or not os.path.isfile(path):
        pytest.skip("set DPM_SOLVER_V3_OFFICIAL to thu-ml/DPM-Solver-v3's dpm_solver_v3.py (commit ba16871) to run the "
                    "parity test")
    source = open(path, encoding="utf-8").read().replace(".cuda()", "").replace('device="cuda"', 'device="cpu"')
    module = types.ModuleType("dpm_solver_v3_official")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def test_parity_with_official_code(tmp_path):
    import contextlib
    import io

    import numpy as np

    from dpm_solver_nodes.stats import import_official_ems

    official = _load_official()
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    schedule = official.NoiseScheduleVP("discrete", betas=betas)
    N = 60
    rng = np.random.default_rng(0)
    axis = np.linspace(0, 1, N + 1)[:, None, None, None]
    phase = [rng.random((1, *SHAPE)) * 3 for _ in range(3)]
    folder = tmp_path / f"7.5_{N}_16"
    folder.mkdir()
    np.savez(folder / "l.npz", l=0.5 + 0.4 * np.cos(3 * axis + phase[0]))
    np.savez(folder / "sb.npz", s=0.3 * np.sin(2 * axis + phase[1]), b=0.2 * np.cos(4 * axis + phase[2]))
    ems = import_official_ems(folder)

    def noise_model(x, t):  # the official convention: VP latent, continuous t -> epsilon
        t = t.reshape(-1).to(torch.float64)
        alpha = schedule.marginal_alpha(t).to(torch.float64)
        sigma = (schedule.marginal_std(t).to(torch.float64) / alpha)
        xk = x.reshape(x.shape[0], -1).to(torch.float64) / alpha[:, None]
        return ((xk - mixture.denoise_ve(xk, sigma)) / sigma[:, None]).reshape(x.shape).to(x.dtype)

    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha_start = schedule.marginal_alpha(torch.tensor([1.0], dtype=torch.float64)).item()
    for steps in (5, 12):
        t = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)
        sigmas = schedule.marginal_std(t) / schedule.marginal_alpha(t)
        for options in (dict(order=1, p_pseudo=False, use_corrector=False, c_pseudo=False, lower_order_final=True),
                        dict(order=2, p_pseudo=False, use_corrector=True, c_pseudo=True, lower_order_final=True),
                        dict(order=3, p_pseudo=True, use_corrector=True, c_pseudo=True, lower_order_final=True),
                        dict(order=2, p_pseudo=True, use_corrector=True, c_pseudo=False, lower_order_final=False)):
            with contextlib.redirect_stdout(io.StringIO()):
                solver = official.DPM_Solver_v3(str(folder), schedule, steps=steps, t_start=1.0, t_end=1e-3,
                                                skip_type="time_uniform", device="cpu")
            theirs = solver.sample(z.clone(), noise_model, **options).double()
            theirs = theirs / schedule.marginal_alpha(solver.timesteps[-1:].to(torch.float64)).item()
            ours = sample_dpm_solver_v3(mixture.denoiser(), z / alpha_start, sigmas, ems=ems, snap=True,
                                        disable=True, **options)
            # the official code keeps times in float32; measured 6e-7 .. 2e-5 absolute on values of 8 .. 25
            assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item(), (steps, options)


def test_decisions_say_which_schedule_they_were_measured_on(mixture_case, caplog):
    """The EMS job measures its per-NFE decisions on ``stats.tuning.sampling_sigmas`` (uniform in log sigma for eps,
    in sigma for flow); which of v3 and the pack's solvers wins depends on the schedule
    (bench/results_ems_schedule_transfer.md), so a run on other sigmas is told so, once per EMS and step count."""
    from dpm_solver_nodes.embedded.model import DiscreteVPSchedule
    from dpm_solver_nodes.samplers.ems_data import SPACING_TOLERANCE, spacing_deviation, spacing_note
    from dpm_solver_nodes.samplers.sigmas import karras, make_sigmas, shifted, with_zero
    from dpm_solver_nodes.stats.tuning import sampling_sigmas

    for n in (2, 5, 10, 20):
        assert spacing_deviation(sampling_sigmas(n, 0.0292, 14.6, "eps"), "eps") < 1e-12
        assert spacing_deviation(sampling_sigmas(n, 0.002, 0.999, "flow"), "flow") < 1e-12
        # an img2img tail of the spacing is the spacing
        assert spacing_deviation(sampling_sigmas(2 * n, 0.0292, 14.6, "eps")[n:], "eps") < 1e-12
    for n in (5, 10, 20):
        assert spacing_deviation(with_zero(karras(n, 0.0292, 14.6)), "eps") > 2 * SPACING_TOLERANCE
        discrete = DiscreteVPSchedule()
        assert spacing_deviation(make_sigmas("time_uniform", n, "eps", discrete=discrete), "eps") > 0.2
        assert spacing_deviation(shifted(n, 3.0), "flow") > 0.15
        assert spacing_deviation(shifted(n, 1.0), "flow") < 1e-12  # shift 1 is uniform in sigma
    assert spacing_note(sampling_sigmas(8, 0.0292, 14.6, "eps"), "eps") is None
    assert "measured on steps uniform in sigma" in spacing_note(shifted(8, 3.0), "flow")
    _, model, x = mixture_case
    ems = EMS.degenerate(torch.linspace(-3.0, 6.0, 21)).replace(decisions=[(6, "v3", 0.8)])
    on = sampling_sigmas(6, 0.002, SIGMA_MAX, "eps")
    off = with_zero(karras(6, 0.002, SIGMA_MAX))
    with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
        for sigmas in (on, off, off):
            sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True)
    noted = [r.getMessage() for r in caplog.records if "measured on steps" in r.getMessage()]
    assert len(noted) == 1 and noted[0].startswith("DPM-Solver-v3 at 6 steps: the EMS decisions were measured")


def test_flow_final_step_extrapolates_from_a_coarse_last_sigma(mixture_case, mixture_ems):
    """On the hosts' shift-3 flow schedule the jump from the last positive sigma (0.13-0.3 at 8-20 steps) into 0 is
    most of the error; v3's default final step ("auto", as DPM-Solver++(2M)) extrapolates D to sigma = 0 there from
    the last two points, and returns D where the last sigma is fine (a schedule ending at sigma_min).  Error of
    "auto" / "denoise", exact-Jacobian EMS, mixtures seeds 0-2: 0.64-0.70 at 10 steps, 0.55-0.62 at 12, 0.34-0.39 at
    20 (0.76-0.95 at 6-8, where the last sigma is 0.3-0.4)."""
    from dpm_solver_nodes.samplers.sigmas import shifted

    mixture, _, _ = mixture_case
    flow_model = mixture.denoiser("flow")
    x = sample_noise(16, SHAPE, seed=5)
    reference = reference_solution(flow_model, x, 1.0, 0.0, model_kind="flow")

    def error(sigmas, **options):
        out = sample_dpm_solver_v3(flow_model, x, sigmas, ems=mixture_ems, model_kind="flow", disable=True, **options)
        return out, (out - reference).reshape(16, -1).norm(dim=1).median().item()

    for steps in (10, 12, 20):
        sigmas = shifted(steps, 3.0)
        auto, auto_error = error(sigmas)
        extrapolated, _ = error(sigmas, final_step="extrapolate")
        _, denoise_error = error(sigmas, final_step="denoise")
        assert torch.equal(auto, extrapolated)
        assert auto_error < 0.8 * denoise_error, (steps, auto_error, denoise_error)
    fine = torch.cat([torch.linspace(1.0, 0.002, 12, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(error(fine)[0], error(fine, final_step="denoise")[0])
    with pytest.raises(ValueError, match="final_step"):
        error(fine, final_step="auto")
