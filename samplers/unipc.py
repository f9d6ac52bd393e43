"""UniPC (Zhao et al. 2023, arXiv 2302.04867): the unified multistep predictor-corrector in data prediction, one
model call per step, in sigma space for eps and flow models.

Notation as in ``exponential``: a step goes from s = lambda_i to t = lambda_{i+1}, h = t - s, D the data prediction
(the paper's x_theta).  UniP-p, the predictor (Eq. 5 with data prediction, App. A / Algorithm 2), with the p - 1
earlier outputs D_{i-k} at r_k = (lambda_{i-k} - lambda_i) / h and D1_k = (D_{i-k} - D_i) / r_k:

    x_t = (sigma_t / sigma_s) x_s + alpha_t psi_1(h) D_i + alpha_t B(h) sum_k a_k D1_k,

UniC-p, the corrector (Eq. 6), redoes the same step once D_t = D(x_t) is known, with D1_p = D_t - D_i at r_p = 1:

    x_t^c = (sigma_t / sigma_s) x_s + alpha_t psi_1(h) D_i + alpha_t B(h) (sum_{k<p} a^c_k D1_k + a^c_p D1_p),

so the corrector costs no model call: D_t is the next step's output.  The a solve R_p a = g_p / B(h) (Eq. 8 and
Theorem 3.1; R_p the Vandermonde matrix of the r_k, g_p(h)_n = n! psi_{n+1}(h) / h^n); UniP-p uses the first p - 1
rows and columns, UniC-p all p.  As in the authors' code and diffusers, UniP-2 takes a_1 = 1/2 (then, with B(h) =
psi_1(h), the paper's "bh2", the predictor is DPM-Solver++(2M)) and UniC-1 takes a_1 = 1/2.  B(h) = psi_1(h) =
1 - e^{-h} ("bh2") or h ("bh1"), the paper's B_2 and B_1 (Sec. 3.2).  Order p of the pair: p + 1.

This equals diffusers' ``UniPCMultistepScheduler(predict_x0=True, solver_type=variant, solver_order=order,
lower_order_final=True)`` on the same sigmas (tests/test_unipc.py; diffusers works in VP coordinates, these
coefficients are the same in VE ones).  As there, the corrector uses the order of the predictor it corrects (a
warm-up step's corrector is of low order too), and the step into sigma = 0 returns D of the last point, so the last
corrector (which would only move x there) is skipped.

Flow models: sigma = 1 is lambda = -inf.  The step out of it is DDIM (order 1, no history); every predictor or
corrector whose points reach sigma = 1 integrates the polynomial in rho = -log sigma (finite there) through the same
points exactly (``exponential.rho_weights``, as ``sample_dpmpp_2m``), which keeps its order; later steps are the
lambda form above.
"""
from __future__ import annotations

import math

import numpy as np

from .common import SamplerRun, check_choice, check_positive_int
from .dpmpp import _final_step, _resolve_final_step
from .exponential import data_prediction_step, extrapolated_denoised, psi

VARIANTS = ("bh1", "bh2")


def _b_of_h(h, variant):
    """B(h) of the paper (Sec. 3.2) in data prediction: bh1 h, bh2 psi_1(h) = 1 - e^{-h} (diffusers' -B_h)."""
    return h if variant == "bh1" else psi(1, h)


def _unipc_weights(h, rks, variant):
    """The a of Eq. 8 (Theorem 3.1): R a = g / B(h) with R[m-1][k] = r_k^(m-1) and g_m = m! psi_{m+1}(h) / h^m,
    m = 1..p (p = len(rks)).

    ``rks``: the ratios r_k of the history outputs (k = 1..p-1), and for the corrector also r_p = 1 (the new output).
    UniP-2 and UniC-1 take 1/2 (the authors' and diffusers' simplification).
    """
    p = len(rks)
    if p == 1:  # the predictor of order 2 (one history ratio) and the corrector of order 1 (r = 1 only)
        return [0.5]
    B = _b_of_h(h, variant)
    g = [math.factorial(n + 1) * psi(n + 2, h) / h ** (n + 1) / B for n in range(p)]
    R = [[r ** n for r in rks] for n in range(p)]
    return [float(a) for a in np.linalg.solve(np.array(R, dtype=np.float64), np.array(g, dtype=np.float64))]


def _unipc_step(x, t, i, lams, outputs, variant, corrector):
    """x_{i+1} from x_i: UniP (``corrector`` False; ``lams``/``outputs`` = D_i, D_{i-1}, ..., newest first) or UniC
    (``corrector`` True; lams/outputs = D_{i+1}, D_i, D_{i-1}, ...).  Points that reach a flow model's sigma = 1 are
    integrated in rho (``data_prediction_step(history=...)``, exact for the polynomial through them)."""
    if len(lams) == 1:  # UniP-1: DDIM (also out of sigma = 1 and into sigma = 0)
        return data_prediction_step(x, t, i, [outputs[0]])
    if not all(map(math.isfinite, lams)) or not math.isfinite(t.lam[i]):
        return data_prediction_step(x, t, i, history=(list(lams), list(outputs)))
    if corrector:
        new, base, earlier, earlier_lams = outputs[0], outputs[1], outputs[2:], lams[2:]
    else:
        new, base, earlier, earlier_lams = None, outputs[0], outputs[1:], lams[1:]
    h = t.h[i]
    rks = [(lam - t.lam[i]) / h for lam in earlier_lams] + ([1.0] if corrector else [])
    a = _unipc_weights(h, rks, variant)
    out = data_prediction_step(x, t, i, [base])  # (sigma_t / sigma_s) x_s + alpha_t psi_1(h) D_i (DDIM)
    weight = t.alpha[i + 1] * _b_of_h(h, variant)
    for a_k, r_k, output in zip(a, rks, earlier):  # D1_k = (D_{i-k} - D_i) / r_k
        out.add_(output - base, alpha=weight * a_k / r_k)
    if corrector:  # D1_p = D_{i+1} - D_i at r_p = 1
        out.add_(new - base, alpha=weight * a[-1])
    return out


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, *, model_kind="eps", order=2,
                 variant="bh2", use_corrector=True, lower_order_final=True, final_step=None):
    """UniPC: the multistep UniP-p predictor with the UniC corrector, one model call per step (module docstring).

    Options:
      model_kind: "eps" (VP/VE, x = x0 + sigma n) or "flow" (x = (1 - sigma) x0 + sigma n).
      order: the predictor's order p, 1-3 (the pair UniPC-p has order p + 1); warm-up runs 1, 2, ...  2 is the
        paper's recommendation for guided sampling and diffusers' default.
      variant: "bh2" (B(h) = 1 - e^{-h}; the paper's choice for guided sampling, diffusers' default) or "bh1"
        (B(h) = h).
      use_corrector: False gives UniP alone (for order 2 and "bh2", DPM-Solver++(2M)).
      lower_order_final: cap the order at the number of remaining steps (the last steps run ..., 2, 1), always
        applied as in diffusers' ``lower_order_final=True``; a step into sigma = 0 is first order in any case.
      final_step: as in ``sample_dpmpp_2m`` ("denoise": D of the last point, the k-diffusion and diffusers step;
        "extrapolate"; "stop"; None: "extrapolate" on flow models whose last positive sigma is coarse, else
        "denoise").
    """
    check_positive_int("order", order, maximum=3)
    check_choice("variant", variant, VARIANTS)
    final_step = _final_step(final_step)
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, model_kind=model_kind,
                     final_step="stop" if final_step == "stop" else "denoise")
    t = run.table
    final_step = _resolve_final_step(final_step, t, model_kind)
    x = run.start(x)
    lams, outputs = [], []  # newest first: the points the last predictor used, then this step's
    previous = None  # (step index, x before it, the points its predictor used) for the corrector
    for i in run.range():
        denoised = run.denoise(x, i)
        into_zero = t.sigma[i + 1] == 0
        if use_corrector and previous is not None and not into_zero:
            # UniC (Eq. 6): redo step i - 1 with D_i; the step into sigma = 0 returns D_i whatever x_i is
            j, x_previous, used_lams, used_outputs = previous
            x = _unipc_step(x_previous, t, j, [t.lam[i]] + used_lams, [denoised] + used_outputs, variant, True)
        run.report(x, i, denoised)
        lams, outputs = [t.lam[i]] + lams[:order - 1], [denoised] + outputs[:order - 1]
        if into_zero and final_step == "extrapolate":
            x = extrapolated_denoised(lams, outputs)
            continue
        p = run.order(i, order, lower_order_final, len(lams))
        previous = (i, x, lams[:p], outputs[:p])
        x = _unipc_step(x, t, i, lams[:p], outputs[:p], variant, False)
    return run.finish(x)


__all__ = ["sample_unipc", "VARIANTS"]
