"""Self-tuning EMS (stats/tuning.py, issue 12) on analytic Gaussian mixtures nobody tuned on: the default path
``estimate_ems(model, x0, sigma_min, sigma_max)`` + ``sample_dpm_solver_v3(model, x, sigmas, ems=ems)`` against the
best of our DPM-Solver++(2M), (3M) and diffusers' UniPC bh2 (eps), all measured against the exact ODE solution
(DOP853, rtol 1e-12) from noise that neither the estimation nor the tuning saw."""
import math

import pytest
import torch

from dpm_solver_nodes.analytic import GaussianMixture, GuidedGaussianMixture, reference_solution
from dpm_solver_nodes.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
from dpm_solver_nodes.samplers.unipc import sample_unipc
from dpm_solver_nodes.samplers.v3 import sample_dpm_solver_v3
from dpm_solver_nodes.stats import tuning
from dpm_solver_nodes.stats.estimate import estimate_ems, generate_x0

NFES = (5, 6, 8, 10)
# 512, not 64: on the eps mixture (seed 11) one of 64 evaluation samples lies on a mode boundary, where v3 at 10 NFE
# sends it to the other mode (per-sample RMS 1.7-1.8, the median 0.045) or not depending on EMS details far below
# the estimation's noise (it flips between estimation seeds 0 and 1 even at K = 512): 0.027 of the 64-sample mean,
# a quarter of UniPC's error there.  That made the 10-NFE ratio 1.08 (seed 0) vs 0.65 (seed 1) and the two seeds'
# errors 0.108 vs 0.065; over 512 samples (eval seeds 987 and 555) the ratios are 0.83 / 0.76 (estimation seed 0)
# and 0.65 / 0.63 (seed 1), the seeds' errors within 1.28x
EVAL_SAMPLES = 512
# (mixture seed, dim, components, model kind, guidance): none of these mixtures was looked at while choosing FITS
CASES = [(11, 8, 6, "eps", 1.0), (12, 6, 4, "eps", 7.5), (13, 10, 5, "flow", 1.0), (14, 7, 7, "flow", 10.0)]
BOUND = {1.0: 0.9, 7.5: 1.0, 10.0: 1.0}
_CACHE = {}


def _setup(seed, dim, components, kind, cfg, estimation_seed=0):
    key = (seed, dim, components, kind, cfg, estimation_seed)
    if key not in _CACHE:
        mixture = GaussianMixture.random(dim=dim, components=components, seed=seed)
        model = GuidedGaussianMixture(mixture, list(range(max(1, components // 2))), cfg).denoiser(kind)
        sigma_min, sigma_max = (0.002, 80.0) if kind == "eps" else (0.002, 0.999)
        shape = (dim, 1, 1)
        x0 = generate_x0(model, shape, 32, sigma_max, sigma_min, kind, steps=100, seed=estimation_seed)
        calls = []

        def counted(x, sigma, **kwargs):
            calls.append(x.shape[0])
            return model(x, sigma, **kwargs)

        # the cfg as the EMS job records it: a guided model's fallback is 2M only
        ems = estimate_ems(counted, x0, sigma_min, sigma_max, model_kind=kind, seed=estimation_seed,
                           metadata={"cfg": repr(cfg)})
        _CACHE[key] = (model, ems, sum(calls), shape, sigma_min, sigma_max)
    return _CACHE[key]


def _unipc_bh2(model, x, sigmas):
    """diffusers' UniPCMultistepScheduler (bh2) on our VE sigmas (as bench/peers.py runs it)."""
    import diffusers

    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear", prediction_type="epsilon",
                                                  solver_type="bh2")
    positive = sigmas[sigmas > 0]
    scheduler.set_timesteps(len(positive))
    scheduler.sigmas = torch.cat([positive, positive.new_zeros(1)]).to(torch.float32)
    scheduler.set_begin_index(0)
    sample = (x / math.sqrt(1 + positive[0].item() ** 2)).to(torch.float32)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = positive[i].item()
        x_ve = sample.double() * math.sqrt(1 + sigma ** 2)
        eps = ((x_ve - model(x_ve, x_ve.new_full([len(x_ve)], sigma))) / sigma).to(torch.float32)
        sample = scheduler.step(eps, timestep, sample).prev_sample
    return sample.double()


def _error(out, reference):
    return float((out.double() - reference).pow(2).flatten(1).mean(1).sqrt().mean())


def _evaluation(model, shape, kind, sigma_min, sigma_max):
    noise = torch.randn((EVAL_SAMPLES,) + shape, generator=torch.Generator().manual_seed(987), dtype=torch.float64)
    start = 1.0 if kind == "flow" else sigma_max
    reference = reference_solution(model, noise * start, start, 0.0, kind).double()
    return noise, reference


@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}-cfg{c[4]:g}-seed{c[0]}" for c in CASES])
def test_default_path_beats_the_pack_or_runs_the_better_solver(case):
    seed, dim, components, kind, cfg = case
    model, ems, _, shape, sigma_min, sigma_max = _setup(*case)
    assert "tuning" in ems.metadata and {d.nfe for d in ems.decisions} >= set(NFES)
    noise, reference = _evaluation(model, shape, kind, sigma_min, sigma_max)
    report = {}
    for nfe in NFES:
        sigmas = tuning.sampling_sigmas(nfe, sigma_min, sigma_max, kind)
        x = noise * sigmas[0]
        out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, model_kind=kind, disable=True)
        assert torch.isfinite(out).all() and out.abs().max() < 100, (nfe, "v3 blew up")
        pack = {"dpmpp_2m": sample_dpmpp_2m(model, x, sigmas, model_kind=kind, disable=True),
                "dpmpp_3m": sample_dpmpp_3m(model, x, sigmas, model_kind=kind, disable=True),
                "unipc": sample_unipc(model, x, sigmas, model_kind=kind, disable=True)}
        decision = ems.decision_for(nfe)
        if decision.solver != "v3":  # the stored decision: the pack's solver, bit for bit
            assert torch.equal(out, pack[decision.solver]), nfe
            report[nfe] = decision.solver
            continue
        peers = {name: _error(value, reference) for name, value in pack.items()}
        if kind == "eps":
            peers["unipc_bh2"] = _error(_unipc_bh2(model, x, sigmas), reference)
        ratio = _error(out, reference) / min(peers.values())
        report[nfe] = round(ratio, 3)
        assert ratio <= BOUND[cfg], (nfe, ratio, peers, report)
    # v3 runs somewhere (twice unguided, once at cfg 7.5).  On the cfg-10 flow mixture the 2M runs at 5, 8 and 10 NFE
    # (checked bit for bit above): v3 measures 3.28 / 0.63 / 0.55 there against the 2M's 3.13 / 0.57 / 0.38 on this
    # evaluation noise (the 2M's second-order start in rho since issue 15); v3 runs at 6 NFE (1.00 vs 1.16)
    required = {1.0: 2, 7.5: 1, 10.0: 0}[cfg]
    assert sum(1 for v in report.values() if not isinstance(v, str)) >= required, report


def test_tuning_costs_at_most_the_estimation():
    model, ems, calls, *_ = _setup(*CASES[0])
    estimation = int(ems.metadata["forward_rows"]) + int(ems.metadata["jvp_rows"])
    tuned = calls - estimation
    summary = __import__("json").loads(ems.metadata["tuning"])
    # a candidate that diverges stops early, so the planned rows are an upper bound
    assert tuned == summary["rows"] <= tuning.tuning_rows(summary["samples_per_set"])
    assert 0 < tuned <= estimation, (tuned, estimation)


def test_two_estimation_seeds_choose_fits_of_equal_accuracy():
    """Different x0, probes and tuning noise: the chosen fits' default-path errors agree within a factor 1.5
    (measured 1.10-1.28 at 5-10 NFE on 512 samples; EVAL_SAMPLES says why not 64)."""
    case = CASES[0]
    errors = []
    for estimation_seed in (0, 1):
        model, ems, _, shape, sigma_min, sigma_max = _setup(*case, estimation_seed=estimation_seed)
        noise, reference = _evaluation(model, shape, case[3], sigma_min, sigma_max)
        errors.append([_error(sample_dpm_solver_v3(model, noise * s[0], s, ems=ems, disable=True), reference)
                       for s in (tuning.sampling_sigmas(n, sigma_min, sigma_max, "eps") for n in NFES)])
    for nfe, first, second in zip(NFES, *errors):
        assert max(first, second) / min(first, second) < 1.5, (nfe, first, second)


def test_decisions_round_trip_and_are_validated(tmp_path):
    from dpm_solver_nodes.stats.ems import load_ems

    _, ems, *_ = _setup(*CASES[0])
    path = tmp_path / "tuned.safetensors"
    ems.save(path)
    loaded = load_ems(str(path))
    assert loaded.decisions == ems.decisions and loaded.metadata["tuning"] == ems.metadata["tuning"]
    with pytest.raises(ValueError, match="corrector"):
        ems.replace(decisions=[(5, "v3", 0.5, "no")])
    with pytest.raises(ValueError, match="solver"):
        ems.replace(decisions=[(5, "euler", 0.5)])
    with pytest.raises(ValueError, match="order"):
        ems.replace(decisions=[(5, "v3", 0.5, True, 4)])
    third = ems.replace(decisions=[(5, "v3", 0.5, False, 3), (8, "v3", 0.7)])
    third.save(path)
    assert load_ems(str(path)).decisions == third.decisions and third.decision_for(5).order == 3


def test_raw_fit_opt_out_and_explicit_corrector():
    model, ems, _, shape, sigma_min, sigma_max = _setup(*CASES[1])
    x = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigma_max
    sigmas = tuning.sampling_sigmas(6, sigma_min, sigma_max, "eps")
    decision = ems.decision_for(6)
    if decision.solver == "v3":
        tuned = sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True)
        explicit = sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True, use_corrector=decision.corrector)
        assert torch.equal(tuned, explicit)
    raw = estimate_ems(model, generate_x0(model, shape, 8, sigma_max, sigma_min, steps=20), sigma_min, sigma_max,
                       N=10, tune=False)
    assert "tuning" not in raw.metadata and not raw.decisions


def test_sampler_follows_each_kind_of_decision_bit_for_bit(caplog):
    """Hand-made decisions: 3M at 5 NFE, v3 without corrector at 8, UniPC at 10, 2M at 12, v3 of order 3 at 16 (a cheap, direct
    check of the sampler's side, independent of what any tuning chose)."""
    import logging

    from dpm_solver_nodes.stats.ems import EMS

    mixture = GaussianMixture.random(dim=4, components=3, seed=21)
    model = mixture.denoiser()
    lambdas = torch.linspace(-math.log(80.0), -math.log(0.002), 41, dtype=torch.float64)
    shape = (41, 4, 1, 1)
    ems = EMS(lambdas, torch.full(shape, 0.9, dtype=torch.float64), torch.full(shape, 0.1, dtype=torch.float64),
              torch.zeros(shape, dtype=torch.float64), decisions=[(5, "dpmpp_3m", 0.8), (8, "v3", 0.5, False),
                                                                  (10, "unipc", 0.6), (12, "dpmpp_2m", 0.9),
                                                                  (16, "v3", 0.7, True, 3)])
    x = torch.randn((3, 4, 1, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for nfe, expected in ((5, "3M"), (8, "v3-nc"), (10, "UniPC"), (12, "2M"), (16, "v3-o3")):
        sigmas = tuning.sampling_sigmas(nfe, 0.002, 80.0, "eps")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dpm_solver_nodes"):
            out = sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True)
        if expected == "3M":
            assert torch.equal(out, sample_dpmpp_3m(model, x * 80.0, sigmas, disable=True))
            assert any("running DPM-Solver++(3M) instead" in r.getMessage() for r in caplog.records)
        elif expected == "UniPC":
            assert torch.equal(out, sample_unipc(model, x * 80.0, sigmas, disable=True))
            assert not torch.equal(out, sample_dpmpp_2m(model, x * 80.0, sigmas, disable=True))
            assert any("running UniPC instead" in r.getMessage() for r in caplog.records)
        elif expected == "2M":
            assert torch.equal(out, sample_dpmpp_2m(model, x * 80.0, sigmas, disable=True))
        elif expected == "v3-o3":
            # the decided order applies also where a host passes its order setting; fallback=False keeps the given one
            third = sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, order=3, fallback=False)
            second = sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, order=2, fallback=False)
            assert torch.equal(out, third) and not torch.equal(out, second)
            assert torch.equal(sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, order=2), third)
            assert any("order-3 predictor" in r.getMessage() for r in caplog.records)
        else:
            plain = sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, use_corrector=False)
            corrected = sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, use_corrector=True)
            assert torch.equal(out, plain) and not torch.equal(out, corrected)
    # fallback=False keeps v3 where a decision names another solver
    sigmas = tuning.sampling_sigmas(5, 0.002, 80.0, "eps")
    assert not torch.equal(sample_dpm_solver_v3(model, x * 80.0, sigmas, ems=ems, disable=True, fallback=False),
                           sample_dpmpp_3m(model, x * 80.0, sigmas, disable=True))


def test_default_path_on_the_embedded_model_costs_under_a_minute():
    """x0 (32 samples, 100 steps) + estimate_ems with no options (estimation and tuning) on the embedded eps model:
    measured 10.0-14.5 s of CPU on one thread (bench/results_ems_tuning.md); the issue's bound is 60 s."""
    import time

    from dpm_solver_nodes.embedded import load_model
    from dpm_solver_nodes.embedded.make_ems import LabelledByRow

    base = load_model("eps")
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    model = LabelledByRow(base, 1.0)
    started = time.process_time()
    with torch.no_grad():
        x0 = generate_x0(model, tuple(base.shape), 32, base.sigma_max, base.sigma_min, steps=100, batch_size=32)
    ems = estimate_ems(model, x0, base.sigma_min, base.sigma_max)
    seconds = time.process_time() - started
    assert "tuning" in ems.metadata and ems.metadata["K"] == "32" and len(ems.decisions) == 6
    assert seconds < 60, seconds


def test_too_small_a_budget_runs_the_check_or_refuses():
    """estimate_ems(tune=True) never returns unchecked EMS: where N x K pays for neither the tuning nor the
    v3-vs-DPM-Solver++(2M) check it raises before any model call, naming the minimum N at that K (the check's); at
    that N the check runs instead of the tuning and the sampler follows its decisions bit for bit."""
    import re

    mixture = GaussianMixture.random(dim=4, components=3, seed=21)
    model = mixture.denoiser()
    x0 = generate_x0(model, (4, 1, 1), 8, 80.0, 0.002, steps=20)
    calls = []

    def counted(x, sigma, **kwargs):
        calls.append(x.shape[0])
        return model(x, sigma, **kwargs)

    with pytest.raises(ValueError, match="too few both to tune the fit") as raised:
        estimate_ems(counted, x0, 0.002, 80.0, N=20, K=8)
    assert not calls
    minimum = int(re.search(r"check v3 against DPM-Solver\+\+\(2M\) \(\d+ rows: N >= (\d+)", str(raised.value))[1])
    with pytest.raises(ValueError, match="tune=False"):
        estimate_ems(model, x0, 0.002, 80.0, N=minimum - 1, K=8)
    ems = estimate_ems(counted, x0, 0.002, 80.0, N=minimum, K=8)
    assert "tuning" not in ems.metadata and int(ems.metadata["v3_check_samples"]) >= 2
    assert {d.nfe for d in ems.decisions} == set(tuning.TUNE_NFES)
    # the check's references and runs stay within the estimation's own rows
    estimation = int(ems.metadata["forward_rows"]) + int(ems.metadata["jvp_rows"])
    assert sum(calls) - estimation <= estimation
    x = torch.randn((3, 4, 1, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float32) * 80.0
    for nfe in (5, 10):
        sigmas = tuning.sampling_sigmas(nfe, 0.002, 80.0, "eps").float()
        out = sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True)
        if ems.decision_for(nfe).solver == "dpmpp_2m":
            assert torch.equal(out, sample_dpmpp_2m(model, x, sigmas, disable=True)), nfe
        else:
            assert torch.equal(out, sample_dpm_solver_v3(model, x, sigmas, ems=ems, disable=True, fallback=False))
    raw = estimate_ems(model, x0, 0.002, 80.0, N=20, K=8, tune=False)
    assert not raw.decisions and "v3_check_samples" not in raw.metadata


def test_the_pack_candidates_and_what_each_tuning_stored():
    """The pack per model: 2M + UniPC (eps, and guided flow), 2M + 3M (unguided flow); a guided selection runs one
    solver per NFE.  Every stored fallback of the test mixtures' tunings is a solver that tuning measured there, and
    the hosts' one-line summary names UniPC."""
    from dpm_solver_nodes.samplers.ems_data import summarize_decisions

    assert tuning.pack_candidates({"cfg": "1.0"}, "eps") == ("dpmpp_2m", "unipc")
    assert tuning.pack_candidates({"cfg": "1.0"}, "flow") == ("dpmpp_2m", "dpmpp_3m")
    assert tuning.pack_candidates({"cfg": "7.5"}, "flow") == ("dpmpp_2m", "unipc")
    assert [tuning.pack_solvers({"cfg": "7.5"}, "eps", n) for n in (8, 10)] == [("dpmpp_2m",), ("unipc",)]
    assert [tuning.pack_solvers({"cfg": "5"}, "flow", n) for n in (10, 15)] == [("dpmpp_2m",), ("unipc",)]
    for case in CASES:
        _, ems, *_ = _setup(*case)
        metadata = {"cfg": repr(case[4])}
        for decision in ems.decisions:
            if decision.solver != "v3":
                assert decision.solver in tuning.pack_solvers(metadata, case[3], decision.nfe), (case, decision)
    assert "UniPC at 10 steps" in summarize_decisions([(5, "v3", 0.5), (10, "unipc", 0.8)])


def test_v3_decision_pools_both_sets_up_to_10_nfe_and_the_report_mean_vetoes():
    """``tuning.v3_clearly_better``: up to POOLED_UP_TO NFE the paired log ratios of both sets decide (one standard
    error), above it the selection set alone; the report set's mean error vetoes v3 at every NFE."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    ones = t(1.0, 1.0, 1.0)
    # selection alone: log ratios -0.69, -0.69, +0.69 (mean -0.23, one SE 0.46): not clearly better
    sel, rep = t(0.5, 0.5, 2.0), t(0.5, 0.5, 0.5)
    assert not tuning.clearly_better(sel, ones)
    assert tuning.POOLED_UP_TO == 10
    assert tuning.v3_clearly_better(10, sel, ones, rep, ones)  # six pooled samples: mean -0.46, SE 0.23
    assert not tuning.v3_clearly_better(15, sel, ones, rep, ones)  # above 10 NFE the selection set alone
    assert tuning.v3_clearly_better(15, t(0.5, 0.5, 0.5), ones, rep, ones)
    # a heavy tail on the report set: the pooled logs still favour v3 (8 of 9 at 0.1x), the report mean (1.73) vetoes
    strong = t(0.1, 0.1, 0.1)
    assert tuning.clearly_better(torch.cat([strong, t(0.1, 0.1, 5.0)]), torch.cat([ones, ones]))
    assert not tuning.v3_clearly_better(8, strong, ones, t(0.1, 0.1, 5.0), ones)
    # a diverging v3 run on either set never wins
    assert not tuning.v3_clearly_better(8, t(0.1, math.inf, 0.1), ones, strong, ones)
    assert not tuning.v3_clearly_better(8, strong, ones, t(0.1, math.inf, 0.1), ones)
