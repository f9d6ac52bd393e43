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

from dataclasses import dataclass, field

INJECTED_BY_NAME = ("eta", "n", "sigma_min", "sigma_max", "sigma_sched", "sigmas", "noise_sampler", "solver_type",
                    "s_churn", "s_tmin", "s_tmax", "s_noise")
BASE_PARAMETERS = ("model", "x", "sigmas", "extra_args", "callback", "disable")
ALIAS_PREFIX = "dpm_solver_nodes_"


@dataclass(frozen=True)
class Entry:
    """One sampler-list entry.

    label: the name shown in the WebUI (and written as "Sampler:" in the infotext).
    sampler: the key in ``dpm_solver_nodes.samplers.SAMPLERS``.
    options: the WebUI's SamplerData options: "scheduler" (the schedule used for "Automatic"), "brownian_noise"
      (pass a seeded ``noise_sampler``), "second_order" (two model calls per step, for the progress bar).
    fixed: keyword options always passed to the sampler.
    accepts: the injected parameters (besides ``sigmas``) the sampler takes from the WebUI.
    uses_ems: DPM-Solver-v3: look up the checkpoint's EMS before sampling.
    description: one line for the README / settings help.
    """

    label: str
    sampler: str
    options: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    accepts: tuple = ()
    uses_ems: bool = False
    description: str = ""

    @property
    def alias(self) -> str:
        return ALIAS_PREFIX + self.label.lower().replace("+", "p").replace(" ", "_").replace("-", "_") \
            .replace("(", "").replace(")", "")

    @property
    def stochastic(self) -> bool:
        return bool(self.options.get("brownian_noise"))


SDE = ("noise_sampler", "eta", "s_noise")

ENTRIES = (
    Entry("DPM++ 2M (dpm-solver-nodes)", "dpmpp_2m", {"scheduler": "karras"},
          description="DPM-Solver++(2M), multistep second order; equals the built-in DPM++ 2M, also on flow models"),
    Entry("DPM++ 2S (dpm-solver-nodes)", "dpmpp_2s", {"scheduler": "karras", "second_order": True},
          description="DPM-Solver++(2S), singlestep second order, two model calls per step, no noise"),
    Entry("DPM++ 3M", "dpmpp_3m", {"scheduler": "karras"},
          description="DPM-Solver++(3M), multistep third-order ODE solver (no built-in equivalent)"),
    Entry("DPM-Solver", "dpm_solver", {"scheduler": "karras"}, {"order": 2, "method": "multistep"},
          description="DPM-Solver (noise prediction), multistep second order"),
    Entry("DPM-Solver 3S", "dpm_solver", {"scheduler": "karras"}, {"order": 3, "method": "singlestep"},
          description="DPM-Solver-3 singlestep: three model calls per step (3 x steps NFE)"),
    Entry("DPM-Solver adaptive", "dpm_solver_adaptive", {}, {"order": 3},
          description="DPM-Solver-23 with adaptive step size: uses only the sigma range, ignores the step count"),
    Entry("DPM-Solver++ 2M SDE", "dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True},
          {"solver_type": "midpoint"}, SDE, description="SDE-DPM-Solver++(2M), midpoint form"),
    Entry("DPM-Solver++ 2M SDE Heun", "dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True},
          {"solver_type": "heun"}, SDE, description="SDE-DPM-Solver++(2M), exact Taylor (\"heun\") weight"),
    Entry("DPM-Solver++ 3M SDE", "dpmpp_3m_sde", {"scheduler": "exponential", "brownian_noise": True}, {}, SDE,
          description="SDE-DPM-Solver++(3M): third-order drift with the full Taylor D'' term"),
    Entry("DPM-Solver++ 1 SDE", "dpmpp_sde_1", {"scheduler": "exponential", "brownian_noise": True}, {}, SDE,
          description="SDE-DPM-Solver++1: first-order data-prediction SDE (stochastic DDIM)"),
    Entry("DPM-Solver 2M SDE", "dpm_solver_sde_2m", {"scheduler": "exponential", "brownian_noise": True},
          {"solver_type": "midpoint"}, SDE, description="SDE-DPM-Solver-2M: noise-prediction SDE, multistep"),
    Entry("DPM-Solver 1 SDE", "dpm_solver_sde_1", {"scheduler": "exponential", "brownian_noise": True}, {}, SDE,
          description="SDE-DPM-Solver-1: first-order noise-prediction SDE (DDPM-like)"),
    Entry("DPM-Solver-v3", "dpm_solver_v3", {"scheduler": "karras"}, {}, (), True,
          description="DPM-Solver-v3 with the checkpoint's EMS (computed in the DPM-Solver-v3 tab); without them "
                      "DPM-Solver++ with the v3 corrector"),
)

ENTRIES_BY_LABEL = {entry.label: entry for entry in ENTRIES}
