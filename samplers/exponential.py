"""Shared exponential-integrator pieces: phi functions, Taylor coefficients and step combinations (the noise sources
are in noise.py).

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

import functools
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
    k-step update costs k tensor operations.  Cached (a tuple of tuples): a sampler asks for the same points in
    each run on a schedule, and the 3M guard twice in a step.
    """
    return _taylor_weights(tuple(map(float, lams)))


@functools.lru_cache(maxsize=1024)
def _taylor_weights(lams):
    import numpy as np

    basis = list(np.eye(len(lams)))
    return tuple(tuple(map(float, row)) for row in taylor_derivatives(lams, basis))


def _weighted_terms(coefficients, derivatives, history):
    """(tensor, weight) pairs for sum_p coefficients[p] * derivative_p, from explicit derivatives or a history."""
    if history is None:
        return list(zip(derivatives, coefficients))
    lams, outputs = history
    return list(zip(outputs, _taylor_folded(coefficients, lams)))


def _taylor_folded(coefficients, lams):
    """One weight per history output for sum_p coefficients[p] D^{(p)} with the Taylor derivatives through ``lams``."""
    table = taylor_weights(lams)
    return [sum(coefficients[p] * table[p][j] for p in range(len(lams))) for j in range(len(lams))]


def data_prediction_weights(table, i, lams, eta=0.0, scales=None):
    """The weights w_j of a multistep data-prediction step with sigma_{i+1} > 0: ``data_prediction_step(x, table, i,
    history=(lams, outputs), eta=eta, scales=scales)`` is (sigma_t/sigma_s) e^{-eta h} x + sum_j w_j outputs_j, added
    in order j (the same floats, so bit-identical).  None marks an output the step leaves out (``_near_sigma_one``)."""
    kept = _near_sigma_one(table, i, (lams, list(range(len(lams)))))  # the indices of the outputs it keeps
    weights = [None] * len(lams)
    if _reaches_sigma_one(table, i, kept):
        # D interpolated in rho through the history (``rho_weights``): the drift
        # alpha_t int_{lambda_s}^{lambda_t} kappa e^{-kappa (lambda_t - lambda)} D dlambda of DPM-Solver++ Eq. 9-10
        import numpy as np

        kappa, lam_t = 1.0 + eta, table.lam[i + 1]
        rho = rho_weights(kept[0], table.lam[i], lam_t, lambda lam: kappa * np.exp(-kappa * (lam_t - lam)))
        for j, weight in zip(kept[1], rho):
            weights[j] = table.alpha[i + 1] * weight
        return weights
    h, kappa = table.h[i], 1.0 + eta
    coefficients = [table.alpha[i + 1] * psi(k + 1, kappa * h) / kappa ** k for k in range(len(kept[0]))]
    if scales is not None:
        coefficients = [c * scale for c, scale in zip(coefficients, scales)]
    for j, weight in zip(kept[1], _taylor_folded(coefficients, kept[0])):
        weights[j] = weight
    return weights


def data_prediction_step(x, table, i, derivatives=None, eta=0.0, midpoint=None, history=None, scales=None):
    """x_{i+1} from x_i by the Taylor-expanded data-prediction integrator, ODE (eta = 0) or SDE drift (eta > 0).

    x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t sum_k kappa^{-k} psi_{k+1}(kappa h) D^{(k)},  kappa = 1 + eta
    (DPM-Solver++ Eq. 9-10; with eta = 1 the drift of SDE-DPM-Solver++, Sec. 5).  ``derivatives`` = [D, D', ...] at
    lambda_i.  ``midpoint`` = (difference, factor), with factor * difference ~ h D', adds it with the weight
    alpha_t psi_1(kappa h) / 2 instead of the Taylor weight: the paper's (2M) form, k-diffusion's "midpoint".  A step
    into sigma = 0 returns D.  ``history`` = (lams, outputs), newest first, replaces ``derivatives`` by the Taylor
    derivatives of the polynomial through those outputs (multistep), folded into one weight per output
    (``data_prediction_weights``).  ``scales`` multiplies the weight of each derivative (the official DPM-Solver++
    third-order step puts half the Taylor weight on D'': scales (1, 1, 0.5)).  The SDE noise term is the caller's
    (``data_prediction_noise_scale``).
    """
    alpha_t = table.alpha[i + 1]
    if table.sigma[i + 1] == 0:
        return (derivatives[0] if history is None else history[1][0]) * alpha_t
    h, kappa = table.h[i], 1.0 + eta
    if history is not None:
        weights = data_prediction_weights(table, i, history[0], eta, scales)
        return _combine(x * _x_scale(table, i, eta), history[1], weights)
    out = x * _x_scale(table, i, eta)
    coefficients = [alpha_t * psi(k + 1, kappa * h) / kappa ** k for k in range(len(derivatives))]
    if scales is not None:
        coefficients = [c * scale for c, scale in zip(coefficients, scales)]
    for d, weight in zip(derivatives, coefficients):
        out.add_(d, alpha=weight)
    if midpoint is not None:
        difference, factor = midpoint
        out.add_(difference, alpha=alpha_t * 0.5 * psi(1, kappa * h) * factor)
    return out


def _combine(out, outputs, weights):
    """out + sum_j weights_j outputs_j, in place, in order j (a weight None: that output is left out)."""
    for output, weight in zip(outputs, weights):
        if weight is not None:
            out.add_(output, alpha=weight)
    return out


def _x_scale(table, i, eta):
    """The weight (sigma_t / sigma_s) e^{-eta h} of x_s in every data-prediction step from s = i to t = i + 1."""
    decay = math.exp(-eta * table.h[i]) if eta > 0 else 1.0  # eta = 0 with h = inf (flow sigma = 1) gives 1, not nan
    return table.sigma[i + 1] / table.sigma[i] * decay


def midpoint_2m_step(x, table, i, lams, outputs, eta=0.0):
    """The paper's DPM-Solver++(2M) step (Algorithm 2; its SDE drift, Sec. 5, for eta > 0): D_s + (D_s - D_prev)/(2r)
    with weight alpha_t psi_1(kappa h), r = h_prev / h; the history step (``rho_weights``) where lams[1] is a flow
    model's sigma = 1.  The second-order step of the 3M samplers and the one their guard falls back to."""
    if not math.isfinite(lams[1]):
        return data_prediction_step(x, table, i, history=(lams[:2], outputs[:2]), eta=eta)
    return data_prediction_step(x, table, i, [outputs[0]], eta=eta,
                                midpoint=(outputs[0] - outputs[1], table.h[i] / (table.lam[i] - lams[1])))


def _midpoint_2m_weights(table, i, lams, eta):
    """The weights of ``midpoint_2m_step`` on outputs[0], outputs[1] (the x term as in every step)."""
    if not math.isfinite(lams[1]):
        return data_prediction_weights(table, i, lams[:2], eta)
    kappa = 1.0 + eta
    first = table.alpha[i + 1] * psi(1, kappa * table.h[i])
    half = table.alpha[i + 1] * 0.5 * psi(1, kappa * table.h[i]) * (table.h[i] / (table.lam[i] - lams[1]))
    return [first + half, -half]


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


def _rho(lam):
    """rho = -log sigma = softplus(lambda) of a flow model: 0 at sigma = 1, ~lambda near sigma = 0."""
    if lam == -math.inf:
        return 0.0
    return math.log1p(math.exp(lam)) if lam < 30 else lam + math.log1p(math.exp(-lam))


RHO_QUADRATURE_NODES = 24


def rho_weights(lams, lam_s, lam_t, kernel):
    """w_j = int_{lam_s}^{lam_t} kernel(lambda) P_j(rho(lambda)) dlambda for the Lagrange basis P_j in
    rho = -log sigma = softplus(lambda) through the points ``lams`` (flow models; lambda = -inf is rho = 0, sigma = 1).

    The exponential integrators' exact solution over a step (DPM-Solver++ Eq. 9, DPM-Solver Eq. 3.4) is such an
    integral of the model output; D and eps are smooth in u = e^lambda at sigma = 1 (D - E[x0] ~ Cov n u), so in
    rho = log(1 + u) too, while lambda puts sigma = 1 at infinity.  ``kernel`` maps a float64 array of lambdas to
    the kernel's values.  Gauss-Legendre quadrature in lambda; from sigma = 1 (lam_s = -inf) in rho, with
    dlambda = e^rho / (e^rho - 1) drho (the data kernel e^{kappa lambda} cancels the pole for kappa >= 1).
    """
    import numpy as np

    nodes = [_rho(lam) for lam in lams]
    g, gw = np.polynomial.legendre.leggauss(RHO_QUADRATURE_NODES)
    if math.isfinite(lam_s):
        lam = lam_s + (g + 1) * (0.5 * (lam_t - lam_s))
        v = np.array([_rho(float(value)) for value in lam])
        weight = gw * (0.5 * (lam_t - lam_s)) * kernel(lam)
    else:
        rho_t = _rho(lam_t)
        v = (g + 1) * (0.5 * rho_t)
        lam = np.log(np.expm1(v))
        weight = gw * (0.5 * rho_t) * kernel(lam) * np.exp(v) / np.expm1(v)
    weights = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(v)
        for m, node in enumerate(nodes):
            if m != j:
                basis = basis * (v - node) / (node_j - node)
        weights.append(float((weight * basis).sum()))
    return weights


# A multistep step whose history reaches sigma = 1 extrapolates the outputs on [0, rho_s] to rho_t; it keeps the
# sigma = 1 output only while rho_t - rho_s <= RHO_MAX_EXTRAPOLATION * rho_s (measured: bench/results_flow_guidance.md).
RHO_MAX_EXTRAPOLATION = 2.0


def _near_sigma_one(table, i, history):
    """``history`` without its sigma = 1 output where the step would extrapolate it too far (RHO_MAX_EXTRAPOLATION;
    a step-size ratio: variable-step multistep formulas lose accuracy and stability as the step outgrows the
    history), else unchanged.  Steps out of sigma = 1 (singlestep stages) and correctors (whose newest output
    sits at the step's end) extrapolate nothing and keep it."""
    if history is None or not math.isfinite(table.lam[i]) or all(map(math.isfinite, history[0])):
        return history
    rho_newest = max(_rho(lam) for lam in history[0])
    if _rho(table.lam[i + 1]) - rho_newest <= RHO_MAX_EXTRAPOLATION * rho_newest:
        return history
    kept = [k for k, lam in enumerate(history[0]) if math.isfinite(lam)]
    return [history[0][k] for k in kept], [history[1][k] for k in kept]


def _reaches_sigma_one(table, i, history):
    """A multistep history that holds a flow model's sigma = 1 output (lambda = -inf), or a step out of sigma = 1
    with more than one output (a singlestep's stages): interpolated in rho (``rho_weights``)."""
    return history is not None and len(history[0]) > 1 and (
        not math.isfinite(table.lam[i]) or not all(map(math.isfinite, history[0])))


def step_out_of_sigma_one(x, table, i, denoised, fractions, denoise_at):
    """x_{i+1} from a flow model's sigma = 1 (lambda = -inf, step i) by a singlestep method whose stages sit at
    rho = r rho_{i+1}, r in ``fractions``, in rho = -log sigma (finite there) instead of lambda: DPM-Solver-2 (r = 1/2)
    and -3 (1/3, 2/3) (DPM-Solver Algorithms 1-2) and DPM-Solver++(2S) (r).  The first stage is DDIM; every later
    stage and the step itself integrate the line in rho through (0, D_0) and the previous stage's output exactly
    (``rho_weights``), as DPM-Solver-3's last stage uses only eps and eps_2 (local error O(rho^4) for two stages,
    O(rho^3) for one).  ``denoise_at(x, sigma)`` calls the model.
    """
    from .schedule import StepTable

    schedule, rho_t = table.schedule, _rho(table.lam[i + 1])
    lam_s, sigma_s, alpha_s = table.lam[i], table.sigma[i], table.alpha[i]
    previous = None  # (lambda, D) of the last stage
    for r in fractions:
        sigma = math.exp(-r * rho_t)
        lam, alpha = schedule.lambda_(sigma), float(schedule.alpha(sigma))
        stage = StepTable(schedule, (sigma_s, sigma), (lam_s, lam), (alpha_s, alpha), (sigma_s, sigma), (lam - lam_s,))
        if previous is None:
            x_stage = data_prediction_step(x, stage, 0, [denoised])
        else:
            x_stage = data_prediction_step(x, stage, 0, history=([previous[0], lam_s], [previous[1], denoised]))
        previous = (lam, denoise_at(x_stage, sigma))
    return data_prediction_step(x, table, i, history=([previous[0], lam_s], [previous[1], denoised]))


# A third-order step is kept for a sample only where its D'' term moves x by at most GUARD_RATIO of what its D' term
# moves it, or by at most GUARD_NEGLIGIBLE of |x|, or (official ODE form, a fourth output in the history) where that
# term is at most GUARD_NEXT_SMALL of |x| and the cubic's next term at most GUARD_NEXT_TERM times it; otherwise the
# sample takes the second-order step (chosen by measurement: bench/results_flow_guidance.md).
GUARD_RATIO = 0.25
GUARD_MIN_STEP = 0.2
GUARD_NEGLIGIBLE = 0.003
GUARD_NEXT_TERM = 1.5
GUARD_NEXT_SMALL = 0.005


def guarded_step(x, table, i, history, eta=0.0, scales=None, guard=True, second_outputs=None):
    """The multistep step of order 3 through the first three outputs of ``history`` (newest first), falling back per
    sample to a second-order step (computed only when a sample may fall back) where the extrapolation is
    unreliable: the paper's 2M (``midpoint_2m_step``), or with ``second_outputs`` = k the history step through the
    first k outputs (``data_prediction_step``).  A fourth output in ``history`` only feeds the guard.

    The Taylor series of the step (DPM-Solver++ Eq. 9) converges when each term is smaller than the one before:
    with x1, x2, x3 the first-, second- and third-order results (norms per sample), a sample keeps x3 if
    |x3 - x2| <= GUARD_RATIO |x2 - x1| or |x3 - x2| <= GUARD_NEGLIGIBLE |x2| (too small to do harm).  The bound is
    on the step's own third-order correction, so the Taylor form (full D'' weight) is held to half the D'' that the
    official form may carry.  The official ODE form (eta = 0: with noise in the history it kept third-order steps
    that measured worse) also keeps x3 where |x3 - x2| <= GUARD_NEXT_SMALL |x2| and the step through four outputs
    (the cubic's D''' term, Taylor weights) moves x by at most GUARD_NEXT_TERM times what the Taylor D'' term moves
    it: late, smooth steps whose D'' and D' terms are of one size (h near 1) but whose series goes on converging.
    Steps with h < GUARD_MIN_STEP are never guarded.  Guided, fast-changing outputs on coarse steps break the
    series, and the quadratic extrapolation of D'' then amplifies the error instead of cancelling it.  A hard
    switch: bounding the correction continuously measured far worse, so a sample near a threshold can flip with
    rounding (fp16).

    Cost: every candidate is (sigma_t/sigma_s) e^{-eta h} x + sum_j w_j outputs_j (Eq. 9 with the derivatives
    folded into one weight per output) with the same x term, so x3 - x2 is sum_j (w3_j - w2_j) outputs_j: the
    scalar weights first, then one weighted sum of the outputs per difference tested, x2 only where the first test
    does not keep every sample and x3 only where some sample keeps it.
    The differences carry no rounding of the shared x term, so a sample within rounding of a threshold may decide
    otherwise than from the difference of the two rounded results.
    """
    lams, outputs = history
    if table.sigma[i + 1] == 0:  # the step into sigma = 0 returns D
        return data_prediction_step(x, table, i, history=(lams[:3], outputs[:3]), eta=eta, scales=scales)
    # The candidates' weights on outputs_j (the x term is the same in all, and cancels in every difference)
    w3 = data_prediction_weights(table, i, lams[:3], eta, scales)  # x3: the step itself

    def third():  # data_prediction_step(x, table, i, history=(lams[:3], outputs[:3]), eta=eta, scales=scales)
        return _combine(x * _x_scale(table, i, eta), outputs, w3)

    if not guard or GUARD_RATIO is None or table.h[i] < GUARD_MIN_STEP:
        return third()
    if second_outputs is None:  # x2: the step it falls back to
        w2 = _midpoint_2m_weights(table, i, lams, eta)
    else:
        w2 = data_prediction_weights(table, i, lams[:second_outputs], eta)
    w1 = [table.alpha[i + 1] * psi(1, (1.0 + eta) * table.h[i])]  # x1: DDIM / DPM-Solver++(1)

    def weight(w, j):
        return w[j] if j < len(w) and w[j] is not None else 0.0  # None: an output the step leaves out

    def norm(a, b):
        """|xa - xb| = |sum_j (a_j - b_j) outputs_j| per sample."""
        total = None
        for j, output in enumerate(outputs[:max(len(a), len(b))]):
            difference = weight(a, j) - weight(b, j)
            if difference == 0.0:
                continue
            if total is None:
                total = output * difference
            else:
                total.add_(output, alpha=difference)
        if total is None:  # the same step
            return x.new_zeros(x.shape[0])
        return torch.linalg.vector_norm(total.reshape(x.shape[0], -1), dim=1)

    correction = norm(w3, w2)  # |x3 - x2|
    keep = correction <= GUARD_RATIO * norm(w2, w1)  # |x3 - x2| <= GUARD_RATIO |x2 - x1|
    if bool(keep.all()):
        return third()
    if second_outputs is None:
        second = midpoint_2m_step(x, table, i, lams, outputs, eta)
    else:
        second = data_prediction_step(x, table, i, history=(lams[:second_outputs], outputs[:second_outputs]), eta=eta)
    size = torch.linalg.vector_norm(second.reshape(x.shape[0], -1), dim=1)  # |x2|
    keep |= correction <= GUARD_NEGLIGIBLE * size
    official_ode = scales is not None and eta == 0 and len(lams) > 3 and all(map(math.isfinite, lams))
    if official_ode and not bool(keep.all()):
        taylor = data_prediction_weights(table, i, lams[:3], eta)  # x3t: the Taylor step through three outputs
        cubic = data_prediction_weights(table, i, lams[:4], eta)  # x4t: through four
        # |x3 - x2| <= GUARD_NEXT_SMALL |x2| and |x4t - x3t| <= GUARD_NEXT_TERM |x3t - x2|
        keep |= (correction <= GUARD_NEXT_SMALL * size) & (norm(cubic, taylor) <= GUARD_NEXT_TERM * norm(taylor, w2))
    if not bool(keep.any()):
        return second
    return torch.where(keep.reshape(-1, *[1] * (x.ndim - 1)), third(), second)


def data_prediction_noise_scale(table, i, eta):
    """Standard deviation of the noise of a data-prediction SDE step: sigma_t sqrt(1 - e^{-2 eta h})."""
    return table.sigma[i + 1] * math.sqrt(-math.expm1(-2 * eta * table.h[i]))


def noise_prediction_step(x, table, i, derivatives=None, eta=0.0, midpoint=None, history=None):
    """x_{i+1} from x_i by the Taylor-expanded noise-prediction integrator, ODE (eta = 0) or SDE drift (eta > 0).

    x_t = (alpha_t/alpha_s) x_s - sigma_t kappa sum_k phi_{k+1}(h) eps^{(k)},  kappa = 1 + eta (DPM-Solver Eq. 3.7;
    with eta = 1 the drift of SDE-DPM-Solver, DPM-Solver++ Sec. 5).  ``derivatives`` = [eps, eps', ...] at lambda_i.
    ``midpoint`` = (difference, factor), factor * difference ~ h eps', takes the weight sigma_t kappa phi_1(h) / 2.
    ``history`` as in ``data_prediction_step``.  Finite h and finite history only: callers send a flow model's steps
    out of sigma = 1 (alpha_s = 0) and those whose history reaches it to the data form (``data_prediction_step``).
    The noise form's weight alpha_t e^{-lambda} dlambda = alpha_t du / u^2 (u = e^lambda) would turn an
    interpolant's O(u^2) error near sigma = 1 into an O(u) one (eps interpolated in rho measured second order).
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


# The noise sources moved to noise.py; these names stay importable from here.
from .noise import (NOISE_TYPES, BrownianNoise, GaussianNoise, TorchsdeBrownianNoise, batch_seeds,  # noqa: E402,F401
                    make_noise, noise_dtype)
