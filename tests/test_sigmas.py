"""Step schedules (samplers/sigmas.py): shapes, input checks, and what ``recommended_sigmas`` buys.

Accuracy: x0 error (median over samples of the per-sample RMS error) against an independent reference: DOP853 at
1e-12 for the analytic mixtures (``reference_solution``), our 3M (Taylor) on 500 logSNR-uniform steps for the
embedded models (1000 steps differ from it by 6e-5 (flow) and 9e-6 (eps), the smallest error compared is 1e-3).  The peer
is PyPI k-diffusion's ``sample_dpmpp_2m`` (what ComfyUI runs) on the flow hosts' default schedule, t uniform with
shift 3 (sigma = 3t / (1 + 2t)).  The full table is bench/results_schedules.md.
"""
import math

import pytest
import torch

import kdiffusion_reference
from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.embedded import load_model
from dpm_solver_nodes.embedded.make_ems import LabelledByRow
from dpm_solver_nodes.samplers import recommended_sigmas, sample_dpmpp_2m, sample_dpmpp_3m
from dpm_solver_nodes.samplers.sigmas import karras, make_sigmas, shifted, with_zero

EPS_RANGE = (0.0292, 14.6)
FLOW_SIGMA_MIN = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Shapes and input checks
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,lo,hi", [("eps", 0.0292, 14.6), ("flow", 1e-3, 1.0), ("flow", 1e-3, 0.6),
                                        ("eps", 0.002, 80.0), ("flow", 0.3, 1.0), ("flow", 0.5, 1.0),
                                        ("flow", 0.9, 1.0), ("flow", 0.5, 0.7), ("flow", 1e-6, 1.0)])
def test_recommended_sigmas_shape(kind, lo, hi):
    for n in (1, 2, 3, 5, 20, 100):
        s = recommended_sigmas(n, lo, hi, kind)
        assert s.dtype == torch.float64 and len(s) == n + 1 and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
        assert s[0].item() == pytest.approx(hi)
        if n > 1:
            assert s[-2].item() == pytest.approx(lo, rel=1e-9)


def test_flow_first_step_shrinks_with_the_step_count():
    """1 - sigma_1 ~ e^{lambda_1}, lambda_1 the mean of the shift-3 schedule's log(1 / (3 (n - 1))) and the uniform
    part's log(0.1 h): halves (about) as the steps double."""
    gaps = [1 - recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")[1].item() for n in (10, 20, 40, 80)]
    assert all(1.6 < a / b < 2.6 for a, b in zip(gaps, gaps[1:]))


@pytest.mark.parametrize("args,match", [
    ((0, 0.1, 1.0, "eps"), "number of steps"), ((2.0, 0.1, 1.0, "eps"), "number of steps"),
    ((True, 0.1, 1.0, "eps"), "number of steps"), ((5, 0.0, 1.0, "eps"), "sigma_min"),
    ((5, float("nan"), 1.0, "eps"), "sigma_min"), ((5, 0.1, float("inf"), "eps"), "sigma_max"),
    ((5, 2.0, 1.0, "eps"), "below sigma_max"), ((5, 0.1, 1.5, "flow"), "flow sigmas"),
    ((5, 0.1, 1.0, "vp"), "model_kind"), ((5, "0.1", 1.0, "eps"), "sigma_min")])
def test_recommended_sigmas_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        recommended_sigmas(*args)


def test_shifted_is_the_flow_hosts_default():
    """ComfyUI's "simple" scheduler on ModelSamplingSD3(shift=3) and diffusers' FlowMatchEuler: t = 1 - k/n."""
    s = shifted(4, 3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    with pytest.raises(ValueError, match="shift"):
        shifted(4, 0.0)


def test_make_sigmas_checks():
    with pytest.raises(ValueError, match="schedule"):
        make_sigmas("cosine", 5)
    with pytest.raises(ValueError, match="discrete"):
        make_sigmas("time_uniform", 5, "eps", 0.03, 14.6)
    with pytest.raises(ValueError, match="model_kind"):
        make_sigmas("karras", 5, "v", 0.03, 14.6)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------------------

def median_error(out, reference):
    return float((out.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt().median())


class Case:
    def __init__(self, model, x, reference, kind):
        self.model, self.x, self.reference, self.kind = model, x, reference, kind

    def error(self, sampler, sigmas):
        start = self.x if self.kind == "flow" else self.x * sigmas[0]
        return median_error(sampler(self.model, start, sigmas, disable=True), self.reference)

    def ours(self, sigmas):
        return self.error(lambda m, x, s, **kw: sample_dpmpp_2m(m, x, s, model_kind=self.kind, **kw), sigmas)


def mixture_case(kind, seed, samples=64):
    model = GaussianMixture.random(dim=8, components=5, seed=seed).denoiser(kind)
    x = sample_noise(samples, (8,), seed=100 + seed)
    start, sigma_start = (x, 1.0) if kind == "flow" else (x * EPS_RANGE[1], EPS_RANGE[1])
    return Case(model, x, reference_solution(model, start, sigma_start, 0.0, kind), kind)


_EMBEDDED = {}


def embedded_case(kind, samples=32):
    if kind not in _EMBEDDED:
        base = load_model(kind)
        model = LabelledByRow(base, 1.0)
        x = torch.randn((samples,) + tuple(base.shape), generator=torch.Generator().manual_seed(1234),
                        dtype=torch.float64)
        sigmas = (make_sigmas("logsnr_uniform", 500, kind, FLOW_SIGMA_MIN) if kind == "flow"
                  else make_sigmas("logsnr_uniform", 500, kind, *EPS_RANGE))
        start = x if kind == "flow" else x * sigmas[0]
        reference = sample_dpmpp_3m(model, start, sigmas, disable=True, model_kind=kind, solver_type="taylor")
        _EMBEDDED[kind] = Case(model, x, reference, kind)
    return _EMBEDDED[kind]


def order(errors, steps=(20, 40)):
    return math.log(errors[0] / errors[1]) / math.log(steps[1] / steps[0])


FLOW_STEPS = (10, 15, 20, 40)


def flow_ratios(case):
    kd = kdiffusion_reference.load()
    ours = [case.ours(recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")) for n in FLOW_STEPS]
    host = [case.error(kd.sample_dpmpp_2m, shifted(n, 3.0)) for n in FLOW_STEPS]
    return [a / b for a, b in zip(ours, host)], ours


def test_flow_embedded_recommended_beats_the_hosts_default():
    """The embedded flow model: our 2M on recommended_sigmas <= 0.5x k-diffusion's 2M on the shift-3 schedule at
    10 / 15 / 20 / 40 steps (measured 0.426 / 0.218 / 0.144 / 0.068), order >= 1.8 (measured 1.99)."""
    ratios, ours = flow_ratios(embedded_case("flow"))
    assert max(ratios) <= 0.5, ratios
    assert order(ours[2:]) >= 1.8, ours


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flow_mixtures_recommended_against_the_hosts_default(seed):
    """Random flow mixtures: the shift-3 schedule suits them (its steps crowd where the modes separate; the
    recommended schedule is half of it in lambda for that reason).  Our 2M on recommended_sigmas against k-diffusion's
    2M on the shift-3 schedule, measured over seeds 0-3: 0.47-1.08x at 10-20 steps (asserted <= 1.2x), 0.33-0.45x
    at 40 (asserted <= 0.5x); order on recommended_sigmas 1.99-2.21 (asserted >= 1.8).  The issue's <= 0.5x holds
    at 10-20 steps on the embedded model only (seed 0 at 15 steps: 0.47x)."""
    ratios, ours = flow_ratios(mixture_case("flow", seed))
    assert max(ratios[:3]) <= 1.2, ratios
    assert ratios[3] <= 0.5, ratios
    assert order(ours[2:]) >= 1.8, ours


EPS_STEPS = (6, 10, 20, 40)


@pytest.mark.parametrize("case", ["mixture 0", "mixture 1", "embedded"])
def test_eps_recommended_is_no_worse_than_karras(case):
    """eps: our 2M on recommended_sigmas (Karras spacing, rho 15) against our 2M on Karras sigmas (rho 7): measured
    0.69-0.86x on the mixtures and 0.71-0.95x on the embedded model at 6-40 steps (1.03x at 40 with 64 samples in
    bench/results_schedules.md; asserted: <= 1.05x)."""
    c = embedded_case("eps") if case == "embedded" else mixture_case("eps", int(case.split()[1]))
    lo, hi = EPS_RANGE
    for n in EPS_STEPS:
        ours = c.ours(recommended_sigmas(n, lo, hi, "eps"))
        baseline = c.ours(with_zero(karras(n, lo, hi)))
        assert ours <= 1.05 * baseline, (n, ours, baseline)
