"""The extension's WebUI settings (Settings -> DPM-Solver): keys, defaults, choices and infotext names.

Host-free table; ``add_settings`` turns it into ``shared.OptionInfo`` entries inside ``on_ui_settings``.  Settings
that change a DPM-Solver-v3 result carry an ``infotext`` name: the WebUI writes nothing by itself for them, so the
sampler records them in the generation parameters, and pasting such a PNG's parameters offers them back as
override settings (``OptionInfo(..., infotext=...)``), so the image reproduces.

Values are read with ``get(opts, key)``, which falls back to the default when the settings page was never built
(API-only mode) or the stored value is not one of the allowed choices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...stats.settings import REDUCTIONS, EMSSettings

SECTION = ("dpm_solver_nodes", "DPM-Solver")
EMS_FOLDER_NAME = "dpm_solver_v3_ems"
CORRECTOR_CHOICES = ("Automatic", "On", "Off", "Noisy half", "Clean half")
REDUCTION_CHOICES = ("per_channel",) + tuple(r for r in REDUCTIONS if r != "per_channel")  # the default first
_EMS_DEFAULTS = EMSSettings()


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    choices: tuple = ()           # radio choices
    minimum: float = None         # slider range (numbers)
    maximum: float = None
    step: float = None
    infotext: str = None


SETTINGS = (
    Setting("dpm_solver_v3_order", 2, "DPM-Solver-v3: predictor order (2 for guided latent models, 3 unconditional)",
            minimum=1, maximum=3, step=1, infotext="DPM-Solver-v3 order"),
    Setting("dpm_solver_v3_corrector", "Automatic",
            "DPM-Solver-v3: corrector (Automatic = on below CFG 5, off from CFG 5 up, as the official SD script)",
            choices=CORRECTOR_CHOICES, infotext="DPM-Solver-v3 corrector"),
    Setting("dpm_solver_v3_use_ems", True, "DPM-Solver-v3: use the checkpoint's EMS when they have been computed "
            "(otherwise DPM-Solver++ with the v3 corrector)", infotext="DPM-Solver-v3 use EMS"),
    Setting("dpm_solver_ems_dir", "", "EMS folder (empty: models/dpm_solver_v3_ems)"),
    Setting("dpm_solver_ems_grid", _EMS_DEFAULTS.N, "EMS: lambda grid size N (nodes - 1)", minimum=10, maximum=500,
            step=10),
    Setting("dpm_solver_ems_samples", _EMS_DEFAULTS.K, "EMS: number of data samples K", minimum=8, maximum=1024,
            step=8),
    Setting("dpm_solver_ems_reduction", _EMS_DEFAULTS.reduction, "EMS: statistics shape (per_channel works at any "
            "resolution; per_element only at the resolution it was computed for)", choices=REDUCTION_CHOICES),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}


def get(opts, key):
    """The current value of setting ``key``, or its default when unset or invalid."""
    setting = SETTINGS_BY_KEY[key]
    value = getattr(opts, key, None) if opts is not None else None
    if value is None:
        return setting.default
    if setting.choices and value not in setting.choices:
        return setting.default
    if isinstance(setting.default, bool):
        return bool(value)
    if isinstance(setting.default, int):
        try:
            value = int(value)
        except (TypeError, ValueError):
            return setting.default
        if setting.key == "dpm_solver_v3_order":
            return min(max(value, 1), 3)
        return value if value >= 1 else setting.default
    return value


def ems_folder(opts, models_path):
    """The EMS cache folder: the setting if given, else ``<models>/dpm_solver_v3_ems``."""
    folder = get(opts, "dpm_solver_ems_dir")
    return os.path.abspath(folder) if folder else os.path.join(models_path, EMS_FOLDER_NAME)


def add_settings(shared, gradio=None):
    """Register every setting with ``shared.opts.add_option`` (call from ``on_ui_settings``)."""
    for setting in SETTINGS:
        component, component_args = None, None
        if gradio is not None and setting.choices:
            component, component_args = gradio.Radio, {"choices": list(setting.choices)}
        elif gradio is not None and setting.minimum is not None:
            component = gradio.Slider
            component_args = {"minimum": setting.minimum, "maximum": setting.maximum, "step": setting.step}
        info = shared.OptionInfo(setting.default, setting.label, component, component_args, section=SECTION,
                                 infotext=setting.infotext)
        shared.opts.add_option(setting.key, info)
