"""DPM-Solver-v3 on the embedded TRAINED model (issue 8): EMS estimated cheaply must beat DPM-Solver++(2M).

The study behind the settings is bench/v3_study.py (tables in bench/results_v3_study.md).  Its diagnosis: on this
model the EMS s and b change by O(1) from one lambda node to the next at high noise (lambda < 0.5), identically in
disjoint sample groups, so it is a property of the network's time dependence, not Monte-Carlo noise (K = 32 and
K = 512 give the same solver errors to 1-3 %).  The official per-node fit samples that roughness at whatever nodes
the grid has, which made v3 erratic in N (N=120, no window: 1.17x 2M's error at 10 NFE at guidance 1).  Fitting s
and b over a +-0.5 window in lambda (``sb_window``) removes it.

Here, on the eps and the flow model at guidance 1 and 5 (the demo's scales; flow on sigma-uniform steps): x0 = 32 of the model's own samples (``generate_x0``, 100 steps,
label k mod 10), EMS by ``estimate_ems`` with the ``EMSSettings`` defaults (N = 200, per_channel, sb_window = 0.5,
crn, forward AD: 12,864 JVP rows, about 10 s CPU at guidance 1 and 12 s at guidance 5 on one thread); v3 with its
defaults (order 2, full pseudo corrector) and our ``sample_dpmpp_2m`` on the same logSNR-uniform sigmas from the
same noise (20 held-out samples), errors against a 300-step DPM-Solver++(3M) reference (converged: 500 vs 1000 steps
differ by 1.1e-5 RMS, the smallest error compared here is 5e-3).

Measured when written (v3 error / 2M error at 5, 6, 8, 10 NFE): guidance 1: 0.71, 0.57, 0.52, 0.62 (seed 0) and
0.72, 0.63, 0.55, 0.63 (seed 1); guidance 5: 0.64, 0.80, 0.62, 0.63.  Asserted: < 0.9 at every one of these NFEs,
and two estimations with different seeds (different x0, noise and probes) give v3 errors within a factor 1.25
(measured <= 1.093).  At guidance 7.5 v3 does not win at 8 NFE (study: 1.00-1.07x 2M); there the estimation-time
check (``check_v3_against_dpmpp_2m``) must make the sampler fall back to DPM-Solver++(2M), with a log line.
About 45 s on one thread (three estimations of ~7 s CPU each, references, 80 short sampler runs).
"""
from __future__ import annotations

import logging

import pytest
import torch

from dpm_solver_nodes.samplers.sigmas import make_sigmas
from dpm_solver_nodes.embedded import load_model
from dpm_solver_nodes.embedded.make_ems import LabelledByRow
from dpm_solver_nodes.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
from dpm_solver_nodes.samplers.v3 import sample_dpm_solver_v3
from dpm_solver_nodes.stats.estimate import (COMOMENT_PAIRS, MEAN_NAMES, check_v3_against_dpmpp_2m, estimate_ems,
                                             generate_x0, smoothed_derivative, statistics_from_moments)
from dpm_solver_nodes.stats.settings import EMSSettings

DEFAULTS = EMSSettings()
# the raw (untuned) fit studied in issue 8; the EMS job's default now tunes the fit (tests/test_tuning.py)
RECOMMENDED_SETTINGS = {"N": 200, "reduction": DEFAULTS.reduction, "sb_window": DEFAULTS.sb_window,
                        "s_ridge": DEFAULTS.s_ridge}

NFES = (5, 6, 8, 10)
SAMPLES = 20
K = 32
MAX_RATIO = 0.9
SEED_FACTOR = 1.25


class Case:
    def __init__(self, cfg, kind="eps"):
        base = load_model(kind)
        self.kind = kind
        self.model = LabelledByRow(base, cfg)
        self.shape = base.shape
        self.sigma_min, self.sigma_max = base.sigma_min, (base.sigma_max if kind == "eps" else 0.999)
        self.noise = torch.randn((SAMPLES,) + tuple(self.shape), generator=torch.Generator().manual_seed(1234))
        sigmas = self.sigmas(300)
        self.reference = sample_dpmpp_3m(self.model, self.noise * sigmas[0], sigmas, disable=True, model_kind=kind,
                                         solver_type="taylor")
        self.ems = {}

    def sigmas(self, n):
        # flow: uniform in sigma (flow time, the spacing of flow hosts' schedulers and of the estimation-time check);
        # on logSNR-uniform flow sigmas v3 ties 2M at 5-6 NFE (measured 1.03, 1.02, 0.94, 0.79 at 5, 6, 8, 10)
        spacing = "logsnr_uniform" if self.kind == "eps" else "time_uniform"
        return make_sigmas(spacing, n, self.kind, self.sigma_min, self.sigma_max).to(torch.float32)

    def estimate(self, seed):
        if seed not in self.ems:
            x0 = generate_x0(self.model, self.shape, K, self.sigma_max, self.sigma_min, self.kind, steps=100,
                             seed=seed, batch_size=50)
            self.ems[seed] = estimate_ems(self.model, x0, self.sigma_min, self.sigma_max, K=K, seed=seed,
                                          batch_size=50, model_kind=self.kind, tune=False,
                                          **RECOMMENDED_SETTINGS)
        return self.ems[seed]

    def error(self, sampler, nfe, **options):
        sigmas = self.sigmas(nfe)
        out = sampler(self.model, self.noise * sigmas[0], sigmas, disable=True, model_kind=self.kind, **options)
        return float((out.double() - self.reference.double()).pow(2).flatten(1).mean(1).sqrt().mean())


@pytest.fixture(scope="module", params=[(1.0, "eps"), (5.0, "eps"), (1.0, "flow"), (5.0, "flow")],
                ids=["eps-cfg1", "eps-cfg5", "flow-cfg1", "flow-cfg5"])
def case(request):
    return Case(*request.param)


def test_window_fit_is_the_least_squares_fit_over_the_window():
    # s = one slope for f' ~ s f + b_j over the window's nodes (within-node scatter), b = window mean of
    # E f' - s E f: computed here directly from the observations of f and f' and compared with the moment formulas
    g = torch.Generator().manual_seed(0)
    nodes, n, P = 41, 64, 3
    lambdas = torch.linspace(-2.0, 2.0, nodes, dtype=torch.float64)
    obs = {name: torch.randn(nodes, n, P, generator=g, dtype=torch.float64) for name in MEAN_NAMES}
    obs["u"] = 0.5 + 0.3 * torch.tanh(lambdas)[:, None, None] + 0.05 * obs["u"]
    obs["D"] = 0.6 * obs["x"] + 0.3 * obs["D"] + torch.sin(3 * lambdas)[:, None, None]
    obs["Ddot"] = 0.4 * obs["D"] - 0.2 * obs["x"] + obs["Ddot"]
    means = torch.stack([obs[k].mean(1) for k in MEAN_NAMES])
    comoments = torch.stack([((obs[p] - obs[p].mean(1, keepdim=True)) * (obs[q] - obs[q].mean(1, keepdim=True))).sum(1)
                             for p, q in COMOMENT_PAIRS])
    count = torch.full((nodes,), float(n), dtype=torch.float64)
    window = 0.5  # +-5 nodes at dlambda = 0.1
    l, s, b = statistics_from_moments(count, means, comoments, lambdas, smooth=5, sb_window=window)
    l0, s0, b0 = statistics_from_moments(count, means, comoments, lambdas, smooth=5)
    assert torch.equal(l, l0) and not torch.allclose(s, s0)
    m = smoothed_derivative(l, lambdas, 5)
    a = (1 - l)[:, None]
    f = a * obs["x"] - obs["D"]
    df = -(m[:, None] + a) * obs["x"] + a * obs["D"] - obs["Ddot"]
    for j in (0, 3, 20, 40):
        near = [k for k in range(nodes) if abs(k - j) <= 5]
        fc = torch.cat([f[k] - f[k].mean(0) for k in near])
        dfc = torch.cat([df[k] - df[k].mean(0) for k in near])
        slope = (fc * dfc).sum(0) / (fc * fc).sum(0)
        intercept = torch.stack([df[k].mean(0) for k in near]).mean(0) - slope * torch.stack(
            [f[k].mean(0) for k in near]).mean(0)
        assert torch.allclose(s[j], slope, rtol=1e-10, atol=1e-12)
        assert torch.allclose(b[j], intercept, rtol=1e-10, atol=1e-12)


def test_default_ems_settings_are_the_studied_ones():
    assert RECOMMENDED_SETTINGS["sb_window"] == 0.5 and RECOMMENDED_SETTINGS["s_ridge"] == 0.01
    assert RECOMMENDED_SETTINGS["reduction"] == "per_channel"


def test_v3_with_cheap_estimated_ems_beats_dpmpp_2m(case):
    ems = case.estimate(0)
    assert ems.metadata["sb_window"] == "0.5"
    assert int(ems.metadata["jvp_rows"]) == 201 * K * 2
    ratios = {nfe: case.error(sample_dpm_solver_v3, nfe, ems=ems) / case.error(sample_dpmpp_2m, nfe) for nfe in NFES}
    assert all(r < MAX_RATIO for r in ratios.values()), ratios


def test_two_estimations_with_different_seeds_agree(case):
    if case.model.cfg_scale != 1.0 or case.kind != "eps":
        pytest.skip("checked at guidance 1 only (time budget); the study measures all scales")
    first, second = case.estimate(0), case.estimate(1)
    assert not torch.equal(first.s, second.s)  # really two estimations
    for nfe in NFES:
        a = case.error(sample_dpm_solver_v3, nfe, ems=first)
        b = case.error(sample_dpm_solver_v3, nfe, ems=second)
        assert max(a, b) / min(a, b) < SEED_FACTOR, (nfe, a, b)
        assert max(a, b) < MAX_RATIO * case.error(sample_dpmpp_2m, nfe)


def test_fallback_to_dpmpp_2m_where_the_estimation_time_check_finds_v3_worse(caplog):
    # guidance 7.5: v3 with these EMS lost to 2M at 8 NFE in the study (1.00-1.07x on 100 held-out samples for four
    # independent estimations) and won at 5, 6, 10 NFE; the check on 50 of the estimator's own samples (seed 0)
    # measured 0.50, 0.77, 1.11, 0.90 at 5, 6, 8, 10 NFE
    case = Case(7.5)
    ems = case.estimate(0)
    checked = check_v3_against_dpmpp_2m(case.model, ems, case.shape, case.sigma_min,
                                        case.sigma_max, seed=0, steps=100)
    ratios = {d.nfe: d.ratio for d in checked.decisions}
    assert all((d.solver == "dpmpp_2m") == (d.ratio >= 1) for d in checked.decisions)
    assert set(NFES) <= set(ratios)
    assert ratios[8] >= 1 and ratios[5] < 1 and ratios[10] < 1, ratios  # the fallback is exercised
    for nfe in NFES:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
            v3 = case.error(sample_dpm_solver_v3, nfe, ems=checked)
        two_m = case.error(sample_dpmpp_2m, nfe)
        fell_back = any("running DPM-Solver++(2M) instead" in r.getMessage() for r in caplog.records)
        assert fell_back == (ratios[nfe] >= 1), (nfe, ratios[nfe])
        if fell_back:
            assert v3 == two_m  # the very same solver
        else:
            assert v3 < two_m, (nfe, v3, two_m)
    # without the check's metadata (or with fallback=False) v3 runs as it is
    assert case.error(sample_dpm_solver_v3, 8, ems=checked, fallback=False) == case.error(
        sample_dpm_solver_v3, 8, ems=ems)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_shipped_flow_ems_on_the_hosts_shift3_schedule(cfg):
    """The shipped flow EMS were tuned on steps uniform in sigma; on the flow hosts' default (shift 3, whose final
    jump from sigma 0.13-0.38 into 0 is most of the error) v3's default path stays level with the best of our
    DPM-Solver++(2M), (3M) and UniPC there (measured 0.89-1.00x at 5-20 steps, 100 samples), because its final
    step extrapolates D to sigma = 0 as the 2M does (with the plain denoise: 1.05-1.08x at guidance 1)."""
    from dpm_solver_nodes.embedded.make_ems import ems_path
    from dpm_solver_nodes.samplers.sigmas import shifted
    from dpm_solver_nodes.samplers.unipc import sample_unipc
    from dpm_solver_nodes.stats.ems import load_ems

    base = load_model("flow")
    model = LabelledByRow(base, cfg).double()
    ems = load_ems(ems_path("flow", cfg))
    x = torch.randn((60,) + tuple(base.shape), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    fine = make_sigmas("logsnr_uniform", 400, "flow", base.sigma_min)
    reference = sample_dpmpp_3m(model, x, fine, disable=True, model_kind="flow", solver_type="taylor")

    def error(out):
        return float((out - reference).pow(2).flatten(1).mean(1).sqrt().mean())

    for steps in (6, 10, 20):
        sigmas = shifted(steps, 3.0)
        v3 = error(sample_dpm_solver_v3(model, x, sigmas, ems=ems, model_kind="flow", disable=True))
        pack = min(error(solver(model, x, sigmas, model_kind="flow", disable=True))
                   for solver in (sample_dpmpp_2m, sample_dpmpp_3m, sample_unipc))
        assert v3 <= 1.03 * pack, (steps, v3, pack)
