"""uint8 (N, 3, H, W) image batches from each format evaluation reads: an image folder (decoded as
torch-fidelity decodes it), an image npz, and webdataset shards of any store (decoded and cropped by
the training loaders' own `sample_pixels`); `open_images` picks the reader for a path."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unite.data.errors import DataError
from unite.data.loaders import sample_pixels
from unite.data.shards import INDEX_NAME, read_index, read_shard

# The files torch-fidelity reads from an image folder.
FOLDER_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def image_folder_files(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """PNG/JPEG files of a folder, sorted by real path as torch-fidelity sorts them (the IS splits
    depend on the order)."""
    root = Path(folder)
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(os.path.realpath(p) for p in candidates
                   if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS)
    if not files:
        hint = "" if recursive else " (subfolders are not searched unless recursive / --recursive)"
        raise DataError(f"{str(folder)!r}: no {'/'.join(FOLDER_IMAGE_EXTENSIONS)} images found{hint}")
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
                raise DataError(
                    f"{files[index]}: {tuple(image.shape[1:])} pixels but {files[first_index]} has "
                    f"{tuple(first.shape[1:])}; all images must have one size (resize or crop them first)"
                )
        return torch.stack([image for _, image in items])

    loader = torch.utils.data.DataLoader(_ImageFiles(files), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate)
    yield from loader


def npz_array(data: np.lib.npyio.NpzFile, key: str, what: str) -> np.ndarray:
    """One array of an npz opened with allow_pickle=False; a pickled object array (loading it
    could run code) or a malformed one is refused with a DataError naming it."""
    try:
        return data[key]
    except ValueError as exc:
        raise DataError(
            f"{what}: array {key!r} cannot be read ({exc}); npz inputs must hold numeric arrays "
            f"(pickled object arrays are refused: loading them could run code)"
        ) from exc


def npz_images(path: Path) -> np.ndarray:
    """The one uint8 image array of an npz, (N, H, W, 3) or (N, 3, H, W), as (N, 3, H, W)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = [array for array in (npz_array(data, key, repr(str(path))) for key in data.files)
                  if array.dtype == np.uint8 and array.ndim == 4]
    if len(arrays) != 1:
        raise DataError(
            f"{str(path)!r}: found {len(arrays)} uint8 4-D arrays; an image npz must hold exactly one, "
            f"(N, H, W, 3) or (N, 3, H, W), and a statistics npz must hold 'mu' and 'sigma'"
        )
    images = arrays[0]
    if images.shape[-1] == 3:
        return images.transpose(0, 3, 1, 2)
    if images.shape[1] == 3:
        return images
    raise DataError(f"{str(path)!r}: image array of shape {images.shape}; it must be (N, H, W, 3) or (N, 3, H, W)")


def _shard_image_size(shard_dir: Path) -> int | None:
    """The crop size in the index beside a shard (the sharder writes one); None without an index."""
    if not (shard_dir / INDEX_NAME).is_file():
        return None
    return read_index(shard_dir)["params"]["image_size"]


def iter_shard_images(shards: Sequence[str | os.PathLike], batch_size: int = 64) -> Iterator[Tensor]:
    """uint8 batches of the images in webdataset tar shards of any store (png, npy, source), in shard
    and member order, decoded and centre-cropped as the training loaders do."""
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
                    raise DataError(
                        f"sample {sample['__key__']!r} has {tuple(pixels.shape[1:])} pixels, earlier "
                        f"images {tuple(shape[1:])}; all images must have one size"
                    )
                batch.append(pixels)
                if len(batch) == batch_size:
                    yield torch.stack(batch)
                    batch = []
        except DataError as exc:
            raise DataError(f"{shard}: {exc}") from exc
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
        raise DataError("no image source given")
    if all(p.suffix == ".tar" for p in paths):
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"shards not found: {', '.join(missing)}")
        return iter_shard_images(paths, batch_size), None
    if len(paths) != 1:
        raise DataError(f"{len(paths)} image sources: give one folder or npz, or any number of .tar shards")
    path = paths[0]
    if path.is_dir():
        files = image_folder_files(path, recursive)
        return iter_image_files(files, batch_size, num_workers), len(files)
    if path.is_file() and path.suffix == ".npz":
        images = torch.from_numpy(npz_images(path))
        return iter(images.split(batch_size)), len(images)
    raise DataError(f"{str(path)!r}: does not exist or is not an image folder, an image .npz or .tar shards")
