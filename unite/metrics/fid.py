"""FID and Inception Score maths: Gaussian statistics of features (streamed, saved as JiT's npz),
the Frechet distance between two of them, the Inception Score of logits, and the quantisation of
[0, 1] images to the uint8 the protocol scores; the reference sets (statistics, spatial statistics,
features) that sFID, KID and precision/recall compare with, and the one pass over generated images
that scores them all. The feature spaces live in `unite.metrics.features`,
the image readers in `unite.data.readers`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from tqdm import tqdm

from unite.data.readers import npz_array, open_images
from unite.metrics.features import (INCEPTION_NAME, SPATIAL_DIM, FeatureSpace, SpatialFeatureSpace, distance_key,
                                    feature_space_kind, kernel_key)
from unite.metrics.inputs import MetricsInputError, resolve_input_file
from unite.metrics.kid import KID_SUBSET_SIZE, KID_SUBSETS, kernel_distance
from unite.metrics.precision_recall import precision_recall
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


@dataclass
class Extraction:
    """What one pass over the images gives: Gaussian statistics of the features (FID), the
    Inception Score where asked, the statistics of the spatial features (sFID) in spaces that have
    them, and the features of the first images where kept (KID, precision/recall)."""

    stats: GaussianStats
    inception_score: tuple[float, float] | None = None
    spatial: GaussianStats | None = None
    features: np.ndarray | None = None  # float32 (kept, D)


def extract(
    space: FeatureSpace,
    batches: Iterable[Tensor],
    *,
    total: int | None = None,
    is_splits: int = 0,
    is_split_order: str = "shuffled",
    keep_features: int | None = 0,
    progress: bool = True,
    desc: str = "features",
) -> Extraction:
    """Run uint8 (N, 3, H, W) batches through a feature space once: Gaussian statistics of the
    features, (IS mean, std) over `is_splits` splits cut as `is_split_order` (one of
    IS_SPLIT_ORDERS) where the space has logits and `is_splits` > 0, spatial statistics where the
    space has spatial features, and the features of the first `keep_features` images (None: all).

    With the image count `total` known, the IS sums of each split grow as the batches come, so
    memory stays flat in the count; otherwise the logits are kept until the end. Kept features
    take 4 D bytes per image (400 MB for 50,000 Inception images)."""
    moments, score, kept_logits, kept = RunningStats(), None, [], []
    spatial = RunningStats() if isinstance(space, SpatialFeatureSpace) else None
    room = float("inf") if keep_features is None else keep_features
    with tqdm(total=total, desc=f"{desc} ({space.name})", unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                raise MetricsInputError(
                    f"image batch: dtype {batch.dtype}, shape {tuple(batch.shape)}; it must be uint8 (N, 3, H, W) "
                    f"(use to_uint8 on [0, 1] images)"
                )
            if spatial is not None:
                features, logits, spatial_features = space.with_spatial(batch)
                spatial.update(spatial_features.numpy())
            else:
                features, logits = space(batch)
            moments.update(features.numpy())
            if room > 0:
                kept.append(features[: int(min(room, len(features)))].numpy().astype(np.float32))
                room -= len(kept[-1])
            if is_splits and logits is not None:
                if total is None:
                    kept_logits.append(logits)
                else:
                    score = score or InceptionScore(total, is_splits, split_order=is_split_order)
                    score.update(logits)
            bar.update(len(batch))
    if kept_logits:
        score = InceptionScore(sum(len(logits) for logits in kept_logits), is_splits, split_order=is_split_order)
        score.update(torch.cat(kept_logits))
    return Extraction(
        moments.stats(space.name),
        score.result() if score is not None else None,
        spatial.stats(space.name) if spatial is not None else None,
        np.concatenate(kept) if kept else None,
    )


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


@dataclass
class ReferenceSet:
    """What generated images are compared with: Gaussian statistics of the features (FID), of the
    spatial features (sFID; Inception only) and the features of a set of reference images (KID,
    precision/recall). Saved as one npz: `mu`, `sigma` (JiT's format), `mu_s`, `sigma_s` (the ADM
    reference batch's names), `features` (float32 (M, D)), `num_images`, `feature_space`."""

    stats: GaussianStats
    spatial: GaussianStats | None = None
    features: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the npz (parent folders are created)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(mu=self.stats.mu, sigma=self.stats.sigma, num_images=np.int64(self.stats.num_images),
                      feature_space=np.str_(self.stats.feature_space or ""))
        if self.spatial is not None:
            arrays.update(mu_s=self.spatial.mu, sigma_s=self.spatial.sigma)
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceSet:
        """Read a statistics npz: JiT's (mu, sigma), an ADM reference batch's statistics (also mu_s,
        sigma_s; its images are not read here: see `from_adm_batch`) or one written by `save`."""
        stats = GaussianStats.load(path)
        what = f"reference statistics {str(path)!r}"
        with np.load(path, allow_pickle=False) as data:
            spatial = features = None
            if "mu_s" in data.files or "sigma_s" in data.files:
                mu_s = npz_array(data, "mu_s", what).astype(np.float64) if "mu_s" in data.files else None
                sigma_s = npz_array(data, "sigma_s", what).astype(np.float64) if "sigma_s" in data.files else None
                shapes = None if mu_s is None or sigma_s is None else (mu_s.shape, sigma_s.shape)
                if shapes != ((SPATIAL_DIM,), (SPATIAL_DIM, SPATIAL_DIM)):
                    raise MetricsInputError(
                        f"{what}: mu_s and sigma_s must both be there, of shapes ({SPATIAL_DIM},) and "
                        f"({SPATIAL_DIM}, {SPATIAL_DIM}) (sFID's spatial statistics, as in ADM reference batches)"
                    )
                spatial = GaussianStats(mu_s, sigma_s, stats.num_images, stats.feature_space)
            if "features" in data.files:
                features = npz_array(data, "features", what).astype(np.float32)
                if features.ndim != 2 or features.shape[1] != stats.mu.shape[0]:
                    raise MetricsInputError(f"{what}: features of shape {features.shape}; they must be (M, "
                                            f"{stats.mu.shape[0]}), in the space of mu")
        return cls(stats, spatial, features)

    @classmethod
    def from_adm_batch(
        cls, path: str | os.PathLike, space: FeatureSpace, *, batch_size: int = 100, progress: bool = True
    ) -> ReferenceSet:
        """An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its mu/sigma and mu_s/sigma_s,
        and the Inception features of its `arr_0` images (10,000 for ImageNet 256), read in
        batches of `batch_size` so that the images never sit in memory whole."""
        if feature_space_kind(space.name) != "inception":
            raise MetricsInputError(f"ADM reference batch {str(path)!r}: its statistics are Inception's; the "
                                    f"feature space is {space.name} (set fid_ref.feature_space: inception)")
        given = cls.load(path)
        if given.spatial is None:
            raise MetricsInputError(f"ADM reference batch {str(path)!r}: no mu_s/sigma_s (sFID's statistics); "
                                    f"give the reference batch npz itself (arr_0, mu, sigma, mu_s, sigma_s)")
        batches, count = adm_batch_images(path, batch_size)
        features = extract(space, batches, total=count, keep_features=None, progress=progress,
                           desc="reference batch").features
        return cls(given.stats, given.spatial, features)


def adm_batch_images(path: str | os.PathLike, batch_size: int) -> tuple[Iterator[Tensor], int]:
    """uint8 (B, 3, H, W) batches of an npz's `arr_0` (N, H, W, 3), read from the zip member as a
    stream (compressed or not), and N."""
    archive = zipfile.ZipFile(path)
    if "arr_0.npy" not in archive.namelist():
        raise MetricsInputError(f"ADM reference batch {str(path)!r}: no arr_0 image array (has "
                                f"{archive.namelist()}); it must hold arr_0 (N, H, W, 3) uint8")
    stream = archive.open("arr_0.npy")
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise MetricsInputError(f"ADM reference batch {str(path)!r}: arr_0 is {dtype} {shape}; it must be uint8 "
                                f"(N, H, W, 3) in C order")
    image_bytes = int(np.prod(shape[1:]))

    def batches() -> Iterator[Tensor]:
        with archive, stream:
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                chunk = np.frombuffer(stream.read(count * image_bytes), np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2)

    return batches(), shape[0]


def evaluate_images(
    batches: Iterable[Tensor],
    reference: ReferenceSet | GaussianStats,
    space: FeatureSpace,
    *,
    total: int | None = None,
    is_splits: int = 10,
    is_split_order: str = "shuffled",
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    with_precision_recall: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float | int | str]:
    """Scores of generated uint8 batches against a reference, from one pass over the images:
    FID (FD outside Inception space), IS (splits cut as `is_split_order`) where the space has
    logits; with a ReferenceSet also sFID (or why there is none), and, where it holds features, KID
    (KD outside Inception space; `kid_subsets` subsets of `kid_subset_size`) and, unless not
    `with_precision_recall`, precision/recall (k = 3, distances on `device`). The generated
    features are kept only for the latter two."""
    if isinstance(reference, GaussianStats):
        reference = ReferenceSet(reference)
    suite = reference.features is not None
    extraction = extract(space, batches, total=total, is_splits=is_splits, is_split_order=is_split_order,
                         keep_features=None if suite else 0, progress=progress, desc="generated")
    stats = extraction.stats
    result: dict[str, float | int | str] = {
        "feature_space": space.name,
        distance_key(space.name): stats_distance(stats, reference.stats),
    }
    if extraction.spatial is not None and reference.spatial is not None:
        result["sfid"] = frechet_distance(extraction.spatial.mu, extraction.spatial.sigma, reference.spatial.mu,
                                          reference.spatial.sigma)
    elif reference.spatial is not None or suite:
        result["sfid"] = "none: " + ("sFID is defined on Inception's mixed_6/conv features only"
                                     if extraction.spatial is None
                                     else "the reference has no spatial statistics (mu_s, sigma_s)")
    if suite:
        kernel = kernel_key(space.name)
        result[f"{kernel}_mean"], result[f"{kernel}_std"] = kernel_distance(
            extraction.features, reference.features, kid_subsets, kid_subset_size, device=device)
        if with_precision_recall:
            result["precision"], result["recall"] = precision_recall(extraction.features, reference.features,
                                                                     device=device)
    if hasattr(space, "weights_check"):
        result["weights"] = space.weights_check
    if extraction.inception_score is not None:
        result["is_mean"], result["is_std"] = extraction.inception_score
    result["num_images"] = stats.num_images
    result["num_ref_images"] = reference.stats.num_images
    if suite:
        result["num_ref_features"] = len(reference.features)
    return result


def compute_reference_stats(
    batches: Iterable[Tensor], space: FeatureSpace, *, total: int | None = None, progress: bool = True
) -> GaussianStats:
    """Reference statistics of real uint8 image batches (any iterable, e.g. a data loader)."""
    return extract(space, batches, total=total, progress=progress, desc="reference").stats


def compute_reference_set(
    batches: Iterable[Tensor], space: FeatureSpace, *, set_images: int, total: int | None = None,
    progress: bool = True,
) -> ReferenceSet:
    """A ReferenceSet of real uint8 image batches: statistics of all, features of the first
    `set_images` (none for 0)."""
    extraction = extract(space, batches, total=total, keep_features=set_images, progress=progress, desc="reference")
    return ReferenceSet(extraction.stats, extraction.spatial, extraction.features)


def load_reference(
    ref: str | os.PathLike | None,
    space: FeatureSpace,
    *,
    set_images: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    recursive: bool = False,
    progress: bool = True,
) -> ReferenceSet:
    """The reference of `ref` (else env IN256_FID_STATS): a statistics npz as it is, an ADM
    reference batch (statistics, and the features of its images where `set_images`), or computed
    from an image folder / image npz / shards (features of the first `set_images`)."""
    if ref is None:
        return ReferenceSet.load(resolve_reference_stats(None))
    path = Path(ref)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            is_stats, has_images = "mu" in data.files, "arr_0" in data.files
        if is_stats and has_images and set_images:
            return ReferenceSet.from_adm_batch(path, space, batch_size=batch_size, progress=progress)
        if is_stats:
            return ReferenceSet.load(path)
    batches, total = open_images(ref, batch_size=batch_size, num_workers=num_workers, recursive=recursive)
    return compute_reference_set(batches, space, set_images=set_images, total=total, progress=progress)
