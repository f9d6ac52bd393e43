"""Benchmarks: the runner (``run``: ``python -m dpm_solver_nodes bench``, whose embedded part runs the demo), the
v3 study (``v3_study``) and the step schedules (``sigmas``).  The solver registry they share with the demo is the
top-level ``peers`` module, so the demo never imports this package's runner."""
