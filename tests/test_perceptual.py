"""LPIPS is built offline: the VGG16 trunk comes from a file, or construction fails clearly."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision
from torch.hub import HASH_REGEX
from torchvision.models import VGG16_Weights

from conftest import small_config
from unite.model import UNITE
import unite.perceptual as perceptual
from unite.metrics.reconstruction import reconstruction_metrics
from unite.perceptual import build_lpips


def test_missing_vgg_weights_fail_at_model_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        UNITE(small_config(perceptual_weight=1.0))
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message


def test_a_wrong_vgg_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lpips_vgg_weights="):
        UNITE(small_config(perceptual_weight=1.0, lpips_vgg_weights=str(tmp_path / "vgg.pth")))


def test_no_lpips_without_perceptual_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert UNITE(small_config(perceptual_weight=0.0)).perceptual is None


def test_vgg_trunk_is_loaded_from_the_cache_file(tmp_path, monkeypatch):
    """...and the LPIPS scores say whether the file is the official one: it cannot be downloaded
    here, so the check is shown this file's own sha256 prefix (hashlib's) as the official one (the
    rehearsal sees the other answer)."""
    torch.manual_seed(0)
    trunk = torchvision.models.vgg16().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(trunk, cache / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    sha256 = hashlib.sha256((cache / "vgg16-397923af.pth").read_bytes()).hexdigest()
    monkeypatch.setattr(perceptual, "VGG16_SHA256_PREFIX", sha256[:8])
    lpips_module = build_lpips()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert reconstruction_metrics([(images, images.flip(-1))], lpips=lpips_module)["lpips_weights"] == "official"
    assert torch.equal(lpips_module.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(getattr(lpips_module.net.slice5, "28").bias, trunk["features.28.bias"])
    assert not any(p.requires_grad for p in lpips_module.parameters())
    # The package's calibrated linear heads are loaded too (not the random init).
    head = lpips_module.lin0.model[1].weight
    assert (head >= 0).all() and head.abs().sum() > 0


def test_the_official_vgg16_file_is_named_by_the_sha256_prefix_of_its_release():
    assert VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1] == perceptual.VGG16_FILE
    assert HASH_REGEX.search(perceptual.VGG16_FILE).group(1) == perceptual.VGG16_SHA256_PREFIX
