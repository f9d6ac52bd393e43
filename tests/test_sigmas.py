"""Step schedules (samplers/sigmas.py): shapes, input checks over every reachable input, the hosts' entry points,
and what ``recommended_sigmas`` buys.

Accuracy: x0 error (median over samples of the per-sample RMS error) against an independent reference: DOP853 at
1e-12 for the analytic mixtures (``reference_solution``), our 3M (Taylor) on 500 logSNR-uniform steps for the
embedded models (1000 steps differ from it by 6e-5 (flow) and 9e-6 (eps), the smallest error compared is 1e-3).  The peer
is PyPI k-diffusion's ``sample_dpmpp_2m`` (what ComfyUI runs) on the flow hosts' default schedule, t uniform with
shift 3 (sigma = 3t / (1 + 2t)).  The flow mixtures here are from the study's held-out set (the rule's constants were
chosen on other seeds).  The full table is bench/results_schedules.md.
"""
import math
import types

import pytest
import torch

import kdiffusion_reference
from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.embedded import load_model
from dpm_solver_nodes.embedded.make_ems import LabelledByRow
from dpm_solver_nodes.samplers import recommended_sigmas, sample_dpmpp_2m, sample_dpmpp_3m
from dpm_solver_nodes.samplers.sigmas import (RECOMMENDED_FLOW_FIRST_STEP, flow_first_lambda, flow_lambda,
                                              flow_last_lambda, karras, make_sigmas, shifted, with_zero)

EPS_RANGE = (0.0292, 14.6)
FLOW_SIGMA_MIN = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Shapes and input checks
# ----------------------------------------------------------------------------------------------------------------

FLOW_MINIMA = (1e-12, 3.16e-4, 1e-3, 2.994e-3, 0.1, 0.4, 0.5, 0.7, 0.99)
FLOW_MAXIMA = (1.0, 1 - 1e-7, 0.999, 0.9, 0.6, 0.3, 0.05)
EPS_MINIMA = (1e-8, 0.002, 0.0292, 0.5)
EPS_MAXIMA = (0.6, 1.0, 14.6, 80.0, 1e3)
STEP_COUNTS = (1, 2, 3, 4, 5, 7, 10, 33, 100, 1000, 10000)


def _reachable():
    for kind, minima, maxima in (("flow", FLOW_MINIMA, FLOW_MAXIMA), ("eps", EPS_MINIMA, EPS_MAXIMA)):
        for lo in minima:
            for hi in maxima:
                if lo < hi:
                    yield kind, lo, hi


@pytest.mark.parametrize("kind,lo,hi", list(_reachable()))
def test_recommended_sigmas_every_reachable_input(kind, lo, hi):
    """Every step count and range a host can pass (flow: sigma_min up to 0.99, which once raised a math domain
    error, sigma_max < 1 and a float32 rounding of 1; tiny sigma_min; n = 1, 2, 3): n + 1 finite float64 sigmas,
    sigma_max first, strictly decreasing, the last positive one in [sigma_min, sigma_max), then 0; and strictly
    decreasing in float32 too (what the hosts use) except where float32 cannot hold n values in the range."""
    for n in STEP_COUNTS:
        s = recommended_sigmas(n, lo, hi, kind)
        assert s.dtype == torch.float64 and len(s) == n + 1 and s[-1] == 0 and torch.isfinite(s).all()
        assert s[0].item() == hi and (s[1:] < s[:-1]).all(), (n, s[:4], s[-4:])
        if n > 1:
            assert lo * (1 - 1e-12) <= s[-2].item() < hi
        if kind == "eps" or lo <= 0.5:
            assert (s.float()[1:] < s.float()[:-1]).all(), n


@pytest.mark.parametrize("kind,lo,hi", [("eps", 0.0292, 14.6), ("eps", 0.002, 80.0)])
def test_recommended_eps_is_karras_rho_15(kind, lo, hi):
    for n in (2, 5, 20, 100):
        torch.testing.assert_close(recommended_sigmas(n, lo, hi, kind), with_zero(karras(n, lo, hi, 15.0)),
                                   rtol=1e-14, atol=0)


def test_flow_last_sigma_follows_log_n_until_sigma_min():
    """The last positive flow sigma sits at lambda = 0.58 + 1.2 log n, or at sigma_min once that is reached (from
    sigma = 1), and 0.58 + 1.2 log n is counted from lambda(sigma_max) when that lies above 0.58."""
    for lo in (1e-3, 2.994e-3, 3.16e-4):
        for n in (2, 3, 6, 10, 20, 40, 100, 400):
            last = flow_lambda(recommended_sigmas(n, lo, 1.0, "flow")[-2].item())
            assert last == pytest.approx(min(flow_lambda(lo), 0.58 + 1.2 * math.log(n)), abs=1e-9)
    start = flow_lambda(0.05)  # 2.94
    for n in (2, 5, 10):
        last = flow_lambda(recommended_sigmas(n, 1e-3, 0.05, "flow")[-2].item())
        assert last == pytest.approx(min(flow_lambda(1e-3), start + 1.2 * math.log(n)), abs=1e-9)
    assert flow_last_lambda(10, 6.9, 0.0) == pytest.approx(0.58 + 1.2 * math.log(10))


@pytest.mark.parametrize("lambda_end", [-8.0, -1.0, 0.0, 0.5, 3.0, 6.9, 27.6])
def test_flow_first_lambda_solves_its_equation_for_any_end(lambda_end):
    """e^{lambda_1} = c h with h = (lambda_end - lambda_1) / (n - 2), for an end on either side of sigma = 0.5 (the
    fixed-point iteration this replaced took the log of a negative number for lambda_end <= 0)."""
    for n in (3, 4, 10, 100, 10000):
        lam_1 = flow_first_lambda(n, lambda_end)
        assert lam_1 < lambda_end
        assert math.exp(lam_1) == pytest.approx(RECOMMENDED_FLOW_FIRST_STEP * (lambda_end - lam_1) / (n - 2),
                                                rel=1e-12)
    with pytest.raises(ValueError, match="n >= 3"):
        flow_first_lambda(2, 1.0)


def test_flow_sigma_max_near_one_is_full_noise():
    """A float32 rounding of 1 as the model's sigma_max gives the sigma = 1 schedule with that first value."""
    full, near = recommended_sigmas(12, 1e-3, 1.0, "flow"), recommended_sigmas(12, 1e-3, 1 - 1e-7, "flow")
    assert near[0].item() == 1 - 1e-7
    torch.testing.assert_close(near[1:], full[1:], rtol=0, atol=0)


def test_flow_first_step_shrinks_with_the_step_count():
    """1 - sigma_1 ~ e^{lambda_1}, lambda_1 a mix of the shift-3 schedule's log(1 / (3 (n - 1))) and the uniform
    part's log(0.16 h): about halves as the steps double."""
    gaps = [1 - recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")[1].item() for n in (10, 20, 40, 80)]
    assert all(1.6 < a / b < 2.6 for a, b in zip(gaps, gaps[1:])), gaps


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
# The hosts' entry points: ComfyUI's scheduler and SIGMAS node, the WebUI's schedule type, with the hosts' own
# img2img truncation and few steps
# ----------------------------------------------------------------------------------------------------------------

class _Const:  # stand-ins for comfy.model_sampling's parameterization classes (nodes/model_kind.py tests isinstance)
    pass


class _Eps:
    pass


PARAMETERIZATIONS = types.SimpleNamespace(CONST=_Const, EPS=_Eps)


def _time_snr_shift(shift, t):  # comfy/model_sampling.py
    return shift * t / (1 + (shift - 1) * t)


# (kind, sigma_min, sigma_max) as ComfyUI's model_sampling computes them (float32 buffers): SD3 (ModelSamplingDiscreteFlow,
# shift 3, sigmas[0] at t = 1/1000), Flux (ModelSamplingFlux, mu 1.15: e^mu / (e^mu + 1/t - 1)), SD1.5 (scaled-linear
# betas)
HOST_MODELS = {
    "sd3": ("flow", _time_snr_shift(3.0, 1e-3), 1.0),
    "flux": ("flow", math.exp(1.15) / (math.exp(1.15) + 999.0), 1.0),
    "sd15": ("eps", 0.029167158529162407, 14.614641189575195),
}
HOST_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 20, 50)
DENOISE = (1.0, 0.9, 0.75, 0.5, 0.3, 0.1, 0.01)


def _comfy_sampling(kind, sigma_min, sigma_max):
    ms = (_Const if kind == "flow" else _Eps)()
    ms.sigma_min, ms.sigma_max = torch.tensor(sigma_min), torch.tensor(sigma_max)  # float32, as ComfyUI's buffers
    return ms


def _check_host_sigmas(sigmas, steps, lo, hi):
    """steps + 1 float32 sigmas: positive and strictly decreasing, within the model's range, then 0."""
    assert sigmas.dtype == torch.float32 and len(sigmas) == steps + 1 and sigmas[-1] == 0, sigmas
    assert (sigmas[1:] < sigmas[:-1]).all() and (sigmas[:-1] > 0).all(), sigmas
    assert sigmas[0].item() <= hi * (1 + 1e-6) and sigmas[-2].item() >= lo * (1 - 1e-6), (sigmas, lo, hi)


@pytest.mark.parametrize("model", sorted(HOST_MODELS))
@pytest.mark.parametrize("discard_penultimate", [False, True])
def test_comfyui_scheduler_with_denoise_and_few_steps(model, discard_penultimate):
    """ComfyUI's KSampler (comfy/samplers.py v0.3.64): calculate_sigmas asks the handler for steps (+ 1 for the
    samplers that discard the penultimate sigma: dpm_2, uni_pc, ...), and set_steps with denoise < 1 keeps the last
    steps + 1 sigmas of an int(steps / denoise)-step schedule."""
    from dpm_solver_nodes.nodes import comfy_schedulers

    kind, lo, hi = HOST_MODELS[model]
    ms = _comfy_sampling(kind, lo, hi)

    def calculate_sigmas(steps):
        if discard_penultimate:
            steps += 1
        sigmas = comfy_schedulers.recommended_for_model(ms, steps, PARAMETERIZATIONS)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard_penultimate else sigmas

    lo32, hi32 = float(ms.sigma_min), float(ms.sigma_max)
    for steps in HOST_STEPS:
        for denoise in DENOISE:
            sigmas = calculate_sigmas(steps) if denoise > 0.9999 else calculate_sigmas(int(steps / denoise))
            _check_host_sigmas(sigmas[-(steps + 1):], steps, lo32, hi32)
    full = comfy_schedulers.recommended_for_model(ms, 10, PARAMETERIZATIONS)
    torch.testing.assert_close(full, recommended_sigmas(10, lo32, min(hi32, 1.0) if kind == "flow" else hi32,
                                                        kind).float())


@pytest.mark.parametrize("model", sorted(HOST_MODELS))
def test_comfyui_sigmas_node_with_denoise_and_custom_range(model):
    """The SIGMAS node: denoise as BasicScheduler (0 gives no sigmas), sigma_min / sigma_max of 0 = the model's,
    a custom range (a flow sigma_max below 1, a flow sigma_min above 0.5) and a clear error for an empty one."""
    from dpm_solver_nodes.nodes import comfy_schedulers

    kind, lo, hi = HOST_MODELS[model]
    ms = _comfy_sampling(kind, lo, hi)
    lo32, hi32 = float(ms.sigma_min), float(ms.sigma_max)
    for steps in HOST_STEPS:
        for denoise in DENOISE:
            sigmas = comfy_schedulers.sigmas_for_node(ms, steps, denoise, parameterizations=PARAMETERIZATIONS)
            _check_host_sigmas(sigmas, steps, lo32, hi32)
    assert len(comfy_schedulers.sigmas_for_node(ms, 5, 0.0, parameterizations=PARAMETERIZATIONS)) == 0
    custom = [(0.05, 0.8), (0.6, 1.0), (0.001, 0.3)] if kind == "flow" else [(0.1, 5.0), (1.0, 2.0)]
    for custom_lo, custom_hi in custom:
        for steps in (1, 2, 3, 10):
            sigmas = comfy_schedulers.sigmas_for_node(ms, steps, 1.0, custom_lo, custom_hi, PARAMETERIZATIONS)
            _check_host_sigmas(sigmas, steps, custom_lo, custom_hi)
            assert sigmas[0].item() == pytest.approx(custom_hi)
    with pytest.raises(ValueError, match="below sigma_max"):
        comfy_schedulers.sigmas_for_node(ms, 5, 1.0, 0.9, 0.5, PARAMETERIZATIONS)


def _webui_wrap(model):
    """The k-diffusion model wrap the WebUI passes as inner_model: A1111's SD3 (sd_model.is_sd3), Forge's flow
    predictor (prediction_type "const"), SD1.5 (parameterization "eps")."""
    if model == "sd3":
        return types.SimpleNamespace(inner_model=types.SimpleNamespace(is_sd3=True))
    if model == "flux":
        return types.SimpleNamespace(inner_model=None, predictor=types.SimpleNamespace(prediction_type="const"))
    return types.SimpleNamespace(inner_model=types.SimpleNamespace(parameterization="eps"))


@pytest.mark.parametrize("model", sorted(HOST_MODELS))
@pytest.mark.parametrize("fix_steps", [False, True])
def test_webui_schedule_type_with_img2img_and_few_steps(model, fix_steps):
    """A1111 1.10 (modules/sd_samplers_kdiffusion.py, sd_samplers_common.setup_img2img_steps): get_sigmas calls
    function(n=steps (+ 1 when discarding the penultimate sigma), sigma_min=, sigma_max=, inner_model=, device=);
    img2img keeps sigmas[steps - t_enc - 1:], t_enc = int(min(strength, 0.999) * steps), or with "fix steps"
    steps = int(requested / min(strength, 0.999)) and t_enc = requested - 1."""
    from dpm_solver_nodes.scripts.dpm_solver_webui import schedulers

    kind, lo, hi = HOST_MODELS[model]
    lo32, hi32 = float(torch.tensor(lo)), float(torch.tensor(hi))

    def get_sigmas(steps, discard):
        sigmas = schedulers.recommended_scheduler(n=steps + discard, sigma_min=lo32, sigma_max=hi32,
                                                  inner_model=_webui_wrap(model), device="cpu")
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    for requested in HOST_STEPS:
        for strength in DENOISE:
            for discard in (0, 1):
                if fix_steps:
                    steps, t_enc = int(requested / min(strength, 0.999)), requested - 1
                else:
                    steps, t_enc = requested, int(min(strength, 0.999) * requested)
                sigma_sched = get_sigmas(steps, discard)[steps - t_enc - 1:]
                _check_host_sigmas(sigma_sched, t_enc + 1, lo32, hi32)
    # the user's "sigma min / max" settings: a flow range below 1 and above 0.5
    if kind == "flow":
        for custom_lo, custom_hi in ((0.05, 0.8), (0.6, 1.0)):
            for n in (1, 2, 3, 20):
                sigmas = schedulers.recommended_scheduler(n=n, sigma_min=custom_lo, sigma_max=custom_hi,
                                                          inner_model=_webui_wrap(model), device="cpu")
                _check_host_sigmas(sigmas, n, custom_lo, custom_hi)


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


def mixture_case(kind, seed, dim=8, components=5, samples=64):
    model = GaussianMixture.random(dim=dim, components=components, seed=seed).denoiser(kind)
    x = sample_noise(samples, (dim,), seed=100 + seed)
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
    10 / 15 / 20 / 40 steps (measured 0.28 / 0.23 / 0.18 / 0.08), order >= 1.8 (measured 1.99)."""
    ratios, ours = flow_ratios(embedded_case("flow"))
    assert max(ratios) <= 0.5, ratios
    assert order(ours[2:]) >= 1.8, ours


# held-out mixtures of the study (seed, dimension, components): the rule's constants were chosen on other seeds
FLOW_MIXTURES = [(20, 8, 5), (22, 4, 2), (24, 16, 5), (28, 64, 5), (30, 2, 4)]


@pytest.mark.parametrize("seed,dim,components", FLOW_MIXTURES)
def test_flow_mixtures_recommended_against_the_hosts_default(seed, dim, components):
    """Random flow mixtures, our 2M on recommended_sigmas against k-diffusion's 2M on the shift-3 schedule, measured
    on these five: 0.37-0.45x at 10 steps, 0.32-0.50x at 15, 0.31-0.61x at 20, 0.19-0.30x at 40 (asserted: <= 0.5x
    at 10 and 40, <= 0.6x at 15, <= 0.7x at 20); our 2M's order on recommended_sigmas 1.82-2.10 (asserted >= 1.8).
    The issue's <= 0.5x at 15 and 20 steps does not hold on every mixture (next test)."""
    ratios, ours = flow_ratios(mixture_case("flow", seed, dim, components))
    assert ratios[0] <= 0.5 and ratios[3] <= 0.5, ratios
    assert ratios[1] <= 0.6 and ratios[2] <= 0.7, ratios
    assert order(ours[2:]) >= 1.8, ours


@pytest.mark.xfail(strict=True, reason="measured 0.50x at 15 and 0.61x at 20 steps on this mixture: k-diffusion's "
                   "error on the shift-3 schedule falls 7x from 10 to 20 steps there, then 1.4x to 40 (its steps "
                   "crowd where this mixture's modes separate); the schedule families tried trade this ratio "
                   "against the 20 -> 40-step order asserted above, see README, Schedules")
def test_flow_mixture_issue_target_at_15_and_20_steps():
    """The issue's <= 0.5x k-diffusion-on-shift-3 at 15 and 20 steps, on the held-out mixture where it fails most
    (seed 22, d = 4, 2 components)."""
    ratios, _ = flow_ratios(mixture_case("flow", 22, 4, 2))
    assert max(ratios[1:3]) <= 0.5, ratios


EPS_STEPS = (6, 10, 20, 40)


@pytest.mark.parametrize("case", ["mixture 0 8 5", "mixture 22 4 2", "mixture 28 64 5", "embedded"])
def test_eps_recommended_is_no_worse_than_karras(case):
    """eps: our 2M on recommended_sigmas (Karras spacing, rho 15) against our 2M on Karras sigmas (rho 7), which is
    k-diffusion's 2M on them; measured 0.63-0.86x on these mixtures at 6-40 steps (0.99x on d = 64 at 6 steps)
    and 0.71-0.95x on the embedded model (the embedded model at 40 steps with 64 samples: 1.01-1.03x, bench/results_schedules.md); asserted:
    <= 1.05x."""
    if case == "embedded":
        c = embedded_case("eps")
    else:
        c = mixture_case("eps", *map(int, case.split()[1:]))
    lo, hi = EPS_RANGE
    for n in EPS_STEPS:
        ours = c.ours(recommended_sigmas(n, lo, hi, "eps"))
        baseline = c.ours(with_zero(karras(n, lo, hi)))
        assert ours <= 1.05 * baseline, (n, ours, baseline)
