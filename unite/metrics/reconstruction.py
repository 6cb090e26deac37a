"""Reconstruction metrics: PSNR, L1, LPIPS and rFID of reconstructions against their originals.

rFID reuses the FID maths (`unite.metrics.fid`) and feature spaces (`unite.metrics.features`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from unite.metrics.features import FeatureSpace, distance_key
from unite.metrics.fid import RunningStats, stats_distance, to_uint8
from unite.metrics.inputs import MetricsInputError


def _check_pair(originals: Tensor, reconstructions: Tensor) -> None:
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise MetricsInputError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)}: they must be "
            f"two (N, 3, H, W) batches of one shape"
        )


def psnr_uint8(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Per-image PSNR (dB) after quantising both [0, 1] batches to uint8 as saved images are; inf
    for an exact match."""
    _check_pair(originals, reconstructions)
    diff = to_uint8(originals).to(torch.float64) - to_uint8(reconstructions).to(torch.float64)
    mse = diff.square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def l1_error(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Per-image mean absolute error of [0, 1] float images (the training loss's L1)."""
    _check_pair(originals, reconstructions)
    return (originals.to(torch.float64) - reconstructions.to(torch.float64)).abs().flatten(1).mean(dim=1)


@torch.no_grad()
def lpips_distance(lpips: nn.Module, originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Per-image LPIPS of [0, 1] images, scaled to the [-1, 1] range LPIPS expects (the standard
    metric, unlike the training loss quirk) and with the module in eval mode (no head dropout)."""
    _check_pair(originals, reconstructions)
    was_training = lpips.training
    lpips.eval()
    try:
        device = next(lpips.parameters(), originals).device  # a parameter-free module runs where the images are
        distance = lpips(originals.to(device) * 2 - 1, reconstructions.to(device) * 2 - 1)
    finally:
        lpips.train(was_training)
    return distance.flatten().to(torch.float64).cpu()


def reconstruction_metrics(
    pairs: Iterable[tuple[Tensor, Tensor]],
    *,
    feature_space: FeatureSpace | None = None,
    lpips: nn.Module | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """Stream (originals, reconstructions) [0, 1] batches: mean per-image PSNR (uint8) and L1, mean
    LPIPS if a module is given, and rFID (rfd outside Inception space) between the uint8
    reconstructions and originals if a feature space is given."""
    psnr, l1, perceptual = [], [], []
    real, recon = RunningStats(), RunningStats()
    with tqdm(total=total, desc="reconstruction metrics", unit="img", disable=not progress) as bar:
        for originals, reconstructions in pairs:
            psnr.append(psnr_uint8(originals, reconstructions))
            l1.append(l1_error(originals, reconstructions))
            if lpips is not None:
                perceptual.append(lpips_distance(lpips, originals, reconstructions))
            if feature_space is not None:
                real.update(feature_space(to_uint8(originals).cpu())[0].numpy())
                recon.update(feature_space(to_uint8(reconstructions).cpu())[0].numpy())
            bar.update(len(originals))
    if not psnr:
        raise MetricsInputError("reconstruction metrics: no image pairs given")
    result: dict[str, float | int | str] = {
        "psnr": torch.cat(psnr).mean().item(),
        "l1": torch.cat(l1).mean().item(),
        "num_images": sum(len(p) for p in psnr),
    }
    if perceptual:
        result["lpips"] = torch.cat(perceptual).mean().item()
    if feature_space is not None:
        name = feature_space.name
        result["r" + distance_key(name)] = stats_distance(recon.stats(name), real.stats(name))
        result["feature_space"] = name
        if hasattr(feature_space, "weights_check"):
            result["weights"] = feature_space.weights_check
    if lpips is not None and hasattr(lpips, "weights_check"):
        result["lpips_weights"] = lpips.weights_check
    return result
