"""Training with two gloo processes: exact resume (a torchrun launch of the CLI, resumed by
`train()` in two spawned processes) and gradient accumulation that all-reduces once per step.

One torchrun launch and one spawn of two workers serve all tests (process start-up dominates)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from test_train import assert_same_training_state, child_env, train_config, train_values
from unite.checkpoint import latest_checkpoint, load_checkpoint
from unite.distributed import Runtime
from unite.model import UNITE
from unite.train import (
    DataPosition,
    Engine,
    TensorBatches,
    build_schedule,
    micro_batches,
    synthetic_images,
    train,
)

# 2 processes x 2 images x 2 micro-batches = the global batch of 8 of the single-process tests.
TWO_RANKS = {"per_device_batch": 2}


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

    # Accumulation: 2 ranks x 2 images x 3 micro-batches = 12 images per optimizer step.
    _use_group(rank, ports[2])
    dist.init_process_group("gloo")
    try:
        cfg = train_config(root_path, per_device_batch=2, global_batch=12)
        torch.manual_seed(cfg.seed)
        engine = Engine(UNITE(cfg.model), cfg, Runtime(rank, 2, torch.device("cpu")),
                        build_schedule(cfg.schedule, 2, 2))
        calls = []

        def counting_allreduce(state, bucket):  # no annotations: DDP checks them at runtime
            calls.append(bucket.index())
            work = dist.all_reduce(bucket.buffer().div_(2), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        engine.model.register_comm_hook(None, counting_allreduce)
        source = TensorBatches(*synthetic_images(cfg.model, 24, 0), 2, rank, 2)
        batches = micro_batches(source, DataPosition(), 2)
        torch.manual_seed(rank)
        applied = [engine.step(batches, stop_requested=False).applied for _ in range(2)]
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
    mp.spawn(_worker, args=([_free_port() for _ in range(3)], str(root)), nprocs=2)
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
