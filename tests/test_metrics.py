"""Frechet distance, IS, statistics, feature spaces, reconstruction metrics, class consistency and
the error messages of evaluation inputs, against closed forms and second implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from unite.data.readers import open_images
from unite.metrics.class_consistency import class_consistency
from unite.metrics.features import InceptionFeatures, PixelFeatures, build_feature_space, resolve_inception_weights
from unite.metrics.fid import (
    GaussianStats,
    InceptionScore,
    RunningStats,
    compute_reference_stats,
    evaluate_images,
    extract,
    frechet_distance,
    inception_score,
    load_reference,
    resolve_reference_stats,
    stats_distance,
    to_uint8,
)
from unite.metrics.inputs import MetricsInputError
from unite.metrics.pixel_classifiers import ClassifierFeatures, PixelClassifier
from unite.metrics.reconstruction import l1_error, lpips_distance, psnr_uint8, reconstruction_metrics


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_frechet_distance_matches_the_closed_form_for_commuting_covariances(rank_deficient):
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    dim = 40
    q = random_rotation(dim, rng)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    if rank_deficient:
        a[:15] = 0.0  # a covariance from fewer samples than dimensions
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_and_of_identical_ones():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # |dmu|^2 = 1 + 0 + 4; trace term (1-2)^2 + (2-1)^2 + (3-1)^2 = 6
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(11.0, rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_agrees_with_sqrtm_and_torch_fidelity_for_general_covariances():
    rng = np.random.default_rng(1)
    dim = 30
    x, y = rng.standard_normal((200, dim)) @ rng.standard_normal((dim, dim)), rng.standard_normal((150, dim)) * 2
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0) + 0.5, np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    reference = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert got == pytest.approx(reference["frechet_inception_distance"], rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(MetricsInputError, match=r"mu1 \(3,\), sigma1 \(3, 3\), mu2 \(2,\), sigma2 \(2, 2\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def confident_logits(classes: list[int], width: int = 1000, gap: float = 60.0) -> torch.Tensor:
    logits = torch.zeros(len(classes), width)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = gap
    return logits


def test_inception_score_closed_forms():
    # Confident predictions spread evenly over k classes: IS = k (one split, so the shuffle cannot
    # unbalance it). Identical predictions: IS = 1 in every split.
    k = 5
    mean, std = inception_score(confident_logits(list(range(k)) * 3), splits=1)
    assert (mean, std) == (pytest.approx(k, rel=1e-9), 0.0)
    mean, std = inception_score(torch.randn(1, 1000).expand(40, 1000).clone(), splits=4)
    assert (mean, std) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))


def test_inception_score_matches_torch_fidelity_splits_and_shuffle():
    logits = torch.randn(53, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ours = inception_score(logits, 10)
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours == (pytest.approx(theirs["inception_score_mean"], rel=1e-12),
                    pytest.approx(theirs["inception_score_std"], rel=1e-12))


class LogitSpace:
    """A feature space whose IS logits are the next rows of a fixed table, so that the Inception
    Score of whatever `extract` streams can be compared with torch-fidelity's on the whole table."""

    name = "logit-table"

    def __init__(self, logits: torch.Tensor):
        self.logits, self.given = logits, 0

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.logits[self.given : self.given + len(images)]
        self.given += len(images)
        return images.flatten(1).float()[:, :4], rows


@pytest.mark.parametrize("total_known", [True, False])
def test_streamed_inception_score_matches_torch_fidelity_in_any_batching(total_known):
    logits = torch.randn(103, 1000, generator=torch.Generator().manual_seed(1)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    images = torch.randint(0, 256, (103, 3, 2, 2), dtype=torch.uint8)
    batches = [images[a:b] for a, b in ((0, 1), (1, 40), (40, 41), (41, 103))]
    mean, std = extract(LogitSpace(logits), batches, total=103 if total_known else None, is_splits=10,
                        progress=False).inception_score
    assert (mean, std) == (pytest.approx(theirs["inception_score_mean"], rel=1e-12),
                           pytest.approx(theirs["inception_score_std"], rel=1e-12))


def reference_inception_score(logits: np.ndarray, splits: int = 10, eps: float = 1e-10) -> tuple[float, float]:
    """The reference's compute_inception_score (utils/fid.py) in NumPy: splits of n = N // splits
    images in image order, no shuffle, the last N - splits n images unused; logs of p + eps."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    n = len(probs) // splits
    scores = []
    for k in range(splits):
        part = probs[k * n : (k + 1) * n]
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part + eps) - np.log(marginal + eps)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores)), max(scores)


def assert_matches_reference_is(ours: tuple[float, float], logits: torch.Tensor, splits: int = 10) -> None:
    """Ours (exact logs) against the NumPy formula (logs of p + 1e-10): the eps moves each image's KL
    by at most 2 C eps for C classes (sum_y p eps / p over p(y|x) and over p(y)), so each split's
    score by a factor within exp(+-2 C eps), the mean relatively and the std absolutely (times the
    largest score) by at most that; 3 C eps leaves room for float64 rounding."""
    mean, std, largest = reference_inception_score(logits.double().numpy(), splits)
    bound = 3 * logits.shape[1] * 1e-10
    assert ours[0] == pytest.approx(mean, rel=bound)
    assert ours[1] == pytest.approx(std, abs=bound * largest)


@pytest.mark.parametrize("total_known", [True, False])
def test_image_order_inception_score_is_the_references_formula(total_known):
    # 103 images in 10 splits: splits of 10 images in order, images 100-102 left out.
    logits = torch.randn(103, 1000, generator=torch.Generator().manual_seed(2)) * 3
    images = torch.randint(0, 256, (103, 3, 2, 2), dtype=torch.uint8)
    batches = [images[a:b] for a, b in ((0, 7), (7, 8), (8, 95), (95, 103))]
    ours = extract(LogitSpace(logits), batches, total=103 if total_known else None, is_splits=10,
                   is_split_order="image_order", progress=False).inception_score
    assert_matches_reference_is(ours, logits)
    assert inception_score(logits, 10, split_order="image_order") == ours
    changed_tail = logits.clone()
    changed_tail[100:] = torch.randn(3, 1000) * 5
    assert inception_score(changed_tail, 10, split_order="image_order") == ours


def test_image_order_inception_score_depends_on_the_order():
    # Four classes, images sorted by class: each in-order split holds one class, so its p(y) is
    # close to every p(y|x) and its score close to 1; permuted or shuffled, the splits mix the
    # classes and score higher. The reference formula agrees in both orders.
    classes = [c for c in range(4) for _ in range(10)]
    noise = torch.randn(40, 20, generator=torch.Generator().manual_seed(3))
    logits = confident_logits(classes, width=20, gap=4.0) + noise
    permuted = logits[torch.randperm(40, generator=torch.Generator().manual_seed(4))]
    sorted_score = inception_score(logits, 4, split_order="image_order")
    permuted_score = inception_score(permuted, 4, split_order="image_order")
    assert_matches_reference_is(sorted_score, logits, 4)
    assert_matches_reference_is(permuted_score, permuted, 4)
    assert sorted_score[0] < permuted_score[0]
    # torch-fidelity's shuffled splits of the sorted images mix the classes too.
    theirs = isc_features_to_metric(logits, splits=4, shuffle=True, rng_seed=2020)
    shuffled_score = inception_score(logits, 4)
    assert shuffled_score == (pytest.approx(theirs["inception_score_mean"], rel=1e-12),
                              pytest.approx(theirs["inception_score_std"], rel=1e-12))
    assert sorted_score[0] < shuffled_score[0]


def test_unknown_inception_split_order_is_named():
    expected = r"is_split_order='sorted': must be one of \['shuffled', 'image_order'\]"
    with pytest.raises(MetricsInputError, match=expected):
        InceptionScore(20, 2, split_order="sorted")


def test_streamed_inception_score_holds_per_split_sums_only():
    score = InceptionScore(count=5000, splits=10)
    score.update(torch.randn(4000, 1000))
    assert score.prob_sums.shape == (10, 1000) and score.neg_entropy_sums.shape == (10,)
    with pytest.raises(MetricsInputError, match="4000 of the 5000 images announced were given"):
        score.result()
    with pytest.raises(MetricsInputError, match="more than the 5000 images announced"):
        score.update(torch.randn(1001, 1000))


def test_inception_features_keep_pool_features_and_the_first_1000_logits():
    class Network:  # stands in for torch-fidelity's module: ("2048", "logits_unbiased" with 1008 outputs)
        def __call__(self, images):
            return images.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048], torch.arange(1008.0).repeat(len(images), 1)

    space = object.__new__(InceptionFeatures)
    space.network, space.device = Network(), torch.device("cpu")
    pool, logits = space(torch.full((2, 3, 4, 4), 7, dtype=torch.uint8))
    assert pool.shape == (2, 2048) and torch.equal(logits, torch.arange(1000.0).repeat(2, 1))


def test_inception_score_needs_one_image_per_split():
    with pytest.raises(MetricsInputError, match="9 images for splits=10"):
        inception_score(torch.zeros(9, 1000), 10)


def test_to_uint8_scales_clamps_and_truncates():
    x = torch.tensor([-0.1, 0.0, 0.5, 0.999, 1.0, 1.2])
    assert to_uint8(x).tolist() == [0, 0, 127, 254, 255, 255]


def test_running_stats_match_numpy_over_uneven_batches():
    features = np.random.default_rng(2).standard_normal((37, 6)) * 3 + 100
    moments = RunningStats()
    for part in np.split(features, [5, 6, 20]):
        moments.update(part)
    stats = moments.stats("toy")
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9)
    assert stats.num_images == 37


def test_statistics_npz_round_trip_and_jit_format(tmp_path):
    stats = GaussianStats(np.arange(3.0), np.eye(3) * 2, 10, "pixel-8x8")
    stats.save(tmp_path / "s.npz")
    loaded = GaussianStats.load(tmp_path / "s.npz")
    assert (loaded.num_images, loaded.feature_space) == (10, "pixel-8x8")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.savez(tmp_path / "jit.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    assert GaussianStats.load(tmp_path / "jit.npz").feature_space == "inception-v3-compat"
    with pytest.raises(MetricsInputError, match="cannot be compared"):
        stats_distance(stats, GaussianStats(np.zeros(3), np.eye(3), 5, "inception-v3-compat"))


def test_statistics_npz_errors_name_the_file_and_the_rule(tmp_path):
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(MetricsInputError, match=r"nosigma.npz.*no 'sigma' array.*must hold 'mu' \(D,\) and 'sigma'"):
        GaussianStats.load(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(MetricsInputError, match=r"mu has shape \(3,\) and sigma \(4, 4\)"):
        GaussianStats.load(tmp_path / "shape.npz")


def test_missing_inception_weights_name_the_parameter_the_env_variable_and_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MetricsInputError) as error:
        resolve_inception_weights(None)
    expected = ("inception_weights", "--inception-weights", "INCEPTION_WEIGHTS",
                "weights-inception-2015-12-05-6726825d.pth")
    assert all(s in str(error.value) for s in expected)
    with pytest.raises(MetricsInputError, match=r"inception_weights.*='/nowhere/w.pth': file not found.*6726825d"):
        resolve_inception_weights("/nowhere/w.pth")
    monkeypatch.setenv("INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(MetricsInputError, match=r"INCEPTION_WEIGHTS='.*absent.pth': file not found"):
        build_feature_space("inception")
    (tmp_path / "present.pth").write_bytes(b"")
    monkeypatch.setenv("INCEPTION_WEIGHTS", str(tmp_path / "present.pth"))
    assert resolve_inception_weights(None) == tmp_path / "present.pth"


def test_invalid_inception_weights_file_is_named(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(MetricsInputError, match=r"other.pth': could not be loaded as torch-fidelity's inception-v3"):
        build_feature_space("inception", inception_weights=tmp_path / "other.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(MetricsInputError, match=r"empty.pth': could not be loaded.*EOFError"):
        build_feature_space("inception", inception_weights=tmp_path / "empty.pth")


def test_missing_reference_statistics_name_the_env_variable_and_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("IN256_FID_STATS", raising=False)
    with pytest.raises(MetricsInputError) as error:
        load_reference(None, PixelFeatures())
    assert all(s in str(error.value) for s in ("REF", "IN256_FID_STATS", "jit_in256_stats.npz", "'mu' and 'sigma'"))
    monkeypatch.setenv("IN256_FID_STATS", str(tmp_path / "gone.npz"))
    with pytest.raises(MetricsInputError, match=r"IN256_FID_STATS='.*gone.npz': file not found"):
        resolve_reference_stats(None)


def test_unknown_feature_space_and_classifier_without_data():
    with pytest.raises(MetricsInputError, match="'clip': unknown; choose one of inception, pixel, classifier"):
        build_feature_space("clip")
    with pytest.raises(MetricsInputError, match="needs train_images and train_labels"):
        build_feature_space("classifier")


def test_pixel_features_average_blocks():
    blocks = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(1, 3, 8, 8)
    image = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 32x32, constant 4x4 blocks
    features, logits = PixelFeatures(8)(image)
    assert logits is None
    np.testing.assert_allclose(features.numpy(), blocks.reshape(1, -1).numpy() / 255.0, rtol=1e-12)


def test_batches_of_any_iterable_give_the_statistics_of_all_images(tmp_path):
    images = torch.randint(0, 256, (23, 3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    stats = compute_reference_stats(images.split(7), PixelFeatures(4), progress=False)
    features = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1).numpy()
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-15)
    np.savez(tmp_path / "images.npz", arr_0=images.permute(0, 2, 3, 1).numpy())  # NHWC uint8, ADM style
    batches, total = open_images(tmp_path / "images.npz", batch_size=10)
    assert total == 23
    assert torch.equal(torch.cat(list(batches)), images)


def test_feature_batches_must_be_uint8():
    with pytest.raises(MetricsInputError, match=r"dtype torch.float32.*must be uint8 \(N, 3, H, W\).*to_uint8"):
        evaluate_images([torch.rand(4, 3, 8, 8)], GaussianStats(np.zeros(192), np.eye(192), 4), PixelFeatures())


def test_psnr_is_per_image_on_uint8_then_averaged():
    x = torch.full((2, 3, 4, 4), 100 / 255)
    y = x.clone()
    y[0] += 1 / 255  # every pixel off by one level: mse 1
    y[1, :, :2] += 4 / 255  # half the pixels off by four: mse 8
    per_image = psnr_uint8(x, y)
    expected = [20 * math.log10(255), 10 * math.log10(255**2 / 8)]
    assert per_image.tolist() == pytest.approx(expected, rel=1e-12)
    assert reconstruction_metrics([(x, y)], progress=False)["psnr"] == pytest.approx(sum(expected) / 2)


def test_l1_error_and_shape_check():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.cat([torch.full((1, 3, 4, 4), 0.25), torch.zeros(1, 3, 4, 4)])
    assert l1_error(x, y).tolist() == [0.25, 0.0]
    with pytest.raises(MetricsInputError, match=r"originals \(2, 3, 4, 4\) and reconstructions \(2, 3, 4, 3\)"):
        l1_error(x, y[..., :3])


class RecordingLpips(torch.nn.Module):
    """Stands in for an LPIPS module: records its inputs and returns a per-image mean |a - b|."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, a, b):
        self.seen.append((a.clone(), b.clone(), self.training))
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_gets_minus_one_to_one_inputs_in_eval_mode_and_mode_is_restored():
    module = RecordingLpips().train()
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert lpips_distance(module, x, y).tolist() == [2.0, 2.0]
    a, b, training = module.seen[0]
    assert (a.min().item(), b.max().item(), training) == (-1.0, 1.0, False)
    assert module.training


def test_reconstruction_metrics_stream_psnr_l1_lpips_and_rfd():
    gen = torch.Generator().manual_seed(4)
    pairs = [(torch.rand(6, 3, 8, 8, generator=gen), torch.rand(6, 3, 8, 8, generator=gen)) for _ in range(3)]
    result = reconstruction_metrics(pairs, feature_space=PixelFeatures(2), lpips=RecordingLpips(), progress=False)
    originals, recons = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    feats = [torch.nn.functional.adaptive_avg_pool2d(to_uint8(t).double() / 255, 2).flatten(1).numpy()
             for t in (recons, originals)]
    expected_rfd = frechet_distance(feats[0].mean(0), np.cov(feats[0], rowvar=False),
                                    feats[1].mean(0), np.cov(feats[1], rowvar=False))
    assert result["rfd"] == pytest.approx(expected_rfd, rel=1e-9)
    assert result["psnr"] == pytest.approx(psnr_uint8(originals, recons).mean().item(), rel=1e-12)
    assert result["l1"] == pytest.approx((originals - recons).abs().mean().item(), rel=1e-6)
    assert result["lpips"] == pytest.approx(2 * (originals - recons).abs().mean().item(), rel=1e-6)
    assert (result["num_images"], result["feature_space"]) == (18, "pixel-2x2")


@pytest.fixture(scope="module")
def digits():
    """The demo's images: scikit-learn digits upsampled to 32x32 RGB uint8, split in two halves."""
    data = load_digits()
    small = torch.from_numpy(np.rint(data.images * 255 / 16).astype(np.uint8))
    images = small.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    return images[train], labels[train], images[test], labels[test]


def test_class_consistency_rewards_conditioning_and_catches_ignored_labels(digits):
    train_x, train_y, test_x, test_y = digits
    classifier = PixelClassifier(train_x, train_y)
    # Held-out real digits stand in for a perfectly conditioned generator; digits paired with the next
    # class's label stand in for one that draws the wrong class.
    assert class_consistency(classifier, test_x, test_y) > 0.9
    assert class_consistency(classifier, test_x, (test_y + 1) % 10) < 0.1
    with pytest.raises(MetricsInputError, match="3 images and 2 labels"):
        class_consistency(classifier, test_x[:3], test_y[:2])


def test_classifier_features_separate_real_digits_from_scrambled_ones(digits):
    train_x, train_y, test_x, _ = digits
    space = build_feature_space("classifier", train_images=train_x, train_labels=train_y)
    assert isinstance(space, ClassifierFeatures) and space.name == "classifier-mlp64-pixel8"
    reference = compute_reference_stats([train_x], space, progress=False)
    real = evaluate_images([test_x], reference, space, progress=False)
    pixels = test_x.flatten(1)
    scrambled = pixels[:, torch.randperm(pixels.shape[1], generator=torch.Generator().manual_seed(1))]
    fake = evaluate_images([scrambled.reshape(test_x.shape)], reference, space, progress=False)
    assert set(real) == {"feature_space", "fd", "num_images", "num_ref_images"}
    assert real["fd"] < fake["fd"]
