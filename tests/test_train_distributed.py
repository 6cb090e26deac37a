"""Training with two gloo processes: exact resume (a torchrun launch of the CLI, resumed by
`train()` in two spawned processes), resume on another number of processes (2 -> 1, 1 -> 2) and
gradient accumulation that all-reduces once per step.

One torchrun launch and one spawn of two workers serve all tests (process start-up dominates)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from test_train import (
    assert_same_training_state,
    child_env,
    metric_rows,
    train_config,
    train_values,
    without_speed,
)
from unite.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from unite.distributed import Runtime
from unite.model import UNITE
from unite.batches import DataPosition, TensorBatches, micro_batches, synthetic_images
from unite.train import main, train
from unite.train_config import recipe_for
from unite.train_step import Engine

# 2 processes x 2 images x 2 micro-batches = the global batch of 8 of the single-process tests.
TWO_RANKS = {"per_device_batch": 2}

# Resume on another world size: a global batch of 8 in micro-batches of at most 8, so one
# micro-batch of 8 / world images per step (8 on 1 rank, 4 on 2: the micro-batch changes with
# the world size), 27 images (epochs of the 24 that fill whole micro-batches), and the UNITE-B
# preset, whose schedule in steps differs with the world size through the sampler's padding:
# warmup over 20 epochs of floor(ceil(27 / world) / (8 / (2 x world))) micro-batches (6 on 1, 7 on 2).
# A base learning rate high enough that the loss falls within the 8 steps of warmup (lr up to
# 30 x 8 / 384 x 7 / 120 = 0.036): only then can the loss show that the resumed run learned on.
BASE_LR = 30.0
RESIZED = {"per_device_batch": 8, "data": {"kind": "synthetic", "num_images": 27}, "base_lr": BASE_LR,
           "schedule": {"preset": "unite_b", "images_per_epoch": 27}}


def micro_batch(world: int) -> int:
    return 8 // world


def schedule_steps(world: int) -> dict[str, float]:
    epoch = math.ceil(27 / world) // (8 // (2 * world))
    return {"warmup_steps": 20 * epoch, "hold_until_step": 30 * epoch, "decay_until_step": 50 * epoch,
            "final_lr_factor": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_group(rank: int, port: int) -> None:
    """The environment torchrun would give rank `rank` of 2 (a fresh port per process group)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")


def _worker(rank: int, ports: list[int], root: str) -> None:
    torch.set_num_threads(1)
    root_path = Path(root)
    # Train 4 steps straight, and resume the 2-step torchrun run to 4 steps.
    _use_group(rank, ports[0])
    train(train_config(root_path / "straight", **TWO_RANKS))
    _use_group(rank, ports[1])
    train(train_config(root_path / "resumed", **TWO_RANKS))

    # World-size changes: 4 steps on 2 ranks (resumed on 1 by the test), the 4-step run of one
    # process resumed on 2 ranks to 8, and 8 steps straight on 2 ranks.
    _use_group(rank, ports[3])
    train(train_config(root_path / "two-then-one", max_steps=4, **RESIZED))
    _use_group(rank, ports[4])
    train(train_config(root_path / "one-then-two", max_steps=8, **RESIZED))
    _use_group(rank, ports[5])
    train(train_config(root_path / "two-straight", max_steps=8, **RESIZED))

    # Accumulation: 2 ranks x 2 images x 3 micro-batches = 12 images per optimizer step.
    _use_group(rank, ports[2])
    dist.init_process_group("gloo")
    try:
        cfg = train_config(root_path, per_device_batch=2, global_batch=12)
        torch.manual_seed(cfg.seed)
        engine = Engine(UNITE(cfg.model), cfg, Runtime(rank, 2, torch.device("cpu")), recipe_for(cfg, 2))
        calls = []

        def counting_allreduce(state, bucket):  # no annotations: DDP checks them at runtime
            calls.append(bucket.index())
            work = dist.all_reduce(bucket.buffer().div_(2), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        engine.model.register_comm_hook(None, counting_allreduce)
        source = TensorBatches(*synthetic_images(cfg.model, 24, 0), 2, rank, 2)
        batches = micro_batches(source, DataPosition(), 2)
        torch.manual_seed(rank)
        applied = [engine.step(batches, stop_requested=lambda: False).result().applied for _ in range(2)]
        flat = torch.cat([p.detach().flatten() for p in engine.params])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        report = {"accum": engine.accum, "applied": applied, "hook_calls": calls,
                  "same_weights": torch.equal(gathered[0], gathered[1])}
        (root_path / f"accumulation-rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    config = root / "half.yaml"
    config.write_text(yaml.safe_dump(train_values(root / "resumed", max_steps=2, **TWO_RANKS)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "unite.train", str(config)]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "done at step 2" in done.stderr
    train(train_config(root / "one-then-two", max_steps=4, **RESIZED))
    mp.spawn(_worker, args=([_free_port() for _ in range(6)], str(root)), nprocs=2)
    return root


def test_exact_resume_two_gloo_processes(two_process_runs: Path) -> None:
    straight = latest_checkpoint(two_process_runs / "straight" / "checkpoints")
    resumed = latest_checkpoint(two_process_runs / "resumed" / "checkpoints")
    assert straight.name == resumed.name == "step_00000004.pt"
    assert_same_training_state(straight, resumed)
    state = load_checkpoint(resumed)
    assert state["config"]["world_size"] == 2
    # 20 images over 2 ranks: epochs of 5 micro-batches of 2 per rank; 8 taken.
    assert state["data_position"] == {"epoch": 1, "batch": 3}
    rank0, rank1 = state["rng"]
    assert not torch.equal(rank0["torch"], rank1["torch"])  # the ranks draw different noise


def test_accumulation_all_reduces_once_per_step(two_process_runs: Path) -> None:
    for rank in (0, 1):
        report = json.loads((two_process_runs / f"accumulation-rank{rank}.json").read_text())
        assert report["accum"] == 3 and report["applied"] == [True, True]
        # The tiny model fits one gradient bucket: one all-reduce per optimizer step, none on
        # the two accumulation micro-batches before it.
        assert report["hook_calls"] == [0, 0]
        # The ranks drew different noise yet hold the same weights after the synchronised steps.
        assert report["same_weights"]


def assert_resized_run(out_dir: Path, first_world: int, straight_dirs: list[Path]) -> None:
    """8 steps of 8 images, the first 4 on `first_world` processes and the rest on the other
    number, continue like an uninterrupted run on either."""
    last = load_checkpoint(latest_checkpoint(out_dir / "checkpoints"))
    world = 3 - first_world
    assert last["step"] == 8 and last["config"]["world_size"] == world
    # 64 images are 2 epochs of 24 and 16 images into the third, on any number of processes.
    position = last["data_position"]
    assert last["config"]["micro_batch"] == micro_batch(world)
    assert position["epoch"] == 2 and position["batch"] * micro_batch(world) * world == 16
    # The schedule in steps is the first part's; the lr column follows it through the resume.
    assert schedule_steps(1) != schedule_steps(2)
    assert last["config"]["lr_schedule_steps"] == schedule_steps(first_world)
    rows = metric_rows(out_dir)
    assert [int(row["step"]) for row in rows] == list(range(1, 9))
    warmup = schedule_steps(first_world)["warmup_steps"]
    for row in rows:
        assert float(row["lr"]) == pytest.approx(BASE_LR * 8 / 384 * (int(row["step"]) - 1) / warmup, rel=1e-5)
    # The loss carries on down the curve: each uninterrupted run learns (its loss over steps 5 to 8
    # is below its first step's, the loss of the initial weights), and after the resume the loss is
    # nearer theirs over the same steps than that initial loss, where a run that lost the weights
    # would start again.
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    resumed = mean([float(row["loss"]) for row in rows[4:]])
    for straight in straight_dirs:
        reference = [float(row["loss"]) for row in metric_rows(straight)]
        assert mean(reference[4:]) < reference[0], reference
        assert abs(resumed - mean(reference[4:])) < abs(resumed - reference[0]), (resumed, reference)


def test_resume_on_one_process_continues_a_two_process_run(
    two_process_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("a", "b"):
        shutil.copytree(two_process_runs / "two-then-one", tmp_path / name)
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump(train_values(tmp_path / "a", max_steps=8, **RESIZED)))
    assert main([str(config)]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "at step 4; 1 process(es), 1 micro-batch(es) of 8 per step" in err
    assert ("the checkpoint was written by 2 process(es), this run has 1: global batch 8, learning-rate schedule "
            "and data position (epoch 1, 8 images in) carry over") in err
    assert "not bit for bit (that holds for the same number of processes only)" in err
    # The new rank's random state is derived from (seed, rank, step): a second resume of the same
    # checkpoint ends bit for bit where the first did.
    train(train_config(tmp_path / "b", max_steps=8, **RESIZED))
    assert_same_training_state(latest_checkpoint(tmp_path / "a" / "checkpoints"),
                               latest_checkpoint(tmp_path / "b" / "checkpoints"))
    train(train_config(tmp_path / "one-straight", max_steps=8, **RESIZED))
    assert_resized_run(tmp_path / "a", 2, [tmp_path / "one-straight", two_process_runs / "two-straight"])
    first_part = without_speed(metric_rows(two_process_runs / "two-then-one"))
    assert without_speed(metric_rows(tmp_path / "a"))[:4] == first_part


def test_resume_on_two_processes_continues_a_one_process_run(two_process_runs: Path, tmp_path: Path) -> None:
    train(train_config(tmp_path / "one-straight", max_steps=8, **RESIZED))
    straight = [tmp_path / "one-straight", two_process_runs / "two-straight"]
    assert_resized_run(two_process_runs / "one-then-two", 1, straight)
    assert [p.name for p in list_checkpoints(two_process_runs / "one-then-two" / "checkpoints")] == [
        "step_00000004.pt", "step_00000008.pt"]
