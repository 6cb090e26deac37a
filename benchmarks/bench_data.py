"""Benchmark the data pipeline on a generated ImageNet-like folder.

Makes a folder of JPEGs of typical ImageNet sizes (500x375, 375x500, 500x333), cut from the
sample photographs bundled with scikit-learn, then reports medians over --repeats runs:

- sharding throughput (images/s) with --workers processes, and `tar` of the same folder as the
  physical reference;
- loader throughput (decoded, flipped, batched uint8 images/s, --workers DataLoader workers)
  from PNG shards (default level 0, and level 1), from npy shards (uint8 pixels, no image
  decoding), from source-bytes shards, and from the raw folder (the reference path: JPEG decode
  + centre crop per image), one training epoch per run;
- the CPU cost per image of each step of both paths, which explains the loader ratio.

Variants run interleaved within each repeat, so that load from other users of the machine hits
them alike; CPU time per image (all processes, from getrusage) is reported next to the rates as
the figure that such load disturbs least.

    .venv/bin/python -m benchmarks.bench_data --images 3000 --repeats 3
    .venv/bin/python -m benchmarks.bench_data --workdir /tmp/bench --loaders-only   # reuse, loaders only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from unite.data.image import center_crop, decode, encode_png, to_rgb
from unite.data.loaders import _pixels, _tensor, folder_loader, shard_loader
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards

# (width, height) and their shares among the generated images, close to ImageNet's mix.
SIZES = (((500, 375), 0.6), ((375, 500), 0.25), ((500, 333), 0.15))


def make_imagenet_like(root: Path, images: int, classes: int, seed: int) -> None:
    """Random crops of the bundled photos, resized to ImageNet-like sizes, as JPEG quality 90."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(array) for array in load_sample_images().images]
    choices = [size for size, _ in SIZES]
    shares = [share for _, share in SIZES]
    for i in range(images):
        width, height = choices[rng.choice(len(choices), p=shares)]
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.4, 1.0) * min(photo.width / width, photo.height / height)
        crop_w, crop_h = int(width * scale), int(height * scale)
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"n{i % classes:08d}_{i}.JPEG", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool and DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run) -> tuple[int, float, float]:
    """run() returns an image count; returns it with the wall and CPU seconds it took."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = run()
    return images, time.perf_counter() - wall, cpu_seconds() - cpu


def epoch(loader) -> int:
    """Images of one epoch, from starting the workers to the last batch."""
    return sum(batch.images.shape[0] for batch in loader)


def stage_costs(root: Path, image_size: int, samples: int = 200) -> dict[str, float]:
    """CPU milliseconds per image of each step of both loader paths (one process, process_time)."""
    files = sorted(root.rglob("*.JPEG"))[:samples]
    jpegs = [path.read_bytes() for path in files]
    decoded = [to_rgb(decode(data)) for data in jpegs]
    crops = [center_crop(image, image_size) for image in decoded]
    arrays = [np.asarray(crop) for crop in crops]
    npys = []
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        npys.append(buffer.getvalue())
    pngs = {level: [encode_png(array, level) for array in arrays] for level in (1, 0)}

    def load(field: str, data: bytes):
        """What a shard loader worker does with one sample's image field (with a flip)."""
        return _tensor(_pixels(field, data, image_size), True)

    def per_image(step, items) -> float:
        started = time.process_time()
        for item in items:
            step(item)
        return (time.process_time() - started) / len(items) * 1e3

    return {
        "read JPEG file": per_image(Path.read_bytes, files),
        "JPEG decode": per_image(decode, jpegs),
        "centre crop (resize)": per_image(lambda image: center_crop(image, image_size), decoded),
        "PNG encode, level 1": per_image(lambda array: encode_png(array, 1), arrays),
        "PNG decode + flip, level 1": per_image(lambda data: load("png", data), pngs[1]),
        "PNG decode + flip, level 0": per_image(lambda data: load("png", data), pngs[0]),
        "npy read + flip": per_image(lambda data: load("npy", data), npys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the generated folder and shards here")
    parser.add_argument("--loaders-only", action="store_true",
                        help="time only the loaders (shards already in --workdir are reused)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    root = work / "imagenet_like"
    if not root.exists():
        started = time.perf_counter()
        make_imagenet_like(root, args.images, args.classes, seed=0)
        print(f"made {args.images} JPEGs in {root} ({time.perf_counter() - started:.1f} s)")
    folder_bytes = sum(p.stat().st_size for p in root.rglob("*.JPEG"))
    manifest = work / "manifest.tsv"
    listing = write_manifest(root, manifest, progress=False)
    count = len(listing.rows)

    shard_options = {"image_size": args.image_size, "shard_size": args.shard_size, "workers": args.workers,
                     "progress": False}
    stores = {"png": {}, "png level 1": {"png_level": 1}, "npy": {"store": "npy"},
              "source bytes": {"store": "source"}}
    out = {name: work / f"shards_{name.replace(' ', '_')}" for name in stores}
    rates: dict[str, list[float]] = {}  # images per second (wall clock)
    costs: dict[str, list[float]] = {}  # CPU milliseconds per image, all processes

    def record(name: str, run) -> None:
        images, wall, cpu = measure(run)
        rates.setdefault(name, []).append(images / wall)
        costs.setdefault(name, []).append(cpu / images * 1e3)

    def shard(name: str) -> int:
        shutil.rmtree(out[name], ignore_errors=True)
        return write_shards(root, manifest, out[name], **shard_options, **stores[name])["totals"]["written"]

    def tar_folder() -> int:
        archive = work / "folder.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(root), "."], check=True)
        archive.unlink()
        return count

    for _ in range(0 if args.loaders_only else args.repeats):
        for name in stores:
            record(f"shard {name}", lambda: shard(name))
        record("tar", tar_folder)
    for name in stores:
        if not (out[name] / "index.json").is_file():
            shard(name)
    disk = {name: sum(p.stat().st_size for p in out[name].glob("*.tar")) for name in stores}

    common = {"num_workers": args.workers, "rank": 0, "world_size": 1}
    loaders = {f"{name} shards": (lambda d=out[name]: shard_loader(d, args.batch_size, **common)) for name in stores}
    loaders["raw folder"] = lambda: folder_loader(root, args.batch_size, manifest=manifest,
                                                  image_size=args.image_size, **common)
    for repeat in range(args.repeats):
        for name, make in loaders.items():
            loader = make()
            loader.set_epoch(repeat)
            record(name, lambda: epoch(loader))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {name: statistics.median(values) for name, values in costs.items()}
    stages = stage_costs(root, args.image_size)
    print(f"\n{count} images ({folder_bytes / 1e6:.0f} MB of JPEG), crop {args.image_size}, batch {args.batch_size}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
          f"median of {args.repeats}")
    for name in stores:
        key = f"shard {name}"
        if key in medians:
            print(f"sharding, {name:18s}: {medians[key]:8.1f} images/s, {cpu[key]:6.2f} CPU ms/image, "
                  f"{disk[name] / 1e6:4.0f} MB")
    if "tar" in medians:
        print(f"tar of the folder           : {medians['tar']:8.1f} images/s, {cpu['tar']:6.2f} CPU ms/image, "
              f"{folder_bytes / 1e6:4.0f} MB")
    for name in loaders:
        print(f"loader, {name:20s}: {medians[name]:8.1f} images/s, {cpu[name]:6.2f} CPU ms/image "
              f"({medians[name] / medians['raw folder']:.2f}x the raw folder's rate, "
              f"{cpu['raw folder'] / cpu[name]:.2f}x less CPU)")
    print("CPU ms per image, one process: " + ", ".join(f"{step} {ms:.2f}" for step, ms in stages.items()))
    print(json.dumps({"images": count, "rates": rates, "cpu_ms": costs, "stage_ms": stages}))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
