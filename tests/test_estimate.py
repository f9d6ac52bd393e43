"""EMS estimation (stats/estimate.py) against analytic models: single Gaussian (exact l, s, b), Gaussian mixture (exact
Jacobian diagonal), back-end agreement, reductions, fallbacks, guards, interruption, and the end-to-end check that
v3 with estimated EMS beats DPM-Solver++(2M) at 5-10 NFE (docs/dpm_solver_v3.md sections 3 and 6.2-6.3)."""
import logging
import math

import pytest
import torch

from dpm_solver_nodes.analytic import GaussianMixture, GuidedGaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.samplers.common import NonFiniteError
from dpm_solver_nodes.samplers.dpmpp import sample_dpmpp_2m
from dpm_solver_nodes.stats import estimate as estimate_module
from dpm_solver_nodes.stats.estimate import EstimationInterrupted, generate_x0, smoothed_derivative


def estimate_ems(model, x0, *args, **kwargs):
    """The estimator's own fit on all of x0 (these tests predate the tuning and K = 32 defaults, which
    tests/test_tuning.py checks)."""
    kwargs.setdefault("K", x0.shape[0])
    kwargs.setdefault("tune", False)
    return estimate_module.estimate_ems(model, x0, *args, **kwargs)

SHAPE = (2, 2, 2)
MU = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.7, 1.2, 0.0, 0.8], dtype=torch.float64)
C2 = torch.tensor([0.3, 1.0, 0.5, 2.0, 0.1, 0.7, 1.5, 0.4], dtype=torch.float64)


def single_gaussian():
    return GaussianMixture(MU[None], C2[None])


def samples(mixture, k, seed=1):
    return mixture.sample(k, generator=torch.Generator().manual_seed(seed)).reshape(k, *SHAPE)


def flat(t):
    return t.reshape(t.shape[0], -1)


def test_single_gaussian_recovers_analytic_statistics():
    gaussian = single_gaussian()
    ems = estimate_ems(gaussian.denoiser(), samples(gaussian, 256), 0.002, 80.0, N=120, reduction="per_element",
                       jvp="finite_difference", batch_size=128)
    sigma2 = torch.exp(-2 * ems.lambdas)[:, None]
    l_exact = sigma2 / (C2 + sigma2)
    se = {k: flat(v) for k, v in ems.standard_errors.items()}
    # a diagonal Jacobian makes Hutchinson exact: l only carries finite-difference error
    assert (flat(ems.l) - l_exact).abs().max() < 3 * se["l"].max() + 1e-8
    # f = -l mu is constant, so Var f = 0 and the variance guard sets s = 0 (section 3.1)
    assert torch.equal(flat(ems.s), torch.zeros_like(flat(ems.s)))
    # b = E f' = -(dl/dlambda) mu, with the estimator's own derivative operator applied to the exact l ...
    b_reference = -smoothed_derivative(l_exact, ems.lambdas, 5) * MU
    assert ((flat(ems.b) - b_reference).abs() <= 3 * se["b"] + 1e-6).all()
    # ... which is the analytic b = 2 l (1 - l) mu up to the smoothing of +-5 nodes (dlambda = 0.088)
    b_analytic = 2 * l_exact * (1 - l_exact) * MU
    assert (b_reference - b_analytic).abs().max() < 0.1 * b_analytic.abs().max()
    unsmoothed = -smoothed_derivative(l_exact, ems.lambdas, 0) * MU
    assert (unsmoothed - b_analytic).abs().max() < 0.01 * b_analytic.abs().max()
    assert ems.metadata["estimator"].startswith("finite_difference")
    assert int(ems.metadata["forward_rows"]) == 121 * 256 * 5 + 10


def test_trajectory_samples_of_an_exact_denoiser_give_the_analytic_statistics():
    # the probability-flow ODE of an exact denoiser keeps the marginals q_lambda: same l, s = 0, same b
    gaussian = single_gaussian()
    ems = estimate_ems(gaussian.denoiser(), samples(gaussian, 256), 0.002, 80.0, N=60, reduction="per_element",
                       jvp="finite_difference", batch_size=256, samples="trajectory", substeps=2)
    sigma2 = torch.exp(-2 * ems.lambdas)[:, None]
    l_exact = sigma2 / (C2 + sigma2)
    assert (flat(ems.l) - l_exact).abs().max() < 1e-8
    assert torch.equal(flat(ems.s), torch.zeros_like(flat(ems.s)))
    b_reference = -smoothed_derivative(l_exact, ems.lambdas, 5) * MU
    assert ((flat(ems.b) - b_reference).abs() <= 3 * flat(ems.standard_errors["b"]) + 1e-6).all()
    assert int(ems.metadata["forward_rows"]) == 61 * 256 * 5 + 60 * 256 * 2 + 10
    assert ems.metadata["samples"] == "trajectory"


def test_mixture_l_matches_exact_jacobian_diagonal_within_standard_errors():
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    ems = estimate_ems(mixture.denoiser(), samples(mixture, 256), 0.002, 80.0, N=30, reduction="per_element",
                       jvp="finite_difference", batch_size=256, seed=3)
    # the exact expectation of diag(dD/dx) over q_lambda from 20000 independent samples
    data = mixture.sample(20000, generator=torch.Generator().manual_seed(9))
    sigmas = torch.exp(-ems.lambdas)
    exact, exact_se = [], []
    for sigma in sigmas.tolist():
        x = data + sigma * torch.randn(data.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        diagonal = mixture.jacobian_diagonal_ve(x, torch.full((len(data),), sigma, dtype=torch.float64))
        exact.append(1 - diagonal.mean(0))
        exact_se.append(diagonal.std(0) / math.sqrt(len(data)))
    exact, exact_se = torch.stack(exact), torch.stack(exact_se)
    z = (flat(ems.l) - exact).abs() / torch.sqrt(flat(ems.standard_errors["l"]) ** 2 + exact_se ** 2)
    assert (z < 3).double().mean() > 0.9, z.max()
    assert z.max() < 6
    # the Monte-Carlo error is real (not a diagonal model): the standard errors are not tiny
    assert flat(ems.standard_errors["l"])[5:25].median() > 1e-3


def test_one_pass_moments_equal_a_direct_two_pass_least_squares_fit():
    """The paper's two-pass procedure written out per sample: l from the probes, then f and f' and their
    element-wise least-squares fit; JVPs by torch.autograd.functional in (x, sigma), not the estimator's code."""
    from dpm_solver_nodes.stats.estimate import _noise

    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    x0 = samples(mixture, 32)
    ems = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, N=10, reduction="per_element", jvp="finite_difference",
                       batch_size=32, seed=2)
    z, (v,) = _noise({"crn": True, "seed": 2, "n_probes": 1}, 0, x0.shape, x0.dtype, x0.device)
    z, v, x0 = flat(z), flat(v), flat(x0)
    sigmas = torch.exp(-ems.lambdas)
    per_node = []
    for sigma in sigmas.tolist():
        x = x0 + sigma * z
        s_in = torch.full((len(x),), sigma, dtype=torch.float64)
        denoised, jv = torch.autograd.functional.jvp(mixture.denoise_ve, (x, s_in), (v, torch.zeros_like(s_in)))
        # d/dlambda along the ODE: dx = D - x, dsigma = -sigma
        _, ddot = torch.autograd.functional.jvp(mixture.denoise_ve, (x, s_in), (denoised - x, -s_in))
        per_node.append((x, denoised, ddot, 1 - (v * jv).mean(0)))
    l = torch.stack([n[3] for n in per_node])
    assert torch.allclose(flat(ems.l), l, atol=1e-6)
    m = smoothed_derivative(l, ems.lambdas, 5)
    for j, (x, denoised, ddot, _) in enumerate(per_node):
        a = 1 - l[j]
        f = a * x - denoised
        df = -(m[j] + a) * x + a * denoised - ddot
        fc, dfc = f - f.mean(0), df - df.mean(0)
        s = (fc * dfc).mean(0) / (fc * fc).mean(0)
        b = df.mean(0) - s * f.mean(0)
        assert torch.allclose(flat(ems.s)[j], s, rtol=1e-4, atol=1e-4 * s.abs().max()), j
        assert torch.allclose(flat(ems.b)[j], b, rtol=1e-4, atol=1e-4 * b.abs().max()), j


def test_forward_ad_and_finite_differences_agree():
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    x0 = samples(mixture, 32)
    kwargs = dict(N=8, reduction="per_element", batch_size=32, seed=2)
    forward = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, jvp="forward", **kwargs)
    finite = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, jvp="finite_difference", **kwargs)
    assert forward.metadata["estimator"] == "forward_ad"
    assert int(forward.metadata["jvp_rows"]) == 9 * 32 * 2
    for name in ("l", "s", "b"):
        a, b = getattr(forward, name), getattr(finite, name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), name


class _NoForwardAD(torch.autograd.Function):
    """An op with a backward but no jvp: forward-mode AD raises on it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_auto_falls_back_to_finite_differences_once(caplog):
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    plain = mixture.denoiser()

    def model(x, sigma):
        return plain(_NoForwardAD.apply(x), sigma)

    x0 = samples(mixture, 16)
    kwargs = dict(N=4, reduction="per_channel", batch_size=4)
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        auto = estimate_ems(model, x0, 0.01, 20.0, jvp="auto", **kwargs)
    assert sum("forward-mode AD failed" in r.message for r in caplog.records) == 1
    finite = estimate_ems(plain, x0, 0.01, 20.0, jvp="finite_difference", **kwargs)
    assert auto.metadata["estimator"].startswith("finite_difference")
    for name in ("l", "s", "b"):
        assert torch.equal(getattr(auto, name), getattr(finite, name))
    with pytest.raises(Exception):
        estimate_ems(model, x0, 0.01, 20.0, jvp="forward", **kwargs)
    # a model that detaches its input gives forward AD all-zero tangents: also a fallback, not zero statistics
    detached = estimate_ems(lambda x, sigma: plain(x.detach(), sigma.detach()), x0, 0.01, 20.0, jvp="auto", **kwargs)
    assert torch.equal(detached.l, finite.l)


def test_reductions_pool_the_same_observations():
    # elements of a channel are identically distributed: the pooled statistics estimate the same numbers
    means = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1.5
    variances = 0.1 + torch.rand(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.4
    mixture = GaussianMixture(means.repeat_interleave(4, dim=1), variances.repeat_interleave(4, dim=1))
    x0 = samples(mixture, 128)
    kwargs = dict(N=24, jvp="finite_difference", batch_size=128, seed=1)
    element = estimate_ems(mixture.denoiser(), x0, 0.01, 40.0, reduction="per_element", **kwargs)
    channel = estimate_ems(mixture.denoiser(), x0, 0.01, 40.0, reduction="per_channel", **kwargs)
    scalar = estimate_ems(mixture.denoiser(), x0, 0.01, 40.0, reduction="scalar", **kwargs)
    assert channel.stat_shape == (2, 1, 1) and scalar.stat_shape == (1, 1, 1)
    # l is the pooled mean: exactly the mean of the per-element values
    assert torch.allclose(channel.l, element.l.mean(dim=(2, 3), keepdim=True), atol=1e-12)
    assert torch.allclose(scalar.l, element.l.mean(dim=(1, 2, 3), keepdim=True), atol=1e-12)
    # s and b: the pooled fit agrees with the element fits within their errors, with smaller standard errors
    for name in ("s", "b"):
        pooled = getattr(channel, name)
        mean = getattr(element, name).mean(dim=(2, 3), keepdim=True)
        error = element.standard_errors[name].mean(dim=(2, 3), keepdim=True)
        assert ((pooled - mean).abs() <= 4 * error + 1e-3 * mean.abs().max()).double().mean() > 0.9, name
        assert channel.standard_errors[name].median() < element.standard_errors[name].median()


def test_flow_statistics_equal_eps_statistics_in_ve_coordinates():
    gaussian = GaussianMixture.random(dim=8, components=3, seed=1)
    x0 = samples(gaussian, 32)
    kwargs = dict(N=10, reduction="per_element", jvp="finite_difference", batch_size=32)
    eps = estimate_ems(gaussian.denoiser("eps"), x0, 0.01, 20.0, **kwargs)
    flow = estimate_ems(gaussian.denoiser("flow"), x0, 0.01 / 1.01, 20.0 / 21.0, model_kind="flow", **kwargs)
    assert torch.allclose(flow.lambdas, eps.lambdas, atol=1e-12)
    assert flow.metadata["model_kind"] == "flow"
    for name in ("l", "s", "b"):
        a, b = getattr(flow, name), getattr(eps, name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), name


def test_quantised_timestep_is_rejected():
    gaussian = single_gaussian()
    table = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 1000, dtype=torch.float64))

    def discrete(x, sigma):  # ComfyUI's ModelSamplingDiscrete: the timestep is an integer argmin
        index = (torch.log(sigma)[:, None] - torch.log(table)[None]).abs().argmin(dim=1)
        return gaussian.denoise(x, table[index])

    with pytest.raises(ValueError, match="quantised"):
        estimate_ems(discrete, samples(gaussian, 8), 0.002, 80.0, N=8, jvp="finite_difference")


def test_nan_output_is_a_clear_error():
    gaussian = single_gaussian()

    def broken(x, sigma):
        out = gaussian.denoise(x, sigma)
        return torch.where(sigma.reshape(-1, 1, 1, 1) < 1.0, out * float("nan"), out)

    with pytest.raises(NonFiniteError, match="NaN"):
        estimate_ems(broken, samples(gaussian, 8), 0.01, 20.0, N=8, jvp="finite_difference")


def test_interrupt_and_resume_gives_the_uninterrupted_result():
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    x0 = samples(mixture, 24)
    kwargs = dict(N=6, reduction="per_element", jvp="finite_difference", seed=4)
    full = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=5, **kwargs)
    calls = []

    def stop_after_eleven():
        calls.append(1)
        return len(calls) > 11

    with pytest.raises(EstimationInterrupted) as caught:
        estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=5, should_stop=stop_after_eleven, **kwargs)
    state = caught.value.state
    assert not state.finished and state.node == 2 and state.samples_done == 5

    class HostInterrupt(Exception):
        pass

    def progress(done, total):
        if done >= 100:
            raise HostInterrupt

    with pytest.raises(HostInterrupt) as caught:  # a host's own exception from progress carries the state too
        estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=7, progress=progress, resume_state=state,
                     **kwargs)
    state = caught.value.estimation_state
    resumed = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=3, resume_state=state, **kwargs)
    # identical samples and probes; only rounding differs with the chunking (uninterrupted runs with batch sizes
    # 3, 5, 7 and 24 differ by up to 1e-7 relative in b, where finite differences and s ~ 1e2 amplify it)
    for name in ("l", "s", "b"):
        expected = getattr(full, name)
        assert torch.allclose(getattr(resumed, name), expected, rtol=1e-6, atol=1e-9 * expected.abs().max()), name
        expected = full.standard_errors[name]
        assert torch.allclose(resumed.standard_errors[name], expected, rtol=1e-5, atol=1e-9 * expected.abs().max())
    with pytest.raises(ValueError, match="seed"):
        estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, resume_state=state, **dict(kwargs, seed=5))


def test_interrupted_trajectory_run_resumes_exactly():
    mixture = GuidedGaussianMixture(GaussianMixture.random(dim=8, components=5, seed=0), [0, 1], 7.5)
    x0 = samples(mixture.uncond, 12)
    kwargs = dict(N=5, reduction="per_channel", jvp="finite_difference", samples="trajectory", substeps=2)
    full = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=5, **kwargs)
    calls = []
    with pytest.raises(EstimationInterrupted) as caught:
        estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=5,
                     should_stop=lambda: calls.append(1) or len(calls) > 7, **kwargs)
    state = caught.value.state
    assert state.node == 2 and state.samples_done == 5  # half the samples already carried to node 3
    resumed = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, batch_size=4, resume_state=state, **kwargs)
    for name in ("l", "s", "b"):
        expected = getattr(full, name)
        assert torch.allclose(getattr(resumed, name), expected, rtol=1e-6, atol=1e-9 * expected.abs().max()), name


def test_progress_reports_every_chunk_with_the_total_known_up_front():
    gaussian = single_gaussian()
    seen, batches = [], set()

    def model(x, sigma):
        batches.add(len(x))
        return gaussian.denoise(x, sigma)

    for source in ("diffused", "trajectory"):
        estimate_ems(model, samples(gaussian, 10), 0.01, 20.0, N=3, batch_size=4, jvp="finite_difference",
                     samples=source)
    assert batches == {1, 2, 4}  # never more than batch_size rows per call
    estimate_ems(gaussian.denoiser(), samples(gaussian, 10), 0.01, 20.0, N=3, batch_size=4,
                 jvp="finite_difference", progress=lambda done, total: seen.append((done, total)))
    assert len(seen) == 4 * 3  # (N + 1) nodes x ceil(10 / 4) chunks
    assert all(total == 40 for _, total in seen)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen}) and seen[-1][0] == 40


def test_bad_inputs_raise_value_errors():
    gaussian = single_gaussian()
    model, x0 = gaussian.denoiser(), samples(gaussian, 8)
    for bad in (dict(x0=x0.reshape(8, 8)), dict(K=9), dict(sigma_min=5.0, sigma_max=1.0),
                dict(reduction="per_pixel"), dict(jvp="reverse"), dict(model_kind="flow", sigma_max=1.0)):
        args = dict(x0=x0, sigma_min=0.01, sigma_max=0.9)
        args.update(bad)
        with pytest.raises(ValueError):
            estimate_ems(model, args.pop("x0"), args.pop("sigma_min"), args.pop("sigma_max"), N=4, **args)


def test_generate_x0_samples_the_model():
    gaussian = single_gaussian()
    x0 = generate_x0(gaussian.denoiser(), SHAPE, 512, 80.0, 0.002, steps=60, seed=3, dtype=torch.float64,
                     batch_size=512)
    x0 = flat(x0)
    assert torch.allclose(x0.mean(0), MU, atol=4 * (C2 / 512).sqrt().max())
    assert ((x0.var(0) / C2 - 1).abs() < 0.25).all()


# ---- end to end: v3 with estimated EMS against DPM-Solver++(2M) (docs section 6.3) -----------------------------

def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def median_error(sampler, model, noise, reference, n, **options):
    out = sampler(model, noise, karras(n), disable=True, **options)
    return (out - reference).reshape(len(noise), -1).pow(2).mean(1).sqrt().median().item()


@pytest.mark.parametrize("scale, corrector, samples, bound", [
    (1.0, True, "diffused", 0.6), (7.5, False, "diffused", 0.85), (7.5, True, "trajectory", 0.2)])
def test_v3_with_estimated_ems_beats_dpmpp_2m_at_5_to_10_nfe(scale, corrector, samples, bound):
    from dpm_solver_nodes.samplers.v3 import sample_dpm_solver_v3

    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    guided = mixture if scale == 1.0 else GuidedGaussianMixture(mixture, [0, 1], scale)
    model = guided.denoiser()
    # x0: the model's own samples (at guidance 7.5 the data of the ODE actually solved)
    x0 = generate_x0(model, SHAPE, 256, 80.0, 0.002, steps=200, seed=1, dtype=torch.float64, batch_size=256)
    ems = estimate_ems(model, x0, 0.002, 80.0, N=120, reduction="per_element", jvp="finite_difference",
                       batch_size=256, samples=samples)
    noise = sample_noise(100, SHAPE, seed=123) * 80.0
    reference = reference_solution(model, noise, 80.0, 0.0)
    for n in (5, 6, 8, 10):
        v3 = median_error(sample_dpm_solver_v3, model, noise, reference, n, ems=ems, order=2,
                          use_corrector=corrector)
        baseline = median_error(sample_dpmpp_2m, model, noise, reference, n)
        # measured ratios (K=256, N=120, 200 samples) at 5, 6, 8, 10 NFE: guidance 1: 0.40, 0.13, 0.27, 0.36;
        # guidance 7.5, x = x0 + sigma z, corrector off (the official setting at cfg >= 5; on, it diverges: 4-65x
        # worse than 2M): 0.17, 0.03, 0.61, 0.68; guidance 7.5, x on the model's ODE trajectories, corrector on:
        # 0.025, 0.006, 0.063, 0.085
        assert v3 < bound * baseline, (n, v3, baseline)


def test_error_groups_shrink_to_the_moment_memory_cap(monkeypatch, caplog):
    from dpm_solver_nodes.stats import estimate

    gaussian = single_gaussian()
    # 9 moments x 5 nodes x 8 elements x 8 bytes = 2880 bytes per group
    monkeypatch.setattr(estimate, "MAX_MOMENT_BYTES", 3 * 2880)
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        ems = estimate_ems(gaussian.denoiser(), samples(gaussian, 16), 0.01, 20.0, N=4, reduction="per_element",
                           jvp="finite_difference")
    assert ems.metadata["error_groups"] == "3" and "l" in ems.standard_errors
    assert any("error groups" in r.message for r in caplog.records)
    monkeypatch.setattr(estimate, "MAX_MOMENT_BYTES", 100)
    ems = estimate_ems(gaussian.denoiser(), samples(gaussian, 16), 0.01, 20.0, N=4, reduction="per_element",
                       jvp="finite_difference")
    assert ems.metadata["error_groups"] == "1" and ems.standard_errors == {}


def test_forward_ad_runs_under_inference_mode_with_a_module():
    # ComfyUI runs nodes under torch.inference_mode; forward AD must still work (docs/hosts.md 1.6)
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    layer = torch.nn.Linear(8, 8).double()

    def model(x, sigma):
        return mixture.denoise(x + 0 * layer(x.reshape(len(x), 8)).reshape(x.shape), sigma)

    with torch.inference_mode():
        x0 = samples(mixture, 16)
        forward = estimate_ems(model, x0, 0.01, 20.0, N=4, jvp="forward", batch_size=8, reduction="per_element")
        finite = estimate_ems(model, x0, 0.01, 20.0, N=4, jvp="finite_difference", batch_size=8,
                              reduction="per_element")
    assert forward.metadata["estimator"] == "forward_ad"
    assert torch.allclose(forward.l, finite.l, atol=1e-5)


def _two_mode_denoiser(x, sigma, **_):
    """Exact float32 denoiser of a per-element two-mode mixture (modes 0.2 +- 0.6, variance 0.05): f = (1 - l) x - D
    is nearly constant at high noise, so the least-squares slope s is ill-conditioned there."""
    s2 = sigma.reshape(-1, 1, 1, 1).double() ** 2
    xd, v = x.double(), 0.05
    m1, m2 = 0.8, -0.4
    r1 = torch.sigmoid(((xd - m2) ** 2 - (xd - m1) ** 2) / (2 * (v + s2)))
    g = v / (v + s2)
    return (r1 * (m1 + g * (xd - m1)) + (1 - r1) * (m2 + g * (xd - m2))).float()


def test_slope_ridge_keeps_v3_stable_where_f_barely_varies():
    """Measured: without the ridge the cheap EMS (N = 10, K = 8, per channel) give s ~ -200 at the noisiest nodes
    and v3 errors ~1e3-1e10 times those of v3 without EMS (the WebUI integration test found it); with
    the EMSSettings defaults (s_ridge = 0.01 and the +-0.5 window fit) s stays O(1) at high noise and v3 is within a small
    factor of the no-EMS run."""
    from dpm_solver_nodes.samplers import sample_dpm_solver_v3, sample_dpmpp_2m
    from dpm_solver_nodes.stats.settings import EMSSettings

    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 12, dtype=torch.float64)
    sigmas = (14.6146 ** (1 / 7) + ramp * (0.0291675 ** (1 / 7) - 14.6146 ** (1 / 7))) ** 7
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    x = torch.randn(2, 4, 8, 8) * sigmas[0]
    fine = torch.cat([torch.exp(torch.linspace(float(sigmas[0].log()), float(sigmas[-2].log()), 200)),
                      torch.zeros(1)])
    reference = sample_dpmpp_2m(_two_mode_denoiser, x, fine, disable=True)
    x0 = generate_x0(_two_mode_denoiser, (4, 8, 8), 8, 14.6146, 0.0291675, "eps", steps=8, seed=0, batch_size=2)
    defaults = EMSSettings()
    settings = {"paper": {}, "recommended": {"sb_window": defaults.sb_window, "s_ridge": defaults.s_ridge}}
    mse = {}
    for name, options in settings.items():
        ems = estimate_ems(_two_mode_denoiser, x0, 0.0291675, 14.6146, N=10, K=8, reduction="per_channel",
                           jvp="forward", batch_size=2, **options)
        out = sample_dpm_solver_v3(_two_mode_denoiser, x, sigmas, ems=ems, disable=True)
        mse[name] = float(((out - reference) ** 2).mean())
        if name == "recommended":  # the noisy half, where f ~ E f (the clean end keeps a well-conditioned s ~ -14)
            assert ems.s[: len(ems.s) // 2].abs().max() < 5
    plain = float(((sample_dpm_solver_v3(_two_mode_denoiser, x, sigmas, disable=True) - reference) ** 2).mean())
    assert mse["paper"] > 100 * plain            # the failure the ridge exists for
    assert mse["recommended"] < 5 * plain
