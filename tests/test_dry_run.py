"""The dry run at true size (`python -m stages.rehearse NAME --true-size`): every preset through the
command line, a planted device mismatch caught, the memory count against torch's MemTracker and
the FLOP count against a closed form."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from conftest import small_config
from stages.preset import load_preset, preset_params
from unite.dry_run import DryRunFailed, Generation, LiveMemory, dry_run, measure_generation
from unite.model import UNITE, PixelDecoder
from unite.sampling import Guidance
from unite.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
IMAGENET_TRAIN = 1_281_167


def tiny_train_config(**overrides) -> TrainConfig:
    model = {"encoder": "Tiny", "decoder": "Tiny", "image_size": 32, "patch_size": 4, "num_latent_tokens": 64,
             "latent_dim": 8, "num_classes": 10, "in_context_len": 4, "perceptual_weight": 0.0}
    values = {"model": model, "data": {"kind": "synthetic", "num_images": 8}, "out_dir": "unused",
              "max_steps": 10, "global_batch": 8, "per_device_batch": 4,
              "schedule": {"warmup_steps": 1, "hold_until_step": 2, "decay_until_step": 3, "final_lr_factor": 0.5}}
    return TrainConfig.from_dict({**values, **overrides})


TINY_GENERATION = Generation(block_size=3, guidance=Guidance(scale=2.0), lpips=False, inception=False)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_dry_runs_at_true_size_on_8_gpus(preset: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stages.rehearse", preset, "--true-size", "--nproc", "8", "--nnodes", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    train = load_preset(ROOT / "presets" / f"{preset}.yaml")["train"]

    # The reference's recipe on 8 GPUs: 1024 images a step, 1e-4 at batch 384 scaled linearly, and
    # its schedule counted in micro-batches of 1024 / (2 x 8) per rank (DistributedSampler padding).
    epoch = math.floor(math.ceil(IMAGENET_TRAIN / 8) / (1024 / (2 * 8)))
    recipe = report["recipe"]
    assert (recipe["warmup_steps"], recipe["hold_until_step"], recipe["decay_until_step"]) == (
        20 * epoch, 30 * epoch, 50 * epoch) == (50_040, 75_060, 125_100)
    assert recipe["global_batch"] == 1024 == recipe["per_device_batch"] * recipe["accumulation"] * 8
    assert recipe["per_device_batch"] <= train["per_device_batch"]
    assert recipe["peak_lr"] == pytest.approx(1e-4 * 1024 / 384, rel=1e-12)
    assert recipe["max_steps"] == train["max_steps"]

    memory = report["memory"]
    assert memory["fits"], memory
    assert max(memory["train_peak_gib"], memory["generation_peak_gib"]) <= 141 * 0.9
    assert memory["max_per_device_batch"] >= recipe["per_device_batch"]
    assert report["host_syncs_per_step"] == 0, report["host_syncs_by_op"]

    # KID and precision/recall on the evaluating rank: both feature sets (Inception's 2048 pool
    # features) kept in float32 plus KID's float64 host copies; on the GPU float64 copies of both and
    # the larger of KID's working set (2 subsets, 5 kernel matrices) and precision/recall's (cdist's
    # float64 copy of the larger set padded by 2 columns, a 256-row block of distances to it).
    params = preset_params(preset, ROOT / "params.yaml", ROOT / "presets")
    n, m, s, d = (params["evaluate"]["num_images"], params["fid_ref"]["set_images"],
                  params["evaluate"]["kid_subset_size"], 2048)
    host = (n + m) * d * 4 + (n + m) * d * 8
    device = (n + m) * d * 8 + max(2 * s * d * 8 + 5 * s * s * 8, max(n, m) * (d + 2) * 8 + 256 * max(n, m) * 8)
    features = memory["evaluation_features"]
    assert (features["generated"], features["reference"]) == (n, m) == (50_000, 10_000)
    assert (features["host_gib"], features["device_gib"]) == (round(host / 2**30, 3), round(device / 2**30, 3))
    assert features["device_gib"] < features["scoring_peak_gib"] <= 141 * 0.9


def test_a_gpu_count_that_cannot_split_the_batch_is_refused_in_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "stages.rehearse", "unite-b", "--true-size", "--nproc", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("dry run: unite-b at true size")]
    assert len(lines) == 1 and lines[0].startswith("error: dry run: unite-b: world_size=3: global_batch=1024 cannot "
                                                  "be split over 3 processes"), result.stderr


def test_a_tensor_made_without_a_device_is_caught_and_named(monkeypatch) -> None:
    def drop_labels(self, labels):  # the planted bug: the mask is made on the CPU
        drop = torch.rand(labels.shape) < self.cfg.label_drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    monkeypatch.setattr(UNITE, "drop_labels", drop_labels)
    with pytest.raises(DryRunFailed) as failure:
        dry_run(tiny_train_config(), 2, TINY_GENERATION)
    message = str(failure.value)
    assert message.startswith("training step on fake CUDA tensors: FakeTensorDeviceMismatchError at "
                              "tests/test_dry_run.py:"), message
    assert "(drop_labels: return torch.where(drop, torch.full_like(labels, self.null_label), labels))" in message
    assert "cpu and cuda:0" in message or "cuda:0 and cpu" in message


def test_a_tensor_made_without_a_device_in_generation_is_caught(monkeypatch) -> None:
    import unite.sampling

    def guided_prediction(model, x_t, t, labels, guidance):  # the planted bug: null labels on the CPU
        null = torch.full(labels.shape, model.null_label)
        cond, uncond = model.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return uncond + guidance.scale * (cond - uncond)

    monkeypatch.setattr(unite.sampling, "guided_prediction", guided_prediction)
    expected = (r"^generation and scoring on fake CUDA tensors: FakeTensorDeviceMismatchError at "
                r"tests/test_dry_run.py:\d+ \(guided_prediction: .*(cuda:0 and cpu|cpu and cuda:0)")
    with pytest.raises(DryRunFailed, match=expected):
        dry_run(tiny_train_config(), 2, TINY_GENERATION)


def test_the_memory_count_equals_torch_memtracker_on_a_training_step() -> None:
    # MemTracker (a second implementation, in torch) on the same fake step. It follows modules
    # and refuses one called twice in a step (UNITE's encoder is), so the step here trains the
    # pixel decoder alone: attention, LayerNorm, GELU, AdamW.
    cfg = small_config(decoder_layers=2)
    peaks = []
    for tracker in (LiveMemory, MemTracker):
        with FakeTensorMode():
            decoder = PixelDecoder(cfg)
            optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
            latents = torch.randn(16, cfg.num_latent_tokens, cfg.latent_dim)

            def step() -> None:
                decoder(latents).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # the optimizer states exist from here on
            counter = tracker()
            if isinstance(counter, LiveMemory):
                counter.track(list(decoder.parameters()), list(decoder.buffers()), latents,
                              [t for state in optimizer.state.values() for t in state.values()])
            else:
                counter.track_external(decoder, optimizer, latents)
            with counter:
                step()
            peaks.append(counter.peak if isinstance(counter, LiveMemory)
                         else counter.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    assert peaks[0] == peaks[1] > 0


def test_generation_flops_equal_the_closed_form() -> None:
    model = {**tiny_train_config().to_dict()["model"], "encoder_depth": 3, "in_context_start": 1}
    cfg = tiny_train_config(model=model)
    m = cfg.model
    d, n, c, ctx = m.encoder_hidden, m.num_latent_tokens, m.latent_dim, m.in_context_len
    mlp = int(2 / 3 * 4 * d)  # SwiGLU's hidden width
    per_sequence = 2 * n * c * d + 2 * (512 * d + d * d)  # latent input, time embedding MLP
    for block in range(m.encoder_depth):
        length = n if block < m.in_context_start else n + ctx
        per_sequence += 2 * d * 6 * d  # adaLN modulation, once per sequence
        per_sequence += 2 * length * d * (3 * d + d + 2 * mlp) + 2 * length * mlp * d  # qkv, proj, SwiGLU
        per_sequence += 4 * length * length * d  # q k^T and attention x v over all heads
    per_sequence += 2 * d * 2 * d + 2 * n * d * c  # final modulation and linear
    measured = measure_generation(cfg, TINY_GENERATION)
    assert measured["flops_per_image_per_nfe"] == 2 * per_sequence  # guidance doubles the batch
