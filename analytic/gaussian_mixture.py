"""A Gaussian-mixture data distribution with its exact denoiser: a diffusion "checkpoint" whose probability-flow ODE
we can solve to any tolerance.

p0 = sum_k pi_k N(mu_k, diag v_k).  For x = x0 + sigma n (``model_kind="eps"``) the posterior over components has
responsibilities r_k = softmax_k[log pi_k - 1/2 sum_i (log 2pi(v_ki + sigma^2) + (x_i - mu_ki)^2 / (v_ki + sigma^2))],
the posterior mean of component k is m_k = mu_k + v_k / (v_k + sigma^2) (x - mu_k), its variance
c_k = v_k sigma^2 / (v_k + sigma^2), and D(x, sigma) = sum_k r_k m_k.  The Jacobian diagonal is
dD_i/dx_i = Var[x0_i | x] / sigma^2 = (sum_k r_k (c_ki + m_ki^2) - D_i^2) / sigma^2.

Flow models (x = (1 - sigma) x0 + sigma n) are the same distribution in rescaled coordinates:
D_flow(x, sigma) = D(x / (1 - sigma), sigma / (1 - sigma)), and D_flow(x, 1) = E[x0].

``GuidedGaussianMixture`` is classifier-free guidance with an exact conditional: the class-conditional mixture
keeps only the components of one class, and D_cfg = D_uncond + w (D_cond - D_uncond).
"""
from __future__ import annotations

import math

import numpy as np
import torch


class GaussianMixture:
    def __init__(self, means, variances, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(variances, dtype=torch.float64).expand_as(self.means).clone()
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        self.log_weights = torch.log(w / w.sum())

    @classmethod
    def random(cls, dim=8, components=5, seed=0, spread=2.0, variance_range=(0.05, 0.5)):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread
        lo, hi = variance_range
        variances = lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, variances, weights)

    @property
    def dim(self):
        return self.means.shape[1]

    def mean(self):
        return (self.log_weights.exp()[:, None] * self.means).sum(0)

    # ---- exact posterior quantities in eps (VE) coordinates -------------------------------------------------
    def _posterior(self, x, sigma):
        """x: (B, d) float64, sigma: (B,) float64 > 0 -> responsibilities (B, K), means (B, K, d), vars (B, K, d)."""
        s2 = (sigma ** 2)[:, None, None]
        v = self.variances[None]
        total = v + s2
        diff = x[:, None, :] - self.means[None]
        logp = self.log_weights[None] - 0.5 * (torch.log(2 * math.pi * total) + diff ** 2 / total).sum(-1)
        r = torch.softmax(logp, dim=1)
        m = self.means[None] + v / total * diff
        c = v * s2 / total
        return r, m, c

    def denoise_ve(self, x, sigma):
        r, m, _ = self._posterior(x, sigma)
        return (r[..., None] * m).sum(1)

    def jacobian_diagonal_ve(self, x, sigma):
        r, m, c = self._posterior(x, sigma)
        d = (r[..., None] * m).sum(1)
        second = (r[..., None] * (c + m ** 2)).sum(1)
        return (second - d ** 2) / (sigma ** 2)[:, None]

    # ---- k-diffusion denoiser interface ------------------------------------------------------------------------
    def denoiser(self, model_kind="eps"):
        """A callable ``model(x, sigma_batch, **extra_args) -> x0`` in the k-diffusion convention."""

        def model(x, sigma, **_):
            return self.denoise(x, sigma, model_kind)

        model.mixture = self
        model.model_kind = model_kind
        return model

    def denoise(self, x, sigma, model_kind="eps"):
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(torch.float64)
        if xf.shape[1] != self.dim:
            raise ValueError(f"latent has {xf.shape[1]} elements per sample, the mixture has dim {self.dim}")
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(shape[0]).cpu()
        xf = xf.cpu()
        if model_kind == "flow":
            out = torch.empty_like(xf)
            pure = s >= 1
            if pure.any():
                out[pure] = self.mean()
            keep = ~pure
            if keep.any():
                a = (1 - s[keep])[:, None]
                out[keep] = self.denoise_ve(xf[keep] / a, s[keep] / (1 - s[keep]))
        else:
            out = self.denoise_ve(xf, s)
        return out.reshape(shape).to(device=x.device, dtype=dtype)

    def sample(self, n, generator=None):
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.variances[idx].sqrt() * z


class GuidedGaussianMixture:
    """Classifier-free guidance over a mixture: D = D_uncond + scale * (D_cond - D_uncond).

    The condition selects the components in ``class_components``; scale 1 is the conditional model itself.
    """

    def __init__(self, mixture: GaussianMixture, class_components, scale=1.0):
        self.uncond = mixture
        idx = torch.as_tensor(class_components)
        w = mixture.log_weights.exp()[idx]
        self.cond = GaussianMixture(mixture.means[idx], mixture.variances[idx], w)
        self.scale = float(scale)

    @property
    def dim(self):
        return self.uncond.dim

    def denoise(self, x, sigma, model_kind="eps"):
        du = self.uncond.denoise(x, sigma, model_kind)
        if self.scale == 1.0:
            return self.cond.denoise(x, sigma, model_kind)
        dc = self.cond.denoise(x, sigma, model_kind)
        return du + self.scale * (dc - du)

    def denoise_ve(self, x, sigma):
        du = self.uncond.denoise_ve(x, sigma)
        return du + self.scale * (self.cond.denoise_ve(x, sigma) - du)

    def jacobian_diagonal_ve(self, x, sigma):
        ju = self.uncond.jacobian_diagonal_ve(x, sigma)
        return ju + self.scale * (self.cond.jacobian_diagonal_ve(x, sigma) - ju)

    def mean(self):
        return self.uncond.mean() + self.scale * (self.cond.mean() - self.uncond.mean())

    denoiser = GaussianMixture.denoiser


def sample_noise(batch, shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=g, dtype=dtype)


def reference_solution(model, x, sigma_start, sigma_end, model_kind="eps", rtol=1e-12, atol=1e-12):
    """The probability-flow ODE solution from ``sigma_start`` to ``sigma_end`` (DOP853, float64).

    Integrates dx/dt = x - D(x, e^t) in t = log sigma in VE coordinates (flow latents are mapped by
    x_ve = x / (1 - sigma), sigma_ve = sigma / (1 - sigma)).  ``sigma_end = 0`` returns the limit D(x(sigma), sigma)
    for sigma -> 0, evaluated at sigma_ve = 1e-6 * min(sigma_ve_start, 1) (the denoiser is smooth there for v_k > 0).
    A flow start at sigma = 1 uses the exact first step to sigma_ve = 1e6.
    """
    from scipy.integrate import solve_ivp

    shape = x.shape
    xf = x.reshape(shape[0], -1).to(torch.float64).cpu()
    mixture = model.mixture if hasattr(model, "mixture") else model

    def to_ve(sig):
        return sig / (1 - sig) if model_kind == "flow" else sig

    to_zero = sigma_end == 0
    if model_kind == "flow":
        if sigma_start >= 1:
            # x = n at sigma = 1; in VE coordinates at sigma_ve = S the state is x0 + S n ~ S n for huge S, and
            # the exact flow from S = inf to S' is x(S') = E[x0] + S' n + O(1/S) -> start at S = 1e6 with S*n + mean.
            s_ve_start = 1e6
            x_ve = xf * s_ve_start + mixture.mean()[None]
        else:
            s_ve_start = to_ve(sigma_start)
            x_ve = xf / (1 - sigma_start)
    else:
        s_ve_start = sigma_start
        x_ve = xf
    s_ve_end = 1e-6 * min(s_ve_start, 1.0) if to_zero else to_ve(sigma_end)

    n = x_ve.shape[0]

    def rhs(t, y):
        xs = torch.from_numpy(y.reshape(n, -1))
        sig = torch.full((n,), math.exp(t), dtype=torch.float64)
        return (xs - mixture.denoise_ve(xs, sig)).numpy().ravel()

    sol = solve_ivp(rhs, (math.log(s_ve_start), math.log(s_ve_end)), x_ve.numpy().ravel(), method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    y = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1]).reshape(n, -1))
    if to_zero:
        y = mixture.denoise_ve(y, torch.full((n,), s_ve_end, dtype=torch.float64))
    elif model_kind == "flow":
        y = y * (1 - sigma_end)
    return y.reshape(shape).to(x.dtype)
