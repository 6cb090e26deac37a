"""Class consistency: the fraction of class-conditional samples that a classifier trained on the
real images (`PixelClassifier`) assigns to the class they were generated for."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from unite.metrics.inputs import MetricsInputError
from unite.metrics.pixel_classifiers import PixelClassifier


def class_consistency(classifier: PixelClassifier, images: Tensor, labels: Sequence[int] | Tensor) -> float:
    """Fraction of uint8 images that the classifier assigns to the class they were generated for."""
    labels = np.asarray(labels)
    if len(labels) != len(images) or len(labels) == 0:
        raise MetricsInputError(f"class consistency: {len(images)} images and {len(labels)} labels; need equal, > 0")
    return float((classifier.predict(images) == labels).mean())


class ClassConsistency:
    """`class_consistency` over a stream of generated blocks (indices, labels, uint8 images
    (B, H, W, 3)), counting as it goes instead of holding the images."""

    def __init__(self, classifier: PixelClassifier):
        self.classifier = classifier
        self.correct = self.total = 0

    def __call__(self, indices: range, labels: Tensor, images: Tensor) -> None:
        if len(labels) != len(images):
            raise MetricsInputError(f"class consistency: {len(images)} images and {len(labels)} labels; need equal")
        self.correct += int((self.classifier.predict(images.permute(0, 3, 1, 2)) == np.asarray(labels)).sum())
        self.total += len(labels)

    @property
    def value(self) -> float:
        """Fraction of the images seen so far that show the class they were generated for."""
        if self.total == 0:
            raise MetricsInputError("class consistency: no images were given")
        return self.correct / self.total
