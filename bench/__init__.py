"""Benchmarks and the solver registry shared with the demo (``peers``), the step schedules (``sigmas``) and the
benchmark runner (``run``: ``python -m dpm_solver_nodes bench``)."""
