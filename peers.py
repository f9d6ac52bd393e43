"""Every solver the demo and the benchmark run, behind one interface, ours and the peers': the top floor's solver
registry.  ``demo`` and ``bench`` both import it and ``bench.run`` runs the demo, never the other way round; the
tests take their k-diffusion loader and diffusers schedulers from here.  Nothing below the top floor imports it.

``solvers(families)`` returns ``Solver`` objects; ``solver.run(model, noise, sigmas, extra_args, nfe, model_kind)``
starts from ``noise * sigmas[0]`` (eps) or ``noise`` (flow, sigmas[0] = 1) and returns ``(x0, model calls, note)``.
``sigmas`` is a function ``steps -> sigma list`` (n positive sigmas and a trailing 0), so each solver gets the largest
step count whose model calls fit the NFE budget (found by a dry run on a tiny stand-in model); adaptive solvers
choose their own steps and report the calls they made.

Peers (both optional, skipped with a log line when not installed):
- PyPI k-diffusion 0.1.1.post1 ``sampling.py`` (``load_kdiffusion``: loaded without its package ``__init__``, which
  imports torchvision, clip, ...; install with ``pip install --no-deps k-diffusion==0.1.1.post1``).  Its samplers are
  not flow-aware and run on eps models only.  ``dpm_fast`` / ``dpm_adaptive`` stop at sigma_min; one extra model
  call denoises their result (counted in the NFE), as the trailing 0 of the other schedules does.
- diffusers 0.42.1 schedulers (SD v1 betas, ``prediction_type="epsilon"``) on the *same* sigmas: after
  ``set_timesteps(n)`` their ``sigmas`` are replaced by ours (float32, as diffusers computes) and the step index
  starts at 0; the model sees x_ve = x_vp sqrt(1 + sigma^2) and its eps is (x_ve - D) / sigma.  eps models only.
  DEIS cannot step to sigma = 0; it stops at sigma_min and one extra (counted) call denoises.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import types
from dataclasses import dataclass, field

import torch

log = logging.getLogger("dpm_solver_nodes.peers")

FAMILIES = ("ours", "k-diffusion", "diffusers")


class Unavailable(Exception):
    """The solver cannot run here (not implemented yet, peer not installed, model kind unsupported)."""


def load_kdiffusion():
    """PyPI k-diffusion's ``k_diffusion.sampling`` module, or raise ``Unavailable``."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("PyPI k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
    except ImportError as error:
        raise Unavailable(f"k-diffusion's sampling.py does not import: {error}") from error
    sys.modules["k_diffusion"].sampling = sampling
    return sampling


class CallCounter:
    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.model(x, sigma, **kwargs)


def _dry_model(x, sigma, **_):
    return x * 0.5


@dataclass
class Solver:
    """One solver: ``name`` (e.g. "dpmpp_2m", "kdiff:dpmpp_2m", "diffusers:dpmsolver++2"), ``family``,
    ``stochastic`` (SDE / ancestral: converges to a different sample than the ODE reference), ``adaptive``."""

    name: str
    family: str
    function: object
    options: dict = field(default_factory=dict)
    stochastic: bool = False
    adaptive: bool = False
    eps_only: bool = False

    def check(self, model_kind):
        if self.eps_only and model_kind != "eps":
            raise Unavailable(f"{self.name} is not flow-aware (eps models only)")

    # ---- step count for an NFE budget ------------------------------------------------------------------------
    def steps_for(self, nfe, sigmas_for, model_kind):
        """(steps, calls) with the most steps whose model calls fit ``nfe``; adaptive solvers: (None, None)."""
        if self.adaptive:
            return None, None
        for steps in range(nfe, 0, -1):
            x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
            counter = CallCounter(_dry_model)
            self._call(counter, x, sigmas_for(steps), {"seed": 0}, model_kind, steps)
            if counter.calls <= nfe:
                return steps, counter.calls
        raise Unavailable(f"{self.name} needs more than {nfe} model calls even at 1 step")

    def run(self, model, noise, sigmas_for, extra_args, nfe, model_kind, steps=None):
        """Sample from ``noise``; returns (x0, model calls, note).  ``steps``: from ``steps_for`` (found here when
        None; pass it to keep the dry run out of a timing)."""
        self.check(model_kind)
        if steps is None:
            steps, _ = self.steps_for(nfe, sigmas_for, model_kind)
        counter = CallCounter(model)
        sigmas = sigmas_for(steps if steps else nfe)
        x = noise if model_kind == "flow" else noise * sigmas[0].item()
        out = self._call(counter, x.to(noise.dtype), sigmas, extra_args, model_kind, steps or nfe)
        note = f"{steps} steps" if steps else "adaptive"
        return out, counter.calls, note

    def _call(self, model, x, sigmas, extra_args, model_kind, steps):
        return self.function(model, x, sigmas, extra_args, model_kind, steps, **self.options)


# ----------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------

STOCHASTIC_OURS = ("sde", "ddpm", "ancestral")


def ours(ems_for=None):
    """The pack's samplers (``samplers.SAMPLERS``); ``ems_for(model_kind, extra_args)`` supplies v3's EMS (or None)."""
    from .samplers import SAMPLERS

    result = []
    for name, fn in SAMPLERS.items():
        def call(model, x, sigmas, extra_args, model_kind, steps, _fn=fn, _name=name, **options):
            kwargs = dict(options)
            if _name == "dpm_solver_v3" and ems_for is not None:
                ems = ems_for(model_kind, extra_args)
                if ems is not None:
                    kwargs["ems"] = ems
            try:
                return _fn(model, x, sigmas.to(x.dtype), extra_args=extra_args, disable=True,
                           model_kind=model_kind, **kwargs)
            except NotImplementedError as error:
                raise Unavailable(f"not implemented yet ({error})") from error

        result.append(Solver(name, "ours", call, stochastic=any(s in name for s in STOCHASTIC_OURS),
                             adaptive="adaptive" in name))
        if name == "dpm_solver":
            result.append(Solver("dpm_solver(fast)", "ours", _dpm_solver_fast))
        if name == "dpm_solver_v3" and ems_for is not None:
            # the same solver without the model's statistics (l = 1, s = b = 0): what the EMS buy
            result.append(Solver("dpm_solver_v3(ems=None)", "ours",
                                 lambda model, x, sigmas, extra_args, model_kind, steps, _fn=fn: _fn(
                                     model, x, sigmas.to(x.dtype), extra_args=extra_args, disable=True,
                                     model_kind=model_kind)))
    return result


def _dpm_solver_fast(model, x, sigmas, extra_args, model_kind, steps):
    """DPM-Solver-fast (the paper's Sec. 3.4 order mix, ``samplers.dpm_solver.fast_schedule``) with ``steps - 1``
    calls on uniform-lambda sigmas to sigma_min, then one call denoising there: k-diffusion's ``sample_dpm_fast``
    as the demo runs it."""
    from .samplers.dpm_solver import fast_schedule, sample_dpm_solver

    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min().item(), positive.max().item()
    if model_kind == "flow" and sigma_max >= 1:
        raise Unavailable("fast_schedule needs a finite-lambda start; flow schedules start at sigma = 1")
    if steps > 1:
        fast_sigmas, orders = fast_schedule(sigma_min, sigma_max, steps - 1, model_kind=model_kind)
        x = sample_dpm_solver(model, x, fast_sigmas.to(x.dtype), extra_args=extra_args, disable=True,
                              model_kind=model_kind, method="singlestep", orders=orders)
    return model(x, x.new_full([len(x)], sigma_min), **(extra_args or {}))


# ----------------------------------------------------------------------------------------------------------------
# k-diffusion
# ----------------------------------------------------------------------------------------------------------------

def _kdiff_brownian(k, x, sigmas, extra_args):
    seed = extra_args.get("seed", 0) if extra_args else 0
    positive = sigmas[sigmas > 0]
    return k.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[seed + i for i in range(len(x))])


def _kdiff_args(extra_args):
    return {key: value for key, value in (extra_args or {}).items() if key != "seed"}


def kdiffusion():
    k = load_kdiffusion()

    def grid(name, **fixed):
        def call(model, x, sigmas, extra_args, model_kind, steps):
            sig = sigmas.to(x.dtype)
            kwargs = dict(fixed)
            if "sde" in name:
                kwargs["noise_sampler"] = _kdiff_brownian(k, x, sig, extra_args)
            return getattr(k, f"sample_{name}")(model, x, sig, extra_args=_kdiff_args(extra_args), disable=True,
                                                **kwargs)
        return call

    def fast(model, x, sigmas, extra_args, model_kind, steps):
        positive = sigmas[sigmas > 0]
        sigma_min, sigma_max = positive.min().item(), positive.max().item()
        args = _kdiff_args(extra_args)
        if steps > 1:
            x = k.sample_dpm_fast(model, x, sigma_min, sigma_max, steps - 1, extra_args=args, disable=True)
        return model(x, x.new_full([len(x)], sigma_min), **args)

    def adaptive(model, x, sigmas, extra_args, model_kind, steps, rtol=0.05, atol=0.0078):
        positive = sigmas[sigmas > 0]
        sigma_min, sigma_max = positive.min().item(), positive.max().item()
        args = _kdiff_args(extra_args)
        x = k.sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=args, disable=True, rtol=rtol,
                                  atol=atol)
        return model(x, x.new_full([len(x)], sigma_min), **args)

    return [
        Solver("kdiff:euler", "k-diffusion", grid("euler"), eps_only=True),
        Solver("kdiff:heun", "k-diffusion", grid("heun"), eps_only=True),
        Solver("kdiff:dpmpp_2s_ancestral(eta=0)", "k-diffusion", grid("dpmpp_2s_ancestral", eta=0.0), eps_only=True),
        Solver("kdiff:dpmpp_2m", "k-diffusion", grid("dpmpp_2m"), eps_only=True),
        Solver("kdiff:dpmpp_2m_sde", "k-diffusion", grid("dpmpp_2m_sde"), stochastic=True, eps_only=True),
        Solver("kdiff:dpmpp_3m_sde", "k-diffusion", grid("dpmpp_3m_sde"), stochastic=True, eps_only=True),
        Solver("kdiff:dpm_fast", "k-diffusion", fast, eps_only=True),
        Solver("kdiff:dpm_adaptive", "k-diffusion", adaptive, adaptive=True, eps_only=True),
    ]


# ----------------------------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------------------------

SD_V1_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon")


def diffusers_run(scheduler, model, x, sigmas, extra_args, ends_at_zero=True):
    """Run a diffusers multistep scheduler on our sigmas (VE, trailing 0) from the VE latent x = noise * sigmas[0].

    ``ends_at_zero=False`` (schedulers without ``final_sigmas_type="zero"``, e.g. DEIS, whose noise-prediction
    update is undefined at sigma = 0): the scheduler steps to the last positive sigma (sigma_min) and one extra model
    call denoises there, so the model calls still equal the positive sigmas.
    """
    positive = sigmas[sigmas > 0]
    n = len(positive) if ends_at_zero else len(positive) - 1
    args = _kdiff_args(extra_args)
    work = x.dtype
    sample = (x / math.sqrt(1 + positive[0].item() ** 2)).to(torch.float32)
    if n > 0:
        scheduler.set_timesteps(n)
        if len(scheduler.sigmas) != n + 1:
            raise Unavailable(f"{type(scheduler).__name__} made {len(scheduler.sigmas)} sigmas for {n} steps")
        end = positive.new_zeros(1) if ends_at_zero else positive[-1:]
        scheduler.sigmas = torch.cat([positive[:n], end]).to(torch.float32)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        for i in range(n):
            sigma = positive[i].item()
            x_ve = sample.to(work) * math.sqrt(1 + sigma ** 2)
            denoised = model(x_ve, x_ve.new_full([len(x_ve)], sigma), **args)
            eps = ((x_ve - denoised) / sigma).to(torch.float32)
            sample = scheduler.step(eps, timesteps[i], sample).prev_sample
    if ends_at_zero:
        return sample.to(work)
    sigma_min = positive[-1].item()
    x_ve = sample.to(work) * math.sqrt(1 + sigma_min ** 2)
    return model(x_ve, x_ve.new_full([len(x_ve)], sigma_min), **args)


def diffusers_solvers():
    try:
        import diffusers
    except ImportError as error:
        raise Unavailable(f"diffusers is not installed ({error})") from error

    def make(cls_name, ends_at_zero=True, **config):
        cls = getattr(diffusers, cls_name)

        def call(model, x, sigmas, extra_args, model_kind, steps):
            return diffusers_run(cls(**SD_V1_CONFIG, **config), model, x, sigmas, extra_args, ends_at_zero)
        return call

    return [
        Solver("diffusers:dpmsolver++2M", "diffusers", make("DPMSolverMultistepScheduler", solver_order=2),
               eps_only=True),
        Solver("diffusers:dpmsolver++3M", "diffusers", make("DPMSolverMultistepScheduler", solver_order=3),
               eps_only=True),
        Solver("diffusers:unipc_bh2", "diffusers", make("UniPCMultistepScheduler", solver_type="bh2"),
               eps_only=True),
        Solver("diffusers:deis2", "diffusers", make("DEISMultistepScheduler", ends_at_zero=False, solver_order=2), eps_only=True),
    ]


def solvers(families=FAMILIES, ems_for=None):
    """All solvers of the named families that can be loaded here (peers missing: logged and left out)."""
    result = []
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown solver family {family!r}; choose from {FAMILIES}")
        try:
            if family == "ours":
                result += ours(ems_for)
            elif family == "k-diffusion":
                result += kdiffusion()
            else:
                result += diffusers_solvers()
        except Unavailable as error:
            log.warning("skipping %s: %s", family, error)
    return result

