"""Classifiers trained on the real labelled images' downsampled pixels, for the demo's metrics that
need no downloaded network: a logistic regression that judges which class a sample shows (class
consistency) and a small MLP whose hidden layer is a feature space (Frechet distance)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import Tensor

from unite.metrics.inputs import MetricsInputError

Model = TypeVar("Model")  # an sklearn classifier


def downsample_pixels(images: Tensor, size: int) -> Tensor:
    """uint8 (N, 3, H, W) -> float64 (N, 3 * size * size) in [0, 1], by area averaging."""
    small = F.adaptive_avg_pool2d(images.to(torch.float64) / 255.0, (size, size))
    return small.flatten(1)


def _fit_on_pixels(model: Model, images: Tensor, labels: Sequence[int] | Tensor, size: int, what: str) -> Model:
    """Fit an sklearn classifier on the downsampled pixels of labelled uint8 (N, 3, H, W) images;
    `what` names it in the error for a label count that does not match."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise MetricsInputError(f"{what}: {len(images)} train images but {len(labels)} labels")
    with threadpool_limits(1):  # a small fit: threaded BLAS only adds overhead
        return model.fit(downsample_pixels(images, size).numpy(), labels)


class PixelClassifier:
    """Logistic regression on downsampled pixels, trained on real labelled images: an independent
    judge of whether class-conditional samples show their class."""

    def __init__(self, images: Tensor, labels: Sequence[int] | Tensor, *, size: int = 8, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        self.size = size
        self.model = _fit_on_pixels(LogisticRegression(max_iter=2000, random_state=seed), images, labels, size,
                                   "class-consistency classifier")

    def predict(self, images: Tensor) -> np.ndarray:
        """Predicted class of each uint8 (N, 3, H, W) image."""
        return self.model.predict(downsample_pixels(images, self.size).numpy())


class ClassifierFeatures:
    """Hidden-layer activations of a small MLP classifier trained on labelled real images (downsampled
    pixels): a feature space that tracks class-relevant structure, fitted offline in seconds."""

    def __init__(self, images: Tensor, labels: Sequence[int] | Tensor, *, size: int = 8, hidden: int = 64,
                 seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.size = size
        self.name = f"classifier-mlp{hidden}-pixel{size}"
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=500, early_stopping=True, random_state=seed)
        self.model = _fit_on_pixels(mlp, images, labels, size, "classifier features")

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        pixels = downsample_pixels(images, self.size).numpy()
        hidden = np.maximum(pixels @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)
        return torch.from_numpy(hidden), None
