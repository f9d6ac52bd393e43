"""Analytic "checkpoints" with exact denoisers, for tests and benchmarks (host-free, float64)."""
from .gaussian_mixture import GaussianMixture, GuidedGaussianMixture, reference_solution, sample_noise

__all__ = ["GaussianMixture", "GuidedGaussianMixture", "reference_solution", "sample_noise"]
