"""LPIPS (VGG16, v0.1) built offline.

The `lpips` package ships its linear-head weights; only torchvision's ImageNet VGG16 trunk has to
come from disk: an explicit path, or the torch hub cache where torchvision would have put it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn


VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"


def find_vgg16_weights(path: str | None) -> Path:
    """The VGG16 trunk file: `path` if given, else the torch hub cache; a clear error otherwise."""
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise FileNotFoundError(
                f"lpips_vgg_weights={path!r}: file not found. It must be torchvision's ImageNet "
                f"VGG16 weights ({VGG16_FILE}, from {VGG16_URL})."
            )
        return candidate
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's ImageNet VGG16 weights and this machine cannot download "
            f"them: {candidate} does not exist. Fetch {VGG16_URL} on a machine with network "
            f"access and copy it to {candidate} (or set TORCH_HOME), or give its path as "
            f"lpips_vgg_weights; perceptual_weight=0 disables LPIPS."
        )
    return candidate


def build_lpips(vgg_weights: str | None = None, random_backbone: bool = False) -> nn.Module:
    """A frozen LPIPS(VGG) module; `random_backbone=True` (tests only) skips the trunk weights."""
    import lpips

    from unite.safe_load import load_torch_file, weights_check

    weights_path = None if random_backbone else find_vgg16_weights(vgg_weights)
    # lpips prints its setup on stdout and calls torchvision with its deprecated `pretrained` flag.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        module = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
    if weights_path is not None:
        trunk = load_torch_file(weights_path, opt_in=None)
        # lpips splits torchvision's `features.{i}` into slices but keeps the layer index i.
        mapped = {}
        for name in module.net.state_dict():
            index, leaf = name.split(".", 1)[1].split(".", 1)
            source = f"features.{index}.{leaf}"
            if source not in trunk:
                raise ValueError(f"{weights_path}: not a torchvision VGG16 state dict (no {source!r})")
            mapped[name] = trunk[source]
        module.net.load_state_dict(mapped)
        module.weights_check = weights_check(weights_path, VGG16_SHA256_PREFIX)
    module.requires_grad_(False)
    return module
