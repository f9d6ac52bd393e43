"""Noise sources of the stochastic samplers: ``noise(sigma_s, sigma_t)`` returns a standard normal like the latent.

- ``BrownianNoise`` (``noise_type="brownian"``, the SDE solvers' default): one Brownian path W(sigma) per sample
  seed, sampled at all of the run's sigmas in one pass at the start (a Brownian bridge construction, Levy 1939;
  Glasserman 2004, Sec. 3.1), so a step costs one subtraction and the run about one normal draw per step.
- ``TorchsdeBrownianNoise`` (``"brownian_tree"``): torchsde's Brownian tree per sample, exactly k-diffusion's
  ``BrownianTreeNoiseSampler`` with a list of seeds; about 20 tree levels per query.
- ``GaussianNoise`` (``"gaussian"``): independent draws per call (ancestral-sampler noise).

Every source seeds each sample from its own seed (``batch_seeds``), so a sample's noise does not depend on the batch
it is in.  Seeds are reduced modulo 2**64, the reduction ``torch.Generator.manual_seed`` applies itself (-1 and
2**64 - 1 give the same noise), so ComfyUI's largest seed 2**64 - 1 works and every seed in [0, 2**64) keeps its noise.
"""
from __future__ import annotations

import bisect
import math
import struct

import torch

SEED_MODULUS = 2 ** 64
NOISE_TYPES = ("brownian", "gaussian", "brownian_tree")


def batch_seeds(extra_args, batch_size: int, seed=None):
    """One seed per sample, each in [0, 2**64): an explicit ``seed`` argument, else ``extra_args["seed"]`` (ComfyUI
    passes one), else a random one.  An int seed s gives sample i the seed (s + i) mod 2**64 (the WebUI's
    convention), so a sample's noise does not depend on the batch size; a list gives each sample its own seed, so
    it does not depend on the position either.
    """
    if seed is None and extra_args:
        seed = extra_args.get("seed")
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, []).item())
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for a batch of {batch_size}")
        return [int(s) % SEED_MODULUS for s in seed]
    return [(int(seed) + j) % SEED_MODULUS for j in range(batch_size)]


def noise_dtype(x):
    """The dtype noise is drawn in for a latent like x: its own if float32/float64, else float32 (the samplers'
    working precision for fp16/bf16 latents, see common.py)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def derived_seed(seed: int, key: int) -> int:
    """A seed for the stream ``key`` of the sample seeded ``seed``: SplitMix64's finaliser (Steele et al. 2014) of
    seed + golden-ratio * (key + 1), so nearby seeds and keys give unrelated generator states."""
    z = (seed + 0x9E3779B97F4A7C15 * (key + 1)) % SEED_MODULUS
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % SEED_MODULUS
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % SEED_MODULUS
    return z ^ (z >> 31)


def _float_key(value: float) -> int:
    """The stream key of an off-grid query time: its float64 bit pattern, above the level keys."""
    return (1 << 62) | struct.unpack("<q", struct.pack("<d", float(value)))[0]


class BrownianNoise:
    """One Brownian path W(sigma) per sample, in "time" sigma, sampled at the run's sigmas in one pass.

    ``noise(sigma_s, sigma_t)`` returns (W(sigma_t) - W(sigma_s)) / sqrt(|sigma_t - sigma_s|), a standard normal per
    element, signed in the direction of travel like ``TorchsdeBrownianNoise`` (and k-diffusion).

    Construction (Brownian bridge, coarse to fine): with the run's distinct positive sigmas sorted,
    t_0 < ... < t_N, W(t_0) = 0, W(t_N) = sqrt(t_N - t_0) Z, then level by level the middle index m of every
    interval (a, b) of the previous level gets the bridge value

        W(t_m) = W(t_a) + (t_m - t_a) / (t_b - t_a) (W(t_b) - W(t_a)) + sqrt((t_m - t_a)(t_b - t_m) / (t_b - t_a)) Z,

    so (W(t_0), ..., W(t_N)) has exactly the law of a Brownian path at those times.  Level l's normals Z come from one
    generator per sample seeded by (sample seed, l) and are drawn in one call, so the whole path costs N normal
    draws, about ceil(log2 N) + 1 draws calls per sample and a few tensor operations per level.

    What stays fixed: the same seed and sigmas give the same path on any batch; a schedule whose interval count is
    a power of two and its refinement with twice the intervals (each old sigma kept) give the same W at the old
    sigmas, so doubling such a schedule refines one path, as a Brownian tree does.  Other step counts build a
    different bridge over the same coarse levels' draws: a fresh sample of one Brownian law, not the same path
    (``"brownian_tree"`` keeps one path for any sigmas, at about 60x the cost).  A query at a sigma outside the
    run's list is bridged from its nearest known neighbours with a normal keyed by (seed, sigma) and then kept.

    The path lives on the latent's device (``cpu=True``: on the CPU, then moved), float64 for float64 latents and
    float32 otherwise; memory: (N + 1) latents.
    """

    def __init__(self, x, sigmas, seeds, cpu=False):
        self.device = x.device
        self.dtype = noise_dtype(x)
        self.gen_device = torch.device("cpu") if cpu else x.device
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(x.shape[1:])
        s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        self.times = sorted(set(s[s > 0].tolist()))
        if not self.times:
            raise ValueError("a Brownian path needs at least one positive sigma")
        self.index = {t: k for k, t in enumerate(self.times)}
        # down[k] = (W(t_k) - W(t_k+1)) / sqrt(t_k+1 - t_k): the noise of each step down the list, built in place
        # in one buffer (one allocation per run); W itself is rebuilt from it only for other queries.
        self.down = self._build(self.times)
        self.path = None
        self.extra = {}  # values at sigmas queried off the run's list, (batch, *shape)

    def _generators(self, key):
        return [torch.Generator(device=self.gen_device).manual_seed(derived_seed(seed, key)) for seed in self.seeds]

    def _normals(self, key, count):
        """(count, batch, *shape) standard normals: stream ``key`` of each sample's seed."""
        out = torch.empty((count, len(self.seeds)) + self.shape, dtype=self.dtype, device=self.gen_device)
        for j, generator in enumerate(self._generators(key)):
            for k in range(count):
                out[k, j].normal_(generator=generator)
        return out

    def _build(self, t):
        n = len(t) - 1
        path = torch.empty((n + 1, len(self.seeds)) + self.shape, dtype=self.dtype, device=self.gen_device)
        path[0] = 0
        if n == 0:
            return path[:0].to(self.device)
        path[n] = self._normals(0, 1)[0].mul_(math.sqrt(t[n] - t[0]))
        intervals, level = [(0, n)], 1
        while True:
            split = [(a, (a + b) // 2, b) for a, b in intervals if b - a >= 2]
            if not split:
                break
            generators = self._generators(level)
            for a, m, b in split:  # each sample's level stream, node by node, drawn in place
                for j, generator in enumerate(generators):
                    path[m, j].normal_(generator=generator)
                weight = (t[m] - t[a]) / (t[b] - t[a])
                path[m].mul_(math.sqrt((t[m] - t[a]) * (t[b] - t[m]) / (t[b] - t[a])))
                path[m].add_(path[a], alpha=1 - weight).add_(path[b], alpha=weight)
            intervals = [pair for a, m, b in split for pair in ((a, m), (m, b))]
            level += 1
        for k in range(n):  # W -> normalised downward increments, in place (path[k + 1] is still W there)
            path[k].sub_(path[k + 1]).mul_(1 / math.sqrt(t[k + 1] - t[k]))
        return path[:n].to(self.device)

    def value(self, sigma: float):
        """W(sigma) for every sample, (batch, *shape)."""
        k = self.index.get(sigma)
        if k is not None:
            if self.path is None:  # W(t_0) = 0, W(t_k+1) = W(t_k) - down[k] sqrt(t_k+1 - t_k)
                t = torch.tensor(self.times, dtype=torch.float64)
                steps = self.down * (t[1:] - t[:-1]).sqrt().to(self.down).view((-1,) + (1,) * (self.down.ndim - 1))
                self.path = torch.cat([torch.zeros_like(self.down[:1]) if len(self.down) else
                                       torch.zeros((1, len(self.seeds)) + self.shape, dtype=self.dtype,
                                                   device=self.device), -steps.cumsum(0)])
            return self.path[k]
        if sigma not in self.extra:
            self.extra[sigma] = self._off_grid(sigma)
        return self.extra[sigma]

    def _off_grid(self, sigma):
        known = sorted(list(self.times) + list(self.extra))
        z = self._normals(_float_key(sigma), 1)[0].to(self.device)
        k = bisect.bisect_left(known, sigma)
        if k == 0:  # below every known time: W runs backwards from the lowest one
            return self.value(known[0]) - z * math.sqrt(known[0] - sigma)
        if k == len(known):
            return self.value(known[-1]) + z * math.sqrt(sigma - known[-1])
        lo, hi = known[k - 1], known[k]
        weight = (sigma - lo) / (hi - lo)
        spread = math.sqrt((sigma - lo) * (hi - sigma) / (hi - lo))
        return torch.lerp(self.value(lo), self.value(hi), weight) + z * spread

    def __call__(self, sigma_s, sigma_t):
        sigma_s, sigma_t = float(sigma_s), float(sigma_t)
        if not (sigma_s > 0 and sigma_t > 0 and sigma_s != sigma_t):
            raise ValueError(f"noise interval [{sigma_t!r}, {sigma_s!r}] must have two distinct positive ends")
        lo, hi = min(sigma_s, sigma_t), max(sigma_s, sigma_t)
        k = self.index.get(lo)
        if sigma_t < sigma_s and k is not None and k + 1 < len(self.times) and self.times[k + 1] == hi:
            return self.down[k]  # a step of the run: a view, read it only
        scale = (1.0 if sigma_t > sigma_s else -1.0) / math.sqrt(hi - lo)
        return (self.value(hi) - self.value(lo)) * scale


class TorchsdeBrownianNoise:
    """Seeded Brownian-tree noise, one tree per sample (torchsde's BrownianTree, as k-diffusion uses).

    ``noise(sigma_s, sigma_t)`` returns (W(t) - W(s)) / sqrt(|t - s|) in "time" t = sigma, a standard normal per
    element, and the same value for the same interval whatever the step sizes around it.  This is exactly
    k-diffusion's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)`` with a list of seeds (same trees,
    same sign: the increment in the direction of travel), so a sampler fed either gets the same noise.  Each sample
    has its own tree (w0 of one sample's shape), so a sample's noise does not depend on the batch it is in;
    k-diffusion and ComfyUI given an int seed build one tree over the whole batch instead.

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


def make_noise(x, sigmas, extra_args, noise_type="brownian", seed=None, cpu=False):
    """A noise sampler for an SDE solver: ``noise(sigma_s, sigma_t)`` returns a standard normal like x."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    seeds = batch_seeds(extra_args, x.shape[0], seed)
    if noise_type == "gaussian":
        return GaussianNoise(x, seeds, cpu=cpu)
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if noise_type == "brownian":
        return BrownianNoise(x, s, seeds, cpu=cpu)
    positive = s[s > 0]
    return TorchsdeBrownianNoise(x, positive.min().item(), positive.max().item(), seeds, cpu=cpu)
