"""What the EMS job costs and tells its user (issue 12's cost, issue 14's estimate and outcome): the planned model rows
and calls per phase are the measured ones, the tuning never spends more than the estimation and shrinks with the
settings, lockstep tuning measures what the run-by-run tuning measures in far fewer calls, the status line and the
first-chunk log line, an Interrupt during the tuning, the one-sided differences, and the outcome text."""
from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture
from dpm_solver_nodes.samplers.ems_data import NFEDecision, summarize_decisions
from dpm_solver_nodes.stats import EMSJob, EMSJobInterrupted, EMSSettings, EMSStore, EMSTarget, ModelAccess
from dpm_solver_nodes.stats import job as job_module
from dpm_solver_nodes.stats import tuning
from dpm_solver_nodes.stats.estimate import estimate_ems

SIGMA_MIN, SIGMA_MAX = 0.03, 14.6
SHAPE = (4, 1, 1)


def _model(seed=3):
    mixture = GaussianMixture.random(dim=4, components=3, seed=seed)
    denoiser = mixture.denoiser("eps")

    def model(x, sigma, **_):
        return denoiser(x.reshape(x.shape[0], -1).double(), sigma.double()).reshape(x.shape).to(x.dtype)

    return model


def _target(cfg=5.0):
    return EMSTarget("cost-model", "eps", cfg, SHAPE, SIGMA_MIN, SIGMA_MAX)


class CountingAccess(ModelAccess):
    """``ModelAccess`` that counts model calls and rows per phase."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.calls, self.rows = {}, {}

    def run(self, phase, work):
        def counted(x, sigma, **extra):
            self.calls[phase] = self.calls.get(phase, 0) + 1
            self.rows[phase] = self.rows.get(phase, 0) + int(x.shape[0])
            return self.model(x, sigma, **extra)

        return work(counted, self.extra_args, self.device)


@pytest.mark.parametrize("jvp, dtype, rows_independent, backend", [
    ("auto", None, False, "auto"),                              # forward AD, tuning run by run
    ("auto", torch.float32, True, "one_sided_difference"),      # what ComfyUI on a CPU runs
    ("finite_difference", None, True, "finite_difference"),
])
def test_planned_rows_and_calls_are_the_measured_ones(jvp, dtype, rows_independent, backend):
    settings = EMSSettings(N=48, K=16, x0_steps=10, jvp=jvp)
    job = EMSJob(_target(), settings, batch_size=8)
    access = CountingAccess(_model(), network_dtype=dtype, rows_independent=rows_independent)
    assert job_module.resolve_jvp(jvp, dtype) == backend
    ems = job.compute(access)
    plan, calls = job.plan(access), job.calls(access)
    assert "tuning" in ems.metadata and plan["check"] == 0
    for phase in ("x0", "estimate"):
        assert access.rows[phase] == plan[phase] and access.calls[phase] == calls[phase], phase
    # a report-set v3 run happens only where v3 won the selection: the plan is an upper bound by those runs
    report_v3 = settings.tuning_plan()[0] * sum(settings.check_nfes)
    assert plan["tune"] - report_v3 <= access.rows["tune"] <= plan["tune"]
    assert access.calls["tune"] <= calls["tune"]
    assert access.rows["tune"] <= settings.tuning_budget()  # issue 12: at most the estimation's model calls
    assert {p: v["rows"] for p, v in job.phases.items()} == access.rows
    assert all(v["seconds"] >= 0 for v in job.phases.values())
    expected = {"auto": "forward_ad", "one_sided_difference": "one_sided_difference",
                "finite_difference": "finite_difference"}[backend]
    assert ems.metadata["estimator"].startswith(expected)
    cost = job.cost(access)
    assert cost["total"] == sum(v for k, v in cost.items() if k != "total")
    assert cost["x0"] == 2 * plan["x0"]  # cfg 5: two network rows per sample


def test_the_tuning_stays_within_the_estimation_and_scales_with_the_settings():
    """The tuning's rows never exceed the estimation's model evaluations; a larger N x K buys more tuning samples
    (up to 16 per set) or, below the full candidate set's minimum, the two ends of the fit family; only budgets
    below even that fall back to the check, itself within the budget."""
    for guided, pack in ((True, 1), (False, 2)):
        previous = 0
        for N, K in ((20, 8), (48, 16), (64, 16), (100, 16), (100, 32), (200, 32), (400, 64)):
            settings = EMSSettings(N=N, K=K)
            samples, fits = settings.tuning_plan(guided)
            rows = tuning.tuning_rows(samples, settings.check_nfes, len(fits), pack=pack) if samples else 0
            assert rows <= settings.tuning_budget(), (N, K)
            assert rows >= previous, (N, K)
            previous = rows
            if not samples:
                check_samples, steps, nfes = settings.check_plan()
                assert check_samples * (steps + 2 * sum(nfes)) <= settings.tuning_budget()
    # 1,458 rows: the two ends of the family need 1,552 with both pack solvers, 1,424 with the guided model's one
    assert EMSSettings(N=180, K=4).tuning_plan(guided=False) == (0, ())
    assert EMSSettings(N=180, K=4).tuning_plan(guided=True)[0] == 2
    assert EMSSettings(N=20, K=8).tuning_plan() == (0, ())
    assert [f.name for f in EMSSettings(N=48, K=16).tuning_plan()[1]] == list(tuning.FAMILY_ENDS)
    assert EMSSettings(N=64, K=16).tuning_plan() == (2, tuning.FITS)
    # a guided model's selection runs neither the 3M nor the order-3 predictor: one sample more in the same rows
    assert EMSSettings(N=100, K=32).tuning_plan() == (7, tuning.FITS)
    assert EMSSettings(N=100, K=32).tuning_plan(guided=False) == (6, tuning.FITS)
    assert EMSSettings(N=400, K=64).tuning_plan() == (tuning.MAX_SAMPLES, tuning.FITS)
    assert EMSSettings(N=400, K=64, tune=False).tuning_plan() == (0, ())


def test_lockstep_tuning_measures_what_the_run_by_run_tuning_measures():
    """Same moments, same noise: the same fit, decisions and stored ratios (to rounding), the same rows, and a
    fraction of the model calls."""
    model = _model(seed=5)
    x0 = GaussianMixture.random(dim=4, components=3, seed=5).sample(
        32, generator=torch.Generator().manual_seed(1)).reshape(32, *SHAPE).float()
    ems, state = estimate_ems(model, x0, SIGMA_MIN, SIGMA_MAX, N=64, K=32, return_state=True)
    runs = {}
    for batch_rows in (None, 48):
        runs[batch_rows] = tuning.tune(model, state, ems.lambdas, ems.stat_shape, SIGMA_MIN, SIGMA_MAX, samples=3,
                                       metadata=dict(ems.metadata), batch_rows=batch_rows)
    (alone, alone_report), (together, together_report) = runs[None], runs[48]
    assert together_report["fit"] == alone_report["fit"]
    assert [(d.nfe, d.solver, d.corrector) for d in together.decisions] == \
        [(d.nfe, d.solver, d.corrector) for d in alone.decisions]
    for a, b in zip(alone.decisions, together.decisions):
        assert b.ratio == pytest.approx(a.ratio, rel=1e-5)
    assert together_report["rows"] == alone_report["rows"]
    assert together_report["calls"] * 4 <= alone_report["calls"], (together_report["calls"], alone_report["calls"])
    assert together_report["calls"] <= tuning.tuning_calls(3, batch_rows=48)


def test_lockstep_answers_every_run_and_stops_them_all_on_an_exception():
    def model(x, sigma, **_):
        return x * sigma.reshape(-1, 1)

    def job(steps, fail_at=None):
        def run(m):
            x = torch.ones(steps, 2)
            for step in range(steps):
                if step == fail_at:
                    raise ArithmeticError("a run's own failure")
                x = m(x, torch.full((steps,), 0.5))
            return x

        return run

    lockstep = tuning.Lockstep(model, batch_rows=4)
    results = lockstep.run([job(1), job(2), job(3), job(5)])
    assert [torch.equal(r, torch.full((n, 2), 0.5 ** n)) for r, n in zip(results, (1, 2, 3, 5))] == [True] * 4
    assert lockstep.calls == 3 + 3 + 2 + 2 + 2  # rows 11, 10, 8, 5, 5 at steps 1-5 in calls of at most 4 rows
    threads = threading.active_count()
    with pytest.raises(ArithmeticError):  # a run's own exception ends the others
        tuning.Lockstep(model, batch_rows=64).run([job(5), job(5, fail_at=2), job(40)])
    calls = []

    def failing(x, sigma, **_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("Interrupt")
        return x

    with pytest.raises(KeyboardInterrupt):  # so does the model's (ComfyUI's Interrupt)
        tuning.Lockstep(failing, batch_rows=64).run([job(5), job(5), job(4)])
    assert len(calls) == 2
    assert threading.active_count() == threads  # every run was ended, no thread left waiting


def test_status_line_and_first_chunk_log_say_the_phase_and_the_time_left(caplog):
    texts = []
    job = EMSJob(_target(), EMSSettings(N=48, K=16, x0_steps=10), batch_size=4)
    with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
        job.compute(CountingAccess(_model(), rows_independent=True), status=texts.append)
    for title in ("generating the model's samples", "estimating the statistics", "tuning the fit"):
        assert any(title in text for text in texts), title
    assert "timing the first call" in texts[0]
    assert all("left" in text for text in texts[1:])
    assert any("model call" in text for text in texts)
    first = [r.getMessage() for r in caplog.records if "the first" in r.getMessage()]
    assert len(first) == 2 and "x0 chunk" in first[0] and "estimation chunk" in first[1]


def test_interrupt_during_the_tuning_keeps_the_estimation():
    """Interrupt is asked before every model call of the tuning too (it used to run inside the estimator, which
    asks only between its chunks); the rerun goes straight to the tuning and gives the uninterrupted result."""
    model = _model()
    settings = EMSSettings(N=48, K=16, x0_steps=10)
    reference_access = CountingAccess(model, rows_independent=True)
    reference = EMSJob(_target(), settings, batch_size=8).compute(reference_access)
    before_tuning = reference_access.calls["x0"] + reference_access.calls["estimate"]
    access = CountingAccess(model, rows_independent=True)
    job = EMSJob(_target(), settings, batch_size=8)
    with pytest.raises(EMSJobInterrupted) as caught:
        job.compute(access, should_stop=lambda: sum(access.calls.values()) >= before_tuning + 5)
    assert caught.value.phase == "tune" and caught.value.state.ems is not None
    again = CountingAccess(model, rows_independent=True)
    result = job.compute(again, resume=caught.value.state)
    assert set(again.calls) == {"tune"} and again.calls["tune"] == reference_access.calls["tune"]
    assert result.decisions == reference.decisions and torch.equal(result.s, reference.s)


def test_run_logs_the_cost_up_front_and_the_measured_phases(tmp_path, caplog):
    job = EMSJob(_target(), EMSSettings(N=48, K=16, x0_steps=10), batch_size=16)
    with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
        result = job.run(CountingAccess(_model(), network_dtype=torch.float32, rows_independent=True),
                         EMSStore([str(tmp_path)]))
    messages = [r.getMessage() for r in caplog.records]
    up_front = next(m for m in messages if "computing EMS" in m)
    cost = job.cost(ModelAccess(None, network_dtype=torch.float32))
    assert f"{cost['total']:,} model rows" in up_front and "JVP by one_sided_difference" in up_front
    assert "model calls of up to 16 samples" in up_front
    assert any(m.startswith("DPM-Solver-v3 EMS: measured x0") for m in messages)
    assert set(result.phases) == {"x0", "estimate", "tune"}


def test_one_sided_differences_agree_with_forward_ad():
    """Fewer model rows (3 instead of 5 per sample and node) for what forward AD computes: in float64 the EMS agree
    to the O(h) truncation (1e-4 of their size here), far inside the jackknife standard errors."""
    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    x0 = mixture.sample(32, generator=torch.Generator().manual_seed(1)).reshape(32, 8, 1, 1)
    kwargs = dict(N=8, reduction="per_element", batch_size=32, seed=2, tune=False)
    forward = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, jvp="forward", **kwargs)
    one_sided = estimate_ems(mixture.denoiser(), x0, 0.01, 20.0, jvp="one_sided_difference", **kwargs)
    assert one_sided.metadata["estimator"] == "one_sided_difference(h=0.001)"
    assert int(one_sided.metadata["forward_rows"]) == 9 * 32 * 3 + 10
    for name in ("l", "s", "b"):
        a, b = getattr(forward, name), getattr(one_sided, name)
        assert float((a - b).abs().max()) <= 2e-4 * float(a.abs().max()), name
        assert float(((a - b).abs() / forward.standard_errors[name].clamp(min=1e-12)).max()) < 0.05, name


def test_decision_summary_says_which_solver_runs_at_which_step_count():
    decisions = [NFEDecision(5, "dpmpp_2m", 1.0), NFEDecision(6, "v3", 0.69), NFEDecision(8, "v3", 0.61, False),
                 NFEDecision(10, "v3", 0.77), NFEDecision(15, "dpmpp_3m", 1.0)]
    assert summarize_decisions(decisions) == (
        "v3 at 6, 8, 10 steps (0.61-0.77x the error of the best other solver measured), corrector off at 8; DPM-Solver++(2M) at 5 "
        "steps; DPM-Solver++(3M) at 15 steps; other step counts follow the nearest")
    assert summarize_decisions([]) == "v3 at every step count (these EMS carry no per-step decisions)"
    assert summarize_decisions([(8, "dpmpp_2m", 1.0)]).startswith("v3 at no step count; DPM-Solver++(2M) at 8")
    with pytest.raises(ValueError, match="decision solver"):
        summarize_decisions([(8, "euler", 1.0)])


def test_chunks_across_grid_nodes_give_the_same_statistics_in_fewer_calls():
    """A model whose rows are independent gets batch_size samples per call even where K is smaller: the chunks then
    span grid nodes.  The moments are the same to rounding; an interrupted run resumes in the middle of a chunk's
    nodes."""
    mixture = GaussianMixture.random(dim=4, components=3, seed=7)
    x0 = mixture.sample(4, generator=torch.Generator().manual_seed(2)).reshape(4, *SHAPE).float()
    model = _model(seed=7)
    calls = []

    def counted(x, sigma, **kwargs):
        calls.append(x.shape[0])
        return model(x, sigma, **kwargs)

    kwargs = dict(N=30, K=4, batch_size=24, tune=False, jvp="one_sided_difference")
    per_node = estimate_ems(counted, x0, SIGMA_MIN, SIGMA_MAX, **kwargs)
    per_node_calls, calls[:] = len(calls), []
    across = estimate_ems(counted, x0, SIGMA_MIN, SIGMA_MAX, rows_independent=True, **kwargs)
    assert max(calls) == 24 and len(calls) - 10 == -(-31 * 4 // 24) * 3 and per_node_calls - 10 == 31 * 3
    for name in ("l", "s", "b"):
        assert torch.allclose(getattr(across, name), getattr(per_node, name), rtol=1e-5, atol=1e-6), name
    stops = iter([False, False, True])
    with pytest.raises(Exception) as caught:
        estimate_ems(counted, x0, SIGMA_MIN, SIGMA_MAX, rows_independent=True, should_stop=lambda: next(stops),
                     **kwargs)
    state = caught.value.state
    assert (state.node, state.samples_done) == (12, 0)  # two chunks of 24 samples: six nodes each
    resumed = estimate_ems(counted, x0, SIGMA_MIN, SIGMA_MAX, rows_independent=True, resume_state=state, **kwargs)
    for name in ("l", "s", "b"):
        assert torch.equal(getattr(resumed, name), getattr(across, name)), name


def test_references_alongside_the_estimation_change_nothing_but_the_calls():
    """With one-sided differences and independent rows, the tuning's reference solutions share the estimation's
    model calls: the EMS and decisions are those of the job run call by call, the tuning phase has a hundred fewer
    calls."""
    settings = EMSSettings(N=48, K=16, x0_steps=10, jvp="one_sided_difference")
    results = {}
    for independent in (False, True):
        access = CountingAccess(_model(), rows_independent=independent)
        job = EMSJob(_target(), settings, batch_size=16)
        assert job.overlap(access) == (2 if independent else 0)
        results[independent] = (job.compute(access), access)
    (alone, alone_access), (shared, shared_access) = results[False], results[True]
    assert [(d.nfe, d.solver, d.corrector) for d in shared.decisions] == \
        [(d.nfe, d.solver, d.corrector) for d in alone.decisions]
    for a, b in zip(alone.decisions, shared.decisions):
        assert b.ratio == pytest.approx(a.ratio, rel=1e-5)
    for name in ("l", "s", "b"):
        assert torch.allclose(getattr(shared, name), getattr(alone, name), rtol=1e-5, atol=1e-6), name
    steps = tuning.REFERENCE_FACTOR * max(settings.check_nfes)
    assert shared_access.rows["estimate"] == alone_access.rows["estimate"] + 4 * steps
    assert shared_access.rows["tune"] == alone_access.rows["tune"] - 4 * steps
    assert shared_access.calls["tune"] + 2 * steps <= alone_access.calls["tune"]
    assert sum(shared_access.calls.values()) < sum(alone_access.calls.values()) / 2
    assert json.loads(shared.metadata["tuning"])["rows"] == json.loads(alone.metadata["tuning"])["rows"]


def test_the_status_counts_model_calls_also_where_runs_share_them():
    texts = []
    access = CountingAccess(_model(), network_dtype=torch.float32, rows_independent=True)
    job = EMSJob(_target(), EMSSettings(N=48, K=16, x0_steps=10), batch_size=16)
    assert job.overlap(access)
    job.compute(access, status=texts.append)
    planned = job.calls(access)["total"]
    counted = [int(text.split("model call ")[1].split(" ")[0].replace(",", "")) for text in texts
               if "model call " in text]
    assert counted == sorted(counted) and counted[-1] <= sum(access.calls.values()) <= planned


def test_interrupt_while_the_references_share_the_estimations_calls_resumes_the_estimation():
    model = _model()
    settings = EMSSettings(N=48, K=16, x0_steps=10)
    plain = CountingAccess(model, network_dtype=torch.float32, rows_independent=True)
    reference = EMSJob(_target(), settings, batch_size=16).compute(plain)
    access = CountingAccess(model, network_dtype=torch.float32, rows_independent=True)
    job = EMSJob(_target(), settings, batch_size=16)
    assert job.overlap(access)
    threads = threading.active_count()
    with pytest.raises(EMSJobInterrupted) as caught:
        job.compute(access, should_stop=lambda: access.calls.get("estimate", 0) >= 30)
    assert caught.value.phase == "estimate" and caught.value.state.estimation.node > 0
    assert threading.active_count() == threads
    result = job.compute(CountingAccess(model, network_dtype=torch.float32, rows_independent=True),
                         resume=caught.value.state)
    assert torch.equal(result.l, reference.l) and torch.equal(result.s, reference.s)
    assert result.decisions == reference.decisions
