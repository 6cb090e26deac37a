"""The demo dataset: scikit-learn's bundled handwritten digits written as an image folder, so the
whole pipeline runs with no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from unite.data.errors import DataError
from unite.options import has_type


def write_demo_folder(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, int]:
    """Write the 1797 8x8 digits as RGB PNGs of image_size x image_size (BICUBIC upscale) into
    out_dir/train/<digit>/ and out_dir/val/<digit>/, split stratified by class with seed.

    The same arguments give the same bytes. out_dir/train and out_dir/val must not exist yet, so
    that no stale image survives from another resolution or split. Returns the image count per
    split.
    """
    if not has_type(image_size, int) or image_size < 8:
        raise DataError(f"image_size={image_size!r}: must be an integer >= 8 (the digits are 8x8)")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r}: must lie strictly between 0 and 1")
    out_dir = Path(out_dir)
    for split in ("train", "val"):
        if (out_dir / split).exists():
            raise DataError(f"{out_dir / split}: already exists; remove it to write the demo folder again")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    indices = np.arange(len(pixels))
    train, val = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=digits.target)
    counts = {}
    for split, chosen in (("train", train), ("val", val)):
        for index in sorted(chosen):
            folder = out_dir / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[index]).resize((image_size, image_size), Image.BICUBIC)
            image.convert("RGB").save(folder / f"{index:04d}.png")
        counts[split] = len(chosen)
    return counts
