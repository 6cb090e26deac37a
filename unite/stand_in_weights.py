"""Randomly initialised stand-ins for the weights files that cannot be downloaded here: torch-fidelity's
Inception (FID/IS) and torchvision's VGG16 trunk (LPIPS). Rehearsals and tests use them to run every code
path offline; they are never the official files, and the metrics computed with them say so
(`unite.safe_load.weights_check`)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
import torchvision


def write_random_inception_weights(path: str | Path, images: torch.Tensor, seed: int = 0) -> Path:
    """Build torch-fidelity's Inception module without any weights file, randomise it, and save its state
    dict in the layout torch-fidelity loads (`feature_extractor_weights_path`).

    `images` are uint8 (N, 3, H, W). The class logits are random projections of how an image's pool
    features deviate from their mean over `images`: a random network whose softmax varies across those
    images, so that their Inception Score is informative.
    """
    network = random_inception_network(["2048"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):  # He-scaled, so activations neither vanish nor explode
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        (pool,) = network(images)
        mean = pool.mean(dim=0)
        mean = mean / mean.norm()
        projection = torch.randn(1008, 2048, generator=gen) * 0.3
        network.fc.weight.copy_(projection - (projection @ mean)[:, None] * mean[None, :])
        # The 8 outputs past the 1000 ImageNet classes get logits some 60 below the class logits, as unused
        # classes have: IS over the first 1000 and over all 1008 then coincide to ~1e-20, and no
        # probability underflows to 0 (which makes torch-fidelity's IS NaN).
        network.fc.weight[1000:] = -60 * mean / (pool @ mean).mean()
        network.fc.bias.copy_(torch.randn(1008, generator=gen))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return Path(path)


def random_inception_network(features: list[str]) -> torch.nn.Module:
    """torch-fidelity's `inception-v3-compat` network with the given outputs, as initialised,
    without any weights file (its constructor would otherwise load or download one)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        return tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", features)


def write_random_vgg16_trunk(path: str | Path, seed: int = 0) -> Path:
    """torchvision's VGG16 `features.*` layers (all LPIPS reads of the file), randomly initialised."""
    torch.manual_seed(seed)
    features = torchvision.models.vgg16(weights=None).features
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{name}": tensor for name, tensor in features.state_dict().items()}, path)
    return Path(path)
