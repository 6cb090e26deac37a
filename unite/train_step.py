"""The training step: the model (DDP-wrapped when distributed), Muon and AdamW with their
learning-rate schedules, and the EMA. One `Engine.step` runs the accumulation micro-batches,
clips the total gradient norm, agrees across ranks on the losses and on whether to apply the
update, then steps the optimizers and the EMA. Nothing in it waits for the device: whether to
apply the update is decided on the device, and the values the host needs arrive as a
`PendingStep`, read after the next step has been queued."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
# The values every rank agrees on after a step, summed over ranks in one all-reduce.
SHARED_VALUES = (*LOSS_PARTS, "grad_norm", "nonfinite", "stop")


@dataclass
class StepResult:
    losses: dict[str, float]  # means over micro-batches and ranks
    grad_norm: float  # total norm before clipping
    applied: bool  # False: a non-finite loss or gradient norm on some rank, nothing was updated
    stop: bool  # some rank received SIGTERM/SIGINT/SIGHUP


class PendingStep:
    """A queued step's shared values (SHARED_VALUES, summed over ranks) on their way to the host.

    On CUDA they are copied without blocking into pinned memory and an event marks the copy's
    end, so `result()` waits for that copy only, not for the work queued after it; on a CPU the
    values are there already. `result()` reads them once and keeps the answer."""

    def __init__(self, summed: Tensor, world: int):
        self.world = world
        self.values = summed.to("cpu", non_blocking=True)  # pinned when coming from CUDA
        self.ready: torch.cuda.Event | None = None
        if summed.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            if self.ready is not None:
                self.ready.synchronize()
            totals = dict(zip(SHARED_VALUES, self.values.tolist(), strict=True))
            self._result = StepResult({name: totals[name] / self.world for name in LOSS_PARTS},
                                      totals["grad_norm"] / self.world, totals["nonfinite"] == 0,
                                      totals["stop"] > 0)
        return self._result


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

    def step(self, batches: Iterator[tuple[Tensor, Tensor]], stop_requested: Callable[[], bool]) -> PendingStep:
        """Queues one optimizer step on the next `accum` micro-batches and returns its values on
        their way to the host. `stop_requested` is this rank's wish to stop, asked as late as
        possible (after the micro-batches); the result's `stop` carries it to every rank.

        A non-finite loss or gradient norm on any rank skips the update on the device: fused
        AdamW gets the all-reduced flag as GradScaler's `found_inf` (its step count is rolled
        back), Muon and the EMA the same flag (`Muon.step`, `EMA.update`). Schedulers step
        either way, as before."""
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
        # Filled on the device: torch.tensor(x, device=...) would copy from the host and wait.
        stop = torch.full((), float(stop_requested()), device=device)
        # One small all-reduce agrees on the losses, the skip decision and a stop request (sums).
        summed = torch.cat([parts, torch.stack([grad_norm.float(), nonfinite.float(), stop])])
        if world > 1:
            dist.all_reduce(summed)
        found_inf = (summed[SHARED_VALUES.index("nonfinite")] > 0).float()
        self.muon.step(found_inf=found_inf)
        self.adamw.found_inf = found_inf
        self.adamw.step()
        self.ema.update(self.raw, keep=found_inf == 0)
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        return PendingStep(summed, world)

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
