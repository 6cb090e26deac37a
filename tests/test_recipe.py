"""The training recipe against the reference: the UNITE-B learning-rate schedule, LPIPS head dropout
while training, TF32 on CUDA, and the bf16 autocast paths (run under CPU autocast here, so that dtype
bugs show up before a GPU run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from test_train import TINY_MODEL, train_config
from unite.config import ConfigError, model_config
from unite.model import UNITE
from unite.optim import scaled_lr
from unite.sampling import Guidance, sample
from unite.train import allow_tf32, train
from unite.train_config import build_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unite_b_schedule_gives_the_reference_learning_rates() -> None:
    # The reference on ImageNet, 64 per GPU x 8 GPUs x 2 accumulation: its DistributedSampler pads
    # 1,281,167 images to 160,146 per rank and the loader drops the partial batch, so an "epoch" of
    # the schedule is 2,502 micro-batches, stepped once per optimizer step: warmup over 20 x 2,502 =
    # 50,040 steps, flat to 75,060, cosine to half at 125,100, flat to the last of 300,240 steps.
    # Peak: 1e-4 at batch 384, scaled to 1024.
    peak = 1e-4 * 1024 / 384
    expected = {
        0: 0.0,
        25_020: 0.5 * peak,  # halfway through warmup
        50_040: peak,  # warmup end
        75_059: peak,  # last step of the hold
        100_080: 0.75 * peak,  # mid-cosine: 0.5 + 0.5 * (1 + cos(pi / 2)) / 2
        125_100: 0.5 * peak,  # cosine end
        300_239: 0.5 * peak,  # last step of 240 epochs
    }
    schedule = build_schedule({"preset": "unite_b", "images_per_epoch": 1_281_167}, global_batch=1024, world_size=8)
    for step, lr in expected.items():
        assert scaled_lr(1e-4, 1024) * schedule(step) == pytest.approx(lr, rel=1e-12, abs=1e-18), step
    # One step before the warmup ends, the factor is still below one: the warmup is 50,040 steps, not 50,060.
    assert schedule(50_039) == pytest.approx(50_039 / 50_040)


def test_unite_b_schedule_refuses_an_epoch_shorter_than_one_micro_batch() -> None:
    with pytest.raises(ConfigError, match=r"schedule.images_per_epoch=100: fewer than one micro-batch of 64"):
        build_schedule({"preset": "unite_b", "images_per_epoch": 100}, global_batch=256, world_size=2)


@pytest.fixture
def dropout_modes():
    """The `training` flag of every nn.Dropout forward call, recorded by a global hook, so that a
    model built inside the trainer is observed without reaching into it."""
    modes: list[bool] = []
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: modes.append(module.training) if isinstance(module, nn.Dropout) else None
    )
    yield modes
    handle.remove()


LPIPS_MODEL = {**TINY_MODEL, "perceptual_weight": 1.0, "lpips_random_backbone": True}


def test_lpips_dropout_is_active_in_training(tmp_path: Path, dropout_modes: list[bool]) -> None:
    # UNITE has no dropout of its own: every Dropout call is one of LPIPS's five linear heads.
    train(train_config(tmp_path, model=LPIPS_MODEL, max_steps=2))
    assert len(dropout_modes) == 5 * 2 * 2  # five heads, two micro-batches a step, two steps
    assert all(dropout_modes)


def test_lpips_dropout_follows_the_model_mode(dropout_modes: list[bool]) -> None:
    torch.manual_seed(0)
    model = UNITE(model_config(**LPIPS_MODEL))
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    model(images, labels)
    assert dropout_modes == [True] * 5  # a new model is in train mode, LPIPS with it
    dropout_modes.clear()
    model.eval()
    reconstruction = torch.rand(2, 3, 16, 16)
    first, second = model.perceptual(images, reconstruction), model.perceptual(images, reconstruction)
    assert dropout_modes == [False] * 10 and torch.equal(first, second)
    model.train()
    torch.manual_seed(1)
    first, second = model.perceptual(images, reconstruction), model.perceptual(images, reconstruction)
    assert not torch.equal(first, second)  # dropout at p = 0.5 changes the distance


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_for_cuda_only(enabled: bool) -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not enabled
        allow_tf32(enabled, torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not enabled, not enabled)
        allow_tf32(enabled, torch.device("cuda", 0))  # sets flags only: no CUDA device is touched
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_param_defaults_on_and_is_validated(tmp_path: Path) -> None:
    assert train_config(tmp_path).tf32 is True
    assert train_config(tmp_path, tf32=False).tf32 is False
    with pytest.raises(ConfigError, match=r"tf32='yes': must be of type bool"):
        train_config(tmp_path, tf32="yes")


def test_training_step_under_bf16_autocast_matches_float32() -> None:
    # K = 5 draws also takes the gradient-checkpointed encoder path (K > 4), as the released recipe does.
    cfg = model_config(**{**LPIPS_MODEL, "flow_steps_per_recon": 5, "flow_mini_batch": 2})
    torch.manual_seed(0)
    model = UNITE(cfg).eval()  # no dropout, so both precisions see the same loss terms
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    losses = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            out = model(images, labels)
        out["loss"].backward()
        losses[name] = {k: v.item() for k, v in out.items()}
        assert all(torch.isfinite(v) for v in out.values()), name
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), name
    for key, value in losses["fp32"].items():  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
        assert losses["bf16"][key] == pytest.approx(value, rel=0.05, abs=1e-3), key


@pytest.mark.parametrize("solver", ["dopri5", "heun"])
def test_sampling_runs_under_bf16_autocast_and_returns_float32(solver: str) -> None:
    # A random model's trajectories are too chaotic for a bf16-vs-float32 distance to mean much;
    # what must hold is that the path runs and hands float32 images in [0, 1] to the uint8
    # quantisation (bf16 values times 255 would round to other pixel values).
    cfg = model_config(**TINY_MODEL)
    torch.manual_seed(0)
    model = UNITE(cfg).eval()
    for p in model.parameters():  # zero-initialised output layers would make every prediction equal
        p.data.add_(torch.randn_like(p) * 0.02)
    noise, labels = torch.randn(3, cfg.num_latent_tokens, cfg.latent_dim), torch.tensor([0, 1, 2])
    guidance = Guidance(scale=2.0, interval=(0.1, 1.0), norm_order="norm_first")
    with torch.autocast("cpu", torch.bfloat16):
        mixed = sample(model, noise, labels, guidance, solver=solver, steps=8)
    assert mixed.latents.dtype == torch.float32 and mixed.images.dtype == torch.float32
    assert torch.isfinite(mixed.latents).all()
    assert 0 <= mixed.images.min() and mixed.images.max() <= 1
