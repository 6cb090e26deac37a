"""The feature spaces that Frechet distances and IS are computed in, by name.

"inception" is torch-fidelity's own `inception-v3-compat` extractor loaded from a local weights file,
so FID/IS follow the protocol of torch-fidelity and JiT: uint8 images, features "2048" for FID,
KID and precision/recall, "logits_unbiased" for IS, and the spatial features of the ADM suite for
sFID (`SpatialFeatureSpace`). The demo's feature spaces ("pixel", "classifier") need no downloaded
weights and are reported as Frechet distances ("fd"), never as FID.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from unite.metrics.inputs import MetricsInputError, resolve_input_file
from unite.metrics.pixel_classifiers import ClassifierFeatures, downsample_pixels
from unite.options import FEATURE_SPACES
from unite.safe_load import UntrustedPickleError, load_torch_file, weights_check

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_WEIGHTS_ENV = "INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-compat"
POOL_DIM = 2048  # the pool features that FID, KID and precision/recall use
# The first 8 hex digits of the sha256 of the official weights files (torch hub's naming rule).
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
# sFID's features (the ADM evaluator's "mixed_6/conv:0", whose weights torch-fidelity loads into
# Mixed_6d.branch1x1): the first 7 of its 192 channels on the 17 x 17 grid, flattened in TensorFlow's
# (height, width, channel) order, so that statistics match the mu_s/sigma_s of ADM reference batches.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path`, else env INCEPTION_WEIGHTS; nothing is ever downloaded."""
    return resolve_input_file(
        path,
        "inception_weights",
        "CLI: --inception-weights PATH",
        INCEPTION_WEIGHTS_ENV,
        f"the local path of torch-fidelity's {INCEPTION_NAME} weights {INCEPTION_WEIGHTS_FILE} "
        f"(from {INCEPTION_WEIGHTS_URL})",
    )


class FeatureSpace(Protocol):
    """Maps a uint8 (N, 3, H, W) batch to (features (N, D), IS logits (N, K) or None)."""

    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


@runtime_checkable
class SpatialFeatureSpace(Protocol):
    """A feature space that also gives sFID's spatial features, from the same forward pass."""

    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def with_spatial(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]: ...


class InceptionFeatures:
    """torch-fidelity's `inception-v3-compat` network: "2048" pool features and the first 1000
    "logits_unbiased" (the ImageNet classes; the graph's 8 extra outputs are not classes)."""

    name = INCEPTION_NAME

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = resolve_inception_weights(weights)
        self.weights_check = weights_check(self.weights, INCEPTION_WEIGHTS_SHA256_PREFIX)
        try:
            # torch-fidelity would torch.load the file with full unpickling; it gets the state dict
            # rebuilt weights-only instead (tensors only, so its re-serialised copy runs no code).
            state, buffer = load_torch_file(self.weights, opt_in=None), io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            network = FeatureExtractorInceptionV3(
                INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
            )
        except UntrustedPickleError as exc:
            raise MetricsInputError(f"inception_weights: {exc}") from exc
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # torch.load or load_state_dict
            raise MetricsInputError(
                f"inception_weights={str(self.weights)!r}: could not be loaded as torch-fidelity's {INCEPTION_NAME} "
                f"state dict ({INCEPTION_WEIGHTS_FILE}): {type(exc).__name__}: {exc}"
            ) from exc
        self.device = torch.device(device)
        self.network = network.to(self.device)

    @classmethod
    def from_network(cls, network: torch.nn.Module, device: str | torch.device) -> "InceptionFeatures":
        """Features from an already built network on `device` (the dry run's stand-in); its
        weights are not the official ones."""
        features = cls.__new__(cls)
        features.weights, features.weights_check = None, "NOT the official weights (built without a weights file)"
        features.device, features.network = torch.device(device), network
        return features

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        pool, logits = self.network(images.to(self.device))
        return pool.cpu(), logits[:, :1000].cpu()

    def with_spatial(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pool features, logits and the (N, 2023) spatial features of sFID, in one forward pass."""
        captured: list[Tensor] = []

        def keep(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
            spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NCHW -> TensorFlow's NHWC
            captured.append(spatial.reshape(len(output), -1).float().cpu())

        handle = self.network.Mixed_6d.branch1x1.register_forward_hook(keep)
        try:
            pool, logits = self(images)
        finally:
            handle.remove()
        return pool, logits, captured[0]


class PixelFeatures:
    """Pixels averaged down to size x size (all three channels): a Frechet distance that needs no
    trained network, coarse but honest for the small demo images."""

    def __init__(self, size: int = 8):
        if size < 1:
            raise MetricsInputError(f"pixel size={size}: must be >= 1")
        self.size = size
        self.name = f"pixel-{size}x{size}"

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return downsample_pixels(images, self.size), None


def build_feature_space(
    name: str,
    *,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pixel_size: int = 8,
    train_images: Tensor | None = None,
    train_labels: Sequence[int] | Tensor | None = None,
) -> FeatureSpace:
    """A feature space by name: "inception" (FID/IS), "pixel" or "classifier" (demo, no downloads;
    `ClassifierFeatures`, fitted on `train_images` and `train_labels`)."""
    if name == "inception":
        return InceptionFeatures(inception_weights, device)
    if name == "pixel":
        return PixelFeatures(pixel_size)
    if name == "classifier":
        if train_images is None or train_labels is None:
            raise MetricsInputError("feature space 'classifier' needs train_images and train_labels (real, labelled)")
        return ClassifierFeatures(train_images, train_labels, size=pixel_size)
    raise MetricsInputError(f"feature space {name!r}: unknown; choose one of {', '.join(FEATURE_SPACES)}")


# Feature-space kinds: params name a kind; statistics files and metrics carry the space's full name,
# "<kind>" or "<kind>-<details>" (e.g. "inception-v3-compat", "pixel-8x8"), which feature_space_kind reads.
def feature_space_kind(name: str) -> str:
    """The kind of a feature space ("inception", "pixel" or "classifier") from a kind or a full name."""
    kind = name.split("-", 1)[0]
    if kind not in FEATURE_SPACES:
        raise MetricsInputError(f"feature space {name!r}: unknown; its kind must be one of {', '.join(FEATURE_SPACES)}")
    return kind


def distance_key(feature_space: str) -> str:
    """The metric name of a Frechet distance in a space (kind or full name): "fid" in Inception
    space only, "fd" elsewhere."""
    return "fid" if feature_space_kind(feature_space) == "inception" else "fd"


def distance_name(feature_space: str) -> str:
    """What a report calls the Frechet distance in a space: FID in Inception space only."""
    kind = feature_space_kind(feature_space)
    return "FID" if kind == "inception" else f"Frechet distance in {kind} features"


def kernel_key(feature_space: str) -> str:
    """The metric name of a kernel distance in a space: "kid" in Inception space only, "kd" elsewhere."""
    return "kid" if feature_space_kind(feature_space) == "inception" else "kd"


def kernel_name(feature_space: str) -> str:
    """What a report calls the kernel distance in a space: KID in Inception space only."""
    kind = feature_space_kind(feature_space)
    return "KID" if kind == "inception" else f"kernel distance in {kind} features"
