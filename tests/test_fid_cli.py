"""`unite fid` / `unite fid-stats` end to end, and agreement with torch-fidelity's own
`calculate_metrics` on the same images and the same (randomly initialised) Inception weights file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from threadpoolctl import threadpool_limits
from torch.hub import HASH_REGEX
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

import unite.metrics.features as features
from unite.cli import main
from unite.data.image import center_crop
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.metrics.features import PixelFeatures
from unite.metrics.fid import frechet_distance
from unite.stand_in_weights import random_inception_network, write_random_inception_weights


def write_pngs(folder, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """10 "generated" images (random colour blocks and noise), 5 smooth "reference" ramps, 24x24, and a
    random Inception weights file."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (10, 4, 4, 3)).repeat(6, axis=1).repeat(6, axis=2)
    noise = rng.integers(-40, 41, (10, 24, 24, 3)) * rng.uniform(0, 1, (10, 1, 1, 1))
    generated = np.clip(blocks + noise, 0, 255).astype(np.uint8)
    write_pngs(root / "gen", generated)
    ramp = np.linspace(0, 1, 24)[None, :, None, None] * rng.uniform(50, 255, (5, 1, 1, 3))
    write_pngs(root / "ref", np.broadcast_to(ramp, (5, 24, 24, 3)).astype(np.uint8))
    weights = root / "weights-inception-random.pth"
    write_random_inception_weights(weights, torch.from_numpy(generated).permute(0, 3, 1, 2))
    return root, weights


def run_cli(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def spatial_and_pool_features(weights, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ADM evaluator's features of uint8 (N, H, W, 3) images, taken apart from unite: pool_3 (2048)
    and mixed_6/conv (the TF graph node whose weights torch-fidelity's Mixed_6d.branch1x1 holds) as ADM
    takes them: channels last, `spatial[..., :7]`, flattened."""
    network = random_inception_network(["2048"])
    network.load_state_dict(torch.load(weights))
    captured = []
    network.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.append(out.numpy().copy()))
    with torch.no_grad():
        (pool,) = network(torch.from_numpy(images).permute(0, 3, 1, 2))
    nhwc = captured[0].transpose(0, 2, 3, 1)
    return nhwc[..., :7].reshape(len(images), -1).astype(np.float64), pool.numpy().astype(np.float64)


def adm_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """ADM's FIDStatistics.frechet_distance, |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2), on the
    np.mean/np.cov statistics of two feature sets. With fewer rows than columns, S_i = A_i A_i^T / (n_i - 1)
    (A_i the centred features, transposed), and the eigenvalues of S1 S2 are the squared singular values of
    A_1^T A_2 / sqrt((n_1 - 1)(n_2 - 1)): tr sqrtm(S1 S2) is the sum of those singular values."""
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    diff = a.mean(0) - b.mean(0)
    trace_sqrt = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    return float(diff @ diff + np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False)) - 2 * trace_sqrt)


def test_unite_fid_agrees_with_torch_fidelity_and_the_adm_formula(inputs, tmp_path, capsys):
    """`unite fid` against an ADM reference batch of the reference images (arr_0, with mu/sigma and
    mu_s/sigma_s written here from features taken apart from unite): FID, IS, KID and precision/recall
    equal torch-fidelity's on the image folders, sFID the ADM formula on the ADM spatial features."""
    root, weights = inputs
    load = lambda folder: np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])  # noqa: E731
    gen_spatial, _ = spatial_and_pool_features(weights, load(root / "gen"))
    ref_spatial, ref_pool = spatial_and_pool_features(weights, load(root / "ref"))
    assert gen_spatial.shape == (10, 2023)
    np.savez(tmp_path / "adm.npz", load(root / "ref"), mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False),
             mu_s=ref_spatial.mean(0), sigma_s=np.cov(ref_spatial, rowvar=False))
    # Two IS splits keep the image count small (10 splits would need 20+ images for an IS above its
    # floor of 1); the split logic itself is compared with torch-fidelity's at 10 splits in test_metrics.
    ours = run_cli(capsys, "fid", str(root / "gen"), str(tmp_path / "adm.npz"), "--inception-weights", str(weights),
                   "--device", "cpu", "--is-splits", "2", "--kid-prc", "--kid-subset-size", "5", "--json")
    with threadpool_limits(1):  # its 2048 x 2048 eigvals runs faster on one BLAS thread on a busy CPU
        theirs = torch_fidelity.calculate_metrics(
            input1=str(root / "gen"), input2=str(root / "ref"), isc=True, fid=True, kid=True, prc=True, isc_splits=2,
            kid_subset_size=5, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
            feature_extractor="inception-v3-compat", feature_layer_prc="2048",  # its precision/recall default: VGG16
            feature_extractor_weights_path=str(weights),
        )
    assert (ours["num_images"], ours["num_ref_features"], ours["feature_space"]) == (10, 5, "inception-v3-compat")
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ours["weights"] == (f"NOT the official weights (sha256 {sha256[:16]}..., expected 6726825d...): not "
                               "comparable to published scores")
    # The comparison means something only if the random network separates the two image sets and its IS
    # is well off its floor of 1 (5 images per split: IS lies in [1, 5]).
    assert theirs["frechet_inception_distance"] > 1.0 and theirs["inception_score_mean"] > 1.5
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4)
    # KID and precision/recall of the same pass (torch-fidelity computes them in float32).
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    expected = adm_frechet(gen_spatial, ref_spatial)
    assert ours["sfid"] == pytest.approx(expected, rel=1e-4)
    # Against a reference's statistics the layout matters: channels first instead of last would be
    # another number.
    channels_first = gen_spatial.reshape(10, 17, 17, 7).transpose(0, 3, 1, 2).reshape(10, -1)
    assert abs(adm_frechet(channels_first, ref_spatial) - expected) > 1e-2 * expected


def test_fid_stats_from_a_folder_and_from_shards_then_fid_against_the_npz(inputs, tmp_path, capsys):
    root, _ = inputs
    assert main(["fid-stats", str(root / "ref"), str(tmp_path / "ref.npz"), "--feature-space", "pixel"]) == 0
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as archive:  # webdataset layout: <key>.png and <key>.cls per sample
        for index, path in enumerate(sorted((root / "ref").glob("*.png"))):
            for suffix, payload in ((".png", path.read_bytes()), (".cls", str(index % 3).encode())):
                info = tarfile.TarInfo(f"{index:08d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    assert main(["fid-stats", str(shard), str(tmp_path / "shards.npz"), "--feature-space", "pixel"]) == 0
    from_folder, from_shards = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "shards.npz")
    np.testing.assert_allclose(from_shards["sigma"], from_folder["sigma"], rtol=1e-12, atol=1e-15)
    assert (int(from_folder["num_images"]), str(from_folder["feature_space"])) == (5, "pixel-8x8")

    via_npz = run_cli(capsys, "fid", str(root / "gen"), str(tmp_path / "ref.npz"), "--feature-space", "pixel", "--json")
    via_folder = run_cli(capsys, "fid", str(root / "gen"), str(root / "ref"), "--feature-space", "pixel", "--json")
    assert "fid" not in via_npz and "is_mean" not in via_npz  # not Inception space: no FID, no IS
    assert via_npz["fd"] == pytest.approx(via_folder["fd"], rel=1e-12)

    def pixel_stats(folder):
        images = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
        feats = images.reshape(len(images), 8, 3, 8, 3, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
        feats = feats.reshape(len(images), -1) / 255
        return feats.mean(0), np.cov(feats, rowvar=False)

    assert via_npz["fd"] == pytest.approx(frechet_distance(*pixel_stats(root / "gen"), *pixel_stats(root / "ref")),
                                          rel=1e-9)
    assert PixelFeatures().name == via_npz["feature_space"]


@pytest.mark.parametrize("store", ["png", "npy", "source"])
def test_fid_stats_on_shards_of_every_store_equal_the_cropped_folder(store, tmp_path, capsys):
    """Shards of each store give the statistics of their source folder's centre crops (non-square,
    grayscale, JPEG and already-square sources)."""
    rng = np.random.default_rng(1)
    sources = tmp_path / "source"
    cropped = tmp_path / "cropped"
    cropped.mkdir()
    shapes_modes = [((20, 30), "RGB", "png"), ((40, 16), "L", "png"), ((25, 25), "RGB", "jpg"),
                    ((16, 16), "RGB", "png")]
    for index in range(12):
        (height, width), mode, ext = shapes_modes[index % len(shapes_modes)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        path = sources / f"class{index % 2}" / f"{index:02d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        with Image.open(path) as stored:
            center_crop(stored.convert("RGB"), 16).save(cropped / f"{index:02d}.png")
    write_manifest(sources, tmp_path / "list.tsv", progress=False)
    write_shards(sources, tmp_path / "list.tsv", tmp_path / "shards", image_size=16, shard_size=5, store=store,
                 workers=1, progress=False)
    shards = sorted(str(path) for path in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    assert main(["fid-stats", *shards, str(tmp_path / "shards.npz"), "--feature-space", "pixel"]) == 0
    assert main(["fid-stats", str(cropped), str(tmp_path / "folder.npz"), "--feature-space", "pixel"]) == 0
    from_shards, from_folder = np.load(tmp_path / "shards.npz"), np.load(tmp_path / "folder.npz")
    assert int(from_shards["num_images"]) == int(from_folder["num_images"]) == 12
    np.testing.assert_allclose(from_shards["mu"], from_folder["mu"], rtol=1e-12)
    np.testing.assert_allclose(from_shards["sigma"], from_folder["sigma"], rtol=1e-10, atol=1e-15)


def test_unite_fid_errors_name_the_missing_input(inputs, tmp_path, capsys, monkeypatch):
    root, _ = inputs
    monkeypatch.delenv("INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("IN256_FID_STATS", raising=False)
    assert main(["fid", str(root / "gen"), str(root / "ref")]) == 2
    message = capsys.readouterr().err
    assert "unite fid: error:" in message and "INCEPTION_WEIGHTS" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert main(["fid", str(root / "gen"), "--feature-space", "pixel"]) == 2
    message = capsys.readouterr().err
    assert "IN256_FID_STATS" in message and "jit_in256_stats.npz" in message
    assert main(["fid-stats", str(tmp_path / "empty"), str(tmp_path / "o.npz"), "--feature-space", "pixel"]) == 2
    assert "does not exist or is not an image folder" in capsys.readouterr().err
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "nested" / "sub" / "a.png")
    assert main(["fid-stats", str(tmp_path / "nested"), str(tmp_path / "o.npz"), "--feature-space", "pixel"]) == 2
    assert "no .png/.jpg/.jpeg images found (subfolders are not searched unless" in capsys.readouterr().err


def test_the_official_inception_file_is_named_by_the_sha256_prefix_of_its_release():
    # torch-fidelity's release URL names the file after its sha256, as torch.hub's check does.
    assert URL_INCEPTION_V3.rsplit("/", 1)[1] == features.INCEPTION_WEIGHTS_FILE
    assert HASH_REGEX.search(features.INCEPTION_WEIGHTS_FILE).group(1) == features.INCEPTION_WEIGHTS_SHA256_PREFIX


def test_the_scores_say_whether_the_inception_file_is_the_official_one(inputs, capsys, monkeypatch):
    """The official file cannot be downloaded here: the check is shown the stand-in file's own sha256
    prefix (hashlib's) as the official one (the other answer is checked above)."""
    root, weights = inputs
    monkeypatch.setattr(features, "INCEPTION_WEIGHTS_SHA256_PREFIX", hashlib.sha256(weights.read_bytes()).hexdigest()[:8])
    ours = run_cli(capsys, "fid", str(root / "ref"), str(root / "ref"), "--inception-weights", str(weights),
                   "--device", "cpu", "--is-splits", "1", "--json")
    assert ours["weights"] == "official"
