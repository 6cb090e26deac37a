"""The training recipe against the reference: the same global batch, peak learning rate and UNITE-B
schedule on any number of GPUs (per-device batch and accumulation derived, GPU counts that cannot
split the batch refused), LPIPS head dropout while training, TF32 on CUDA, and the bf16 autocast
paths (run under CPU autocast here, so that dtype bugs show up before a GPU run)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import unite.train
from stages.params import load_params
from stages.params import train_config as stage_train_config
from stages.preset import apply_preset
from test_launch import FIX_PARAMS, _one_line, _stage
from test_train import TINY_MODEL, train_config
from unite.batches import carry_position
from unite.config import ConfigError, model_config
from unite.distributed import Runtime
from unite.model import UNITE
from unite.optim import LRSchedule, scaled_lr
from unite.sampling import Guidance, sample
from unite.train import allow_tf32, train
from unite.train_config import TrainConfig, build_schedule, recipe_for

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


ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("unite-b", "unite-b-release", "unite-l", "unite-l-release")
# The most images per GPU in a micro-batch: the paper's 64 for UNITE-B; 32 for UNITE-L, whose 64
# does not fit an H200 (`python -m stages.rehearse unite-l --true-size`).
PER_GPU_CAP = {"unite-b": 64, "unite-b-release": 64, "unite-l": 32, "unite-l-release": 32}
IMAGENET_TRAIN = 1_281_167
# (nodes, GPUs per node): world sizes 1 to 64 on one node or several.
LAYOUTS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)]


def applied_preset(workspace: Path, name: str) -> dict:
    """params.yaml with the preset applied by `python -m stages.preset`'s own code, in `workspace`."""
    shutil.copy(ROOT / "params.yaml", workspace / "params.yaml")
    shutil.copytree(ROOT / "presets", workspace / "presets")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        apply_preset(name, Path("params.yaml"))
        return load_params(Path("params.yaml"))


@pytest.fixture(scope="module")
def preset_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainConfig]:
    """The trainer's config of each preset, as the train stage builds it from params.yaml."""
    return {
        name: stage_train_config(applied_preset(tmp_path_factory.mktemp(name), name)["train"], "checkpoints",
                                 {"kind": "synthetic", "num_images": 1})
        for name in PRESETS
    }


@pytest.mark.parametrize("nodes, gpus_per_node", LAYOUTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train_one_recipe_on_any_number_of_gpus(
    preset_configs: dict[str, TrainConfig], preset: str, nodes: int, gpus_per_node: int
) -> None:
    world = nodes * gpus_per_node
    recipe = recipe_for(preset_configs[preset], world)
    assert recipe.global_batch == 1024
    cap = PER_GPU_CAP[preset]
    assert recipe.per_device_batch <= cap and recipe.per_device_batch * recipe.accumulation * world == 1024
    # 1024 / world is a power of two, so its largest divisor up to the cap is min(cap, 1024 / world).
    assert recipe.per_device_batch == min(cap, 1024 // world)
    assert recipe.peak_lr == pytest.approx(1e-4 * 1024 / 384, rel=1e-12)
    # The reference keeps 2 accumulation steps and micro-batches of 1024 / (2 x world) images; its
    # DistributedSampler pads ImageNet to ceil(N / world) images per rank and the loader drops the
    # last partial batch: that many micro-batches make one "epoch" of the schedule.
    epoch = -(-IMAGENET_TRAIN // world) // (1024 // (2 * world))
    assert recipe.schedule == LRSchedule(20 * epoch, 30 * epoch, 50 * epoch, 0.5)
    # Every preset, L included, keeps the B schedule: the paper's steps on 8 GPUs, on any count.
    schedule = recipe.schedule
    assert (schedule.warmup_steps, schedule.hold_until_step, schedule.decay_until_step) == (50_040, 75_060, 125_100)


def test_the_derivation_keeps_every_setting_that_split_evenly_before(tmp_path: Path) -> None:
    """Where global_batch was a multiple of per_device_batch x world size (all that ran before),
    the micro-batch is per_device_batch and the accumulation global / (per_device x world), as
    before; elsewhere the micro-batch is the largest divisor of the rank's share up to the cap."""
    base = train_config(tmp_path)
    previously_valid = []
    for global_batch in (8, 12, 16, 24, 48, 96, 128, 1000, 1024):
        for cap in (1, 2, 3, 4, 6, 8, 16, 64, 128):
            for world in (1, 2, 3, 4, 6, 8, 16):
                if global_batch % world:
                    continue
                recipe = recipe_for(dataclasses.replace(base, global_batch=global_batch, per_device_batch=cap), world)
                share = global_batch // world
                if global_batch % (cap * world) == 0:
                    previously_valid.append((global_batch, cap, world))
                    assert (recipe.per_device_batch, recipe.accumulation) == (cap, global_batch // (cap * world))
                assert recipe.per_device_batch * recipe.accumulation == share
                assert recipe.per_device_batch <= cap
                assert not any(share % size == 0 for size in range(recipe.per_device_batch + 1, cap + 1))
    # The grid holds the paper's setting, the demo's and those of the training tests.
    assert {(1024, 64, 8), (128, 128, 1), (8, 4, 1), (8, 4, 2), (12, 2, 2)} <= set(previously_valid)


def expected_refusal(gpus: int, prefix: str, key: str) -> str:
    """The one-line refusal of `gpus` processes for the presets' global batch of 1024 with the
    unite_b schedule: a multiple of 2 x gpus is needed, and the counts that work, the divisors of
    512, are the powers of two, so the nearest are those just below and above `gpus`."""
    below = 2 ** (gpus.bit_length() - 1)
    return (
        f"{prefix}{key}={gpus}: {prefix}global_batch=1024 cannot be split over {gpus} processes (GPUs): the "
        f"unite_b schedule counts epochs in micro-batches of global_batch / (2 x {gpus}) images, as the reference "
        f"splits it, so it must be a multiple of {2 * gpus}; use {below} or {2 * below} processes (any number "
        f"that divides 512) or another {prefix}global_batch"
    )


@pytest.mark.parametrize("gpus", [3, 6, 12])
def test_the_launcher_refuses_a_gpu_count_that_cannot_split_the_batch(tmp_path: Path, gpus: int) -> None:
    params = applied_preset(tmp_path, "unite-b")
    params["train"]["nproc_per_node"] = gpus
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    line = _one_line(_stage(tmp_path, "train"))
    assert line == f"error: train: {expected_refusal(gpus, 'train.', 'nproc_per_node')}{FIX_PARAMS}"


@pytest.mark.parametrize("world", [3, 6, 12])
def test_the_trainer_refuses_a_world_size_that_cannot_split_the_batch(
    preset_configs: dict[str, TrainConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int
) -> None:
    """As a torchrun over several nodes (say 2 x 3 GPUs) meets it: refused before anything is written."""
    monkeypatch.setattr(unite.train, "init_runtime", lambda device: Runtime(0, world, torch.device("cpu")))
    cfg = dataclasses.replace(preset_configs["unite-b"], out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == expected_refusal(world, "", "world_size")
    assert not (tmp_path / "run").exists()


def test_a_batch_that_is_no_multiple_of_the_world_size_is_refused(tmp_path: Path) -> None:
    # An explicit schedule needs only an equal share per rank: 12 images split over 2, 3, 4 or 6
    # processes, not over 5.
    cfg = train_config(tmp_path, global_batch=12)
    assert [world for world in range(1, 13) if 12 % world == 0] == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ConfigError) as error:
        recipe_for(cfg, 5)
    assert str(error.value) == (
        "world_size=5: global_batch=12 cannot be split over 5 processes (GPUs): every rank takes the same number "
        "of images, so the global batch must be a multiple of 5; use 4 or 6 processes (any number that divides "
        "12) or another global_batch"
    )
    with pytest.raises(ConfigError, match=r"^world_size=0: must be >= 1$"):
        recipe_for(cfg, 0)


def test_carry_position_counts_images_across_micro_batch_sizes() -> None:
    # 5 micro-batches of 4 on 2 ranks are 40 images; on 3 ranks taking 6 each a round is 18
    # images, so 2 rounds (36 images) are skipped and the 4 after them are read again.
    position, reread = carry_position({"epoch": 3, "batch": 5}, saved_world=2, saved_batch=4, world=3, batch_size=6)
    assert (position.epoch, position.batch, reread) == (3, 2, 4)
    # A preset run on 8 GPUs (micro-batches of 64) resumed on 64 (micro-batches of 16): 10
    # micro-batches of 64 on 8 ranks are 5,120 images, 5 rounds of 16 x 64 = 1,024.
    position, reread = carry_position({"epoch": 0, "batch": 10}, saved_world=8, saved_batch=64, world=64,
                                      batch_size=16)
    assert (position.epoch, position.batch, reread) == (0, 5, 0)


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
