"""Estimating a model's empirical model statistics (EMS) for DPM-Solver-v3 (Zheng et al. 2023, Eq. 5 and 11).

Coordinates: everything is computed in VE coordinates, x~ = x0 + sigma~ z, lambda = -log sigma~.  Eps models use
the host's x and sigma as they are; flow models (x = (1 - sigma) x0 + sigma z) use sigma~ = sigma / (1 - sigma),
x~ = x / (1 - sigma), so D~(x~, sigma~) = D((1 - sigma) x~, sigma) with sigma = sigma~ / (1 + sigma~).

The one-pass estimator (docs/dpm_solver_v3.md section 3.1).  At each of the N + 1 grid nodes (uniform in lambda,
index 0 the noisiest) and for each sample x0_k, with Gaussian noise z and a Rademacher probe v:

    x = x0 + sigma~ z,   D = D~(x, sigma~),
    u = v * (dD/dx) v                      Hutchinson: E[u] = diag of the Jacobian, l = 1 - E[u]
    D' = dD/dlambda along (dx, dlambda) = (D - x, 1)   one JVP of (x, lambda) -> D~(x, e^-lambda)

and float64 moments are accumulated per statistic element with Chan's pairwise updates: the means of u, x, D, D'
and the centred co-moments C_xx, C_xD, C_xD', C_DD, C_DD'.  Afterwards, with a = 1 - l and m = dl/dlambda (central
differences, then a moving average of +-``smooth`` nodes, section 3.3),

    f = a x - D,   f' = -(m + a) x + a D - D'
    Var f = a^2 C_xx - 2a C_xD + C_DD
    Cov(f, f') = -a(m + a) C_xx + (a^2 + m + a) C_xD - a C_xD' - a C_DD + C_DD'
    s = Cov(f, f') / Var f   (s = 0 where Var f is below a relative floor: constant f, e.g. a single Gaussian)
    b = E f' - s E f

which is the element-wise least-squares fit f' ~ s f + b of the paper (Eq. 11).

Where the x come from (``samples``): "diffused" is the paper's x = x0 + sigma~ z, the forward-diffused data q_lambda.
That is the distribution the sampler meets only when D is the exact denoiser of the x0 distribution.  A guided
model (CFG) is not: its probability-flow ODE carries noise to other marginals, and at guidance 7.5 on the
Gaussian-mixture test model EMS fitted on q_lambda have |s| up to ~30 in the mode-splitting region, first-order v3
loses to DDIM by 3-5x and the corrector diverges.  "trajectory" (not in the paper) takes the x at each node from the
model's own ODE: every sample starts at x0 + sigma~_max z and is carried node to node by DPM-Solver++(2M) with
``substeps`` steps per grid cell, so the statistics describe the states the sampler actually visits (there: |s| < 6,
v3 8-40x below DPM-Solver++(2M) at 5-20 NFE with the corrector on).  For an exact denoiser both give the same
statistics.  Reductions ("per_channel",
"scalar") pool the observations of all elements of a channel (or of the latent) into the same moments, so l is the
pooled mean and s, b the pooled least-squares fit about the pooled means (section 3.4).

Monte-Carlo standard errors: the K samples are split into ``error_groups`` contiguous groups whose moments are kept
apart; l, s, b are recomputed with each group left out and the jackknife variance
(G - 1)/G * sum_g (theta_(-g) - mean theta_(-g))^2 gives the standard errors in ``EMS.standard_errors`` ("l", "s",
"b").  The jackknife propagates the noise of l through m = dl/dlambda into s and b.

Cost in model evaluations (one "row" is one sample through the model):
    forward AD:          (N + 1) * K * (n_probes + 1) JVP rows  (a JVP row costs about 2-3 forward rows)
    finite differences:  (N + 1) * K * (3 + 2 * n_probes) forward rows (central)
                         (N + 1) * K * (2 + n_probes) forward rows (one-sided)
plus 10 forward rows for the quantised-timestep check, plus N * K * substeps forward rows with
``samples="trajectory"``, plus the tuning (``tune=True``, ``stats.tuning``): at most as many rows as all of these.
N = 100, K = 32 and forward AD is 6,464 JVP rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time

import torch

from ..samplers.common import NonFiniteError
from ..samplers.schedule import check_model_kind
from . import tuning
from .ems import EMS
from .settings import (CHECK_NFES, CHECK_STEPS_FACTOR, ESTIMATOR_VERSION, JVP_BACKENDS, MAX_CHECK_SAMPLES,
                       REDUCTIONS, SAMPLE_SOURCES, check_rows_per_sample, least_N)

logger = logging.getLogger("dpm_solver_nodes")

DEFAULT_N = 100
DEFAULT_K = 32  # bench/results_ems_tuning.md: the tuned fits' errors barely move between K = 16 and 64
DEFAULT_BATCH_SIZE = 8
DEFAULT_SMOOTH = 5
DEFAULT_ERROR_GROUPS = 8
RELATIVE_VARIANCE_FLOOR = 1e-10
MAX_MOMENT_BYTES = 2 ** 31  # float64 moments kept on the CPU across all error groups

# moments kept per (group, node, statistic element)
MEAN_NAMES = ("u", "x", "D", "Ddot")
COMOMENT_PAIRS = (("x", "x"), ("x", "D"), ("x", "Ddot"), ("D", "D"), ("D", "Ddot"))


class EstimationInterrupted(RuntimeError):
    """Raised when ``should_stop()`` returns True; ``.state`` (an ``EstimationState``) resumes the run."""

    def __init__(self, state):
        super().__init__(f"EMS estimation interrupted at node {state.node} of {state.settings['N'] + 1}, "
                         f"{state.samples_done} samples into it; pass exception.state as resume_state to continue")
        self.state = state


@dataclasses.dataclass
class EstimationState:
    """Partial sums of an interrupted (or finished) ``estimate_ems`` run.

    Any exception raised inside the estimation loop (``EstimationInterrupted``, an exception from ``progress`` or
    ``should_stop``, an out-of-memory error) carries the state as ``exception.estimation_state`` (and
    ``EstimationInterrupted.state``).  Pass it back as ``resume_state`` with the same model, x0 and settings to
    continue; ``batch_size`` and the JVP back-end may change.  Picklable (``torch.save``).

    Fields: ``settings`` (what the run depends on; checked on resume), ``node`` (the node in progress),
    ``samples_done`` (samples of that node already accumulated), ``count`` (G, N + 1) observation counts,
    ``means`` (4, G, N + 1, P), ``comoments`` (5, G, N + 1, P) float64 on the CPU, ``backend`` (the JVP back-end
    in use), ``forward_rows`` / ``jvp_rows`` (model evaluations so far), ``seconds`` (time spent), ``trajectory``
    (``samples="trajectory"``: each sample's state, at node ``node + 1`` for the first ``samples_done`` samples and
    at ``node`` for the rest; on the CPU).
    """

    settings: dict
    node: int
    samples_done: int
    count: torch.Tensor
    means: torch.Tensor
    comoments: torch.Tensor
    backend: str
    forward_rows: int = 0
    jvp_rows: int = 0
    seconds: float = 0.0
    trajectory: torch.Tensor = None

    @property
    def finished(self) -> bool:
        return self.node > self.settings["N"]


def _stat_layout(latent_shape, reduction):
    """(stat_shape, P, r): the statistics' shape, elements per sample in it, observations pooled into each."""
    channels, rest = latent_shape[0], math.prod(latent_shape[1:])
    if reduction == "per_element":
        return tuple(latent_shape), channels * rest, 1
    if reduction == "per_channel":
        return (channels,) + (1,) * (len(latent_shape) - 1), channels, rest
    return (1,) * len(latent_shape), 1, channels * rest


def _x0_digest(x0) -> str:
    flat = x0.detach().reshape(-1)
    head = flat[:4096].to("cpu", torch.float64)
    digest = hashlib.sha256(repr(tuple(x0.shape)).encode())
    digest.update(head.numpy().tobytes())
    digest.update(repr(float(flat.to(torch.float64).sum())).encode())
    return digest.hexdigest()[:16]


def _noise(settings, node, shape, dtype, device):
    """z and the Rademacher probes v (n_probes, K, ...) of one node; the same at every node with ``crn``."""
    index = -1 if settings["crn"] else node
    generator = torch.Generator().manual_seed((settings["seed"] * 1_000_003 + index + 1) % (2 ** 63))
    noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(shape, generator=generator, dtype=noise_dtype)
    v = torch.randint(0, 2, (settings["n_probes"],) + tuple(shape), generator=generator, dtype=torch.int8)
    return z.to(device, dtype), (v.to(noise_dtype) * 2 - 1).to(device, dtype)


class _VEDenoiser:
    """(x~, lambda) -> D~(x~, e^-lambda) in VE coordinates for the host's ``model(x, sigma, **extra_args)``."""

    def __init__(self, model, model_kind, extra_args):
        self.model, self.model_kind, self.extra_args = model, model_kind, extra_args or {}

    def __call__(self, x, lam):
        view = (-1,) + (1,) * (x.ndim - 1)
        if self.model_kind == "flow":
            # sigma = sigma~ / (1 + sigma~) = sigmoid(-lambda) and 1 - sigma = sigmoid(lambda)
            return self.model(x * torch.sigmoid(lam).reshape(view), torch.sigmoid(-lam), **self.extra_args)
        return self.model(x, torch.exp(-lam), **self.extra_args)


def _forward_jvp(function, primals, tangents):
    # ComfyUI runs nodes under inference_mode; forward AD needs it off, and no_grad (not enable_grad) so inference
    # tensors are never saved for backward (docs/hosts.md 1.6).
    with torch.inference_mode(False), torch.no_grad():
        primals = tuple(p.clone() for p in primals)
        tangents = tuple(t.clone() for t in tangents)
        return torch.func.jvp(function, primals, tangents)


def _derivatives_forward(denoise, x, lam, probes):
    """D, [(dD/dx) v for v in probes], D' with forward-mode AD: n_probes + 1 JVPs."""
    zero = torch.zeros_like(lam)
    denoised, jv_first = _forward_jvp(denoise, (x, lam), (probes[0], zero))
    jvs = [jv_first] + [_forward_jvp(denoise, (x, lam), (v, zero))[1] for v in probes[1:]]
    _, ddot = _forward_jvp(denoise, (x, lam), (denoised - x, torch.ones_like(lam)))
    if all(not bool(t.any()) for t in jvs) and not bool(ddot.any()):
        raise RuntimeError("forward AD returned identically zero tangents (the model detaches its input)")
    return denoised, jvs, ddot


def _derivatives_finite_difference(denoise, x, lam, probes, x_step, step):
    """The same by central differences: J v ~ [D(x + hv) - D(x - hv)] / 2h with h = ``x_step``, and
    D' ~ [D(x + h(D - x), lambda + h) - D(x - h(D - x), lambda - h)] / 2h with h = ``step`` (in lambda)."""
    # one model call per perturbation, so no call exceeds the chunk's batch size
    denoised = denoise(x, lam)
    jvs = [(denoise(x + x_step * v, lam) - denoise(x - x_step * v, lam)) / (2 * x_step) for v in probes]
    direction = denoised - x
    ddot = (denoise(x + step * direction, lam + step) - denoise(x - step * direction, lam - step)) / (2 * step)
    return denoised, jvs, ddot


def _derivatives_one_sided(denoise, x, lam, probes, x_step, step):
    """The same by one-sided differences from D itself: J v ~ [D(x + hv) - D(x)] / h and
    D' ~ [D(x + h(D - x), lambda + h) - D(x)] / h: n_probes + 2 forward rows per sample instead of the central
    differences' 2 n_probes + 3, with an O(h) truncation error (relative ~1e-3 at the default fd_step; float32
    rounding adds ~1e-4).  Only for models that compute in float32 or float64: in float16 the difference is noise."""
    denoised = denoise(x, lam)
    jvs = [(denoise(x + x_step * v, lam) - denoised) / x_step for v in probes]
    ddot = (denoise(x + step * (denoised - x), lam + step) - denoised) / step
    return denoised, jvs, ddot


def _segments(node, done, K, N, batch_size, across_nodes):
    """The next chunk as (node, lo, hi) sample ranges: up to ``batch_size`` samples from ``done`` on at ``node``,
    continued at the following nodes when ``across_nodes`` (the model's rows are independent)."""
    segments, room = [], batch_size
    while room > 0 and node <= N:
        hi = min(K, done + room)
        segments.append((node, done, hi))
        room -= hi - done
        if hi < K or not across_nodes:
            break
        node, done = node + 1, 0
    return segments


def _advance(denoise, x, lam_from, lam_to, substeps):
    """Carry x along the model's probability-flow ODE from lambda_from to lambda_to (VE coordinates) with
    DPM-Solver++(2M) (multistep, the first substep first order; DPM-Solver++ Eq. 9 with one history point)."""
    lams = torch.linspace(lam_from, lam_to, substeps + 1, dtype=torch.float64).tolist()
    previous = None
    for i in range(substeps):
        lam = torch.full((x.shape[0],), lams[i], dtype=x.dtype, device=x.device)
        denoised = denoise(x, lam)
        if not torch.isfinite(denoised).all():
            raise NonFiniteError(f"the model returned NaN or inf at sigma~ = {math.exp(-lams[i]):.6g} while "
                                 "following the ODE trajectories for the EMS")
        h = lams[i + 1] - lams[i]
        if previous is None:
            blend = denoised
        else:
            blend = denoised + (denoised - previous) * (h / (2 * (lams[i] - lams[i - 1])))
        x = x * math.exp(-h) + blend * (-math.expm1(-h))
        previous = denoised
    return x


def _merge(count, means, comoments, n_new, means_new, comoments_new):
    """Chan et al.'s pairwise update of (count, means, centred co-moments) with a batch's own moments."""
    total = count + n_new
    weight = torch.where(total > 0, n_new / total.clamp(min=1), torch.zeros_like(total))
    delta = means_new - means
    index = {name: i for i, name in enumerate(MEAN_NAMES)}
    cross = (count * n_new / total.clamp(min=1))
    updated = comoments + comoments_new
    for k, (p, q) in enumerate(COMOMENT_PAIRS):
        updated[k] = updated[k] + delta[index[p]] * delta[index[q]] * cross
    return total, means + delta * weight, updated


def _batch_moments(observations):
    """observations: dict name -> (n, P, r) float64 -> count, means (4, P), centred co-moments (5, P)."""
    n = observations["x"].shape[0] * observations["x"].shape[2]
    means = torch.stack([observations[name].mean(dim=(0, 2)) for name in MEAN_NAMES])
    centred = {name: observations[name] - means[i][None, :, None] for i, name in enumerate(MEAN_NAMES)}
    comoments = torch.stack([(centred[p] * centred[q]).sum(dim=(0, 2)) for p, q in COMOMENT_PAIRS])
    return n, means, comoments


def _accumulate(state, node, groups, observations):
    """Merge one chunk (samples with group indices ``groups``) into the state's moments at ``node``."""
    for group in torch.unique(groups).tolist():
        rows = groups == group
        n, means, comoments = _batch_moments({k: v[rows] for k, v in observations.items()})
        count = state.count[group, node]
        total, new_means, new_comoments = _merge(
            count, state.means[:, group, node], state.comoments[:, group, node], float(n), means, comoments)
        state.count[group, node] = total
        state.means[:, group, node] = new_means
        state.comoments[:, group, node] = new_comoments


def _pool_groups(count, means, comoments, keep):
    """Moments of the union of the groups selected by the boolean mask ``keep`` (G,)."""
    c = count[keep]                                        # (g, nodes)
    total = c.sum(0)                                       # (nodes,)
    weights = (c / total.clamp(min=1e-300))[None, :, :, None]
    pooled = (means[:, keep] * weights).sum(1)             # (4, nodes, P)
    delta = means[:, keep] - pooled[:, None]               # (4, g, nodes, P)
    index = {name: i for i, name in enumerate(MEAN_NAMES)}
    spread = torch.stack([(delta[index[p]] * delta[index[q]] * c[:, :, None]).sum(0) for p, q in COMOMENT_PAIRS])
    return total, pooled, comoments[:, keep].sum(1) + spread


def smoothed_derivative(values, lambdas, smooth=DEFAULT_SMOOTH):
    """d values / d lambda along dim 0: central differences (one-sided at the ends), then a moving average over
    +-``smooth`` nodes truncated at the edges (the official script's ``smooth=5``; docs section 3.3)."""
    derivative = torch.gradient(values, spacing=(lambdas,), dim=0, edge_order=1)[0]
    if smooth <= 0:
        return derivative
    counts = _window_sum(torch.ones(values.shape[0], dtype=values.dtype), smooth)
    return _window_sum(derivative, smooth) / counts.reshape((-1,) + (1,) * (values.ndim - 1))


def _window_sum(values, half_width):
    """Sum over +-half_width rows along dim 0, truncated at the edges."""
    rows = values.shape[0]
    padded = torch.cat([torch.zeros_like(values[:1]), values.cumsum(0)])
    lo = torch.clamp(torch.arange(rows) - half_width, min=0)
    hi = torch.clamp(torch.arange(rows) + half_width + 1, max=rows)
    return padded[hi] - padded[lo]


def fit_terms(count, means, comoments, lambdas, smooth=DEFAULT_SMOOTH):
    """Per node: l, Var f, Cov(f, f'), E f, E f' and the size a^2|C_xx| + |C_DD| of Var f's terms (the variance
    floor's scale), from the pooled moments (docs section 3.1, one-pass formulas; module docstring)."""
    mean = dict(zip(MEAN_NAMES, means))
    cov = {pair: comoments[k] / count[:, None].clamp(min=1) for k, pair in enumerate(COMOMENT_PAIRS)}
    cxx, cxd, cxdd, cdd, cddd = (cov[pair] for pair in COMOMENT_PAIRS)
    l = 1 - mean["u"]
    m = smoothed_derivative(l, lambdas, smooth)
    a = 1 - l
    var_f = a * a * cxx - 2 * a * cxd + cdd
    cov_ff = -a * (m + a) * cxx + (a * a + m + a) * cxd - a * cxdd - a * cdd + cddd
    mean_f = a * mean["x"] - mean["D"]
    mean_df = -(m + a) * mean["x"] + a * mean["D"] - mean["Ddot"]
    return l, var_f, cov_ff, mean_f, mean_df, a * a * cxx.abs() + cdd.abs()


def statistics_from_moments(count, means, comoments, lambdas, smooth=DEFAULT_SMOOTH,
                            relative_floor=RELATIVE_VARIANCE_FLOOR, sb_window=0.0, s_ridge=0.0):
    """l, s, b (nodes, P) from pooled moments (docs section 3.1, one-pass formulas).

    sb_window > 0 fits s and b over the nodes within +-sb_window in lambda instead of node by node:
    s = sum Cov(f, f') / sum Var f (one slope for the window's within-node scatter) and b = mean E f' - s mean E f
    (window means).  On a trained model s and b can change by O(1) between neighbouring nodes at high noise, the
    same in independent sample groups (the network's time dependence, not Monte-Carlo noise), and a solver step
    of 0.5-1 in lambda should not depend on where the grid samples that; see bench/results_v3_study.md.
    The grid must be uniform in lambda (as ``estimate_ems`` builds it)."""
    l, var_f, cov_ff, mean_f, mean_df, scale = fit_terms(count, means, comoments, lambdas, smooth)
    floor = relative_floor * scale
    half_width = int(round(sb_window / float(lambdas[1] - lambdas[0]))) if sb_window > 0 and len(lambdas) > 1 else 0
    nodes = torch.ones_like(mean_f)
    if half_width > 0:
        nodes = _window_sum(nodes, half_width)
        var_f, cov_ff, floor = (_window_sum(t, half_width) for t in (var_f, cov_ff, floor))
        mean_f, mean_df = _window_sum(mean_f, half_width) / nodes, _window_sum(mean_df, half_width) / nodes
    if s_ridge > 0:
        # ridge on the slope: s = Cov / (Var f + s_ridge (Var f + E[f]^2)) shrinks s towards 0 where f barely
        # varies relative to its size, where the least-squares slope is ill-conditioned but enters the solver's
        # weights exponentially (e^{-int s}).
        var_f = var_f + s_ridge * (var_f + nodes * mean_f ** 2)
    s = torch.where(var_f > floor, cov_ff / torch.where(var_f > floor, var_f, torch.ones_like(var_f)),
                    torch.zeros_like(var_f))
    b = mean_df - s * mean_f
    return tuple(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (l, s, b))


def _finish(state, lambdas, stat_shape, smooth, sb_window=0.0, s_ridge=0.0):
    groups = state.count.shape[0]
    everything = torch.ones(groups, dtype=torch.bool)
    stats = statistics_from_moments(*_pool_groups(state.count, state.means, state.comoments, everything), lambdas,
                                    smooth, sb_window=sb_window, s_ridge=s_ridge)
    errors = None
    if groups >= 2:
        replicas = []
        for g in range(groups):
            keep = everything.clone()
            keep[g] = False
            replicas.append(statistics_from_moments(
                *_pool_groups(state.count, state.means, state.comoments, keep), lambdas, smooth,
                sb_window=sb_window, s_ridge=s_ridge))
        errors = {}
        for i, name in enumerate(("l", "s", "b")):
            values = torch.stack([r[i] for r in replicas])
            spread = ((values - values.mean(0)) ** 2).sum(0) * (groups - 1) / groups
            errors[name] = spread.sqrt().reshape((-1,) + stat_shape)
    return tuple(t.reshape((-1,) + stat_shape) for t in stats), errors


def _check_quantised_timestep(denoise, x0, z, lambdas):
    """Raise ValueError when the model's output does not change between sigma and sigma * (1 + 1e-3) at most of
    five grid nodes: a host that rounds sigma to an integer timestep makes dD/dlambda = 0 (docs section 7)."""
    nodes = sorted({round(i * (len(lambdas) - 1) / 4) for i in range(5)})
    identical = []
    for j in nodes:
        lam = lambdas[j].to(x0.dtype).reshape(1).to(x0.device)
        x = x0[:1] + torch.exp(-lam) * z[:1]
        pair = (denoise(x, lam), denoise(x, lam - math.log1p(1e-3)))
        if not all(torch.isfinite(p).all() for p in pair):
            raise NonFiniteError(f"the model returned NaN or inf at sigma~ = {math.exp(-float(lambdas[j])):.6g} "
                                 "during the EMS timestep check")
        identical.append(torch.equal(pair[0], pair[1]))
    if sum(identical) * 2 > len(nodes):
        raise ValueError(
            "the model's output is bitwise identical at sigma and sigma * (1 + 1e-3) at "
            f"{sum(identical)} of {len(nodes)} test points: the host maps sigma to a quantised (integer) timestep, "
            "so dD/dlambda = 0 and the EMS would be wrong.  Pass a model with a continuous sigma -> timestep map "
            "(ComfyUI: patch model_sampling to interpolate the index in log sigma; A1111: sigma_to_t without "
            "rounding)")
    return 2 * len(nodes)


def _validate(x0, sigma_min, sigma_max, model_kind, N, K, reduction, jvp, fd_step, n_probes, smooth, batch_size,
              error_groups, samples, substeps):
    check_model_kind(model_kind)
    if samples not in SAMPLE_SOURCES:
        raise ValueError(f"samples must be one of {SAMPLE_SOURCES}, got {samples!r}")
    if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be an integer >= 1, got {substeps!r}")
    if not isinstance(x0, torch.Tensor) or x0.ndim != 4:
        raise ValueError(f"x0 must be a tensor of clean latents shaped (K, C, H, W), got "
                         f"{getattr(x0, 'shape', type(x0))}")
    if not x0.is_floating_point() or not torch.isfinite(x0).all():
        raise ValueError("x0 must be a floating-point tensor without NaN or inf")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if jvp not in JVP_BACKENDS:
        raise ValueError(f"jvp must be one of {JVP_BACKENDS}, got {jvp!r}")
    for name, value in (("N", N), ("n_probes", n_probes), ("batch_size", batch_size),
                        ("error_groups", error_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= x0.shape[0]:
        raise ValueError(f"K must be an integer between 2 and len(x0) = {x0.shape[0]}, got {K!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be an integer >= 0, got {smooth!r}")
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 0.1):
        raise ValueError(f"fd_step must lie in (0, 0.1), got {fd_step!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")
    if model_kind == "flow" and sigma_max >= 1:
        raise ValueError(f"flow models need sigma_max < 1 (sigma = 1 is lambda = -inf), got {sigma_max!r}; "
                         "cap it, e.g. at 1 - 1e-3")




def _rows_per_sample(jvp, n_probes, samples, substeps):
    """Model rows per sample and grid node as the estimator counts them (forward_rows + jvp_rows): forward AD (and
    "auto", which starts there) n_probes + 1 JVP rows, one-sided differences 2 + n_probes, central 3 + 2 n_probes;
    plus the trajectory's substeps."""
    per_node = {"finite_difference": 3 + 2 * n_probes, "one_sided_difference": 2 + n_probes}.get(jvp, n_probes + 1)
    return per_node + (substeps if samples == "trajectory" else 0)


def _check_samples(rows, K, nfes):
    """Samples of the v3-vs-DPM-Solver++(2M) check within ``rows`` (as ``EMSSettings.check_plan``: at most 16 and
    K, each costing its reference's steps + a v3 and a 2M run per NFE); 0 where fewer than 2 fit."""
    per_sample = check_rows_per_sample(CHECK_STEPS_FACTOR * max(nfes), nfes)
    samples = min(MAX_CHECK_SAMPLES, K, int(rows) // per_sample)
    return samples if samples >= 2 else 0


def _tuning_minimum(nfes, guided):
    """(rows of the cheapest tuning: 2 samples per set, the family's two ends; rows of the cheapest check)."""
    pack = 1 if guided else len(tuning.PACK_SOLVERS)
    return (tuning.tuning_rows(tuning.MIN_SAMPLES, tuple(nfes), len(tuning.FAMILY_ENDS), pack=pack),
            2 * check_rows_per_sample(CHECK_STEPS_FACTOR * max(nfes), nfes))


def _budget_message(N, K, rows, per_row, nfes, guided):
    tuning_needed, check_needed = _tuning_minimum(nfes, guided)
    return (f"estimate_ems(tune=True): N = {N}, K = {K} give the estimation {rows} model rows, too few both to tune "
            f"the fit ({tuning_needed} rows: N >= {least_N(tuning_needed, K, per_row)} at K = {K}) "
            f"and to check v3 against DPM-Solver++(2M) ({check_needed} rows: N >= "
            f"{least_N(check_needed, K, per_row)} at K = {K}); unchecked EMS can make v3 far worse than "
            "DPM-Solver++ (issue 12).  Raise N or K, or pass tune=False for the raw paper fit without any check")

def estimate_ems(model, x0, sigma_min, sigma_max, *, model_kind="eps", N=DEFAULT_N, K=None,
                 reduction="per_channel", jvp="auto", fd_step=1e-3, n_probes=1, smooth=DEFAULT_SMOOTH, crn=True,
                 batch_size=DEFAULT_BATCH_SIZE, seed=0, extra_args=None, progress=None, should_stop=None,
                 resume_state=None, metadata=None, error_groups=DEFAULT_ERROR_GROUPS, samples="diffused",
                 substeps=4, sb_window=0.0, s_ridge=0.0, tune=True,
                 tune_nfes=tuning.TUNE_NFES, return_state=False, rows_independent=False) -> EMS:
    """Estimate the EMS l, s, b of ``model`` on N + 1 nodes uniform in lambda (see the module docstring).

    Args:
      model: the host's denoiser ``model(x, sigma_batch, **extra_args) -> x0`` (CFG applied by the host, with a
        continuous sigma -> timestep map).  Run it in float32 or float64: fp16 JVPs are noise (docs section 7).
      x0: (>= K, C, H, W) clean latents on the model's device: the model's own samples at the target cfg
        (``generate_x0``) or encoded data, never pixels of a latent model.  Only the first K are used.
      sigma_min, sigma_max: the host sigma range (flow: sigma_max < 1); the grid covers it in VE lambda.
      model_kind: "eps" (x = x0 + sigma z) or "flow" (x = (1 - sigma) x0 + sigma z).
      N: grid cells (N + 1 nodes).  K: samples per node (default min(len(x0), 32)).
      tune: choose the fit of s, b (window, l' smoothing, grid) and per NFE the corrector or a DPM-Solver++ solver
        by measured error on the model's own reference trajectories (``stats.tuning``; default).  The returned EMS
        carry the decisions (``sample_dpm_solver_v3`` applies them) and metadata ``tuning``; the tuning costs at
        most the estimation's model rows.  Where those are too few to tune, the v3-vs-DPM-Solver++(2M) check
        (``check_v3_against_dpmpp_2m``, at most 16 samples and the same rows) runs instead, logged, and its
        decisions are stored; where even the check does not fit, ValueError naming the minimum N at that K (before
        any model call): unchecked EMS from a small estimate ran v3 at up to 1.5x DPM-Solver++(2M)'s error on
        the embedded models (bench/results_unchecked_ems.md).  False: the fit given by ``smooth``, ``sb_window``, ``s_ridge`` (the
        paper's per-node fit with the defaults), unchecked: the explicit opt-out.
      tune_nfes: the NFEs the tuning judges (5, 6, 8, 10, 15, 20).
      return_state: return (EMS, EstimationState) without tuning: the fit given by ``smooth``, ``sb_window``,
        ``s_ridge`` and the finished moments, for a caller that runs ``stats.tuning.tune`` itself (``stats.job``:
        its own progress and interrupt during the tuning).
      reduction: "per_channel" (default; resolution-free, lowest variance), "per_element" (C, H, W) or "scalar".
      jvp: "forward" (torch.func.jvp), "finite_difference" (central differences), "one_sided_difference"
        (differences from D itself: fewer model rows, O(fd_step) truncation error; float32/float64 models only) or
        "auto" (forward AD, falling back to central differences - logged once - when the model raises under forward
        AD, e.g. a flash-attention kernel or an autograd.Function without jvp).
      fd_step: finite-difference step: lambda moves by fd_step and x by fd_step * sqrt(sigma~^2 + Var x0) * v.
      n_probes: Rademacher probes per sample for the Jacobian diagonal.
      smooth: half-width in nodes of the moving average applied to dl/dlambda (0: none).
      crn: common random numbers - reuse each sample's z and v at every node, so the Monte-Carlo error is smooth in
        lambda (errors in l, s, b then integrate to less; section 3.2).
      batch_size: samples per model call (forward AD carries a tangent of the same size).  Memory only; results
        do not depend on it beyond rounding.  The model must accept any batch size up to it (hosts broadcast
        their conditioning to the batch, as ComfyUI's model wrappers do).
      rows_independent: the model treats every row on its own (per-row sigma; no conditioning on the row's
        position): a call may then hold samples of several grid nodes, so it carries ``batch_size`` samples also
        where K is smaller (fewer, larger calls).  Only with ``samples="diffused"``.
      seed: seeds z and v (results are reproducible and independent of batch_size and interruptions).
      extra_args: passed to every model call.
      progress: ``progress(done, total)`` after each chunk, counted in samples: total = (N + 1) * K.  An exception
        it raises stops the run (see ``EstimationState``).
      should_stop: ``should_stop()`` before each chunk; returning True raises ``EstimationInterrupted``, raising
        propagates.  Either way the exception carries the partial sums as ``.estimation_state``.
      resume_state: an ``EstimationState`` from an interrupted call with the same model, x0 and settings.
      metadata: extra strings for the EMS (cfg, guidance, fingerprint, x0_source, ...).
      samples: "diffused" (the paper: x = x0 + sigma~ z) or "trajectory" (x from the model's own ODE started at
        x0 + sigma~_max z; recommended for guided models, see the module docstring).
      substeps: DPM-Solver++(2M) steps per grid cell for ``samples="trajectory"``.
      sb_window: fit s and b over +-sb_window in lambda instead of per node (``statistics_from_moments``); 0 (the
        default) is the paper's per-node fit.  ``EMSSettings`` (the EMS job) uses 0.5 with N = 200: on the embedded
        trained model that made v3 beat DPM-Solver++(2M) at 5-20 NFE where the per-node fit lost at 10-20 NFE
        (bench/results_v3_study.md).  Only post-processing: it does not change the cost or the resume state.
      s_ridge: ridge on the slope, s = Cov(f, f') / (Var f + s_ridge (Var f + E[f]^2)) (0, the default, is the
        paper's least squares).  Where f barely varies relative to its size (high noise on multi-modal data) the
        slope is ill-conditioned, yet it enters the solver as e^{-int s}: with cheap EMS (N = 10, K = 8) the plain fit
        gave s ~ -800 and v3 errors 1e3-1e10 times those without EMS; 0.01 (``EMSSettings``) kept s O(1)
        there and changed v3's errors on the embedded trained model by at most 0.01 of the ratio to DPM-Solver++(2M)
        (tests/test_estimate.py::test_slope_ridge_keeps_v3_stable_where_f_barely_varies).
      error_groups: sample groups for the jackknife standard errors (1: none).  Memory for the moments is
        9 * error_groups * (N + 1) * P float64 numbers, P = C*H*W (per_element), C or 1; fewer groups are used
        (logged) where that exceeds 2 GiB (SD-1.x 64x64 per_element at N = 100: 119 MB per group).

    Returns an ``EMS`` with ``standard_errors`` {"l", "s", "b"} and metadata describing the run, including the cost
    (``forward_rows``, ``jvp_rows``, ``seconds``).
    """
    K = min(x0.shape[0], DEFAULT_K) if K is None and isinstance(x0, torch.Tensor) else K
    if isinstance(sb_window, bool) or not isinstance(sb_window, (int, float)) or not 0 <= sb_window < math.inf:
        raise ValueError(f"sb_window must be a finite number >= 0 (lambda units), got {sb_window!r}")
    _validate(x0, sigma_min, sigma_max, model_kind, N, K, reduction, jvp, fd_step, n_probes, smooth, batch_size,
              error_groups, samples, substeps)
    latent_shape = tuple(x0.shape[1:])
    stat_shape, elements, pooled = _stat_layout(latent_shape, reduction)
    x0 = x0[:K]
    groups = min(error_groups, K)
    moment_bytes = 9 * (N + 1) * elements * 8
    if groups > 1 and groups * moment_bytes > MAX_MOMENT_BYTES:
        fitting = max(1, MAX_MOMENT_BYTES // moment_bytes)
        logger.warning("DPM-Solver-v3 EMS: %d error groups of %s moments would take %.2f GB; using %d (standard errors "
                       "%s)", groups, reduction, groups * moment_bytes / 1e9, fitting,
                       "coarser" if fitting > 1 else "off")
        groups = fitting
    guided = tuning.is_guided(metadata)
    per_row = _rows_per_sample(jvp, n_probes, samples, substeps)
    if tune and not return_state:
        forecast = (N + 1) * K * per_row + 10
        if not tuning.tuning_plan(forecast, tuple(tune_nfes), guided=guided)[0] and \
                not _check_samples(forecast, K, tune_nfes):
            raise ValueError(_budget_message(N, K, forecast, per_row, tune_nfes, guided))
    settings = {"N": N, "K": K, "reduction": reduction, "sigma_min": float(sigma_min), "sigma_max": float(sigma_max),
                "model_kind": model_kind, "n_probes": n_probes, "crn": bool(crn), "seed": int(seed),
                "error_groups": groups, "latent_shape": latent_shape, "x0": _x0_digest(x0), "samples": samples,
                "substeps": substeps if samples == "trajectory" else 0}
    state = resume_state
    if state is None:
        state = EstimationState(
            settings=settings, node=0, samples_done=0,
            count=torch.zeros(groups, N + 1, dtype=torch.float64),
            means=torch.zeros(len(MEAN_NAMES), groups, N + 1, elements, dtype=torch.float64),
            comoments=torch.zeros(len(COMOMENT_PAIRS), groups, N + 1, elements, dtype=torch.float64),
            backend="forward" if jvp in ("auto", "forward") else jvp)
    else:
        differing = sorted(k for k in settings if state.settings.get(k) != settings[k])
        if differing:
            raise ValueError("resume_state belongs to another estimation run; differing settings: " + ", ".join(
                f"{k} ({state.settings.get(k)!r} != {settings[k]!r})" for k in differing))
        if jvp != "auto":
            state.backend = jvp

    ve_max = sigma_max / (1 - sigma_max) if model_kind == "flow" else sigma_max
    ve_min = sigma_min / (1 - sigma_min) if model_kind == "flow" else sigma_min
    lambdas = torch.linspace(-math.log(ve_max), -math.log(ve_min), N + 1, dtype=torch.float64)
    denoise = _VEDenoiser(model, model_kind, extra_args)
    dtype, device = x0.dtype, x0.device
    data_variance = float(x0.to(torch.float64).var())
    sample_groups = torch.arange(K) * groups // K
    total = (N + 1) * K
    started = time.perf_counter()

    try:
        if not state.finished:
            z, probes = _noise(settings, state.node, x0.shape, dtype, device)
            state.forward_rows += _check_quantised_timestep(denoise, x0, z, lambdas)
            if samples == "trajectory" and state.trajectory is None:
                start = _noise(settings, 0, x0.shape, dtype, device)[0] * math.exp(-float(lambdas[0]))
                state.trajectory = (x0 + start).to("cpu")
        noises = {}

        def noise_at(node):
            index = -1 if crn else node
            if index not in noises:
                noises.clear()  # one node's (or, with crn, every node's) z and probes at a time
                noises[index] = _noise(settings, node, x0.shape, dtype, device)
            return noises[index]

        across_nodes = rows_independent and samples == "diffused"
        while not state.finished:
            if should_stop is not None and should_stop():
                raise EstimationInterrupted(state)
            segments = _segments(state.node, state.samples_done, K, N, batch_size, across_nodes)
            xs, lams, steps, parts = [], [], [], [[] for _ in range(n_probes)]
            for node, lo, hi in segments:
                z, probes = noise_at(node)
                lam_value = float(lambdas[node])
                sigma_ve = math.exp(-lam_value)
                if samples == "trajectory":
                    xs.append(state.trajectory[lo:hi].to(device, dtype))
                else:
                    xs.append(x0[lo:hi] + sigma_ve * z[lo:hi])
                lams.append(torch.full((hi - lo,), lam_value, dtype=dtype, device=device))
                steps.append(torch.full((hi - lo,), fd_step * math.sqrt(sigma_ve ** 2 + data_variance), dtype=dtype,
                                        device=device))
                for part, v in zip(parts, probes):
                    part.append(v[lo:hi])
            x, lam = torch.cat(xs), torch.cat(lams)
            rows = x.shape[0]
            x_step = torch.cat(steps).reshape((-1,) + (1,) * (x.ndim - 1))
            chunk_probes = [torch.cat(part) for part in parts]
            denoised, jvs, ddot = None, None, None
            if state.backend == "forward":
                try:
                    denoised, jvs, ddot = _derivatives_forward(denoise, x, lam, chunk_probes)
                    state.jvp_rows += (n_probes + 1) * rows
                except Exception as error:  # noqa: BLE001 - any failure of forward AD means: use FD
                    if jvp == "forward":
                        raise
                    logger.warning("DPM-Solver-v3 EMS: forward-mode AD failed (%s: %s); using central finite "
                                   "differences (fd_step=%g) instead", type(error).__name__, error, fd_step)
                    state.backend = "finite_difference"
            if denoised is None and state.backend == "one_sided_difference":
                denoised, jvs, ddot = _derivatives_one_sided(denoise, x, lam, chunk_probes, x_step, fd_step)
                state.forward_rows += (2 + n_probes) * rows
            elif denoised is None:
                denoised, jvs, ddot = _derivatives_finite_difference(denoise, x, lam, chunk_probes, x_step, fd_step)
                state.forward_rows += (3 + 2 * n_probes) * rows
            for name, value in (("D", denoised), ("dD/dlambda", ddot)) + tuple(("J v", jv) for jv in jvs):
                if not torch.isfinite(value).all():
                    where = ", ".join(f"node {node} (sigma~ = {math.exp(-float(lambdas[node])):.6g}) samples "
                                      f"{lo}..{hi - 1}" for node, lo, hi in segments)
                    raise NonFiniteError(f"the model returned NaN or inf ({name}) at EMS {where}; run the model in "
                                         "float32 and check the sigma range")
            u = sum(v * jv for v, jv in zip(chunk_probes, jvs)) / n_probes
            observations = {name: value.detach().to("cpu", torch.float64).reshape(rows, elements, pooled)
                            for name, value in zip(MEAN_NAMES, (u, x, denoised, ddot))}
            offset = 0
            for node, lo, hi in segments:
                part = slice(offset, offset + hi - lo)
                offset += hi - lo
                if samples == "trajectory" and node < N:
                    following = _advance(denoise, x[part], float(lambdas[node]), float(lambdas[node + 1]), substeps)
                    state.forward_rows += substeps * (hi - lo)
                _accumulate(state, node, sample_groups[lo:hi], {k: v[part] for k, v in observations.items()})
                if samples == "trajectory" and node < N:
                    state.trajectory[lo:hi] = following.detach().to("cpu", state.trajectory.dtype)
                state.samples_done = hi
                if hi == K:
                    state.node, state.samples_done = node + 1, 0
            if progress is not None:
                progress(state.node * K + state.samples_done, total)
    except BaseException as error:
        state.seconds += time.perf_counter() - started
        try:
            error.estimation_state = state
        except Exception:  # noqa: BLE001 - exceptions without a __dict__
            pass
        raise
    state.seconds += time.perf_counter() - started

    rows = state.forward_rows + state.jvp_rows
    samples_per_set, fits, check_samples = 0, (), 0
    if tune and not return_state:
        samples_per_set, fits = tuning.tuning_plan(rows, tuple(tune_nfes), guided=guided)
        if not samples_per_set:
            check_samples = _check_samples(rows, K, tune_nfes)
            if not check_samples:  # the forecast before the estimation should have caught this
                raise ValueError(_budget_message(N, K, rows, per_row, tune_nfes, guided))
            logger.warning("DPM-Solver-v3 EMS: the estimation's %d model rows are too few to tune the fit (%d needed: "
                           "N >= %d at K = %d); running the v3-vs-DPM-Solver++(2M) check instead", rows,
                           _tuning_minimum(tune_nfes, guided)[0], least_N(_tuning_minimum(tune_nfes, guided)[0],
                                                                                  K, per_row), K)
    (l, s, b), errors = _finish(state, lambdas, stat_shape, smooth, sb_window, s_ridge)
    estimator = "forward_ad" if state.backend == "forward" else f"{state.backend}(h={fd_step:g})"
    info = {"model_kind": model_kind, "reduction": reduction, "latent_shape": "x".join(map(str, latent_shape)),
            "N": str(N), "K": str(K), "n_probes": str(n_probes), "smooth": str(smooth), "crn": str(bool(crn)),
            "seed": str(seed), "sigma_min": repr(float(sigma_min)), "sigma_max": repr(float(sigma_max)),
            "grid": "uniform_lambda", "estimator": estimator, "estimator_version": ESTIMATOR_VERSION,
            "error_groups": str(groups), "x0_source": "given", "samples": samples,
            "substeps": str(substeps if samples == "trajectory" else 0), "forward_rows": str(state.forward_rows),
            "jvp_rows": str(state.jvp_rows), "seconds": f"{state.seconds:.3f}", "model_dtype": str(dtype)}
    info["sb_window"] = f"{float(sb_window):g}"
    info["s_ridge"] = f"{float(s_ridge):g}"
    info.update({str(k): str(v) for k, v in (metadata or {}).items()})
    if samples_per_set:
        ems, _ = tuning.tune(model, state, lambdas, stat_shape, sigma_min, sigma_max, model_kind=model_kind,
                             samples=samples_per_set, seed=seed, nfes=tuple(tune_nfes), fits=fits,
                             extra_args=extra_args,
                             dtype=dtype, device=device, metadata=info)
        return ems
    ems = EMS(lambdas, l, s, b, metadata=info, standard_errors=errors)
    if check_samples:
        steps = CHECK_STEPS_FACTOR * max(tune_nfes)
        return check_v3_against_dpmpp_2m(model, ems, latent_shape, sigma_min, sigma_max, seed=seed, steps=steps,
                                          samples=check_samples, nfes=tuple(tune_nfes), model_kind=model_kind,
                                          extra_args=extra_args, batch_size=batch_size, dtype=dtype, device=device)
    return (ems, state) if return_state else ems


def generate_x0(model, shape, K, sigma_max, sigma_min, model_kind="eps", *, steps=200, seed=0, extra_args=None,
                batch_size=16, dtype=torch.float32, device="cpu"):
    """K samples of the model itself (the paper's x0 for latent models, docs section 3.2): ``sample_dpmpp_2m`` with
    ``steps`` steps from sigma_max to sigma_min (uniform in lambda for eps models, uniform in sigma for flow models),
    then a final denoise to 0.  Starts from sigma_max * z; ``shape`` is one latent's (C, H, W).
    """
    from ..samplers.dpmpp import sample_dpmpp_2m
    from ..samplers.schedule import noise_schedule

    check_model_kind(model_kind)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    schedule = noise_schedule(model_kind)
    if model_kind == "flow":
        sigmas = torch.linspace(min(sigma_max, 1.0), sigma_min, steps, dtype=torch.float64)
    else:
        lams = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), steps, dtype=torch.float64)
        sigmas = schedule.sigma_from_lambda(lams)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((K,) + tuple(shape), generator=generator, dtype=dtype)
    samples = []
    for lo in range(0, K, batch_size):
        x = (noise[lo:lo + batch_size] * sigmas[0]).to(device)
        samples.append(sample_dpmpp_2m(model, x, sigmas.to(device), extra_args=extra_args, disable=True,
                                       model_kind=model_kind))
    return torch.cat(samples)


def check_v3_against_dpmpp_2m(model, ems, shape, sigma_min, sigma_max, *, seed, steps=100, samples=50,
                              nfes=CHECK_NFES, model_kind="eps", extra_args=None, batch_size=None,
                              dtype=torch.float32, device="cpu", **v3_options) -> EMS:
    """The data of DPM-Solver-v3's automatic fallback: v3 / DPM-Solver++(2M) error per NFE on the model's own samples.

    ``generate_x0(model, shape, samples, sigma_max, sigma_min, model_kind, steps=steps, seed=seed)`` are
    ``steps``-step solutions from seeded noise, i.e. references for that noise (x0 made for ``estimate_ems`` with the
    same seed and steps start with the same samples).  From that noise, ``sample_dpm_solver_v3`` with ``ems`` (and
    ``v3_options``) and ``sample_dpmpp_2m`` run at each NFE on generate_x0's spacing (uniform in lambda for eps, in
    sigma for flow) and ending in a final denoise; the ratio of their mean RMS errors is stored in a copy of ``ems``
    as its ``decisions`` (metadata ``v3_decisions`` [[5, "v3", 0.742], ...], "dpmpp_2m" where the ratio is >= 1)
    with ``v3_check_samples``.  ``sample_dpm_solver_v3`` runs ``sample_dpmpp_2m`` instead (logged) where the
    decision at the nearest NFE says so.  Cost: samples *
    (steps + 2 * sum(nfes)) model rows, 11,400 for the defaults (1.5 s CPU on the embedded model).  Measured there
    (bench/results_v3_study.md): the check's ratios follow 100 held-out samples within about 0.07 except where v3
    and 2M are within ~10 % of each other, where 20-50 samples can fall either way (guidance 7.5, 8 NFE: 0.87 to
    1.15 for different sample sets, held-out 1.00-1.07); a wrong verdict there costs at most that margin.
    ``batch_size``, ``dtype`` and ``device`` are the reference generation's (``generate_x0``); the sampler runs use
    all ``samples`` at once.  Only NFEs with 4 * NFE <= ``steps`` are checked (a coarser reference would judge
    itself).
    """
    from ..samplers.dpmpp import sample_dpmpp_2m
    from ..samplers.schedule import noise_schedule
    from ..samplers.v3 import sample_dpm_solver_v3

    nfes = [n for n in nfes if 4 * n <= steps]  # the reference must be far finer than the runs it judges
    if not nfes:
        logger.warning("DPM-Solver-v3 EMS check skipped: %d reference steps are too few (4 x NFE needed)", steps)
        return ems
    reference = generate_x0(model, shape, samples, sigma_max, sigma_min, model_kind, steps=steps, seed=seed,
                            extra_args=extra_args, batch_size=batch_size or samples, dtype=dtype, device=device)
    noise = torch.randn((samples,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    noise = noise.to(device)
    schedule = noise_schedule(model_kind)
    ratios = {}
    for nfe in nfes:
        if model_kind == "flow":
            sigmas = torch.linspace(min(sigma_max, 1.0), sigma_min, nfe, dtype=torch.float64)
        else:
            lams = torch.linspace(schedule.lambda_(sigma_max), schedule.lambda_(sigma_min), nfe, dtype=torch.float64)
            sigmas = schedule.sigma_from_lambda(lams)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(device, noise.dtype)
        x = noise * sigmas[0]
        errors = []
        for sampler, options in ((sample_dpm_solver_v3, dict(v3_options, ems=ems, fallback=False)),
                                 (sample_dpmpp_2m, {})):
            out = sampler(model, x, sigmas, extra_args=extra_args, disable=True, model_kind=model_kind, **options)
            errors.append(float((out.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt().mean()))
        ratios[nfe] = errors[0] / errors[1]
    losing = [n for n, r in ratios.items() if r >= 1]
    if losing:
        logger.info("DPM-Solver-v3 EMS check: v3 / DPM-Solver++(2M) error %s; the sampler will use DPM-Solver++(2M) "
                    "at %s NFE", ", ".join(f"{n}: {r:.2f}" for n, r in ratios.items()), losing)
    decisions = [(n, "dpmpp_2m" if r >= 1 else "v3", r) for n, r in ratios.items()]
    return ems.replace(metadata={"v3_check_samples": str(samples), "v3_check_steps": str(steps)},
                       decisions=decisions)


__all__ = ["estimate_ems", "generate_x0", "EstimationState", "EstimationInterrupted", "statistics_from_moments",
           "smoothed_derivative", "fit_terms", "ESTIMATOR_VERSION", "REDUCTIONS", "JVP_BACKENDS", "SAMPLE_SOURCES",
           "CHECK_NFES", "check_v3_against_dpmpp_2m"]
