"""Shared exponential-integrator pieces: phi functions, Taylor coefficients, step combinations and noise.

Notation (DPM-Solver, Lu et al. 2022; DPM-Solver++, Lu et al. 2022b): a step goes from s to t with
h = lambda_t - lambda_s > 0.  With the data prediction D (x0) the probability-flow ODE has the exact solution
(DPM-Solver++ Eq. 9)

    x_t = (sigma_t / sigma_s) x_s + alpha_t * integral_0^h e^{-(h - tau)} D(lambda_s + tau) dtau,

and expanding D in a Taylor series in lambda gives

    x_t = (sigma_t / sigma_s) x_s + alpha_t * sum_k psi_{k+1}(h) D^{(k)}(lambda_s),
    psi_k(h) = integral_0^h e^{-(h - tau)} tau^{k-1} / (k-1)! dtau = h^k sum_j (-h)^j / (k + j)!.

psi_1 = 1 - e^{-h}, psi_2 = h - 1 + e^{-h}, psi_{k+1} = h^k / k! - psi_k.  The noise-prediction form
(DPM-Solver Eq. 3.7) is

    x_t = (alpha_t / alpha_s) x_s - sigma_t * sum_k phi_{k+1}(h) eps^{(k)}(lambda_s),
    phi_k(h) = integral_0^h e^{(h - tau)} tau^{k-1} / (k-1)! dtau = (-1)^k psi_k(-h).

Everything here is scalar float64 math on Python floats; the tensor work is a handful of axpy operations.
"""
from __future__ import annotations

import math

import torch


def psi(k: int, h: float) -> float:
    """psi_k(h) = integral_0^h e^{-(h - tau)} tau^{k-1}/(k-1)! dtau, for any real h (k >= 1).

    Uses the power series h^k * sum_j (-h)^j/(k+j)! for |h| < 1 (no cancellation for small steps) and the
    recurrence psi_{k+1} = h^k/k! - psi_k otherwise.  h = +inf gives psi_1 = 1 (a step to sigma = 0).
    """
    if k < 1:
        raise ValueError(f"psi needs k >= 1, got {k}")
    if k == 1:
        return -math.expm1(-h)  # exact to rounding for every h, 1 at h = inf
    if h == math.inf:
        raise ValueError("psi_k(inf) diverges for k > 1: a step to sigma = 0 must be first order")
    if abs(h) < 1.0:
        term = h ** k / math.factorial(k)
        total = term
        j = 0
        while abs(term) > 1e-18 * abs(total) and j < 60:
            j += 1
            term *= -h / (k + j)
            total += term
        return total
    value = -math.expm1(-h)
    for m in range(1, k):
        value = h ** m / math.factorial(m) - value
    return value


def phi(k: int, h: float) -> float:
    """phi_k(h) = integral_0^h e^{(h - tau)} tau^{k-1}/(k-1)! dtau (noise-prediction coefficients)."""
    return (-1) ** k * psi(k, -h)


def divided_differences(lams, values):
    """Newton divided differences of ``values`` (tensors) at the points ``lams`` (floats).

    Returns [f[l0], f[l0, l1], f[l0, l1, l2], ...] with l0 = lams[0] the newest point.  The Taylor derivative
    estimate at l0 is D^{(m)} ~ m! f[l0..lm] plus terms that the caller's interpolant accounts for.
    """
    table = list(values)
    out = [table[0]]
    n = len(table)
    for level in range(1, n):
        table = [(table[j] - table[j + 1]) / (lams[j] - lams[j + level]) for j in range(n - level)]
        out.append(table[0])
    return out


def taylor_derivatives(lams, values):
    """Derivatives D^{(m)}(l0), m = 0..n-1, of the polynomial through (lams[j], values[j]), newest first.

    For n points the interpolant is p(l) = sum_m f[l0..lm] prod_{j<m}(l - lj).  Its Taylor coefficients at l0
    are computed exactly (not just the leading divided difference), so a k-step formula is exact for
    polynomials of degree k - 1 and has local error O(h^{k+1}).
    """
    n = len(values)
    dd = divided_differences(lams, values)
    # Expand prod_{j<m} (l - lj) around l0 as a polynomial in u = l - l0: coefficients c[m][p].
    derivs = [None] * n
    poly = [1.0]  # prod over j < 0 is 1
    coeffs = [list(poly)]
    for m in range(1, n):
        shift = lams[0] - lams[m - 1]  # (l - l_{m-1}) = u + (l0 - l_{m-1})
        new = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            new[p + 1] += c
            new[p] += c * shift
        poly = new
        coeffs.append(list(poly))
    for p in range(n):
        acc = None
        for m in range(p, n):
            c = coeffs[m][p]
            if c == 0.0:
                continue
            term = dd[m] * c
            acc = term if acc is None else acc + term
        derivs[p] = (acc if acc is not None else dd[0] * 0) * math.factorial(p)
    return derivs


def taylor_weights(lams):
    """T with D^{(p)}(l0) = sum_j T[p][j] * value_j for the polynomial through the points ``lams`` (newest first).

    The scalar form of ``taylor_derivatives``: the multistep steps fold T into one weight per history output, so a
    k-step update costs k tensor operations.
    """
    import numpy as np

    basis = list(np.eye(len(lams)))
    return [list(map(float, row)) for row in taylor_derivatives(lams, basis)]


def _weighted_terms(coefficients, derivatives, history):
    """(tensor, weight) pairs for sum_p coefficients[p] * derivative_p, from explicit derivatives or a history."""
    if history is None:
        return list(zip(derivatives, coefficients))
    lams, outputs = history
    table = taylor_weights(lams)
    return [(output, sum(coefficients[p] * table[p][j] for p in range(len(lams)))) for j, output in enumerate(outputs)]


def data_prediction_step(x, table, i, derivatives=None, eta=0.0, midpoint=None, history=None, scales=None):
    """x_{i+1} from x_i by the Taylor-expanded data-prediction integrator, ODE (eta = 0) or SDE drift (eta > 0).

    x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t sum_k kappa^{-k} psi_{k+1}(kappa h) D^{(k)},  kappa = 1 + eta
    (DPM-Solver++ Eq. 9-10; with eta = 1 the drift of SDE-DPM-Solver++, Sec. 5).  ``derivatives`` = [D, D', ...] at
    lambda_i.  ``midpoint`` = (difference, factor), with factor * difference ~ h D', adds it with the weight
    alpha_t psi_1(kappa h) / 2 instead of the Taylor weight: the paper's (2M) form, k-diffusion's "midpoint".  A step
    into sigma = 0 returns D.  ``history`` = (lams, outputs), newest first, replaces ``derivatives`` by the Taylor
    derivatives of the polynomial through those outputs (multistep), folded into one weight per output.
    ``scales`` multiplies the weight of each derivative (the official DPM-Solver++ third-order step puts half the
    Taylor weight on D'': scales (1, 1, 0.5)).  The SDE noise term is the caller's (``data_prediction_noise_scale``).
    """
    alpha_t = table.alpha[i + 1]
    if table.sigma[i + 1] == 0:
        return (derivatives[0] if history is None else history[1][0]) * alpha_t
    if history is not None and len(history[0]) > 1 and not all(map(math.isfinite, history[0])):
        return _step_in_rho(x, table, i, history, eta)
    h, kappa = table.h[i], 1.0 + eta
    decay = math.exp(-eta * h) if eta > 0 else 1.0  # eta = 0 with h = inf (flow sigma = 1) gives 1, not nan
    out = x * (table.sigma[i + 1] / table.sigma[i] * decay)
    terms = len(derivatives) if history is None else len(history[0])
    coefficients = [alpha_t * psi(k + 1, kappa * h) / kappa ** k for k in range(terms)]
    if scales is not None:
        coefficients = [c * scale for c, scale in zip(coefficients, scales)]
    for d, weight in _weighted_terms(coefficients, derivatives, history):
        out.add_(d, alpha=weight)
    if midpoint is not None:
        difference, factor = midpoint
        out.add_(difference, alpha=alpha_t * 0.5 * psi(1, kappa * h) * factor)
    return out


def extrapolated_denoised(lams, outputs):
    """D at sigma = 0 from the last two outputs (newest first): the second-order step into sigma = 0.

    Along the probability-flow ODE, in VE coordinates y = x / alpha_t with v = sigma_t / alpha_t = e^{-lambda},
    D = y - v eps and dy/dv = eps give dD/dv = -v d eps/dv: D = D(0) + O(v^2).  The line through (v_s^2, D_s) and
    (v_prev^2, D_prev) at v = 0 has local error O(v^3) where returning D_s has O(v^2) (k-diffusion's last step).
    Without a finite previous point it returns D_s.
    """
    if len(lams) < 2 or not math.isfinite(lams[1]):
        return outputs[0]
    now, before = math.exp(-2 * lams[0]), math.exp(-2 * lams[1])
    return outputs[0] + (outputs[0] - outputs[1]) * (now / (before - now))


# Interpolation variable of the steps whose history reaches sigma = 1 (measurement switch).
START_VARIABLE = "rho"


def _start_variable(lam):
    if START_VARIABLE == "u":
        return math.exp(lam) if lam < 700 else math.inf
    return math.log1p(math.exp(lam)) if lam < 30 else lam + math.log1p(math.exp(-lam))  # rho = softplus(lambda)


def _step_in_rho(x, table, i, history, eta):
    """A multistep data-prediction step whose history reaches a flow model's sigma = 1 (lambda = -inf).

    The drift integral alpha_t int_0^h kappa e^{-kappa (h - tau)} D(lambda_s + tau) dtau (DPM-Solver++ Eq. 9) with D
    interpolated by the polynomial through the history in rho = softplus(lambda) = -log sigma (finite, 0, at
    sigma = 1; rho ~ lambda near sigma = 0), integrated by Gauss-Legendre quadrature in lambda (scalars only).
    """
    import numpy as np

    lams, outputs = history
    kappa, lam_s, lam_t = 1.0 + eta, table.lam[i], table.lam[i + 1]
    nodes = [_start_variable(lam) if math.isfinite(lam) else 0.0 for lam in lams]
    g, gw = np.polynomial.legendre.leggauss(24)
    lam = lam_s + (g + 1) * (0.5 * (lam_t - lam_s))
    kernel = gw * (0.5 * (lam_t - lam_s)) * kappa * np.exp(-kappa * (lam_t - lam))
    v = np.array([_start_variable(float(l)) for l in lam])
    decay = math.exp(-eta * table.h[i]) if eta > 0 else 1.0
    out = x * (table.sigma[i + 1] / table.sigma[i] * decay)
    for j, output in enumerate(outputs):
        basis = np.ones_like(v)
        for m, node in enumerate(nodes):
            if m != j:
                basis = basis * (v - node) / (nodes[j] - node)
        out.add_(output, alpha=table.alpha[i + 1] * float((kernel * basis).sum()))
    return out


# A third-order step is kept for a sample only where its D'' term moves x by at most this fraction of what the D'
# term moves it (measured: bench/results_flow_guidance.md); otherwise that sample takes the second-order step.
GUARD_RATIO = 0.25
GUARD_MIN_STEP = 0.2
GUARD_NEGLIGIBLE = 0.003


def guarded_step(x, table, i, history, second, eta=0.0, scales=None, guard=True):
    """The multistep step of order len(history) >= 3, falling back per sample to ``second`` (that step's
    second-order result) where the extrapolation is unreliable.

    The Taylor series of the step (DPM-Solver++ Eq. 9) converges when each term is smaller than the one before:
    with x1, x2, x3 the first-, second- and third-order results, a sample keeps x3 if
    |x3 - x2| <= GUARD_RATIO |x2 - x1| per unit of D'' weight (norms per sample), or if |x3 - x2| <=
    GUARD_NEGLIGIBLE |x2| (too small to do harm; keeps the 3M's lead at 20+ steps); steps with h < GUARD_MIN_STEP are
    never guarded.  Guided, fast-changing outputs on coarse steps break the series, and the quadratic extrapolation
    of D'' then amplifies the error instead of cancelling it.  A hard switch: bounding the correction continuously
    measured far worse (158x the 2M's error at 8 guided flow logSNR steps), so a sample near the threshold can flip
    with rounding (fp16).
    """
    third = data_prediction_step(x, table, i, history=history, eta=eta, scales=scales)
    if not guard or table.sigma[i + 1] == 0 or GUARD_RATIO is None or table.h[i] < GUARD_MIN_STEP:
        return third
    first = data_prediction_step(x, table, i, [history[1][0]], eta=eta)
    dims = tuple(range(1, x.ndim))
    correction = (third - second).square().sum(dims)
    previous = (second - first).square().sum(dims)
    limit = GUARD_RATIO * (scales[2] if scales is not None else 1.0) / 0.5  # per unit of D'' (official: half)
    small = correction <= GUARD_NEGLIGIBLE ** 2 * second.square().sum(dims)  # too small to do harm: keep order 3
    keep = ((correction <= limit ** 2 * previous) | small).reshape(-1, *[1] * (x.ndim - 1))
    return torch.where(keep, third, second)


def data_prediction_noise_scale(table, i, eta):
    """Standard deviation of the noise of a data-prediction SDE step: sigma_t sqrt(1 - e^{-2 eta h})."""
    return table.sigma[i + 1] * math.sqrt(-math.expm1(-2 * eta * table.h[i]))


def noise_prediction_step(x, table, i, derivatives=None, eta=0.0, midpoint=None, history=None):
    """x_{i+1} from x_i by the Taylor-expanded noise-prediction integrator, ODE (eta = 0) or SDE drift (eta > 0).

    x_t = (alpha_t/alpha_s) x_s - sigma_t kappa sum_k phi_{k+1}(h) eps^{(k)},  kappa = 1 + eta (DPM-Solver Eq. 3.7;
    with eta = 1 the drift of SDE-DPM-Solver, DPM-Solver++ Sec. 5).  ``derivatives`` = [eps, eps', ...] at lambda_i.
    ``midpoint`` = (difference, factor), factor * difference ~ h eps', takes the weight sigma_t kappa phi_1(h) / 2.
    ``history`` as in ``data_prediction_step``.  Finite h only (callers send steps into sigma = 0 or out of a flow
    model's sigma = 1 to the data form).
    """
    h, kappa, sigma_t = table.h[i], 1.0 + eta, table.sigma[i + 1]
    out = x * (table.alpha[i + 1] / table.alpha[i])
    terms = len(derivatives) if history is None else len(history[0])
    coefficients = [-sigma_t * kappa * phi(k + 1, h) for k in range(terms)]
    for e, weight in _weighted_terms(coefficients, derivatives, history):
        out.add_(e, alpha=weight)
    if midpoint is not None:
        difference, factor = midpoint
        out.add_(difference, alpha=-sigma_t * kappa * 0.5 * phi(1, h) * factor)
    return out


def noise_prediction_noise_scale(table, i, eta):
    """Standard deviation of the noise of a noise-prediction SDE step: sigma_t sqrt(eta (e^{2h} - 1))."""
    return table.sigma[i + 1] * math.sqrt(eta * math.expm1(2 * table.h[i]))


def first_order_data_step(x, denoised, sigma_s, sigma_t, alpha_t, h):
    """DDIM / DPM-Solver++1 between any two points: x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) D_s.

    The same arithmetic as ``data_prediction_step`` with [D] (bit-identical), for points off the step table.
    Handles h = +-inf.
    """
    if sigma_t == 0:
        return denoised * alpha_t
    out = x * (sigma_t / sigma_s)
    out.add_(denoised, alpha=alpha_t * psi(1, h))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------------

def batch_seeds(extra_args, batch_size: int, seed=None):
    """One seed per sample: an explicit ``seed`` argument, else ``extra_args["seed"]`` (ComfyUI passes one), else a
    random one.  An int seed s gives sample i the seed s + i (the WebUI's convention), so a sample's noise does not
    depend on the batch size; a list gives each sample its own seed, so it does not depend on the position either.
    """
    if seed is None and extra_args:
        seed = extra_args.get("seed")
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, []).item())
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for a batch of {batch_size}")
        return [int(s) for s in seed]
    return [int(seed) + j for j in range(batch_size)]


def noise_dtype(x):
    """The dtype noise is drawn in for a latent like x: its own if float32/float64, else float32 (the samplers'
    working precision for fp16/bf16 latents, see common.py)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class BrownianNoise:
    """Seeded Brownian-tree noise, one tree per sample (torchsde's BrownianTree, as k-diffusion uses).

    ``noise(sigma_s, sigma_t)`` returns (W(t) - W(s)) / sqrt(|t - s|) in "time" t = sigma, a standard normal per
    element, and the same value for the same interval whatever the step sizes around it: the property that makes
    SDE solvers converge as the step count grows.  This is exactly k-diffusion's
    ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)`` with a list of seeds (same trees, same sign:
    the increment in the direction of travel), so a sampler fed either gets the same noise.  Each sample has its own
    tree (w0 of one sample's shape), so a sample's noise does not depend on the batch it is in; k-diffusion and
    ComfyUI given an int seed build one tree over the whole batch instead.

    Trees live on the latent's device (``cpu=True`` keeps them on the CPU, which ComfyUI's non-"_gpu" samplers do;
    CPU and GPU trees give different noise).  They are float64 for a float64 latent and float32 otherwise; the noise
    is returned on the latent's device in that dtype.  torchsde rounds query times to 6 decimals (its tol = 1e-6).
    """

    def __init__(self, x, sigma_min, sigma_max, seeds, cpu=False):
        import torchsde

        self.device = x.device
        self.dtype = noise_dtype(x)
        tree_device = torch.device("cpu") if cpu else x.device
        self.t0, self.t1 = float(sigma_min), float(sigma_max)
        if not 0 <= self.t0 < self.t1:
            raise ValueError(f"a Brownian tree needs 0 <= sigma_min < sigma_max, got {self.t0!r}, {self.t1!r}")
        # torchsde rounds the tree's ends to 6 decimals and warns on (then clamps) queries beyond them.
        self.lo_end, self.hi_end = round(self.t0, 6), round(self.t1, 6)
        w0 = torch.zeros(x.shape[1:], dtype=self.dtype, device=tree_device)
        self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma_s, sigma_t):
        sigma_s, sigma_t = float(sigma_s), float(sigma_t)
        lo, hi = min(sigma_s, sigma_t), max(sigma_s, sigma_t)
        if hi <= lo or hi <= self.t0 or lo >= self.t1:
            raise ValueError(f"noise interval [{lo!r}, {hi!r}] is empty or outside the Brownian tree's "
                             f"[{self.t0!r}, {self.t1!r}]")
        # Normalised by the requested interval, as k-diffusion does, also where the query itself is clamped.
        w = torch.stack([tree(max(lo, self.lo_end), min(hi, self.hi_end)) for tree in self.trees])
        scale = (1.0 if sigma_t > sigma_s else -1.0) / math.sqrt(hi - lo)
        return (w * scale).to(self.device)


class GaussianNoise:
    """Independent standard normal draws, one generator per sample seeded from the sample's seed.

    Each call draws afresh (ancestral-sampler noise), so unlike ``BrownianNoise`` the noise of a step depends on how
    many steps came before it.  Generators live on the latent's device (``cpu=True``: on the CPU); draws are float32,
    returned in the latent's dtype (float32 for fp16/bf16 latents).
    """

    def __init__(self, x, seeds, cpu=False):
        self.shape = x.shape[1:]
        self.device = x.device
        self.dtype = noise_dtype(x)
        gen_device = torch.device("cpu") if cpu else x.device
        self.gen_device = gen_device
        self.generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]

    def __call__(self, sigma_s, sigma_t):
        # Drawn in float32 whatever the latent's dtype, so float64 and float32 runs see the same noise.
        w = torch.stack([torch.randn(self.shape, generator=g, device=self.gen_device) for g in self.generators])
        return w.to(self.device, self.dtype)


NOISE_TYPES = ("brownian", "gaussian")


def make_noise(x, sigmas, extra_args, noise_type="brownian", seed=None, cpu=False):
    """A noise sampler for an SDE solver: ``noise(sigma_s, sigma_t)`` returns a standard normal like x."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    seeds = batch_seeds(extra_args, x.shape[0], seed)
    if noise_type == "gaussian":
        return GaussianNoise(x, seeds, cpu=cpu)
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    positive = s[s > 0]
    return BrownianNoise(x, positive.min().item(), positive.max().item(), seeds, cpu=cpu)
