"""The step schedules live in ``samplers/sigmas.py``; this module re-exports them for the demo and the benchmark and
gives the eps ``time_uniform`` schedule the embedded model's SD v1 timesteps when no discrete schedule is passed."""
from __future__ import annotations

from ..samplers.sigmas import (SCHEDULES, exponential, karras, recommended_sigmas, shifted,  # noqa: F401
                               with_zero)
from ..samplers.sigmas import make_sigmas as _make_sigmas


def make_sigmas(schedule, n, model_kind="eps", sigma_min=None, sigma_max=None, discrete=None):
    """``samplers.sigmas.make_sigmas``, with the SD v1 discrete schedule as the default for eps time_uniform."""
    if schedule == "time_uniform" and model_kind == "eps" and discrete is None:
        from ..embedded.model import DiscreteVPSchedule

        discrete = DiscreteVPSchedule()
    return _make_sigmas(schedule, n, model_kind, sigma_min, sigma_max, discrete)
