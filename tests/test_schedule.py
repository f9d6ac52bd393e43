"""The noise schedule (samplers/schedule.py): alpha, sigma, lambda and their inverses for both model kinds, the
step table, and the checks on a host's sigmas."""
import math

import pytest
import torch

from dpm_solver_nodes.samplers.schedule import (FlowSchedule, StepTable, VarianceExplodingSchedule, check_model_kind,
                                                noise_schedule, validate_sigmas)

EPS, FLOW = noise_schedule("eps"), noise_schedule("flow")


def test_noise_schedule_kinds():
    assert isinstance(EPS, VarianceExplodingSchedule) and EPS.kind == "eps"
    assert isinstance(FLOW, FlowSchedule) and FLOW.kind == "flow"
    with pytest.raises(ValueError, match="model_kind must be one of"):
        noise_schedule("v_prediction")
    with pytest.raises(ValueError, match="'x0'"):
        check_model_kind("x0")


@pytest.mark.parametrize("sigma", [1e-6, 0.01, 0.5, 1.0, 3.0, 80.0, 1e4])
def test_eps_lambda_alpha_sigma(sigma):
    assert EPS.alpha(sigma) == 1.0 and EPS.sigma_t(sigma) == sigma
    assert EPS.lambda_(sigma) == pytest.approx(-math.log(sigma), rel=1e-15, abs=1e-15)
    assert EPS.sigma_from_lambda(EPS.lambda_(sigma)) == pytest.approx(sigma, rel=1e-14)
    t = torch.tensor([sigma], dtype=torch.float64)
    assert EPS.lambda_(t).item() == pytest.approx(EPS.lambda_(sigma), rel=1e-15, abs=1e-15)
    assert EPS.sigma_from_lambda(EPS.lambda_(t)).item() == pytest.approx(sigma, rel=1e-14)
    assert EPS.alpha(t).item() == 1.0


@pytest.mark.parametrize("sigma", [1e-9, 1e-4, 0.01, 0.3, 0.5, 0.9, 0.999, 1 - 1e-9])
def test_flow_lambda_alpha_sigma(sigma):
    # x = (1 - sigma) x0 + sigma n: alpha = 1 - sigma, half log-SNR log((1 - sigma) / sigma).
    assert FLOW.alpha(sigma) == 1 - sigma and FLOW.sigma_t(sigma) == sigma
    assert FLOW.lambda_(sigma) == pytest.approx(math.log((1 - sigma) / sigma), rel=1e-12, abs=1e-12)
    assert FLOW.sigma_from_lambda(FLOW.lambda_(sigma)) == pytest.approx(sigma, rel=1e-13)
    t = torch.tensor([sigma], dtype=torch.float64)
    assert FLOW.lambda_(t).item() == pytest.approx(FLOW.lambda_(sigma), rel=1e-14, abs=1e-14)
    assert FLOW.sigma_from_lambda(FLOW.lambda_(t)).item() == pytest.approx(sigma, rel=1e-13)
    if sigma == 0.5:
        assert FLOW.lambda_(sigma) == 0.0


def test_endpoints_zero_and_one():
    # sigma = 0 is lambda = +inf for both kinds; a flow model's sigma = 1 (pure noise) is lambda = -inf.
    assert EPS.lambda_(0.0) == math.inf and EPS.sigma_from_lambda(math.inf) == 0.0
    assert EPS.lambda_(1.0) == 0.0 and EPS.sigma_from_lambda(0.0) == 1.0
    assert FLOW.lambda_(0.0) == math.inf and FLOW.sigma_from_lambda(math.inf) == 0.0
    assert FLOW.lambda_(1.0) == -math.inf and FLOW.sigma_from_lambda(-math.inf) == 1.0
    assert FLOW.alpha(1.0) == 0.0 and FLOW.alpha(0.0) == 1.0
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert EPS.lambda_(t).tolist() == [math.inf, 0.0]
    assert FLOW.lambda_(t).tolist() == [math.inf, -math.inf]
    lam = torch.tensor([math.inf, -math.inf], dtype=torch.float64)
    assert FLOW.sigma_from_lambda(lam).tolist() == [0.0, 1.0]
    assert EPS.sigma_from_lambda(lam[:1]).tolist() == [0.0]


@pytest.mark.parametrize("lam", [-800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0])
def test_flow_sigma_from_lambda_is_finite_for_extreme_lambda(lam):
    """sigma = 1 / (1 + e^lambda) = sigmoid(-lambda): float and tensor paths agree and never overflow."""
    value = FLOW.sigma_from_lambda(lam)
    tensor = FLOW.sigma_from_lambda(torch.tensor(lam, dtype=torch.float64)).item()
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(tensor, rel=1e-14, abs=1e-300)


def test_half_log_snr_is_consistent_with_alpha_and_sigma():
    for schedule, sigmas in ((EPS, [0.02, 1.0, 14.6]), (FLOW, [0.02, 0.5, 0.97])):
        for s in sigmas:
            assert schedule.lambda_(s) == pytest.approx(math.log(schedule.alpha(s) / schedule.sigma_t(s)), rel=1e-13)


def test_sigma_max_allowed():
    assert EPS.sigma_max_allowed() == math.inf and FLOW.sigma_max_allowed() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# validate_sigmas and StepTable
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigmas, match", [
    ([], "at least 2"),
    ([1.0], "at least 2"),
    ([[1.0, 0.5]], "1-D"),
    ([2.0, float("nan"), 0.0], "NaN or inf"),
    ([float("inf"), 1.0], "NaN or inf"),
    ([1.0, 2.0, 0.0], r"strictly decreasing; sigmas\[0\] = 1 is followed by sigmas\[1\] = 2"),
    ([2.0, 1.0, 1.0, 0.0], r"strictly decreasing; sigmas\[1\]"),
    ([2.0, 0.0, 0.0], "strictly decreasing|positive"),
    ([1.0, -0.5], "positive except for an optional trailing 0"),
])
def test_validate_sigmas_rejects(sigmas, match):
    with pytest.raises(ValueError, match=match):
        validate_sigmas(torch.tensor(sigmas, dtype=torch.float64), EPS)


def test_validate_sigmas_flow_range_and_dtype():
    with pytest.raises(ValueError, match="flow-matching sigmas lie in"):
        validate_sigmas(torch.tensor([14.6, 1.0, 0.0]), FLOW)
    out = validate_sigmas([1.0, 0.5, 0.0], FLOW)  # a list is accepted
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    # float32 sigmas of exactly 1 (Flux) or 1 + rounding are allowed and capped at 1 by the table
    table = StepTable.build(torch.tensor([1.0000001, 0.5, 0.0], dtype=torch.float32), FLOW)
    assert table.sigmas[0] == 1.0 and table.lam[0] == -math.inf


def test_step_table_values():
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    table = StepTable.build(sigmas, EPS)
    assert table.steps == 3
    assert table.lam[:3] == pytest.approx([-math.log(14.6), -math.log(3.0), -math.log(0.5)])
    assert table.lam[3] == math.inf and table.h[2] == math.inf
    assert table.h[0] == pytest.approx(math.log(14.6 / 3.0))
    assert [table.finite_step(i) for i in range(3)] == [True, True, False]
    assert all(isinstance(v, float) for v in table.lam + table.alpha + table.sigma + table.h)
    flow = StepTable.build(torch.tensor([1.0, 0.6, 0.2]), FLOW)
    assert flow.h[0] == math.inf and flow.finite_step(1) and not flow.finite_step(0)
    assert flow.alpha[0] == 0.0 and flow.alpha[1] == pytest.approx(0.4)
