"""Unit tests of the ComfyUI adapter's host-free parts (no ComfyUI needed): widget -> option mapping against the
real sampler signatures and results, model-kind detection, the dropdown registration rules, the model fingerprint
and the EMS file index.  The adapter against a real ComfyUI is tests/test_comfyui_integration.py."""
from __future__ import annotations

import inspect
import os
import math
import subprocess
import sys
import types

import pytest
import torch

from dpm_solver_nodes import samplers
from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
from dpm_solver_nodes.nodes import comfy_sampling, fingerprint, model_kind, options
from dpm_solver_nodes.stats import EMS


# ---- model_sampling-like classes with ComfyUI's hierarchy (comfy/model_sampling.py, v0.3.64) ----------------------

def _parameterizations():
    module = types.SimpleNamespace()

    class EPS:
        pass

    class V_PREDICTION(EPS):
        pass

    class EDM(V_PREDICTION):
        pass

    class X0(EPS):
        pass

    class IMG_TO_IMG(X0):
        pass

    class CONST:
        pass

    class COSMOS_RFLOW:
        pass

    class ModelSamplingDiscrete(torch.nn.Module):
        def __init__(self, sigmas=None):
            super().__init__()
            sigmas = torch.linspace(0.03, 14.6, 1000) if sigmas is None else sigmas
            self.register_buffer("sigmas", sigmas.float())

    class ModelSamplingDiscreteFlow(torch.nn.Module):
        def __init__(self, shift=1.0):
            super().__init__()
            self.shift = shift
            t = torch.arange(1, 1001) / 1000
            self.register_buffer("sigmas", shift * t / (1 + (shift - 1) * t))

    for cls in (EPS, V_PREDICTION, EDM, X0, IMG_TO_IMG, CONST, COSMOS_RFLOW, ModelSamplingDiscrete,
                ModelSamplingDiscreteFlow):
        setattr(module, cls.__name__, cls)
    return module


P = _parameterizations()


def _sampling(base, kind, **kwargs):
    # ComfyUI builds these the same way: class ModelSampling(sampling_base, sampling_type)
    return type("ModelSampling", (base, kind), {})(**kwargs)


@pytest.mark.parametrize("kind_name, expected", [
    ("EPS", "eps"), ("V_PREDICTION", "eps"), ("EDM", "eps"), ("X0", "eps"), ("IMG_TO_IMG", "eps"),
    ("CONST", "flow")])
def test_model_kind_from_parameterization(kind_name, expected):
    ms = _sampling(P.ModelSamplingDiscrete, getattr(P, kind_name))
    assert model_kind.detect_model_kind(ms, P) == expected


def test_sd15_with_model_sampling_sd3_is_flow():
    # an EPS checkpoint patched with ModelSamplingSD3 arrives as (ModelSamplingDiscreteFlow, CONST)
    assert model_kind.detect_model_kind(_sampling(P.ModelSamplingDiscreteFlow, P.CONST, shift=3.0), P) == "flow"


def test_unsupported_parameterization_is_refused_by_name():
    with pytest.raises(ValueError, match="COSMOS_RFLOW"):
        model_kind.detect_model_kind(_sampling(P.ModelSamplingDiscrete, P.COSMOS_RFLOW), P)
    with pytest.raises(ValueError, match="no model_sampling"):
        model_kind.detect_model_kind(None, P)


def test_model_kind_read_through_the_sampler_wrapper_chain():
    ms = _sampling(P.ModelSamplingDiscreteFlow, P.CONST)
    base = types.SimpleNamespace(model_sampling=ms)
    guider = types.SimpleNamespace(inner_model=base, cfg=5.0)
    wrapper = types.SimpleNamespace(inner_model=guider)  # KSamplerX0Inpaint -> CFGGuider -> BaseModel
    assert model_kind.model_kind_of_sampler_model(wrapper, P) == "flow"
    assert model_kind.find_attribute(wrapper, "cfg") == 5.0


# ---- option mapping -------------------------------------------------------------------------------------------

def _bind(name, opts):
    function = samplers.SAMPLERS[name]
    parameters = inspect.signature(function).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values()), f"{name} is still a stub"
    inspect.signature(function).bind(None, None, None, model_kind="eps", **opts)


@pytest.mark.parametrize("spec", options.SAMPLER_NODES, ids=lambda s: s.node_id)
def test_every_node_maps_its_widgets_to_real_sampler_options(spec):
    assert spec.node_id.startswith(options.NODE_PREFIX)
    name, opts = spec.build(**options.widget_defaults(spec))
    _bind(name, opts)
    # every choice of every combo maps to options the sampler accepts
    for widget, (kind, _config) in spec.widgets.items():
        if isinstance(kind, list):
            for choice in kind:
                name, opts = spec.build(**{**options.widget_defaults(spec), widget: choice})
                _bind(name, opts)


@pytest.mark.parametrize("entry", sorted(options.DROPDOWN_SAMPLERS))
def test_dropdown_entries_name_real_samplers(entry):
    assert entry.startswith(options.DROPDOWN_PREFIX)
    name, fixed = options.DROPDOWN_SAMPLERS[entry]
    _bind(name, fixed)


def _library_defaults(name):
    return {k: p.default for k, p in inspect.signature(samplers.SAMPLERS[name]).parameters.items()
            if p.kind is p.KEYWORD_ONLY}


@pytest.mark.parametrize("node_id", ["DPMSolverNodes_DPMSolverV3", "DPMSolverNodes_DPMSolverPP2M",
                                     "DPMSolverNodes_DPMSolverPP3M", "DPMSolverNodes_DPMSolverAdaptive"])
def test_node_defaults_equal_the_dropdown_entry(node_id):
    """The dropdown entry runs the library defaults; the node's default widgets must mean the same options."""
    spec = next(s for s in options.SAMPLER_NODES if s.node_id == node_id)
    name, opts = spec.build(**options.widget_defaults(spec))
    defaults = _library_defaults(name)
    assert {k: v for k, v in opts.items() if defaults[k] != v} == {}


def test_option_values_and_bad_choices():
    v3 = next(s for s in options.SAMPLER_NODES if s.node_id == "DPMSolverNodes_DPMSolverV3")
    widgets = options.widget_defaults(v3)
    assert v3.build(**{**widgets, "corrector_region": "noisy half"})[1]["half"] == "noisy"
    assert v3.build(**{**widgets, "corrector_region": "clean half"})[1]["half"] == "clean"
    with pytest.raises(ValueError, match="corrector_region"):
        v3.build(**{**widgets, "corrector_region": "middle"})
    sde = next(s for s in options.SAMPLER_NODES if s.node_id == "DPMSolverNodes_DPMSolverSDE")
    widgets = options.widget_defaults(sde)
    assert sde.build(**{**widgets, "noise_device": "gpu"})[1]["noise_device"] == "latent"
    with pytest.raises(ValueError, match="solver"):
        sde.build(**{**widgets, "solver": "euler"})
    pp2m = next(s for s in options.SAMPLER_NODES if s.node_id == "DPMSolverNodes_DPMSolverPP2M")
    widgets = options.widget_defaults(pp2m)
    assert [pp2m.build(**{**widgets, "lower_order_final": v})[1]["lower_order_final"] for v in ("auto", "on", "off")] \
        == [None, True, False]
    assert "threshold_percentile" not in pp2m.build(**widgets)[1]
    assert pp2m.build(**{**widgets, "thresholding": True})[1]["threshold_percentile"] == 0.995


ODE_NODES = ["DPMSolverNodes_DPMSolver", "DPMSolverNodes_DPMSolverPP2S", "DPMSolverNodes_DPMSolverPP2M",
             "DPMSolverNodes_DPMSolverPP3M", "DPMSolverNodes_DDIM", "DPMSolverNodes_PNDM",
             "DPMSolverNodes_DPMSolverV3", "DPMSolverNodes_DPMSolverAdaptive"]


def _node_error(name, opts, kind, steps):
    mixture = GaussianMixture.random(dim=8, components=5, seed=1)
    denoiser = mixture.denoiser(kind)
    if kind == "eps":
        sigmas = torch.cat([torch.exp(torch.linspace(math.log(20.0), math.log(0.02), steps)), torch.zeros(1)])
    else:
        sigmas = torch.cat([torch.linspace(0.999, 0.02, steps), torch.zeros(1)])
    x = sample_noise(4, (8,), seed=3) * (sigmas[0] if kind == "eps" else 1.0)
    reference = reference_solution(denoiser, x, float(sigmas[0]), 0.0, model_kind=kind)
    result = samplers.SAMPLERS[name](denoiser, x, sigmas.double(), disable=True, model_kind=kind, **opts)
    assert torch.isfinite(result).all()
    return float((result - reference).norm() / reference.norm())


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("node_id", ODE_NODES)
def test_node_defaults_solve_the_ode(node_id, kind):
    """Each ODE node with its default widgets, called as the adapter calls it, converges to the DOP853 solution of
    the exact Gaussian mixture's ODE on both model kinds (measured: 12 -> 24 steps cuts the error 2.5-14x; the
    adaptive solver ignores the step count and stays at its tolerance)."""
    spec = next(s for s in options.SAMPLER_NODES if s.node_id == node_id)
    name, opts = spec.build(**options.widget_defaults(spec))
    coarse, fine = _node_error(name, opts, kind, 12), _node_error(name, opts, kind, 24)
    assert fine < 0.05, f"{node_id} ({kind}): relative error {fine:.3g} at 24 steps"
    if name != "dpm_solver_adaptive":
        assert fine < 0.5 * coarse, f"{node_id} ({kind}): no convergence, {coarse:.3g} -> {fine:.3g}"


# ---- dropdown registration (docs/hosts.md 1.3) ------------------------------------------------------------------

def _fake_comfy_lists():
    ksampler_names = ["euler", "dpmpp_2m"]
    sampler_names = ksampler_names + ["ddim", "uni_pc", "uni_pc_bh2"]  # a copy, as in comfy/samplers.py
    module = types.SimpleNamespace(KSAMPLER_NAMES=ksampler_names, SAMPLER_NAMES=sampler_names)
    module.KSampler = types.SimpleNamespace(SAMPLERS=sampler_names)
    return module, types.SimpleNamespace()


def test_dropdown_registration_in_place_and_idempotent():
    comfy_samplers, k_sampling = _fake_comfy_lists()
    lists = (comfy_samplers.KSAMPLER_NAMES, comfy_samplers.SAMPLER_NAMES)
    comfy_sampling.register_dropdown_samplers(comfy_samplers, k_sampling)
    comfy_sampling.register_dropdown_samplers(comfy_samplers, k_sampling)
    assert (comfy_samplers.KSAMPLER_NAMES, comfy_samplers.SAMPLER_NAMES) == lists  # never rebound
    assert comfy_samplers.KSAMPLER_NAMES is lists[0] and comfy_samplers.SAMPLER_NAMES is lists[1]
    for name in options.DROPDOWN_SAMPLERS:
        assert comfy_samplers.SAMPLER_NAMES.count(name) == 1
        assert comfy_samplers.KSAMPLER_NAMES.count(name) == 1
        assert callable(getattr(k_sampling, "sample_" + name))
    assert name in comfy_samplers.KSampler.SAMPLERS  # the combo list object sees the entries
    assert comfy_samplers.SAMPLER_NAMES[:5] == ["euler", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2"]


@pytest.fixture
def fake_comfy_model_sampling(monkeypatch):
    comfy = types.ModuleType("comfy")
    module = types.ModuleType("comfy.model_sampling")
    for name in ("EPS", "V_PREDICTION", "EDM", "X0", "CONST", "COSMOS_RFLOW"):
        setattr(module, name, getattr(P, name))
    comfy.model_sampling = module
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_sampling", module)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_dropdown_function_reads_model_kind_and_equals_library_call(fake_comfy_model_sampling, kind):
    mixture = GaussianMixture.random(dim=8, components=3, seed=2)
    denoiser = mixture.denoiser(kind)
    ms = _sampling(P.ModelSamplingDiscreteFlow if kind == "flow" else P.ModelSamplingDiscrete,
                   P.CONST if kind == "flow" else P.EPS)

    class Wrapper:  # KSamplerX0Inpaint -> CFGGuider -> BaseModel
        inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))

        def __call__(self, x, sigma, **extra):
            return denoiser(x, sigma)

    comfy_samplers, k_sampling = _fake_comfy_lists()
    comfy_sampling.register_dropdown_samplers(comfy_samplers, k_sampling)
    sigmas = torch.tensor([0.9, 0.5, 0.2, 0.05, 0.0] if kind == "flow" else [14.0, 3.0, 0.8, 0.1, 0.0],
                          dtype=torch.float64)
    x = sample_noise(2, (8,), seed=5)
    ours = k_sampling.sample_dpmsolver_pp_3m(Wrapper(), x, sigmas, extra_args={}, disable=True)
    direct = samplers.sample_dpmpp_3m(denoiser, x, sigmas, disable=True, model_kind=kind)
    assert torch.equal(ours, direct)
    if kind == "flow":  # model_kind matters, so reading it right is tested
        assert not torch.allclose(ours, samplers.sample_dpmpp_3m(denoiser, x, sigmas, disable=True, model_kind="eps"))


# ---- fingerprint ----------------------------------------------------------------------------------------------

class _LatentFormat:
    latent_channels = 4


class _Config:
    pass


class _Base(torch.nn.Module):
    def __init__(self, seed=0, channels=4, width=16):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.diffusion_model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(40)])
        with torch.no_grad():
            for p in self.diffusion_model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        self.latent_format = _LatentFormat()
        self.latent_format.latent_channels = channels
        self.model_config = _Config()
        self.model_sampling = _sampling(P.ModelSamplingDiscrete, P.EPS)


class _Patcher:
    """The parts of comfy.model_patcher.ModelPatcher the fingerprint reads."""

    def __init__(self, base):
        self.model = base
        self.patches = {}
        self.backup = {}
        self.object_patches = {}

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))


def _fp(patcher):
    return fingerprint.model_fingerprint(patcher)


def test_fingerprint_stable_for_equal_models_and_across_processes():
    a, b = _fp(_Patcher(_Base(seed=0))), _fp(_Patcher(_Base(seed=0)))
    assert a == b and len(a) == 32
    code = ("import sys; sys.path.insert(0, 'tests'); import conftest; "
            "from test_comfyui_adapter import _fp, _Patcher, _Base; print(_fp(_Patcher(_Base(seed=0))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(
        __import__("pathlib").Path(__file__).resolve().parents[1]), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == a


def test_fingerprint_changes_with_weights_channels_and_model_sampling():
    reference = _fp(_Patcher(_Base(seed=0)))
    assert _fp(_Patcher(_Base(seed=1))) != reference
    for index in (0, 1, 39):  # every tensor counts (main sampled every 16th tensor's first 4096 values)
        base = _Base(seed=0)
        name = sorted(fingerprint.base_weights(_Patcher(base)))[index]
        with torch.no_grad():
            dict(base.named_parameters())[name].view(-1)[-1] += 1e-2
        assert _fp(_Patcher(base)) != reference, name
    assert _fp(_Patcher(_Base(seed=0, channels=16))) != reference
    assert _fp(_Patcher(_Base(seed=0, width=17))) != reference
    patcher = _Patcher(_Base(seed=0))  # zero-terminal-SNR-like change of the sigma table
    sigmas = torch.linspace(0.03, 14.6, 1000)
    sigmas[-1] = 4096.0
    patcher.object_patches["model_sampling"] = _sampling(P.ModelSamplingDiscrete, P.EPS, sigmas=sigmas)
    assert _fp(patcher) != reference
    patcher.object_patches["model_sampling"] = _sampling(P.ModelSamplingDiscrete, P.V_PREDICTION)
    assert _fp(patcher) != reference  # same sigmas, other parameterization
    shifted = [_Patcher(_Base(seed=0)) for _ in range(2)]
    for p, shift in zip(shifted, (1.0, 3.0)):
        p.object_patches["model_sampling"] = _sampling(P.ModelSamplingDiscreteFlow, P.CONST, shift=shift)
    assert len({_fp(shifted[0]), _fp(shifted[1]), reference}) == 3


def test_fingerprint_sees_in_place_changes_of_the_same_tensors():
    """The digest is cached per tensor identity and torch's in-place version counter: an in-place edit of a weight
    of the very same model object must still change the fingerprint."""
    patcher = _Patcher(_Base(seed=0))
    before = _fp(patcher)
    assert _fp(patcher) == before
    name = sorted(fingerprint.base_weights(patcher))[7]
    with torch.no_grad():
        dict(patcher.model.named_parameters())[name].view(-1)[-1] += 1e-2
    assert _fp(patcher) != before


def _lora(base, key, strength, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = dict(base.named_parameters())[key]
    up, down = torch.randn(weight.shape[0], 2, generator=generator), torch.randn(2, weight.shape[1],
                                                                                  generator=generator)
    adapter = types.SimpleNamespace(weights=(up, down, None, None, None, None))
    return [(strength, adapter, 1.0, None, None)]


def test_fingerprint_changes_with_lora_patches_and_strength():
    key = "diffusion_model.5.weight"
    reference = _fp(_Patcher(_Base(seed=0)))
    fingerprints = set()
    for strength, seed in ((1.0, 0), (0.5, 0), (1.0, 1)):
        patcher = _Patcher(_Base(seed=0))
        patcher.patches[key] = _lora(patcher.model, key, strength, seed)
        fingerprints.add(_fp(patcher))
    assert len(fingerprints) == 3 and reference not in fingerprints


def test_fingerprint_ignores_in_place_patching_and_dtype():
    """ComfyUI patches LoRAs into the weights while a model is loaded and keeps the originals in ``backup``; the
    fingerprint must be the same before and during sampling, and for an fp16 load of the same weights."""
    patcher = _Patcher(_Base(seed=0))
    key = [k for k in sorted(fingerprint.base_weights(patcher)) if k.endswith("weight")][0]
    patcher.patches[key] = _lora(patcher.model, key, 1.0, 0)
    before = _fp(patcher)
    weight = dict(patcher.model.named_parameters())[key]
    patcher.backup[key] = types.SimpleNamespace(weight=weight.detach().clone(), inplace_update=True)
    with torch.no_grad():
        weight += 0.5
    assert _fp(patcher) == before
    half = _Patcher(_Base(seed=0).half())
    assert _fp(half) == _fp(_Patcher(_Base(seed=0)))


# ---- EMS files ----------------------------------------------------------------------------------------------------

def _ems_file(folder, name, fingerprint_value, cfg, reduction="per_channel", shape=(4, 8, 8)):
    from dpm_solver_nodes.stats import EMSKey, EMSSettings, EMSTarget

    key = EMSKey(EMSTarget(fingerprint_value, "eps", cfg, shape, 0.03, 14.6), EMSSettings(N=4, reduction=reduction))
    lambdas = torch.linspace(-2.6, 3.5, 5, dtype=torch.float64)
    stat = (5,) + (shape if reduction == "per_element" else (4, 1, 1))
    ems = EMS(lambdas, torch.full(stat, 0.9), torch.zeros(stat), torch.zeros(stat),
              metadata={"fingerprint": fingerprint_value, "cfg": repr(cfg), "cache_key": key.to_json(),
                        "model_kind": "eps"})
    return ems.save(folder / name)


def test_store_finds_by_fingerprint_nearest_cfg_and_latent_shape(tmp_path):
    from dpm_solver_nodes.stats import EMSStore

    (tmp_path / "sub").mkdir()
    _ems_file(tmp_path, "a.safetensors", "fp1", 7.5)
    _ems_file(tmp_path / "sub", "b.safetensors", "fp1", 4.0)
    _ems_file(tmp_path, "c.safetensors", "fp2", 7.5)
    _ems_file(tmp_path, "d.safetensors", "fp3", 7.5, reduction="per_element")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    store = EMSStore(lambda: [str(tmp_path), str(tmp_path / "missing")])
    assert store.find("fp1", "eps", cfg=7.0)[1].endswith("a.safetensors")
    assert store.find("fp1", "eps", cfg=5.0)[1].endswith("b.safetensors")
    assert store.find("fp2", "eps", cfg=1.0)[1].endswith("c.safetensors")
    assert store.find("fp2", "flow", cfg=1.0) == (None, None)
    assert store.find("fp9", "eps", cfg=7.5) == (None, None)
    assert store.find("fp3", "eps", cfg=7.5, latent_shape=(4, 8, 8))[1].endswith("d.safetensors")
    assert store.find("fp3", "eps", cfg=7.5, latent_shape=(4, 16, 16)) == (None, None)  # per_element: its size only
    _ems_file(tmp_path, "a.safetensors", "fp9", 7.5)  # rewritten file: header re-read
    assert store.find("fp1", "eps", cfg=7.0)[1].endswith("b.safetensors")


def test_save_node_names_are_validated(tmp_path):
    from dpm_solver_nodes.stats import EMSStore, validate_name

    store = EMSStore([str(tmp_path)])
    ems = EMS.degenerate(torch.linspace(-2.6, 3.5, 5), channels=4)
    for bad in ("", ".", "..", " .. ", "x" * 300, ".safetensors"):
        with pytest.raises(ValueError, match="EMS file name"):
            store.save(ems, bad)
    assert validate_name("../../etc/passwd") == "_._.._etc_passwd"
    assert store.save(ems, "sd15 cfg7.5.safetensors").endswith("sd15_cfg7.5.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["sd15_cfg7.5.safetensors"]


def test_dropdown_reuses_the_stored_ems_and_builds_v3s_plan_once(fake_comfy_model_sampling, tmp_path,
                                                                 monkeypatch):
    """Two generations in a row with the dropdown's v3: the EMS file is read once and v3's step plan built once
    (main re-read the file on every generation, so the plan cache never hit)."""
    from dpm_solver_nodes.nodes import ems_store as comfy_store
    from dpm_solver_nodes.samplers import v3 as v3_module
    from dpm_solver_nodes.stats import EMSStore
    from dpm_solver_nodes.stats import store as store_module

    patcher = _Patcher(_Base(seed=0))
    _ems_file(tmp_path, "model.safetensors", _fp(patcher), 5.0)
    monkeypatch.setattr(comfy_store, "_STORE", EMSStore([str(tmp_path)]))
    builds, reads = [], []
    build, read = v3_module._build_plan, store_module.read_ems_file
    monkeypatch.setattr(v3_module, "_build_plan", lambda *a, **k: builds.append(1) or build(*a, **k))
    monkeypatch.setattr(store_module, "read_ems_file", lambda *a, **k: reads.append(1) or read(*a, **k))
    denoiser, Wrapper, sigmas, x = _eps_mixture_through_comfy(patcher)
    outputs = [comfy_sampling.sample_dpm_solver_v3(Wrapper(), x, sigmas, disable=True) for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])
    assert len(reads) == 1 and len(builds) == 1, (reads, builds)
    degenerate = samplers.sample_dpm_solver_v3(denoiser, x, sigmas, disable=True)
    assert not torch.allclose(outputs[0], degenerate)  # the stored EMS (l = 0.9) were used


def _eps_mixture_through_comfy(patcher):
    """An exact eps denoiser (4-d mixture, seed 2) behind ComfyUI's wrapper chain (KSamplerX0Inpaint -> CFGGuider
    (cfg 5, model_patcher) -> BaseModel), with 4 sigmas from 14 and two noises: (denoiser, Wrapper, sigmas, x)."""
    denoiser = GaussianMixture.random(dim=4, components=3, seed=2).denoiser("eps")

    class Wrapper:
        inner_model = types.SimpleNamespace(cfg=5.0, model_patcher=patcher, inner_model=types.SimpleNamespace(
            model_sampling=_sampling(P.ModelSamplingDiscrete, P.EPS)))

        def __call__(self, x, sigma, **extra):
            return denoiser(x.reshape(x.shape[0], -1), sigma).reshape(x.shape)

    sigmas = torch.tensor([14.0, 3.0, 0.8, 0.1, 0.0], dtype=torch.float64)
    return denoiser, Wrapper, sigmas, sample_noise(2, (4, 1, 1), seed=5) * 14.0


class _Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """The parts of ComfyUI the EMS node's job uses: a CFGGuider that runs the sampler function with a Gaussian
    mixture as the guided model, KSAMPLER, ProgressBar, the Interrupt check and ModelSamplingDiscrete."""
    from dpm_solver_nodes.nodes import ems_store as comfy_store
    from dpm_solver_nodes.stats import EMSStore

    mixture = GaussianMixture.random(dim=4, components=3, seed=4)
    denoiser = mixture.denoiser("eps")
    state = {"interrupt_after": None, "calls": 0, "bar": []}

    def model(x, sigma, **_):
        state["calls"] += 1
        return denoiser(x.reshape(x.shape[0], -1).double(), sigma.double()).reshape(x.shape).to(x.dtype)

    class CFGGuider:
        def __init__(self, patcher):
            self.patcher = patcher

        def set_conds(self, positive, negative):
            pass

        def set_cfg(self, cfg):
            pass

        def sample(self, noise, latent, sampler, sigmas, disable_pbar=False, seed=None):
            assert 0 <= seed < 2 ** 64
            return sampler.function(model, noise, sigmas, extra_args={})

    class ModelSamplingDiscrete(P.ModelSamplingDiscrete):
        sigma_min, sigma_max = 0.03, 14.6

        def timestep(self, sigma):
            return sigma

    def check_interrupt():
        if state["interrupt_after"] is not None and state["calls"] >= state["interrupt_after"]:
            raise _Interrupted()

    modules = {
        "comfy.samplers": types.SimpleNamespace(CFGGuider=CFGGuider,
                                                KSAMPLER=lambda fn: types.SimpleNamespace(function=fn)),
        "comfy.utils": types.SimpleNamespace(ProgressBar=lambda total: types.SimpleNamespace(
            update_absolute=lambda value: state["bar"].append(value))),
        "comfy.model_management": types.SimpleNamespace(throw_exception_if_processing_interrupted=check_interrupt),
        "comfy.model_sampling": types.SimpleNamespace(ModelSamplingDiscrete=ModelSamplingDiscrete,
                                                      **{n: getattr(P, n) for n in ("EPS", "V_PREDICTION", "EDM",
                                                                                    "X0", "CONST")}),
    }
    comfy = types.ModuleType("comfy")
    for name, module in modules.items():
        setattr(comfy, name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setattr(comfy_store, "_STORE", EMSStore([str(tmp_path)]))

    class Patcher(_Patcher):
        def clone(self):
            return self

        def add_object_patch(self, name, value):
            self.object_patches[name] = value

    patcher = Patcher(_Base(seed=0))
    patcher.model.model_sampling = type("ModelSampling", (ModelSamplingDiscrete, P.EPS), {})()
    return patcher, state


def test_ems_node_runs_the_one_job_stores_reuses_and_resumes(fake_comfy, tmp_path):
    """ComfyUI's EMS compute path (``comfy_ems.compute_or_load``) on stand-ins for ComfyUI's guider: the file lands
    in the store, a second run reuses it without model calls, and an Interrupt followed by a rerun resumes (the
    result equals an uninterrupted run).  ComfyUI's largest seed, 2**64 - 1, is accepted."""
    from dpm_solver_nodes.nodes import comfy_ems

    patcher, state = fake_comfy
    args = (patcher, None, None, 1.0, 8, 8, 50, 4, "per_channel", 2 ** 64 - 1, 4, 4, "guided", "auto", "ems")
    first = comfy_ems.compute_or_load(*args, False)
    assert first.source == "computed" and first.save_error is None and first.path.startswith(str(tmp_path))
    assert first.ems.metadata["fingerprint"] == fingerprint.model_fingerprint(patcher)
    assert state["bar"] and state["bar"][-1] <= 1000
    calls = state["calls"]
    again = comfy_ems.compute_or_load(*args, False)
    assert again.source == "cached" and state["calls"] == calls
    state["interrupt_after"] = calls + 16  # Interrupt pressed during the recomputation's estimate
    with pytest.raises(_Interrupted):
        comfy_ems.compute_or_load(*args, True)
    state["interrupt_after"] = None
    before = state["calls"]
    resumed = comfy_ems.compute_or_load(*args, True)
    assert torch.equal(resumed.ems.l, first.ems.l) and torch.equal(resumed.ems.b, first.ems.b)
    # resumed, not restarted: only the estimator's 10-call timestep check runs again
    assert state["calls"] - before <= calls - 16 + 10, (state["calls"] - before, calls)


# ---- scheduler entry (nodes/comfy_schedulers.py) -------------------------------------------------------------------

def _fake_comfy_schedulers():
    """comfy/samplers.py's scheduler registry (v0.3.64): a dict of SchedulerHandler and the names list that
    KSampler.SCHEDULERS is."""
    from typing import Callable, NamedTuple

    class SchedulerHandler(NamedTuple):
        handler: Callable
        use_ms: bool = True

    handlers = {"simple": SchedulerHandler(lambda ms, steps: None), "karras": SchedulerHandler(None, use_ms=False)}
    names = list(handlers)
    module = types.SimpleNamespace(SCHEDULER_HANDLERS=handlers, SCHEDULER_NAMES=names,
                                   SchedulerHandler=SchedulerHandler)
    module.KSampler = types.SimpleNamespace(SCHEDULERS=names)

    def calculate_sigmas(model_sampling, scheduler_name, steps):  # comfy.samplers.calculate_sigmas
        handler = handlers[scheduler_name]
        if handler.use_ms:
            return handler.handler(model_sampling, steps)
        return handler.handler(n=steps, sigma_min=float(model_sampling.sigma_min),
                               sigma_max=float(model_sampling.sigma_max))

    module.calculate_sigmas = calculate_sigmas
    return module


def _ranged_sampling(kind_name, sigma_min, sigma_max):
    ms = _sampling(P.ModelSamplingDiscrete, getattr(P, kind_name))
    ms.sigma_min, ms.sigma_max = torch.tensor(sigma_min), torch.tensor(sigma_max)
    return ms


def test_scheduler_registration_in_place_and_idempotent():
    from dpm_solver_nodes.nodes import comfy_schedulers

    module = _fake_comfy_schedulers()
    handlers, names = module.SCHEDULER_HANDLERS, module.SCHEDULER_NAMES
    assert comfy_schedulers.register_scheduler(module) == ["dpm_solver_recommended"]
    comfy_schedulers.register_scheduler(module)
    assert module.SCHEDULER_HANDLERS is handlers and module.SCHEDULER_NAMES is names
    assert names == ["simple", "karras", "dpm_solver_recommended"] and module.KSampler.SCHEDULERS is names
    assert list(handlers) == names and handlers["dpm_solver_recommended"].use_ms


@pytest.mark.parametrize("kind_name,kind,lo,hi", [("EPS", "eps", 0.0292, 14.6), ("V_PREDICTION", "eps", 0.03, 20.0),
                                                  ("CONST", "flow", 0.0029, 1.0)])
def test_scheduler_gives_recommended_sigmas_for_the_model(fake_comfy_model_sampling, kind_name, kind, lo, hi):
    from dpm_solver_nodes.nodes import comfy_schedulers

    module = _fake_comfy_schedulers()
    comfy_schedulers.register_scheduler(module)
    ms = _ranged_sampling(kind_name, lo, hi)
    sigmas = module.calculate_sigmas(ms, "dpm_solver_recommended", 12)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 13 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, samplers.recommended_sigmas(12, lo, hi, kind).float())


def test_scheduler_refuses_unsupported_models_and_old_hosts(fake_comfy_model_sampling, caplog):
    from dpm_solver_nodes.nodes import comfy_schedulers

    ms = _sampling(P.ModelSamplingDiscrete, P.COSMOS_RFLOW)
    with pytest.raises(ValueError, match="COSMOS_RFLOW|cannot sample"):
        comfy_schedulers.recommended_for_model(ms, 10)
    old = types.SimpleNamespace(SCHEDULER_NAMES=["normal", "karras"])  # before SCHEDULER_HANDLERS existed
    with caplog.at_level("WARNING"):
        assert comfy_schedulers.register_scheduler(old) == []
    assert old.SCHEDULER_NAMES == ["normal", "karras"] and "SCHEDULER_HANDLERS" in caplog.text


def test_sigmas_node_options(fake_comfy_model_sampling):
    from dpm_solver_nodes.nodes import comfy_schedulers

    ms = _ranged_sampling("CONST", 0.0029, 1.0)
    full = comfy_schedulers.sigmas_for_node(ms, 10)
    torch.testing.assert_close(full, samplers.recommended_sigmas(10, 0.0029, 1.0, "flow").float())
    # img2img: the tail of a steps / denoise schedule, as BasicScheduler
    half = comfy_schedulers.sigmas_for_node(ms, 10, denoise=0.5)
    torch.testing.assert_close(half, samplers.recommended_sigmas(20, 0.0029, 1.0, "flow").float()[-11:])
    assert len(comfy_schedulers.sigmas_for_node(ms, 10, denoise=0.0)) == 0
    custom = comfy_schedulers.sigmas_for_node(_ranged_sampling("EPS", 0.0292, 14.6), 8, sigma_min=0.1, sigma_max=5.0)
    assert custom[0].item() == pytest.approx(5.0) and custom[-2].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="denoise"):
        comfy_schedulers.sigmas_for_node(ms, 10, denoise=1.5)


# ---- what the user sees (issue 14): which solver v3 runs, the EMS node's text, its batch size -------------------------

def test_v3_says_when_it_runs_without_ems_or_falls_back(fake_comfy_model_sampling, tmp_path, monkeypatch, caplog):
    """The sampling node shows which solver v3 ran, and a run without EMS or one sent to DPM-Solver++ by the EMS's
    decision is a WARNING (ComfyUI's console shows it at its default level), once per EMS and step count."""
    import logging

    from dpm_solver_nodes.nodes import comfy_ems
    from dpm_solver_nodes.nodes import ems_store as comfy_store
    from dpm_solver_nodes.stats import EMSStore

    shown = []
    monkeypatch.setattr(comfy_ems, "show_text", lambda text, node_id=None: shown.append(text))
    monkeypatch.setattr(comfy_store, "_STORE", EMSStore([str(tmp_path)]))
    monkeypatch.setattr(comfy_sampling, "_logged_once", set())
    denoiser, Wrapper, sigmas, x = _eps_mixture_through_comfy(_Patcher(_Base(seed=0)))
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        comfy_sampling.sample_dpm_solver_v3(Wrapper(), x, sigmas, disable=True)
    assert shown[-1].startswith("DPM-Solver-v3 without EMS")
    assert any("DPM-Solver-v3 without EMS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    ems = EMS.degenerate(torch.linspace(-2.6, 3.5, 11), channels=4).replace(
        decisions=[(4, "dpmpp_2m", 1.0), (8, "v3", 0.7)])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        out = [comfy_sampling.sample_dpm_solver_v3(Wrapper(), x, sigmas, disable=True, ems=ems) for _ in range(2)]
    assert torch.equal(out[0], samplers.sample_dpmpp_2m(Wrapper(), x, sigmas, disable=True))
    warnings = [r.getMessage() for r in caplog.records if "ran DPM-Solver++(2M) at 4 steps" in r.getMessage()]
    assert len(warnings) == 1 and "v3 at 8 steps" in warnings[0]  # once, with the EMS's whole summary
    assert shown[-1].startswith("DPM-Solver-v3 ran DPM-Solver++(2M) at 4 steps")
    # on the spacing the decisions were measured on (uniform in log sigma): the stored ratio, no warning
    eight = torch.cat([torch.linspace(math.log(14.0), math.log(0.1), 8, dtype=torch.float64).exp(),
                       torch.zeros(1, dtype=torch.float64)])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        comfy_sampling.sample_dpm_solver_v3(Wrapper(), sample_noise(2, (4, 1, 1), seed=5) * 14.0, eight,
                                            disable=True, ems=ems)
    assert not caplog.records
    assert shown[-1] == "DPM-Solver-v3 with EMS at 8 steps (measured at 8 steps: 0.70x the error of the best other solver measured)"
    # on another schedule the node says that the ratio was not measured there, and warns once
    other = torch.tensor([14.0, 8.0, 5.0, 3.0, 1.5, 0.8, 0.3, 0.1, 0.0], dtype=torch.float64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        for _ in range(2):
            comfy_sampling.sample_dpm_solver_v3(Wrapper(), sample_noise(2, (4, 1, 1), seed=5) * 14.0, other,
                                                disable=True, ems=ems)
    assert shown[-1].startswith("DPM-Solver-v3 with EMS at 8 steps (measured at 8 steps: 0.70x")
    assert "measured on steps uniform in log sigma; this schedule is 14% of its span away" in shown[-1]
    assert [r.levelno for r in caplog.records if "measured on steps" in r.getMessage()] == [logging.WARNING]


def test_ems_node_outcome_text_names_the_file_the_cost_and_the_decisions():
    from dpm_solver_nodes.nodes import comfy_ems
    from dpm_solver_nodes.stats.job import JobResult

    ems = EMS.degenerate(torch.linspace(-2.6, 3.5, 11), channels=4).replace(
        metadata={"tuning": '{"fit":"window_0.5","samples_per_set":3}'},
        decisions=[(5, "dpmpp_2m", 1.0), (6, "v3", 0.69), (8, "v3", 0.61)])
    computed = JobResult(ems, "/models/dpm_solver_v3_ems/sd15_cfg7.5_ab12.safetensors", "computed", 75.2,
                         phases={"x0": {"rows": 160, "seconds": 5.0}, "estimate": {"rows": 2434, "seconds": 40.1},
                                 "tune": {"rows": 1482, "seconds": 30.0}})
    assert comfy_ems.outcome_text(computed) == (
        "DPM-Solver-v3 with these EMS: v3 at 6, 8 steps (0.61-0.69x the error of the best other solver measured); DPM-Solver++(2M) "
        "at 5 steps; other step counts follow the nearest.\n"
        "EMS computed in 1 min 15 s (4,076 model rows: samples 5 s, statistics 40 s, tuning 30 s); saved as "
        "sd15_cfg7.5_ab12.safetensors. Tuned on 3 + 3 fresh samples: fit window_0.5.")
    plain = EMS.degenerate(torch.linspace(-2.6, 3.5, 11), channels=4)
    cached = JobResult(plain, "/x/a.safetensors", "cached", 0.01, save_error="disk full")
    text = comfy_ems.outcome_text(cached)
    assert text.startswith("DPM-Solver-v3 with these EMS: v3 at every step count")
    assert "\nEMS loaded from a.safetensors (computed earlier with these settings).\n" in text
    assert text.endswith("Saving failed: disk full")


def test_auto_batch_size_fits_comfyuis_memory_estimate(monkeypatch):
    """batch_size 0: the largest power of two up to 64 whose rows fit ComfyUI's own estimate (x1.5, and x3 for
    forward AD's tangents); 1 where ComfyUI cannot say."""
    from dpm_solver_nodes.nodes import comfy_ems

    free = {"bytes": 10 ** 12}
    management = types.SimpleNamespace(load_models_gpu=lambda models: None,
                                       get_free_memory=lambda device: free["bytes"])
    comfy = types.ModuleType("comfy")
    comfy.model_management = management
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    model = types.SimpleNamespace(load_device="cpu", model=types.SimpleNamespace(
        memory_required=lambda shape: shape[0] * 100 * 2 ** 20))  # 100 MiB per row
    assert comfy_ems.auto_batch_size(model, (4, 64, 64), 7.5, "one_sided_difference") == 64
    free["bytes"] = 6 * 2 ** 30  # 6 GiB: 2 rows x 100 MiB x 1.5 per sample -> 16 samples; forward AD: x3 -> 4
    assert comfy_ems.auto_batch_size(model, (4, 64, 64), 7.5, "one_sided_difference") == 16
    assert comfy_ems.auto_batch_size(model, (4, 64, 64), 7.5, "auto") == 4
    assert comfy_ems.auto_batch_size(model, (4, 64, 64), 1.0, "auto") == 8  # no CFG: one row per sample
    free["bytes"] = 2 ** 20
    assert comfy_ems.auto_batch_size(model, (4, 64, 64), 7.5, "auto") == 1
    broken = types.SimpleNamespace(load_device="cpu", model=types.SimpleNamespace())
    assert comfy_ems.auto_batch_size(broken, (4, 64, 64), 7.5, "auto") == 1


def test_network_dtype_is_the_compute_dtype():
    from dpm_solver_nodes.nodes import comfy_ems

    def patcher(weights, cast):
        return types.SimpleNamespace(model=types.SimpleNamespace(manual_cast_dtype=cast, get_dtype=lambda: weights))

    assert comfy_ems.network_dtype(patcher(torch.float32, None)) == torch.float32
    assert comfy_ems.network_dtype(patcher(torch.float8_e4m3fn, torch.float16)) == torch.float16
    assert comfy_ems.network_dtype(types.SimpleNamespace()) is None
