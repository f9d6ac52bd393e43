"""Noise sources (samplers/noise.py) and the seed / empty-batch probes of issue 11.

The Brownian path is checked against its definition and against torchsde's Brownian tree on the same seeds:
increments are standard normal and independent across steps (sample moments within sampling error), a sample's path
does not depend on its batch, doubling a power-of-two schedule refines the same path, and the 2M SDE converges as
steps double (strong error against a fine run on the same path) like it does on torchsde's tree.
"""
import math

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, sample_noise
from dpm_solver_nodes.samplers import (sample_consistency, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                       sample_dpmpp_2m_sde)
from dpm_solver_nodes.samplers.noise import (BrownianNoise, GaussianNoise, TorchsdeBrownianNoise, batch_seeds,
                                             make_noise)
from dpm_solver_nodes.samplers.sigmas import karras, make_sigmas

MIXTURE = GaussianMixture.random(dim=8, components=5, seed=0)


def karras_positive(n, lo=0.03, hi=14.6):
    return karras(n, lo, hi)


def test_path_values_do_not_depend_on_the_batch_or_on_refinement():
    x = torch.zeros(3, 4, 5)
    coarse = karras_positive(9)           # 8 intervals
    fine = karras_positive(17)            # 16 intervals: every coarse sigma is kept
    a = BrownianNoise(x, coarse, [7, 8, 9])
    b = BrownianNoise(x, fine, [7, 8, 9])
    alone = BrownianNoise(x[:1], fine, [8])
    for k, sigma in enumerate(coarse.tolist()):  # equal up to the rounding of rebuilding W from the increments
        torch.testing.assert_close(a.value(sigma), b.value(fine[2 * k].item()), rtol=1e-5, atol=1e-5)
    for sigma in fine.tolist():
        torch.testing.assert_close(alone.value(sigma)[0], b.value(sigma)[1], rtol=0, atol=0)
    # the same seeds and sigmas give the same path; another seed another one
    torch.testing.assert_close(BrownianNoise(x, coarse, [7, 8, 9]).down, a.down, rtol=0, atol=0)
    assert not torch.allclose(BrownianNoise(x, coarse, [1, 8, 9]).down[:, 0], a.down[:, 0])
    # a step's noise is the normalised increment of the path
    step = a(coarse[3].item(), coarse[2].item())
    torch.testing.assert_close(step, (a.value(coarse[2].item()) - a.value(coarse[3].item())) /
                               (coarse[3] - coarse[2]).abs().sqrt().item(), rtol=1e-4, atol=1e-5)


def test_increments_are_independent_standard_normals():
    """Normalised increments over every step of a 20-step Karras run: mean 0, variance 1, uncorrelated across steps,
    within 5 standard errors (the path of 2 x 8192 elements per step)."""
    x = torch.zeros(2, 8192, dtype=torch.float64)
    sigmas = make_sigmas("karras", 20, "eps", 0.03, 14.6)
    noise = make_noise(x, sigmas, None, "brownian", seed=11)
    z = torch.stack([noise(sigmas[i], sigmas[i + 1]) for i in range(19)]).reshape(19, -1)
    count = z.shape[1]
    assert z.mean(1).abs().max() < 5 / math.sqrt(count)
    assert (z.var(1) - 1).abs().max() < 5 * math.sqrt(2 / count)
    correlation = (z[:-1] * z[1:]).mean(1)
    assert correlation.abs().max() < 5 / math.sqrt(count)
    # an interval spanning several steps has the variance of its length (a Brownian increment, not a sum of
    # unrelated draws), and an off-grid query bridges the path
    long = noise(sigmas[2], sigmas[12])
    assert abs(long.var().item() - 1) < 5 * math.sqrt(2 / count)
    off = noise(5.0, 1.0)
    assert abs(off.var().item() - 1) < 5 * math.sqrt(2 / count)


def test_direction_and_bad_intervals():
    x = torch.zeros(2, 16)
    noise = BrownianNoise(x, karras_positive(5), [1, 2])
    torch.testing.assert_close(noise(1.0, 4.0), -noise(4.0, 1.0))
    with pytest.raises(ValueError, match="distinct positive"):
        noise(1.0, 1.0)
    with pytest.raises(ValueError, match="positive sigma"):
        BrownianNoise(x, torch.zeros(2), [1, 2])


def test_statistics_match_torchsde_tree():
    """Our path and torchsde's tree on the same seeds and sigmas: both give standard-normal increments; the
    per-step variances agree within sampling error (they are different draws of one law)."""
    x = torch.zeros(4, 4096, dtype=torch.float64)
    sigmas = make_sigmas("karras", 10, "eps", 0.03, 14.6)
    ours = make_noise(x, sigmas, None, "brownian", seed=3)
    tree = make_noise(x, sigmas, None, "brownian_tree", seed=3)
    assert isinstance(tree, TorchsdeBrownianNoise)
    count = x.numel()
    for i in range(9):
        a, b = ours(sigmas[i], sigmas[i + 1]), tree(sigmas[i], sigmas[i + 1])
        assert abs(a.var().item() - b.var().item()) < 10 * math.sqrt(2 / count)
        assert abs(a.mean().item()) < 5 / math.sqrt(count) and abs(b.mean().item()) < 5 / math.sqrt(count)


def strong_error(noise_type, steps, fine_steps, seed=5, batch=64):
    """Median over samples of the per-sample RMS difference between the 2M SDE at ``steps`` and at ``fine_steps``
    on the same Brownian path (a few samples near basin boundaries switch modes, so the mean is noisy)."""
    model = MIXTURE.denoiser("eps")
    x = sample_noise(batch, (8,), seed=seed) * 14.6

    def run(n):
        sigmas = torch.cat([karras(n, 0.05, 14.6), torch.zeros(1, dtype=torch.float64)])
        # build the path on the finest grid so both runs query one path at their own sigmas
        noise = make_noise(x, torch.cat([karras(fine_steps, 0.05, 14.6), torch.zeros(1)]), None, noise_type,
                           seed=list(range(seed, seed + batch)))
        return sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=noise, disable=True)

    return float((run(steps) - run(fine_steps)).pow(2).mean(1).sqrt().median())


def test_2m_sde_converges_on_one_path():
    """Karras schedules with 2^k intervals are nested, so every run samples one path: the error against a
    257-sigma run falls as the steps double.  Measured at 9 / 17 / 33 / 65 / 129 sigmas: ours 0.198 / 0.0568 /
    0.0225 / 0.0103 / 0.0042, torchsde's tree 0.218 / 0.0655 / 0.0231 / 0.0098 / 0.0044 (order 1.2 for both; the
    tree takes about 3 minutes here, so only ours runs)."""
    errors = [strong_error("brownian", n, 257) for n in (17, 33, 65)]
    assert errors[0] > errors[1] > errors[2]
    assert math.log2(errors[0] / errors[2]) / 2 > 0.9


# ----------------------------------------------------------------------------------------------------------------
# Seeds and batches (issue 11's probes)
# ----------------------------------------------------------------------------------------------------------------

def test_seeds_are_reduced_like_torch_reduces_them():
    assert batch_seeds(None, 3, 2 ** 64 - 1) == [2 ** 64 - 1, 0, 1]
    assert batch_seeds(None, 2, -1) == [2 ** 64 - 1, 0]
    assert batch_seeds(None, 2, [5, 2 ** 70]) == [5, 2 ** 70 % 2 ** 64]
    x = torch.zeros(1, 8)
    # a seed and the same seed modulo 2**64 draw the same noise (torch's own reduction)
    torch.testing.assert_close(GaussianNoise(x, batch_seeds(None, 1, -1))(1.0, 0.5),
                               GaussianNoise(x, [2 ** 64 - 1])(1.0, 0.5))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "consistency", "2m_sde_gaussian", "2m_sde_brownian"])
def test_largest_comfyui_seed_samples(name):
    """ComfyUI's largest seed 2**64 - 1 with a batch of 2 (the second sample's seed wraps to 0); raised
    OverflowError ("Overflow when unpacking long long") in the Gaussian-noise paths before."""
    model = MIXTURE.denoiser("eps")
    x = sample_noise(2, (8,), seed=1) * 14.6
    sigmas = make_sigmas("karras", 6, "eps", 0.05, 14.6)
    run = {"ddim": lambda **kw: sample_ddim(model, x, sigmas, eta=1.0, **kw),
           "ddpm": lambda **kw: sample_ddpm(model, x, sigmas, **kw),
           "consistency": lambda **kw: sample_consistency(model, x, sigmas, **kw),
           "2m_sde_gaussian": lambda **kw: sample_dpmpp_2m_sde(model, x, sigmas, noise_type="gaussian", **kw),
           "2m_sde_brownian": lambda **kw: sample_dpmpp_2m_sde(model, x, sigmas, **kw)}[name]
    out = run(extra_args={"seed": 2 ** 64 - 1}, disable=True)
    assert torch.isfinite(out).all()
    # sample 1 got seed 0: the same as a batch of one with seed 0
    alone = {"ddim": lambda **kw: sample_ddim(model, x[1:], sigmas, eta=1.0, **kw),
             "ddpm": lambda **kw: sample_ddpm(model, x[1:], sigmas, **kw),
             "consistency": lambda **kw: sample_consistency(model, x[1:], sigmas, **kw),
             "2m_sde_gaussian": lambda **kw: sample_dpmpp_2m_sde(model, x[1:], sigmas, noise_type="gaussian", **kw),
             "2m_sde_brownian": lambda **kw: sample_dpmpp_2m_sde(model, x[1:], sigmas, **kw)}[name]
    torch.testing.assert_close(out[1:], alone(extra_args={"seed": 0}, disable=True))


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_ddim, sample_dpmpp_2m_sde])
def test_empty_batch_is_a_clear_error(sampler):
    sigmas = make_sigmas("karras", 4, "eps", 0.05, 14.6)
    with pytest.raises(ValueError, match="empty"):
        sampler(MIXTURE.denoiser("eps"), torch.zeros(0, 8, dtype=torch.float64), sigmas, disable=True)


def test_path_costs_one_normal_draw_per_sigma(monkeypatch):
    """The cost the benchmark row measures, as a count that cannot be noisy: N + 1 sigmas cost N latent-sized normal
    draws per sample from ceil(log2 N) + 1 generators per sample, whatever the schedule."""
    draws, streams = [0], [0]
    normal, generators = torch.Tensor.normal_, BrownianNoise._generators

    def counting_normal(self, *args, **kwargs):
        draws[0] += 1
        return normal(self, *args, **kwargs)

    def counting_generators(self, key):
        streams[0] += 1
        return generators(self, key)

    monkeypatch.setattr(torch.Tensor, "normal_", counting_normal)
    monkeypatch.setattr(BrownianNoise, "_generators", counting_generators)
    for n in (2, 5, 20, 33, 100):
        draws[0] = streams[0] = 0
        BrownianNoise(torch.zeros(2, 3), karras_positive(n + 1), [1, 2])
        assert draws[0] == 2 * n and streams[0] == math.ceil(math.log2(n)) + 1
