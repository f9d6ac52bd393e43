"""A quality score that needs no download: a small digit classifier trained on the same 16x16 MNIST data.

``QualityScore.frechet_distance(images)`` is the Fréchet distance (Heusel et al. 2017, the FID formula)
    FD = |mu_r - mu_g|^2 + tr(C_r + C_g - 2 (C_r^1/2 C_g C_r^1/2)^1/2)
between Gaussians fitted to the classifier's 64-d penultimate features of the real digits (statistics shipped with
the weights) and of the generated ones.  Like FID it is biased upward for small sample counts: compare scores at the
same count, and against ``real_floor(n)``, the score of n real digits (measured at training time).
``class_confidence(images, labels)`` is the mean softmax probability of the intended class (1.0 is perfect).
"""
from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
CLASSIFIER_PATH = HERE / "mnist16_classifier.safetensors"
FEATURES = 64


class DigitClassifier(nn.Module):
    def __init__(self, features=FEATURES, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, features), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.features(images))


def gaussian_statistics(features: torch.Tensor):
    f = features.to(torch.float64)
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / max(len(f) - 1, 1)


def _sqrtm_psd(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2), in float64 (symmetric form, no scipy)."""
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mean_a - mean_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class QualityScore:
    """Fréchet distance and class confidence of 1x16x16 images in [-1, 1] (the embedded models' data space)."""

    def __init__(self, path=None):
        from safetensors.torch import load_file

        path = pathlib.Path(path) if path else CLASSIFIER_PATH
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; train it with `python -m dpm_solver_nodes.embedded.train classifier`")
        tensors = load_file(str(path))
        meta_path = path.with_suffix(".json")
        self.metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.reference_mean = tensors.pop("reference_mean").to(torch.float64)
        self.reference_cov = tensors.pop("reference_cov").to(torch.float64)
        self.network = DigitClassifier()
        self.network.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        self.network.eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, images, batch=500):
        images = self._check(images)
        return torch.cat([self.network.features(images[i:i + batch]) for i in range(0, len(images), batch)])

    @torch.no_grad()
    def probabilities(self, images, batch=500):
        images = self._check(images)
        return torch.cat([self.network(images[i:i + batch]).softmax(1) for i in range(0, len(images), batch)])

    def frechet_distance(self, images) -> float:
        if len(images) < 2:
            raise ValueError("the Fréchet distance needs at least 2 images")
        mean, cov = gaussian_statistics(self.features(images))
        return frechet_distance(self.reference_mean, self.reference_cov, mean, cov)

    def class_confidence(self, images, labels) -> float:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(len(images))
        probs = self.probabilities(images)
        return float(probs.gather(1, labels[:, None]).mean())

    def accuracy(self, images, labels) -> float:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(len(images))
        return float((self.probabilities(images).argmax(1) == labels).float().mean())

    def real_floor(self, n):
        """The Fréchet distance of n real digits (mean over draws at training time; nearest measured n)."""
        floors = {int(k): v for k, v in self.metadata.get("real_floor", {}).items()}
        if not floors:
            return float("nan")
        return floors[min(floors, key=lambda k: abs(k - n))]

    @staticmethod
    def _check(images):
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 16, 16):
            raise ValueError(f"expected images of shape (N, 1, 16, 16), got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf")
        return images.detach().to("cpu", torch.float32)
