"""Register the catalog's samplers with the AUTOMATIC1111 / Forge / reForge WebUI and run them.

How the WebUI calls a k-diffusion style sampler (docs/hosts.md 3.3): ``KDiffusionSampler(func, sd_model)`` calls
``func(model_wrap_cfg, x, extra_args=..., disable=False, callback=..., **injected)`` where ``injected`` is chosen
by the parameter names of ``func`` (``sigmas``, ``n``, ``sigma_min``/``sigma_max``, ``eta``, ...) and by the
sampler's options (``brownian_noise`` -> ``noise_sampler``, ``solver_type: "heun"`` -> ``solver_type``).  So the
function registered here shows exactly the parameters its catalog entry accepts (``__signature__``), rejects any
other injected keyword with a TypeError naming it, and fills in ``model_kind`` (from the loaded model), the entry's
fixed options and, for DPM-Solver-v3, the settings and the checkpoint's EMS.

Registration (``register``) is idempotent: "Reload UI" re-executes the scripts but not ``modules.sd_samplers``, so
an entry already registered by us is replaced in place and every label appears once.  Forge has
``sd_samplers.add_sampler``; A1111 and reForge need ``all_samplers`` + ``all_samplers_map`` + ``set_samplers()``.
Every label ends in " (dpm-solver-nodes)" (``catalog``); a label another extension already registered is left to it
(logged).  Labels of 0.1.0 stay resolvable: as aliases (X/Y/Z grid) and, through ``upgrade_pasted_infotext``, when an
old infotext is pasted, wherever no other sampler has that name.
"""
from __future__ import annotations

import inspect
import logging

from . import catalog, settings

logger = logging.getLogger("dpm_solver_nodes")

MARKER = "dpm_solver_nodes"          # key in SamplerData.options marking our entries
ADAPTIVE_INFOTEXT = "DPM-Solver adaptive"  # infotext field: the model calls the adaptive solver made
V3_RAN_INFOTEXT = "DPM-Solver-v3 ran"      # infotext field: what DPM-Solver-v3 ran (v3, or the solver the EMS chose)
INJECTED_DEFAULTS = {"noise_sampler": None, "eta": 1.0, "s_noise": 1.0}


class UnsupportedModelError(ValueError):
    """The loaded model's parameterization cannot be sampled by these solvers."""


# ---- the model ---------------------------------------------------------------------------------------------------

def denoiser_wrap(model):
    """The WebUI's k-diffusion denoiser behind the CFG denoiser ``model`` (``CompVis(V)Denoiser``, ``SD3Denoiser`` or
    Forge's ``ForgeScheduleLinker``), or None."""
    return getattr(model, "inner_model", None)


def detect_model_kind(model) -> str:
    """"eps" or "flow" for the model the WebUI passes to a sampler; UnsupportedModelError otherwise.

    Forge: the predictor's ``prediction_type``: "const" is flow, "epsilon", "v_prediction" and "edm" are sampled in
    k-diffusion sigma ("eps").  A1111 / reForge: ``is_sd3`` is flow (rectified flow), ``parameterization`` "eps" or
    "v" (SD1.x, SD2.x, SDXL, and their v-prediction versions) is "eps".
    """
    wrap = denoiser_wrap(model)
    predictor = getattr(wrap, "predictor", None)
    if predictor is not None:
        prediction_type = getattr(predictor, "prediction_type", None)
        if prediction_type == "const":
            return "flow"
        if prediction_type in ("epsilon", "eps", "v_prediction", "edm"):
            return "eps"
        raise UnsupportedModelError(
            f"dpm-solver-nodes cannot sample this model: its predictor {type(predictor).__name__} has "
            f"prediction_type {prediction_type!r} (supported: epsilon, v_prediction, edm, const)")
    sd_model = getattr(wrap, "inner_model", None)
    if sd_model is None:
        raise UnsupportedModelError(
            "dpm-solver-nodes cannot tell the loaded model's parameterization: the sampler's model has no "
            "inner denoiser (is a checkpoint loaded?)")
    if getattr(sd_model, "is_sd3", False):
        return "flow"
    parameterization = getattr(sd_model, "parameterization", None)
    if parameterization in ("eps", "v"):
        return "eps"
    raise UnsupportedModelError(
        f"dpm-solver-nodes cannot sample this model: parameterization {parameterization!r} of "
        f"{type(sd_model).__name__} (supported: eps and v-prediction SD1.x/SD2.x/SDXL, SD3 flow; flow models in Forge)")


def model_sigmas(model):
    """The model's discrete sigma table (ascending), or None."""
    sigmas = getattr(denoiser_wrap(model), "sigmas", None)
    return sigmas if sigmas is not None and getattr(sigmas, "ndim", 0) == 1 and len(sigmas) > 1 else None


def half_sigma(model, model_kind):
    """The corrector's "half" boundary: sigma at the middle of the model's timestep range (SD: t = 0.5, index 499,
    sigma 1.612886), 0.5 for flow models."""
    if model_kind == "flow":
        return 0.5
    table = model_sigmas(model)
    if table is None:
        return None
    return float(table[(len(table) - 1) // 2])


def checkpoint_of(model):
    """The loaded WebUI model object behind the sampler's ``model`` (``shared.sd_model``), or None."""
    return getattr(denoiser_wrap(model), "inner_model", None)


# ---- options -----------------------------------------------------------------------------------------------------

def corrector_options(choice, cfg_scale):
    """(use_corrector, half) for the corrector setting.  "Automatic": on below CFG 5, off from 5 up (the official
    SD script's ``use_corrector = scale < 5``; docs/dpm_solver_v3.md 4.3)."""
    if choice == "On":
        return True, None
    if choice == "Off":
        return False, None
    if choice == "Noisy half":
        return True, "noisy"
    if choice == "Clean half":
        return True, "clean"
    return (cfg_scale is None or cfg_scale < 5), None


class Host:
    """What a sampler run needs from the WebUI, so tests can substitute it.

    opts: ``shared.opts`` (or any object with the settings as attributes).
    find_ems: ``find_ems(model, x, model_kind, cfg_scale) -> (EMS or None, description)``.
    """

    def __init__(self, opts=None, find_ems=None):
        self._opts = opts
        self.find_ems = find_ems or (lambda model, x, model_kind, cfg_scale: (None, "none"))

    @property
    def opts(self):
        if self._opts is not None:
            return self._opts
        from modules import shared  # the WebUI's; only reached inside the WebUI

        return shared.opts


DEFAULT_HOST = Host()   # the WebUI's; the entry script points its find_ems at the EMS store


def v3_options(model, x, model_kind, p, host, steps=None, sigmas=None):
    """DPM-Solver-v3 keyword options from the settings and the EMS, and the infotext fields that reproduce them and
    say what ran (``v3_outcome``; ``steps``: the run's step count, ``sigmas``: its schedule).  Corrector
    "Automatic" follows the EMS's per-NFE decision where the EMS carry one, else the official rule (on below CFG 5)."""
    opts = host.opts
    order = settings.get(opts, "dpm_solver_v3_order")
    corrector = settings.get(opts, "dpm_solver_v3_corrector")
    use_ems = settings.get(opts, "dpm_solver_v3_use_ems")
    cfg_scale = getattr(p, "cfg_scale", None)
    use_corrector, half = corrector_options(corrector, cfg_scale)
    ems, description = host.find_ems(model, x, model_kind, cfg_scale) if use_ems else (None, "off")
    if corrector == "Automatic" and ems is not None and steps is not None and ems.decision_for(steps) is not None:
        use_corrector = None      # the sampler applies the decision's corrector
    options = {"ems": ems, "order": order, "use_corrector": use_corrector, "half": half}
    boundary = half_sigma(model, model_kind)
    if half is not None and boundary is not None:
        options["half_sigma"] = boundary
    infotext = {"DPM-Solver-v3 order": order, "DPM-Solver-v3 corrector": corrector,
                "DPM-Solver-v3 use EMS": use_ems, "DPM-Solver-v3 EMS": description}
    if steps is not None:
        ran, warning = v3_outcome(ems, steps, options, description, sigmas, model_kind)
        infotext[V3_RAN_INFOTEXT] = ran
        if warning:
            warn_once(warning)
    return options, infotext


def v3_outcome(ems, steps, options, description="none", sigmas=None, model_kind=None):
    """(what DPM-Solver-v3 runs for ``steps`` model calls with ``options``, a warning or None).

    The sampler's own rule (``samplers.v3.sample_dpm_solver_v3`` with ``fallback=True``), read from the EMS's public
    per-NFE decisions (``EMSData.decision_for``): with EMS, the decision at the checked NFE nearest ``steps`` picks
    v3, DPM-Solver++(2M)/(3M) or UniPC; without EMS, v3 is DPM-Solver++ with the v3 corrector, or the paper's
    DPM-Solver++(2M)/(3M) when the corrector is off.  The warning says why a run is not v3 with EMS, or that
    ``sigmas`` are not the spacing the decision was measured on (``ems_data.spacing_note``): that is logged at
    WARNING, the level the WebUI shows by default."""
    order, use_corrector = options["order"], options["use_corrector"]
    if ems is None:
        why = ("EMS are off in Settings -> DPM-Solver" if description == "off" else
               "no EMS for this checkpoint at this CFG (compute them in the DPM-Solver-v3 tab)")
        if use_corrector is False and order >= 2:
            solver = "DPM-Solver++(3M)" if order == 3 else "DPM-Solver++(2M)"
            return (f"{solver} (no EMS and corrector off)",
                    f"DPM-Solver-v3: {why}; without EMS and corrector it runs {solver}")
        return ("DPM-Solver++ with the v3 corrector (no EMS)",
                f"DPM-Solver-v3: {why}; running DPM-Solver++ with the v3 corrector")
    from ...samplers.ems_data import spacing_note

    decision = ems.decision_for(steps)
    if decision is None:
        return "v3 with EMS (no per-NFE check stored)", None
    note = spacing_note(sigmas, model_kind) if sigmas is not None and model_kind else None
    if decision.solver == "v3":
        corrector = decision.corrector if use_corrector is None else use_corrector
        ran = (f"v3 with EMS, corrector {'on' if corrector else 'off'} (checked at {decision.nfe} NFE: error "
               f"ratio {decision.ratio:.2f}{'; not on this schedule' if note else ''})")
        return ran, (f"DPM-Solver-v3 at {steps} steps: {note}" if note else None)
    solver = SOLVER_NAMES[decision.solver]
    return (f"{solver} (the EMS check chose it over v3 at {decision.nfe} NFE; stored error ratio "
            f"{decision.ratio:.2f}{'; not on this schedule' if note else ''})",
            f"DPM-Solver-v3: the EMS check chose {solver} over v3 at {decision.nfe} NFE (stored error ratio "
            f"{decision.ratio:.2f}); this {steps}-step run uses {solver}" + (f"; {note}" if note else ""))


SOLVER_NAMES = {"v3": "DPM-Solver-v3", "dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_3m": "DPM-Solver++(3M)", "unipc": "UniPC"}
_WARNED = set()


def warn_once(message):
    """``logger.warning(message)`` the first time it is seen since start-up or the last checkpoint change
    (``forget_warnings``): every generation would repeat it."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def forget_warnings():
    _WARNED.clear()


def rng_noise_sampler(p, x):
    """SDE noise from the WebUI's per-image seeded generator, used when the WebUI passes no ``noise_sampler``
    (setting "no_dpmpp_sde_batch_determinism"): the same source its built-in samplers then use."""
    rng = getattr(p, "rng", None)
    if rng is None or not hasattr(rng, "next"):
        return None
    return lambda sigma, sigma_next: rng.next().to(x.device, x.dtype)


def drop_repeated_final_zeros(sigmas):
    """``sigmas`` without the extra zeros of a schedule ending ``[..., 0, 0]``.

    Forge's schedules that sample its predictor's timesteps ("Automatic" without a scheduler, "Uniform", "Simple")
    map timestep 0 of a flow predictor to sigma 0 and then append another 0.  A step from sigma 0 to 0 does nothing,
    so it is dropped (logged) rather than refused.  (Sigmas are decreasing; anything else is refused downstream.)"""
    positive = int((sigmas > 0).sum())
    if positive == 0 or len(sigmas) - positive <= 1:
        return sigmas
    logger.info("dpm-solver-nodes: the schedule ends with %d zero sigmas; sampling to the first of them",
                len(sigmas) - positive)
    return sigmas[:positive + 1]


def run_entry(entry, model, x, sigmas, extra_args, callback, disable, injected, host):
    """Run ``entry``'s sampler for the WebUI."""
    from ...samplers import SAMPLERS

    sigmas = drop_repeated_final_zeros(sigmas)
    kind = detect_model_kind(model)
    kwargs = dict(entry.fixed, model_kind=kind)
    p = getattr(model, "p", None)
    infotext = {}
    if entry.stochastic:
        noise_sampler = injected.get("noise_sampler") or rng_noise_sampler(p, x)
        if noise_sampler is not None:
            kwargs["noise_sampler"] = noise_sampler
        elif p is not None and getattr(p, "all_seeds", None):
            iteration, batch = getattr(p, "iteration", 0), x.shape[0]
            kwargs["seed"] = [int(s) for s in p.all_seeds[iteration * batch:(iteration + 1) * batch]]
        for name in ("eta", "s_noise"):
            if name in injected:
                kwargs[name] = float(injected[name])
    if entry.uses_ems:
        options, infotext = v3_options(model, x, kind, p, host, steps=len(sigmas) - 1, sigmas=sigmas)
        kwargs.update(options)
    if p is not None and infotext and hasattr(p, "extra_generation_params"):
        p.extra_generation_params.update(infotext)
    sampler = SAMPLERS[entry.sampler]
    if entry.sampler != "dpm_solver_adaptive":
        return sampler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kwargs)
    # The error tolerance, not Steps, sets the number of model calls (Steps and the schedule only set the sigma
    # range): the infotext records the calls made.
    x, info = sampler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, return_info=True,
                      **kwargs)
    if p is not None and hasattr(p, "extra_generation_params"):
        p.extra_generation_params[ADAPTIVE_INFOTEXT] = (f"{info['nfe']} model calls (set by the error tolerance; "
                                                        "Steps and Schedule type only set the sigma range)")
    return x


def build_sampler_function(entry, host=None):
    """The function registered for ``entry``: its signature shows ``model, x, sigmas, extra_args, callback,
    disable`` plus ``entry.accepts`` and nothing else, so the WebUI injects only those."""
    host = host or DEFAULT_HOST
    accepts = tuple(entry.accepts)
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("model", positional), inspect.Parameter("x", positional),
                  inspect.Parameter("sigmas", positional, default=None),
                  inspect.Parameter("extra_args", positional, default=None),
                  inspect.Parameter("callback", positional, default=None),
                  inspect.Parameter("disable", positional, default=None)]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=INJECTED_DEFAULTS[name])
                   for name in accepts]

    def sample(model, x, sigmas=None, extra_args=None, callback=None, disable=None, **injected):
        unexpected = sorted(set(injected) - set(accepts))
        if unexpected:
            raise TypeError(f"{entry.label}: unexpected parameters {unexpected} from the WebUI "
                            f"(this sampler takes {list(accepts) or 'none'} besides sigmas)")
        if sigmas is None:
            raise ValueError(f"{entry.label}: the WebUI passed no sigmas")
        return run_entry(entry, model, x, sigmas, extra_args, callback, disable, injected, host)

    sample.__signature__ = inspect.Signature(parameters)
    sample.__name__ = sample.__qualname__ = f"sample_{entry.sampler}_webui"
    sample.__doc__ = f"{entry.label}: {entry.description}"
    sample.entry = entry
    return sample


# ---- registration ------------------------------------------------------------------------------------------------

def is_ours(data) -> bool:
    options = getattr(data, "options", None) or {}
    return bool(options.get(MARKER))


def names_of_others(sd_samplers):
    """Lower-cased names and aliases of the samplers that are not ours."""
    names = set()
    for data in sd_samplers.all_samplers:
        if not is_ours(data):
            names.update(name.lower() for name in [data.name, *(getattr(data, "aliases", None) or [])])
    return names


def sampler_data(entry, function, sd_samplers_common, sd_samplers_kdiffusion, taken=()):
    """The WebUI's SamplerData for ``entry``: aliases are the clean alias and the 0.1.0 labels not in ``taken``."""
    options = dict(entry.options)
    options[MARKER] = entry.label
    kdiffusion = sd_samplers_kdiffusion

    def constructor(sd_model, function=function):
        return kdiffusion.KDiffusionSampler(function, sd_model)

    aliases = [entry.alias] + [name for name in entry.legacy_labels if name.lower() not in taken]
    return sd_samplers_common.SamplerData(entry.label, constructor, aliases, options)


def register(entries, functions, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion):
    """Add (or, after Reload UI, replace) one sampler per entry; returns the labels registered.

    ``functions[entry.label]`` is the function built by ``build_sampler_function``.
    """
    registered = []
    taken = names_of_others(sd_samplers)
    for entry in entries:
        function = functions[entry.label]
        label = entry.label
        existing = sd_samplers.all_samplers_map.get(label)
        if existing is not None and not is_ours(existing):
            logger.warning("dpm-solver-nodes: another extension registered the sampler name %r; ours not added", label)
            continue
        data = sampler_data(entry, function, sd_samplers_common, sd_samplers_kdiffusion, taken)
        if "s_noise" in entry.accepts:
            sd_samplers_kdiffusion.sampler_extra_params[function] = ["s_noise"]
        if existing is not None:
            _replace(sd_samplers, data)
        elif hasattr(sd_samplers, "add_sampler"):           # Forge
            sd_samplers.add_sampler(data)
        else:                                               # A1111, reForge
            sd_samplers.all_samplers.append(data)
            sd_samplers.all_samplers_map = {s.name: s for s in sd_samplers.all_samplers}
        registered.append(label)
    sd_samplers.all_samplers_map = {s.name: s for s in sd_samplers.all_samplers}
    sd_samplers.set_samplers()
    cached = getattr(sd_samplers, "get_sampler_and_scheduler", None)
    if hasattr(cached, "cache_clear"):                      # functools.cache'd in A1111 >= 1.9
        cached.cache_clear()
    return registered


def upgrade_pasted_infotext(infotext, params, sd_samplers=None):
    """``script_callbacks.on_infotext_pasted`` hook: "Sampler:" / "Hires sampler:" naming one of our 0.1.0 labels
    becomes today's label, unless another sampler has that name now."""
    fields = [field for field in ("Sampler", "Hires sampler") if params.get(field) in catalog.LEGACY_LABELS]
    if not fields:
        return
    if sd_samplers is None:
        from modules import sd_samplers
    for field in fields:
        params[field] = catalog.current_label(params[field], taken=sd_samplers.all_samplers_map)


def _replace(sd_samplers, data):
    for index, current in enumerate(sd_samplers.all_samplers):
        if current.name == data.name:
            sd_samplers.all_samplers[index] = data


def setup(host=None, modules=None):
    """Register every catalog entry with the running WebUI; returns the labels.  ``modules`` = (sd_samplers,
    sd_samplers_common, sd_samplers_kdiffusion) for tests, the WebUI's own otherwise."""
    if modules is None:
        from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

        modules = (sd_samplers, sd_samplers_common, sd_samplers_kdiffusion)
    functions = _functions(host)
    return register(catalog.ENTRIES, functions, *modules)


_FUNCTIONS = {}


def _functions(host):
    """One function object per label for the life of the process when the default host is used (stable across
    Reload UI, so the WebUI's ``sampler_extra_params`` keeps one key per sampler); fresh ones for a given host."""
    if host is not None:
        return {entry.label: build_sampler_function(entry, host) for entry in catalog.ENTRIES}
    if not _FUNCTIONS:
        _FUNCTIONS.update({entry.label: build_sampler_function(entry, DEFAULT_HOST) for entry in catalog.ENTRIES})
    return _FUNCTIONS
