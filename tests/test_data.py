"""Data pipeline: centre crop, manifest, deterministic resumable shards, loaders, demo folder."""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import tarfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from torchvision.datasets import ImageFolder
from torchvision.io import decode_png

import unite.data.shards as shards_module
from unite.data.errors import DataError
from unite.data.image import center_crop, encode_png, to_rgb
import unite.data.loaders as loaders
from unite.data.loaders import folder_loader, sample_pixels, shard_loader
from unite.data.manifest import list_image_folder, read_manifest, write_manifest
from unite.data.shards import read_index, read_shard, shard_plan, write_shards
from unite.demo_data import write_demo_folder

SIZE = 16  # crop size used throughout: tiny images keep the suite fast


# ---------------------------------------------------------------- fixtures and helpers


def _pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random RGB picture (gradients plus noise), so that crops differ visibly."""
    ys, xs = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-3, 3, size=(2, 3))
    image = base + xs[..., None] * slope[0] + ys[..., None] * slope[1] + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """One folder per class with `count` JPEGs of random sizes from 12x10 to 60x50 (some below
    the crop), names with dots and upper-case extensions as in ImageNet."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width, height = int(rng.integers(12, 61)), int(rng.integers(10, 51))
            _save(root / name / f"{name}_img.{i}.JPEG", _pixels(rng, width, height))
    return root


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, as in the spec (independent of unite's version)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image.convert("RGB"))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def shard_dir_digests(out_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.iterdir())}


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of one shard read with the standard library (not webdataset), by key."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """60 images in 3 classes, sharded as PNG crops (9 shards of <= 7), as npy crops and as source
    bytes."""
    tmp = tmp_path_factory.mktemp("sharded")
    root = make_folder(tmp / "images", {"a": 20, "b.dotted": 25, "c": 15})
    manifest = tmp / "manifest.tsv"
    write_manifest(root, manifest, progress=False)
    index = write_shards(root, manifest, tmp / "shards", image_size=SIZE, shard_size=7, workers=2, progress=False)
    write_shards(root, manifest, tmp / "source", image_size=SIZE, shard_size=7, store="source", progress=False)
    write_shards(root, manifest, tmp / "npy", image_size=SIZE, shard_size=7, store="npy", workers=2, progress=False)
    listing = read_manifest(manifest)
    return {"root": root, "manifest": manifest, "shards": tmp / "shards", "source": tmp / "source",
            "npy": tmp / "npy", "index": index, "listing": listing}


# ---------------------------------------------------------------- centre crop and RGB


@pytest.mark.parametrize(
    "size",
    [(70, 50), (50, 70), (200, 33), (33, 200), (31, 31), (16, 16), (16, 40), (12, 10), (5, 3), (64, 64)],
)
def test_center_crop_matches_adm_reference(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(_pixels(rng, *size))
    crop = center_crop(image, SIZE)
    assert crop.size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(crop), adm_center_crop_arr(image, SIZE))


def test_center_crop_halves_with_box_before_bicubic():
    # 128x64 with size 16: two BOX halvings reach 32x16, already the target scale, so the result
    # is the middle 16 columns of the twice-halved image. Pillow resamples separably, rounding
    # after the horizontal and after the vertical pass.
    pixels = _pixels(np.random.default_rng(3), 128, 64)

    def halve(a):
        h, w, _ = a.shape
        a = np.floor(a.reshape(h, w // 2, 2, 3).mean(axis=2) + 0.5)
        return np.floor(a.reshape(h // 2, 2, w // 2, 3).mean(axis=1) + 0.5)

    expected = halve(halve(pixels.astype(np.float64)))[:, 8:24]
    got = np.asarray(center_crop(Image.fromarray(pixels), SIZE)).astype(np.float64)
    assert np.abs(got - expected).max() <= 1  # Pillow's fixed-point rounding
    assert np.abs(got - expected).mean() < 0.1


def test_center_crop_of_a_crop_is_the_identity():
    crop = center_crop(Image.fromarray(_pixels(np.random.default_rng(1), 40, 30)), SIZE)
    np.testing.assert_array_equal(np.asarray(center_crop(crop, SIZE)), np.asarray(crop))


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (5, 3), (48, 64)])
def test_encode_png_is_lossless_for_pillow_and_torchvision(level, height, width):
    """Any PNG decoder must read the Up-filtered rows back exactly, including the wrap-around
    of differences modulo 256 (the noise makes them wrap)."""
    array = np.random.default_rng(level).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encode_png(array, level)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
    with warnings.catch_warnings():  # torchvision's image I/O is deprecated; it is only libpng here
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), array)


def test_encode_png_compresses_a_photograph_like_pillow():
    """The Up filter must not cost disk: a bundled photograph's crop is within 5% of the size
    of Pillow's PNG at the same zlib level."""
    photo = load_sample_images().images[0][:256, :256]
    pillow = io.BytesIO()
    Image.fromarray(photo).save(pillow, format="PNG", compress_level=1)
    assert len(encode_png(photo, 1)) < 1.05 * len(pillow.getvalue())
    assert len(encode_png(photo, 1)) < 0.8 * len(encode_png(photo, 0))


@pytest.mark.parametrize("level, row_filters", [(0, [0, 0, 0, 0]), (1, [0, 2, 2, 2]), (9, [0, 2, 2, 2])])
def test_encode_png_filters_rows_with_up_only_when_it_compresses(level, row_filters):
    """The filter-type byte that starts each row of the PNG's image data, read with zlib: None
    (0) for stored data at level 0, Up (2) below the first row at levels above 0."""
    data = encode_png(np.zeros((4, 5, 3), np.uint8), level)
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    rows = zlib.decompress(data[idat + 4 : idat + 4 + length])
    assert [rows[row * (1 + 5 * 3)] for row in range(4)] == row_filters


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "P", "I;16", "1"])
def test_to_rgb_converts_every_mode_without_warnings(mode):
    image = Image.fromarray(_pixels(np.random.default_rng(0), 8, 6))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L")).astype(np.uint16) * 200))
    else:
        image = image.convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)


# ---------------------------------------------------------------- manifest


def test_manifest_matches_torchvision_image_folder(tmp_path):
    root = make_folder(tmp_path / "images", {"b": 3, "a.x": 2, "c": 4})
    (root / "empty").mkdir()
    _save(root / "c" / "nested" / "deep.png", _pixels(np.random.default_rng(0), 20, 20), "PNG")
    (root / "README.txt").write_text("not in a class")
    path = tmp_path / "m" / "train.tsv"
    manifest = write_manifest(root, path, progress=False)

    reference = ImageFolder(str(root), allow_empty=True)
    assert manifest.classes == reference.classes == ["a.x", "b", "c", "empty"]
    assert manifest.empty_classes == ["empty"]
    in_classes = [(str(root / rel), label) for rel, _, label in manifest.rows if label >= 0]
    assert in_classes == reference.samples  # same files, same order, same class index
    assert manifest.rows[-1] == ("README.txt", len("not in a class"), -1)
    for rel, size, _ in manifest.rows:
        assert size == os.path.getsize(root / rel)
    assert read_manifest(path) == manifest
    lines = path.read_text().splitlines()
    assert lines[:2] == ["#unite-manifest/1", "#class\t0\ta.x"] and lines[5] == "path\tsize\tlabel"


def test_manifest_bad_roots_fail_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'}: image-folder root does not exist"):
        list_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no class folders"):
        list_image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="flat: no class folders"):
        list_image_folder(tmp_path / "flat")
    (tmp_path / "tabs" / "a").mkdir(parents=True)
    (tmp_path / "tabs" / "a" / "x\ty.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="x\ty.jpg: file name contains a tab"):
        list_image_folder(tmp_path / "tabs")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "first line is ''"),
        ("#unite-manifest/1\n#class\t1\ta\npath\tsize\tlabel\n", ":2: .*expected '#class<TAB>0<TAB>name'"),
        ("#unite-manifest/1\n#class\t0\ta\npath\tsize\tlabel\nx.jpg\t3\t1\n", ":4: .*label in \\[-1, 1\\)"),
        ("#unite-manifest/1\n#class\t0\ta\npath\tsize\tlabel\nx.jpg\tbig\t0\n", ":4: .*path<TAB>size<TAB>label"),
        ("#unite-manifest/1\n#class\t0\ta\n", "no column header"),
    ],
)
def test_read_manifest_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "m.tsv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


# ---------------------------------------------------------------- shards


def test_shards_are_byte_identical_across_runs_and_worker_counts(tmp_path, sharded):
    again = write_shards(sharded["root"], sharded["manifest"], tmp_path / "again", image_size=SIZE,
                         shard_size=7, workers=1, progress=False)
    assert again == sharded["index"]
    assert shard_dir_digests(tmp_path / "again") == shard_dir_digests(sharded["shards"])
    index = sharded["index"]
    assert index["totals"] == {"listed": 60, "written": 60, "skipped": 0, "shards": 9,
                               "bytes": sum(s["bytes"] for s in index["shards"])}
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(9)]
    assert sorted(p.name for p in sharded["shards"].iterdir()) == ["index.json"] + [s["name"] for s in index["shards"]]
    for shard in index["shards"]:
        path = sharded["shards"] / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:
            assert {m.mtime for m in tar.getmembers()} == {0}


def test_shard_content_is_the_crop_label_and_path_of_each_listed_file(sharded):
    listing, index = sharded["listing"], sharded["index"]
    plan = shard_plan(len(listing.rows), 7, seed=0)
    seen = []
    for number, shard in enumerate(index["shards"]):
        samples = read_tar_samples(sharded["shards"] / shard["name"])
        assert shard["count"] == len(samples)
        assert sorted(samples) == sorted(f"{row:08d}" for row in plan[number])
        for key, fields in samples.items():
            assert "." not in key and set(fields) == {"png", "cls", "path"}
            rel, _, label = listing.rows[int(key)]
            assert fields["path"].decode() == rel and int(fields["cls"]) == label
            assert listing.classes[label] == rel.split("/")[0]
            source = Image.open(sharded["root"] / rel)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(fields["png"]))),
                                          adm_center_crop_arr(source, SIZE))
            seen.append(int(key))
    assert sorted(seen) == list(range(60))  # every listed file exactly once
    assert index["class_counts"] == [20, 25, 15]
    assert index["classes"] == ["a", "b.dotted", "c"]


def test_seed_changes_the_order_but_not_the_content(tmp_path, sharded):
    other = write_shards(sharded["root"], sharded["manifest"], tmp_path / "s1", image_size=SIZE,
                         shard_size=7, seed=1, workers=1, progress=False)
    def keys(shards: Path, index: dict) -> list[list[str]]:
        return [sorted(read_tar_samples(shards / shard["name"])) for shard in index["shards"]]

    assert keys(tmp_path / "s1", other) != keys(sharded["shards"], sharded["index"])
    assert other["totals"]["written"] == 60 and other["params"]["seed"] == 1


def test_source_store_keeps_the_untouched_bytes(sharded):
    listing = sharded["listing"]
    index = read_index(sharded["source"])
    assert index["params"]["store"] == "source"
    for shard in index["shards"]:
        for key, fields in read_tar_samples(sharded["source"] / shard["name"]).items():
            rel = listing.rows[int(key)][0]
            assert set(fields) == {"jpg", "cls", "path"}
            assert fields["jpg"] == (sharded["root"] / rel).read_bytes()


def test_npy_store_keeps_the_crop_pixels_byte_identically(tmp_path, sharded):
    again = write_shards(sharded["root"], sharded["manifest"], tmp_path / "npy", image_size=SIZE, shard_size=7,
                         store="npy", workers=1, progress=False)
    assert again == read_index(sharded["npy"]) and again["params"]["store"] == "npy"
    assert shard_dir_digests(tmp_path / "npy") == shard_dir_digests(sharded["npy"])
    listing = sharded["listing"]
    for shard in again["shards"]:
        for key, fields in read_tar_samples(sharded["npy"] / shard["name"]).items():
            assert set(fields) == {"npy", "cls", "path"}
            pixels = np.load(io.BytesIO(fields["npy"]), allow_pickle=False)
            assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 3)
            source = Image.open(sharded["root"] / listing.rows[int(key)][0])
            np.testing.assert_array_equal(pixels, adm_center_crop_arr(source, SIZE))


def _bad_folder(root: Path) -> dict[str, str]:
    """A folder with every kind of bad input; returns the skipped files and their reasons."""
    make_folder(root, {"good": 4, "mixed": 2})
    rng = np.random.default_rng(7)
    mixed = root / "mixed"
    whole = io.BytesIO()
    Image.fromarray(_pixels(rng, 60, 40)).save(whole, "JPEG", quality=90)
    (mixed / "truncated.JPEG").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (mixed / "garbage.JPEG").write_bytes(rng.bytes(500))
    (mixed / "notes.txt").write_text("labels are folders")
    _save(mixed / "cmyk.JPEG", _pixels(rng, 30, 30), "JPEG", mode="CMYK")
    _save(mixed / "gray.png", _pixels(rng, 30, 20), "PNG", mode="L")
    _save(mixed / "palette.png", _pixels(rng, 20, 30), "PNG", mode="P")
    _save(mixed / "alpha.png", _pixels(rng, 20, 20), "PNG", mode="RGBA")
    _save(mixed / "png_named.JPEG", _pixels(rng, 24, 18), "PNG")
    _save(mixed / "tiny.JPEG", _pixels(rng, 6, 4))
    (root / "empty_class").mkdir()
    (root / "stray.txt").write_text("outside")
    return {
        "mixed/truncated.JPEG": "corrupt",
        "mixed/garbage.JPEG": "not_an_image",
        "mixed/notes.txt": "not_an_image",
        "stray.txt": "no_class",
    }


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path):
    root = tmp_path / "images"
    bad = _bad_folder(root)
    manifest = tmp_path / "m.tsv"
    listing = write_manifest(root, manifest, progress=False)
    index = write_shards(root, manifest, tmp_path / "shards", image_size=SIZE, shard_size=4, workers=1, progress=False)
    totals = index["totals"]
    assert totals["listed"] == len(listing.rows) == 16
    assert totals["written"] + totals["skipped"] == totals["listed"]
    assert totals["written"] == sum(s["count"] for s in index["shards"]) == 12
    assert {e["path"]: e["reason"] for e in index["skipped"]} == bad
    assert all(e["detail"] for e in index["skipped"])
    assert index["skipped_by_reason"] == {"corrupt": 1, "no_class": 1, "not_an_image": 2}
    assert index["converted"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    expected_small = sum(
        1 for rel, _, label in listing.rows
        if label >= 0 and rel not in bad and min(Image.open(root / rel).size) < SIZE
    )
    assert expected_small >= 1 and index["upsampled"] == expected_small  # the 6x4 one and random small ones
    assert index["empty_classes"] == ["empty_class"]
    assert index["class_counts"] == [0, 4, 8]  # empty_class, good, mixed (12 files - 3 skipped)
    stored = {}
    for shard in index["shards"]:
        for fields in read_tar_samples(tmp_path / "shards" / shard["name"]).values():
            image = Image.open(io.BytesIO(fields["png"]))
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
            stored[fields["path"].decode()] = image
    assert set(stored) == {rel for rel, _, _ in listing.rows} - set(bad)


def test_strict_mode_fails_on_the_first_bad_file(tmp_path):
    root = tmp_path / "images"
    _bad_folder(root)
    shutil.rmtree(root / "empty_class")
    manifest = tmp_path / "m.tsv"
    write_manifest(root, manifest, progress=False)
    first_bad = r"images/(mixed/\w+\.(JPEG|txt)|stray\.txt): (corrupt|not_an_image|no_class) .*strict"
    with pytest.raises(DataError, match=first_bad):
        write_shards(root, manifest, tmp_path / "s", image_size=SIZE, shard_size=4, workers=2, strict=True,
                     progress=False)
    (root / "empty_class").mkdir()
    write_manifest(root, manifest, progress=False)
    with pytest.raises(DataError, match=r"empty class folders \['empty_class'\]; strict"):
        write_shards(root, manifest, tmp_path / "s", image_size=SIZE, strict=True, progress=False)


def test_stale_manifest_and_bad_parameters_fail_loudly(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 3})
    manifest = tmp_path / "m.tsv"
    write_manifest(root, manifest, progress=False)
    for field, value in (("store", "jpeg"), ("shard_size", 0), ("image_size", 1.5), ("workers", 0),
                         ("png_level", 10)):
        with pytest.raises(DataError, match=f"{field}="):
            write_shards(root, manifest, tmp_path / "s", progress=False, **{field: value})
    with pytest.raises(DataError, match="missing: image-folder root does not exist"):
        write_shards(tmp_path / "missing", manifest, tmp_path / "s", progress=False)
    victim = root / "a" / "a_img.1.JPEG"
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"{victim}: .* bytes, the manifest says .*stale"):
        write_shards(root, manifest, tmp_path / "s", image_size=SIZE, workers=1, progress=False)
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim}: listed in the manifest but missing"):
        write_shards(root, manifest, tmp_path / "s", image_size=SIZE, workers=1, progress=False)


KILL_AT = 5  # the killed run dies when a worker starts this shard


def _killing_write_shard(job):
    """Stands in for _write_shard in the killed run: at shard KILL_AT it leaves a partial file,
    waits until the parent has recorded two finished shards, then SIGKILLs the whole run."""
    if job.index != KILL_AT:
        return _original_write_shard(job)
    Path(job.out_dir, shards_module.shard_name(job.index) + ".tmp").write_bytes(b"partial tar")
    progress = Path(job.out_dir, shards_module.PROGRESS_NAME)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(progress.read_text().splitlines()) < 2:
        time.sleep(0.01)
    os.killpg(0, signal.SIGKILL)


_original_write_shard = shards_module._write_shard


def _killed_run(root, manifest, out_dir):
    os.setsid()  # own process group: the kill takes the pool workers along, not pytest
    shards_module._write_shard = _killing_write_shard
    write_shards(root, manifest, out_dir, image_size=SIZE, shard_size=4, workers=2, progress=False)


def test_resume_after_a_killed_run_keeps_finished_shards_and_matches_a_clean_run(tmp_path, sharded):
    out = tmp_path / "killed"
    run = multiprocessing.get_context("fork").Process(target=_killed_run,
                                                      args=(sharded["root"], sharded["manifest"], out))
    run.start()
    run.join(60)
    if run.exitcode is None:  # never reached the kill: stop it (its group id is its pid) and fail
        os.killpg(run.pid, signal.SIGKILL)
        run.join()
    assert run.exitcode == -signal.SIGKILL
    assert not (out / "index.json").exists() and (out / "shard-000005.tar.tmp").exists()
    recorded = [json.loads(line)["shard"]["name"] for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(recorded) >= 2
    before = {name: os.stat(out / name).st_ino for name in recorded}

    index = write_shards(sharded["root"], sharded["manifest"], out, image_size=SIZE, shard_size=4, workers=2,
                         progress=False)
    clean = write_shards(sharded["root"], sharded["manifest"], tmp_path / "clean", image_size=SIZE, shard_size=4,
                         workers=1, progress=False)
    assert index == clean and shard_dir_digests(out) == shard_dir_digests(tmp_path / "clean")
    assert {name: os.stat(out / name).st_ino for name in recorded} == before  # kept, not rewritten
    assert index["totals"]["shards"] == math.ceil(60 / 4) > len(recorded)

    # Damaged complete shards (cut short; one byte changed) fail verification; only they are rewritten.
    damaged = out / "shard-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    flipped = bytearray((out / "shard-000004.tar").read_bytes())
    flipped[700] ^= 1
    (out / "shard-000004.tar").write_bytes(bytes(flipped))
    inodes = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}  # a rewrite renames a new file
    assert write_shards(sharded["root"], sharded["manifest"], out, image_size=SIZE, shard_size=4, workers=1,
                        progress=False) == clean
    changed = {p.name for p in out.glob("shard-*.tar") if p.stat().st_ino != inodes[p.name]}
    assert changed == {"shard-000002.tar", "shard-000004.tar"}
    assert shard_dir_digests(out) == shard_dir_digests(tmp_path / "clean")

    # Other parameters invalidate everything, and shards beyond the new plan are removed.
    fewer = write_shards(sharded["root"], sharded["manifest"], out, image_size=SIZE, shard_size=30, workers=1,
                         progress=False)
    assert fewer["fingerprint"] != clean["fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]


# ---------------------------------------------------------------- loaders


def _epoch(loader, epoch: int | None = None) -> list:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def _rank_loaders(shards: Path, **kw) -> list:
    return [shard_loader(shards, 4, rank=rank, world_size=2, num_workers=2, **kw) for rank in range(2)]


def test_exact_epochs_see_every_sample_once_with_2_ranks_x_2_workers(sharded):
    loaders = _rank_loaders(sharded["shards"], train=True, exact=True, seed=3)
    keys = []
    for loader in loaders:
        batches = _epoch(loader, 1)
        assert len(batches) == len(loader)
        keys += [key for batch in batches for key in batch.keys]
    assert Counter(keys) == Counter(f"{row:08d}" for row in range(60))


def test_balanced_epochs_give_every_rank_the_same_full_batches(sharded):
    loaders = _rank_loaders(sharded["shards"], train=True, seed=3)
    for loader in loaders:
        batches = _epoch(loader, 0)
        assert len(batches) == len(loader) == 60 // (2 * 4)
        assert all(batch.images.shape == (4, 3, SIZE, SIZE) for batch in batches)
        assert loader.lost == 0
    with pytest.raises(DataError, match="9 non-empty shards; balanced epochs need at least world_size x "
                                        "num_workers = 10"):
        shard_loader(sharded["shards"], 4, rank=0, world_size=5, num_workers=2)
    with pytest.raises(DataError, match="num_workers=2: the stream runs in 1 DataLoader workers"):
        next(iter(loaders[0].dataset))  # read outside the loader's two workers
    for field, value in (("batch_size", 0), ("num_workers", -1), ("shuffle_buffer", 0)):
        with pytest.raises(DataError, match=f"{field}={value}: must be an integer >= "):
            shard_loader(sharded["shards"], **({"batch_size": 4} | {field: value}))
    with pytest.raises(DataError, match="rank=2, world_size=2: need"):
        shard_loader(sharded["shards"], 4, rank=2, world_size=2)


def test_shard_loader_batches_are_uint8_crops_with_labels(sharded):
    listing = sharded["listing"]
    crops = {f"{row:08d}": adm_center_crop_arr(Image.open(sharded["root"] / rel), SIZE)
             for row, (rel, _, _) in enumerate(listing.rows)}
    flips = 0
    for batch in _epoch(shard_loader(sharded["shards"], 8, train=True, seed=0, rank=0, world_size=1,
                                     num_workers=2)):
        assert batch.images.dtype == torch.uint8 and batch.labels.dtype == torch.int64
        for image, label, key in zip(batch.images, batch.labels, batch.keys):
            assert int(label) == listing.rows[int(key)][2]
            pixels = image.permute(1, 2, 0).numpy()
            flipped = np.array_equal(pixels, crops[key][:, ::-1])
            assert flipped or np.array_equal(pixels, crops[key])
            flips += flipped
    assert 15 <= flips <= 45  # about half of 60 flipped
    row_key = {rel: f"{row:08d}" for row, (rel, _, _) in enumerate(listing.rows)}  # folder keys are paths
    for loader in (  # flip=False: for data such as digits, where a mirror image is another class
        shard_loader(sharded["shards"], 8, train=True, flip=False, rank=0, world_size=1, num_workers=0),
        folder_loader(sharded["root"], 8, image_size=SIZE, flip=False, rank=0, world_size=1, num_workers=0),
    ):
        batches = _epoch(loader)
        assert sum(len(batch.keys) for batch in batches) == 56
        for batch in batches:
            for image, key in zip(batch.images, batch.keys):
                pixels = image.permute(1, 2, 0).numpy()
                assert np.array_equal(pixels, crops[row_key.get(key, key)])
    for batch in _epoch(shard_loader(sharded["shards"], 8, train=False, num_workers=0)):
        for image, key in zip(batch.images, batch.keys):
            assert np.array_equal(image.permute(1, 2, 0).numpy(), crops[key])


def test_shard_loader_order_is_reproducible_from_seed_and_epoch(sharded):
    def run(seed, epoch, workers=2):
        batches = _epoch(shard_loader(sharded["shards"], 4, train=True, seed=seed, rank=0, world_size=1,
                                      num_workers=workers), epoch)
        return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])

    keys, images = run(0, 1)
    again_keys, again_images = run(0, 1)
    assert keys == again_keys and torch.equal(images, again_images)
    assert run(0, 2)[0] != keys
    assert run(1, 1)[0] != keys
    val = shard_loader(sharded["shards"], 4, train=False, num_workers=0)
    in_files = [k for s in sharded["index"]["shards"] for k in read_tar_samples(sharded["shards"] / s["name"])]
    assert [k for b in _epoch(val, 0) for k in b.keys] == in_files  # validation: shard order, no shuffle
    assert [k for b in _epoch(val, 5) for k in b.keys] == in_files


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_skip_gives_the_rest_of_the_epoch(sharded, workers):
    """A resume mid-epoch: batches(epoch, skip) are the epoch's batches after the first skip,
    flips included (validation drops loaded batches; the next test counts that balanced epochs do not decode
    what they skip)."""
    for train in (True, False):
        loader = shard_loader(sharded["shards"], 4, train=train, seed=2, rank=0, world_size=1, num_workers=workers)
        whole = [(b.images, b.labels, b.keys) for b in loader.batches(1, 0)]
        assert len(whole) == len(loader) >= 15  # validation: partial batches per worker
        for skip in (1, 2, 4, 7, len(whole) - 1, len(whole)):
            rest = [(b.images, b.labels, b.keys) for b in loader.batches(1, skip)]
            assert len(rest) == len(whole) - skip
            for (images, labels, keys), (want_images, want_labels, want_keys) in zip(rest, whole[skip:]):
                assert keys == want_keys and torch.equal(labels, want_labels) and torch.equal(images, want_images)
        again = [b.keys for b in loader]  # the skip applied to one iteration only
        assert again == [keys for _, _, keys in whole]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_balanced_epoch_skip_decodes_no_skipped_image(sharded, workers, monkeypatch):
    """A resume mid-epoch decodes only the images it yields: counted at the one decoding of shard
    images, in the loader's worker processes too (forked, they share the counter)."""
    decoded = multiprocessing.Value("q", 0)

    def counting_sample_pixels(sample, size):
        with decoded.get_lock():
            decoded.value += 1
        return sample_pixels(sample, size)

    monkeypatch.setattr(loaders, "sample_pixels", counting_sample_pixels)
    loader = shard_loader(sharded["shards"], 4, train=True, seed=2, rank=0, world_size=1, num_workers=workers)
    total = len(loader)
    for skip in (0, 3, total - 1):
        decoded.value = 0
        rest = list(loader.batches(1, skip))
        assert len(rest) == total - skip and all(len(batch.keys) == 4 for batch in rest)
        assert decoded.value == 4 * (total - skip), (skip, decoded.value)


def test_source_shards_load_the_same_images_as_png_shards(sharded):
    def images(shards):
        return {k: img for b in _epoch(shard_loader(shards, 16, train=False, num_workers=0))
                for k, img in zip(b.keys, b.images)}

    png, source = images(sharded["shards"]), images(sharded["source"])
    assert png.keys() == source.keys() and len(png) == 60
    assert all(torch.equal(png[k], source[k]) for k in png)


@pytest.mark.parametrize("flip", [True, False])
def test_npy_shards_load_exactly_the_batches_of_png_shards(sharded, flip):
    def batches(shards, train):
        loader = shard_loader(shards, 8, train=train, flip=flip, seed=4, rank=0, world_size=1, num_workers=2)
        return [(b.images, b.labels, b.keys) for b in _epoch(loader, 3)]

    for train in (True, False):
        png, npy = batches(sharded["shards"], train), batches(sharded["npy"], train)
        assert len(png) == len(npy) > 0
        for (png_images, png_labels, png_keys), (images, labels, keys) in zip(png, npy):
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64
            assert keys == png_keys and torch.equal(labels, png_labels) and torch.equal(images, png_images)


@pytest.mark.parametrize("store", ["npy", "png"])
def test_a_damaged_sample_is_skipped_and_counted(tmp_path, sharded, store):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded["npy" if store == "npy" else "shards"], damaged)
    victim = damaged / "shard-000000.tar"
    samples = read_tar_samples(victim)
    key = sorted(samples)[0]
    if store == "npy":
        bad = io.BytesIO()
        np.save(bad, np.zeros((SIZE, SIZE), np.uint8))  # grayscale: the wrong shape
        bad_data, message = bad.getvalue(), rf"expected C-ordered uint8 \({SIZE}, {SIZE}, 3\)"
    else:  # a PNG whose image data stops half way
        png = samples[key]["png"]
        bad_data, message = png[: len(png) // 2] + png[-12:], "truncated|broken"
    with tarfile.open(victim, "w") as tar:
        for name, fields in sorted(samples.items()):
            for field, data in fields.items():
                data = bad_data if (name, field) == (key, store) else data
                info = tarfile.TarInfo(f"{name}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = shard_loader(damaged, 4, train=False, num_workers=0)
    with pytest.warns(RuntimeWarning, match=rf"sample '{key}'.*{message}"):
        keys = [k for b in _epoch(loader) for k in b.keys]
    assert len(keys) == 59 and key not in keys and loader.lost == 1


@pytest.mark.parametrize("store", ["shards", "npy", "source"])
def test_read_shard_gives_what_tarfile_reads(sharded, store):
    for path in sorted(sharded[store].glob("*.tar")):
        samples = list(read_shard(path))
        expected = read_tar_samples(path)
        assert [s["__key__"] for s in samples] == list(expected)  # file order, one sample per key
        for sample in samples:
            assert sample.pop("__url__") == str(path)
            assert {k: v for k, v in sample.items() if k != "__key__"} == expected[sample["__key__"]]


def test_a_damaged_tar_header_stops_the_shard_after_its_good_samples(tmp_path, sharded):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded["shards"], damaged)
    victim = damaged / "shard-000002.tar"
    data = bytearray(victim.read_bytes())
    with tarfile.open(victim) as tar:
        members = [m.offset for m in tar.getmembers()]
    data[members[6] + 3] ^= 0xFF  # the name of the third sample's first member
    victim.write_bytes(bytes(data))
    good = []
    with pytest.raises(DataError, match=rf"damaged tar header at byte {members[6]}"):
        for sample in read_shard(victim):
            good.append(sample["__key__"])
    # The second sample may have had more members behind the damaged header: only the first is
    # known to be complete.
    assert good == list(read_tar_samples(sharded["shards"] / "shard-000002.tar"))[:1]
    loader = shard_loader(damaged, 4, train=False, num_workers=0)
    with pytest.warns(RuntimeWarning, match=r"shard-000002.tar: read 1 of 7 samples \(DataError"):
        keys = [k for b in _epoch(loader) for k in b.keys]
    assert len(keys) == 54 and loader.lost == 6


def test_truncated_shard_is_reported_skipped_and_counted(tmp_path, sharded):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded["shards"], damaged)
    victim = damaged / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    loader = shard_loader(damaged, 4, train=False, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for b in _epoch(loader) for k in b.keys]
    messages = [str(w.message) for w in caught]
    assert all(w.category is RuntimeWarning and "shard-000003.tar" in str(w.message) for w in caught), messages
    assert any(re.search(r"shard-000003.tar: read \d of 7 samples", m) for m in messages), messages
    assert 0 < loader.lost < 7 and len(keys) + loader.lost == 60 == len(set(keys)) + loader.lost
    workers = shard_loader(damaged, 4, train=False, num_workers=2)
    assert len([k for b in _epoch(workers) for k in b.keys]) == len(keys)
    assert workers.lost == loader.lost  # counted across worker processes
    balanced = shard_loader(damaged, 4, train=True, rank=0, world_size=1, num_workers=2)
    assert len(_epoch(balanced)) == len(balanced) == 15  # the epoch length holds despite the loss
    (damaged / "shard-000005.tar").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len([k for b in _epoch(loader) for k in b.keys]) == len(keys) - 7
    pattern = r"shard-000005.tar: read 0 of 7 samples \(FileNotFoundError"
    assert any(re.search(pattern, str(w.message)) for w in caught)
    assert loader.lost == workers.lost + 7


def test_folder_loader_matches_shards_and_is_reproducible(sharded):
    listing = sharded["listing"]
    from_shards = {listing.rows[int(k)][0]: img
                   for b in _epoch(shard_loader(sharded["shards"], 8, train=False, num_workers=0))
                   for k, img in zip(b.keys, b.images)}
    from_folder = {k: img for b in _epoch(folder_loader(sharded["root"], 8, image_size=SIZE, train=False,
                                                         num_workers=2))
                   for k, img in zip(b.keys, b.images)}
    assert from_folder.keys() == from_shards.keys()
    assert all(torch.equal(from_folder[k], from_shards[k]) for k in from_folder)

    def train(workers, epoch, rank=0):
        loader = folder_loader(sharded["root"], 8, manifest=sharded["manifest"], image_size=SIZE, seed=0,
                               rank=rank, world_size=2, num_workers=workers)
        batches = _epoch(loader, epoch)
        assert len(batches) == len(loader) == 30 // 8
        return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])

    keys, images = train(0, 4)
    other_keys, other_images = train(2, 4)
    assert keys == other_keys and torch.equal(images, other_images)
    assert train(0, 5)[0] != keys
    assert not set(keys) & set(train(0, 4, rank=1)[0])


def test_folder_loader_names_an_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 2})
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "a" / "notes.txt").write_text("ignored: no image extension")
    loader = folder_loader(root, 4, image_size=SIZE, train=False, num_workers=0)
    assert loader.dataset.excluded == 1
    with pytest.raises(DataError, match="broken.jpg: cannot be loaded"):
        _epoch(loader)


# ---------------------------------------------------------------- demo folder


def test_demo_folder_is_deterministic_stratified_and_shards_end_to_end(tmp_path):
    counts = write_demo_folder(tmp_path / "a", image_size=12, seed=0)
    write_demo_folder(tmp_path / "b", image_size=12, seed=0)
    assert counts == {"train": 1437, "val": 360}
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files_a) == 1797
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a[::50])
    per_digit = np.bincount(load_digits().target)
    for split, total in counts.items():
        per_class = Counter(f.parts[1] for f in files_a if f.parts[0] == split)
        assert sorted(per_class) == [str(d) for d in range(10)] and sum(per_class.values()) == total
        share = 0.2 if split == "val" else 0.8
        assert all(abs(per_class[str(d)] - share * per_digit[d]) <= 1 for d in range(10))  # stratified
    image = Image.open(tmp_path / "a" / files_a[0])
    assert image.size == (12, 12) and image.mode == "RGB"
    with pytest.raises(DataError, match="a/train: already exists"):
        write_demo_folder(tmp_path / "a")
    with pytest.raises(DataError, match="image_size=4: must be an integer >= 8"):
        write_demo_folder(tmp_path / "c", image_size=4)
    with pytest.raises(DataError, match="image_size=True: must be an integer >= 8"):
        write_demo_folder(tmp_path / "c", image_size=True)

    manifest = write_manifest(tmp_path / "a" / "val", tmp_path / "val.tsv", progress=False)
    index = write_shards(tmp_path / "a" / "val", tmp_path / "val.tsv", tmp_path / "shards", image_size=12,
                         shard_size=100, workers=2, progress=False)
    assert index["totals"]["written"] == len(manifest.rows) == 360 and index["converted"] == {}
    batches = _epoch(shard_loader(tmp_path / "shards", 64, train=False, num_workers=2))
    assert sum(len(b.keys) for b in batches) == 360
    assert sorted({int(y) for b in batches for y in b.labels}) == list(range(10))


def test_a_copy_of_the_workspace_elsewhere_shards_to_the_same_index_bytes(tmp_path):
    """A queued or `--temp` experiment may shard again in a copy of the workspace at another path:
    the index must come out byte for byte the same (over several shard workers), since the train
    stage's key in the checkpoint store hashes it (stages.train.run_directory); otherwise such an
    experiment would miss the run and train afresh."""
    make_folder(tmp_path / "workspace" / "raw", {"a": 12, "b": 12})
    shutil.copytree(tmp_path / "workspace", tmp_path / "elsewhere" / "copy")
    indexes = []
    for root in (tmp_path / "workspace", tmp_path / "elsewhere" / "copy"):
        write_manifest(root / "raw", root / "manifest.tsv", progress=False)
        write_shards(root / "raw", root / "manifest.tsv", root / "shards", image_size=SIZE, shard_size=4, workers=2,
                     progress=False)
        indexes.append(root / "shards" / "index.json")
    assert indexes[0].read_bytes() == indexes[1].read_bytes()
