"""The AUTOMATIC1111 / Forge / reForge WebUI adapter of dpm_solver_nodes (loaded by
``scripts/dpm_solver_nodes_webui.py``).

This folder is not a WebUI script folder entry (the WebUI only executes the ``.py`` files directly inside
``scripts/``); it is imported as ``dpm_solver_nodes.scripts.dpm_solver_webui``.

  catalog       the sampler-list entries (labels, options, which injected parameters each takes); host-free
  settings      the Settings -> DPM-Solver options; host-free
  registration  model-kind detection, the sampler functions the WebUI calls, registration with the host
  ems_store     per-checkpoint DPM-Solver-v3 EMS over ``stats.EMSStore``: identity, lookup, refresh on checkpoint change
  ems_tab       the "DPM-Solver-v3" tab that runs ``stats.EMSJob`` for the loaded checkpoint
"""
