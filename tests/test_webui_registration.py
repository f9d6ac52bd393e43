"""WebUI adapter contract on a stub ``modules`` package (runs everywhere; the real WebUI is in
tests/test_webui_integration.py).

The stub reproduces the few WebUI pieces the adapter touches, as they are in A1111 v1.10.1 / Forge dfdcbab6:
``sd_samplers`` (all_samplers, all_samplers_map, set_samplers, samplers_map, a functools.cache'd
get_sampler_and_scheduler; Forge adds add_sampler), ``SamplerData``, ``KDiffusionSampler`` and
``sampler_extra_params``.  The samplers run for real on the analytic Gaussian mixture.
"""
import collections
import functools
import importlib
import inspect
import logging
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture
from dpm_solver_nodes.samplers import SAMPLERS, sample_dpmpp_2m, sample_dpmpp_2m_sde

catalog = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.catalog")
registration = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.registration")
settings = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.settings")
ems_store = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.ems_store")
ems_tab = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.ems_tab")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A1111 v1.10.1 modules/sd_schedulers.py: names and labels; a sampler label ending in " <one of these>" is split
# into sampler + scheduler by get_sampler_and_scheduler (infotext paste, API).
A1111_SCHEDULERS = ("automatic", "Automatic", "uniform", "Uniform", "karras", "Karras", "exponential", "Exponential",
                    "polyexponential", "Polyexponential", "sgm_uniform", "SGM Uniform", "kl_optimal", "KL Optimal",
                    "align_your_steps", "Align Your Steps", "simple", "Simple", "normal", "Normal", "ddim", "DDIM",
                    "beta", "Beta")
NEVER_INJECTED = {"n", "sigma_min", "sigma_max", "sigma_sched", "solver_type", "s_churn", "s_tmin", "s_tmax"}
# The labels of 0.1.0 (4cdd6d3), as old infotexts and X/Y/Z grids have them, and the method each one ran.
LABELS_0_1_0 = {"DPM++ 2M (dpm-solver-nodes)": ("dpmpp_2m", {}), "DPM++ 2S (dpm-solver-nodes)": ("dpmpp_2s", {}),
                "DPM++ 3M": ("dpmpp_3m", {}), "DPM-Solver": ("dpm_solver", {"order": 2, "method": "multistep"}),
                "DPM-Solver 3S": ("dpm_solver", {"order": 3, "method": "singlestep"}),
                "DPM-Solver adaptive": ("dpm_solver_adaptive", {"order": 3}),
                "DPM-Solver++ 2M SDE": ("dpmpp_2m_sde", {"solver_type": "midpoint"}),
                "DPM-Solver++ 2M SDE Heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
                "DPM-Solver++ 3M SDE": ("dpmpp_3m_sde", {}), "DPM-Solver++ 1 SDE": ("dpmpp_sde_1", {}),
                "DPM-Solver 2M SDE": ("dpm_solver_sde_2m", {"solver_type": "midpoint"}),
                "DPM-Solver 1 SDE": ("dpm_solver_sde_1", {}), "DPM-Solver-v3": ("dpm_solver_v3", {})}
V3 = "DPM-Solver-v3 (dpm-solver-nodes)"


# ---- stub WebUI ----------------------------------------------------------------------------------------------------

def make_stub_webui(forge=False, existing=()):
    SamplerDataTuple = collections.namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])

    class SamplerData(SamplerDataTuple):
        def total_steps(self, steps):
            return steps * 2 if self.options.get("second_order", False) else steps

    common = types.SimpleNamespace(SamplerData=SamplerData)

    class KDiffusionSampler:
        def __init__(self, funcname, sd_model):
            self.func, self.sd_model = funcname, sd_model

    kdiffusion = types.SimpleNamespace(KDiffusionSampler=KDiffusionSampler, sampler_extra_params={})
    sd = types.SimpleNamespace()
    sd.all_samplers = [SamplerData(name, None, [], {}) for name in ("DPM++ 2M", "Euler") + tuple(existing)]
    sd.all_samplers_map = {s.name: s for s in sd.all_samplers}
    sd.samplers_map = {}
    sd.set_samplers_calls = 0

    def set_samplers():
        sd.set_samplers_calls += 1
        sd.samplers = sd.all_samplers
        sd.samplers_map.clear()
        for sampler in sd.all_samplers:
            sd.samplers_map[sampler.name.lower()] = sampler.name
            for alias in sampler.aliases:
                sd.samplers_map[alias.lower()] = sampler.name

    @functools.cache
    def get_sampler_and_scheduler(name, scheduler):
        return sd.all_samplers_map.get(name, sd.all_samplers[0]).name, scheduler

    sd.set_samplers = set_samplers
    sd.get_sampler_and_scheduler = get_sampler_and_scheduler
    if forge:
        sd.add_sampler_calls = []

        def add_sampler(sampler):
            sd.add_sampler_calls.append(sampler.name)
            if sampler.name not in [x.name for x in sd.all_samplers]:
                sd.all_samplers.append(sampler)
                sd.all_samplers_map = {x.name: x for x in sd.all_samplers}
                set_samplers()

        sd.add_sampler = add_sampler
    set_samplers()
    return sd, common, kdiffusion


class Options:
    def __init__(self, **values):
        self.__dict__.update(values)


def labels_of(sd):
    return [s.name for s in sd.all_samplers]


# ---- registration --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_registration_adds_each_label_once_and_reload_replaces_in_place(forge):
    sd, common, kd = make_stub_webui(forge=forge)
    sd.get_sampler_and_scheduler(V3, None)                          # cached before registration: must be cleared
    host = registration.Host(opts=Options())
    first = registration.setup(host, modules=(sd, common, kd))
    assert first == [entry.label for entry in catalog.ENTRIES]
    assert sd.get_sampler_and_scheduler(V3, None)[0] == V3
    order = labels_of(sd)
    second = registration.setup(host, modules=(sd, common, kd))   # "Reload UI"
    assert second == first
    assert labels_of(sd) == order and len(order) == len(set(order))
    assert set(sd.all_samplers_map) == set(order)
    for entry in catalog.ENTRIES:
        assert sd.samplers_map[entry.alias] == entry.label
        assert sd.all_samplers_map[entry.label].options[registration.MARKER] == entry.label
    if forge:   # Forge: new entries through add_sampler, replacements in place
        assert sd.add_sampler_calls == first
    assert sd.set_samplers_calls >= 2


def test_a_label_another_extension_took_is_left_to_it():
    sd, common, kd = make_stub_webui(existing=("DPM++ 3M (dpm-solver-nodes)",))
    labels = registration.setup(registration.Host(opts=Options()), modules=(sd, common, kd))
    assert "DPM++ 3M (dpm-solver-nodes)" not in labels and len(labels) == len(catalog.ENTRIES) - 1
    assert not registration.is_ours(sd.all_samplers_map["DPM++ 3M (dpm-solver-nodes)"])
    assert labels_of(sd).count("DPM++ 3M (dpm-solver-nodes)") == 1


def test_one_naming_scheme_next_to_the_builtins():
    """Every label is "<method> (dpm-solver-nodes)", the method written as the WebUI writes its built-ins ("DPM++"
    for DPM-Solver++, order + S/M), every alias "dpm_solver_nodes_<method>"; no label is a built-in's or ends in a
    scheduler's name (the WebUI would split it off)."""
    builtin = {"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
               "DPM fast", "DPM adaptive", "DPM2", "DPM2 a"}
    labels = [entry.label for entry in catalog.ENTRIES]
    assert len(labels) == len(set(labels)) == 13 and not builtin & set(labels)
    for entry in catalog.ENTRIES:
        assert entry.label == entry.method + " (dpm-solver-nodes)"
        assert not any(entry.label.endswith(" " + name) for name in A1111_SCHEDULERS), entry.label
        assert re.fullmatch(r"dpm_solver_nodes_(dpmpp|dpm_solver)(_[a-z0-9]+)*", entry.alias), entry.alias
        assert entry.alias.count("dpm_solver_nodes") == 1, entry.alias
        family = "DPM++ " if entry.sampler.startswith("dpmpp") else "DPM-Solver"
        assert entry.method.startswith(family), entry.method
        assert ("SDE" in entry.method) == entry.stochastic, entry.method
    assert len({entry.alias for entry in catalog.ENTRIES}) == len(labels)
    # the SDE methods that are the built-ins' methods carry the built-ins' names
    for name in ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"):
        assert name + " (dpm-solver-nodes)" in labels


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_labels_of_0_1_0_stay_resolvable(forge):
    """An old infotext's "Sampler:" (pasted) and an old X/Y/Z grid value (aliases) reach the entry running the same
    method with the same fixed options; a name another sampler has now is left to that sampler."""
    sd, common, kd = make_stub_webui(forge=forge, existing=("DPM++ 3M",))
    registration.setup(registration.Host(opts=Options()), modules=(sd, common, kd))
    for old, (sampler, fixed) in LABELS_0_1_0.items():
        params = {"Sampler": old, "Schedule type": "Karras", "Hires sampler": old}
        registration.upgrade_pasted_infotext("", params, sd)
        if old == "DPM++ 3M":                       # another extension's sampler now: not ours to take
            assert params["Sampler"] == "DPM++ 3M" and sd.samplers_map["dpm++ 3m"] == "DPM++ 3M"
            continue
        entry = catalog.ENTRIES_BY_LABEL[params["Sampler"]]
        assert (entry.sampler, entry.fixed) == (sampler, fixed) and params["Hires sampler"] == entry.label, old
        assert params["Schedule type"] == "Karras" and sd.samplers_map[old.lower()] == entry.label
    params = {"Sampler": "DPM++ 2M"}
    registration.upgrade_pasted_infotext("", params, sd)
    assert params == {"Sampler": "DPM++ 2M"}
    assert "DPM++ 3M" not in sd.all_samplers_map["DPM++ 3M (dpm-solver-nodes)"].aliases


def test_constructor_builds_the_webui_sampler_class_and_s_noise_is_registered():
    sd, common, kd = make_stub_webui()
    registration.setup(registration.Host(opts=Options()), modules=(sd, common, kd))
    data = sd.all_samplers_map["DPM++ 2M SDE (dpm-solver-nodes)"]
    sampler = data.constructor("model")
    assert isinstance(sampler, kd.KDiffusionSampler) and sampler.sd_model == "model"
    assert kd.sampler_extra_params[sampler.func] == ["s_noise"]
    assert sd.all_samplers_map["DPM++ 2S (dpm-solver-nodes)"].options["second_order"] is True
    assert data.options["brownian_noise"] is True and "solver_type" not in data.options


# ---- injected-parameter hygiene ------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", catalog.ENTRIES, ids=lambda e: e.label)
def test_signature_shows_only_intended_parameters(entry):
    function = registration.build_sampler_function(entry, registration.Host(opts=Options()))
    parameters = set(inspect.signature(function).parameters)
    assert set(catalog.BASE_PARAMETERS) <= parameters
    assert not parameters & NEVER_INJECTED
    assert ("noise_sampler" in parameters) == entry.stochastic == bool(entry.options.get("brownian_noise"))
    assert ("eta" in parameters) == ("s_noise" in parameters) == entry.stochastic
    with pytest.raises(TypeError, match="unexpected parameters"):
        function(None, torch.zeros(1, 8), torch.tensor([1.0, 0.0]), n=12)


@pytest.mark.parametrize("entry", catalog.ENTRIES, ids=lambda e: e.label)
def test_fixed_and_injected_options_exist_on_the_sampler(entry):
    accepted = set(inspect.signature(SAMPLERS[entry.sampler]).parameters)
    expected = set(entry.fixed) | {"model_kind"} | set(entry.accepts)
    if entry.uses_ems:
        expected |= {"ems", "order", "use_corrector", "half", "half_sigma"}
    assert expected <= accepted, expected - accepted


# ---- model kind ----------------------------------------------------------------------------------------------------

def cfg_model(inner_sd_model=None, predictor=None, p=None, sigmas=None):
    """The object the WebUI passes as ``model``: CFG denoiser -> k-diffusion wrap -> sd_model."""
    wrap = types.SimpleNamespace(inner_model=inner_sd_model, sigmas=sigmas)
    if predictor is not None:
        wrap.predictor = predictor
    return types.SimpleNamespace(inner_model=wrap, p=p)


@pytest.mark.parametrize("prediction_type, kind", [("epsilon", "eps"), ("v_prediction", "eps"), ("edm", "eps"),
                                                   ("const", "flow")])
def test_model_kind_forge_predictor(prediction_type, kind):
    model = cfg_model(predictor=types.SimpleNamespace(prediction_type=prediction_type))
    assert registration.detect_model_kind(model) == kind


@pytest.mark.parametrize("attributes, kind", [({"parameterization": "eps"}, "eps"), ({"parameterization": "v"}, "eps"),
                                              ({"parameterization": "eps", "is_sdxl": True}, "eps"),
                                              ({"is_sd3": True, "parameterization": "eps"}, "flow")])
def test_model_kind_a1111(attributes, kind):
    assert registration.detect_model_kind(cfg_model(types.SimpleNamespace(**attributes))) == kind


def test_unsupported_models_are_refused_clearly():
    with pytest.raises(registration.UnsupportedModelError, match="parameterization 'x0'"):
        registration.detect_model_kind(cfg_model(types.SimpleNamespace(parameterization="x0")))
    with pytest.raises(registration.UnsupportedModelError, match="prediction_type 'x0'"):
        registration.detect_model_kind(cfg_model(predictor=types.SimpleNamespace(prediction_type="x0")))
    with pytest.raises(registration.UnsupportedModelError, match="is a checkpoint loaded"):
        registration.detect_model_kind(types.SimpleNamespace(inner_model=None))


# ---- running -------------------------------------------------------------------------------------------------------

MIXTURE = GaussianMixture.random(dim=8, components=3, seed=3)


class WebUIModel:
    """The GMM's exact denoiser behind the WebUI's object chain (``model.inner_model.inner_model``)."""

    def __init__(self, kind="eps", p=None):
        self.kind = kind
        sd_model = types.SimpleNamespace(parameterization="eps", is_sd3=False)
        predictor = types.SimpleNamespace(prediction_type="const") if kind == "flow" else None
        self.inner_model = types.SimpleNamespace(inner_model=sd_model, sigmas=torch.linspace(0.03, 14.6, 1000))
        if predictor is not None:
            self.inner_model.predictor = predictor
        self.p = p
        self.calls = 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        return MIXTURE.denoise(x, sigma, self.kind)


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def registered_functions(opts=None, find_ems=None):
    host = registration.Host(opts=opts or Options(), find_ems=find_ems)
    return {entry.label: registration.build_sampler_function(entry, host) for entry in catalog.ENTRIES}


def test_wrapped_2m_equals_the_direct_call_for_eps_and_flow():
    functions = registered_functions()
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind, sigmas in (("eps", karras(10)), ("flow", torch.linspace(1.0, 0.0, 11, dtype=torch.float64))):
        model = WebUIModel(kind)
        start = x * (sigmas[0] if kind == "eps" else 1.0)
        wrapped = functions["DPM++ 2M (dpm-solver-nodes)"](model, start, sigmas=sigmas, extra_args={}, disable=True)
        direct = sample_dpmpp_2m(MIXTURE.denoiser(kind), start, sigmas, disable=True, model_kind=kind)
        assert torch.equal(wrapped, direct), kind


def test_forge_flow_schedule_ending_in_two_zeros_samples_like_one_zero():
    """Forge's uniform schedules for flow predictors end [..., 0, 0] (timestep 0 -> sigma 0, then append_zero):
    every sampler runs on them and gives exactly what the single-zero schedule gives, with no extra model call."""
    functions = registered_functions()
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    single = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    double = torch.cat([single, single.new_zeros(1)])
    assert torch.equal(registration.drop_repeated_final_zeros(double), single)
    assert torch.equal(registration.drop_repeated_final_zeros(single), single)
    for entry in catalog.ENTRIES:
        outputs, calls = [], []
        for sigmas in (single, double):
            model = WebUIModel("flow")
            function = functions[entry.label]
            outputs.append(function(model, x.clone(), sigmas=sigmas, extra_args={"seed": 5}, disable=True))
            calls.append(model.calls)
        assert torch.isfinite(outputs[1]).all(), entry.label
        assert calls[0] == calls[1], (entry.label, calls)
        if not entry.stochastic:
            assert torch.equal(outputs[0], outputs[1]), entry.label


def test_sde_takes_noise_from_the_injected_noise_sampler():
    functions = registered_functions()
    sigmas = karras(8)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    requests = []

    def noise_sampler(sigma, sigma_next):
        requests.append((float(sigma), float(sigma_next)))
        return torch.full_like(x, 0.5)

    out = functions["DPM++ 2M SDE (dpm-solver-nodes)"](WebUIModel(), x, sigmas=sigmas, extra_args={}, disable=True,
                                                       noise_sampler=noise_sampler, eta=0.7, s_noise=1.0)
    direct = sample_dpmpp_2m_sde(MIXTURE.denoiser(), x, sigmas, disable=True,
                                 noise_sampler=lambda s, t: torch.full_like(x, 0.5), eta=0.7, solver_type="midpoint")
    assert torch.equal(out, direct)
    assert len(requests) == len(sigmas) - 2   # every step but the final denoise draws noise


def test_sde_without_noise_sampler_uses_the_webui_rng():
    draws = []

    class RNG:
        def next(self):
            draws.append(1)
            return torch.zeros(2, 8)

    p = types.SimpleNamespace(rng=RNG(), extra_generation_params={})
    sigmas = karras(6)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    out = registered_functions()["DPM++ 1 SDE (dpm-solver-nodes)"](WebUIModel(p=p), x, sigmas=sigmas, extra_args={},
                                                                   disable=True, noise_sampler=None)
    assert torch.isfinite(out).all() and len(draws) == len(sigmas) - 2


def test_v3_options_and_infotext_fields():
    seen = {}

    def find_ems(model, x, kind, cfg):
        seen.update(kind=kind, cfg=cfg)
        return None, "none"

    p = types.SimpleNamespace(cfg_scale=7.0, extra_generation_params={})
    opts = Options(dpm_solver_v3_order=3, dpm_solver_v3_corrector="Noisy half", dpm_solver_v3_use_ems=True)
    sigmas = karras(12)
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    out = registered_functions(opts, find_ems)[V3](WebUIModel(p=p), x, sigmas=sigmas, extra_args={}, disable=True)
    assert torch.isfinite(out).all() and seen == {"kind": "eps", "cfg": 7.0}
    assert p.extra_generation_params == {"DPM-Solver-v3 order": 3, "DPM-Solver-v3 corrector": "Noisy half",
                                         "DPM-Solver-v3 use EMS": True, "DPM-Solver-v3 EMS": "none",
                                         "DPM-Solver-v3 ran": "DPM-Solver++ with the v3 corrector (no EMS)"}
    options, _ = registration.v3_options(WebUIModel(p=p), x, "eps", p, registration.Host(opts=opts,
                                                                                          find_ems=find_ems))
    assert options["half"] == "noisy" and options["half_sigma"] == pytest.approx(
        float(torch.linspace(0.03, 14.6, 1000)[499]))
    # infotext names are the settings' infotext names, so pasting the PNG's parameters restores the settings
    infotext_names = {s.infotext for s in settings.SETTINGS if s.infotext}
    assert set(p.extra_generation_params) - {"DPM-Solver-v3 EMS", "DPM-Solver-v3 ran"} == infotext_names


def test_v3_runs_what_the_ems_decision_says_records_it_and_warns_on_a_fallback(caplog):
    """EMS whose check chose DPM-Solver++(2M) at 5 NFE and v3 without corrector at 10: a 5-step run is the 2M bit
    for bit, with the reason in the infotext and one WARNING (not repeated until the checkpoint changes); an 11-step
    run is v3 with the decision's corrector (corrector setting "Automatic", though CFG 3 would turn it on)."""
    from dpm_solver_nodes.samplers import sample_dpm_solver_v3
    from dpm_solver_nodes.samplers.ems_data import EMSData, NFEDecision

    plain = EMSData.degenerate(torch.linspace(-2.7, 3.6, 11, dtype=torch.float64))
    ems = EMSData(plain.lambdas, plain.l, plain.s + 0.05, plain.b, model_kind="eps",
                  decisions=[NFEDecision(5, "dpmpp_2m", 1.3), NFEDecision(10, "v3", 0.8, corrector=False)])
    opts = Options(dpm_solver_v3_corrector="Automatic")
    function = registered_functions(opts, lambda model, x, kind, cfg: (ems, "5eed cfg 3"))[V3]
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 14.6
    registration.forget_warnings()
    caplog.set_level(logging.WARNING, logger="dpm_solver_nodes")
    runs = {}
    for steps in (5, 5, 11):
        p = types.SimpleNamespace(cfg_scale=3.0, extra_generation_params={})
        runs[steps] = (function(WebUIModel(p=p), x, sigmas=karras(steps), extra_args={}, disable=True),
                       p.extra_generation_params["DPM-Solver-v3 ran"])
    out, ran = runs[5]
    assert torch.equal(out, sample_dpmpp_2m(MIXTURE.denoiser(), x, karras(5), disable=True))
    # Karras sigmas are not the spacing the decisions were measured on: said in the infotext and the warning
    assert ran == ("DPM-Solver++(2M) (the EMS check chose it over v3 at 5 NFE; stored error ratio 1.30; not on this "
                   "schedule)")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("DPM-Solver-v3: the EMS check chose DPM-Solver++(2M) over v3 at 5 NFE (stored "
                                  "error ratio 1.30); this 5-step run uses DPM-Solver++(2M); the EMS decisions were "
                                  "measured on steps uniform in log sigma")
    assert warnings[1].startswith("DPM-Solver-v3 at 11 steps: the EMS decisions were measured on steps uniform")
    out, ran = runs[11]
    assert torch.equal(out, sample_dpm_solver_v3(MIXTURE.denoiser(), x, karras(11), disable=True, ems=ems,
                                                 use_corrector=False))
    assert not torch.equal(out, sample_dpm_solver_v3(MIXTURE.denoiser(), x, karras(11), disable=True, ems=ems,
                                                     use_corrector=True))
    assert ran == "v3 with EMS, corrector off (checked at 10 NFE: error ratio 0.80; not on this schedule)"
    registration.forget_warnings()            # a checkpoint change: the next fallback warns again
    function(WebUIModel(p=types.SimpleNamespace(cfg_scale=3.0, extra_generation_params={})), x, sigmas=karras(5),
             extra_args={}, disable=True)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 3


def test_adaptive_records_the_model_calls_it_made_whatever_steps_says():
    """"DPM-Solver adaptive" takes its step sizes from the error tolerance: Steps 6 and 30 give the same sigma range
    (Karras), the same sample and the same calls, and the infotext records that count."""
    function = registered_functions()["DPM-Solver adaptive (dpm-solver-nodes)"]
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 14.6
    outputs, records = [], []
    for steps in (6, 30):
        p = types.SimpleNamespace(extra_generation_params={})
        model = WebUIModel(p=p)
        outputs.append(function(model, x.clone(), sigmas=karras(steps), extra_args={}, disable=True))
        records.append((model.calls, p.extra_generation_params[registration.ADAPTIVE_INFOTEXT]))
    assert torch.equal(outputs[0], outputs[1]) and records[0] == records[1]
    calls, text = records[0]
    assert calls > 6 and text.startswith(f"{calls} model calls (") and "," not in text and ":" not in text


@pytest.mark.parametrize("choice, cfg, expected", [("Automatic", 3.0, (True, None)), ("Automatic", 7.5, (False, None)),
                                                   ("On", 9.0, (True, None)), ("Off", 1.0, (False, None)),
                                                   ("Clean half", 7.0, (True, "clean"))])
def test_corrector_setting(choice, cfg, expected):
    assert registration.corrector_options(choice, cfg) == expected


def test_settings_defaults_and_validation():
    assert settings.get(None, "dpm_solver_v3_order") == 2
    assert settings.get(Options(dpm_solver_v3_order=9), "dpm_solver_v3_order") == 3
    assert settings.get(Options(dpm_solver_ems_grid=6), "dpm_solver_ems_grid") == 6
    from dpm_solver_nodes.stats import EMSSettings  # out of range: the default
    assert settings.get(Options(dpm_solver_ems_samples=0), "dpm_solver_ems_samples") == EMSSettings().K
    assert settings.get(Options(dpm_solver_ems_reduction="bogus"), "dpm_solver_ems_reduction") == "per_channel"
    assert settings.ems_folder(Options(), "/models") == os.path.join("/models", "dpm_solver_v3_ems")
    added = {}
    shared = types.SimpleNamespace(OptionInfo=lambda *a, **k: (a, k),
                                   opts=types.SimpleNamespace(add_option=lambda key, info: added.update({key: info})))
    settings.add_settings(shared)
    assert set(added) == set(settings.SETTINGS_BY_KEY)
    assert added["dpm_solver_v3_order"][1]["infotext"] == "DPM-Solver-v3 order"


# ---- EMS store -----------------------------------------------------------------------------------------------------

def test_ems_store_nearest_cfg_and_identity(tmp_path):
    from dpm_solver_nodes.stats import EMS, EMSKey, EMSSettings, EMSTarget

    store = ems_store.EMSStore(lambda: str(tmp_path))
    lambdas = torch.linspace(-3, 4, 11, dtype=torch.float64)
    table = torch.linspace(0.03, 14.6, 1000)
    digest = ems_store.sigma_digest(table)
    settings = EMSSettings(N=10, K=16, reduction="per_channel")
    for cfg in (3.0, 7.0):
        key = EMSKey(EMSTarget("ab" * 32, "eps", cfg, (4, 8, 8), 0.03, 14.6, digest), settings)
        ems = EMS.degenerate(lambdas, channels=4)
        ems = EMS(ems.lambdas, ems.l * (1 + cfg / 100), ems.s, ems.b,
                  metadata={"cfg": cfg, "cache_key": key.to_json()})
        store.save(ems, store.file_name(key))
    found, description = store.find_for_generation("ab" * 32, "eps", digest, 6.0, 10, 16, "per_channel",
                                                   (4, 64, 64))
    assert found is not None and found.metadata["cfg"] == "7.0" and description.startswith("abababab")
    again, _ = store.find_for_generation("ab" * 32, "eps", digest, 6.0, 10, 16, "per_channel", (4, 64, 64))
    assert again is found  # kept in memory: v3's plan cache hits on the next generation
    assert store.find_for_generation("cd" * 32, "eps", digest, 6.0, 10, 16, "per_channel", (4, 8, 8))[0] is None
    assert store.find_for_generation("ab" * 32, "flow", digest, 6.0, 10, 16, "per_channel", (4, 8, 8))[0] is None
    assert store.find_for_generation("ab" * 32, "eps", ems_store.sigma_digest(table * 2), 6.0, 10, 16,
                                     "per_channel", (4, 8, 8))[0] is None
    assert store.find_for_generation("ab" * 32, "eps", digest, 6.0, 20, 16, "per_channel", (4, 8, 8))[0] is None
    assert ems_store.sigma_digest(table) == ems_store.sigma_digest(table.double())


def test_one_bad_file_does_not_break_v3_for_any_checkpoint(tmp_path, caplog):
    """main: one file whose cache_key was JSON but not a dict made ``EMSStore.find`` raise for every checkpoint."""
    store = ems_store.EMSStore(lambda: str(tmp_path))
    from safetensors.torch import save_file

    from dpm_solver_nodes.stats.ems import tensor_digest

    tensors = {"lambdas": torch.linspace(-3, 4, 11, dtype=torch.float64), "l": torch.ones(11, 4, 1, 1),
               "s": torch.zeros(11, 4, 1, 1), "b": torch.zeros(11, 4, 1, 1)}
    for name, cache_key in (("list", "[1, 2]"), ("no_cfg", '{"target": {}, "settings": {}, "version": "3"}')):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"),
                  metadata={"format": "dpm_solver_nodes.ems", "version": "2", "cache_key": cache_key,
                            "tensor_sha256": tensor_digest(tensors)})
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        assert store.find_for_generation("ab" * 32, "eps", "0" * 16, 6.0, 10, 16, "per_channel", (4, 8, 8)) == (
            None, "none")
    assert sum("skipping EMS file" in r.getMessage() for r in caplog.records) == 2


def test_fixed_batch_model_matches_direct_calls():
    calls = []

    def model(x, sigma, **extra):
        calls.append(x.shape[0])
        return x * sigma[:, None] + extra["offset"]

    fixed = ems_tab.FixedBatchModel(model, 3)
    x, sigma = torch.randn(7, 5), torch.rand(7)
    assert torch.allclose(fixed(x, sigma, offset=1.0), x * sigma[:, None] + 1.0)
    assert calls == [3, 3, 3]


# ---- install.py and loading ------------------------------------------------------------------------------------------

def test_install_py_does_nothing_outside_the_webui(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and "nothing to do" in result.stdout


def test_install_py_installs_only_what_is_missing(tmp_path):
    (tmp_path / "launch.py").write_text(
        "calls = []\n"
        "def is_installed(name):\n    return name != 'torchsde'\n"
        "def run_pip(command, desc=None):\n    print('PIP', command)\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip().splitlines() == ["PIP install torchsde"]


ENTRY_SCRIPT_RUN = r"""
import collections, importlib.util, json, sys, types

SamplerData = collections.namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])
callbacks = []
modules = types.ModuleType("modules"); modules.__path__ = []
sd = types.ModuleType("modules.sd_samplers")
sd.all_samplers = [SamplerData("DPM++ 2M", None, [], {})]
sd.all_samplers_map = {s.name: s for s in sd.all_samplers}
sd.set_samplers = lambda: None
common = types.ModuleType("modules.sd_samplers_common"); common.SamplerData = SamplerData
kd = types.ModuleType("modules.sd_samplers_kdiffusion"); kd.sampler_extra_params = {}
kd.KDiffusionSampler = lambda func, model: (func, model)
cb = types.ModuleType("modules.script_callbacks")
for hook in ("on_ui_settings", "on_model_loaded", "on_ui_tabs", "on_infotext_pasted"):
    setattr(cb, hook, lambda fn, name=None, hook=hook: callbacks.append(hook))
sched = types.ModuleType("modules.sd_schedulers")  # A1111 1.10 / Forge / reForge: dataclass, list, map
sched.Scheduler = collections.namedtuple("Scheduler", ["name", "label", "function", "default_rho", "need_inner_model",
                                                       "aliases"], defaults=[-1, False, None])
sched.schedulers = [sched.Scheduler("karras", "Karras", None, 7.0)]
sched.schedulers_map = {**{x.name: x for x in sched.schedulers}, **{x.label: x for x in sched.schedulers}}
for name, module in (("modules", modules), ("modules.sd_samplers", sd), ("modules.sd_samplers_common", common),
                     ("modules.sd_samplers_kdiffusion", kd), ("modules.script_callbacks", cb),
                     ("modules.sd_schedulers", sched)):
    sys.modules[name] = module
    setattr(modules, name.split(".")[-1], module)

def execute():  # as modules/script_loading.load_module does
    spec = importlib.util.spec_from_file_location("dpm_solver_nodes_webui.py", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

first = execute()
second = execute()   # Reload UI
print(json.dumps({"registered": second.REGISTERED, "names": [s.name for s in sd.all_samplers],
                  "schedulers": [s.name for s in sched.schedulers], "scheduler_map": sorted(sched.schedulers_map),
                  "need_inner_model": sched.schedulers[-1].need_inner_model,
                  "package_path": list(sys.modules["dpm_solver_nodes"].__path__),
                  "top_level_samplers": "samplers" in sys.modules, "callbacks": callbacks}))
"""


def test_entry_script_loads_the_package_under_its_unique_name_and_reloads(tmp_path):
    """Executes scripts/dpm_solver_nodes_webui.py twice in a fresh interpreter, as the WebUI's script loader does
    at start-up and on Reload UI, against minimal ``modules`` stand-ins."""
    import json

    script = os.path.join(ROOT, "scripts", "dpm_solver_nodes_webui.py")
    result = subprocess.run([sys.executable, "-c", ENTRY_SCRIPT_RUN, script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package_path"] == [ROOT] and not report["top_level_samplers"]
    labels = [entry.label for entry in catalog.ENTRIES]
    assert report["registered"] == labels
    assert report["names"] == ["DPM++ 2M"] + labels
    assert report["callbacks"] == ["on_ui_settings", "on_model_loaded", "on_ui_tabs", "on_infotext_pasted"] * 2
    assert report["schedulers"] == ["karras", "dpm_solver_recommended"]  # once, after Reload UI too
    assert report["scheduler_map"] == sorted(["karras", "Karras", "dpm_solver_recommended", "DPM-Solver recommended"])
    assert report["need_inner_model"] is True
    scripts = [name for name in os.listdir(os.path.join(ROOT, "scripts")) if name.endswith(".py")]
    assert scripts == ["dpm_solver_nodes_webui.py"]   # the WebUI executes every scripts/*.py


# ---- Forge / reForge: continuous timesteps for the EMS job ---------------------------------------------------------

def sd1_sigmas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def test_interpolated_timestep_equals_kdiffusion_sigma_to_t():
    from kdiffusion_reference import load

    load()
    external = importlib.import_module("k_diffusion.external")
    sigmas = sd1_sigmas()
    schedule = external.DiscreteSchedule(sigmas, quantize=False)
    probe = torch.exp(torch.linspace(float(sigmas[0].log()), float(sigmas[-1].log()), 37))
    expected = schedule.sigma_to_t(probe)
    assert torch.allclose(ems_tab.interpolated_timestep(probe, sigmas.log()), expected, atol=1e-4)
    assert not torch.equal(expected, expected.round())


def test_continuous_timesteps_patches_only_forge_discrete_predictors():
    class DiscretePredictor:          # Forge's Prediction: nearest integer timestep
        prediction_type = "epsilon"

        def __init__(self):
            self.log_sigmas = sd1_sigmas().log()

        def timestep(self, sigma):
            return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    predictor = DiscretePredictor()
    model = cfg_model(predictor=predictor)
    sigma = torch.tensor([0.5, 3.0])
    rounded = predictor.timestep(sigma)
    with ems_tab.continuous_timesteps(model):
        inside = predictor.timestep(sigma)
    assert torch.equal(rounded, rounded.round()) and not torch.equal(inside, inside.round())
    assert torch.allclose(inside, ems_tab.interpolated_timestep(sigma, predictor.log_sigmas))
    assert torch.equal(predictor.timestep(sigma), rounded)            # restored
    flow = types.SimpleNamespace(prediction_type="const", log_sigmas=torch.zeros(3), timestep=lambda s: s * 1000)
    with ems_tab.continuous_timesteps(cfg_model(predictor=flow)):
        assert torch.equal(flow.timestep(sigma), sigma * 1000)


def test_continuous_timesteps_patches_reforge_ldm_patched_model_sampling():
    """reForge: A1111's CompVisDenoiser wrap, but the model runs through the ldm_patched model sampling of
    ``sd_model.forge_objects.unet.model``, whose timestep rounds: both are made continuous, then restored."""
    class ModelSamplingDiscrete(torch.nn.Module):       # ldm_patched's: no prediction_type, argmin timestep
        def __init__(self):
            super().__init__()
            self.register_buffer("log_sigmas", sd1_sigmas().log())

        def timestep(self, sigma):
            return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    sampling = ModelSamplingDiscrete()
    unet = types.SimpleNamespace(model=types.SimpleNamespace(model_sampling=sampling))
    sd_model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet))
    wrap = types.SimpleNamespace(inner_model=sd_model, quantize=True)
    model = types.SimpleNamespace(inner_model=wrap)
    sigma = torch.tensor([0.5, 3.0])
    rounded = sampling.timestep(sigma)
    with ems_tab.continuous_timesteps(model):
        inside = sampling.timestep(sigma)
        assert wrap.quantize is False
    assert torch.allclose(inside, ems_tab.interpolated_timestep(sigma, sampling.log_sigmas))
    assert not torch.equal(inside, inside.round())
    assert torch.equal(sampling.timestep(sigma), rounded) and wrap.quantize is True


def test_continuous_timesteps_turns_a1111_quantization_off_for_the_job():
    wrap = types.SimpleNamespace(quantize=True, inner_model=None)
    model = types.SimpleNamespace(inner_model=wrap)
    with ems_tab.continuous_timesteps(model):
        assert wrap.quantize is False
    assert wrap.quantize is True


def test_ems_tab_job_runs_the_one_job_and_the_sampler_finds_its_file(tmp_path):
    """The tab's job (``ems_tab.EMSJob``, a WebUI sampler function) on the WebUI object chain: it stores the EMS
    under the checkpoint's sha256, returns the first samples as its images, and the v3 sampler's lookup
    (``find_for_sampler``) serves the very same object at the next generations."""
    store = ems_store.EMSStore(lambda: str(tmp_path))
    p = types.SimpleNamespace(cfg_scale=3.0, prompt="a digit")
    model = WebUIModel("eps", p=p)
    model.inner_model.inner_model.sd_checkpoint_info = types.SimpleNamespace(sha256="ab" * 32, model_name="toy")
    x = torch.randn(4, 8, 1, 1)
    job = ems_tab.EMSJob(store, N=50, K=4, reduction="per_channel", seed=0, x0_steps=6)  # the smallest checked N
    images = job(model, x, None, {})
    assert images.shape == x.shape and torch.isfinite(images).all()
    assert job.save_error is None and os.path.dirname(job.path) == str(tmp_path)
    assert job.key.target.fingerprint == "ab" * 32 and job.result.metadata["host"] == "webui"
    opts = Options(dpm_solver_ems_grid=50, dpm_solver_ems_samples=4, dpm_solver_ems_reduction="per_channel")
    found, description = store.find_for_sampler(model, x, "eps", 3.0, opts)
    assert found is not None and description.startswith("abababab")
    assert store.find_for_sampler(model, x, "eps", 3.0, opts)[0] is found
    assert store.find_for_sampler(model, x, "eps", 3.0, Options(dpm_solver_ems_grid=48))[0] is None  # other N


def test_ems_tab_estimate_is_the_settings_cost_and_says_when_no_check_fits():
    from dpm_solver_nodes.stats.settings import EMSSettings

    rows = EMSSettings(N=100, K=32, x0_steps=20).cost(guided=True)
    text = ems_tab.estimate_text(100, 32, "per_channel", 20, 4)
    assert text.startswith(f"Cost: {rows['total']:,} model rows (data samples {rows['x0']:,}, estimation "
                           f"{rows['estimate']:,}, tuning {rows['tune']:,}, check {rows['check']:,};")
    assert "measured on the first chunk" in text and "too small" not in text
    assert ems_tab.estimate_text(100, 30, "per_channel", 20, 4) == text       # K rounded up to whole batches of 4
    timed = ems_tab.estimate_text(100, 32, "per_channel", 20, 4, seconds_per_row=0.01)
    assert f"about {ems_tab.format_duration(0.01 * rows['total'])}." in timed
    assert "The job will refuse these settings: N = 10, K = 8 are too small to check DPM-Solver-v3" in \
        ems_tab.estimate_text(10, 8, "per_channel", 4, 4)
    assert "refuse" not in ems_tab.estimate_text(25, 8, "per_channel", 4, 4)
    assert ems_tab.estimate_text(1, 32, "per_channel", 20, 4).startswith("Invalid settings: N must be")


def test_ems_tab_outcome_says_where_v3_runs():
    from dpm_solver_nodes.samplers.ems_data import EMSData, NFEDecision

    plain = EMSData.degenerate(torch.linspace(-2.7, 3.6, 11, dtype=torch.float64))
    decided = EMSData(plain.lambdas, plain.l, plain.s, plain.b, decisions=[
        NFEDecision(5, "dpmpp_2m", 1.2), NFEDecision(6, "v3", 0.7), NFEDecision(8, "v3", 0.9),
        NFEDecision(10, "dpmpp_3m", 1.1)])
    assert ems_tab.describe_decisions(decided) == (
        "DPM-Solver-v3 runs DPM-Solver++(2M) at 5 NFE; v3 at 6, 8 NFE; DPM-Solver++(3M) at 10 NFE (the check's "
        "choice per NFE; a run uses the one nearest its step count).")
    assert ems_tab.describe_decisions(plain).startswith("No check ran")


def test_ems_tab_progress_time_left_at_the_recent_rate_and_interrupt(monkeypatch):
    """A fast first phase (400 evaluations in 4 s) then a slow one (20 in 20 s): the time left follows the last 20 s
    (560 left at 40 per 46 s: 644 s), not the average since the start (64 s)."""
    clock = [0.0]
    monkeypatch.setattr(ems_tab.time, "monotonic", lambda: clock[0])
    run = ems_tab.TabRun()
    run.thread = types.SimpleNamespace(is_alive=lambda: True)
    run.cost_rows, run.speed_key = 5000, ("toy", 64, 64, 4)
    assert "Preparing" in run.progress_html()
    run.finished = 0.0
    assert "Ended before the first model call of the job." in run.progress_html()     # e.g. no checkpoint loaded
    run.finished = None
    run.interrupt_host = lambda: pytest.fail("the WebUI was interrupted before the job's work started")
    run.stop()                                   # waiting for the WebUI's queue: only the job's own flag
    run.stop_requested.clear()
    assert run.should_stop() is False            # asked before the first model call: the work starts at 0
    for clock[0], done in ((0.1, 4), (4.0, 400), (30.0, 420), (50.0, 440)):
        run.progress(done, 1000)
    assert run.seconds_left() == pytest.approx(644.0)
    line = run.progress_html()
    assert "440 / 1,000 sample evaluations (44%)" in line and "about 11 min left" in line
    assert "first chunk: 4 in 0.10 s" in line and 'value="440" max="1000"' in line
    run.model_call()
    assert "; denoiser calls: 1" in run.progress_html()
    interrupted = []
    run.interrupt_host = lambda: interrupted.append(True)   # the WebUI's shared.state.interrupt()
    run.stop()
    assert run.should_stop() is True and "stopping" in run.progress_html() and interrupted == [True]
    clock[0] = 100.0
    run.progress(1000, 1000)
    assert run.speeds[("toy", 64, 64, 4)] == pytest.approx(100.0 / 5000)


# ---- the "DPM-Solver recommended" schedule type (scripts/dpm_solver_webui/schedulers.py) ---------------------------

def test_recommended_schedule_reads_the_model_kind_from_the_wrap():
    """KDiffusionSampler.get_sigmas calls function(n=, sigma_min=, sigma_max=, inner_model=model_wrap, device=)."""
    from dpm_solver_nodes.samplers import recommended_sigmas
    from dpm_solver_nodes.scripts.dpm_solver_webui import schedulers

    eps_wrap = cfg_model(types.SimpleNamespace(parameterization="v")).inner_model
    flow_wrap = cfg_model(predictor=types.SimpleNamespace(prediction_type="const")).inner_model
    sd3_wrap = cfg_model(types.SimpleNamespace(is_sd3=True)).inner_model
    out = schedulers.recommended_scheduler(n=12, sigma_min=0.0292, sigma_max=14.6, inner_model=eps_wrap, device="cpu")
    torch.testing.assert_close(out, recommended_sigmas(12, 0.0292, 14.6, "eps").float())
    for wrap in (flow_wrap, sd3_wrap):
        out = schedulers.recommended_scheduler(n=12, sigma_min=0.0029, sigma_max=1.0, inner_model=wrap, device="cpu")
        torch.testing.assert_close(out, recommended_sigmas(12, 0.0029, 1.0, "flow").float())
    with pytest.raises(registration.UnsupportedModelError):
        schedulers.recommended_scheduler(n=4, sigma_min=0.1, sigma_max=1.0, device="cpu",
                                         inner_model=cfg_model(types.SimpleNamespace(parameterization="x0")).inner_model)


def test_recommended_schedule_registration_is_idempotent():
    import dataclasses

    from dpm_solver_nodes.scripts.dpm_solver_webui import schedulers

    @dataclasses.dataclass
    class Scheduler:  # modules/sd_schedulers.py, A1111 1.10 / Forge / reForge
        name: str
        label: str
        function: object
        default_rho: float = -1
        need_inner_model: bool = False
        aliases: list = None

    module = types.SimpleNamespace(Scheduler=Scheduler, schedulers=[Scheduler("automatic", "Automatic", None)])
    module.schedulers_map = {"automatic": module.schedulers[0], "Automatic": module.schedulers[0]}
    listed = module.schedulers
    assert schedulers.register(module) == "DPM-Solver recommended"
    schedulers.register(module)
    assert module.schedulers is listed and [s.name for s in listed] == ["automatic", "dpm_solver_recommended"]
    entry = listed[-1]
    assert entry.need_inner_model and entry.default_rho == -1 and entry.function is schedulers.recommended_scheduler
    assert module.schedulers_map["dpm_solver_recommended"] is entry is module.schedulers_map["DPM-Solver recommended"]


def test_v3_outcome_says_when_the_schedule_is_not_the_one_the_decision_was_measured_on():
    """Infotext "DPM-Solver-v3 ran" and the console warning: a stored ratio describes runs on the spacing the EMS job
    measured it on (``stats.tuning.sampling_sigmas``); on Karras sigmas the user is told it was not measured."""
    from dpm_solver_nodes.samplers.sigmas import karras, with_zero
    from dpm_solver_nodes.stats import EMS
    from dpm_solver_nodes.stats.tuning import sampling_sigmas

    ems = EMS.degenerate(torch.linspace(-2.6, 3.5, 11), channels=4).replace(
        decisions=[(5, "dpmpp_2m", 1.0), (10, "v3", 0.7)])
    options = {"order": 2, "use_corrector": None}
    on = sampling_sigmas(10, 0.0292, 14.6, "eps")
    ran, warning = registration.v3_outcome(ems, 10, options, "file", on, "eps")
    assert ran == "v3 with EMS, corrector on (checked at 10 NFE: error ratio 0.70)" and warning is None
    off = with_zero(karras(10, 0.0292, 14.6))
    ran, warning = registration.v3_outcome(ems, 10, options, "file", off, "eps")
    assert ran.endswith("error ratio 0.70; not on this schedule)")
    assert warning.startswith("DPM-Solver-v3 at 10 steps: the EMS decisions were measured on steps uniform in log")
    ran, warning = registration.v3_outcome(ems, 5, options, "file", with_zero(karras(5, 0.0292, 14.6)), "eps")
    assert ran.startswith("DPM-Solver++(2M) (the EMS check chose it") and "not on this schedule" in ran
    assert "this 5-step run uses DPM-Solver++(2M); the EMS decisions were measured" in warning
    # without sigmas (older callers) nothing changes
    assert registration.v3_outcome(ems, 10, options, "file")[1] is None
