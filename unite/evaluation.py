"""Evaluation runs built from the pieces: an exported EMA model, shards of real images, a feature
space, generation at a guidance setting, and the scores of the result."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from unite.checkpoint import load_exported
from unite.data.loaders import shard_loader
from unite.distributed import Runtime
from unite.generate import generate_in_order
from unite.metrics.features import (FeatureSpace, build_feature_space, distance_key, distance_name, kernel_key,
                                    kernel_name)
from unite.metrics.fid import GaussianStats, ReferenceSet, evaluate_images
from unite.metrics.kid import KID_SUBSET_SIZE, KID_SUBSETS
from unite.model import UNITE
from unite.options import PROTOCOLS, SEARCH_METRICS, check_choice
from unite.sampling import Guidance

REFERENCE_BLOCK_SIZE = 16  # the reference's eval_batch_size (configs/imagenet.yaml)
GENERATION_KEYS = ("num_images", "seed", "solver", "steps", "block_size")


@dataclass(frozen=True)
class EvaluationProtocol:
    """How the sweep and evaluate generate and score images (evaluate.protocol).

    "separate" (this project's default): the sweep searches on a budget of its own (the sweep
    section's images), generation blocks are the params' block_size, Inception Score splits are
    torch-fidelity's (shuffled), TF32 matmuls off. "reference": the reference's protocol as a
    whole, to compare with its numbers: the sweep searches on the very images evaluate reports,
    both stages solve blocks of 16 images (dopri5's adaptive steps depend on the block, so the
    block size is part of the protocol and overrides block_size), Inception Score splits in image
    order, TF32 on for CUDA matmuls (the reference samples in its training process, which allows
    TF32)."""

    name: str
    search_on_reported: bool
    block_size: int | None  # None: the params' block_size
    is_split_order: str  # one of unite.metrics.fid.IS_SPLIT_ORDERS
    tf32: bool

    @classmethod
    def named(cls, name: str) -> "EvaluationProtocol":
        check_choice("evaluate.protocol", name, PROTOCOLS)
        if name == "reference":
            return cls(name, True, REFERENCE_BLOCK_SIZE, "image_order", True)
        return cls(name, False, None, "shuffled", False)

    def generation(self, section: dict) -> dict:
        """The generation settings (GENERATION_KEYS) of a sweep or evaluate params section under
        this protocol: the section's own, with the protocol's block size where it sets one."""
        settings = {key: section[key] for key in GENERATION_KEYS}
        if self.block_size is not None:
            settings["block_size"] = self.block_size
        return settings

    def search_images(self, params: dict) -> dict:
        """The generation settings of the images the sweep's search scores."""
        return self.generation(params["evaluate"] if self.search_on_reported else params["sweep"])

    def record(self) -> dict:
        """What the metrics files say about the protocol."""
        return {"protocol": self.name, "is_split_order": self.is_split_order, "tf32": self.tf32}


def allow_tf32_matmul(enabled: bool, device: torch.device) -> None:
    """TF32 for CUDA matmuls (process-wide) on a CUDA device; nothing elsewhere. cuDNN keeps
    PyTorch's default (TF32 allowed), as in the reference."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled


def load_exported_model(path: str | Path, device: torch.device) -> UNITE:
    """The EMA model of an export (safetensors + json config), in eval mode, without LPIPS."""
    state, cfg = load_exported(path)
    model = UNITE(replace(cfg, perceptual_weight=0.0))
    model.load_state_dict(state)
    return model.to(device).eval()


def real_batches(shard_dir: str | Path, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images (B, 3, H, W), labels) of a shard split, in its sorted order, no flips."""
    for batch in shard_loader(shard_dir, batch_size, train=False, exact=True, num_workers=0):
        yield batch.images, batch.labels


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


BlockConsumer = Callable[[range, Tensor, Tensor], None]


def generate_and_score(
    model: UNITE,
    space: FeatureSpace | None,
    reference: ReferenceSet | GaussianStats | None,
    num_images: int,
    guidance: Guidance,
    seed: int,
    solver: str,
    steps: int,
    block_size: int,
    runtime: Runtime | None = None,
    consumers: Sequence[BlockConsumer] = (),
    is_split_order: str = "shuffled",
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    with_precision_recall: bool = True,
) -> dict | None:
    """Generate class-balanced images (on every rank of `runtime`) and score them against the
    reference statistics on the main process, which alone needs `space` and `reference`.

    The main process scores the blocks in index order as they arrive and passes each one, as
    (indices, labels, uint8 images (B, H, W, 3)), to every consumer (an npz writer, a grid, a
    class-consistency count) before dropping it, so memory stays flat in `num_images` and the
    scores do not depend on the number of ranks. The Inception Score's splits are cut as
    `is_split_order` (unite.metrics.fid.IS_SPLIT_ORDERS). A ReferenceSet with features adds KID
    (`kid_subsets` of `kid_subset_size`) and precision/recall (unless not `with_precision_recall`),
    for which the main process keeps the generated features. Returns the scores on the main
    process, None elsewhere."""
    runtime = runtime or Runtime(0, 1, next(model.parameters()).device)
    blocks = generate_in_order(model, num_images, guidance, runtime, seed=seed, block_size=block_size,
                               solver=solver, steps=steps)
    if not runtime.is_main:
        for _ in blocks:  # sends this rank's blocks to the main process
            pass
        return None

    def scored_batches() -> Iterator[Tensor]:
        for indices, labels, images in blocks:
            for consume in consumers:
                consume(indices, labels, images)
            yield images.permute(0, 3, 1, 2)

    return evaluate_images(scored_batches(), reference, space, total=num_images, is_split_order=is_split_order,
                           kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                           with_precision_recall=with_precision_recall, device=runtime.device, progress=False)


def search_score(scores: dict, metric: str) -> float:
    """The value of `metric` (one of SEARCH_METRICS) in the scores of `evaluate_images`: the
    Frechet distance, or the kernel distance's mean over its subsets."""
    check_choice("sweep.metric", metric, SEARCH_METRICS)
    space = scores["feature_space"]
    return scores[distance_key(space) if metric == "frechet_distance" else f"{kernel_key(space)}_mean"]


def search_metric_name(metric: str, feature_space: str) -> str:
    """What a report calls the search's metric in a space: FID or KID in Inception space."""
    check_choice("sweep.metric", metric, SEARCH_METRICS)
    return (distance_name if metric == "frechet_distance" else kernel_name)(feature_space)


def reconstruct(
    model: UNITE, shard_dir: str | Path, batch_size: int, limit: int = 0, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """(originals, reconstructions) [0, 1] batches of a split: tokenize, decode, clamp.

    Tokenization draws a noise latent and a small t; they come from a generator seeded with
    `seed`, so the metrics do not depend on what else the process has drawn."""
    cfg = model.cfg
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    with torch.no_grad():
        for images, _ in real_batches(shard_dir, batch_size):
            if limit and seen >= limit:
                return
            if limit:
                images = images[: limit - seen]
            seen += len(images)
            x = images.to(device).float() / 255
            noise = torch.randn((len(x), cfg.num_latent_tokens, cfg.latent_dim), generator=generator)
            t = torch.rand(len(x), generator=generator) * cfg.recon_t_max
            latents = model.tokenize(x, noise=noise.to(device), t=t.to(device))
            yield x.cpu(), model.decode(latents).clamp(0, 1).cpu()
