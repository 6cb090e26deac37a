"""Where the training batches come from: the BatchSource protocol, sources over tensors and
re-iterables, the config's `data:` section as a source, and the position in the data that a
checkpoint keeps so that a resumed run reads on from the same batch."""

from __future__ import annotations

import importlib
import itertools
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from unite.config import ModelConfig
from unite.train_config import TrainConfig, recipe_for


@runtime_checkable
class BatchSource(Protocol):
    def batches(self, epoch: int, skip: int) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's micro-batches (images (B,3,S,S): float in [0,1] or uint8, int64 labels
        (B,)) of `epoch`, leaving out its first `skip`; the same (epoch, skip) must give the same
        batches."""
        ...


class IterableSource:
    """Any re-iterable of batches (a list, a DataLoader) as a BatchSource: every epoch iterates
    it again (calling its `set_epoch(epoch)` first when it has one) and skips by discarding, so a
    resume mid-epoch reads the skipped batches once more."""

    def __init__(self, iterable: Iterable[tuple[Tensor, Tensor]]):
        self.iterable = iterable

    def batches(self, epoch: int, skip: int) -> Iterable[tuple[Tensor, Tensor]]:
        if hasattr(self.iterable, "set_epoch"):
            self.iterable.set_epoch(epoch)
        return itertools.islice(self.iterable, skip, None)


class TensorBatches:
    """An in-memory dataset as a BatchSource: a fresh order each epoch from (seed, epoch), split
    across ranks, full batches only (the same number on every rank)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        if len(self) == 0:
            raise ValueError(
                f"{len(images)} images cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def __len__(self) -> int:
        return len(self.images) // self.world_size // self.batch_size

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        mine = torch.from_numpy(order[self.rank :: self.world_size][: len(self) * self.batch_size])
        for index in mine.view(len(self), self.batch_size)[skip:]:
            yield self.images[index], self.labels[index]


def synthetic_images(cfg: ModelConfig, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random images in [0, 1] and labels, for smoke runs and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, cfg.image_size, cfg.image_size, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (num_images,), generator=generator)
    return images, labels


def build_batch_source(cfg: TrainConfig, rank: int, world_size: int) -> BatchSource:
    """The config's `data:` section as a BatchSource in micro-batches of the recipe's per-device
    batch on `world_size` ranks. kind "python" calls `source(batch_size=<that batch>, rank=,
    world_size=, seed=, **options)`, which returns a BatchSource or a re-iterable of batches with
    `set_epoch` (e.g. unite.data.loaders:shard_loader with options {shard_dir: ...})."""
    data = cfg.data
    batch_size = recipe_for(cfg, world_size).per_device_batch
    if data["kind"] == "synthetic":
        images, labels = synthetic_images(cfg.model, data["num_images"], data.get("seed", 0))
        return TensorBatches(images, labels, batch_size, rank, world_size, cfg.seed)
    module_name, attribute = data["source"].split(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    source = factory(batch_size=batch_size, rank=rank, world_size=world_size,
                     seed=cfg.seed, **data.get("options", {}))
    return as_batch_source(source)


def as_batch_source(data: BatchSource | Iterable[tuple[Tensor, Tensor]]) -> BatchSource:
    return data if isinstance(data, BatchSource) else IterableSource(data)


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` this rank has consumed


def carry_position(
    saved: dict[str, int], saved_world: int, saved_batch: int, world: int, batch_size: int
) -> tuple[DataPosition, int]:
    """A checkpoint's data position for `world` ranks taking micro-batches of `batch_size`: the
    images consumed in the epoch (micro-batches x saved_batch x saved_world) in whole rounds of
    the new micro-batches on the new world size, and how many of those images are read again
    because they do not fill a round. The micro-batch may differ with the world size
    (`recipe_for`), so the saved run's is given apart."""
    images = saved["batch"] * saved_batch * saved_world
    batch, reread = divmod(images, batch_size * world)
    return DataPosition(saved["epoch"], batch), reread


def micro_batches(
    source: BatchSource, position: DataPosition, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless micro-batches from `position` on, advancing it as they are taken. A batch is any
    sequence that starts with images and labels (extra fields such as sample keys are dropped)."""
    while True:
        with global_rng_untouched():
            epoch_batches = iter(source.batches(position.epoch, position.batch))
        while True:
            with global_rng_untouched():
                batch = next(epoch_batches, None)
            if batch is None:
                break
            images, labels = batch[0], batch[1]
            if images.shape[0] != batch_size or labels.shape != (batch_size,):
                raise ValueError(
                    f"batch {position.batch} of epoch {position.epoch}: got images {tuple(images.shape)} "
                    f"and labels {tuple(labels.shape)}; every micro-batch must hold the recipe's "
                    f"per-device batch of {batch_size} images (drop the last partial batch)"
                )
            position.batch += 1
            yield images, labels
        if position.batch == 0:
            raise ValueError(
                f"the batch source gave no batches for epoch {position.epoch} (a one-shot iterator "
                "cannot start a second epoch: pass a re-iterable or a BatchSource)"
            )
        position.epoch += 1
        position.batch = 0


@contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Restores the global python, numpy and torch generators after the block, so a batch source
    that draws from them (a DataLoader draws a worker seed each time it is iterated) does not
    shift the training randomness, which then depends on the step alone."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
