"""KID and precision/recall against torch-fidelity's own functions on the same features, their
behaviour under row permutations and shifts, and the reference sets they compare with (our npz,
ADM reference batches read as a stream, the fid_ref stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
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
from unite.cfg_search import adaptive_cfg_search
from unite.evaluation import real_batches, search_score
from unite.metrics.features import INCEPTION_NAME, SPATIAL_DIM, PixelFeatures
from unite.metrics.fid import (GaussianStats, ReferenceSet, adm_batch_images, compute_reference_set, evaluate_images,
                               load_reference)
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


def one_pixel_images(rng: np.random.Generator, mean: float, std: float, count: int) -> torch.Tensor:
    """uint8 (count, 3, 1, 1) images: in PixelFeatures(1) their features are the pixels / 255."""
    pixels = np.clip(np.round(rng.normal(mean, std, (count, 3, 1, 1)) * 255), 0, 255)
    return torch.from_numpy(pixels.astype(np.uint8))


def test_the_search_by_kernel_distance_takes_the_kid_minimum_where_fid_disagrees():
    """At the start scale the images are shifted (FID small, KID large: KID weighs the mean more), one
    step below they are narrow (FID large: the covariance is far off, KID small); one step further
    either way, shifted far (worst for both). FID would keep the start scale and try the one above;
    KID walks down and keeps the narrow images."""
    rng = np.random.default_rng(0)
    reference_images = one_pixel_images(rng, 0.4, 0.1, 400)
    far = one_pixel_images(rng, 0.55, 0.1, 200)
    images = {2.0: one_pixel_images(rng, 0.45, 0.1, 200), 1.5: one_pixel_images(rng, 0.4, 0.02, 200),
              1.0: far, 2.5: far}
    space, kid = PixelFeatures(1), dict(kid_subsets=20, kid_subset_size=100)
    reference = compute_reference_set(reference_images.split(64), space, set_images=400, progress=False)

    def evaluate(scale, interval, norm_order):
        scores = evaluate_images(images[scale].split(64), reference, space, is_splits=0, **kid,
                                 with_precision_recall=False, progress=False)
        return search_score(scores, "kernel_distance")

    result = adaptive_cfg_search(evaluate, start=2.0, step=0.5, max_extra_steps=1, metric="kernel_distance")

    def features(batch: torch.Tensor) -> np.ndarray:  # as the reference set keeps them: float32
        return (batch.flatten(1).numpy() / 255).astype(np.float32).astype(np.float64)

    def fid(batch: torch.Tensor) -> float:
        a, b = features(batch), features(reference_images)
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))

    visited = [point.scale for point in result.points]
    theirs = {scale: theirs_kid(features(images[scale]), features(reference_images), **kid)[0] for scale in visited}
    assert [point.value for point in result.points] == pytest.approx([theirs[scale] for scale in visited], rel=1e-6)
    assert result.chosen.scale == min(theirs, key=theirs.get) == 1.5
    fids = {scale: fid(images[scale]) for scale in visited}
    assert min(fids, key=fids.get) == 2.0  # the case is one where the two metrics disagree


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
