"""The data DPM-Solver-v3 samples with: EMS arrays l, s, b on a lambda grid and, optionally, a decision per NFE.

This is the samplers layer's own type (``stats.EMS`` subclasses it with metadata, files and standard errors), so
the sampler never imports ``stats`` and never parses text: everything here is validated when it is built.

Conventions (DPM-Solver-v3, Zheng et al. 2023, Eq. 5 and 11): ``lambdas`` (N + 1,) float64, strictly increasing,
index 0 the noisiest node, lambda = -log sigma~ in VE coordinates (sigma~ = sigma for ``model_kind="eps"``,
sigma / (1 - sigma) for ``"flow"``); ``l``, ``s``, ``b`` of shape (N + 1, *stat_shape) with stat_shape (C, H, W)
("per_element"), (C, 1, 1) ("per_channel") or (1, 1, 1) ("scalar").
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .schedule import check_model_kind

logger = logging.getLogger("dpm_solver_nodes")

STAT_NAMES = ("l", "s", "b")
DECISION_SOLVERS = ("v3", "dpmpp_2m", "dpmpp_3m", "unipc")
# Bounds on statistics.  |l|, |s| of real EMS are O(1) (the sampler clamps beyond 10; an ill-conditioned per-node
# fit has given s ~ -800); b carries the data scale (b = E f' - s E f, Eq. 11).  Beyond these a file is corrupt, not
# unusual: b = 1e30 would put 1e35 into the samples.
STAT_BOUNDS = {"l": 1e4, "s": 1e4, "b": 1e6}


def reduction_of(stat_shape) -> str:
    """The reduction a stat shape (C, H, W) stands for."""
    stat_shape = tuple(stat_shape)
    if stat_shape == (1, 1, 1):
        return "scalar"
    if len(stat_shape) == 3 and stat_shape[1:] == (1, 1):
        return "per_channel"
    return "per_element"


@dataclasses.dataclass(frozen=True)
class NFEDecision:
    """What the EMS check measured at ``nfe`` model calls: the ``solver`` to run there ("v3", "dpmpp_2m",
    "dpmpp_3m" or "unipc": UniPC bh2, ``samplers.unipc``), ``ratio`` = that choice's error / the compared solver's error on the model's own reference
    trajectories (the EMS job's tuning: the better of the model's two pack solvers, ``stats.tuning.pack_candidates``:
    DPM-Solver++(2M) and UniPC, or 2M and (3M) on unguided flow models, on samples the choice was not made on; the
    plain check: DPM-Solver++(2M)), and for v3 whether the ``corrector`` runs and the predictor ``order``
    (2 or 3: the tuning measures order 3 for its chosen fit)."""

    nfe: int
    solver: str
    ratio: float
    corrector: bool = True
    order: int = 2

    def __post_init__(self):
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or not 1 <= self.nfe <= 10_000:
            raise ValueError(f"decision nfe must be an integer in 1..10000, got {self.nfe!r}")
        if self.solver not in DECISION_SOLVERS:
            raise ValueError(f"decision solver must be one of {DECISION_SOLVERS}, got {self.solver!r}")
        if (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio)
                or self.ratio < 0):
            raise ValueError(f"decision ratio must be a finite number >= 0, got {self.ratio!r}")
        if not isinstance(self.corrector, bool):
            raise ValueError(f"decision corrector must be true or false, got {self.corrector!r}")
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"decision order must be 1, 2 or 3, got {self.order!r}")


def validate_decisions(decisions) -> tuple:
    """A tuple of ``NFEDecision`` sorted by NFE, one per NFE; items may be decisions or (nfe, solver, ratio)."""
    if decisions is None:
        return ()
    if isinstance(decisions, (str, bytes)) or not isinstance(decisions, (list, tuple)):
        raise ValueError(f"decisions must be a list of (nfe, solver, ratio), got {type(decisions).__name__}")
    out = []
    for item in decisions:
        if isinstance(item, NFEDecision):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) in (3, 4, 5):
            out.append(NFEDecision(*item))
        else:
            raise ValueError(f"each decision must be (nfe, solver, ratio[, corrector[, order]]), got {item!r}")
    nfes = [d.nfe for d in out]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"decisions list an NFE twice: {sorted(nfes)}")
    return tuple(sorted(out, key=lambda d: d.nfe))


SOLVER_NAMES = {"v3": "v3", "dpmpp_2m": "DPM-Solver++(2M)", "dpmpp_3m": "DPM-Solver++(3M)", "unipc": "UniPC"}

# The steps the EMS job's tuning and check measure their decisions on (``stats.tuning.sampling_sigmas``): uniform in
# lambda = -log sigma from sigma_max (eps), uniform in sigma from 1 (flow).  Which of v3 and the pack's solvers wins
# at an NFE depends on the schedule (bench/results_ems_schedule_transfer.md), so a stored ratio describes runs on
# these steps only.
DECISION_SPACING = {"eps": "uniform in log sigma", "flow": "uniform in sigma"}
SPACING_TOLERANCE = 0.05


def spacing_deviation(sigmas, model_kind) -> float:
    """How far a run's positive sigmas are from the decisions' spacing (``DECISION_SPACING``): the largest distance
    of a point from the uniform spacing between the first and the last positive sigma, as a fraction of that span
    (eps: in log sigma; flow: in sigma).  0 for fewer than three positive sigmas."""
    check_model_kind(model_kind)
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    values = values[values > 0]
    if values.numel() < 3:
        return 0.0
    if model_kind == "eps":
        values = values.log()
    span = (values[-1] - values[0]).abs().item()
    if span == 0:
        return 0.0
    uniform = torch.linspace(values[0].item(), values[-1].item(), values.numel(), dtype=torch.float64)
    return (values - uniform).abs().max().item() / span


def spacing_note(sigmas, model_kind):
    """None where ``sigmas`` are the decisions' spacing (within ``SPACING_TOLERANCE``), else one sentence saying
    that the stored decisions and ratios were measured on other steps."""
    deviation = spacing_deviation(sigmas, model_kind)
    if deviation <= SPACING_TOLERANCE:
        return None
    return (f"the EMS decisions were measured on steps {DECISION_SPACING[model_kind]}; this schedule is "
            f"{deviation:.0%} of its span away from that, so whether v3 or the solver a decision names is better "
            f"on it was not measured")


def summarize_decisions(decisions) -> str:
    """``EMSData.decision_summary`` for a sequence of ``NFEDecision`` (validated here)."""
    decisions = validate_decisions(decisions)
    if not decisions:
        return "v3 at every step count (these EMS carry no per-step decisions)"
    parts = []
    for solver in DECISION_SOLVERS:
        chosen = [d for d in decisions if d.solver == solver]
        if not chosen:
            continue
        text = f"{SOLVER_NAMES[solver]} at {', '.join(str(d.nfe) for d in chosen)} steps"
        if solver == "v3":
            low, high = min(d.ratio for d in chosen), max(d.ratio for d in chosen)
            span = f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"
            text += f" ({span} the error of the best other solver measured)"
            if not all(d.corrector for d in chosen):
                text += f", corrector off at {', '.join(str(d.nfe) for d in chosen if not d.corrector)}"
        parts.append(text)
    if all(d.solver != "v3" for d in decisions):
        parts.insert(0, "v3 at no step count")
    return "; ".join(parts) + "; other step counts follow the nearest"


def validate_arrays(lambdas, stats, where="EMS"):
    """Shapes, strictly increasing finite lambdas, finite l, s, b within ``STAT_BOUNDS``; ValueError naming
    ``where`` and the problem."""
    if lambdas.ndim != 1 or lambdas.shape[0] < 2:
        raise ValueError(f"{where}: lambdas must be 1-D with at least 2 nodes, got shape {tuple(lambdas.shape)}")
    if not torch.isfinite(lambdas).all():
        raise ValueError(f"{where}: lambdas contain NaN or inf")
    steps = lambdas[1:] - lambdas[:-1]
    if (steps <= 0).any():
        k = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"{where}: lambdas must be strictly increasing (noisiest first); lambdas[{k}] = "
                         f"{lambdas[k].item():.6g} >= lambdas[{k + 1}] = {lambdas[k + 1].item():.6g}")
    rows = lambdas.shape[0]
    shape = None
    for name, value in stats.items():
        if value.ndim != 4:
            raise ValueError(f"{where}: {name} must have shape (N + 1, C, H, W), got {tuple(value.shape)}")
        if value.shape[0] != rows:
            raise ValueError(f"{where}: {name} has {value.shape[0]} rows but lambdas has {rows} nodes")
        if shape is None:
            shape = tuple(value.shape)
        elif tuple(value.shape) != shape:
            raise ValueError(f"{where}: l, s, b shapes differ: {name} is {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {name} contains {bad} NaN or inf values")
        largest = float(value.abs().max()) if value.numel() else 0.0
        if largest > STAT_BOUNDS[name]:
            raise ValueError(f"{where}: |{name}| reaches {largest:.3g}, beyond the bound {STAT_BOUNDS[name]:g} of "
                             "real statistics (a corrupt or mis-scaled file)")


class EMSData:
    """EMS arrays (validated, CPU, ``lambdas`` float64) plus ``model_kind`` ("eps", "flow" or None: not stated, the
    sampler takes them for either) and ``decisions`` (a tuple of ``NFEDecision``, possibly empty).  Treated as
    immutable: the sampler caches its plans per object."""

    def __init__(self, lambdas, l, s, b, model_kind=None, decisions=(), where="EMS"):
        if model_kind is not None:
            check_model_kind(model_kind)
        lambdas = torch.as_tensor(lambdas).detach().to("cpu", torch.float64)
        stats = {}
        for name, value in zip(STAT_NAMES, (l, s, b)):
            value = torch.as_tensor(value).detach().cpu()
            if not value.is_floating_point():
                value = value.to(torch.float64)
            stats[name] = value
        validate_arrays(lambdas, stats, where)
        self.lambdas = lambdas
        self.l, self.s, self.b = stats["l"], stats["s"], stats["b"]
        self.model_kind = model_kind
        self.decisions = validate_decisions(decisions)
        self._fallback_logged = set()

    @property
    def N(self) -> int:
        return self.lambdas.shape[0] - 1

    @property
    def stat_shape(self) -> tuple:
        return tuple(self.l.shape[1:])

    @property
    def reduction(self) -> str:
        return reduction_of(self.stat_shape)

    @classmethod
    def degenerate(cls, lambdas, channels=1):
        """l = 1, s = b = 0 (DPM-Solver++, the official ``degenerated=True``), per channel (scalar if channels=1)."""
        lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
        shape = (lambdas.shape[0], channels, 1, 1)
        return cls(lambdas, torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
                   torch.zeros(shape, dtype=torch.float64))

    def decision_for(self, steps):
        """The decision measured at the NFE nearest to ``steps`` (in log NFE, ties to the smaller), or None."""
        if not self.decisions or steps < 1:
            return None
        return min(self.decisions, key=lambda d: (abs(math.log(d.nfe / steps)), d.nfe))

    def decision_summary(self) -> str:
        """One line for people: which solver DPM-Solver-v3 runs at which step count, from ``decisions``, e.g.
        "v3 at 6, 8, 10 steps (0.61-0.77x the error of the best other solver measured); DPM-Solver++(2M) at 5
        steps; other step counts follow the nearest".  Without decisions: v3 runs at every step count."""
        return summarize_decisions(self.decisions)

    def for_latent(self, shape):
        """l, s, b of shape (N + 1, *per_sample) broadcasting against a latent of full shape (batch, C, ...).

        Per-element statistics of another latent size fall back to their per-channel means (logged once per
        shape); a channel count that differs from the latent's raises ``ValueError`` (scalar statistics fit any).
        """
        shape = tuple(int(v) for v in shape)
        if len(shape) < 2:
            raise ValueError(f"for_latent needs a batched latent shape (batch, C, ...), got {shape}")
        per_sample = shape[1:]
        channels = self.stat_shape[0]
        rows = self.N + 1
        if self.reduction == "scalar":
            view = (rows,) + (1,) * len(per_sample)
            return tuple(t.reshape(view) for t in (self.l, self.s, self.b))
        if channels != per_sample[0]:
            raise ValueError(
                f"the EMS have {channels} channels (stat shape {self.stat_shape}) but the latent has "
                f"{per_sample[0]} channels (shape {shape}): these statistics belong to another model family")
        if self.reduction == "per_element" and self.stat_shape == per_sample:
            return self.l, self.s, self.b
        if self.reduction == "per_element" and per_sample not in self._fallback_logged:
            self._fallback_logged.add(per_sample)
            logger.warning(
                "DPM-Solver-v3: per-element EMS of shape %s do not fit a latent of shape %s; using their per-channel "
                "means", self.stat_shape, per_sample)
        view = (rows, channels) + (1,) * (len(per_sample) - 1)
        return tuple(t.reshape(rows, channels, -1).mean(-1).reshape(view) for t in (self.l, self.s, self.b))


__all__ = ["EMSData", "NFEDecision", "validate_decisions", "validate_arrays", "reduction_of", "STAT_BOUNDS",
           "DECISION_SOLVERS", "SOLVER_NAMES", "summarize_decisions"]
