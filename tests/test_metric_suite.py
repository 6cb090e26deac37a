"""KID and precision/recall against torch-fidelity's own functions on the same features, their
behaviour under row permutations and shifts, and the reference sets they compare with (our npz,
ADM reference batches read as a stream, the fid_ref stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from stages import fid_ref as fid_ref_stage
from unite.config import ConfigError
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.evaluation import real_batches
from unite.metrics.features import INCEPTION_NAME, SPATIAL_DIM, PixelFeatures
from unite.metrics.fid import GaussianStats, ReferenceSet, adm_batch_images, load_reference
from unite.metrics.inputs import MetricsInputError
from unite.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kernel_distance
from unite.metrics.precision_recall import precision_recall

ROOT = Path(__file__).resolve().parents[1]


def theirs_kid(generated: np.ndarray, reference: np.ndarray, **kwargs) -> tuple[float, float]:
    out = kid_features_to_metric(torch.from_numpy(generated), torch.from_numpy(reference), verbose=False, **kwargs)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def test_kid_defaults_are_torch_fidelitys():
    """The kernel is hard-wired as torch-fidelity's default one: (x.y / D + 1)^3."""
    expected = {"kid_subsets": KID_SUBSETS, "kid_subset_size": KID_SUBSET_SIZE, "rng_seed": KID_SEED,
                "kid_kernel": "poly", "kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None,
                "kid_kernel_poly_coef0": 1}
    assert {key: DEFAULTS[key] for key in expected} == expected


def test_kid_equals_torch_fidelity_and_a_shift_raises_it():
    rng = np.random.default_rng(0)
    generated, reference = rng.standard_normal((130, 12)), rng.standard_normal((110, 12))
    settings = dict(subsets=20, subset_size=100)
    ours = kernel_distance(generated, reference, **settings)
    theirs = theirs_kid(generated, reference, kid_subsets=20, kid_subset_size=100)
    assert ours == (pytest.approx(theirs[0], rel=1e-6), pytest.approx(theirs[1], rel=1e-6))
    shifted = kernel_distance(generated + 0.5, reference, **settings)
    theirs = theirs_kid(generated + 0.5, reference, kid_subsets=20, kid_subset_size=100)
    assert shifted == (pytest.approx(theirs[0], rel=1e-6), pytest.approx(theirs[1], rel=1e-6))
    # One distribution: the unbiased estimate is centred on 0; a shift of the mean makes it positive.
    assert shifted[0] > 10 * abs(ours[0])


def test_kid_subset_size_beyond_the_features_is_named():
    with pytest.raises(MetricsInputError, match=r"kid_subset_size=50 .* 40 generated .*evaluate.kid_subset_size"):
        kernel_distance(np.zeros((40, 3)), np.zeros((60, 3)), subset_size=50)


def test_precision_recall_equal_torch_fidelity_and_ignore_row_order():
    rng = np.random.default_rng(1)
    generated = rng.standard_normal((300, 6))
    reference = 1.5 * rng.standard_normal((260, 6)) + 0.4
    full = prc_features_to_metric(torch.from_numpy(generated), torch.from_numpy(reference), verbose=False)
    part = prc_features_to_metric(torch.from_numpy(generated), torch.from_numpy(reference), verbose=False,
                                  save_cpu_ram=True, prc_batch_size=70)
    ours = precision_recall(generated, reference)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1  # both manifolds cover part of the other set
    for theirs in (full, part):
        assert ours == (pytest.approx(theirs["precision"], rel=1e-6), pytest.approx(theirs["recall"], rel=1e-6))
    # Set metrics: row order (and the block size of the distance computation) cannot matter.
    assert precision_recall(rng.permutation(generated), rng.permutation(reference)) == ours
    # Moving the generated set away from the reference one lowers precision and recall.
    moved = precision_recall(generated + 2.0, reference)
    assert moved[0] < ours[0] and moved[1] < ours[1]
    theirs_moved = prc_features_to_metric(torch.from_numpy(generated + 2.0), torch.from_numpy(reference),
                                          verbose=False)
    assert moved == (pytest.approx(theirs_moved["precision"], rel=1e-6),
                     pytest.approx(theirs_moved["recall"], rel=1e-6))


class FlatPixels:
    """A stand-in named as the Inception space whose features are the flattened pixels, to see
    which images a reference batch feeds it."""

    name = INCEPTION_NAME

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return images.flatten(1).float(), None


def write_adm_batch(path, images: np.ndarray, compressed: bool) -> None:
    """The layout of the ADM evaluator's reference batches (arr_0 images, mu/sigma, mu_s/sigma_s)."""
    rng = np.random.default_rng(2)
    dim = images[0].size
    save = np.savez_compressed if compressed else np.savez
    save(path, images, mu=rng.standard_normal(dim), sigma=np.eye(dim), mu_s=rng.standard_normal(SPATIAL_DIM),
         sigma_s=np.eye(SPATIAL_DIM, dtype=np.float32))


@pytest.mark.parametrize("compressed", [False, True])
def test_an_adm_reference_batch_gives_its_statistics_and_the_features_of_its_images(tmp_path, compressed):
    images = np.random.default_rng(3).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    write_adm_batch(tmp_path / "ref.npz", images, compressed)
    batches, count = adm_batch_images(tmp_path / "ref.npz", batch_size=3)
    assert count == 7 and [len(batch) for batch in batches] == [3, 3, 1]
    reference = load_reference(tmp_path / "ref.npz", FlatPixels(), set_images=10000, batch_size=3, progress=False)
    with np.load(tmp_path / "ref.npz") as data:
        np.testing.assert_array_equal(reference.stats.mu, data["mu"])
        np.testing.assert_array_equal(reference.spatial.mu, data["mu_s"])
        np.testing.assert_array_equal(reference.spatial.sigma, data["sigma_s"])
    np.testing.assert_array_equal(reference.features, images.transpose(0, 3, 1, 2).reshape(7, -1))
    # Without KID or precision/recall its images are not read.
    assert load_reference(tmp_path / "ref.npz", FlatPixels(), progress=False).features is None


def test_a_reference_set_round_trips_and_bad_spatial_statistics_are_named(tmp_path):
    rng = np.random.default_rng(4)
    stats = GaussianStats(rng.standard_normal(3), np.eye(3), 9, "pixel-1x1")
    spatial = GaussianStats(rng.standard_normal(SPATIAL_DIM), np.eye(SPATIAL_DIM), 9, "pixel-1x1")
    features = rng.standard_normal((9, 3)).astype(np.float32)
    ReferenceSet(stats, spatial, features).save(tmp_path / "set.npz")
    loaded = ReferenceSet.load(tmp_path / "set.npz")
    np.testing.assert_array_equal(loaded.stats.mu, stats.mu)
    np.testing.assert_array_equal(loaded.spatial.sigma, spatial.sigma)
    np.testing.assert_array_equal(loaded.features, features)
    assert loaded.stats.num_images == 9 and loaded.stats.feature_space == "pixel-1x1"
    np.savez(tmp_path / "bad.npz", mu=stats.mu, sigma=stats.sigma, mu_s=np.zeros(7))
    with pytest.raises(MetricsInputError, match=r"bad.npz.*mu_s and sigma_s must both be there.*2023"):
        ReferenceSet.load(tmp_path / "bad.npz")


def test_precision_and_recall_by_hand_with_points_on_the_ball_boundaries():
    """Reference 0..4 on a line: k = 3 radii 3, 2, 2, 2, 3. Samples -3 and 7 lie exactly on the balls
    of 0 and 4 (inside: the boundary counts), 2.5 inside, 10 and 20 outside: precision 3/5. The
    sample at -3 has radius 13 (its third nearest sample is 10), which covers every reference point."""
    reference = np.arange(5.0)[:, None]
    generated = np.array([[7.0], [-3.0], [2.5], [10.0], [20.0]])
    assert precision_recall(generated, reference) == (0.6, 1.0)


@pytest.fixture
def stage_workspace(tmp_path, monkeypatch):
    """Val shards of 12 random 8x8 images and the repository's params.yaml, as the fid_ref stage sees them."""
    rng = np.random.default_rng(5)
    for index in range(12):
        path = tmp_path / "raw" / f"class{index % 2}" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    write_manifest(tmp_path / "raw", tmp_path / "val.tsv", progress=False)
    write_shards(tmp_path / "raw", tmp_path / "val.tsv", tmp_path / "data" / "shards" / "val", image_size=8,
                 shard_size=5, workers=1, progress=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return params


def run_fid_ref(params: dict, **fid_ref) -> ReferenceSet:
    params["fid_ref"].update(fid_ref)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    fid_ref_stage.main(["--shards", "data/shards", "--out", "data/fid_ref.npz"])
    return ReferenceSet.load("data/fid_ref.npz")


def test_fid_ref_keeps_the_features_of_the_first_images_and_takes_given_statistics(stage_workspace):
    params = stage_workspace
    computed = run_fid_ref(params, feature_space="pixel", split="val", set_images=7, batch_size=5)
    images = torch.cat([images for images, _ in real_batches("data/shards/val", 5)])
    pixels = PixelFeatures(8)(images)[0].numpy()  # the npz stores features as float32
    assert computed.stats.num_images == 12 and computed.spatial is None  # pixel space: no spatial statistics
    np.testing.assert_allclose(computed.stats.mu, pixels.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(computed.features, pixels[:7].astype(np.float32))
    GaussianStats(np.zeros(192), np.eye(192), 1000, "pixel-8x8").save("given.npz")
    given = run_fid_ref(params, stats="given.npz")
    assert given.stats.num_images == 1000 and not given.stats.mu.any()
    np.testing.assert_array_equal(given.features, pixels[:7].astype(np.float32))
    with pytest.raises(ConfigError, match=r"fid_ref.stats='given.npz' and fid_ref.reference_batch='adm.npz': give one"):
        run_fid_ref(params, reference_batch="adm.npz")
