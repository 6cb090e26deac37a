"""Median seconds per optimizer step of the UNITE training step on this machine.

    .venv/bin/python -m benchmarks.bench_train --preset reference-cpu      # the 2-CPU comparison
    .venv/bin/python -m benchmarks.bench_train --preset demo               # the demo's step
    .venv/bin/python -m benchmarks.bench_train --preset unite-b --compile  # UNITE-B, 64 images/GPU, bf16
    .venv/bin/python -m benchmarks.bench_train --preset reference-cpu --reference ../UNITE-tokenization-generation

It times `unite.train_step.Engine.step` (forward and backward of every micro-batch, clipping, Muon,
AdamW, EMA) on synthetic images, after warm-up steps, and prints one JSON line with the median
wall time and the median CPU time of this process per step.

With `--count-host-syncs` it times nothing: it runs `--steps` optimizer steps (default 20) on
fake CUDA tensors (FakeTensorMode: no GPU needed) under `unite.host_syncs.HostSyncCounter` and
prints, per optimizer step, how often the host waits for the device and how many values it
reads; with `--reference` the reference's step too, in the same run, as its train loop runs it
(4 `.item()` on rank 0 every 20 steps).

    .venv/bin/python -m benchmarks.bench_train --preset reference-cpu --count-host-syncs --reference PATH

With `--reference PATH` (a checkout of the public reference implementation, whose requirements
such as timm must be importable) it also times the reference's step on the same model size,
batch and images, alternating with this project's step in the same run, and prints the ratio.
The reference is imported only then. Its LPIPS gets random weights (the same compute, nothing
to download) and runs even with perceptual_weight 0, as the reference always computes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from unite.batches import DataPosition, TensorBatches, micro_batches, synthetic_images
from unite.config import ModelConfig
from unite.model import UNITE, count_trainable
from unite.optim import NS_DTYPES
from unite.distributed import Runtime, init_runtime
from unite.host_syncs import HostSyncCounter
from unite.train_config import TrainConfig, recipe_for
from unite.train_step import Engine
from unite.dry_run import fake_cuda, gradients_instead_of_backward

PRESETS: dict[str, dict[str, Any]] = {
    # The configuration the reference implementation was timed on (2.54 s/step on 2 CPU cores).
    "reference-cpu": {
        "model": {"encoder": "Tiny", "decoder": "Tiny", "encoder_depth": 6, "encoder_hidden": 128,
                  "encoder_heads": 2, "decoder_layers": 2, "decoder_hidden": 128, "decoder_heads": 2,
                  "decoder_mlp": 512, "image_size": 256, "patch_size": 16, "num_latent_tokens": 256,
                  "latent_dim": 32, "flow_steps_per_recon": 3, "perceptual_weight": 0.0},
        "batch": 2, "device": "cpu",
    },
    # The demo's training step (params.yaml's train section: 16x16 digits, batch 128).
    "demo": {
        "model": {"encoder": "Tiny", "decoder": "Tiny", "encoder_depth": 4, "encoder_hidden": 96,
                  "encoder_heads": 4, "in_context_len": 4, "in_context_start": 1, "decoder_layers": 2,
                  "decoder_hidden": 96, "decoder_heads": 4, "decoder_mlp": 192, "decoder_proj_dim": 96,
                  "image_size": 16, "patch_size": 8, "num_latent_tokens": 4, "latent_dim": 16,
                  "num_classes": 10, "flow_steps_per_recon": 1, "flow_mini_batch": 1,
                  "perceptual_weight": 0.0},
        "batch": 128, "device": "cpu",
    },
    # UNITE-B as trained: LPIPS on (a random VGG trunk: the same compute, no weights file needed).
    "unite-b": {
        "model": {"encoder": "B", "decoder": "B", "flow_steps_per_recon": 3, "perceptual_weight": 1.0,
                  "lpips_random_backbone": True},
        "batch": 64, "device": "cuda",
    },
}


def parse_value(text: str) -> Any:
    """`--set key=value` values are YAML scalars (3, 0.5, true, B)."""
    return yaml.safe_load(text)


# Model fields the reference fixes in its code: the value it supports.
REFERENCE_FIXED = {"image_size": 256, "decoder_proj_dim": 768, "velocity_eps": 0.05, "label_drop_prob": 0.1,
                   "decoder_noise_prob": 0.5}


def reference_mismatch(cfg: ModelConfig) -> str | None:
    """Why the reference cannot build this model config (None: it can)."""
    for name, supported in REFERENCE_FIXED.items():
        if getattr(cfg, name) != supported:
            return f"model.{name}={getattr(cfg, name)}: the reference supports only {supported}"
    return None


# The reference's train loop reads 4 values on the host every `log_interval` optimizer steps on
# rank 0 (engines/train.py); its ImageNet config sets 20.
REFERENCE_LOG_INTERVAL = 20


def build_on(device: torch.device, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` moved to `device`, as the trainer does; under FakeTensorMode (the host-sync count)
    built on the meta device outside the mode and given fake storage inside it instead, as
    Module.to() of a module fails there."""
    if isinstance(torch._guards.detect_fake_mode(), FakeTensorMode):
        with unset_fake_temporarily(), torch.device("meta"):
            module = build()
        return module.to_empty(device=device)
    return build().to(device)


def reference_step(path: Path, cfg: ModelConfig, device: torch.device, bf16: bool,
                   images: torch.Tensor, labels: torch.Tensor, base_lr: float) -> tuple[Callable[[], None], int]:
    """One optimizer step of the reference implementation checked out at `path`, for the same
    model config: its UNITE, its AdamW and torch.optim.Muon builders, clipping at 3.0, its EMA
    update and, every REFERENCE_LOG_INTERVAL steps from the first, its 4 logged `.item()`, in
    the order of its train loop (one micro-batch, no accumulation); and the count of its
    trainable parameters, which should equal this project's."""
    sys.path.insert(0, str(path))
    from models import unite as reference  # noqa: PLC0415 (imported only on request)
    from modules.autoencoding_utils import lpips as reference_lpips  # noqa: PLC0415
    from utils.ema import update_ema  # noqa: PLC0415
    from utils.optim import build_optimizer, build_optimizer_muon  # noqa: PLC0415

    # Random LPIPS weights: the same compute, and nothing to download.
    reference_lpips.LPIPS._load_pretrained_weights = lambda self, name="vgg_lpips": None
    reference_lpips._ensure_torchvision_weights_cached = lambda url: None
    torchvision_models = reference_lpips.models
    reference_lpips.models = types.SimpleNamespace(
        VGG16_Weights=torchvision_models.VGG16_Weights,
        vgg16=lambda weights=None, progress=False: torchvision_models.vgg16(weights=None))
    reference.ENCODER_CONFIGS["bench"] = (cfg.encoder_depth, cfg.encoder_hidden, cfg.encoder_heads)
    reference.DECODER_CONFIGS["bench"] = (cfg.decoder_layers, cfg.decoder_hidden, cfg.decoder_heads, cfg.decoder_mlp)
    gen_tok = {
        "diffusion_input_dim": cfg.latent_dim, "encoder_model_size": "bench", "decoder_model_size": "bench",
        "patch_size": cfg.patch_size, "flow_steps_per_recon": cfg.flow_steps_per_recon,
        "flow_mini_batch": cfg.flow_mini_batch, "timestep_shift_mode": "manual",
        "timestep_shift_alpha": cfg.timestep_shift, "modulation_recon_timestep_max": cfg.recon_t_max,
        "noising_t_start": cfg.decoder_noise_t_min, "in_content_len": cfg.in_context_len,
        "in_content_start": cfg.in_context_start, "use_qknorm_encoder": cfg.qk_norm,
        "loss": {"perceptual_weight": cfg.perceptual_weight, "gen_loss_weight": cfg.gen_loss_weight},
    }
    model = build_on(device, lambda: reference.UNITE(gen_tok, num_latent_tokens=cfg.num_latent_tokens,
                                                     num_classes=cfg.num_classes))
    ema = deepcopy(model).eval().requires_grad_(False)
    training = {"optimizer": {"lr": base_lr, "betas": [0.9, 0.999], "muon_adjust_lr_fn": "match_rms_adamw"}}
    optimizers = [build_optimizer(model.get_learnable_params(non_muon=True), training, prefix="adamw_")[0],
                  build_optimizer_muon(model.get_learnable_params(muon=True), training, prefix="muon_")[0]]
    images, labels = images.to(device), labels.to(device)
    model.train()
    global_step = 0

    def step() -> None:
        nonlocal global_step
        for optimizer in optimizers:
            optimizer.zero_grad()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, output = model(images, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        for optimizer in optimizers:
            optimizer.step()
        update_ema(ema, model, 0.9978)
        if global_step % REFERENCE_LOG_INTERVAL == 0:
            for value in (loss, output["rec_loss"], output["lpips_loss"], output["flow/flow_loss"]):
                value.detach().item()
        global_step += 1

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_host_syncs(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Host syncs and values read per optimizer step over `steps` calls of `step`, and the syncs
    before its gradient clipping (the micro-batch loop: forward and backward of every micro-batch)."""
    counter = HostSyncCounter()
    per_step, before_clipping = [], []
    clip = torch.nn.utils.clip_grad_norm_
    start = 0

    def clip_marked(*args: Any, **kwargs: Any) -> torch.Tensor:
        before_clipping.append(counter.syncs - start)
        return clip(*args, **kwargs)

    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip_marked), counter:
        for _ in range(steps):
            start, values = counter.syncs, counter.values
            step()
            per_step.append((counter.syncs - start, counter.values - values))
    if len(before_clipping) != steps:
        raise RuntimeError(f"the step clipped gradients {len(before_clipping)} times in {steps} steps; "
                           "the micro-batch loop is counted up to the one clipping per step")
    return {
        "steps": steps,
        "syncs_per_step": [syncs for syncs, _ in per_step],
        "max_syncs_per_step": max(syncs for syncs, _ in per_step),
        "syncs_per_step_amortised": counter.syncs / steps,
        "values_per_step_amortised": counter.values / steps,
        "syncs_in_micro_batch_loop": sum(before_clipping),
        "syncs_by_op": dict(counter.where),
    }


def count_report(cfg: TrainConfig, preset: str, steps: int, reference: Path | None) -> dict[str, Any]:
    """This project's Engine.step (as the trainer calls it) and, with `reference`, the
    reference's step, each run `steps` times on fake CUDA tensors under HostSyncCounter."""
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "preset": preset, "device": "fake cuda (FakeTensorMode)", "batch": cfg.per_device_batch,
        "accum": cfg.global_batch // cfg.per_device_batch,
        "note": "backward replaced by a zero gradient for every leaf of the loss's graph (autograd on fake CUDA "
                "tensors needs a CUDA context; the backward of these ops reads nothing on the host). "
                "Engine.step's values reach the host by a non-blocking copy that the trainer reads after "
                "the next step is queued (an event, then host memory): no device read.",
    }
    with fake_cuda():
        images = torch.rand(cfg.per_device_batch, 3, cfg.model.image_size, cfg.model.image_size, device=device)
        labels = torch.randint(0, cfg.model.num_classes, (cfg.per_device_batch,), device=device)
        engine = Engine(build_on(device, lambda: UNITE(cfg.model)), cfg, Runtime(0, 1, device), recipe_for(cfg, 1))
        # Batches already on the device: check_labels then reads no values (with host labels it
        # reads them on the host, which waits for nothing).
        batches = iter(lambda: (images, labels), None)
        with gradients_instead_of_backward():
            report["unite"] = count_host_syncs(lambda: engine.step(batches, lambda: False), steps)
            if reference is not None:
                step, _ = reference_step(reference, cfg.model, device, cfg.bf16, images, labels, engine.peak_lr)
                report["reference"] = count_host_syncs(step, steps)
    return report
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference-cpu")
    parser.add_argument("--batch", type=int, help="images per micro-batch (default: the preset's)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field, e.g. --set flow_steps_per_recon=14")
    parser.add_argument("--steps", type=int,
                        help="timed steps, the median is reported (default 7); with --count-host-syncs the "
                             f"counted steps (default {REFERENCE_LOG_INTERVAL}, the reference's log interval)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", help="cpu or cuda (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the pixel decoder")
    parser.add_argument("--muon-dtype", choices=("auto", *NS_DTYPES), action="append",
                        help="Muon's Newton-Schulz dtype (train.muon_dtype, default auto); given twice, "
                             "both are timed side by side, one JSON line each")
    parser.add_argument("--reference", type=Path, metavar="PATH",
                        help="a checkout of the reference implementation: time its step too, same run")
    parser.add_argument("--count-host-syncs", action="store_true",
                        help="count host syncs per optimizer step on fake CUDA tensors instead of timing")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = REFERENCE_LOG_INTERVAL if args.count_host_syncs else 7

    preset = PRESETS[args.preset]
    model = dict(preset["model"])
    for item in args.set:
        key, _, value = item.partition("=")
        model[key] = parse_value(value)
    batch = args.batch or preset["batch"]
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_dict({
        "model": model, "data": {"kind": "synthetic", "num_images": 2 * batch},
        "out_dir": tempfile.gettempdir(), "max_steps": args.warmup + args.steps,
        "global_batch": batch * args.accum, "per_device_batch": batch,
        "schedule": {"warmup_steps": 0, "hold_until_step": 1, "decay_until_step": 1, "final_lr_factor": 1.0},
        "device": "cuda" if args.count_host_syncs else args.device or preset["device"], "bf16": not args.fp32,
        "compile_decoder": args.compile,
    })
    if args.reference is not None:
        if not (args.reference / "models" / "unite.py").is_file():
            parser.error(f"--reference {args.reference}: not a checkout of the reference implementation "
                         "(no models/unite.py in it)")
        if args.accum != 1:
            parser.error(f"--accum {args.accum}: with --reference only 1 (the reference step is timed "
                         "for one micro-batch)")
        mismatch = reference_mismatch(cfg.model)
        if mismatch:
            parser.error(f"--reference with preset {args.preset}: {mismatch}")
    if args.count_host_syncs:
        try:
            print(json.dumps(count_report(cfg, args.preset, args.steps, args.reference)))
        except ImportError as error:
            parser.error(f"--reference {args.reference}: importing the reference failed ({error}); "
                         "install its requirements (requirements.txt in the checkout)")
        return
    runtime = init_runtime(cfg.device)
    engines = {}
    for choice in args.muon_dtype or ["auto"]:
        torch.manual_seed(cfg.seed)
        variant = dataclasses.replace(cfg, muon_dtype=choice)
        engines[choice] = Engine(UNITE(cfg.model).to(runtime.device), variant, runtime,
                                 recipe_for(cfg, runtime.world_size))
    engine = next(iter(engines.values()))
    images, labels = synthetic_images(cfg.model, 2 * batch, 0)
    steps: dict[str, Callable[[], Any]] = {
        choice: functools.partial(
            engine.step, micro_batches(TensorBatches(images, labels, batch), DataPosition(), batch),
            stop_requested=lambda: False)
        for choice, engine in engines.items()
    }
    if args.reference is not None:
        try:
            steps["reference"], reference_params = reference_step(
                args.reference, cfg.model, runtime.device, engine.bf16, images[:batch], labels[:batch],
                engine.peak_lr)
        except ImportError as error:
            parser.error(f"--reference {args.reference}: importing the reference failed ({error}); "
                         "install its requirements (requirements.txt in the checkout)")

    timings: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in steps}
    for index in range(args.warmup + args.steps):
        for name, step in steps.items():  # alternating, so that both see the same machine load
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            if runtime.device.type == "cuda":  # neither step waits for the device by itself
                torch.cuda.synchronize(runtime.device)
            if index >= args.warmup:
                timings[name][0].append(time.perf_counter() - start)
                timings[name][1].append(time.process_time() - cpu_start)
    for choice, engine in engines.items():
        times, cpu_times = timings[choice]
        median = statistics.median(times)
        report = {
            "preset": args.preset, "device": str(runtime.device),
            "device_name": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "batch": batch, "accum": args.accum,
            "flow_steps": cfg.model.flow_steps_per_recon, "bf16": engine.bf16, "compile_decoder": args.compile,
            "muon_dtype": choice, "newton_schulz_dtype": str(engine.muon.ns_dtype).removeprefix("torch."),
            "trainable_params": count_trainable(engine.raw), "median_s_per_step": round(median, 4),
            "images_per_s": round(batch * args.accum / median, 2), "step_times": [round(t, 4) for t in times],
            # CPU seconds this process used per step (all its threads): with one thread, close to the
            # wall time the step would take on an idle core, even when the machine is shared.
            "median_cpu_s_per_step": round(statistics.median(cpu_times), 4),
        }
        if "reference" in timings:
            ref_times, ref_cpu_times = timings["reference"]
            report["reference"] = {
                "trainable_params": reference_params,
                "median_s_per_step": round(statistics.median(ref_times), 4),
                "median_cpu_s_per_step": round(statistics.median(ref_cpu_times), 4),
                "step_times": [round(t, 4) for t in ref_times],
            }
            # How many times longer the reference's step takes than this project's.
            report["reference_over_unite"] = round(statistics.median(ref_times) / median, 3)
            report["reference_over_unite_cpu"] = round(
                statistics.median(ref_cpu_times) / statistics.median(cpu_times), 3)
        if runtime.device.type == "cuda":
            report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 2)
        print(json.dumps(report))

if __name__ == "__main__":
    main()
