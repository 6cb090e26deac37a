"""Loaders that yield uint8 image batches with labels: webdataset shards for training and
validation, and an image-folder fallback with the same transform. Consumers make floats on their
device (images / 255), so a batch crosses to the GPU as 4x fewer bytes and no CPU converts it.

Both are reproducible from (seed, epoch) and split across DDP ranks (given explicitly, or taken
from torch.distributed) and DataLoader workers. Call set_epoch before each epoch.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import multiprocessing
import random
import signal
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info
from webdataset import shuffle as buffer_shuffle

from unite.data.errors import DataError
from unite.data.image import IMAGE_EXTENSIONS, center_crop, decode, to_rgb
from unite.data.manifest import Manifest, list_image_folder, read_manifest
from unite.data.shards import LABEL_FIELD, PATH_FIELD, read_index, read_shard
from unite.options import has_type


class Batch(NamedTuple):
    """images: uint8 [B, 3, S, S]; labels: int64 [B]; keys: the samples' keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        initialized = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialized else 0) if rank is None else rank
        world_size = (dist.get_world_size() if initialized else 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def _check_counts(**values: int) -> None:
    minimum = {"num_workers": 0}
    for field, value in values.items():
        if not has_type(value, int) or value < minimum.get(field, 1):
            raise DataError(f"{field}={value!r}: must be an integer >= {minimum.get(field, 1)}")


def _tensor(array: np.ndarray, flip: bool) -> torch.Tensor:
    """Contiguous uint8 [3, H, W] of HxWx3 pixels (batches of them stack fast); floats are made
    per batch in the main process, so workers move 4x fewer bytes."""
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@functools.cache
def _npy_header(size: int) -> bytes:
    """The header np.save writes for a C-ordered uint8 (size, size, 3) array."""
    stream = io.BytesIO()
    np.save(stream, np.zeros((size, size, 3), np.uint8))
    return stream.getvalue()[: -size * size * 3]


def _pixels(field: str, data: bytes, size: int | None) -> np.ndarray:
    """uint8 [size, size, 3] of a sample's image field. A .npy crop becomes a read-only view of
    the sample's bytes (no image decoding, no copy: _tensor copies it once); any image format is
    decoded, converted to RGB and centre-cropped. With size None (shards without an index) the
    image is taken at the size it is stored."""
    if field != "npy":
        image = to_rgb(decode(data))
        return np.asarray(image if size is None else center_crop(image, size))
    if size is not None:
        header = _npy_header(size)
        if data.startswith(header) and len(data) == len(header) + size * size * 3:  # what the sharder writes
            return np.frombuffer(data, np.uint8, offset=len(header)).reshape(size, size, 3)
    stream = io.BytesIO(data)
    read_header = _NPY_HEADERS.get(np.lib.format.read_magic(stream))
    if read_header is None:
        raise DataError("npy field: unsupported .npy format version")
    shape, fortran_order, dtype = read_header(stream)
    expected = (size, size, 3) if size is not None else (*shape[:2], 3)
    if dtype != np.uint8 or fortran_order or len(shape) != 3 or shape != expected:
        raise DataError(f"npy field: {dtype} {shape} array, expected C-ordered uint8 {expected}")
    return np.frombuffer(data, np.uint8, offset=stream.tell()).reshape(shape)


def sample_pixels(sample: dict[str, Any], size: int | None) -> np.ndarray:
    """uint8 [size, size, 3] of a shard sample (as read_shard yields it) of any store: png, npy or
    source. The one decoding of shard images, used by the loaders and by FID statistics."""
    fields = [k for k in sample if not k.startswith("__") and k not in (LABEL_FIELD, PATH_FIELD)]
    if len(fields) != 1 or LABEL_FIELD not in sample:
        raise DataError(f"fields {sorted(sample)}: expected one image field and {LABEL_FIELD!r}")
    return _pixels(fields[0], sample[fields[0]], size)


class ShardStream(IterableDataset):
    """One rank's samples (uint8 image, label, key) of one epoch, read from a shard directory.

    The epoch's shard order (a shuffle seeded by seed and epoch when training, sorted otherwise)
    is dealt to ranks, then to the rank's DataLoader workers, like webdataset's split_by_node and
    split_by_worker. With exact, each worker reads its shards once: together the ranks see every
    sample exactly once, but ranks may get different numbers of batches. Without exact (DDP
    training), every rank yields the same number of full batches, total // (world_size x
    batch_size): each worker cycles over its shards until it has its share. Training shuffles
    samples in a seeded buffer per worker and, with flip, flips half of them; validation does
    neither.
    Samples the index promises but that cannot be read (truncated shard, corrupt sample) are
    warned about and counted in `lost`.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        *,
        batch_size: int,
        num_workers: int,
        train: bool,
        exact: bool,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        flip: bool = True,
    ):
        super().__init__()
        _check_counts(batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer)
        self.flip = flip
        self.shard_dir = Path(shard_dir)
        index = read_index(self.shard_dir)
        self.image_size: int = index["params"]["image_size"]
        self.shards = [(shard["name"], shard["count"]) for shard in index["shards"] if shard["count"] > 0]
        self.total = sum(count for _, count in self.shards)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train, self.exact = train, exact
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.skip = 0  # batches of the epoch to leave out (a resume mid-epoch); see Loader.batches
        self.lost = multiprocessing.Value("q", 0)
        streams = world_size * max(num_workers, 1)
        if not exact:
            if len(self.shards) < streams:
                raise DataError(
                    f"{self.shard_dir}: {len(self.shards)} non-empty shards; balanced epochs need at least "
                    f"world_size x num_workers = {streams} (use smaller shards or fewer workers)"
                )
            if self.total < world_size * batch_size:
                raise DataError(
                    f"{self.shard_dir}: {self.total} samples, fewer than world_size x batch_size = "
                    f"{world_size * batch_size}; an epoch would have no batch"
                )

    def worker_shards(self, worker: int) -> list[tuple[str, int]]:
        """(name, sample count) of the shards that worker of this rank reads this epoch."""
        order = list(self.shards)
        if self.train:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker :: max(self.num_workers, 1)]

    def worker_batches(self, worker: int) -> int:
        """Number of batches that worker yields this epoch."""
        if self.exact:
            return math.ceil(sum(count for _, count in self.worker_shards(worker)) / self.batch_size)
        per_rank = self.total // (self.world_size * self.batch_size)
        workers = max(self.num_workers, 1)
        return per_rank // workers + (worker < per_rank % workers)

    def worker_skip(self, worker: int) -> int:
        """That worker's batches among the first `skip` of a balanced epoch: the DataLoader takes
        batches from its workers in turn, and every worker yields full batches."""
        workers = max(self.num_workers, 1)
        return max(0, (self.skip - worker + workers - 1) // workers)

    def num_batches(self) -> int:
        """Batches of this rank in the current epoch (exact unless samples are lost)."""
        return sum(self.worker_batches(worker) for worker in range(max(self.num_workers, 1)))

    def _read(self, name: str, count: int) -> Iterator[dict[str, Any]]:
        path = self.shard_dir / name
        read, error = 0, None
        try:
            for sample in read_shard(path):
                read += 1
                yield sample
        except (OSError, DataError) as exc:
            error = exc
        if read != count or error is not None:
            cause = repr(error) if error is not None else "the shard does not match its index"
            self._lose(max(count - read, 0), f"{path}: read {read} of {count} samples ({cause})")

    def _lose(self, count: int, message: str) -> None:
        with self.lost.get_lock():
            self.lost.value += count
        warnings.warn(f"{message}; skipped, {self.lost.value} samples lost so far", RuntimeWarning, stacklevel=2)

    def _samples(self, shards: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        while True:
            read = 0
            for name, count in shards:
                for sample in self._read(name, count):
                    read += 1
                    yield sample
            if self.exact:
                return
            if read == 0:
                raise DataError(f"{self.shard_dir}: no sample of {[name for name, _ in shards]} is readable")

    def _decoded(self, samples: Iterator[dict[str, Any]], flips: random.Random | None, skip: int = 0):
        """(uint8 image, label, key) of the samples after the first `skip`, which are not decoded.
        Every sample draws its flip, so skipping leaves the later flips as they were."""
        for sample in samples:
            flip = flips is not None and flips.random() < 0.5
            if skip:
                skip -= 1
                continue
            try:
                pixels = sample_pixels(sample, self.image_size)
                label = int(sample[LABEL_FIELD])
            except Exception as exc:  # a damaged sample is skipped and counted, as the policy says
                self._lose(1, f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: {exc!r}")
                continue
            yield _tensor(pixels, flip), label, sample["__key__"]

    def __iter__(self):
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.num_workers, 1):
            raise DataError(
                f"num_workers={self.num_workers}: the stream runs in {workers} DataLoader workers; "
                "it must be read with as many, or shards would be lost or repeated"
            )
        # The DataLoader asks its workers for batches in turn from the first; after a skip (set by
        # Loader.batches on balanced epochs only) the next batch is worker (skip mod workers)'s, so
        # the slots play the workers rotated by the skip.
        worker = (slot + self.skip) % workers
        shards = self.worker_shards(worker)
        skipped = self.worker_skip(worker)
        quota = (self.worker_batches(worker) - skipped) * self.batch_size
        samples: Iterator[dict[str, Any]] = self._samples(shards)
        flips = None
        if self.train:
            stream = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
            # No point buffering more than one pass over this worker's shards.
            size = max(min(self.shuffle_buffer, sum(count for _, count in shards)), 1)
            samples = buffer_shuffle(size, size, rng=random.Random(f"buffer:{stream}"))(samples)
            if self.flip:
                flips = random.Random(f"flip:{stream}")
        decoded = self._decoded(samples, flips, skipped * self.batch_size)
        return decoded if self.exact else itertools.islice(decoded, max(quota, 0))


class FolderDataset(Dataset):
    """An image folder read with the same transform as the shards: decode, RGB, centre crop,
    and in training (with flip) a flip seeded by (seed, epoch, index), so any worker split gives
    the same images. Only files with an image extension inside class folders are used; the rest are
    counted in `excluded`. An unreadable image raises DataError naming it (shard the folder to
    skip and count bad files instead).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        manifest: Manifest | str | Path | None = None,
        image_size: int = 256,
        train: bool = True,
        flip: bool = True,
        seed: int = 0,
        epoch: int = 0,
    ):
        self.root = Path(root)
        if manifest is None:
            manifest = list_image_folder(self.root, progress=False)
        elif not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest)
        self.classes = manifest.classes
        self.rows = [
            (rel, label)
            for rel, _, label in manifest.rows
            if label >= 0 and rel.lower().endswith(IMAGE_EXTENSIONS)
        ]
        self.excluded = len(manifest.rows) - len(self.rows)
        if not self.rows:
            raise DataError(f"{self.root}: no image files in class folders")
        self.image_size, self.seed, self.epoch = image_size, seed, epoch
        self.flip = train and flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        rel, label = self.rows[index]
        path = self.root / rel
        try:
            image = center_crop(to_rgb(decode(path.read_bytes())), self.image_size)
        except Exception as exc:
            raise DataError(f"{path}: cannot be loaded ({exc!r}); shard the folder to skip bad files") from exc
        flip = self.flip and random.Random(f"flip:{self.seed}:{self.epoch}:{index}").random() < 0.5
        return _tensor(np.asarray(image), flip), label, rel


class Loader:
    """Iterates uint8 Batches of a dataset for the epoch given to set_epoch.

    Workers are started anew each epoch, so they see the new epoch. Batches are page-locked where
    CUDA is available, so that the trainer's non_blocking copies to the GPU overlap compute.
    """

    def __init__(self, dataset: ShardStream | FolderDataset, make_loader: Callable[[], DataLoader]):
        self.dataset = dataset
        self._make_loader = make_loader

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and flips) the next iteration yields."""
        self.dataset.epoch = epoch

    @property
    def lost(self) -> int:
        """Samples of the current epoch that the shard index promised but could not be read."""
        return self.dataset.lost.value if isinstance(self.dataset, ShardStream) else 0

    def __len__(self) -> int:
        """Batches of this rank in the current epoch."""
        if isinstance(self.dataset, ShardStream):
            return self.dataset.num_batches()
        return len(self._make_loader())

    def batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """This rank's batches of `epoch` after the first `skip` (the trainer's BatchSource).
        Balanced shard epochs leave the skipped images undecoded, so a resume mid-epoch starts at
        once; otherwise the skipped batches are loaded and dropped."""
        self.set_epoch(epoch)
        if isinstance(self.dataset, ShardStream) and not self.dataset.exact:
            self.dataset.skip = skip
            return iter(self)
        return itertools.islice(self, skip, None)

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, ShardStream):
            self.dataset.lost.value = 0
        iterator = iter(self._make_loader())  # workers copy the dataset here
        if isinstance(self.dataset, ShardStream):
            self.dataset.skip = 0  # a skip applies to one iteration only
        for images, labels, keys in iterator:
            yield Batch(images, labels, list(keys))


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves SIGTERM and SIGINT to the training process, which stops after a step
    and writes a checkpoint: torchrun, told to stop, signals each rank's whole process group (and
    Slurm every process of a job step, a terminal's Ctrl-C the foreground group), and a worker that
    died of it would fail the rank's next step, the checkpoint's included. The worker still exits
    with its process (torch's watchdog) or on SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shard_loader(
    shard_dir: str | Path,
    batch_size: int,
    *,
    train: bool = True,
    exact: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    flip: bool = True,
) -> Loader:
    """Batches from webdataset shards (see ShardStream for the epoch rules).

    exact defaults to `not train`: training epochs are balanced (same number of full batches on
    every rank, as DDP needs), validation epochs see every sample exactly once. flip=False turns
    off the training flips (for data where a mirror image is another class, such as digits).
    """
    rank, world_size = _rank_and_world(rank, world_size)
    stream = ShardStream(
        shard_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        train=train,
        exact=(not train) if exact is None else exact,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
    )

    def make() -> DataLoader:
        return DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)

    return Loader(stream, make)


def folder_loader(
    root: str | Path,
    batch_size: int,
    *,
    manifest: Manifest | str | Path | None = None,
    image_size: int = 256,
    train: bool = True,
    flip: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
) -> Loader:
    """Batches straight from an image folder: the fallback when there are no shards.

    Training uses torch's DistributedSampler (seeded shuffle per epoch, padded so every rank has
    the same number of samples) and drops each rank's last partial batch; validation deals the
    samples to ranks in order, each exactly once. flip as for shard_loader.
    """
    _check_counts(batch_size=batch_size, num_workers=num_workers, image_size=image_size)
    rank, world_size = _rank_and_world(rank, world_size)
    dataset = FolderDataset(
        root, manifest=manifest, image_size=image_size, train=train, flip=flip, seed=seed, epoch=epoch
    )

    def make() -> DataLoader:
        if train:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            sampler.set_epoch(dataset.epoch)
        else:
            sampler = range(rank, len(dataset), world_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=train,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals,
        )

    return Loader(dataset, make)
