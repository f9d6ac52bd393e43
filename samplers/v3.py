"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv 2310.13268): a multistep predictor-corrector ODE solver
that uses a model's empirical model statistics (EMS) l, s, b (``stats.EMS``), in k-diffusion sigma-space.

With lambda = -log sigma, f = (1 - l) x - D and the EMS integrals (trapezoid sums in float64)
L = int l, S = int s, I = int e^{L+S}, B = int e^{-S} b, C = int e^{L+S} B, one step s -> t is (Algorithm 1, Eq. 13-14)

    x_t = e^{L_s-L_t} x_s - e^{-L_t-S_s}(I_t - I_s) g_s - e^{-L_t}(C_t - C_s - B_s(I_t - I_s))
          - e^{L_s-L_t} sum_{m=1..n} E^(m)_{s,t} g^(m),     E^(m) = int_s^t e^{(L+S)(r)-(L+S)(s)} (r - lambda_s)^m/m! dr,

where g_j = e^{S_s-S_j} f_j - e^{S_s}(B_j - B_s) re-expresses the history relative to s and the derivatives g^(m)
come from the last points (full order: a Vandermonde solve; pseudo order, Thm 3.4: m! times a Newton divided
difference).  Everything but f is known before sampling, so each predictor or corrector step collapses to

    x_t = A * x_s + K + sum_j W_j * f_j                                                   (docs/dpm_solver_v3.md, sec. 2)

with A, K, W_j tensors of the statistics' shape.  ``_build_plan`` computes them once per (EMS, sigmas, options,
dtype, device) in float64 on the CPU, interval by interval with all exponents taken relative to the interval's
start (no cancellation, O(nodes per interval x |stat|) memory), and casts them once to the latent's device.  The
host's sigmas are inserted into the EMS grid as extra trapezoid nodes with linearly interpolated l, s, b; outside
the grid the statistics are held at their end values but integrated over the true interval (Eq. 9 is exact for any
bounded l, s, b, App. I.3), on cells as wide as the grid's end cells.
"""
from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .common import SamplerRun, check_choice, check_positive_int
from .ems_data import EMSData
from .dpmpp import _final_step, _resolve_final_step
from .exponential import data_prediction_step, extrapolated_denoised, guarded_step

logger = logging.getLogger("dpm_solver_nodes")

HALF_CHOICES = (None, "noisy", "clean")
# sigma at t = 0.5 (timestep 499) of the SD-1.x/2.x/XL discrete schedule: the official corrector boundary.
SD_HALF_SIGMA = 1.612886
MAX_EXTENSION_NODES = 20000
STAT_LIMIT = 10.0  # |l|, |s| beyond this are clamped (real EMS are O(1); e^{S} must not overflow float32 weights)
WORKSPACE_ELEMENTS = 1 << 21  # float64 elements per scratch buffer (16 MiB)

_DEFAULT_EMS = None
_warned_without_ems = False
_warned_without_ems_or_corrector = False
_PLAN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PLANS_PER_EMS = 4
_CLAMP_LOGGED: "weakref.WeakSet" = weakref.WeakSet()


def _degenerate_ems():
    """l = 1, s = b = 0 on a fine scalar grid (used when no EMS are given): DPM-Solver++ with the v3 corrector."""
    global _DEFAULT_EMS
    if _DEFAULT_EMS is None:
        _DEFAULT_EMS = EMSData.degenerate(torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64))
    return _DEFAULT_EMS


# ---- quadrature on the merged grid -----------------------------------------------------------------------------

def _trapezoid_weights(r):
    """Per-node trapezoid weights of the whole interval spanned by the nodes r."""
    widths = np.diff(r)
    weights = np.zeros(len(r))
    weights[:-1] += 0.5 * widths
    weights[1:] += 0.5 * widths
    return weights


def _cumulative_(r, values, previous, current):
    """In place: row k of ``values`` (K+1, P) becomes int_{r_0}^{r_k} values (trapezoid; row 0 becomes 0).

    Row by row (torch.cumsum along dim 0 is ~30x slower on CPU); ``previous`` and ``current`` are (P,) scratch rows.
    """
    if values.shape[1] < 512:  # few columns (scalar or small statistics): one vectorised cumsum
        cells = (values[1:] + values[:-1]) * torch.from_numpy(0.5 * np.diff(r))[:, None]
        values[0].zero_()
        torch.cumsum(cells, 0, out=values[1:])
        return values
    half_widths = (0.5 * np.diff(r)).tolist()
    previous.copy_(values[0])
    values[0].zero_()
    for k in range(1, values.shape[0]):
        current.copy_(values[k])
        values[k].add_(previous).mul_(half_widths[k - 1]).add_(values[k - 1])
        previous, current = current, previous
    return values


class _Workspace:
    """Scratch buffers reused by every interval of one plan: fresh (nodes x |stat|) float64 allocations cost more
    than the arithmetic.  Columns are processed in chunks so that a buffer holds at most WORKSPACE_ELEMENTS."""

    def __init__(self, rows, columns):
        self.chunk = max(1, min(columns, WORKSPACE_ELEMENTS // max(rows, 1)))
        self.tables = [torch.empty(rows * self.chunk, dtype=torch.float64) for _ in range(3)]
        self.scratch = [torch.empty(self.chunk, dtype=torch.float64) for _ in range(2)]

    def views(self, rows, columns):
        return [buffer[:rows * columns].view(rows, columns) for buffer in self.tables]


class _Statistics:
    """l, s, b (float64, CPU, flattened to (N + 1, P)) of one EMS for one latent shape, evaluated at any lambda:
    linear interpolation inside the grid, end values outside; ``nodes(a, b)`` lists an interval's trapezoid nodes."""

    def __init__(self, ems, latent_shape):
        l, s, b = ems.for_latent(latent_shape)
        self.stat_shape = tuple(l.shape[1:])
        self.l, self.s, self.b = (t.to(torch.float64).reshape(t.shape[0], -1) for t in (l, s, b))
        self.grid = ems.lambdas.numpy().astype(np.float64)
        clamped = int((self.l.abs() > STAT_LIMIT).sum() + (self.s.abs() > STAT_LIMIT).sum())
        if clamped:
            # Eq. 9 is exact for any bounded l, s, b (App. I.3), so clamping keeps the solver consistent; values this
            # large come from degenerate estimates (zero-variance dimensions, Var f ~ 0) and would overflow e^{S}.
            self.l = self.l.clamp(-STAT_LIMIT, STAT_LIMIT)
            self.s = self.s.clamp(-STAT_LIMIT, STAT_LIMIT)
            if ems not in _CLAMP_LOGGED:
                _CLAMP_LOGGED.add(ems)
                logger.warning("DPM-Solver-v3: %d EMS values of l or s beyond +-%g clamped (degenerate statistics, "
                               "e.g. zero-variance dimensions)", clamped, STAT_LIMIT)

    def extend(self, low, high, refine=1):
        """The trapezoid nodes: the grid plus uniform cells (of the end cells' width) out to [low, high], every cell
        split into ``refine`` equal parts (the statistics interpolated linearly)."""
        grid = self.grid
        if refine > 1:
            fractions = np.arange(refine) / refine
            grid = np.concatenate([(grid[:-1, None] + (grid[1:] - grid[:-1])[:, None] * fractions).ravel(),
                                   grid[-1:]])
        parts = [grid]
        if low < grid[0]:
            width = max(grid[1] - grid[0], (grid[0] - low) / MAX_EXTENSION_NODES)
            count = int(math.ceil((grid[0] - low) / width))
            parts.insert(0, grid[0] - width * np.arange(count, 0, -1))
        if high > grid[-1]:
            width = max(grid[-1] - grid[-2], (high - grid[-1]) / MAX_EXTENSION_NODES)
            count = int(math.ceil((high - grid[-1]) / width))
            parts.append(grid[-1] + width * np.arange(1, count + 1))
        self.nodes_all = np.concatenate(parts)

    def locate(self, lams):
        """Interpolation of the grid at ``lams``: lower/upper row indices and the weight of the upper row."""
        grid = self.grid
        last = len(grid) - 1
        lams = np.asarray(lams, dtype=np.float64)
        lower = np.clip(np.searchsorted(grid, lams, side="right") - 1, 0, last)
        upper = np.minimum(lower + 1, last)
        span = grid[upper] - grid[lower]
        weight = np.clip((lams - grid[lower]) / np.where(span > 0, span, 1.0), 0.0, 1.0)
        weight[span <= 0] = 0.0
        return lower, upper, weight

    def gather(self, location, columns=slice(None), out=None):
        """(l, s, b) rows at a ``locate`` result for the given columns, into ``out`` buffers when given."""
        lower, upper, weight = location
        mixed = np.nonzero(weight > 0)[0]  # nodes between grid nodes; the rest are grid (or clamped) rows
        lower_t = torch.from_numpy(lower)
        result = []
        for k, table in enumerate((self.l, self.s, self.b)):
            table = table[:, columns]
            if out is None:
                values = table.index_select(0, lower_t)
            else:
                values = torch.index_select(table, 0, lower_t, out=out[k])
            if len(mixed):
                w = torch.from_numpy(weight[mixed])[:, None]
                values[torch.from_numpy(mixed)] = (table[torch.from_numpy(lower[mixed])] * (1 - w)
                                                   + table[torch.from_numpy(upper[mixed])] * w)
            result.append(values)
        return result

    def at(self, lams):
        """(l, s, b) at the float64 array ``lams``, each (len(lams), P)."""
        return self.gather(self.locate(lams))

    def nodes(self, a, b):
        inner = self.nodes_all[(self.nodes_all > a) & (self.nodes_all < b)]
        return np.concatenate([[a], inner, [b]])


def _interval(stats, a, b, max_order, workspace):
    """The EMS integrals of one step lambda_s = a -> lambda_t = b, all exponents relative to the interval's start.

    Returns a dict of float64 (P,) tensors:
      A = e^{L_s - L_t};  phi = -e^{-L_t-S_s}(I_t - I_s) (the weight of g_s);
      K = -e^{-L_t}(C_t - C_s - B_s(I_t - I_s)) = -int_s^t e^{(L+S)(r)-L_t-S_s} int_s^r e^{S_s-S(u)} b(u) du dr;
      E[m] = -e^{L_s-L_t} E^(m)_{s,t} for m = 1..max_order;  dS = S_t - S_s;  beta = int_s^t e^{S_s-S(u)} b(u) du.
    Every integral is a trapezoid sum over the same nodes as the official code's cumulative arrays, so the
    differences C_t - C_s - B_s(I_t - I_s) are formed without cancellation.
    """
    r = stats.nodes(a, b)
    location = stats.locate(r)
    weights = _trapezoid_weights(r)
    u = r - a
    moments = torch.from_numpy(np.stack([weights] + [weights * u ** m / math.factorial(m)
                                                     for m in range(1, max_order + 1)]))
    node_weights = torch.from_numpy(weights)
    columns = stats.l.shape[1]
    out = {name: torch.empty(columns, dtype=torch.float64) for name in ("A", "K", "dS", "beta")}
    integrals = torch.empty(max_order + 1, columns, dtype=torch.float64)
    for start in range(0, columns, workspace.chunk):
        stop = min(columns, start + workspace.chunk)
        l, s, bias = stats.gather(location, slice(start, stop), workspace.views(len(r), stop - start))
        previous, current = (row[:stop - start] for row in workspace.scratch)
        weight = _cumulative_(r, l.add_(s), previous, current)  # (L + S)(r) - (L + S)(r_0)
        dS = _cumulative_(r, s, previous, current)
        out["dS"][start:stop] = dS[-1]
        dL_end = weight[-1] - dS[-1]
        out["A"][start:stop] = torch.exp(-dL_end)
        weight.sub_(dL_end).exp_()  # e^{(L+S)(r) - L_t - S_s}
        beta = _cumulative_(r, dS.neg_().exp_().mul_(bias), previous, current)  # int_s^r e^{S_s-S(u)} b(u) du
        out["beta"][start:stop] = beta[-1]
        integrals[:, start:stop] = moments @ weight  # the I-term, then E^(m)
        out["K"][start:stop] = node_weights @ weight.mul_(beta)
    integrals.neg_()
    return {"A": out["A"], "phi": integrals[0], "K": out["K"].neg_(), "E": list(integrals[1:]), "dS": out["dS"],
            "beta": out["beta"]}


def _derivative_weights(lams, pseudo):
    """w[m-1][j] with g^(m)(lambda_0) = sum_j w[m-1][j] g_j for the points ``lams`` = [lambda_s, lambda_p1, ...].

    Full order solves sum_m delta_k^m g^(m)/m! = g_{p_k} - g_s (Algorithm 1); pseudo order (Thm 3.4) takes
    g^(m) = m! g[lambda_s, ..., lambda_pm], the leading Newton divided difference.
    """
    n = len(lams) - 1
    if n == 0:
        return np.zeros((0, 1))
    lams = np.asarray(lams, dtype=np.float64)
    if pseudo:
        table = list(np.eye(n + 1))
        weights = []
        for level in range(1, n + 1):
            table = [(table[j] - table[j + 1]) / (lams[j] - lams[j + level]) for j in range(n - level + 1)]
            weights.append(table[0] * math.factorial(level))
        return np.stack(weights)
    delta = lams[1:] - lams[0]
    vandermonde = np.stack([delta ** m for m in range(1, n + 1)], axis=1)  # rows k, columns m
    inverse = np.linalg.inv(vandermonde)  # g^(m)/m! = sum_k inverse[m-1, k] (g_pk - g_s)
    weights = np.zeros((n, n + 1))
    for m in range(1, n + 1):
        weights[m - 1, 1:] = inverse[m - 1] * math.factorial(m)
        weights[m - 1, 0] = -weights[m - 1, 1:].sum()
    return weights


class _Plan:
    """Per-run tensors: ``a[i]`` = (1 - l_i)/alpha_i (so f_i = a_i x_i - D_i), predictor and corrector steps."""

    def __init__(self):
        self.a = {}
        self.predictor = {}  # i -> (A, K, [(j, W_j)]) for x_{i+1}
        self.corrector = {}  # i -> (A, K, [(j, W_j)]) redoing x_{i-1} -> x_i
        self.orders = {}
        self.corrector_orders = {}
        self.rho_predictor = {}  # flow start: i -> order of a step in rho whose points reach sigma = 1
        self.rho_corrector = {}


def _history_affine(intervals, j, s):
    """(c, d) with g_j = c * f_j + d relative to point s (Algorithm 1: g_j = e^{S_s-S_j} f_j - e^{S_s}(B_j - B_s)).

    j = s gives (None, None) (g_s = f_s); j = s + 1 (the corrector's fresh point) gives
    (e^{-(S_t-S_s)}, -int_s^t e^{S_s-S(u)} b du); j < s gives e^{S_s-S_j} and
    int_j^s e^{S_s-S(u)} b du = sum_k e^{S_s-S_{k+1}} e^{S_{k+1}-S_k} beta_k over the intervals k = j..s-1.
    """
    if j == s:
        return None, None
    if j == s + 1:
        iv = intervals[s]
        return torch.exp(-iv["dS"]), -iv["beta"]
    scale, offset = None, None
    for k in range(s - 1, j - 1, -1):  # newest interval first; scale = e^{S_s - S_{k+1}} before the update
        iv = intervals[k]
        growth = torch.exp(iv["dS"])
        scale = growth if scale is None else scale * growth
        term = scale * iv["beta"]
        offset = term if offset is None else offset + term
    return scale, offset


def _step(intervals, lams, s, points, pseudo, alpha_s, alpha_t):
    """(A, K, [(j, W_j)]) of the step from point s over interval s with derivative points ``points`` (not s)."""
    iv = intervals[s]
    order = len(points) + 1
    weights = _derivative_weights([lams[s]] + [lams[p] for p in points], pseudo)
    coefficient = {s: iv["phi"]}
    for m in range(1, order):
        for position, j in enumerate([s] + list(points)):
            term = iv["E"][m - 1] * float(weights[m - 1, position])
            coefficient[j] = coefficient[j] + term if j in coefficient else term
    K = iv["K"]
    terms = []
    for j, coef in coefficient.items():
        c, d = _history_affine(intervals, j, s)
        if c is None:
            terms.append((j, coef))
        else:
            terms.append((j, coef * c))
            K = K + coef * d
    scale = alpha_t / alpha_s
    return iv["A"] * scale, K * alpha_t, [(j, W * alpha_t) for j, W in terms]


def _schedule_orders(table, order, lower_order_final, use_corrector, c_pseudo, half, half_sigma):
    """Predictor order of each step and corrector order at each point (Algorithm 2; docs section 4.2-4.3).

    A flow model's sigma = 1 (point 0 at lambda = -inf) counts as a history point like any other: its step is
    first order, the later steps and correctors whose points reach it are steps in rho (``_build_plan``).
    """
    steps = table.steps
    orders, corrector_orders = {}, {}
    for i in range(steps):
        if table.sigmas[i + 1] == 0:
            continue
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, steps - i)
        orders[i] = max(p, 1)
    for i in range(1, steps):  # points 1 .. M-1; x_M is returned unevaluated (or is sigma = 0)
        if not use_corrector or (i - 1) not in orders:
            continue
        sigma = table.sigmas[i]
        if half == "noisy" and not sigma > half_sigma:
            continue
        if half == "clean" and not sigma <= half_sigma:
            continue
        c = orders[i - 1] + int(bool(c_pseudo))
        if c >= 2:
            corrector_orders[i] = c
    return orders, corrector_orders


def _build_plan(ems, table, latent_shape, dtype, device, order, p_pseudo, use_corrector, c_pseudo,
                lower_order_final, half, half_sigma, refine):
    orders, corrector_orders = _schedule_orders(table, order, lower_order_final, use_corrector, c_pseudo, half,
                                                half_sigma)
    plan = _Plan()
    plan.orders, plan.corrector_orders = orders, corrector_orders
    if not math.isfinite(table.lam[0]):
        # A flow start: the steps and correctors whose points reach sigma = 1 cannot use the EMS form there
        # (x / alpha is infinite); they are DPM-Solver++ steps (l = 1, s = b = 0) with D interpolated in
        # rho = -log sigma (``exponential.data_prediction_step``), so the second step keeps the predictor's order.
        # No corrector redoes the step out of sigma = 1: holding D_1 while x_1 moves measured far worse with
        # guidance at few steps (bench/results_flow_guidance.md).
        corrector_orders.pop(1, None)
        plan.rho_predictor = {i: p for i, p in orders.items() if i - p + 1 <= 0}
        plan.rho_corrector = {i: c for i, c in corrector_orders.items() if i - c + 1 <= 0}
        orders = {i: p for i, p in orders.items() if i not in plan.rho_predictor}
        corrector_orders = {i: c for i, c in corrector_orders.items() if i not in plan.rho_corrector}
    stats = _Statistics(ems, latent_shape)
    finite = [v for v in table.lam if math.isfinite(v)] or [float(stats.grid[0])]  # flow sigmas [1, 0]: none
    stats.extend(min(finite), max(finite), refine)
    lams = table.lam
    finite_steps = [i for i in range(table.steps) if table.finite_step(i)]
    rows = max((len(stats.nodes(lams[i], lams[i + 1])) for i in finite_steps), default=2)
    workspace = _Workspace(rows, stats.l.shape[1])
    intervals = {i: _interval(stats, lams[i], lams[i + 1], order, workspace) for i in finite_steps}
    alpha = table.alpha
    points = [i for i in range(table.steps + 1) if math.isfinite(lams[i])]
    l_points = stats.at(np.array([lams[i] for i in points]))[0]

    def cast(value):
        return value.reshape(stats.stat_shape).to(dtype=dtype, device=device)

    for k, i in enumerate(points):
        plan.a[i] = cast((1 - l_points[k]) / alpha[i])
    for i, p in orders.items():
        A, K, W = _step(intervals, lams, i, [i - k for k in range(1, p)], p_pseudo, alpha[i], alpha[i + 1])
        plan.predictor[i] = (cast(A), cast(K), [(j, cast(w)) for j, w in W])
    for i, c in corrector_orders.items():
        extra = [i] + [i - k for k in range(2, c)]
        A, K, W = _step(intervals, lams, i - 1, extra, c_pseudo, alpha[i - 1], alpha[i])
        plan.corrector[i] = (cast(A), cast(K), [(j, cast(w)) for j, w in W])
    return plan


def _step_in_rho(x, table, s, newest, count, outputs):
    """The step s -> s + 1 of DPM-Solver++ (v3 with l = 1, s = b = 0) with D interpolated in rho = -log sigma
    through the ``count`` points newest, newest - 1, ... (a flow start; ``exponential.data_prediction_step``)."""
    points = range(newest, newest - count, -1)
    if count == 1:
        return data_prediction_step(x, table, s, [outputs[newest]])
    return data_prediction_step(x, table, s, history=([table.lam[j] for j in points], [outputs[j] for j in points]))


def _cached_plan(ems, table, latent_shape, dtype, device, options):
    key = (table.sigmas, table.schedule.kind, tuple(latent_shape[1:]), str(dtype), str(device),
           tuple(sorted(options.items())))
    plans = _PLAN_CACHE.setdefault(ems, OrderedDict())
    if key in plans:
        plans.move_to_end(key)
        return plans[key]
    plan = _build_plan(ems, table, latent_shape, dtype, device, **options)
    plans[key] = plan
    while len(plans) > _PLANS_PER_EMS:
        plans.popitem(last=False)
    return plan


def _combine(A, K, W, x, history):
    out = torch.addcmul(K, A, x)
    for j, weight in W:
        out.addcmul_(weight, history[j])
    return out


def _snap_sigmas(sigmas, ems, schedule):
    """The official code's snapping (parity tests only): each positive sigma moved to its nearest grid node."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    grid = ems.lambdas
    n = grid.shape[0] - 1
    out = s.clone()
    for i, value in enumerate(s.tolist()):
        if value <= 0:
            continue
        lam = schedule.lambda_(value)
        k = int(round(n * (lam - grid[0].item()) / (grid[-1].item() - grid[0].item()))) if math.isfinite(lam) else 0
        k = min(max(k, 0), n)
        out[i] = schedule.sigma_from_lambda(grid[k].item())
    if ((out[1:] - out[:-1]) >= 0).any():
        raise ValueError("snap=True put two sigmas on the same EMS grid node; use more EMS nodes or snap=False")
    return out.to(torch.as_tensor(sigmas).dtype) if isinstance(sigmas, torch.Tensor) else out


def _decided(ems, steps):
    """The EMS's stored decision for ``steps`` model calls (nearest checked NFE) and, where it sends the run to a
    pack solver (DPM-Solver++(2M), (3M) or UniPC), why (else None)."""
    decision = ems.decision_for(steps)
    if decision is None or decision.solver == "v3":
        return decision, None
    return decision, (f"the EMS check measured {decision.solver} better than v3 at {decision.nfe} NFE "
                      f"(stored error ratio {decision.ratio:.2f}; this run: {steps} steps)")


_spacing_noted = weakref.WeakKeyDictionary()  # EMS -> step counts whose off-spacing run was logged


def _note_spacing(ems, sigmas, model_kind):
    """Log once per EMS and step count where a run's sigmas are not the spacing the EMS's decisions were measured
    on (``ems_data.spacing_note``): the decision still applies, its ratio does not describe this run."""
    from .ems_data import spacing_note

    note = spacing_note(sigmas, model_kind)
    steps = len(sigmas) - 1
    if note is None or steps in _spacing_noted.setdefault(ems, set()):
        return
    _spacing_noted[ems].add(steps)
    logger.info("DPM-Solver-v3 at %d steps: %s (bench/results_ems_schedule_transfer.md)", steps, note)


def _check_v3_options(ems, flags):
    """``ems`` must be EMS data (or None) and the on/off options real bools: a file name or "no" is a mistake."""
    if ems is not None and not isinstance(ems, EMSData):
        hint = " (read a file with stats.load_ems(path))" if isinstance(ems, (str, bytes)) or hasattr(
            ems, "__fspath__") else ""
        raise TypeError(f"ems must be an EMS object or None, got {type(ems).__name__} {ems!r:.80}{hint}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def sample_dpm_solver_v3(model, x, sigmas, extra_args=None, callback=None, disable=None, *, ems=None, order=2,
                         p_pseudo=False, use_corrector=None, c_pseudo=True, lower_order_final=True, half=None,
                         half_sigma=None, model_kind="eps", final_step=None, refine=1, snap=False,
                         fallback=True):
    """DPM-Solver-v3 (Algorithm 2): multistep predictor with the EMS-based update and a corrector at no extra NFE.

    Options (the official names where they exist):
      ems: the model's EMS (``samplers.ems_data.EMSData``, e.g. a ``stats.EMS``; anything else is a TypeError);
        ``None`` uses l = 1, s = b = 0, i.e. DPM-Solver++ (Taylor form) plus the v3 corrector, and logs that once
        per process.  Per-element EMS of another latent size use their per-channel
        means (logged).  Statistics whose metadata name another model_kind are rejected.  |l| or |s| above 10
        (degenerate fits, e.g. zero-variance dimensions) are clamped with one log line: any bounded l, s, b keeps
        the update exact (App. I.3), and e^{S} must fit the float32 step weights.  The EMS are treated as
        immutable: plans are cached per EMS object.
      order: predictor order 1-3 (official: 2 for guided latent models, 3 unconditional).  Warm-up runs 1, 2, ...
        Where the EMS's stored decision for the nearest NFE names v3 of order 3 (the tuning measured it clearly better
        than order 2 there, unguided models only), order 3 runs whatever is given here, logged when that differs
        (``fallback=False`` keeps the given order): hosts pass their order setting, and the decision is what the
        stored ratio measured.
      p_pseudo: pseudo-order predictor derivatives (m! times a divided difference; official: on at <= 5 NFE).
      use_corrector: redo the previous step with the freshly evaluated point (no extra model call).  None (default):
        as the EMS's stored decision for the nearest NFE says (the EMS job's tuning measures both), else True.
      c_pseudo: corrector of order predictor + 1 with pseudo derivatives (official default True); False keeps the
        predictor's order with full-order derivatives.
      lower_order_final: cap the order at the number of remaining steps (orders ..., 3, 2, 1).
      half: where the corrector runs: None everywhere, "noisy" where sigma_i > half_sigma (the official code),
        "clean" where sigma_i <= half_sigma (the paper).  The freshly evaluated sigma_i decides.
      half_sigma: the boundary in the host's sigma; default 1.612886 (t = 0.5 of the SD discrete schedule) for
        "eps" and 0.5 for "flow".
      model_kind: "eps" (x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).  Flow models are integrated in
        VE coordinates x~ = x / (1 - sigma), sigma~ = sigma / (1 - sigma), with the alpha factors folded into the
        step coefficients.  A flow start at sigma = 1 (lambda = -inf) takes the first-order step
        x_1 = sigma_1 x_0 + (1 - sigma_1) D(x_0, 1); x / alpha is infinite at sigma = 1, so the predictor steps and
        correctors whose points reach it are DPM-Solver++ steps (l = 1, s = b = 0) with D interpolated in
        rho = -log sigma (``exponential.rho_weights``) and keep their order; the EMS form takes over after them.
        No corrector redoes the step out of sigma = 1.
      final_step: for a trailing 0: "denoise" returns that step's denoised output (corrected when the corrector ran
        at that point), "extrapolate" that output extrapolated to sigma = 0 with the previous point's (second order,
        ``exponential.extrapolated_denoised``, as DPM-Solver++(2M)/(3M) do), "stop" drops the trailing 0 and
        returns x at the last positive sigma.  None (default): "auto" as DPM-Solver++(2M) (``dpmpp._final_step``):
        "extrapolate" on flow models whose last positive sigma is coarse (the hosts' shift-3 schedule up to ~24
        steps), else "denoise"; on shift 3 the final jump is most of the error, and with "denoise" v3 had 1.0-3.6x
        the 2M's error there (bench/results_ems_schedule_transfer.md).  A schedule ending at a positive sigma
        returns x there, unevaluated (official behaviour).
      refine: split every EMS grid cell into this many trapezoid cells (l, s, b interpolated linearly), cutting
        the O(dlambda^2) quadrature error of the coefficients by refine^2 at refine times the (small) setup cost.
      fallback: where the EMS carry a decision (``ems.decisions``, from the EMS job's tuning or check) that sends the
        NFE nearest to this run's (in log NFE) to DPM-Solver++(2M), (3M) or UniPC, run ``sample_dpmpp_2m`` /
        ``sample_dpmpp_3m`` / ``sample_unipc`` (their defaults) instead and log why.  Without EMS and without corrector (order 2 or
        3) v3 is DPM-Solver++ in its Taylor form; the paper's DPM-Solver++(2M) / the official 3M then run instead
        (logged; the 2M measured 0.54-0.91x the Taylor form's error at 5-20 NFE on the embedded models and the
        test mixtures, 1.04-1.09x at 5 NFE on flow logSNR-uniform steps).  False always runs v3.
      snap: round each sigma to the nearest EMS grid node as the official code does (parity tests only; the model
        is then called at the snapped sigmas).

    The step coefficients are computed once per (EMS, sigmas, options, dtype, device) in float64 on the CPU and
    cached; fp16/bf16 latents are integrated in float32.
    """
    global _warned_without_ems, _warned_without_ems_or_corrector
    _check_v3_options(ems, {"p_pseudo": p_pseudo, "use_corrector": True if use_corrector is None else use_corrector,
                            "c_pseudo": c_pseudo,
                            "lower_order_final": lower_order_final, "snap": snap, "fallback": fallback})
    check_positive_int("order", order, maximum=3)
    check_choice("half", half, HALF_CHOICES)
    check_positive_int("refine", refine, maximum=64)
    final_step = _final_step(final_step)  # None -> "auto"
    if ems is None and fallback and use_corrector is False and order >= 2 and not snap:
        # v3 with l = 1, s = b = 0 and no corrector is DPM-Solver++ with Taylor weights: run the paper's form instead
        from .dpmpp import sample_dpmpp_2m, sample_dpmpp_3m

        solver = sample_dpmpp_3m if order == 3 else sample_dpmpp_2m
        if not _warned_without_ems_or_corrector:
            _warned_without_ems_or_corrector = True
            logger.info("DPM-Solver-v3 without EMS and without corrector is DPM-Solver++: running %s (logged once)",
                        "DPM-Solver++(3M)" if order == 3 else "DPM-Solver++(2M)")
        return solver(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                      lower_order_final=bool(lower_order_final),
                      final_step=None if final_step == "auto" else final_step)
    if ems is None:
        if not _warned_without_ems:
            _warned_without_ems = True
            logger.info("DPM-Solver-v3 without EMS: using l = 1, s = b = 0 (DPM-Solver++ with the v3 corrector)")
        ems = _degenerate_ems()
    elif ems.model_kind is not None and ems.model_kind != model_kind:
        raise ValueError(f"the EMS were computed for model_kind={ems.model_kind!r} but the sampler runs "
                         f"model_kind={model_kind!r}")
    if half_sigma is None:
        half_sigma = 0.5 if model_kind == "flow" else SD_HALF_SIGMA
    elif not (isinstance(half_sigma, (int, float)) and math.isfinite(half_sigma) and half_sigma > 0):
        raise ValueError(f"half_sigma must be a finite number > 0, got {half_sigma!r}")
    if snap:
        from .schedule import noise_schedule

        sigmas = _snap_sigmas(sigmas, ems, noise_schedule(model_kind))
    decision, reason = _decided(ems, len(sigmas) - 1)
    if decision is not None and fallback:
        _note_spacing(ems, sigmas, model_kind)
    if reason and fallback:
        from . import SAMPLERS  # the decision solvers' names are its keys
        from .ems_data import SOLVER_NAMES

        logger.info("DPM-Solver-v3: %s; running %s instead", reason, SOLVER_NAMES[decision.solver])
        solver = SAMPLERS[decision.solver]
        # the solver as the tuning measured it: its own final step for the model kind (flow: extrapolated D)
        return solver(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                      final_step="stop" if final_step == "stop" else None)
    if use_corrector is None:
        use_corrector = decision.corrector if decision is not None else True
    if fallback and decision is not None and decision.solver == "v3" and decision.order == 3 and order != 3:
        logger.info("DPM-Solver-v3: the EMS tuning chose the order-3 predictor at %d NFE (stored error ratio %.2f); "
                    "running order 3 instead of %d at this %d-step run", decision.nfe, decision.ratio, order,
                    len(sigmas) - 1)
        order = 3
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                     final_step="stop" if final_step == "stop" else "denoise")
    t = run.table
    final_step = _resolve_final_step(final_step, t, model_kind)
    x = run.start(x)
    options = {"order": order, "p_pseudo": bool(p_pseudo), "use_corrector": bool(use_corrector),
               "c_pseudo": bool(c_pseudo), "lower_order_final": bool(lower_order_final), "half": half,
               "half_sigma": float(half_sigma), "refine": refine}
    plan = _cached_plan(ems, t, x.shape, x.dtype, x.device, options)
    history = {}  # point index -> f (the model output in the v3 parameterization)
    outputs = {}  # a flow start: point index -> D for the steps in rho (points 0 .. order)
    previous = None  # (lambda, D) of the point before the last, for final_step="extrapolate"
    for i in run.range():
        denoised = run.denoise(x, i)
        final = t.sigmas[i + 1] == 0
        before_final = final_step == "extrapolate" and i + 2 < len(t.sigmas) and t.sigmas[i + 2] == 0
        if plan.rho_predictor and i <= order:
            outputs[i] = denoised
        if i in plan.a:
            a = plan.a[i]
            history[i] = torch.mul(a, x).sub_(denoised)  # f_i = (1 - l_i) x_i / alpha_i - D_i
            history.pop(i - order - 1, None)
            if i in plan.corrector or i in plan.rho_corrector:
                # Algorithm 2: redo x_{i-1} -> x_i with the fresh f_i; f stays fixed, so D moves with x.
                if i in plan.corrector:
                    A, K, W = plan.corrector[i]
                    corrected = _combine(A, K, W, x_previous, history)
                else:
                    corrected = _step_in_rho(x_previous, t, i - 1, i, plan.rho_corrector[i], outputs)
                if final or before_final or run.callback is not None:
                    denoised = torch.addcmul(denoised, a, corrected - x)
                x = corrected
        run.report(x, i, denoised)
        if final:
            if final_step == "extrapolate" and previous is not None:
                denoised = extrapolated_denoised([t.lam[i], previous[0]], [denoised, previous[1]])
            return run.finish(denoised)
        if before_final:
            previous = (t.lam[i], denoised)
        x_previous = x
        if i in plan.predictor:
            A, K, W = plan.predictor[i]
            x = _combine(A, K, W, x, history)
        elif plan.rho_predictor[i] >= 3:  # a flow start: guarded as the 3M's third-order steps
            count = plan.rho_predictor[i]
            x = guarded_step(x, t, i, ([t.lam[j] for j in range(i, i - count, -1)], [outputs[j] for j in range(
                i, i - count, -1)]), second_outputs=count - 1)  # second order: _step_in_rho(x, t, i, i, count - 1)
        else:  # a flow start: the steps whose points reach sigma = 1 (the first one: DDIM)
            x = _step_in_rho(x, t, i, i, plan.rho_predictor[i], outputs)
    return run.finish(x)


__all__ = ["sample_dpm_solver_v3"]
