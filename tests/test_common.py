"""Shared pieces: psi/phi functions and Taylor coefficients (samplers/exponential.py) and the sampling-loop
plumbing (samplers/common.py): input checks, the NaN check naming step and sigma, order policy, thresholding."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture
from dpm_solver_nodes.samplers import sample_dpmpp_2m, sample_dpmpp_2s, sample_dpmpp_3m
from dpm_solver_nodes.samplers.common import NonFiniteError, SamplerRun, dynamic_threshold
from dpm_solver_nodes.samplers.exponential import (data_prediction_step, divided_differences, noise_prediction_step,
                                                   phi, psi, taylor_derivatives)
from dpm_solver_nodes.samplers.schedule import StepTable, noise_schedule

H_VALUES = [1e-4, 0.3, 2.0, 10.0, -0.3]


def quadrature(weight_sign, k, h):
    """integral_0^h e^{sign (h - tau)} tau^{k-1} / (k-1)! dtau by adaptive Gauss-Kronrod (scipy)."""
    value, _ = quad(lambda tau: math.exp(weight_sign * (h - tau)) * tau ** (k - 1) / math.factorial(k - 1), 0.0, h,
                    epsabs=0.0, epsrel=1e-13, limit=200)
    return value


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("h", H_VALUES)
def test_psi_matches_quadrature(k, h):
    assert psi(k, h) == pytest.approx(quadrature(-1, k, h), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("h", H_VALUES)
def test_phi_matches_quadrature(k, h):
    assert phi(k, h) == pytest.approx(quadrature(+1, k, h), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_psi_is_continuous_where_series_meets_recurrence(k):
    below, above = psi(k, 1.0 - 1e-12), psi(k, 1.0 + 1e-12)
    assert below == pytest.approx(above, rel=1e-10)
    assert below == pytest.approx(quadrature(-1, k, 1.0), rel=1e-10)


def test_psi_closed_forms_and_limits():
    h = 0.7
    assert psi(1, h) == pytest.approx(1 - math.exp(-h), rel=1e-15)
    assert psi(2, h) == pytest.approx(h - 1 + math.exp(-h), rel=1e-14)
    assert phi(1, h) == pytest.approx(math.expm1(h), rel=1e-15)
    assert psi(1, math.inf) == 1.0  # the step into sigma = 0
    with pytest.raises(ValueError, match="first order"):
        psi(2, math.inf)
    with pytest.raises(ValueError, match="k >= 1"):
        psi(0, 0.5)


def test_taylor_derivatives_exact_on_polynomials():
    rng = np.random.default_rng(0)
    for degree in range(4):
        coeffs = rng.normal(size=degree + 1)  # p(l) = sum_j c_j l^j
        lams = [0.7, 0.31, -0.2, -1.05][:degree + 1]  # newest first, unequal spacing
        values = [torch.tensor([np.polyval(coeffs[::-1], lam)], dtype=torch.float64) for lam in lams]
        derivs = taylor_derivatives(lams, values)
        poly = np.polynomial.Polynomial(coeffs)
        for m, d in enumerate(derivs):
            assert d.item() == pytest.approx(poly.deriv(m)(lams[0]) if m else poly(lams[0]), rel=1e-11, abs=1e-11)
    # with more points than the degree needs the extra derivatives vanish
    values = [torch.tensor([2.0 * lam - 1.0], dtype=torch.float64) for lam in (0.5, 0.2, -0.4)]
    derivs = taylor_derivatives([0.5, 0.2, -0.4], values)
    assert [d.item() for d in derivs] == pytest.approx([0.0, 2.0, 0.0], abs=1e-12)


def test_divided_differences_are_newton_coefficients():
    lams = [1.0, 0.5, -0.25]
    values = [torch.tensor(v) for v in (3.0, 1.0, 2.0)]
    dd = divided_differences(lams, values)
    assert dd[1].item() == pytest.approx((3.0 - 1.0) / 0.5)
    assert dd[2].item() == pytest.approx(((3.0 - 1.0) / 0.5 - (1.0 - 2.0) / 0.75) / 1.25)


@pytest.mark.parametrize("model_kind", ["eps", "flow"])
def test_data_and_noise_prediction_steps_agree_for_constant_predictions(model_kind):
    """With D constant (and eps = (x - alpha D) / sigma constant along the exact path) both integrators are
    exact, so a data-prediction step and a noise-prediction step from the same point must agree."""
    schedule = noise_schedule(model_kind)
    sigmas = [0.8, 0.3] if model_kind == "flow" else [6.0, 0.7]
    table = StepTable.build(torch.tensor(sigmas, dtype=torch.float64), schedule)
    x0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    n = torch.tensor([1.1, 0.4], dtype=torch.float64)
    x = table.alpha[0] * x0 + table.sigma[0] * n
    exact = table.alpha[1] * x0 + table.sigma[1] * n  # the ODE path of a point mass keeps n fixed
    by_data = data_prediction_step(x, table, 0, [x0])
    by_noise = noise_prediction_step(x, table, 0, [n])
    torch.testing.assert_close(by_data, exact, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(by_noise, exact, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# SamplerRun: bad input, NaN checks, orders
# ---------------------------------------------------------------------------------------------------------------

MIXTURE = GaussianMixture.random(dim=8, components=3, seed=0)
SIGMAS = torch.tensor([14.6, 5.0, 2.0, 0.8, 0.3, 0.0], dtype=torch.float64)
SAMPLERS = [sample_dpmpp_2m, sample_dpmpp_3m, sample_dpmpp_2s]


def latent(batch=2):
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sigmas, match", [
    (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    (torch.tensor([], dtype=torch.float64), "at least 2"),
    (torch.tensor([3.0]), "at least 2"),
    (torch.tensor([3.0, float("nan"), 0.0]), "NaN or inf"),
])
def test_bad_sigmas(sampler, sigmas, match):
    with pytest.raises(ValueError, match=match):
        sampler(MIXTURE.denoiser(), latent(), sigmas, disable=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_model_returning_nonfinite_names_step_and_sigma(sampler, bad):
    good = MIXTURE.denoiser()
    calls = []

    def model(x, sigma, **extra):
        calls.append(1)
        out = good(x, sigma)
        if float(sigma[0]) == 2.0:
            out[0, 3] = bad
        return out

    with pytest.raises(NonFiniteError, match=r"at step 2 \(sigma = 2\)") as info:
        sampler(model, latent(), SIGMAS, disable=True)
    assert isinstance(info.value, ValueError) and "precision" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_latent(bad):
    x = latent()
    x[1, 0] = bad
    with pytest.raises(ValueError, match="input latent x contains NaN or inf"):
        sample_dpmpp_2m(MIXTURE.denoiser(), x, SIGMAS, disable=True)


@pytest.mark.parametrize("options, match", [
    ({"model_kind": "v"}, "model_kind must be one of"),
    ({"final_step": "last"}, "final_step must be one of"),
    ({"solver_type": "heun"}, "solver_type must be one of"),
    ({"threshold_percentile": 1.5}, "threshold_percentile must lie in"),
    ({"threshold_percentile": 0.99, "threshold_max": 0.5}, "threshold_max must be >= 1"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        sample_dpmpp_2m(MIXTURE.denoiser(), latent(), SIGMAS, disable=True, **options)


def test_bad_latent_and_2s_ratio():
    with pytest.raises(ValueError, match="batched tensor"):
        sample_dpmpp_2m(MIXTURE.denoiser(), torch.zeros(8), SIGMAS, disable=True)
    with pytest.raises(ValueError, match="r must lie strictly between 0 and 1"):
        sample_dpmpp_2s(MIXTURE.denoiser(), latent(), SIGMAS, r=1.0, disable=True)
    with pytest.raises(ValueError, match="final_step='stop' needs"):
        sample_dpmpp_2m(MIXTURE.denoiser(), latent(), torch.tensor([1.0, 0.0]), final_step="stop", disable=True)
    with pytest.raises(ValueError, match="flow-matching sigmas lie in"):
        sample_dpmpp_2m(MIXTURE.denoiser("flow"), latent(), SIGMAS, model_kind="flow", disable=True)


def test_order_policy():
    run = SamplerRun(MIXTURE.denoiser(), latent(), SIGMAS)  # 5 steps, the last into sigma = 0
    assert run.steps == 5
    # warm-up capped by history, lower_order_final caps by the steps left, the step into 0 is first order
    assert [run.order(i, 3, False, i + 1) for i in range(5)] == [1, 2, 3, 3, 1]
    assert [run.order(i, 3, True, i + 1) for i in range(5)] == [1, 2, 3, 2, 1]
    assert run.default_lower_order_final(None) is True  # 5 < 15 steps
    long = SamplerRun(MIXTURE.denoiser(), latent(), torch.linspace(10, 0.1, 16, dtype=torch.float64))
    assert long.steps == 15 and long.default_lower_order_final(None) is False
    assert long.default_lower_order_final(1) is True
    flow = SamplerRun(MIXTURE.denoiser("flow"), latent(), torch.tensor([1.0, 0.5, 0.2]), model_kind="flow")
    # out of sigma = 1 (h = inf): a multistep method has one point of history there; a singlestep one keeps its order
    # with stages in rho = -log sigma (exponential.step_out_of_sigma_one)
    assert flow.order(0, 3, False, 1) == 1 and flow.order(0, 3, False, 3) == 3


def test_final_step_stop_drops_trailing_zero():
    run = SamplerRun(MIXTURE.denoiser(), latent(), SIGMAS, final_step="stop")
    assert run.steps == 4 and run.table.sigmas[-1] == 0.3 and run.sigmas.tolist()[-1] == 0.3
    run = SamplerRun(MIXTURE.denoiser(), latent(), SIGMAS[:-1], final_step="stop")  # no trailing 0: unchanged
    assert run.steps == 4


def test_denoise_counts_calls_and_passes_extra_args():
    seen = {}

    def model(x, sigma, **extra):
        seen.update(extra, dtype=x.dtype, sigma=sigma.clone())
        return x * 0

    run = SamplerRun(model, latent(3).half(), SIGMAS, extra_args={"cond": "c"})
    out = run.denoise(run.start(latent(3).half()), 1)
    assert seen["cond"] == "c" and seen["dtype"] == torch.float16  # the model sees the latent's dtype
    assert seen["sigma"].tolist() == [5.0, 5.0, 5.0] and out.dtype == torch.float32 and run.nfe == 1
    run.denoise(out, 1, sigma=3.5)
    assert seen["sigma"].tolist() == [3.5] * 3 and run.nfe == 2


# ---------------------------------------------------------------------------------------------------------------
# Dynamic thresholding
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("percentile, max_value", [(0.995, 1.5), (0.9, 3.0), (0.5, 1.0)])
def test_dynamic_threshold_is_imagen_formula(percentile, max_value):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * torch.tensor([0.3, 1.2, 2.0, 4.0],
                                                                                    dtype=torch.float64)[:, None, None,
                                                                                                         None]
    out = dynamic_threshold(x0, percentile, max_value)
    for b in range(4):
        flat = x0[b].abs().flatten().numpy()
        s = min(max(float(np.quantile(flat, percentile)), 1.0), max_value)  # Saharia et al. 2022, Sec. 2.3
        expected = np.clip(x0[b].numpy(), -s, s) / s
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert out[b].abs().max().item() <= 1.0 + 1e-6
    assert out.dtype == x0.dtype and out.shape == x0.shape


def test_thresholding_inside_a_sampler_bounds_the_prediction():
    seen = []
    big = GaussianMixture(torch.tensor([[3.0] * 8, [-3.0] * 8]), torch.full((2, 8), 0.2))
    out = sample_dpmpp_2m(big.denoiser(), latent(), SIGMAS, threshold_percentile=0.9, threshold_max=2.0,
                          callback=seen.append, disable=True)
    for d in seen:
        assert d["denoised"].abs().max().item() <= 1.0 + 1e-6
        raw = big.denoise(d["x"], d["sigma"].expand(2))
        torch.testing.assert_close(d["denoised"], dynamic_threshold(raw, 0.9, 2.0))
    assert out.abs().max().item() <= 1.0 + 1e-6  # the last step into 0 returns the thresholded prediction
