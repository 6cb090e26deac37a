"""Training engine: config validation, schedule, parameter split, EMA, data position, exact
resume, non-finite steps, metrics rows and preemption (one process; see
test_train_distributed.py for two gloo processes)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from unite.batches import DataPosition, IterableSource, TensorBatches, micro_batches, synthetic_images
from unite.checkpoint import export_ema, list_checkpoints, load_checkpoint, milestones
from unite.config import ConfigError, model_config
from unite.data.loaders import shard_loader
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.model import UNITE
from unite.optim import EMA, LRSchedule, split_parameters
from unite.distributed import init_runtime
from unite.train import NonFiniteLossError, Preempted, StopSignal, main, train
from unite.train_config import TrainConfig, load_config, recipe_for
from unite.train_step import Engine

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough for a step in a fraction of a second on one CPU thread.
TINY_MODEL: dict[str, Any] = {
    "encoder": "Tiny", "decoder": "Tiny", "encoder_depth": 5, "encoder_hidden": 32,
    "in_context_len": 4, "decoder_layers": 1, "decoder_hidden": 32, "decoder_mlp": 64,
    "decoder_proj_dim": 32, "image_size": 16, "patch_size": 4, "num_latent_tokens": 16,
    "latent_dim": 4, "num_classes": 10, "perceptual_weight": 0.0,
}


def train_values(out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config mapping for the tiny model: 20 synthetic images, micro-batches of 4, two
    micro-batches per step (so an epoch is 5 micro-batches and step 3 crosses into epoch 1)."""
    values = {
        "model": dict(TINY_MODEL),
        "data": {"kind": "synthetic", "num_images": 20},
        "out_dir": str(out_dir),
        "max_steps": 4,
        "global_batch": 8,
        "per_device_batch": 4,
        "base_lr": 1e-3,
        "schedule": {"warmup_steps": 1, "hold_until_step": 2, "decay_until_step": 4, "final_lr_factor": 0.5},
        "log_every": 1,
        "checkpoint_every": 100,
        "progress": False,
    }
    values.update(overrides)
    return values


def train_config(out_dir: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig.from_dict(train_values(out_dir, **overrides))


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Recursive bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TRAINING_STATE = ("model", "ema", "optimizer", "optimizer_muon", "scheduler", "scheduler_muon",
                  "step", "epoch", "data_position", "rng", "skipped_steps")


def assert_same_training_state(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for key in TRAINING_STATE:
        assert_identical(a[key], b[key], key)


def metric_rows(out_dir: Path) -> list[dict[str, str]]:
    lines = (out_dir / "metrics.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ config
def test_config_loads_yaml_and_json_alike(tmp_path: Path) -> None:
    values = train_values(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "c.json").write_text(json.dumps(values))
    from_yaml, from_json = load_config(tmp_path / "c.yaml"), load_config(tmp_path / "c.json")
    assert from_yaml == from_json
    assert from_yaml.model == model_config(**{k: v for k, v in TINY_MODEL.items()})
    assert from_yaml.ema_decay == 0.9978 and from_yaml.grad_clip == 3.0  # recipe defaults


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_steps": "10"}, "max_steps='10': must be of type int"),
        ({"bf16": 1}, "bf16=1: must be of type bool"),
        ({"learning_rate": 1.0}, "unknown config keys ['learning_rate']"),
        ({"ema_decay": 1.0}, "ema_decay=1.0: must lie in [0, 1)"),
        ({"keep_last": 0}, "keep_last=0: must be a positive integer"),
        ({"global_batch": 9, "schedule": {"preset": "unite_b", "images_per_epoch": 20}},
         "global_batch=9: the unite_b schedule counts epochs in micro-batches of global_batch / (2 x world_size=1) "
         "images, as the reference splits it, so it must be a multiple of 2"),
        ({"device": "tpu"}, "device='tpu': must be one of ['auto', 'cpu', 'cuda']"),
        ({"data": {"kind": "folder"}}, "data.kind='folder'"),
        ({"data": {"kind": "python", "source": "nomodule"}}, "data.source='nomodule'"),
        ({"model": {**TINY_MODEL, "encoder_hidden": 33}}, "model: encoder_hidden=33"),
        (
            {"schedule": {"warmup_steps": 5, "hold_until_step": 2, "decay_until_step": 9,
                          "final_lr_factor": 0.5}},
            "warmup_steps (5) <= hold_until_step (2)",
        ),
        ({"schedule": {"preset": "unite_b"}}, "a preset takes exactly"),
        ({"initial_cfg_scale": 3.4}, "unknown config keys ['initial_cfg_scale']"),
        # A bool is no count (unite.options.has_type) in the data and schedule sections too.
        ({"data": {"kind": "synthetic", "num_images": True}}, "data.num_images=True: must be a positive integer"),
        ({"data": {"kind": "synthetic", "num_images": 20, "seed": True}}, "data.seed=True: must be of type int"),
        ({"schedule": {"preset": "unite_b", "images_per_epoch": True}},
         "schedule.images_per_epoch=True: must be a positive integer"),
        (
            {"schedule": {"warmup_steps": True, "hold_until_step": 2, "decay_until_step": 9,
                          "final_lr_factor": 0.5}},
            "schedule.warmup_steps=True: must be of type int",
        ),
        (
            {"schedule": {"warmup_steps": 1, "hold_until_step": 2, "decay_until_step": 9,
                          "final_lr_factor": "0.5"}},
            "schedule.final_lr_factor='0.5': must be of type float",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        train_config(tmp_path, **change)
    assert message in str(error.value)


def test_missing_key_and_missing_file(tmp_path: Path) -> None:
    values = train_values(tmp_path)
    del values["out_dir"]
    with pytest.raises(ConfigError, match="out_dir: required key is missing"):
        TrainConfig.from_dict(values)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(train_values(tmp_path, max_steps=0)))
    assert main([str(tmp_path / "c.yaml")]) == 2
    assert "max_steps=0: must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------ schedule, optimizers, EMA
def test_schedule_closed_form() -> None:
    schedule = LRSchedule(warmup_steps=10, hold_until_step=20, decay_until_step=40, final_lr_factor=0.5)
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 19: 1.0, 20: 1.0, 30: 0.75, 40: 0.5, 10_000: 0.5}
    for step, factor in expected.items():
        assert schedule(step) == pytest.approx(factor, abs=1e-12), step
    # A quarter of the way through the cosine: 0.5 + 0.5 * (1 + cos(pi / 4)) / 2.
    assert schedule(25) == pytest.approx(0.5 + 0.25 * (1 + math.sqrt(0.5)))


def test_parameter_split() -> None:
    model = UNITE(model_config(**TINY_MODEL))
    # A 2-D stand-in for LPIPS, left trainable: only its name keeps it out of the optimizers.
    model.perceptual = torch.nn.Linear(2, 2)
    muon, adamw = split_parameters(model)
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    trainable = {n for n, _ in model.named_parameters() if not n.startswith("perceptual.")}
    assert muon_names | adamw_names == trainable and not muon_names & adamw_names
    assert {"encoder.label_embed.weight", "encoder.blocks.0.attn.qkv.weight",
            "decoder.latent_proj.weight", "encoder.time_embed.mlp.0.weight"} <= muon_names
    assert {"patch_embed.weight", "encoder.final_linear.weight", "encoder.final_modulation.weight",
            "encoder.in_context_pos", "latent_pos", "encoder.blocks.0.attn.qkv.bias",
            "encoder.time_embed.special_time_emb"} <= adamw_names
    assert all(p.ndim == 2 for _, p in muon)
    # Every 2-D weight outside the final layer is on Muon: one qkv, proj, w12, w3, modulation per
    # encoder block, latent_in, two time-MLP weights, the label table, and per decoder block qkv,
    # proj, fc1, fc2 plus latent_proj, embed and head.
    assert len(muon_names) == 5 * 5 + 4 + 4 * 1 + 3


def test_ema_keep_flag_is_the_plain_update_or_none_bit_for_bit() -> None:
    """keep=True gives the bits of the update without the flag; keep=False leaves the average."""
    torch.manual_seed(0)
    model = UNITE(model_config(**TINY_MODEL))
    plain, flagged, skipped, untouched = (EMA(model, 0.9) for _ in range(4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    plain.update(model)
    flagged.update(model, keep=torch.tensor(True))
    skipped.update(model, keep=torch.tensor(False))
    assert_identical(flagged.state, plain.state, "ema")
    assert_identical(skipped.state, untouched.state, "ema")
    assert not torch.equal(plain.state[plain.names[0]], untouched.state[plain.names[0]])


def test_ema_update_closed_form() -> None:
    model = UNITE(model_config(**TINY_MODEL))
    model.perceptual = torch.nn.Linear(2, 2)  # stands in for LPIPS, which is not averaged
    ema = EMA(model, decay=0.9)
    assert not any(name.startswith("perceptual.") for name in ema.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("perceptual.")}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in before.items():
        torch.testing.assert_close(ema.state_dict()[name], 0.9 * value + 0.1 * (value + 1.0))
    assert torch.equal(ema.state_dict()["encoder.time_embed.freqs"], model.encoder.time_embed.freqs)


# ------------------------------------------------------------------------------ data position
def test_tensor_batches_are_a_function_of_seed_epoch_and_skip() -> None:
    images, labels = torch.rand(20, 3, 2, 2), torch.arange(20)
    source = TensorBatches(images, labels, batch_size=4, seed=3)
    epoch0 = [lab for _, lab in source.batches(0, 0)]
    assert len(epoch0) == 5 and sorted(torch.cat(epoch0).tolist()) == list(range(20))
    assert all(torch.equal(a, b) for a, b in zip(epoch0[2:], [lab for _, lab in source.batches(0, 2)]))
    assert not torch.equal(torch.cat(epoch0), torch.cat([lab for _, lab in source.batches(1, 0)]))
    # Two ranks split an epoch into disjoint halves with equal batch counts.
    ranks = [TensorBatches(images, labels, 4, rank, 2, seed=3) for rank in (0, 1)]
    seen = [torch.cat([lab for _, lab in r.batches(0, 0)]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0].tolist()) & set(seen[1].tolist())


def test_micro_batches_roll_over_epochs_and_resume_mid_epoch() -> None:
    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(3)]
    source = IterableSource(batches)
    position = DataPosition()
    stream = micro_batches(source, position, batch_size=2)
    taken = [int(next(stream)[1][0]) for _ in range(4)]
    assert taken == [0, 1, 2, 0] and position == DataPosition(epoch=1, batch=1)
    resumed = micro_batches(source, DataPosition(epoch=1, batch=1), batch_size=2)
    assert [int(next(resumed)[1][0]) for _ in range(3)] == [1, 2, 0]


# ------------------------------------------------------------------------------ training
def plain_dataloader() -> IterableSource:
    """20 images in fixed order through a torch DataLoader, which draws a worker seed from the
    global torch generator whenever it is iterated (at an epoch start, or at a resume)."""
    images, labels = synthetic_images(model_config(**TINY_MODEL), 20, seed=0)
    return IterableSource(DataLoader(TensorDataset(images, labels), batch_size=4))


def test_uint8_batches_train_exactly_as_their_floats(tmp_path: Path) -> None:
    """Loaders ship uint8 images; the trainer's on-device conversion equals feeding x / 255."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (20,), generator=generator)
    as_bytes = [(pixels[i : i + 4], labels[i : i + 4]) for i in range(0, 20, 4)]
    as_floats = [(images.float() / 255, batch_labels) for images, batch_labels in as_bytes]
    first = train(train_config(tmp_path / "bytes"), data=as_bytes)
    second = train(train_config(tmp_path / "floats"), data=as_floats)
    a, b = load_checkpoint(first.checkpoint), load_checkpoint(second.checkpoint)
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["ema"], b["ema"], "ema")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 random 16x16 images of 4 classes in 4 PNG shards."""
    root = tmp_path_factory.mktemp("shards")
    generator = np.random.default_rng(0)
    for i in range(20):
        folder = root / "images" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    write_manifest(root / "images", root / "manifest.tsv", progress=False)
    write_shards(root / "images", root / "manifest.tsv", root / "shards", image_size=16, shard_size=5, workers=1,
                 progress=False)
    return root / "shards"


@pytest.mark.parametrize("source", ["synthetic", "dataloader", "shards"])
def test_exact_resume_single_process(tmp_path: Path, source: str, request: pytest.FixtureRequest) -> None:
    """4 steps straight == 2 steps, stop, resume, 2 more: weights, EMA, optimizer states, RNG
    and data position bit-identical. The shard loader resumes mid-epoch by skipping without
    decoding, with 2 workers."""

    def run(out: str, **overrides: Any):
        data = {"synthetic": lambda: None, "dataloader": plain_dataloader,
                "shards": lambda: shard_loader(request.getfixturevalue("shard_dir"), 4, rank=0, world_size=1,
                                               num_workers=2)}[source]()
        return train(train_config(tmp_path / out, **overrides), data=data)

    straight = run("straight")
    assert straight.step == 4
    half = run("resumed", max_steps=2)
    assert half.step == 2
    resumed = run("resumed")
    assert resumed.step == 4
    assert_same_training_state(straight.checkpoint, resumed.checkpoint)
    state = load_checkpoint(resumed.checkpoint)
    # 8 micro-batches of an epoch of 5: epoch 1, 3 taken.
    assert state["data_position"] == {"epoch": 1, "batch": 3} and state["epoch"] == 1
    assert not torch.equal(state["ema"]["encoder.blocks.0.attn.qkv.weight"],
                           state["model"]["encoder.blocks.0.attn.qkv.weight"])

    # The metrics log continues: the resumed run's rows equal the straight run's (but for speed).
    rows, reference = metric_rows(tmp_path / "resumed"), metric_rows(tmp_path / "straight")
    for row in rows + reference:
        del row["images_per_s"]
    assert rows == reference and [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # lr column: peak 1e-3 * 8 / 384 times the schedule factor of the step's 0-based index.
    schedule = LRSchedule(1, 2, 4, 0.5)
    for row in rows:
        assert float(row["lr"]) == pytest.approx(1e-3 * 8 / 384 * schedule(int(row["step"]) - 1), rel=1e-5)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["step"] == 4


def test_checkpoints_keep_last_and_hold_the_recipe_keys(tmp_path: Path) -> None:
    result = train(train_config(tmp_path, max_steps=4, checkpoint_every=1, keep_last=2))
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000003.pt", "step_00000004.pt"]
    state = load_checkpoint(result.checkpoint)
    assert {"model", "ema", "optimizer", "scheduler", "optimizer_muon", "scheduler_muon", "step", "epoch",
            "data_position", "rng", "config"} <= state.keys()
    assert state["config"]["world_size"] == 1


def test_the_model_at_max_steps_is_kept_and_returned_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """max_steps 2, then 4, then 2 again, then 3: the step-2 checkpoint outlives keep_last=1 and
    comes back unchanged with no training; 3 resumes from 2, the newest at or below it. The
    checkpoints and the export hold each run's segment."""
    live = tmp_path / "live" / "train"

    def run(max_steps: int, **overrides: Any):
        return train(train_config(tmp_path, max_steps=max_steps, checkpoint_every=1, keep_last=1,
                                  live_metrics=str(live), **overrides))

    two = run(2).checkpoint
    first_bytes, first_json = two.read_bytes(), live.with_suffix(".json").read_text()
    four = run(4, log_every=2).checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt", "step_00000004.pt"]
    assert milestones(tmp_path / "checkpoints") == {2, 4}
    capsys.readouterr()

    again = run(2)
    assert again.checkpoint == two and two.read_bytes() == first_bytes
    assert "nothing to train" in capsys.readouterr().err
    assert [int(line.split("\t")[0]) for line in live.with_suffix(".tsv").read_text().splitlines()[1:]] == [1, 2]
    assert live.with_suffix(".json").read_text() == first_json  # the row as logged, not as the table rounds it
    assert [int(r["step"]) for r in metric_rows(tmp_path)] == [1, 2, 4]  # the run folder keeps step 4's row

    run(3)
    assert re.search(r"resuming from \S+step_00000002\.pt at step 2", capsys.readouterr().err)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000002.pt", "step_00000003.pt", "step_00000004.pt"]

    history = load_checkpoint(four)["history"]
    assert [(s["from_step"], s["to_step"], s["world_size"], s["settings"]["log_every"]) for s in history] == [
        (0, 2, 1, 1), (2, 4, 1, 2)]
    assert all(s["settings"]["max_steps"] == m for s, m in zip(history, (2, 4)))
    assert all(isinstance(s["code_version"], str) and s["code_version"] for s in history)
    _, exported = export_ema(four, tmp_path / "export" / "ema.safetensors")
    assert json.loads(exported.read_text())["history"] == history


def test_a_checkpoint_whose_config_holds_the_retired_initial_cfg_scale_resumes(tmp_path: Path) -> None:
    """Checkpoints written before `initial_cfg_scale` left the config hold it in their saved
    config (and its copy as `current_best_cfg_scale`): they resume and continue as if unchanged."""
    straight = train(train_config(tmp_path / "straight"))
    half = train(train_config(tmp_path / "resumed", max_steps=2))
    old = load_checkpoint(half.checkpoint)
    old["config"]["initial_cfg_scale"] = 3.4
    old["current_best_cfg_scale"] = 3.4
    torch.save(old, half.checkpoint)

    resumed = train(train_config(tmp_path / "resumed"))
    assert resumed.step == 4
    assert_same_training_state(straight.checkpoint, resumed.checkpoint)
    assert "initial_cfg_scale" not in load_checkpoint(resumed.checkpoint)["config"]


def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resume='.*absent.pt': no such checkpoint"):
        train(train_config(tmp_path / "a", resume=str(tmp_path / "absent.pt")))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train(train_config(tmp_path / "a", resume=str(tmp_path)))
    train(train_config(tmp_path / "b", max_steps=1))
    with pytest.raises(ConfigError, match=r"base_lr: checkpoint 0.001, config 0.002"):
        train(train_config(tmp_path / "b", max_steps=2, base_lr=2e-3))
    # Settings that do not change the trajectory may differ.
    assert train(train_config(tmp_path / "b", max_steps=2, log_every=5, keep_last=1)).step == 2


def nan_batches(good: int, total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`good` finite batches of 4 tiny images, then NaN images (as from a corrupt record)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(total):
        images = torch.rand(4, 3, 16, 16, generator=generator)
        if index >= good:
            images[:] = float("nan")
        batches.append((images, torch.randint(0, 10, (4,), generator=generator)))
    return batches


def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    batches = nan_batches(good=2, total=4)
    run = dict(global_batch=4, max_steps=3)
    skipped = train(train_config(tmp_path / "skip", **run), data=batches)
    assert skipped.skipped_steps == 1
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())["skipped_steps"] == 1
    reference = train(train_config(tmp_path / "ref", **{**run, "max_steps": 2}), data=batches)
    # The skipped step changed no weight, EMA or optimizer state.
    a, b = load_checkpoint(skipped.checkpoint), load_checkpoint(reference.checkpoint)
    for key in ("model", "ema"):
        assert_identical(a[key], b[key], key)
    for key in ("optimizer", "optimizer_muon"):
        assert_identical(a[key]["state"], b[key]["state"], key)


def test_a_nonfinite_step_changes_no_state_bit_for_bit_and_reports_it_one_read_later(tmp_path: Path) -> None:
    """The skip is decided on the device: after a finite step, a step on NaN images leaves the
    parameters, EMA, AdamW and Muon states as they were, bit for bit; its values, read from the
    pending step, say that it was not applied and carry the stop request."""
    cfg = train_config(tmp_path, global_batch=4)
    torch.manual_seed(cfg.seed)
    engine = Engine(UNITE(cfg.model), cfg, init_runtime("cpu"), recipe_for(cfg, 1))
    batches = iter(nan_batches(good=1, total=2))
    first = engine.step(batches, lambda: False)
    before = copy.deepcopy(engine.state_dict())
    second = engine.step(batches, lambda: True)
    after = engine.state_dict()
    for key in ("model", "ema"):
        assert_identical(after[key], before[key], key)
    for key in ("optimizer", "optimizer_muon"):
        assert_identical(after[key]["state"], before[key]["state"], key)
    assert first.result().applied and not first.result().stop and math.isfinite(first.result().losses["loss"])
    assert not second.result().applied and second.result().stop and math.isnan(second.result().losses["loss"])


def test_nonfinite_streak_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = train_config(tmp_path, global_batch=4, max_steps=10, max_nonfinite=2, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps \(up to step 4\).*step_00000002.pt"):
        train(config, data=nan_batches(good=2, total=6))
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000001.pt", "step_00000002.pt"]
    assert metric_rows(tmp_path)[-1]["skipped_steps"] == "1"  # the row of step 3


def test_the_nonfinite_streak_stops_one_step_late_between_checkpoints(tmp_path: Path) -> None:
    """Without a checkpoint due, step 4's values are read once step 5 is queued: the error
    still names steps 3 and 4, no checkpoint was written, and step 3's row is the last."""
    config = train_config(tmp_path, global_batch=4, max_steps=10, max_nonfinite=2, checkpoint_every=100)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps \(up to step 4\).*checkpoint: None"):
        train(config, data=nan_batches(good=2, total=6))
    assert list_checkpoints(tmp_path / "checkpoints") == []
    last = metric_rows(tmp_path)[-1]
    assert (last["step"], last["skipped_steps"]) == ("3", "1")


class SignalDuringBatch:
    """Batches that send this process SIGTERM as batch `at` is drawn (during that step)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], at: int):
        self.items, self.at = batches, at

    def __iter__(self):
        for index, batch in enumerate(self.items):
            if index == self.at:
                signal.raise_signal(signal.SIGTERM)
            yield batch


def test_a_stop_requested_during_step_n_stops_after_step_n_plus_1(tmp_path: Path) -> None:
    """Step 2 carries the request (asked after its micro-batches); its values are read once step 3
    is queued, so the run stops after step 3, with its checkpoint and row."""
    data = SignalDuringBatch(nan_batches(good=5, total=5), at=1)
    with pytest.raises(Preempted, match=r"SIGTERM received; finished step 3, wrote .*step_00000003.pt"):
        train(train_config(tmp_path, global_batch=4, max_steps=5, checkpoint_every=100), data=data)
    [checkpoint] = list_checkpoints(tmp_path / "checkpoints")
    state = load_checkpoint(checkpoint)
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "batch": 3}
    assert [row["step"] for row in metric_rows(tmp_path)] == ["1", "2", "3"]


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGHUP] * 3], ids=["sigterm", "sighup-repeated"])
def test_a_stop_signal_finishes_the_step_checkpoints_and_resumes(tmp_path: Path, signals: list[int]) -> None:
    """SIGHUP is what a torchrun worker gets when its launcher dies, once per exiting launcher
    thread: repeats must not turn into an interrupt without a checkpoint."""
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(train_values(out, max_steps=1000, checkpoint_every=1000)))
    # SIGHUP at its default, not ignored as it is when the tests themselves run under nohup.
    child = subprocess.Popen([sys.executable, "-m", "unite.train", str(tmp_path / "c.yaml")],
                             env=child_env(), stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ((out / "metrics.tsv").is_file() and len(metric_rows(out)) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    for signum in signals:
        child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signals[0], err
    [checkpoint] = list_checkpoints(out / "checkpoints")
    stopped_at = load_checkpoint(checkpoint)["step"]
    assert f"{signals[0].name} received; finished step {stopped_at}, wrote {checkpoint}" in err
    assert "Run the same command again to resume" in err

    # Rerunning resumes from there; the result equals an uninterrupted run.
    resumed = train(train_config(out, max_steps=stopped_at + 1, checkpoint_every=1000))
    straight = train(train_config(tmp_path / "straight", max_steps=stopped_at + 1))
    assert resumed.step == stopped_at + 1
    assert_same_training_state(straight.checkpoint, resumed.checkpoint)


def test_a_sighup_ignored_by_nohup_stays_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert stop.received is None
    finally:
        signal.signal(signal.SIGHUP, previous)


# ------------------------------------------------------------------------------ live metrics, unreadable checkpoints
def read_rows(tsv: Path) -> list[dict[str, str]]:
    lines = tsv.read_text().splitlines()
    return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


def without_speed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def test_metrics_are_current_mid_run_and_a_resume_neither_repeats_nor_loses_rows(tmp_path: Path) -> None:
    """A training process killed outright (SIGKILL: no last checkpoint) has written one complete
    row per step so far to the live files; the rerun resumes from the checkpoint of step 3, logs
    the steps after it again, and ends with exactly the rows of an uninterrupted run."""
    out, live = tmp_path / "run", tmp_path / "live" / "train"
    train(train_config(out, max_steps=3, live_metrics=str(live)))
    # Resumed in a child process, which checkpoints no more before it is killed.
    values = train_values(out, max_steps=1000, checkpoint_every=1000, live_metrics=str(live))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    child = subprocess.Popen([sys.executable, "-m", "unite.train", str(tmp_path / "c.yaml")], env=child_env(),
                             stderr=subprocess.PIPE, text=True)
    tsv = live.with_name("train.tsv")
    deadline = time.monotonic() + 120
    while not (tsv.is_file() and len(read_rows(tsv)) >= 5):
        assert child.poll() is None and time.monotonic() < deadline, "training did not log 5 rows"
        time.sleep(0.02)
    child.kill()
    child.communicate(timeout=60)
    mid_run = read_rows(tsv)
    logged = len(mid_run)
    assert [int(row["step"]) for row in mid_run] == list(range(1, logged + 1))
    assert all(len(row) == len(mid_run[0]) and "" not in row.values() for row in mid_run)
    # The json follows the tsv; a kill between the two writes leaves it one row behind.
    latest = json.loads(live.with_name("train.json").read_text())
    assert latest["step"] in (logged - 1, logged) and latest["max_steps"] == 1000
    assert latest["loss"] == pytest.approx(float(mid_run[latest["step"] - 1]["loss"]), rel=1e-5)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003.pt"]

    end = logged + 2
    train(train_config(out, max_steps=end, live_metrics=str(live)))
    train(train_config(tmp_path / "straight", max_steps=end))
    resumed = read_rows(tsv)
    assert [int(row["step"]) for row in resumed] == list(range(1, end + 1))
    assert resumed[:3] == mid_run[:3]  # kept as written; the rows after step 3 were logged again
    assert without_speed(resumed) == without_speed(read_rows(tmp_path / "straight" / "metrics.tsv"))
    assert tsv.read_text() == (out / "metrics.tsv").read_text()
    assert json.loads(live.with_name("train.json").read_text())["step"] == end


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_latest_checkpoint_is_set_aside_and_the_one_before_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    train(train_config(out, max_steps=4, checkpoint_every=2))
    latest = out / "checkpoints" / "step_00000004.pt"
    truncate(latest)
    truncated = latest.read_bytes()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(train_values(out, max_steps=4, checkpoint_every=2)))
    capsys.readouterr()
    assert main([str(tmp_path / "c.yaml")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_00000004.pt cannot be read" in warnings[0]
    assert "moved it aside to step_00000004.pt.unreadable" in warnings[0]
    assert f"resuming from {out / 'checkpoints' / 'step_00000002.pt'} at step 2" in err
    # Set aside, not deleted; the rerun of steps 3-4 ends where an uninterrupted run ends.
    assert (out / "checkpoints" / "step_00000004.pt.unreadable").read_bytes() == truncated
    straight = train(train_config(tmp_path / "straight", max_steps=4))
    assert_same_training_state(straight.checkpoint, latest)


def test_no_readable_checkpoint_stops_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(train_config(out, max_steps=4, checkpoint_every=2))
    for path in list_checkpoints(out / "checkpoints"):
        truncate(path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(train_values(out, max_steps=6)))
    done = subprocess.run([sys.executable, "-m", "unite.train", str(tmp_path / "c.yaml")], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "warning" not in line]
    assert errors == [f"unite.train: none of the 2 checkpoints in {out / 'checkpoints'} can be read (moved aside "
                      "as *.unreadable); restore a good step_*.pt there to resume, or remove the folder to start "
                      "afresh"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "milestones.json", "step_00000002.pt.unreadable", "step_00000004.pt.unreadable"]
