"""Median seconds per optimizer step of the UNITE training step on this machine.

    .venv/bin/python -m benchmarks.bench_train --preset reference-cpu      # the 2-CPU comparison
    .venv/bin/python -m benchmarks.bench_train --preset unite-b --compile  # UNITE-B, 64 images/GPU, bf16

It times `unite.train.Engine.step` (forward and backward of every micro-batch, clipping, Muon,
AdamW, EMA) on synthetic images, after warm-up steps, and prints one JSON line with the median
wall time and the median CPU time of this process per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch
import yaml

from unite.model import UNITE, count_trainable
from unite.optim import NS_DTYPES
from unite.train import (
    DataPosition,
    Engine,
    TensorBatches,
    TrainConfig,
    build_schedule,
    init_runtime,
    micro_batches,
    synthetic_images,
)

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference-cpu")
    parser.add_argument("--batch", type=int, help="images per micro-batch (default: the preset's)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field, e.g. --set flow_steps_per_recon=14")
    parser.add_argument("--steps", type=int, default=7, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", help="cpu or cuda (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the pixel decoder")
    parser.add_argument("--muon-dtype", choices=("auto", *NS_DTYPES), default="auto",
                        help="Muon's Newton-Schulz dtype (train.muon_dtype)")
    args = parser.parse_args(argv)

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
        "device": args.device or preset["device"], "bf16": not args.fp32, "compile_decoder": args.compile,
        "muon_dtype": args.muon_dtype,
    })
    runtime = init_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    engine = Engine(UNITE(cfg.model).to(runtime.device), cfg, runtime, build_schedule(cfg.schedule, batch, 1))
    source = TensorBatches(*synthetic_images(cfg.model, 2 * batch, 0), batch)
    batches = micro_batches(source, DataPosition(), batch)

    times, cpu_times = [], []
    for index in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        engine.step(batches, stop_requested=False)  # returns host values, so the device is synced
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    report = {
        "preset": args.preset, "device": str(runtime.device),
        "device_name": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": batch, "accum": args.accum,
        "flow_steps": cfg.model.flow_steps_per_recon, "bf16": engine.bf16, "compile_decoder": args.compile,
        "muon_dtype": str(engine.muon.ns_dtype).removeprefix("torch."),
        "trainable_params": count_trainable(engine.raw), "median_s_per_step": round(median, 4),
        "images_per_s": round(batch * args.accum / median, 2), "step_times": [round(t, 4) for t in times],
        # CPU seconds this process used per step (all its threads): with one thread, close to the
        # wall time the step would take on an idle core, even when the machine is shared.
        "median_cpu_s_per_step": round(statistics.median(cpu_times), 4),
    }
    if runtime.device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
