"""FID and Inception Score maths: Gaussian statistics of features (streamed, saved as JiT's npz),
the Frechet distance between two of them, the Inception Score of logits, and the quantisation of
[0, 1] images to the uint8 the protocol scores. The feature spaces live in `unite.metrics.features`,
the image readers in `unite.data.readers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from tqdm import tqdm

from unite.data.readers import npz_array, open_images
from unite.metrics.features import INCEPTION_NAME, FeatureSpace, distance_key
from unite.metrics.inputs import MetricsInputError, resolve_input_file
from unite.options import check_choice

REFERENCE_STATS_ENV = "IN256_FID_STATS"
REFERENCE_STATS_FILE = "jit_in256_stats.npz"
# torch-fidelity shuffles samples with its default rng_seed before cutting the IS splits.
IS_SHUFFLE_SEED = 2020
# How the Inception Score's splits are cut: "shuffled" as torch-fidelity (a seeded shuffle, then
# splits of count * k // splits images covering all); "image_order" as the reference's
# compute_inception_score (split k = images [k n, (k + 1) n) with n = count // splits, no shuffle,
# the images from splits * n on left out).
IS_SPLIT_ORDERS = ("shuffled", "image_order")


def to_uint8(images: Tensor, channels_last: bool = False) -> Tensor:
    """[0, 1] float (N, 3, H, W) images -> uint8 as the evaluation protocol quantises them: x * 255,
    clamped, truncated; (N, H, W, 3) with `channels_last` (the layout of image files and npz)."""
    quantised = (images * 255).clamp(0, 255).to(torch.uint8)
    return quantised.permute(0, 2, 3, 1) if channels_last else quantised


def resolve_reference_stats(path: str | os.PathLike | None = None) -> Path:
    """The reference statistics npz: `path`, else env IN256_FID_STATS."""
    return resolve_input_file(
        path,
        "ref",
        "CLI: REF",
        REFERENCE_STATS_ENV,
        f"an npz with 'mu' and 'sigma', e.g. JiT's {REFERENCE_STATS_FILE} for ImageNet 256, or one written "
        f"by `unite fid-stats`",
    )


@dataclass
class GaussianStats:
    """Mean and covariance of features: what FID compares. Saved as an npz with `mu`, `sigma`
    (JiT's format) plus `num_images` and `feature_space`."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    feature_space: str | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the npz (parent folders are created)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(handle, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                     feature_space=np.str_(self.feature_space or ""))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        """Read an npz with `mu` (D,) and `sigma` (D, D); a file without `feature_space` (JiT's) is
        taken to be Inception statistics."""
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MetricsInputError(f"reference statistics {str(path)!r}: not a readable npz ({exc})") from exc
        with data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise MetricsInputError(
                    f"reference statistics {str(path)!r}: no {' or '.join(repr(k) for k in missing)} array "
                    f"(has {data.files}); it must hold 'mu' (D,) and 'sigma' (D, D)"
                )
            what = f"reference statistics {str(path)!r}"
            mu = npz_array(data, "mu", what).astype(np.float64)
            sigma = npz_array(data, "sigma", what).astype(np.float64)
            num_images = int(npz_array(data, "num_images", what)) if "num_images" in data.files else 0
            space = str(npz_array(data, "feature_space", what)) if "feature_space" in data.files else INCEPTION_NAME
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsInputError(
                f"reference statistics {str(path)!r}: mu has shape {mu.shape} and sigma {sigma.shape}; "
                f"they must be (D,) and (D, D)"
            )
        return cls(mu, sigma, num_images, space or None)


class RunningStats:
    """Streaming mean and covariance of feature batches in float64 (centred on the first batch's
    mean for accuracy), so that large reference sets never sit in memory."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        """Add a (N, D) batch of features."""
        features = np.asarray(features, dtype=np.float64)
        if len(features) == 0:
            return
        if self.shift is None:
            self.shift = features.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((self.shift.size, self.shift.size))
        centred = features - self.shift
        self.count += len(features)
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def stats(self, feature_space: str) -> GaussianStats:
        """Mean and unbiased covariance (as np.cov) of everything added."""
        if self.count < 2:
            raise MetricsInputError(f"{self.count} image(s): statistics need at least 2 images")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return GaussianStats(self.shift + mean, sigma, self.count, feature_space)


def extract(
    space: FeatureSpace,
    batches: Iterable[Tensor],
    *,
    total: int | None = None,
    is_splits: int = 0,
    is_split_order: str = "shuffled",
    progress: bool = True,
    desc: str = "features",
) -> tuple[GaussianStats, tuple[float, float] | None]:
    """Run uint8 (N, 3, H, W) batches through a feature space: Gaussian statistics of the features,
    and (IS mean, std) over `is_splits` splits cut as `is_split_order` (one of IS_SPLIT_ORDERS)
    where the space has logits and `is_splits` > 0.

    With the image count `total` known, the IS sums of each split grow as the batches come, so
    memory stays flat in the count; otherwise the logits are kept until the end."""
    moments, score, kept = RunningStats(), None, []
    with tqdm(total=total, desc=f"{desc} ({space.name})", unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                raise MetricsInputError(
                    f"image batch: dtype {batch.dtype}, shape {tuple(batch.shape)}; it must be uint8 (N, 3, H, W) "
                    f"(use to_uint8 on [0, 1] images)"
                )
            features, logits = space(batch)
            moments.update(features.numpy())
            if is_splits and logits is not None:
                if total is None:
                    kept.append(logits)
                else:
                    score = score or InceptionScore(total, is_splits, split_order=is_split_order)
                    score.update(logits)
            bar.update(len(batch))
    if kept:
        score = InceptionScore(sum(len(logits) for logits in kept), is_splits, split_order=is_split_order)
        score.update(torch.cat(kept))
    return moments.stats(space.name), (score.result() if score is not None else None)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1 S2, which equal those of
    A^T S2 A for any factor S1 = A A^T. A comes from a pivoted Cholesky factorisation (LAPACK pstrf),
    which handles the rank-deficient covariances of few samples; A^T S2 A is symmetric positive
    semi-definite, so its eigenvalues are real (round-off negatives are clipped to 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise MetricsInputError(
            f"Frechet distance: shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 "
            f"{sigma2.shape}; they must be (D,), (D, D), (D,), (D, D) with one D"
        )
    factor, pivots, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    if info < 0:
        raise MetricsInputError(f"Frechet distance: sigma1 is not a valid covariance (LAPACK dpstrf info={info})")
    left = np.zeros((dim, rank))
    left[pivots - 1] = np.tril(factor)[:, :rank]
    eigenvalues = np.linalg.eigvalsh(left.T @ sigma2 @ left) if rank else np.zeros(0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def stats_distance(stats: GaussianStats, reference: GaussianStats) -> float:
    """Frechet distance between two sets of statistics of the same feature space."""
    if stats.feature_space and reference.feature_space and stats.feature_space != reference.feature_space:
        raise MetricsInputError(
            f"statistics in feature space {stats.feature_space!r} cannot be compared with reference statistics "
            f"in {reference.feature_space!r}; compute both in one space"
        )
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


class InceptionScore:
    """exp E_x KL(p(y|x) || p(y)) per split, as (mean, std) over `splits`, from logits given in
    image order, in float64. `split_order` says how the splits are cut (see IS_SPLIT_ORDERS):
    "shuffled" shuffles the images with `shuffle_seed` first, as torch-fidelity does;
    "image_order" cuts them in order as the reference does. Since E_x KL = E_x sum_y p log p -
    sum_y p(y) log p(y), each split needs only its sum of p(y|x) and of sum_y p log p, whatever
    the image count."""

    def __init__(self, count: int, splits: int = 10, shuffle_seed: int = IS_SHUFFLE_SEED,
                 split_order: str = "shuffled"):
        check_choice("is_split_order", split_order, IS_SPLIT_ORDERS, MetricsInputError)
        if splits < 1 or count < splits:
            raise MetricsInputError(
                f"inception score: {count} images for splits={splits}; it needs at least one per split")
        if split_order == "shuffled":
            shuffled_position = np.empty(count, dtype=np.int64)
            shuffled_position[np.random.RandomState(shuffle_seed).permutation(count)] = np.arange(count)
            bounds = [split * count // splits for split in range(splits + 1)]
            self.split_of = torch.from_numpy(np.searchsorted(bounds, shuffled_position, side="right") - 1)
            self.split_sizes = torch.tensor(np.diff(bounds), dtype=torch.float64)
        else:
            size = count // splits
            index = torch.arange(count)
            self.split_of = torch.where(index < splits * size, index // size, -1)  # -1: left out
            self.split_sizes = torch.full((splits,), float(size), dtype=torch.float64)
        self.count, self.splits, self.seen = count, splits, 0
        self.prob_sums: Tensor | None = None  # (splits, classes)
        self.neg_entropy_sums = torch.zeros(splits, dtype=torch.float64)

    def update(self, logits: Tensor) -> None:
        """Add the (B, classes) logits of the next B images."""
        if self.seen + len(logits) > self.count:
            raise MetricsInputError(f"inception score: more than the {self.count} images announced")
        logits = logits.to(torch.float64)
        probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
        split = self.split_of[self.seen : self.seen + len(logits)]
        kept = split >= 0
        if self.prob_sums is None:
            self.prob_sums = torch.zeros(self.splits, logits.shape[1], dtype=torch.float64)
        self.prob_sums.index_add_(0, split[kept], probs[kept])
        self.neg_entropy_sums.index_add_(0, split[kept], (probs[kept] * log_probs[kept]).sum(dim=1))
        self.seen += len(logits)

    def result(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores."""
        if self.seen != self.count or self.prob_sums is None:
            raise MetricsInputError(f"inception score: {self.seen} of the {self.count} images announced were given")
        marginal = self.prob_sums / self.split_sizes[:, None]
        kl = self.neg_entropy_sums / self.split_sizes - torch.xlogy(marginal, marginal).sum(dim=1)
        scores = kl.exp().numpy()
        return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: Tensor, splits: int = 10, shuffle_seed: int = IS_SHUFFLE_SEED,
                    split_order: str = "shuffled") -> tuple[float, float]:
    """The Inception Score (mean, std over `splits`) of all the (N, classes) logits at once."""
    score = InceptionScore(len(logits), splits, shuffle_seed, split_order)
    score.update(logits)
    return score.result()


def evaluate_images(
    batches: Iterable[Tensor],
    reference: GaussianStats,
    space: FeatureSpace,
    *,
    total: int | None = None,
    is_splits: int = 10,
    is_split_order: str = "shuffled",
    progress: bool = True,
) -> dict[str, float | int | str]:
    """FID (or FD) of generated uint8 batches against reference statistics, and IS (splits cut as
    `is_split_order`) where the space has logits: {feature_space, fid|fd, is_mean, is_std,
    num_images, num_ref_images}."""
    stats, inception = extract(space, batches, total=total, is_splits=is_splits, is_split_order=is_split_order,
                               progress=progress, desc="generated")
    result: dict[str, float | int | str] = {
        "feature_space": space.name,
        distance_key(space.name): stats_distance(stats, reference),
    }
    if hasattr(space, "weights_check"):
        result["weights"] = space.weights_check
    if inception is not None:
        result["is_mean"], result["is_std"] = inception
    result["num_images"] = stats.num_images
    result["num_ref_images"] = reference.num_images
    return result


def compute_reference_stats(
    batches: Iterable[Tensor], space: FeatureSpace, *, total: int | None = None, progress: bool = True
) -> GaussianStats:
    """Reference statistics of real uint8 image batches (any iterable, e.g. a data loader)."""
    stats, _ = extract(space, batches, total=total, progress=progress, desc="reference")
    return stats


def load_reference(
    ref: str | os.PathLike | None,
    space: FeatureSpace,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    recursive: bool = False,
    progress: bool = True,
) -> GaussianStats:
    """Reference statistics from a statistics npz (`ref`, else env IN256_FID_STATS), or computed
    from an image folder / image npz / shards."""
    if ref is None:
        return GaussianStats.load(resolve_reference_stats(None))
    path = Path(ref)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            is_stats = "mu" in data.files
        if is_stats:
            return GaussianStats.load(path)
    batches, total = open_images(ref, batch_size=batch_size, num_workers=num_workers, recursive=recursive)
    return compute_reference_stats(batches, space, total=total, progress=progress)
