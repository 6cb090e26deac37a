"""FID, Inception Score and Frechet distances in named feature spaces, with reference statistics.

"inception" is torch-fidelity's own `inception-v3-compat` extractor loaded from a local weights file,
so FID/IS follow the protocol of torch-fidelity and JiT: uint8 images, features "2048" for FID,
"logits_unbiased" for IS. The demo's feature spaces ("pixel", "classifier") need no downloaded
weights and are reported as Frechet distances ("fd"), never as FID.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm import tqdm

from unite.data.errors import DataError
from unite.data.loaders import sample_pixels
from unite.data.shards import INDEX_NAME, read_index, read_shard
from unite.options import FEATURE_SPACES

from unite.safe_load import UntrustedPickleError, load_torch_file, weights_check

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_WEIGHTS_ENV = "INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-compat"
REFERENCE_STATS_ENV = "IN256_FID_STATS"
REFERENCE_STATS_FILE = "jit_in256_stats.npz"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# torch-fidelity shuffles samples with its default rng_seed before cutting the IS splits.
IS_SHUFFLE_SEED = 2020
# Feature-space kinds: params name a kind; statistics files and metrics carry the space's full name,
# "<kind>" or "<kind>-<details>" (e.g. "inception-v3-compat", "pixel-8x8"), which feature_space_kind reads.
# The first 8 hex digits of the sha256 of the official weights files (torch hub's naming rule).
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"


class MetricsInputError(ValueError):
    """A missing or malformed evaluation input (weights, statistics, images): the user must fix it."""


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] float images -> uint8 as the evaluation protocol quantises them: x * 255, clamped, truncated."""
    return (images * 255).clamp(0, 255).to(torch.uint8)


def _resolve_file(path: str | os.PathLike | None, param: str, cli: str, env: str, expected: str) -> Path:
    source = param
    if path is None or str(path) == "":
        path, source = os.environ.get(env) or None, env
    if path is None:
        raise MetricsInputError(f"no {param} given ({cli}) and {env} is not set: pass it or set {env} to {expected}")
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise MetricsInputError(f"{source}={str(path)!r}: file not found; it must be {expected}")
    return candidate


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path`, else env INCEPTION_WEIGHTS; nothing is ever downloaded."""
    return _resolve_file(
        path,
        "inception_weights",
        "CLI: --inception-weights PATH",
        INCEPTION_WEIGHTS_ENV,
        f"the local path of torch-fidelity's {INCEPTION_NAME} weights {INCEPTION_WEIGHTS_FILE} "
        f"(from {INCEPTION_WEIGHTS_URL})",
    )


def resolve_reference_stats(path: str | os.PathLike | None = None) -> Path:
    """The reference statistics npz: `path`, else env IN256_FID_STATS."""
    return _resolve_file(
        path,
        "ref",
        "CLI: REF",
        REFERENCE_STATS_ENV,
        f"an npz with 'mu' and 'sigma', e.g. JiT's {REFERENCE_STATS_FILE} for ImageNet 256, or one written "
        f"by `unite fid-stats`",
    )


class FeatureSpace(Protocol):
    """Maps a uint8 (N, 3, H, W) batch to (features (N, D), IS logits (N, K) or None)."""

    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


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

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        pool, logits = self.network(images.to(self.device))
        return pool.cpu(), logits[:, :1000].cpu()


def downsample_pixels(images: Tensor, size: int) -> Tensor:
    """uint8 (N, 3, H, W) -> float64 (N, 3 * size * size) in [0, 1], by area averaging."""
    small = F.adaptive_avg_pool2d(images.to(torch.float64) / 255.0, (size, size))
    return small.flatten(1)


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


class ClassifierFeatures:
    """Hidden-layer activations of a small MLP classifier trained on labelled real images (downsampled
    pixels): a feature space that tracks class-relevant structure, fitted offline in seconds."""

    def __init__(self, images: Tensor, labels: Sequence[int] | Tensor, *, size: int = 8, hidden: int = 64,
                 seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.size = size
        self.name = f"classifier-mlp{hidden}-pixel{size}"
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise MetricsInputError(f"classifier features: {len(images)} train images but {len(labels)} labels")
        self.model = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=500, early_stopping=True, random_state=seed)
        with threadpool_limits(1):  # a small fit: threaded BLAS only adds overhead
            self.model.fit(downsample_pixels(images, size).numpy(), labels)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        pixels = downsample_pixels(images, self.size).numpy()
        hidden = np.maximum(pixels @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)
        return torch.from_numpy(hidden), None


def build_feature_space(
    name: str,
    *,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pixel_size: int = 8,
    train_images: Tensor | None = None,
    train_labels: Sequence[int] | Tensor | None = None,
) -> FeatureSpace:
    """A feature space by name: "inception" (FID/IS), "pixel" or "classifier" (demo, no downloads)."""
    if name == "inception":
        return InceptionFeatures(inception_weights, device)
    if name == "pixel":
        return PixelFeatures(pixel_size)
    if name == "classifier":
        if train_images is None or train_labels is None:
            raise MetricsInputError("feature space 'classifier' needs train_images and train_labels (real, labelled)")
        return ClassifierFeatures(train_images, train_labels, size=pixel_size)
    raise MetricsInputError(f"feature space {name!r}: unknown; choose one of {', '.join(FEATURE_SPACES)}")


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
    keep_logits: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> tuple[GaussianStats, Tensor | None]:
    """Run uint8 (N, 3, H, W) batches through a feature space: Gaussian statistics of the features,
    and the concatenated IS logits where the space has them and `keep_logits`."""
    moments, logits = RunningStats(), []
    with tqdm(total=total, desc=f"{desc} ({space.name})", unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                raise MetricsInputError(
                    f"image batch: dtype {batch.dtype}, shape {tuple(batch.shape)}; it must be uint8 (N, 3, H, W) "
                    f"(use to_uint8 on [0, 1] images)"
                )
            features, batch_logits = space(batch)
            moments.update(features.numpy())
            if keep_logits and batch_logits is not None:
                logits.append(batch_logits)
            bar.update(len(batch))
    return moments.stats(space.name), (torch.cat(logits) if logits else None)


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


def inception_score(logits: Tensor, splits: int = 10, shuffle_seed: int = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) per split, as (mean, std) over `splits` (softmax over all given
    logits). Samples are shuffled with torch-fidelity's seed first, so the splits match its own."""
    count = logits.shape[0]
    if splits < 1 or count < splits:
        raise MetricsInputError(f"inception score: {count} images for splits={splits}; it needs at least one per split")
    logits = logits[np.random.RandomState(shuffle_seed).permutation(count)].to(torch.float64)
    probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for split in range(splits):
        part = slice(split * count // splits, (split + 1) * count // splits)
        marginal = probs[part].mean(dim=0, keepdim=True)
        kl = (probs[part] * (log_probs[part] - marginal.log())).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def evaluate_images(
    batches: Iterable[Tensor],
    reference: GaussianStats,
    space: FeatureSpace,
    *,
    total: int | None = None,
    is_splits: int = 10,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """FID (or FD) of generated uint8 batches against reference statistics, and IS where the space
    has logits: {feature_space, fid|fd, is_mean, is_std, num_images, num_ref_images}."""
    stats, logits = extract(space, batches, total=total, progress=progress, desc="generated")
    result: dict[str, float | int | str] = {
        "feature_space": space.name,
        distance_key(space.name): stats_distance(stats, reference),
    }
    if hasattr(space, "weights_check"):
        result["weights"] = space.weights_check
    if logits is not None:
        result["is_mean"], result["is_std"] = inception_score(logits, is_splits)
    result["num_images"] = stats.num_images
    result["num_ref_images"] = reference.num_images
    return result


def image_folder_files(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """PNG/JPEG files of a folder, sorted by real path as torch-fidelity sorts them (the IS splits
    depend on the order)."""
    root = Path(folder)
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(os.path.realpath(p) for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        hint = "" if recursive else " (subfolders are not searched unless recursive / --recursive)"
        raise MetricsInputError(f"{str(folder)!r}: no {'/'.join(IMAGE_EXTENSIONS)} images found{hint}")
    return files


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        with Image.open(self.files[index]) as image:
            array = np.asarray(image.convert("RGB"))
        return index, torch.from_numpy(array.copy()).permute(2, 0, 1)


def iter_image_files(files: list[str], batch_size: int = 64, num_workers: int = 0) -> Iterator[Tensor]:
    """uint8 (N, 3, H, W) batches of image files, decoded as torch-fidelity decodes them (PIL, RGB)."""

    def collate(items: list[tuple[int, Tensor]]) -> Tensor:
        first_index, first = items[0]
        for index, image in items[1:]:
            if image.shape != first.shape:
                raise MetricsInputError(
                    f"{files[index]}: {tuple(image.shape[1:])} pixels but {files[first_index]} has "
                    f"{tuple(first.shape[1:])}; all images must have one size (resize or crop them first)"
                )
        return torch.stack([image for _, image in items])

    loader = torch.utils.data.DataLoader(_ImageFiles(files), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    yield from loader


def npz_array(data: np.lib.npyio.NpzFile, key: str, what: str) -> np.ndarray:
    """One array of an npz opened with allow_pickle=False; a pickled object array (loading it
    could run code) or a malformed one is refused with a MetricsInputError naming it."""
    try:
        return data[key]
    except ValueError as exc:
        raise MetricsInputError(
            f"{what}: array {key!r} cannot be read ({exc}); npz inputs must hold numeric arrays "
            f"(pickled object arrays are refused: loading them could run code)"
        ) from exc


def _npz_images(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        arrays = [array for array in (npz_array(data, key, repr(str(path))) for key in data.files)
                  if array.dtype == np.uint8 and array.ndim == 4]
    if len(arrays) != 1:
        raise MetricsInputError(
            f"{str(path)!r}: found {len(arrays)} uint8 4-D arrays; an image npz must hold exactly one, "
            f"(N, H, W, 3) or (N, 3, H, W), and a statistics npz must hold 'mu' and 'sigma'"
        )
    images = arrays[0]
    if images.shape[-1] == 3:
        return images.transpose(0, 3, 1, 2)
    if images.shape[1] == 3:
        return images
    raise MetricsInputError(
        f"{str(path)!r}: image array of shape {images.shape}; it must be (N, H, W, 3) or (N, 3, H, W)"
    )


def _shard_image_size(shard_dir: Path) -> int | None:
    """The crop size in the index beside a shard (the sharder writes one); None without an index."""
    if not (shard_dir / INDEX_NAME).is_file():
        return None
    return read_index(shard_dir)["params"]["image_size"]


def iter_shard_images(shards: Sequence[str | os.PathLike], batch_size: int = 64) -> Iterator[Tensor]:
    """uint8 batches of the images in webdataset tar shards of any store (png, npy, source), in shard
    and member order, decoded and centre-cropped as the training loaders do (unite.data)."""
    sizes: dict[Path, int | None] = {}
    batch: list[Tensor] = []
    shape = None
    for shard in map(Path, shards):
        try:
            if shard.parent not in sizes:
                sizes[shard.parent] = _shard_image_size(shard.parent)
            for sample in read_shard(shard):
                pixels = torch.from_numpy(sample_pixels(sample, sizes[shard.parent]).copy()).permute(2, 0, 1)
                shape = shape or pixels.shape
                if pixels.shape != shape:
                    raise MetricsInputError(
                        f"{shard}: sample {sample['__key__']!r} has {tuple(pixels.shape[1:])} pixels, earlier "
                        f"images {tuple(shape[1:])}; all images must have one size"
                    )
                batch.append(pixels)
                if len(batch) == batch_size:
                    yield torch.stack(batch)
                    batch = []
        except DataError as exc:
            raise MetricsInputError(f"{shard}: {exc}") from exc
    if batch:
        yield torch.stack(batch)


def open_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    recursive: bool = False,
) -> tuple[Iterator[Tensor], int | None]:
    """uint8 batches and their count (None if unknown) from an image folder, an image npz, or
    webdataset .tar shards of any store."""
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    if not paths:
        raise MetricsInputError("no image source given")
    if all(p.suffix == ".tar" for p in paths):
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MetricsInputError(f"shards not found: {', '.join(missing)}")
        return iter_shard_images(paths, batch_size), None
    if len(paths) != 1:
        raise MetricsInputError(f"{len(paths)} image sources: give one folder or npz, or any number of .tar shards")
    path = paths[0]
    if path.is_dir():
        files = image_folder_files(path, recursive)
        return iter_image_files(files, batch_size, num_workers), len(files)
    if path.is_file() and path.suffix == ".npz":
        images = torch.from_numpy(_npz_images(path))
        return iter(images.split(batch_size)), len(images)
    raise MetricsInputError(f"{str(path)!r}: does not exist or is not an image folder, an image .npz or .tar shards")


def compute_reference_stats(
    batches: Iterable[Tensor], space: FeatureSpace, *, total: int | None = None, progress: bool = True
) -> GaussianStats:
    """Reference statistics of real uint8 image batches (any iterable, e.g. a data loader)."""
    stats, _ = extract(space, batches, total=total, keep_logits=False, progress=progress, desc="reference")
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


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_fid(
    gen: str,
    ref: str | None,
    *,
    inception_weights: str | None = None,
    feature_space: str = "inception",
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    recursive: bool = False,
    is_splits: int = 10,
    as_json: bool = False,
) -> int:
    """`unite fid`: FID/IS of generated images against a reference folder or statistics npz."""
    ref = str(ref if ref is not None else resolve_reference_stats(None))
    space = build_feature_space(feature_space, inception_weights=inception_weights, device=_device(device))
    reference = load_reference(ref, space, batch_size=batch_size, num_workers=num_workers, recursive=recursive)
    batches, total = open_images(gen, batch_size=batch_size, num_workers=num_workers, recursive=recursive)
    result = evaluate_images(batches, reference, space, total=total, is_splits=is_splits)
    result["gen"], result["ref"] = str(gen), ref
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


def run_fid_stats(
    sources: Sequence[str],
    out: str,
    *,
    inception_weights: str | None = None,
    feature_space: str = "inception",
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    recursive: bool = False,
) -> int:
    """`unite fid-stats`: write reference statistics of an image folder or shard set to an npz."""
    space = build_feature_space(feature_space, inception_weights=inception_weights, device=_device(device))
    batches, total = open_images(sources, batch_size=batch_size, num_workers=num_workers, recursive=recursive)
    stats = compute_reference_stats(batches, space, total=total)
    stats.save(out)
    print(f"wrote {out}: {stats.num_images} images, {stats.mu.shape[0]} features ({space.name})", file=sys.stderr)
    return 0
