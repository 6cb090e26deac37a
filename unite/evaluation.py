"""Evaluation runs built from the pieces: an exported EMA model, shards of real images, a feature
space, generation at a guidance setting, and the scores of the result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from unite.checkpoint import load_exported
from unite.data.loaders import shard_loader
from unite.fid import FeatureSpace, GaussianStats, build_feature_space, evaluate_images
from unite.generate import generate
from unite.model import UNITE
from unite.sampling import Guidance


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_exported_model(path: str | Path, device: torch.device) -> UNITE:
    """The EMA model of an export (safetensors + json config), in eval mode, without LPIPS."""
    state, cfg = load_exported(path)
    model = UNITE(replace(cfg, perceptual_weight=0.0))
    model.load_state_dict(state)
    return model.to(device).eval()


def real_batches(shard_dir: str | Path, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images (B, 3, H, W), labels) of a shard split, in its sorted order, no flips."""
    for batch in shard_loader(shard_dir, batch_size, train=False, exact=True, num_workers=0):
        yield (batch.images * 255).round().to(torch.uint8), batch.labels


def load_split(shard_dir: str | Path, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """A whole split in memory (for small data sets such as the demo's)."""
    images, labels = zip(*real_batches(shard_dir, batch_size))
    return torch.cat(images), torch.cat(labels)


def feature_space(
    name: str, train_shards: str | Path, inception_weights: str | None = None, device: str = "cpu"
) -> FeatureSpace:
    """The named feature space; "classifier" learns its features from the train split."""
    if name == "classifier":
        images, labels = load_split(train_shards)
        return build_feature_space(name, train_images=images, train_labels=labels)
    return build_feature_space(name, inception_weights=inception_weights, device=device)


def generate_and_score(
    model: UNITE,
    space: FeatureSpace,
    reference: GaussianStats,
    num_images: int,
    guidance: Guidance,
    seed: int,
    solver: str,
    steps: int,
    block_size: int,
) -> tuple[dict, Tensor, Tensor]:
    """Generate class-balanced images and score them against the reference statistics.

    Returns (scores, uint8 images (N, H, W, 3), labels)."""
    images, labels = [], []
    for _, block_labels, block in generate(model, num_images, guidance, seed=seed, block_size=block_size,
                                           solver=solver, steps=steps):
        images.append(block)
        labels.append(block_labels)
    images_nhwc, labels_all = torch.cat(images), torch.cat(labels)
    batches = (images_nhwc[i : i + block_size].permute(0, 3, 1, 2) for i in range(0, num_images, block_size))
    scores = evaluate_images(batches, reference, space, total=num_images, progress=False)
    return scores, images_nhwc, labels_all


def reconstruct(model: UNITE, shard_dir: str | Path, batch_size: int, limit: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(originals, reconstructions) [0, 1] batches of a split: tokenize, decode, clamp."""
    device = next(model.parameters()).device
    seen = 0
    with torch.no_grad():
        for images, _ in real_batches(shard_dir, batch_size):
            if limit and seen >= limit:
                return
            if limit:
                images = images[: limit - seen]
            seen += len(images)
            x = images.to(device).float() / 255
            yield x.cpu(), model.decode(model.tokenize(x)).clamp(0, 1).cpu()
