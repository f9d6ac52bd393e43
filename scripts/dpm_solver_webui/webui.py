"""Wiring into the running WebUI: sampler registration, settings, EMS store, callbacks.

``setup()`` is called by ``scripts/dpm_solver_nodes_webui.py`` each time the WebUI executes the scripts (start-up
and "Reload UI"; the WebUI clears script callbacks before that, so they are added again here).
"""
from __future__ import annotations

import logging

from . import registration, schedulers, settings
from .ems_store import EMSStore

logger = logging.getLogger("dpm_solver_nodes")


def ems_folder():
    from modules import paths_internal, shared

    return settings.ems_folder(shared.opts, paths_internal.models_path)


STORE = EMSStore(ems_folder)


def on_ui_settings():
    import gradio
    from modules import shared

    settings.add_settings(shared, gradio)


def on_model_loaded(sd_model):
    STORE.invalidate()
    registration.forget_warnings()     # warn again about the new checkpoint's EMS


def on_ui_tabs():
    from . import ems_tab

    return [(ems_tab.build(STORE), "DPM-Solver-v3", "dpm_solver_v3_ems")]


def setup():
    """Register the samplers and callbacks; returns the registered labels."""
    from modules import script_callbacks

    registration.DEFAULT_HOST.find_ems = STORE.find_for_sampler
    labels = registration.setup()
    schedulers.register()
    script_callbacks.on_ui_settings(on_ui_settings, name="dpm_solver_nodes settings")
    script_callbacks.on_model_loaded(on_model_loaded, name="dpm_solver_nodes EMS refresh")
    script_callbacks.on_ui_tabs(on_ui_tabs, name="dpm_solver_nodes EMS tab")
    script_callbacks.on_infotext_pasted(registration.upgrade_pasted_infotext, name="dpm_solver_nodes old labels")
    logger.info("dpm-solver-nodes: registered samplers %s", ", ".join(labels))
    return labels
