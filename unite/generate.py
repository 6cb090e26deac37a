"""Generation of many images, reproducible across batch sizes and GPU counts.

Image i's starting noise depends only on (seed, i), and its label on i (class-balanced: labels
tiled 0, 1, ..., C-1, 0, 1, ...). Work is cut into fixed blocks of indices that ranks take in
turn, so the set of images does not depend on how many processes produce it. Fixed-step solvers
treat each sample independently, so their images do not depend on the block size either;
dopri5 chooses one step size per block, so its images match across block sizes only to within
its tolerance (as in the reference sampler).
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from unite.distributed import Runtime
from unite.metrics.fid import to_uint8
from unite.model import UNITE
from unite.sampling import Guidance, sample


def class_balanced_labels(num_images: int, num_classes: int) -> Tensor:
    """Labels tiled over the classes: image i gets class i mod num_classes."""
    return torch.arange(num_images) % num_classes


def noise_for(indices: Sequence[int], seed: int, shape: tuple[int, ...]) -> Tensor:
    """Starting noise for the given image indices; row k depends only on (seed, indices[k])."""
    rows = []
    for index in indices:
        stream = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(stream >> np.uint64(1)))
        rows.append(torch.randn(shape, generator=generator))
    return torch.stack(rows)


def rank_blocks(num_images: int, block_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The blocks of image indices that `rank` of `world_size` generates."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must lie in [0, world_size={world_size})")
    blocks = [range(start, min(start + block_size, num_images)) for start in range(0, num_images, block_size)]
    return blocks[rank::world_size]


@torch.no_grad()
def generate(
    model: UNITE,
    num_images: int,
    guidance: Guidance,
    seed: int = 0,
    labels: Tensor | None = None,
    block_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    solver: str = "dopri5",
    steps: int = 49,
    progress: bool = True,
) -> Iterator[tuple[range, Tensor, Tensor]]:
    """Yield (indices, labels, uint8 images (B, H, W, 3)) for this rank's blocks."""
    cfg = model.cfg
    labels = class_balanced_labels(num_images, cfg.num_classes) if labels is None else labels.cpu()
    if labels.shape != (num_images,):
        raise ValueError(f"labels: expected shape ({num_images},), got {tuple(labels.shape)}")
    model.check_labels(labels, allow_null=True)  # on the host, before any block goes to the device
    device = next(model.parameters()).device
    blocks = rank_blocks(num_images, block_size, rank, world_size)
    bar = tqdm(total=sum(len(b) for b in blocks), desc=f"generate ({solver})", unit="img",
               disable=not progress or rank != 0)
    for block in blocks:
        noise = noise_for(block, seed, (cfg.num_latent_tokens, cfg.latent_dim)).to(device)
        block_labels = labels[block.start : block.stop]
        out = sample(model, noise, block_labels.to(device), guidance, solver=solver, steps=steps)
        bar.update(len(block))
        yield block, block_labels, to_uint8(out.images, channels_last=True).cpu()
    bar.close()


def generate_in_order(
    model: UNITE,
    num_images: int,
    guidance: Guidance,
    runtime: Runtime,
    seed: int = 0,
    block_size: int = 64,
    solver: str = "dopri5",
    steps: int = 49,
) -> Iterator[tuple[range, Tensor, Tensor]]:
    """Every rank generates its blocks; the main process yields every block as (indices, labels,
    uint8 images (B, H, W, 3)) in index order, the same blocks one process would make; other ranks
    yield nothing.

    Ranks generate one block each per round and pass it on as soon as the main process asks for
    it, so memory stays flat in `num_images`: no process holds more than a block of images."""
    local = generate(model, num_images, guidance, seed=seed, block_size=block_size, rank=runtime.rank,
                     world_size=runtime.world_size, solver=solver, steps=steps)
    if runtime.world_size == 1:
        yield from local
        return
    labels = class_balanced_labels(num_images, model.cfg.num_classes)
    size = model.cfg.image_size
    # Block n belongs to rank n % world_size (see rank_blocks); owners send theirs to rank 0 in order.
    for number, block in enumerate(rank_blocks(num_images, block_size)):
        owner = number % runtime.world_size
        if owner == runtime.rank:
            mine = next(local)
            if runtime.is_main:
                yield mine
            else:
                dist.send(mine[2].to(runtime.device).contiguous(), dst=0)
        elif runtime.is_main:
            buffer = torch.empty((len(block), size, size, 3), dtype=torch.uint8, device=runtime.device)
            dist.recv(buffer, src=owner)
            yield block, labels[block.start : block.stop], buffer.cpu()
    next(local, None)  # lets the generator finish (and close its progress bar)


def write_pngs(folder: Path, indices: Sequence[int], images: Tensor) -> None:
    """Write images as `{index:06d}.png` (lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in zip(indices, images.numpy()):
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def sample_grid(
    images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 8, scale: int = 1
) -> Image.Image:
    """One row per class, up to `per_class` samples of that class left to right, each image
    enlarged `scale` times (nearest neighbour, so small images stay sharp)."""
    if scale < 1:
        raise ValueError(f"grid scale={scale}: must be an integer >= 1")
    images = np.asarray(images).repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = images.shape[1:3]
    grid = np.full((num_classes * (height + 2), per_class * (width + 2), 3), 255, dtype=np.uint8)
    for cls in range(num_classes):
        for column, index in enumerate(np.flatnonzero(labels == cls)[:per_class]):
            top, left = cls * (height + 2) + 1, column * (width + 2) + 1
            grid[top : top + height, left : left + width] = images[index]
    return Image.fromarray(grid)


class GridSamples:
    """Keeps the first `per_class` images of each class from a stream of blocks (indices, labels,
    uint8 images (B, H, W, 3)): what `sample_grid` shows, without holding the rest."""

    def __init__(self, num_classes: int, per_class: int):
        self.num_classes, self.per_class = num_classes, per_class
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.kept: Counter[int] = Counter()

    def __call__(self, indices: range, labels: Tensor, images: Tensor) -> None:
        for label, image in zip(labels.tolist(), images.numpy()):
            if self.kept[label] < self.per_class:
                self.kept[label] += 1
                self.images.append(image.copy())
                self.labels.append(label)

    def grid(self, scale: int = 1) -> Image.Image:
        """The grid of the kept images (see `sample_grid`)."""
        if not self.images:
            raise ValueError("sample grid: no images were generated")
        return sample_grid(np.stack(self.images), np.array(self.labels), self.num_classes, self.per_class, scale)


class NpzImageWriter:
    """Writes uint8 (N, H, W, 3) images into an npz as `arr_0` (the layout of `np.savez` and of the
    ADM evaluation suite) block by block in index order, so the images never sit in memory at once.

    Use as a context manager; the file appears only once all N images are written."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int, int]):
        self.path, self.shape = Path(path), tuple(shape)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.written = 0

    def __enter__(self) -> NpzImageWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.archive = zipfile.ZipFile(self.partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.archive.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.member, header)
        return self

    def __call__(self, indices: range, labels: Tensor, images: Tensor) -> None:
        if (indices.start != self.written or indices.stop > self.shape[0] or len(images) != len(indices)
                or tuple(images.shape[1:]) != self.shape[1:]):
            raise ValueError(
                f"{self.path}: got {len(images)} images {indices.start}..{indices.stop - 1} of shape "
                f"{tuple(images.shape[1:])} after {self.written} written; blocks must come in index order, up to "
                f"{self.shape[0]} images of shape {self.shape[1:]}"
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"{self.path}: images of dtype {images.dtype}; they must be uint8")
        self.member.write(images.contiguous().numpy().tobytes())
        self.written += len(images)

    def __exit__(self, error_type, error, traceback) -> None:
        self.member.close()
        self.archive.close()
        if error_type is None and self.written != self.shape[0]:
            self.partial.unlink()
            raise ValueError(f"{self.path}: {self.written} images written, {self.shape[0]} expected")
        if error_type is None:
            self.partial.replace(self.path)
        else:
            self.partial.unlink()


def write_npz(folder: Path, num_images: int, path: Path) -> None:
    """Gather `{index:06d}.png` files 0..num_images-1 into one uint8 (N, H, W, 3) npz array,
    reading one image at a time."""
    missing = [i for i in range(num_images) if not (folder / f"{i:06d}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} generated images missing (first: {missing[0]:06d}.png)")

    def load(index: int) -> Tensor:
        with Image.open(folder / f"{index:06d}.png") as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy())[None]

    first = load(0)
    no_labels = torch.empty(0)
    with NpzImageWriter(path, (num_images, *first.shape[1:])) as writer:
        writer(range(0, 1), no_labels, first)
        for index in range(1, num_images):
            writer(range(index, index + 1), no_labels, load(index))
