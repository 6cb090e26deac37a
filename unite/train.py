"""Joint UNITE training on one process or many (torchrun DDP), with exact resume.

    python -m unite.train config.yaml                                  # one process
    torchrun --standalone --nproc-per-node 8 -m unite.train config.yaml  # one node
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m unite.train config.yaml  # many nodes

Each optimizer step runs `global_batch / (per_device_batch * world_size)` micro-batches per
rank (gradients are all-reduced on the last one only), clips the total gradient norm, steps
Muon and AdamW and updates the EMA. Outputs in `out_dir`: `checkpoints/step_*.pt`,
`metrics.tsv` (one row per log interval) and `metrics.json` (the latest row), both rewritten
atomically at every row, and mirrored to `<live_metrics>.tsv/.json` when that key is set.

Exact resume: a checkpoint holds the model, EMA, optimizers, schedulers, every rank's random
states and the data position (epoch, micro-batches consumed in it). The batch source must give
the same batches for the same (epoch, skip), e.g. by seeding its shuffle and augmentation from
(seed, epoch); the trainer keeps it from moving the global generators. A resumed run then
continues bit for bit.

Resume on another number of processes: the run keeps its optimizer step, global batch (the
accumulation is recomputed), learning-rate schedule in steps, and data position as the images
consumed in the epoch; each rank's random state is derived from (seed, rank, step). Such a run
continues the same training, but not bit for bit: that holds for the same world size only.
A checkpoint that cannot be read is set aside (`*.pt.unreadable`) and the one before it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unite.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    exclusive_folder,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    CheckpointError,
    load_newest_readable,
    save_checkpoint,
)
from unite.config import ConfigError, ModelConfig, model_config
from unite.distributed import Runtime, close_runtime, init_runtime
from unite.model import UNITE
from unite.optim import (
    EMA,
    FROZEN_PREFIX,
    LRSchedule,
    NS_DTYPES,
    build_optimizers,
    newton_schulz_dtype,
    scaled_lr,
    trained_parameters,
    unite_b_schedule,
)
from unite.options import has_type
from unite.safe_load import UntrustedPickleError

# Quirk kept from the reference: this parameter exists but is never used, so it never gets a
# gradient; DDP is told to ignore it (otherwise its reducer waits for that gradient forever).
UNUSED_PARAMETERS = ("encoder.time_embed.special_time_emb",)

LOSS_PARTS = ("loss", "recon", "l1", "lpips", "flow")
METRIC_COLUMNS = ("step", "epoch", *LOSS_PARTS, "lr", "grad_norm", "images_per_s", "skipped_steps")

# Keys that may differ between a checkpoint's config and the config that resumes it. A resume
# on another world size keeps the checkpoint's schedule in steps (`lr_schedule_steps`).
RESUME_MAY_CHANGE = frozenset(
    {"out_dir", "max_steps", "log_every", "checkpoint_every", "keep_last", "max_nonfinite",
     "resume", "progress", "compile_decoder", "live_metrics", "world_size", "lr_schedule_steps",
     "muon_dtype", "tf32"}
)


# ------------------------------------------------------------------------------ configuration
_SCALAR_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults follow the UNITE-B recipe."""

    model: ModelConfig
    data: dict[str, Any]  # {"kind": "synthetic", ...} or {"kind": "python", "source": "mod:fn", ...}
    out_dir: str
    max_steps: int  # optimizer steps
    global_batch: int = 1024  # images per optimizer step, all ranks and micro-batches together
    per_device_batch: int = 64  # images per micro-batch on one rank
    base_lr: float = 1e-4  # at a global batch of 384, scaled linearly
    schedule: dict[str, Any] = field(
        default_factory=lambda: {"preset": "unite_b", "images_per_epoch": 1_281_167}
    )
    grad_clip: float = 3.0  # total gradient norm
    ema_decay: float = 0.9978  # per optimizer step
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cuda or cpu
    bf16: bool = True  # bf16 autocast on CUDA; CPU always runs float32
    tf32: bool = True  # TF32 matmuls and cuDNN convolutions on CUDA, as the reference allows
    muon_dtype: str = "auto"  # Muon's Newton-Schulz: auto (bf16 where native), bfloat16 or float32
    compile_decoder: bool = False  # torch.compile the pixel decoder
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_last: int = 3
    max_nonfinite: int = 10  # consecutive skipped steps (non-finite loss or grad norm) before stopping
    resume: str = "auto"  # auto: latest checkpoint in out_dir if any; or a checkpoint file or folder
    progress: bool = True
    live_metrics: str = ""  # path stem: also keep <stem>.tsv and <stem>.json current ("": only out_dir's)
    initial_cfg_scale: float = 3.4  # the adaptive CFG search's starting point, kept in checkpoints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Validate a config mapping; every error names the key, the value and the rule."""
        if not isinstance(values, dict):
            raise ConfigError(f"config: expected a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        for key in ("model", "data", "out_dir", "max_steps"):
            if key not in values:
                raise ConfigError(f"{key}: required key is missing")
        kwargs = dict(values)
        kwargs["model"] = _model_config(values["model"])
        kwargs["data"] = _check_data(values["data"])
        for spec in dataclasses.fields(cls):
            if spec.name in kwargs and spec.type in _SCALAR_TYPES:
                _check_type(spec.name, kwargs[spec.name], _SCALAR_TYPES[spec.type])
        config = cls(**kwargs)
        for key in ("max_steps", "global_batch", "per_device_batch", "log_every", "checkpoint_every",
                    "keep_last", "max_nonfinite"):
            if getattr(config, key) <= 0:
                raise ConfigError(f"{key}={getattr(config, key)}: must be a positive integer")
        for key in ("base_lr", "grad_clip", "initial_cfg_scale"):
            if not getattr(config, key) > 0:
                raise ConfigError(f"{key}={getattr(config, key)}: must be > 0")
        if not 0.0 <= config.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={config.ema_decay}: must lie in [0, 1)")
        if config.muon_dtype not in ("auto", *NS_DTYPES):
            raise ConfigError(f"muon_dtype={config.muon_dtype!r}: must be one of auto, {', '.join(NS_DTYPES)}")
        if config.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={config.device!r}: must be one of auto, cpu, cuda")
        if config.global_batch % config.per_device_batch:
            raise ConfigError(
                f"global_batch={config.global_batch}: must be a multiple of "
                f"per_device_batch={config.per_device_batch}"
            )
        build_schedule(config.schedule, config.per_device_batch, 1)  # validates the section
        return config


def _check_type(key: str, value: Any, expected: type) -> None:
    if not has_type(value, expected):
        raise ConfigError(f"{key}={value!r}: must be of type {expected.__name__}")


def _model_config(section: Any) -> ModelConfig:
    """`model:` holds named sizes (`encoder`, `decoder`, default B) plus any ModelConfig field."""
    if not isinstance(section, dict):
        raise ConfigError(f"model={section!r}: must be a mapping (encoder, decoder, field overrides)")
    fields = dict(section)
    try:
        return model_config(fields.pop("encoder", "B"), fields.pop("decoder", "B"), **fields)
    except ConfigError as error:
        raise ConfigError(f"model: {error}") from None


def _check_data(section: Any) -> dict[str, Any]:
    allowed = {"synthetic": {"kind", "num_images", "seed"}, "python": {"kind", "source", "options"}}
    kind = section.get("kind") if isinstance(section, dict) else None
    if kind not in allowed:
        raise ConfigError(f"data.kind={kind!r}: must be one of {sorted(allowed)}")
    unknown = sorted(set(section) - allowed[kind])
    if unknown:
        raise ConfigError(f"data: unknown keys {unknown} for kind {kind}; known: {sorted(allowed[kind])}")
    if kind == "synthetic":
        if not isinstance(section.get("num_images"), int) or section["num_images"] <= 0:
            raise ConfigError(f"data.num_images={section.get('num_images')!r}: must be a positive integer")
        _check_type("data.seed", section.get("seed", 0), int)
    else:
        source = section.get("source")
        if not isinstance(source, str) or source.count(":") != 1:
            raise ConfigError(f"data.source={source!r}: must be 'module:function'")
        if not isinstance(section.get("options", {}), dict):
            raise ConfigError(f"data.options={section['options']!r}: must be a mapping")
    return dict(section)


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML or JSON config file (by its suffix) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return TrainConfig.from_dict(values)


def build_schedule(section: dict[str, Any], per_device_batch: int, world_size: int) -> LRSchedule:
    """`schedule:` is either {preset: unite_b, images_per_epoch: N} or the four LRSchedule
    fields in optimizer steps (warmup_steps, hold_until_step, decay_until_step, final_lr_factor)."""
    if not isinstance(section, dict):
        raise ConfigError(f"schedule={section!r}: must be a mapping")
    if "preset" in section:
        if section["preset"] != "unite_b" or set(section) != {"preset", "images_per_epoch"}:
            raise ConfigError(
                f"schedule={section}: a preset takes exactly {{preset: unite_b, images_per_epoch: N}}"
            )
        images = section["images_per_epoch"]
        if not isinstance(images, int) or images <= 0:
            raise ConfigError(f"schedule.images_per_epoch={images!r}: must be a positive integer")
        try:
            return unite_b_schedule(images, per_device_batch, world_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    names = [f.name for f in dataclasses.fields(LRSchedule)]
    if set(section) != set(names):
        raise ConfigError(f"schedule={section}: needs exactly the keys {names} (or a preset)")
    for name in names[:3]:
        _check_type(f"schedule.{name}", section[name], int)
    _check_type("schedule.final_lr_factor", section["final_lr_factor"], float)
    try:
        return LRSchedule(**section)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank."""
    if global_batch % (per_device_batch * world_size):
        raise ConfigError(
            f"global_batch={global_batch}: must be a multiple of per_device_batch={per_device_batch} "
            f"x world_size={world_size} = {per_device_batch * world_size}, so that every rank runs "
            "a whole number of accumulation micro-batches"
        )
    return global_batch // (per_device_batch * world_size)


# ------------------------------------------------------------------------------ data
@runtime_checkable
class BatchSource(Protocol):
    def batches(self, epoch: int, skip: int) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's micro-batches (images (B,3,S,S): float in [0,1] or uint8, int64 labels
        (B,)) of `epoch`, leaving out its first `skip`; the same (epoch, skip) must give the same
        batches."""
        ...


class IterableSource:
    """Any re-iterable of batches (a list, a DataLoader) as a BatchSource: every epoch iterates
    it again (calling its `set_epoch(epoch)` first when it has one) and skips by discarding, so a
    resume mid-epoch reads the skipped batches once more."""

    def __init__(self, iterable: Iterable[tuple[Tensor, Tensor]]):
        self.iterable = iterable

    def batches(self, epoch: int, skip: int) -> Iterable[tuple[Tensor, Tensor]]:
        if hasattr(self.iterable, "set_epoch"):
            self.iterable.set_epoch(epoch)
        return itertools.islice(self.iterable, skip, None)


class TensorBatches:
    """An in-memory dataset as a BatchSource: a fresh order each epoch from (seed, epoch), split
    across ranks, full batches only (the same number on every rank)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        if len(self) == 0:
            raise ValueError(
                f"{len(images)} images cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def __len__(self) -> int:
        return len(self.images) // self.world_size // self.batch_size

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        mine = torch.from_numpy(order[self.rank :: self.world_size][: len(self) * self.batch_size])
        for index in mine.view(len(self), self.batch_size)[skip:]:
            yield self.images[index], self.labels[index]


def synthetic_images(cfg: ModelConfig, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random images in [0, 1] and labels, for smoke runs and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, cfg.image_size, cfg.image_size, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (num_images,), generator=generator)
    return images, labels


def build_batch_source(cfg: TrainConfig, rank: int, world_size: int) -> BatchSource:
    """The config's `data:` section as a BatchSource. kind "python" calls
    `source(batch_size=per_device_batch, rank=, world_size=, seed=, **options)`, which returns a
    BatchSource or a re-iterable of batches with `set_epoch` (e.g. unite.data.loaders:shard_loader
    with options {shard_dir: ...})."""
    data = cfg.data
    if data["kind"] == "synthetic":
        images, labels = synthetic_images(cfg.model, data["num_images"], data.get("seed", 0))
        return TensorBatches(images, labels, cfg.per_device_batch, rank, world_size, cfg.seed)
    module_name, attribute = data["source"].split(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    source = factory(batch_size=cfg.per_device_batch, rank=rank, world_size=world_size,
                     seed=cfg.seed, **data.get("options", {}))
    return as_batch_source(source)


def as_batch_source(data: BatchSource | Iterable[tuple[Tensor, Tensor]]) -> BatchSource:
    return data if isinstance(data, BatchSource) else IterableSource(data)


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` this rank has consumed


def carry_position(saved: dict[str, int], saved_world: int, world: int, batch_size: int) -> tuple[DataPosition, int]:
    """A checkpoint's data position for `world` ranks: the images consumed in the epoch
    (micro-batches x batch_size x saved_world) in whole micro-batch rounds of the new world size,
    and how many of those images are read again because they do not fill a round."""
    images = saved["batch"] * batch_size * saved_world
    batch, reread = divmod(images, batch_size * world)
    return DataPosition(saved["epoch"], batch), reread


def micro_batches(
    source: BatchSource, position: DataPosition, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless micro-batches from `position` on, advancing it as they are taken. A batch is any
    sequence that starts with images and labels (extra fields such as sample keys are dropped)."""
    while True:
        with global_rng_untouched():
            epoch_batches = iter(source.batches(position.epoch, position.batch))
        while True:
            with global_rng_untouched():
                batch = next(epoch_batches, None)
            if batch is None:
                break
            images, labels = batch[0], batch[1]
            if images.shape[0] != batch_size or labels.shape != (batch_size,):
                raise ValueError(
                    f"batch {position.batch} of epoch {position.epoch}: got images {tuple(images.shape)} "
                    f"and labels {tuple(labels.shape)}; every micro-batch must hold per_device_batch="
                    f"{batch_size} images (drop the last partial batch)"
                )
            position.batch += 1
            yield images, labels
        if position.batch == 0:
            raise ValueError(
                f"the batch source gave no batches for epoch {position.epoch} (a one-shot iterator "
                "cannot start a second epoch: pass a re-iterable or a BatchSource)"
            )
        position.epoch += 1
        position.batch = 0


@contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Restores the global python, numpy and torch generators after the block, so a batch source
    that draws from them (a DataLoader draws a worker seed each time it is iterated) does not
    shift the training randomness, which then depends on the step alone."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


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
    a request to stop after the current step. A second SIGTERM/SIGINT interrupts at once; SIGHUP
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


# ------------------------------------------------------------------------------ the step
@dataclass
class StepResult:
    losses: dict[str, float]  # means over micro-batches and ranks
    grad_norm: float  # total norm before clipping
    applied: bool  # False: a non-finite loss or gradient norm on some rank, nothing was updated
    stop: bool  # some rank received SIGTERM/SIGINT/SIGHUP


class Engine:
    """The model (DDP-wrapped when distributed), both optimizers with their schedules and the
    EMA; `step` runs one optimizer step."""

    def __init__(self, model: UNITE, cfg: TrainConfig, runtime: Runtime, schedule: LRSchedule):
        # Train mode reaches every submodule, LPIPS included: its head dropout is part of the
        # reference's training loss (the reference calls model.train() every epoch).
        self.raw = model.train()
        self.runtime = runtime
        self.accum = accumulation_steps(cfg.global_batch, cfg.per_device_batch, runtime.world_size)
        self.grad_clip = cfg.grad_clip
        self.bf16 = cfg.bf16 and runtime.device.type == "cuda"
        self.peak_lr = scaled_lr(cfg.base_lr, cfg.global_batch)
        self.schedule = schedule
        if cfg.compile_decoder:
            model.decoder.compile()
        self.model: nn.Module = model
        if runtime.world_size > 1:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, list(UNUSED_PARAMETERS)
            )
            self.model = DistributedDataParallel(
                model,
                device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                forward_sync_buffers=False,  # the buffers are fixed tables, synced once at init
                gradient_as_bucket_view=True,
            )
        self.params = [p for _, p in trained_parameters(model)]
        self.muon, self.adamw = build_optimizers(
            model, self.peak_lr, newton_schulz_dtype(cfg.muon_dtype, runtime.device)
        )
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (self.muon, self.adamw)
        ]
        self.ema = EMA(model, cfg.ema_decay)

    def step(self, batches: Iterator[tuple[Tensor, Tensor]], stop_requested: bool) -> StepResult:
        device, world = self.runtime.device, self.runtime.world_size
        parts = torch.zeros(len(LOSS_PARTS), device=device)
        for micro in range(self.accum):
            images, labels = next(batches)
            self.raw.check_labels(labels, allow_null=False)  # on the host: no device sync, no device assert
            images = images.to(device, non_blocking=True)
            if images.dtype == torch.uint8:  # loaders ship bytes; floats are made on the device
                images = images.float().div_(255)
            labels = labels.to(device, torch.long, non_blocking=True)
            # Gradients are all-reduced on the last micro-batch only.
            last = micro == self.accum - 1
            with self.model.no_sync() if world > 1 and not last else nullcontext():
                with torch.autocast(device.type, torch.bfloat16, enabled=self.bf16):
                    out = self.model(images, labels)
                (out["loss"] / self.accum).backward()
            parts += torch.stack([out[name].detach().float() for name in LOSS_PARTS]) / self.accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        nonfinite = ~(torch.isfinite(parts).all() & torch.isfinite(grad_norm))
        # One small all-reduce agrees on the losses, the skip decision and a stop request.
        flags = torch.cat([parts, grad_norm.reshape(1).float(), nonfinite.reshape(1).float(),
                           torch.tensor([float(stop_requested)], device=device)])
        if world > 1:
            dist.all_reduce(flags)
        values = flags.tolist()
        applied = values[-2] == 0
        if applied:
            self.muon.step()
            self.adamw.step()
            self.ema.update(self.raw)
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        losses = {name: value / world for name, value in zip(LOSS_PARTS, values)}
        return StepResult(losses, values[len(LOSS_PARTS)] / world, applied, values[-1] > 0)

    def lr_at(self, step: int) -> float:
        """The learning rate the update of optimizer step `step` (0-based) uses."""
        return self.peak_lr * self.schedule(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in self.raw.state_dict().items() if not k.startswith(FROZEN_PREFIX)},
            "ema": self.ema.state_dict(),
            "optimizer": self.adamw.state_dict(),
            "scheduler": self.schedulers[1].state_dict(),
            "optimizer_muon": self.muon.state_dict(),
            "scheduler_muon": self.schedulers[0].state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.raw.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIX)]
        if missing or unexpected:
            raise ValueError(f"checkpoint model does not match: missing {missing}, unexpected {unexpected}")
        self.ema.load_state_dict(state["ema"])
        self.adamw.load_state_dict(state["optimizer"])
        self.schedulers[1].load_state_dict(state["scheduler"])
        self.muon.load_state_dict(state["optimizer_muon"])
        self.schedulers[0].load_state_dict(state["scheduler_muon"])


# ------------------------------------------------------------------------------ resume
def resolve_resume(cfg: TrainConfig, checkpoint_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents: `resume: auto` takes the newest readable
    one in out_dir (None: fresh start); a file or folder given explicitly must exist and hold a
    checkpoint. In a folder, newer checkpoints that cannot be read are set aside with a warning."""

    def warn(line: str) -> None:
        print(f"unite.train: warning: {line}", file=sys.stderr)

    if cfg.resume == "auto":
        return load_newest_readable(checkpoint_dir, warn)
    path = Path(cfg.resume)
    if path.is_dir():
        found = load_newest_readable(path, warn)
        if found is None:
            raise FileNotFoundError(
                f"resume={cfg.resume!r}: the folder holds no complete checkpoint (step_*.pt)"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint file or folder")
    try:
        return path, load_checkpoint(path)
    except ValueError as error:
        raise CheckpointError(f"resume={cfg.resume!r}: {error}") from None


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only a run with the same settings (apart from RESUME_MAY_CHANGE)."""
    keys = sorted((saved.keys() | current.keys()) - RESUME_MAY_CHANGE)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"resume: checkpoint {path} was written by a different config:\n  " + "\n  ".join(diffs)
        )


# ------------------------------------------------------------------------------ metrics
class MetricsLog:
    """Rows of METRIC_COLUMNS in `metrics.tsv` (for `dvc plots`) and the latest row plus
    `max_steps` in `metrics.json` (for `dvc metrics` and progress displays), in `out_dir` and at
    the `live` stem. Every row rewrites the files atomically, so a reader never sees half a row.
    A resumed run keeps the rows up to its starting step and drops later ones (logged after
    that checkpoint, to be logged again), so no row is lost or repeated."""

    def __init__(self, out_dir: Path, start_step: int, max_steps: int, live: str = ""):
        self.stems = [out_dir / "metrics", *([Path(live)] if live else [])]
        self.max_steps = max_steps
        tsv, latest_json = out_dir / "metrics.tsv", out_dir / "metrics.json"
        self.rows: list[str] = []
        if start_step > 0 and tsv.is_file():
            lines = tsv.read_text().splitlines()[1:]
            self.rows = [line for line in lines if int(line.split("\t")[0]) <= start_step]
        self.latest: dict[str, Any] | None = None
        if self.rows:
            saved = json.loads(latest_json.read_text()) if latest_json.is_file() else {}
            logged_step = int(self.rows[-1].split("\t")[0])
            self.latest = saved if saved.get("step") == logged_step else _parse_row(self.rows[-1])
        self._publish()

    def write(self, row: dict[str, float]) -> None:
        self.rows.append("\t".join(_format(row[c]) for c in METRIC_COLUMNS))
        self.latest = dict(row)
        self._publish()

    def _publish(self) -> None:
        table = "\n".join(["\t".join(METRIC_COLUMNS), *self.rows]) + "\n"
        latest = None if self.latest is None else {**self.latest, "max_steps": self.max_steps}
        for stem in self.stems:
            stem.parent.mkdir(parents=True, exist_ok=True)
            _replace_text(stem.with_name(stem.name + ".tsv"), table)
            if latest is not None:
                _replace_text(stem.with_name(stem.name + ".json"), json.dumps(latest, indent=2) + "\n")


def _replace_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _parse_row(line: str) -> dict[str, float]:
    """A tsv row back as numbers (the json of a row that a killed run overwrote)."""
    values = dict(zip(METRIC_COLUMNS, line.split("\t")))
    return {k: int(v) if k in ("step", "epoch", "skipped_steps") else float(v) for k, v in values.items()}


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


@dataclass
class LogWindow:
    """The steps since the last metrics row: loss and gradient-norm sums of the applied ones."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*LOSS_PARTS, "grad_norm"), 0.0))
    applied: int = 0

    def add(self, result: StepResult) -> None:
        for name, value in {**result.losses, "grad_norm": result.grad_norm}.items():
            self.sums[name] += value
        self.applied += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.applied if self.applied else math.nan for name, total in self.sums.items()}


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainResult:
    step: int
    checkpoint: Path | None
    skipped_steps: int


def train(cfg: TrainConfig, data: BatchSource | Iterable[tuple[Tensor, Tensor]] | None = None) -> TrainResult:
    """Train until `cfg.max_steps` optimizer steps, resuming from a checkpoint when there is one.

    `data` defaults to the config's `data:` section. Raises Preempted after SIGTERM/SIGINT/SIGHUP
    (checkpoint written), NonFiniteLossError after `max_nonfinite` skipped steps in a row,
    CheckpointError when no checkpoint to resume from can be read, and TimeoutError when another
    run keeps the checkpoint folder locked."""
    owns_group = not dist.is_initialized()
    runtime = init_runtime(cfg.device)
    try:
        # Rank 0 writes and prunes checkpoints: one run at a time may do so in a folder.
        with exclusive_folder(Path(cfg.out_dir) / "checkpoints") if runtime.is_main else nullcontext():
            return _train(cfg, runtime, data)
    finally:
        if owns_group:
            close_runtime()


def allow_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, as the reference sets it; nothing on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _train(cfg: TrainConfig, runtime: Runtime, data: BatchSource | Iterable | None) -> TrainResult:
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

    schedule = build_schedule(cfg.schedule, cfg.per_device_batch, world)
    saved_world = world
    if state is not None:  # the run's schedule in steps, even where the preset depends on world size
        schedule, saved_world = LRSchedule(**state["config"]["lr_schedule_steps"]), state["config"]["world_size"]
    resolved = {**cfg.to_dict(), "world_size": world, "lr_schedule_steps": dataclasses.asdict(schedule)}
    if state is not None:
        check_resume_config(state["config"], resolved, resume_from)
    source = build_batch_source(cfg, rank, world) if data is None else as_batch_source(data)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    engine = Engine(UNITE(cfg.model).to(runtime.device), cfg, runtime, schedule)
    step, skipped, streak, position, cfg_scale = 0, 0, 0, DataPosition(), cfg.initial_cfg_scale
    reread = 0
    if state is None:
        seed_everything(rank_seed(cfg.seed, rank))
    else:
        engine.load_state_dict(state)
        step, skipped, streak = state["step"], state["skipped_steps"], state["nonfinite_streak"]
        cfg_scale = state["current_best_cfg_scale"]
        if saved_world == world:
            position = DataPosition(**state["data_position"])
            restore_rng_state(state["rng"][rank])
        else:
            position, reread = carry_position(state["data_position"], saved_world, world, cfg.per_device_batch)
            seed_everything(rank_seed(cfg.seed, rank, resumed_at=step))
        del state, found  # the checkpoint's tensors are in the engine now
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        start = f"resuming from {resume_from} at step {step}" if resume_from else "starting from scratch"
        print(f"unite.train: {start}; {world} process(es), {engine.accum} micro-batch(es) of "
              f"{cfg.per_device_batch} per step, peak lr {engine.peak_lr:.4g}", file=sys.stderr)
        if saved_world != world:
            print(f"unite.train: the checkpoint was written by {saved_world} process(es), this run has {world}: "
                  f"global batch {cfg.global_batch}, learning-rate schedule and data position (epoch "
                  f"{position.epoch}, {position.batch * cfg.per_device_batch * world + reread} images in) carry "
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
                     "current_best_cfg_scale": cfg_scale, "skipped_steps": skipped,
                     "nonfinite_streak": streak, "config": resolved}
            save_checkpoint(state, checkpoint_dir, step, cfg.keep_last)
        if world > 1:
            dist.barrier()
        return checkpoint_path(checkpoint_dir, step)

    batches = micro_batches(source, position, cfg.per_device_batch)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (runtime.is_main and cfg.progress),
               dynamic_ncols=True, desc="train")
    window = LogWindow(step)
    last_checkpoint = resume_from
    with StopSignal() as stop_signal:
        while step < cfg.max_steps:
            result = engine.step(batches, stop_signal.received is not None)
            step += 1
            bar.update(1)
            if result.applied:
                streak = 0
                window.add(result)
            else:
                skipped, streak = skipped + 1, streak + 1
                if runtime.is_main:
                    bar.write(f"unite.train: step {step}: non-finite loss or gradient norm, update skipped "
                              f"({streak} in a row, {skipped} in all)", file=sys.stderr)
                if streak >= cfg.max_nonfinite:
                    kept = latest_checkpoint(checkpoint_dir)
                    raise NonFiniteLossError(
                        f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                        f"norm (max_nonfinite={cfg.max_nonfinite}); training stopped. Last good "
                        f"checkpoint: {kept}"
                    )

            if runtime.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps or result.stop):
                elapsed = time.perf_counter() - window.start
                row = {"step": step, "epoch": position.epoch, **window.means(), "lr": engine.lr_at(step - 1),
                       "images_per_s": (step - window.first_step) * cfg.global_batch / elapsed,
                       "skipped_steps": skipped}
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", recon=f"{row['recon']:.4f}",
                                flow=f"{row['flow']:.4f}", lr=f"{row['lr']:.3g}",
                                img_s=f"{row['images_per_s']:.1f}")
                window = LogWindow(step)

            if result.stop or step == cfg.max_steps or (step % cfg.checkpoint_every == 0 and streak == 0):
                last_checkpoint = write_checkpoint()
            if result.stop:
                bar.close()
                signum = stop_signal.received or signal.SIGTERM
                raise Preempted(
                    f"unite.train: {signal.Signals(signum).name} received; finished step {step}, wrote "
                    f"{last_checkpoint}. Run the same command again to resume.", signum
                )
    bar.close()
    return TrainResult(step, last_checkpoint, skipped)


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
