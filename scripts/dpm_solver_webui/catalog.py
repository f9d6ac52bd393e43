"""The samplers this extension adds to the WebUI's sampler list: label, host-free sampler, fixed options.

Host-free (no ``modules`` import) so tests can check it anywhere.  Each ``Entry`` says which parameters the WebUI
may pass to the sampler function (``accepts``); the registration module builds a function whose visible signature
lists exactly those, because the WebUI decides what to inject by parameter name (docs/hosts.md 3.3).

Parameters the WebUI injects by name and what we do with them:
  sigmas         every entry: the step sigmas (keyword, that exact name).
  noise_sampler  stochastic entries: the WebUI's seeded Brownian-tree noise, requested with the ``brownian_noise``
                 option; A1111 seeds ``randn_like`` only inside its own k-diffusion, so SDE noise must come from here.
  eta, s_noise   stochastic entries whose sampler has them: the settings "Eta for ancestral samplers" and "sigma
                 noise", as for the built-in "DPM++ 2M SDE" (the WebUI records non-default values in the infotext).
  n, sigma_min, sigma_max, sigma_sched, solver_type
                 never: they would be filled with step counts and model sigma ranges (A1111 passes n=steps,
                 sigma_min/sigma_max from the model).  ``solver_type`` is fixed per entry below instead of the
                 ``solver_type`` option, which reForge's ldm-patched back-end does not pass on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

INJECTED_BY_NAME = ("eta", "n", "sigma_min", "sigma_max", "sigma_sched", "sigmas", "noise_sampler", "solver_type",
                    "s_churn", "s_tmin", "s_tmax", "s_noise")
BASE_PARAMETERS = ("model", "x", "sigmas", "extra_args", "callback", "disable")
# Naming: "<method> (dpm-solver-nodes)".  The method is written as the WebUI writes its built-ins ("DPM++" is
# DPM-Solver++, data prediction; "DPM-Solver" is the noise-prediction DPM-Solver; then order and S/M for singlestep /
# multistep), so "DPM++ 2M SDE (dpm-solver-nodes)" sits next to the built-in "DPM++ 2M SDE" as the same method from
# this extension.  The alias is "dpm_solver_nodes_" plus the method in lower case.
MARKER_SUFFIX = " (dpm-solver-nodes)"
ALIAS_PREFIX = "dpm_solver_nodes_"


def method_slug(method: str) -> str:
    """"DPM++ 2M SDE Heun" -> "dpmpp_2m_sde_heun", "DPM-Solver-v3" -> "dpm_solver_v3"."""
    return re.sub(r"[^a-z0-9]+", "_", method.lower().replace("++", "pp")).strip("_")


@dataclass(frozen=True)
class Entry:
    """One sampler-list entry.

    method: the method's name without the marker, e.g. "DPM++ 2M SDE Heun" (see the naming note above).
    sampler: the key in ``dpm_solver_nodes.samplers.SAMPLERS``.
    options: the WebUI's SamplerData options: "scheduler" (the schedule used for "Automatic"), "brownian_noise"
      (pass a seeded ``noise_sampler``), "second_order" (two model calls per step, for the progress bar).
    fixed: keyword options always passed to the sampler.
    accepts: the injected parameters (besides ``sigmas``) the sampler takes from the WebUI.
    uses_ems: DPM-Solver-v3: look up the checkpoint's EMS before sampling.
    description: one line for the README / settings help.
    legacy_labels: labels this entry had in earlier versions (0.1.0), still resolved for old infotexts and
      X/Y/Z grids where no other sampler has that name.
    """

    method: str
    sampler: str
    options: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    accepts: tuple = ()
    uses_ems: bool = False
    description: str = ""
    legacy_labels: tuple = ()

    @property
    def label(self) -> str:
        """The name shown in the WebUI and written as "Sampler:" in the infotext."""
        return self.method + MARKER_SUFFIX

    @property
    def alias(self) -> str:
        return ALIAS_PREFIX + method_slug(self.method)

    @property
    def stochastic(self) -> bool:
        return bool(self.options.get("brownian_noise"))


SDE = ("noise_sampler", "eta", "s_noise")
SDE_OPTIONS = {"scheduler": "exponential", "brownian_noise": True}

ENTRIES = (
    Entry("DPM++ 2M", "dpmpp_2m", {"scheduler": "karras"},
          description="DPM-Solver++(2M), multistep second order; equals the built-in DPM++ 2M, also on flow models"),
    Entry("DPM++ 2S", "dpmpp_2s", {"scheduler": "karras", "second_order": True},
          description="DPM-Solver++(2S), singlestep second order, two model calls per step, no noise"),
    Entry("DPM++ 3M", "dpmpp_3m", {"scheduler": "karras"},
          description="DPM-Solver++(3M), multistep third-order ODE solver (no built-in equivalent)",
          legacy_labels=("DPM++ 3M",)),
    Entry("DPM-Solver 2M", "dpm_solver", {"scheduler": "karras"}, {"order": 2, "method": "multistep"},
          description="DPM-Solver (noise prediction), multistep second order", legacy_labels=("DPM-Solver",)),
    Entry("DPM-Solver 3S", "dpm_solver", {"scheduler": "karras"}, {"order": 3, "method": "singlestep"},
          description="DPM-Solver-3 singlestep: three model calls per step (3 x steps NFE)",
          legacy_labels=("DPM-Solver 3S",)),
    Entry("DPM-Solver adaptive", "dpm_solver_adaptive", {"scheduler": "karras"}, {"order": 3},
          description="DPM-Solver-23 with adaptive step size: the error tolerance sets the number of model calls "
                      "(recorded in the infotext); Steps and Schedule type only set the sigma range",
          legacy_labels=("DPM-Solver adaptive",)),
    Entry("DPM++ 2M SDE", "dpmpp_2m_sde", dict(SDE_OPTIONS), {"solver_type": "midpoint"}, SDE,
          description="SDE-DPM-Solver++(2M), midpoint form", legacy_labels=("DPM-Solver++ 2M SDE",)),
    Entry("DPM++ 2M SDE Heun", "dpmpp_2m_sde", dict(SDE_OPTIONS), {"solver_type": "heun"}, SDE,
          description="SDE-DPM-Solver++(2M), exact Taylor (\"heun\") weight",
          legacy_labels=("DPM-Solver++ 2M SDE Heun",)),
    Entry("DPM++ 3M SDE", "dpmpp_3m_sde", dict(SDE_OPTIONS), {}, SDE,
          description="SDE-DPM-Solver++(3M): third-order drift with the full Taylor D'' term",
          legacy_labels=("DPM-Solver++ 3M SDE",)),
    Entry("DPM++ 1 SDE", "dpmpp_sde_1", dict(SDE_OPTIONS), {}, SDE,
          description="SDE-DPM-Solver++1: first-order data-prediction SDE (stochastic DDIM)",
          legacy_labels=("DPM-Solver++ 1 SDE",)),
    Entry("DPM-Solver 2M SDE", "dpm_solver_sde_2m", dict(SDE_OPTIONS), {"solver_type": "midpoint"}, SDE,
          description="SDE-DPM-Solver-2M: noise-prediction SDE, multistep", legacy_labels=("DPM-Solver 2M SDE",)),
    Entry("DPM-Solver 1 SDE", "dpm_solver_sde_1", dict(SDE_OPTIONS), {}, SDE,
          description="SDE-DPM-Solver-1: first-order noise-prediction SDE (DDPM-like)",
          legacy_labels=("DPM-Solver 1 SDE",)),
    Entry("DPM-Solver-v3", "dpm_solver_v3", {"scheduler": "karras"}, {}, (), True,
          description="DPM-Solver-v3 with the checkpoint's EMS (computed in the DPM-Solver-v3 tab); without them "
                      "DPM-Solver++ with the v3 corrector", legacy_labels=("DPM-Solver-v3",)),
)

ENTRIES_BY_LABEL = {entry.label: entry for entry in ENTRIES}
LEGACY_LABELS = {legacy: entry.label for entry in ENTRIES for legacy in entry.legacy_labels if legacy != entry.label}


def current_label(name, taken=()):
    """The label an infotext's "Sampler:" value ``name`` stands for: our current label for one of our 0.1.0 labels
    (unless another sampler now has that name: ``taken``), else ``name`` itself."""
    if name in LEGACY_LABELS and name not in taken:
        return LEGACY_LABELS[name]
    return name
