"""Generation of many images, reproducible across batch sizes and GPU counts.

Image i's starting noise depends only on (seed, i), and its label on i (class-balanced: labels
tiled 0, 1, ..., C-1, 0, 1, ...). Work is cut into fixed blocks of indices that ranks take in
turn, so the set of images does not depend on how many processes produce it. Fixed-step solvers
treat each sample independently, so their images do not depend on the block size either;
dopri5 chooses one step size per block, so its images match across block sizes only to within
its tolerance (as in the reference sampler).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from unite import fid
from unite.distributed import Runtime
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


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3), quantised as the FID protocol does."""
    return fid.to_uint8(images).permute(0, 2, 3, 1).cpu()


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
    device = next(model.parameters()).device
    blocks = rank_blocks(num_images, block_size, rank, world_size)
    bar = tqdm(total=sum(len(b) for b in blocks), desc=f"generate ({solver})", unit="img",
               disable=not progress or rank != 0)
    for block in blocks:
        noise = noise_for(block, seed, (cfg.num_latent_tokens, cfg.latent_dim)).to(device)
        block_labels = labels[block.start : block.stop]
        out = sample(model, noise, block_labels.to(device), guidance, solver=solver, steps=steps)
        bar.update(len(block))
        yield block, block_labels, to_uint8(out.images)
    bar.close()


def generate_all(
    model: UNITE,
    num_images: int,
    guidance: Guidance,
    runtime: Runtime,
    seed: int = 0,
    block_size: int = 64,
    solver: str = "dopri5",
    steps: int = 49,
) -> tuple[Tensor, Tensor] | None:
    """Every rank generates its blocks; the main process gets all (uint8 images (N, H, W, 3),
    labels) in index order, the same as one process would make; other ranks get None."""
    local = {block.start: images for block, _, images in generate(
        model, num_images, guidance, seed=seed, block_size=block_size, rank=runtime.rank,
        world_size=runtime.world_size, solver=solver, steps=steps)}
    labels = class_balanced_labels(num_images, model.cfg.num_classes)
    if runtime.world_size == 1:
        return torch.cat([local[start] for start in sorted(local)]), labels
    # Block n belongs to rank n % world_size (see rank_blocks); owners send theirs to rank 0 in order.
    size = model.cfg.image_size
    parts = []
    for number, block in enumerate(rank_blocks(num_images, block_size)):
        owner = number % runtime.world_size
        if runtime.is_main:
            if owner == 0:
                parts.append(local[block.start])
            else:
                buffer = torch.empty((len(block), size, size, 3), dtype=torch.uint8, device=runtime.device)
                dist.recv(buffer, src=owner)
                parts.append(buffer.cpu())
        elif owner == runtime.rank:
            dist.send(local[block.start].to(runtime.device).contiguous(), dst=0)
    return (torch.cat(parts), labels) if runtime.is_main else None


def write_pngs(folder: Path, indices: Sequence[int], images: Tensor) -> None:
    """Write images as `{index:06d}.png` (lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in zip(indices, images.numpy()):
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def sample_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 8) -> Image.Image:
    """One row per class, up to `per_class` samples of that class left to right."""
    height, width = images.shape[1:3]
    grid = np.full((num_classes * (height + 2), per_class * (width + 2), 3), 255, dtype=np.uint8)
    for cls in range(num_classes):
        for column, index in enumerate(np.flatnonzero(labels == cls)[:per_class]):
            top, left = cls * (height + 2) + 1, column * (width + 2) + 1
            grid[top : top + height, left : left + width] = images[index]
    return Image.fromarray(grid)


def write_npz(folder: Path, num_images: int, path: Path) -> None:
    """Gather `{index:06d}.png` files 0..num_images-1 into one uint8 (N, H, W, 3) npz array."""
    missing = [i for i in range(num_images) if not (folder / f"{i:06d}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} generated images missing (first: {missing[0]:06d}.png)")
    images = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(num_images)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images)
