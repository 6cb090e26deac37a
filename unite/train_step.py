"""The training step: the model (DDP-wrapped when distributed), Muon and AdamW with their
learning-rate schedules, and the EMA. One `Engine.step` runs the accumulation micro-batches,
clips the total gradient norm, agrees across ranks on the losses and on whether to apply the
update, then steps the optimizers and the EMA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from unite.distributed import Runtime
from unite.model import UNITE
from unite.optim import EMA, FROZEN_PREFIX, build_optimizers, newton_schulz_dtype, trained_parameters
from unite.train_config import Recipe, TrainConfig

# Quirk kept from the reference: this parameter exists but is never used, so it never gets a
# gradient; DDP is told to ignore it (otherwise its reducer waits for that gradient forever).
UNUSED_PARAMETERS = ("encoder.time_embed.special_time_emb",)

LOSS_PARTS = ("loss", "recon", "l1", "lpips", "flow")


@dataclass
class StepResult:
    losses: dict[str, float]  # means over micro-batches and ranks
    grad_norm: float  # total norm before clipping
    applied: bool  # False: a non-finite loss or gradient norm on some rank, nothing was updated
    stop: bool  # some rank received SIGTERM/SIGINT/SIGHUP


class Engine:
    """The model (DDP-wrapped when distributed), both optimizers with their schedules and the
    EMA; `step` runs one optimizer step. The accumulation, peak learning rate and schedule are
    the run's `recipe` (`recipe_for`, with a resumed run's schedule in steps)."""

    def __init__(self, model: UNITE, cfg: TrainConfig, runtime: Runtime, recipe: Recipe):
        # Train mode reaches every submodule, LPIPS included: its head dropout is part of the
        # reference's training loss (the reference calls model.train() every epoch).
        self.raw = model.train()
        self.runtime = runtime
        self.accum = recipe.accumulation
        self.grad_clip = cfg.grad_clip
        self.bf16 = cfg.bf16 and runtime.device.type == "cuda"
        self.peak_lr = recipe.peak_lr
        self.schedule = recipe.schedule
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
            torch.optim.lr_scheduler.LambdaLR(opt, recipe.schedule) for opt in (self.muon, self.adamw)
        ]
        self.ema = EMA(model, cfg.ema_decay)

    def step(self, batches: Iterator[tuple[Tensor, Tensor]], stop_requested: bool) -> StepResult:
        """One optimizer step on the next `accum` micro-batches; `stop_requested` is this rank's
        wish to stop after it, which the result's `stop` carries to every rank."""
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
        # One small all-reduce agrees on the losses, the skip decision and a stop request: the
        # named scalars go as one tensor and come back by name (sums over ranks).
        shared = {**dict(zip(LOSS_PARTS, parts)), "grad_norm": grad_norm.float(), "nonfinite": nonfinite.float(),
                  "stop": torch.tensor(float(stop_requested), device=device)}
        summed = torch.stack(list(shared.values()))
        if world > 1:
            dist.all_reduce(summed)
        totals = dict(zip(shared, summed.tolist(), strict=True))
        applied = totals["nonfinite"] == 0
        if applied:
            self.muon.step()
            self.adamw.step()
            self.ema.update(self.raw)
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        losses = {name: totals[name] / world for name in LOSS_PARTS}
        return StepResult(losses, totals["grad_norm"] / world, applied, totals["stop"] > 0)

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
