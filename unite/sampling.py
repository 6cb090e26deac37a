"""Sampling: classifier-free-guided probability-flow ODE from noise (t = 0) to data (t = 1).

The drift is v = (x_hat - x_t) / max(1 - t, eps) with x_hat the (guided) denoised latent.
Solvers come from torchdiffeq: `dopri5` (adaptive, the reference's sampler) and the fixed-step
`euler` and `heun` on the same timestep-shifted grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from unite.model import UNITE, shift_time
from unite.options import NORM_ORDERS, SOLVERS, check_choice, check_interval

# torchdiffeq's name of each of our solvers (unite.options.SOLVERS).
METHODS = {"dopri5": "dopri5", "euler": "euler", "heun": "heun2"}


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: scale w inside the time interval (low, high), 1 outside.

    norm_order says where the latent LayerNorm goes, as the reference computes it (not as its
    docstring intends). With guidance (scale > 1): `norm_first` and `both` normalise each
    prediction before combining and `cfg_first` applies no LayerNorm at all; no order normalises
    after combining. Without guidance: `norm_first` applies none, `cfg_first` and `both` normalise
    the prediction."""

    scale: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    norm_order: str = "norm_first"  # one of unite.options.NORM_ORDERS

    def __post_init__(self) -> None:
        check_choice("norm_order", self.norm_order, NORM_ORDERS)
        check_interval("interval", self.interval)
        if self.scale < 0:
            raise ValueError(f"scale={self.scale}: must be >= 0")


def guided_prediction(model: UNITE, x_t: Tensor, t: Tensor, labels: Tensor, guidance: Guidance) -> Tensor:
    """The denoised latent x_hat under guidance, for x_t (B, N, C) at times t (B,)."""
    if guidance.scale <= 1:
        x_hat = model.predict(x_t, t, labels, normalize=False)
        # Quirk: without guidance the reference runs no doubled batch and, for norm_first,
        # applies no latent LayerNorm at all.
        return x_hat if guidance.norm_order == "norm_first" else model.latent_norm(x_hat)

    null = torch.full_like(labels, model.null_label)
    out = model.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]), normalize=False)
    if guidance.norm_order in ("norm_first", "both"):
        out = model.latent_norm(out)
    cond, uncond = out.chunk(2)
    low, high = guidance.interval
    inside = t < high
    if low != 0:
        inside = inside & (t > low)
    scale = torch.where(inside, guidance.scale, 1.0).to(cond.dtype).view(-1, 1, 1)
    # Quirk: the reference's forward_with_cfg leaves the LayerNorm after combining to its caller,
    # which never applies it; so cfg_first is unnormalised and both equals norm_first.
    return uncond + scale * (cond - uncond)


def time_grid(num_points: int, shift: float, device: torch.device | None = None) -> Tensor:
    """linspace(0, 1, num_points) through the timestep shift (0 and 1 stay fixed)."""
    return shift_time(torch.linspace(0, 1, num_points, device=device), shift)


@dataclass
class Samples:
    latents: Tensor  # final ODE state (B, N, C)
    images: Tensor  # decoded and clamped to [0, 1]
    nfe: int  # network evaluations (one guided batch counts once)


@torch.no_grad()
def sample_latents(
    model: UNITE,
    noise: Tensor,
    labels: Tensor,
    guidance: Guidance = Guidance(),
    solver: str = "dopri5",
    steps: int = 49,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    eps: float | None = None,
) -> tuple[Tensor, int]:
    """Integrate the guided ODE from `noise` at t = 0 to t = 1; returns (final latent, NFE).

    dopri5 uses 50 shifted output times (the reference's grid) with atol/rtol; euler and heun
    take `steps` steps on a grid of steps + 1 shifted times. `eps` clamps 1 - t in the drift
    (default cfg.velocity_eps)."""
    check_choice("solver", solver, SOLVERS)
    if solver != "dopri5" and steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    model.check_labels(labels, allow_null=True)
    cfg = model.cfg
    expected = (noise.shape[0], cfg.num_latent_tokens, cfg.latent_dim)
    if tuple(noise.shape) != expected or labels.shape[0] != noise.shape[0]:
        raise ValueError(
            f"noise: expected shape {expected} with one label per sample, got noise "
            f"{tuple(noise.shape)} and labels {tuple(labels.shape)}"
        )

    num_points = 50 if solver == "dopri5" else steps + 1
    grid = time_grid(num_points, cfg.timestep_shift, device=noise.device)
    nfe = 0

    def drift(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        t_batch = t.expand(x.shape[0])
        x_hat = guided_prediction(model, x, t_batch, labels, guidance)
        return model.velocity(x_hat.to(x.dtype), x, t_batch, eps)

    path = odeint(drift, noise, grid, method=METHODS[solver], atol=atol, rtol=rtol)
    return path[-1], nfe


@torch.no_grad()
def sample(
    model: UNITE,
    noise: Tensor,
    labels: Tensor,
    guidance: Guidance = Guidance(),
    solver: str = "dopri5",
    steps: int = 49,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    eps: float | None = None,
) -> Samples:
    """Sample latents, then decode them (no decoder noise) and clamp to [0, 1]. Images are float32
    even under bf16 autocast: quantising bf16 values to uint8 (x * 255) would shift pixels."""
    latents, nfe = sample_latents(model, noise, labels, guidance, solver, steps, atol, rtol, eps)
    return Samples(latents=latents, images=model.decode(latents).float().clamp(0, 1), nfe=nfe)
