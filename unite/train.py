"""Joint UNITE training on one process or many (torchrun DDP), with exact resume.

    python -m unite.train config.yaml                                  # one process
    torchrun --standalone --nproc-per-node 8 -m unite.train config.yaml  # one node
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m unite.train config.yaml  # many nodes

Each optimizer step runs the recipe's micro-batches on every rank (`recipe_for`: the global
batch split over the ranks in micro-batches of at most per_device_batch images; gradients are
all-reduced on the last one only), clips the total gradient norm, steps
Muon and AdamW and updates the EMA. Outputs in `out_dir`: `checkpoints/step_*.pt`,
`metrics.tsv` (one row per log interval) and `metrics.json` (the latest row), both rewritten
atomically at every row, and mirrored to `<live_metrics>.tsv/.json` when that key is set.

The model at `max_steps`, exactly: a run resumes from the newest checkpoint at or below
`max_steps`, and the checkpoint at `max_steps` is kept as a milestone (never pruned), so asking
again for an earlier `max_steps` returns that very checkpoint and trains nothing. A checkpoint
holds the run's history: one segment per run that wrote to it (steps from and to, world size,
the settings that may change on resume, code version).

Exact resume: a checkpoint holds the model, EMA, optimizers, schedulers, every rank's random
states and the data position (epoch, micro-batches consumed in it). The batch source must give
the same batches for the same (epoch, skip), e.g. by seeding its shuffle and augmentation from
(seed, epoch); the trainer keeps it from moving the global generators. A resumed run then
continues bit for bit.

Resume on another number of processes: the run keeps its optimizer step, global batch (the
micro-batch and accumulation are derived anew), learning-rate schedule in steps, and data
position as the images consumed in the epoch; each rank's random state is derived from
(seed, rank, step). Such a run continues the same training, but not bit for bit: that holds
for the same world size only.
A checkpoint that cannot be read is set aside (`*.pt.unreadable`) and the one before it used.

This module holds the loop, resume, signals and the command line; the config keys are in
unite/train_config.py, the batch sources in unite/batches.py, the optimizer step in
unite/train_step.py and the metrics files in unite/train_log.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from unite.batches import (
    BatchSource,
    DataPosition,
    as_batch_source,
    build_batch_source,
    carry_position,
    micro_batches,
)
from unite.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    exclusive_folder,
    latest_checkpoint,
    load_checkpoint,
    load_newest_readable,
    mark_milestone,
    restore_rng_state,
    save_checkpoint,
)
from unite.config import ConfigError
from unite.distributed import Runtime, close_runtime, init_runtime
from unite.model import UNITE
from unite.optim import LRSchedule
from unite.provenance import git_state
from unite.safe_load import UntrustedPickleError
from unite.train_config import RESUME_MAY_CHANGE, RETIRED_KEYS, Recipe, TrainConfig, load_config, recipe_for
from unite.train_log import LogWindow, MetricsLog
from unite.train_step import Engine, PendingStep


@dataclass(frozen=True)
class TrainResult:
    step: int
    checkpoint: Path | None
    skipped_steps: int


def train(cfg: TrainConfig, data: BatchSource | Iterable[tuple[Tensor, Tensor]] | None = None) -> TrainResult:
    """Train until `cfg.max_steps` optimizer steps, resuming from a checkpoint when there is one.

    `data` defaults to the config's `data:` section. Raises Preempted after SIGTERM/SIGINT/SIGHUP
    (checkpoint written), NonFiniteLossError after `max_nonfinite` skipped steps in a row,
    CheckpointError when no checkpoint to resume from can be read, TimeoutError when another
    run keeps the checkpoint folder locked, and ConfigError when the world size cannot split the
    global batch (`recipe_for`)."""
    owns_group = not dist.is_initialized()
    runtime = init_runtime(cfg.device)
    try:
        # A world size that cannot split the batch is refused before anything is written.
        recipe = recipe_for(cfg, runtime.world_size)
        # Rank 0 writes and prunes checkpoints: one run at a time may do so in a folder.
        with exclusive_folder(Path(cfg.out_dir) / "checkpoints") if runtime.is_main else nullcontext():
            return _train(cfg, runtime, recipe, data)
    finally:
        if owns_group:
            close_runtime()


def allow_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, as the reference sets it; nothing on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _train(cfg: TrainConfig, runtime: Runtime, recipe: Recipe, data: BatchSource | Iterable | None) -> TrainResult:
    rank, world = runtime.rank, runtime.world_size
    allow_tf32(cfg.tf32, runtime.device)
    out_dir = Path(cfg.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    # Rank 0 picks the checkpoint (setting unreadable ones aside) so that every rank resumes
    # from the same one.
    found = resolve_resume(cfg, checkpoint_dir) if runtime.is_main else None
    resume_from = [found[0] if found else None]
    if world > 1:
        dist.broadcast_object_list(resume_from, src=0)
    resume_from = resume_from[0]
    state = found[1] if found else load_checkpoint(resume_from) if resume_from else None

    saved_world, saved_batch = world, recipe.per_device_batch
    if state is not None:
        saved = state["config"]
        # The run's schedule in steps: the unite_b preset's may differ with the world size where
        # the sampler's padding adds a micro-batch to an epoch, and a run keeps the one it began with.
        recipe = dataclasses.replace(recipe, schedule=LRSchedule(**saved["lr_schedule_steps"]))
        # Checkpoints written before the micro-batch was derived ran micro-batches of per_device_batch.
        saved_world, saved_batch = saved["world_size"], saved.get("micro_batch", cfg.per_device_batch)
    resolved = {**cfg.to_dict(), "world_size": world, "micro_batch": recipe.per_device_batch,
                "lr_schedule_steps": dataclasses.asdict(recipe.schedule)}
    if state is not None:
        check_resume_config(state["config"], resolved, resume_from)
        if state["step"] == cfg.max_steps:
            return _reached(cfg, runtime, resume_from, state, checkpoint_dir)
    history = state.get("history", []) if state is not None else []
    segment = _segment(cfg, resolved, state["step"] if state is not None else 0) if runtime.is_main else {}
    source = build_batch_source(cfg, rank, world) if data is None else as_batch_source(data)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    engine = Engine(UNITE(cfg.model).to(runtime.device), cfg, runtime, recipe)
    step, skipped, streak, position = 0, 0, 0, DataPosition()
    reread = 0
    if state is None:
        seed_everything(rank_seed(cfg.seed, rank))
    else:
        engine.load_state_dict(state)
        step, skipped, streak = state["step"], state["skipped_steps"], state["nonfinite_streak"]
        if saved_world == world:
            position = DataPosition(**state["data_position"])
            restore_rng_state(state["rng"][rank])
        else:
            position, reread = carry_position(state["data_position"], saved_world, saved_batch, world,
                                              recipe.per_device_batch)
            seed_everything(rank_seed(cfg.seed, rank, resumed_at=step))
        del state, found  # the checkpoint's tensors are in the engine now
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        start = f"resuming from {resume_from} at step {step}" if resume_from else "starting from scratch"
        print(f"unite.train: {start}; {world} process(es), {engine.accum} micro-batch(es) of "
              f"{recipe.per_device_batch} per step, peak lr {engine.peak_lr:.4g}", file=sys.stderr)
        if saved_world != world:
            print(f"unite.train: the checkpoint was written by {saved_world} process(es), this run has {world}: "
                  f"global batch {cfg.global_batch}, learning-rate schedule and data position (epoch "
                  f"{position.epoch}, {position.batch * recipe.per_device_batch * world + reread} images in) carry "
                  f"over{f', {reread} of them read again' if reread else ''}; random states are drawn afresh, "
                  f"so the run continues but not bit for bit (that holds for the same number of processes "
                  f"only)", file=sys.stderr)
    metrics = MetricsLog(out_dir, step, cfg.max_steps, cfg.live_metrics) if runtime.is_main else None

    def write_checkpoint() -> Path:
        rng = [capture_rng_state()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, capture_rng_state())
        if runtime.is_main:
            state = {**engine.state_dict(), "step": step, "epoch": position.epoch,
                     "data_position": dataclasses.asdict(position), "rng": rng,
                     "skipped_steps": skipped, "nonfinite_streak": streak, "config": resolved,
                     "history": [*history, {**segment, "to_step": step}],
                     "metrics_row": metrics.latest if metrics.latest and metrics.latest["step"] == step else None}
            save_checkpoint(state, checkpoint_dir, step, cfg.keep_last, milestone=step == cfg.max_steps)
        if world > 1:
            dist.barrier()
        return checkpoint_path(checkpoint_dir, step)

    batches = micro_batches(source, position, recipe.per_device_batch)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (runtime.is_main and cfg.progress),
               dynamic_ncols=True, desc="train")
    window = LogWindow(step)
    last_checkpoint = resume_from

    def settle(done: int, epoch: int, pending: PendingStep, stopping: bool, newest: bool) -> bool:
        """Acts on the values of step `done` (read after the next step was queued, or, `newest`,
        at a checkpoint or the end with no later step queued): the skip count and non-finite
        streak, and the metrics row; the row is due also when the run stops after this step
        (`stopping`, or the newest step's own stop request: a step read late is not the last,
        the run stops after the next one). Returns the stop request."""
        nonlocal skipped, streak, window
        result = pending.result()
        if result.applied:
            streak = 0
            window.add(result)
        else:
            skipped, streak = skipped + 1, streak + 1
            if runtime.is_main:
                bar.write(f"unite.train: step {done}: non-finite loss or gradient norm, update skipped "
                          f"({streak} in a row, {skipped} in all)", file=sys.stderr)
            if streak >= cfg.max_nonfinite:
                kept = latest_checkpoint(checkpoint_dir)
                raise NonFiniteLossError(
                    f"{streak} consecutive steps (up to step {done}) had a non-finite loss or gradient "
                    f"norm (max_nonfinite={cfg.max_nonfinite}); training stopped. Last good "
                    f"checkpoint: {kept}"
                )
        if runtime.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps or stopping
                                or (newest and result.stop)):
            elapsed = time.perf_counter() - window.start
            row = {"step": done, "epoch": epoch, **window.means(), "lr": engine.lr_at(done - 1),
                   "images_per_s": (done - window.first_step) * cfg.global_batch / elapsed,
                   "skipped_steps": skipped}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", recon=f"{row['recon']:.4f}",
                            flow=f"{row['flow']:.4f}", lr=f"{row['lr']:.3g}",
                            img_s=f"{row['images_per_s']:.1f}")
            window = LogWindow(done)
        return result.stop

    # A step's values are read once the next step is queued, so the host never waits for the
    # device mid-run; the skip streak, rows and stop requests act one step late. Before a
    # checkpoint, at the end and on a stop, the last step's values are read too (the checkpoint
    # holds the counters of its own step).
    with StopSignal() as stop_signal:
        pending: tuple[int, int, PendingStep] | None = None  # (step, epoch, values): queued, unread
        stop = False
        while step < cfg.max_steps:
            queued = engine.step(batches, lambda: stop_signal.received is not None)
            step += 1
            bar.update(1)
            if pending is not None:
                stop = settle(*pending, stopping=False, newest=False)
            pending = (step, position.epoch, queued)
            if stop or step == cfg.max_steps or step % cfg.checkpoint_every == 0:
                stop = settle(*pending, stopping=stop, newest=True) or stop
                pending = None
                if stop or step == cfg.max_steps or (step % cfg.checkpoint_every == 0 and streak == 0):
                    last_checkpoint = write_checkpoint()
            if stop:
                bar.close()
                signum = stop_signal.received or signal.SIGTERM
                raise Preempted(
                    f"unite.train: {signal.Signals(signum).name} received; finished step {step}, wrote "
                    f"{last_checkpoint}. Run the same command again to resume.", signum
                )
    bar.close()
    return TrainResult(step, last_checkpoint, skipped)


# ------------------------------------------------------------------------------ resume
def resolve_resume(cfg: TrainConfig, checkpoint_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents: `resume: auto` takes the newest readable
    one at or below max_steps in out_dir (None: fresh start); a file or folder given explicitly
    must exist and hold such a checkpoint. In a folder, newer checkpoints that cannot be read are
    set aside with a warning."""

    def warn(line: str) -> None:
        print(f"unite.train: warning: {line}", file=sys.stderr)

    if cfg.resume == "auto":
        return load_newest_readable(checkpoint_dir, warn, cfg.max_steps)
    path = Path(cfg.resume)
    if path.is_dir():
        found = load_newest_readable(path, warn, cfg.max_steps)
        if found is None:
            raise FileNotFoundError(
                f"resume={cfg.resume!r}: the folder holds no complete checkpoint (step_*.pt) at or below "
                f"max_steps={cfg.max_steps}"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint file or folder")
    try:
        state = load_checkpoint(path)
    except ValueError as error:
        raise CheckpointError(f"resume={cfg.resume!r}: {error}") from None
    if state["step"] > cfg.max_steps:
        raise ConfigError(f"resume={cfg.resume!r}: the checkpoint is at step {state['step']}, beyond "
                          f"max_steps={cfg.max_steps}; resume from an earlier checkpoint or raise max_steps")
    return path, state


# Keys a segment leaves out of its settings: paths and display, nothing of what a run trains; the
# world size has a field of its own.
_UNRECORDED = frozenset({"out_dir", "live_metrics", "resume", "progress", "world_size"})


def _segment(cfg: TrainConfig, resolved: dict[str, Any], start: int) -> dict[str, Any]:
    """This run's entry in the checkpoint's history ("to_step" is added at each checkpoint): what
    may differ between the runs that wrote one model, so that a result can be traced to them."""
    settings = {key: resolved[key] for key in sorted(RESUME_MAY_CHANGE - _UNRECORDED) if key in resolved}
    if "num_workers" in cfg.data.get("options", {}):
        settings["num_workers"] = cfg.data["options"]["num_workers"]
    return {"from_step": start, "world_size": resolved["world_size"], "settings": settings,
            "code_version": git_state(), "torch": str(torch.__version__)}


def _reached(cfg: TrainConfig, runtime: Runtime, checkpoint: Path, state: dict[str, Any],
             checkpoint_dir: Path) -> TrainResult:
    """The checkpoint at max_steps exists: it is the model asked for, so nothing is trained. The
    live metrics show the rows up to this step; the run folder keeps its later rows."""
    if runtime.is_main:
        if checkpoint.parent == checkpoint_dir:
            mark_milestone(checkpoint_dir, cfg.max_steps)
        MetricsLog(Path(cfg.out_dir), cfg.max_steps, cfg.max_steps, cfg.live_metrics, live_only=True,
                   row=state.get("metrics_row"))
        print(f"unite.train: {checkpoint} is the model at max_steps={cfg.max_steps}: nothing to train",
              file=sys.stderr)
    return TrainResult(cfg.max_steps, checkpoint, state["skipped_steps"])


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only a run with the same settings (apart from RESUME_MAY_CHANGE);
    keys of earlier versions' configs (RETIRED_KEYS) are not compared."""
    keys = sorted((saved.keys() | current.keys()) - RESUME_MAY_CHANGE - RETIRED_KEYS)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"resume: checkpoint {path} was written by a different config:\n  " + "\n  ".join(diffs)
        )


# ------------------------------------------------------------------------------ processes
def rank_seed(seed: int, rank: int, resumed_at: int | None = None) -> int:
    """A distinct, reproducible training seed per rank (noise draws differ across ranks). A run
    resumed on another world size at step `resumed_at` cannot reuse the saved per-rank states,
    so its ranks draw from (seed, rank, step) instead."""
    entropy = [seed, rank] if resumed_at is None else [seed, rank, resumed_at]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignal:
    """Turns SIGTERM/SIGINT, and SIGHUP (the torchrun launcher died, or the terminal closed) into
    a request to stop: the step being queued carries it, and as its values are read after the
    next step is queued, the run stops (with a checkpoint) after that next step. A second SIGTERM/SIGINT interrupts at once; SIGHUP
    never does, as a dying launcher may send it several times. A SIGHUP ignored by the caller
    (nohup) stays ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        elif signum != signal.SIGHUP:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT/SIGHUP after writing a checkpoint; rerunning resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


# ------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unite.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config, YAML or JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        result = train(cfg)
    except (ConfigError, FileNotFoundError, UntrustedPickleError) as error:
        print(f"unite.train: error: {error}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        return 128 + stopped.signum
    except (NonFiniteLossError, CheckpointError, TimeoutError) as error:
        print(f"unite.train: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"unite.train: done at step {result.step}; checkpoint {result.checkpoint}; "
              f"{result.skipped_steps} skipped step(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
